//! The process-kill loop: `ckptstore crashtest` SIGKILLs a child writer hundreds of times at
//! random moments (in chunk writes, WAL appends, compactions, deletes and during recovery
//! itself), reopens the store after each kill and checks every acknowledged checkpoint is
//! there bit-exact, everything listed verifies and recovery leaves nothing behind. The number
//! of kills comes from `CKPT_KILLS` (default 200). The asynchronous variant (`--async`) saves
//! through the write pipeline and is killed with several saves in flight: those found
//! committed after a kill must be the oldest of them, in submission order. The checker is
//! itself tested: a writer that acknowledges a commit it never made, a checkpoint corrupted
//! between a kill and the check, and (async) a later save that survives an earlier one that
//! was lost, are all reported as violations.

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

/// Bad input: the process killed with saves in flight. The pipeline writer keeps up
/// to 3 saves submitted and not acknowledged; after each kill every acknowledged checkpoint is
/// there bit-exact and the in-flight saves that committed are a prefix of them in order.
#[test]
fn every_acknowledged_async_save_survives_sigkills_with_saves_in_flight() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let kills = kills_from_env();
    let (out, v) = crashtest(
        &dir,
        kills,
        &["--seed", "11", "--async", "--in-flight", "3"],
    );
    eprintln!("{v:#}");
    assert!(out.status.success(), "crashtest failed: {}", stderr(&out));
    assert_eq!(v["violations"], 0, "{:#}", v["violation_list"]);
    assert_eq!(v["mode"], "async");
    assert_eq!(v["in_flight"], 3);
    assert_eq!(v["kills"].as_u64(), Some(kills));
    assert_eq!(v["recovered"].as_u64(), Some(kills + 1));
    assert!(v["acknowledged"].as_u64().unwrap() > 0);
    assert!(v["deletes"].as_u64().unwrap() > 0);
    assert!(v["verified"].as_u64().unwrap() > 0);
    assert!(v["final_commit"]["id"].as_u64().is_some());
    let by_in_flight = v["kills_by_saves_in_flight"].as_object().unwrap();
    assert!(
        by_in_flight.keys().all(|n| n.parse::<u64>().unwrap() <= 3),
        "more saves in flight than --in-flight allows: {by_in_flight:?}"
    );
    // Given enough kills, they land with several saves begun and not acknowledged (measured:
    // half of 200), and some of those had committed (the prefix check had work to do).
    if kills >= 100 {
        let several: u64 = by_in_flight
            .iter()
            .filter(|(n, _)| n.parse::<u64>().unwrap() >= 2)
            .map(|(_, k)| k.as_u64().unwrap())
            .sum();
        assert!(
            several * 5 >= kills,
            "too few kills with 2+ saves in flight: {by_in_flight:?}"
        );
        assert!(v["unacknowledged_commits_found"].as_u64().unwrap() > 0);
    }

    // The synchronous writer carries on with the same store, and the asynchronous one again.
    let (out, v) = crashtest(&dir, 5, &["--seed", "12"]);
    assert!(out.status.success(), "sync after async: {}", stderr(&out));
    assert_eq!(
        (v["continued"].clone(), v["violations"].clone()),
        (true.into(), 0.into())
    );
    let (out, v) = crashtest(&dir, 5, &["--seed", "13", "--async", "--in-flight", "5"]);
    assert!(out.status.success(), "async again: {}", stderr(&out));
    assert_eq!(
        (v["continued"].clone(), v["violations"].clone()),
        (true.into(), 0.into())
    );
}

fn assert_detected(fault: &str) -> String {
    assert_detected_with(fault, &[])
}

fn assert_detected_with(fault: &str, extra: &[&str]) -> String {
    assert_detected_in(20, fault, extra)
}

/// A run of `kills` kills with `fault` injected must fail, with one violation line.
fn assert_detected_in(kills: u64, fault: &str, extra: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let mut args = vec!["--inject-fault", fault];
    args.extend_from_slice(extra);
    let (out, v) = crashtest(&dir, kills, &args);
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
fn an_async_writer_that_acknowledges_a_commit_it_never_made_is_caught() {
    let line = assert_detected_with("lie", &["--async"]);
    assert!(line.contains("acknowledged"), "{line}");
}

/// The prefix check can fail: a writer that drops a save and commits the one submitted after
/// it (what a pipeline committing out of order would leave) is caught.
#[test]
fn a_later_save_surviving_an_earlier_lost_one_is_caught() {
    let line = assert_detected_with("reorder", &["--async"]);
    assert!(line.contains("not the first"), "{line}");
}

/// Regression (ciguard): the reorder writer's kills were aimed by timing estimates that its
/// output never updates (at most ~0.2 s after its open); on a loaded machine, where the
/// pipeline's threads run nicer than everything else, all 20 landed before its later save was
/// durable and the fault went unnoticed. Now it is killed once it says the save is durable:
/// the very first kill catches it, at any machine speed.
#[test]
fn regression_the_reorder_fault_is_caught_at_the_first_kill() {
    let line = assert_detected_in(1, "reorder", &["--async"]);
    assert!(line.contains("not the first"), "{line}");
}

#[test]
fn in_flight_without_async_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg("crashtest")
        .arg("--dir")
        .arg(tmp.path().join("store"))
        .args(["--in-flight", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--async"), "{}", stderr(&out));
    assert!(
        !tmp.path().join("store").exists(),
        "a refused run made the store"
    );
    for bad in ["0", "65", "x"] {
        let out = Command::new(BIN)
            .arg("crashtest")
            .arg("--dir")
            .arg(tmp.path().join("store"))
            .args(["--async", "--in-flight", bad])
            .output()
            .unwrap();
        assert!(!out.status.success(), "--in-flight {bad} accepted");
        assert!(stderr(&out).contains("--in-flight"), "{}", stderr(&out));
    }
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
    for flag in [
        "--dir",
        "--kills",
        "--seed",
        "--async",
        "--in-flight",
        "--json",
        "page cache",
    ] {
        assert!(help.contains(flag), "{flag} missing from {help}");
    }
    assert!(!help.contains("inject"), "hidden flag shown: {help}");
    assert!(out.stderr.is_empty());
}
