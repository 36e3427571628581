//! `ckptstore gc`, `pin` and `unpin` end to end: the plan and its reasons, --dry-run changes
//! nothing, --json, pins respected, usage errors, one-line failures.

mod cli_support;
mod support;

use ckptstore::{DType, Options, Store};
use cli_support::{fails_with, ok};
use serde_json::Value;
use std::path::Path;
use support::{data, opts, CHUNK};

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON ({e}): {s}"))
}

/// Six checkpoints at steps 100..=600 with a `loss` metric (best: step 200) and a tensor
/// each, plus a shared frozen tensor.
fn make_store(dir: &Path) {
    let mut s = Store::open(dir, opts()).unwrap();
    let frozen = data(1, 2 * CHUNK);
    for i in 1..=6u64 {
        let mut t = s.begin(i * 100).unwrap();
        t.set_metadata("loss", [0.9, 0.1, 0.5, 0.4, 0.7, 0.8][i as usize - 1]);
        t.put_tensor("frozen", DType::U8, &[frozen.len() as u64], &frozen)
            .unwrap();
        t.put_tensor("w", DType::U8, &[CHUNK as u64], &data(i, CHUNK))
            .unwrap();
        t.commit().unwrap();
    }
}

fn ids(dir: &Path) -> Vec<u64> {
    let s = Store::open(dir, Options::read_only()).unwrap();
    s.list().iter().map(|c| c.id).collect()
}

