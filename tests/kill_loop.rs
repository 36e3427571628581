//! The process-kill loop: `ckptstore crashtest` SIGKILLs a child writer hundreds of times at
//! random moments (in chunk writes, WAL appends, compactions, deletes and during recovery
//! itself), reopens the store after each kill and checks every acknowledged checkpoint is
//! there bit-exact, everything listed verifies and recovery leaves nothing behind. The number
//! of kills comes from `CKPT_KILLS` (default 200). The checker is itself tested: a writer that
//! acknowledges a commit it never made, and a checkpoint corrupted between a kill and the
//! check, are both reported as violations.

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_ckptstore");

fn crashtest(dir: &Path, kills: u64, extra: &[&str]) -> (Output, Value) {
    let out = Command::new(BIN)
        .arg("crashtest")
        .arg("--dir")
        .arg(dir)
        .args(["--kills", &kills.to_string(), "--json"])
        .args(extra)
        .output()
        .expect("run ckptstore crashtest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "crashtest printed no JSON ({e}): {stdout:?}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, v)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn kills_from_env() -> u64 {
    std::env::var("CKPT_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200)
}

#[test]
fn every_acknowledged_checkpoint_survives_hundreds_of_sigkills() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let kills = kills_from_env();
    let (out, v) = crashtest(&dir, kills, &["--seed", "7"]);
    eprintln!("{v:#}");
    assert!(out.status.success(), "crashtest failed: {}", stderr(&out));
    assert_eq!(v["violations"], 0, "{:#}", v["violation_list"]);
    assert_eq!(v["kills"].as_u64(), Some(kills));
    assert!(v["acknowledged"].as_u64().unwrap() > 0);
    assert!(v["deletes"].as_u64().unwrap() > 0);
    assert!(v["verified"].as_u64().unwrap() > 0);
    assert_eq!(v["recovered"].as_u64(), Some(kills + 1));
    assert!(v["final_commit"]["id"].as_u64().is_some());
    // The kills land in more than one kind of work (and recovery among them, given enough).
    let phases = v["kills_by_phase"].as_object().unwrap();
    assert!(phases.len() >= 3, "kills all in {phases:?}");
    if kills >= 100 {
        for p in ["commit", "delete", "recovery"] {
            assert!(phases.contains_key(p), "no kill {p}: {phases:?}");
        }
    }

    // A second run continues on the same store (the first run's checkpoints are checked).
    let (out, v) = crashtest(&dir, 5, &["--seed", "8"]);
    assert!(
        out.status.success(),
        "continued crashtest failed: {}",
        stderr(&out)
    );
    assert_eq!(v["continued"], true);
    assert_eq!(v["violations"], 0);
    assert_eq!(v["kills"], 5);
}

fn assert_detected(fault: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let (out, v) = crashtest(&dir, 20, &["--inject-fault", fault]);
    assert!(
        !out.status.success(),
        "the {fault} fault went unnoticed: {v:#}"
    );
    assert!(v["violations"].as_u64().unwrap() >= 1, "{v:#}");
    assert_eq!(v["ok"], false);
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "not one line: {err:?}");
    assert!(lines[0].starts_with("ckptstore: VIOLATION"), "{err:?}");
    lines[0].to_owned()
}

#[test]
fn a_writer_that_acknowledges_a_commit_it_never_made_is_caught() {
    let line = assert_detected("lie");
    assert!(line.contains("acknowledged"), "{line}");
}

#[test]
fn a_checkpoint_corrupted_between_kills_is_caught() {
    let line = assert_detected("corrupt");
    assert!(line.contains("BLAKE3"), "{line}");
}

#[test]
fn refuses_a_directory_that_is_not_a_crashtest_store() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("precious.txt"), b"keep me").unwrap();
    let out = Command::new(BIN)
        .arg("crashtest")
        .arg("--dir")
        .arg(tmp.path())
        .args(["--kills", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(err.contains("not a crashtest store"), "{err:?}");
    let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert_eq!(names.len(), 1, "crashtest wrote into a foreign directory");
    assert_eq!(
        std::fs::read(tmp.path().join("precious.txt")).unwrap(),
        b"keep me"
    );
}

#[test]
fn help_is_clean() {
    let out = Command::new(BIN)
        .args(["crashtest", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--dir", "--kills", "--seed", "--json", "page cache"] {
        assert!(help.contains(flag), "{flag} missing from {help}");
    }
    assert!(!help.contains("inject"), "hidden flag shown: {help}");
    assert!(out.stderr.is_empty());
}
