//! Running the `ckptstore` binary of this build from a test (a module of its own, not in
//! `support`, which fuzz targets include too and have no binary): success returns stdout, failure
//! must be exactly one `ckptstore: ...` line on stderr (the CLI's error contract).

#![allow(dead_code)]

use std::process::{Command, Output};

/// The binary Cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_ckptstore");

pub fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run ckptstore")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs and expects success; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "ckptstore {args:?} failed: {}\n{}",
        o.status,
        stderr(&o)
    );
    stdout(&o)
}

/// The one `ckptstore: ...` line of a failure's stderr.
fn one_error_line(o: &Output) -> String {
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "not one line: {err:?}");
    assert!(lines[0].starts_with("ckptstore: "), "{err:?}");
    lines[0].to_owned()
}

/// Runs and expects failure with exactly one `ckptstore: ...` line on stderr; returns it.
pub fn fails(args: &[&str]) -> String {
    let o = run(args);
    assert!(!o.status.success(), "ckptstore {args:?} succeeded");
    one_error_line(&o)
}

/// As [`fails`], with exit status `code`.
pub fn fails_with(code: i32, args: &[&str]) -> String {
    let o = run(args);
    assert_eq!(o.status.code(), Some(code), "ckptstore {args:?}");
    one_error_line(&o)
}