#[test]
fn dry_run_then_gc_with_reasons() {
    let d = tempfile::tempdir().unwrap();
    make_store(d.path());
    let dir = d.path().to_str().unwrap();
    let args = [
        "gc",
        dir,
        "--keep-last",
        "2",
        "--keep-every-steps",
        "300",
        "--keep-best",
        "1",
        "--metric",
        "loss",
        "--mode",
        "min",
    ];
    let mut dry = args.to_vec();
    dry.push("--dry-run");
    let text = ok(&dry);
    assert!(text.starts_with("ACTION"), "{text}");
    assert!(text.contains("would delete"), "{text}");
    assert!(text.contains("best 1 by loss (min)"), "{text}");
    assert!(text.contains("step multiple of 300"), "{text}");
    assert!(
        text.contains("dry run: would delete 2 checkpoints"),
        "{text}"
    );
    assert_eq!(ids(d.path()).len(), 6, "dry run deletes nothing");

    dry.push("--json");
    let v = json(&ok(&dry));
    assert_eq!(v["dry_run"], true);
    let kept: Vec<u64> = v["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_u64().unwrap())
        .collect();
    let deleted: Vec<u64> = v["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_u64().unwrap())
        .collect();
    // best loss: id 2; step 300, 600: ids 3, 6; last 2: ids 5, 6.
    assert_eq!(kept, vec![2, 3, 5, 6]);
    assert_eq!(deleted, vec![1, 4]);
    let predicted = v["bytes_freed"].as_u64().unwrap();
    assert!(predicted >= 2 * CHUNK as u64, "{v}");
    let reasons: Vec<&str> = v["kept"][3]["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, vec!["newest", "keep-last", "keep-every-steps"]);

    let mut real = args.to_vec();
    real.push("--json");
    let v = json(&ok(&real));
    assert_eq!(v["dry_run"], false);
    assert_eq!(v["bytes_freed"].as_u64().unwrap(), predicted);
    assert_eq!(ids(d.path()), vec![2, 3, 5, 6]);
    ok(&["verify", dir]);

    // Again: nothing left to delete.
    let text = ok(&args);
    assert!(text.contains("deleted 0 checkpoints"), "{text}");
}

#[test]
fn pin_unpin_and_gc_respects_pins() {
    let d = tempfile::tempdir().unwrap();
    make_store(d.path());
    let dir = d.path().to_str().unwrap();
    let out = ok(&["pin", dir, "1"]);
    assert!(out.contains("pinned checkpoint 1 (step 100)"), "{out}");
    let out = ok(&["pin", dir, "1"]);
    assert!(out.contains("already pinned"), "{out}");
    let v = json(&ok(&["ls", dir, "--json"]));
    assert_eq!(v[0]["pinned"], true);
    assert_eq!(v[1]["pinned"], false);
    assert!(ok(&["ls", dir]).contains("PINNED"));

    let text = ok(&["gc", dir, "--keep-last", "1", "--keep-id", "3"]);
    assert!(text.contains("pinned"), "{text}");
    assert!(text.contains("pinned by this policy"), "{text}");
    assert_eq!(ids(d.path()), vec![1, 3, 6]);

    let v = json(&ok(&["unpin", dir, "1", "--json"]));
    assert_eq!(v["changed"], true);
    assert_eq!(v["pinned"], false);
    ok(&["gc", dir, "--keep-last", "1"]);
    assert_eq!(ids(d.path()), vec![6]);
}

#[test]
fn usage_and_failures_are_one_line() {
    let d = tempfile::tempdir().unwrap();
    make_store(d.path());
    let dir = d.path().to_str().unwrap();
    // No policy flag: a usage error (exit 2), nothing deleted.
    let e = fails_with(2, &["gc", dir]);
    assert!(e.contains("--keep-last"), "{e}");
    let e = fails_with(2, &["gc", dir, "--keep-best", "2"]);
    assert!(e.contains("--metric"), "{e}");
    fails_with(2, &["gc", dir, "--metric", "loss", "--keep-last", "1"]);
    fails_with(2, &["gc", dir, "--keep-last", "0"]);
    fails_with(
        2,
        &[
            "gc",
            dir,
            "--keep-best",
            "1",
            "--metric",
            "l",
            "--mode",
            "up",
        ],
    );
    assert_eq!(ids(d.path()).len(), 6);

    let e = fails_with(1, &["pin", dir, "42"]);
    assert!(e.contains("no checkpoint with id 42"), "{e}");
    let e = fails_with(1, &["gc", "/nonexistent/x", "--keep-last", "1"]);
    assert!(e.contains("no such directory"), "{e}");
    let empty = tempfile::tempdir().unwrap();
    let e = fails_with(
        1,
        &["gc", empty.path().to_str().unwrap(), "--keep-last", "1"],
    );
    assert!(e.contains("not a ckptstore store"), "{e}");
    assert!(
        !empty.path().join("CURRENT").exists(),
        "gc never creates a store"
    );

    // A writer holds the store: gc is refused, --dry-run still works.
    let _writer = Store::open(d.path(), opts()).unwrap();
    let e = fails_with(1, &["gc", dir, "--keep-last", "1"]);
    assert!(e.contains("locked"), "{e}");
    ok(&["gc", dir, "--keep-last", "1", "--dry-run"]);
    fails_with(1, &["pin", dir, "1"]);
}

/// After its deletions gc compacts a mostly-dead segment (a deleted checkpoint's big tensor
/// next to a frozen one the others share); `--no-compact` leaves it, `--dry-run` predicts it.
#[test]
fn gc_compacts_after_deletions_unless_no_compact() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_str().unwrap();
    {
        let mut s = Store::open(d.path(), opts()).unwrap();
        let frozen = data(1, 2 * CHUNK);
        for i in 1..=3u64 {
            let big = data(10 + i, if i == 1 { 12 * CHUNK } else { CHUNK });
            let mut t = s.begin(i).unwrap();
            t.put_tensor("frozen", DType::U8, &[frozen.len() as u64], &frozen)
                .unwrap();
            t.put_tensor("w", DType::U8, &[big.len() as u64], &big)
                .unwrap();
            t.commit().unwrap();
        }
    }
    let seg1 = d.path().join("segments").join("00000001.seg");
    let v = json(&ok(&[
        "gc",
        dir,
        "--keep-last",
        "2",
        "--no-compact",
        "--json",
    ]));
    assert_eq!(v["deleted"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["segments_compacted"].as_array().unwrap().len(), 0, "{v}");
    assert!(seg1.exists(), "the frozen tensor keeps segment 1 alive");
    let before = v["segment_bytes"].as_u64().unwrap();
    assert!(v["amplification"].as_f64().unwrap() > 2.0, "{v}");

    let dry = json(&ok(&["gc", dir, "--keep-last", "2", "--dry-run", "--json"]));
    assert_eq!(dry["segments_compacted"], serde_json::json!([1]), "{dry}");
    assert!(seg1.exists());

    let text = ok(&["gc", dir, "--keep-last", "2"]);
    assert!(text.contains("compacted 1 segment "), "{text}");
    assert!(text.contains("reclaimed"), "{text}");
    assert!(!seg1.exists());
    let v = json(&ok(&["gc", dir, "--keep-last", "2", "--json"]));
    assert_eq!(v["segments_compacted"].as_array().unwrap().len(), 0, "{v}");
    let after = v["segment_bytes"].as_u64().unwrap();
    assert!(after + 10 * CHUNK as u64 <= before, "{before} -> {after}");
    assert_eq!(
        after,
        before + dry["bytes_written"].as_u64().unwrap() - dry["bytes_freed"].as_u64().unwrap()
    );
    ok(&["verify", dir, "--all"]);
}

/// `gc --purge-lost-found` (alone, or with a policy) is the only thing that deletes what
/// recovery set aside in `lost+found/`; `--dry-run` only counts it.
#[test]
fn purge_lost_found_deletes_what_recovery_set_aside() {
    let d = tempfile::tempdir().unwrap();
    make_store(d.path());
    let dir = d.path().to_str().unwrap();
    let orphan = d.path().join("segments").join("00000099.seg");
    std::fs::write(&orphan, vec![7u8; 1000]).unwrap();
    let text = ok(&["recover", dir]);
    assert!(text.contains("lost+found"), "{text}");
    let lf = d.path().join("lost+found");
    assert!(lf.join("00000099.seg").exists());
    let v = json(&ok(&[
        "gc",
        dir,
        "--purge-lost-found",
        "--dry-run",
        "--json",
    ]));
    assert_eq!(v["lost_found_purged"], 2, "{v}");
    assert!(lf.join("00000099.seg").exists());
    let text = ok(&["gc", dir, "--purge-lost-found"]);
    assert!(text.contains("deleted 2 file(s)"), "{text}");
    assert!(std::fs::read_dir(&lf).unwrap().next().is_none());
    assert_eq!(ids(d.path()).len(), 6);
    // With a policy: both.
    std::fs::write(&orphan, vec![7u8; 1000]).unwrap();
    ok(&["recover", dir]);
    let v = json(&ok(&[
        "gc",
        dir,
        "--keep-last",
        "5",
        "--purge-lost-found",
        "--json",
    ]));
    assert_eq!(v["lost_found_purged"], 2, "{v}");
    assert_eq!(ids(d.path()).len(), 5);
}
