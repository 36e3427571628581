//! The `ckptstore` binary end to end: ls, inspect, verify, recover on a small store built with
//! the library; corruption named down to the chunk; one-line errors; --help; the demo.

mod cli_support;
mod support;

use ckptstore::{DType, Options, Selector, Store};
use serde_json::Value;
use std::path::Path;

use cli_support::{fails, ok, run, stderr, stdout};
use support::{data as bytes, opts, CHUNK};

/// Three checkpoints (steps 10, 20, 30): a frozen tensor, a tensor "w" of 3 chunks that
/// changes every step, a blob, and metadata.
fn make_store(dir: &Path) {
    let mut s = Store::open(dir, opts()).unwrap();
    let frozen = bytes(99, 2 * CHUNK);
    for (i, step) in [10u64, 20, 30].into_iter().enumerate() {
        let mut t = s.begin(step).unwrap();
        t.set_epoch(i as u64);
        t.set_metadata("lr", 0.1 / (i + 1) as f64);
        t.set_metadata("note", "hello");
        t.set_metadata("rng", vec![1u8, 2, 3, i as u8]);
        t.put_tensor("frozen.embed", DType::F32, &[2, CHUNK as u64 / 4], &frozen)
            .unwrap();
        let w = bytes(step, 3 * CHUNK);
        t.put_tensor("w", DType::BF16, &[3, CHUNK as u64 / 2], &w)
            .unwrap();
        t.put_blob("config.json", b"{\"layers\":2}").unwrap();
        t.commit().unwrap();
    }
}

fn store() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    make_store(d.path());
    d
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON ({e}): {s}"))
}

#[test]
fn ls_table_and_json() {
    let d = store();
    let dir = d.path().to_str().unwrap();
    let table = ok(&["ls", dir]);
    assert!(table.starts_with("ID"), "{table}");
    assert_eq!(table.lines().count(), 4, "{table}");
    assert!(table.contains("note=\"hello\""), "{table}");

    let v = json(&ok(&["ls", dir, "--json"]));
    let a = v.as_array().unwrap();
    assert_eq!(a.len(), 3);
    for (i, c) in a.iter().enumerate() {
        assert_eq!(c["id"], i as u64 + 1);
        assert_eq!(c["step"], (i as u64 + 1) * 10);
        assert_eq!(c["epoch"], i as u64);
        assert_eq!(c["tensors"], 2);
        assert_eq!(c["blobs"], 1);
        assert_eq!(c["bytes"], (5 * CHUNK + 12) as u64);
        assert!(c["time_unix_ns"].as_i64().unwrap() > 0);
        assert!(c["time"].as_str().unwrap().ends_with('Z'));
        assert_eq!(c["metadata"]["note"], "hello");
        assert_eq!(c["metadata"]["lr"], 0.1 / (i + 1) as f64);
        assert_eq!(
            c["metadata"]["rng"]["hex"],
            format!("010203{:02x}", i as u8)
        );
    }
}

#[test]
fn ls_table_shows_the_name_first_and_hides_ckptstore_keys() {
    let d = tempfile::tempdir().unwrap();
    {
        let mut s = Store::open(d.path(), opts()).unwrap();
        let mut t = s.begin(8).unwrap();
        t.set_metadata("ckptstore.append_info", "{\"epoch_num\": \"epoch_num\"}");
        t.set_metadata("aaa", 1i64);
        t.set_metadata("name", "checkpoint_lenet-2_8");
        t.put_tensor("w", DType::F32, &[1], &[0u8; 4]).unwrap();
        t.commit().unwrap();
    }
    let dir = d.path().to_str().unwrap();
    let table = ok(&["ls", dir]);
    let row = table.lines().nth(1).unwrap();
    assert!(
        row.trim_end()
            .ends_with("name=\"checkpoint_lenet-2_8\" aaa=1"),
        "{table}"
    );
    assert!(!table.contains("ckptstore.append_info"), "{table}");
    let v = json(&ok(&["ls", dir, "--json"]));
    assert!(v[0]["metadata"]["ckptstore.append_info"].is_string(), "{v}");
}

#[test]
fn ls_works_while_a_writer_holds_the_store_and_recover_is_refused() {
    let d = store();
    let dir = d.path().to_str().unwrap();
    let _writer = Store::open(d.path(), Options::default()).unwrap();
    let v = json(&ok(&["ls", dir, "--json"]));
    assert_eq!(v.as_array().unwrap().len(), 3);
    ok(&["verify", dir]);
    let e = fails(&["recover", dir]);
    assert!(e.contains("locked"), "{e}");
}

#[test]
fn inspect_latest_step_and_id() {
    let d = store();
    let dir = d.path().to_str().unwrap();
    let text = ok(&["inspect", dir]);
    assert!(text.starts_with("checkpoint 3  step 30  epoch 2"), "{text}");
    assert!(text.contains("frozen.embed"), "{text}");
    assert!(text.contains("bf16"), "{text}");
    assert!(text.contains("config.json"), "{text}");

    let v = json(&ok(&["inspect", dir, "20", "--json"]));
    assert_eq!(v["id"], 2);
    assert_eq!(v["step"], 20);
    let t = v["tensors"].as_array().unwrap();
    assert_eq!(t[0]["name"], "frozen.embed");
    assert_eq!(t[0]["dtype"], "f32");
    assert_eq!(t[0]["shape"], serde_json::json!([2, CHUNK / 4]));
    assert_eq!(t[0]["chunks"], 2);
    assert_eq!(t[0]["new_bytes"], 0, "the frozen tensor is deduplicated");
    assert_eq!(t[1]["name"], "w");
    assert_eq!(t[1]["dtype"], "bf16");
    assert_eq!(t[1]["bytes"], 3 * CHUNK as u64);
    assert_eq!(t[1]["chunks"], 3);
    assert_eq!(t[1]["new_bytes"], 3 * CHUNK as u64);
    assert_eq!(v["blobs"][0]["name"], "config.json");

    let v = json(&ok(&["inspect", dir, "--id", "1", "--json", "--chunks"]));
    assert_eq!(v["step"], 10);
    let refs = v["tensors"][1]["chunk_refs"].as_array().unwrap();
    assert_eq!(refs.len(), 3);
    assert_eq!(refs[0]["blake3"].as_str().unwrap().len(), 64);

    let e = fails(&["inspect", dir, "999"]);
    assert!(e.contains("step 999"), "{e}");
    let e = fails(&["inspect", dir, "--id", "42"]);
    assert!(e.contains("id 42"), "{e}");
}

#[test]
fn verify_names_the_corrupt_checkpoint_tensor_and_chunk() {
    let d = store();
    let dir = d.path().to_str().unwrap();
    let out = ok(&["verify", dir]);
    assert!(out.contains("verified 3 checkpoints"), "{out}");
    ok(&["verify", dir, "20"]);

    // Flip one payload byte of chunk 1 of "w" in checkpoint 2 (its own, not shared).
    let (segment, offset) = {
        let s = Store::open(d.path(), Options::read_only()).unwrap();
        let ck = s.checkpoint(Selector::Id(2)).unwrap();
        let t = ck
            .manifest()
            .tensors
            .iter()
            .find(|t| t.name == "w")
            .unwrap();
        (t.chunks[1].segment, t.chunks[1].offset)
    };
    let seg = d.path().join("segments").join(format!("{segment:08}.seg"));
    let mut data = std::fs::read(&seg).unwrap();
    data[offset as usize + 17] ^= 0x40;
    std::fs::write(&seg, data).unwrap();

    let e = fails(&["verify", dir]);
    assert!(e.contains("checkpoint 2"), "{e}");
    assert!(e.contains("tensor \"w\""), "{e}");
    assert!(e.contains("chunk 1"), "{e}");
    assert!(e.contains("BLAKE3"), "{e}");
    let e = fails(&["verify", dir, "--id", "2"]);
    assert!(e.contains("chunk 1"), "{e}");
    ok(&["verify", dir, "--id", "1"]);
    ok(&["verify", dir, "30"]);

    let o = run(&["verify", dir, "--json"]);
    assert!(!o.status.success());
    let v = json(&stdout(&o));
    assert_eq!(v["ok"], false);
    let c = v["checkpoints"].as_array().unwrap();
    assert_eq!(c.len(), 3);
    assert_eq!(c[0]["ok"], true);
    assert_eq!(c[1]["ok"], false);
    assert!(c[1]["error"].as_str().unwrap().contains("chunk 1"));
    assert_eq!(c[2]["ok"], true);
}

/// `scrub` on a store whose frozen chunk rotted: it quarantines the chunk, names the three
/// checkpoints that stay broken (JSON and text) and exits 1; after the next save of the same
/// tensor (which heals them), `scrub` and `verify` pass and it exits 0.
#[test]
fn scrub_quarantines_reports_what_stays_broken_and_passes_after_a_healing_save() {
    let d = store();
    let dir = d.path().to_str().unwrap();
    assert!(ok(&["scrub", dir]).contains("every checkpoint verifies"));
    let frozen = {
        let s = Store::open(d.path(), Options::read_only()).unwrap();
        let ck = s.checkpoint(Selector::Id(1)).unwrap();
        ck.manifest().tensors[0].chunks[0].clone()
    };
    let seg = d
        .path()
        .join("segments")
        .join(format!("{:08}.seg", frozen.segment));
    let mut data = std::fs::read(&seg).unwrap();
    data[frozen.offset as usize + 5] ^= 0x04;
    std::fs::write(&seg, data).unwrap();

    let o = run(&["scrub", dir, "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let v = json(&stdout(&o));
    assert_eq!(v["ok"], false);
    assert_eq!(v["checkpoints"], 3);
    let q = v["quarantined"].as_array().unwrap();
    assert_eq!(q.len(), 1, "{v}");
    assert_eq!(q[0]["segment"], frozen.segment);
    assert_eq!(q[0]["offset"], frozen.offset);
    assert_eq!(
        v["unhealed"][0]["checkpoints"],
        serde_json::json!([1, 2, 3])
    );
    let broken: Vec<u64> = v["broken"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_u64().unwrap())
        .collect();
    assert_eq!(broken, vec![1, 2, 3]);
    assert!(
        stderr(&o).contains("3 checkpoint(s) stay broken"),
        "{}",
        stderr(&o)
    );

    // Text: already quarantined (nothing new), still unhealed.
    let o = run(&["scrub", dir]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(!out.contains("quarantined "), "{out}");
    assert!(
        out.contains("unhealed") && out.contains("[1, 2, 3]"),
        "{out}"
    );
    assert!(out.contains("BROKEN       checkpoint 2"), "{out}");

    // The trainer saves the same frozen tensor again: every checkpoint heals.
    {
        let mut s = Store::open(d.path(), opts()).unwrap();
        let mut t = s.begin(40).unwrap();
        t.put_tensor(
            "frozen.embed",
            DType::F32,
            &[2, CHUNK as u64 / 4],
            &bytes(99, 2 * CHUNK),
        )
        .unwrap();
        t.commit().unwrap();
    }
    let out = ok(&["scrub", dir]);
    assert!(out.contains("every checkpoint verifies"), "{out}");
    assert!(ok(&["verify", dir]).contains("verified 4 checkpoints"));
    assert_eq!(json(&ok(&["scrub", dir, "--json"]))["ok"], true);
}

#[test]
fn recover_reports_a_torn_tail_and_orphans() {
    let d = store();
    let dir = d.path().to_str().unwrap();
    let clean = ok(&["recover", dir]);
    assert!(clean.contains("torn tail         none"), "{clean}");
    assert!(clean.contains("3 live, latest id 3 at step 30"), "{clean}");

    // A crash mid-commit: half a record at the WAL's end and a segment nothing references.
    let wal = std::fs::read_dir(d.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "wal"))
        .expect("a WAL file");
    let mut w = std::fs::read(&wal).unwrap();
    w.extend_from_slice(&[0x01, 0x00, 0x00, 0x10, 0xde, 0xad, 0xbe, 0xef, 0x77]);
    std::fs::write(&wal, w).unwrap();
    std::fs::write(d.path().join("segments/00000077.seg"), vec![7u8; 5000]).unwrap();

    let v = json(&ok(&["recover", dir, "--json"]));
    assert_eq!(v["truncated_tail_bytes"], 9, "{v}");
    assert!(v["truncated_tail_reason"].is_string(), "{v}");
    assert_eq!(v["orphan_segments"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["orphan_bytes"], 5000);
    assert_eq!(v["checkpoints"], 3);
    assert_eq!(v["latest"]["step"], 30);
    assert!(v["duration_ns"].as_u64().is_some());
    assert!(!d.path().join("segments/00000077.seg").exists());

    // Repaired: a second run has nothing to do, strict mode agrees.
    let again = ok(&["recover", dir, "--strict"]);
    assert!(again.contains("torn tail         none"), "{again}");
    assert!(again.contains("orphan segments   none"), "{again}");
    ok(&["verify", dir]);
}

#[test]
fn bad_directories_and_usage_give_one_line_errors() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("nope");
    let missing = missing.to_str().unwrap();
    for cmd in ["ls", "inspect", "verify", "recover"] {
        let e = fails(&[cmd, missing]);
        assert!(e.contains("no such directory"), "{cmd}: {e}");
    }
    // An empty directory is not a store; recover must not turn it into one.
    let empty = d.path().to_str().unwrap();
    let e = fails(&["ls", empty]);
    assert!(e.contains("no CURRENT"), "{e}");
    let e = fails(&["recover", empty]);
    assert!(e.contains("not a ckptstore store"), "{e}");
    assert!(!d.path().join("CURRENT").exists());
    // A file, not a directory.
    let file = d.path().join("f");
    std::fs::write(&file, b"x").unwrap();
    let e = fails(&["verify", file.to_str().unwrap()]);
    assert!(e.contains("not a directory"), "{e}");

    // Usage errors: one line, exit status 2.
    let o = run(&["ls"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    let o = run(&["frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
}

#[test]
fn help_for_every_subcommand() {
    let top = ok(&["--help"]);
    for cmd in ["ls", "inspect", "verify", "recover", "scrub", "demo"] {
        assert!(top.contains(cmd), "{top}");
        let h = ok(&[cmd, "--help"]);
        assert!(h.contains("Usage: ckptstore"), "{cmd}: {h}");
        let h2 = ok(&["help", cmd]);
        assert!(h2.contains("Usage"), "{cmd}: {h2}");
    }
    assert!(!top.contains("__demo-writer"), "{top}");
    assert!(ok(&["ls", "--help"]).contains("--json"));
    assert!(ok(&["recover", "--help"]).contains("--salvage"));
}

/// Seen in CI on a loaded machine: the parent read the writer's lines so late that the writer
/// had finished every save and exited, and the demo failed with "the writer exited before the
/// SIGKILL landed". The writer now waits for its stdin to close, so a late kill still lands
/// (between saves) and the demo goes on.
#[test]
fn regression_demo_kill_after_the_writer_finished_still_finds_it_alive() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("late");
    let out = ok(&[
        "demo",
        "--dir",
        dir.to_str().unwrap(),
        "--state-mib",
        "1",
        "--steps",
        "2",
        "--save-every",
        "1",
        "--kill-after",
        "1",
        "--kill-delay-ms",
        "1500",
    ]);
    assert!(out.starts_with("ckptstore demo: ok"), "{out}");
    assert!(out.contains("by SIGKILL between saves"), "{out}");
}

#[test]
fn demo_kills_recovers_resumes() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("demo");
    let dir_s = dir.to_str().unwrap();
    let out = ok(&[
        "demo",
        "--dir",
        dir_s,
        "--state-mib",
        "16",
        "--steps",
        "12",
        "--save-every",
        "3",
        "--keep",
    ]);
    assert!(out.starts_with("ckptstore demo: ok"), "{out}");
    // Killed during the save of step 9 (or, on a loaded machine, a later one).
    assert!(out.contains("by SIGKILL"), "{out}");
    assert!(out.contains("bit-exact"), "{out}");
    let v = json(&ok(&["ls", dir_s, "--json"]));
    let steps: Vec<u64> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [3, 6, 9, 12]);
    ok(&["verify", dir_s]);
    // The frozen embedding is stored once: every later checkpoint shares it.
    let v = json(&ok(&["inspect", dir_s, "--json"]));
    let embed = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "embed.weight")
        .unwrap()
        .clone();
    assert_eq!(embed["new_bytes"], 0, "{embed}");

    // The demo refuses a non-empty directory, and without --keep removes its own.
    let e = fails(&["demo", "--dir", dir_s, "--state-mib", "1"]);
    assert!(e.contains("not empty"), "{e}");
    let fresh = d.path().join("fresh");
    ok(&[
        "demo",
        "--dir",
        fresh.to_str().unwrap(),
        "--state-mib",
        "1",
        "--steps",
        "4",
        "--save-every",
        "1",
        "--kill-after",
        "1",
    ]);
    assert!(!fresh.exists());
}

#[test]
fn bench_measures_every_figure_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let v = json(&ok(&[
        "bench",
        "--dir",
        d,
        "--size",
        "8MiB",
        "--rounds",
        "1",
        "--budget-mib",
        "4",
        "--cold",
        "file",
        "--json",
    ]));
    for key in [
        "raw_write_gbps",
        "raw_write_buffered_gbps",
        "raw_read_gbps",
        "raw_read_buffered_gbps",
        "load_copy_gbps",
        "load_batch_gbps",
        "memcpy_gbps",
        "save_gbps",
        "save_async_durable_gbps",
        "load_gbps",
        "save_floats_gbps",
        "save_floats_zstd_gbps",
    ] {
        let x = v[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing: {v}"));
        assert!(x.is_finite() && x > 0.0, "{key} = {x}");
    }
    assert!(v["save_async_stall_s"].as_f64().unwrap() > 0.0);
    assert!(v["save_async_stall_floor_s"].as_f64().unwrap() > 0.0);
    // The raw limits are the faster way of each.
    let (w, wb) = (
        v["raw_write_gbps"].as_f64(),
        v["raw_write_buffered_gbps"].as_f64(),
    );
    assert!(w >= wb, "{v}");
    let (r, rb) = (
        v["raw_read_gbps"].as_f64(),
        v["raw_read_buffered_gbps"].as_f64(),
    );
    assert!(r >= rb, "{v}");
    // Where the file system takes O_DIRECT, the read is measured into huge pages (where
    // free) and into 4 KiB pages, and the limit is the fastest of every way.
    if let Some(d) = v["raw_read_direct_gbps"].as_f64() {
        let small = v["raw_read_direct_4k_pages_gbps"].as_f64().unwrap();
        let (r, rb) = (r.unwrap(), rb.unwrap());
        assert!(small > 0.0 && r >= small && r >= d, "{v}");
        assert_eq!(r, d.max(small).max(rb), "{v}");
    }
    // 90% of the incremental save's chunks are the full save's: it writes a tenth.
    assert!(v["save_incremental_s"].as_f64().unwrap() > 0.0);
    // Weight-like floats compress: zstd stored fewer bytes than it was given.
    let ratio = v["zstd_stored_over_raw"].as_f64().unwrap();
    assert!(ratio > 0.0 && ratio < 0.95, "{ratio}");
    assert_eq!(v["size_bytes"], 8 << 20);
    // The staging pool (4 MiB) is allocated during the measured window.
    assert!(
        v["peak_extra_rss_bytes"].as_u64().unwrap() >= 4 << 20,
        "{v}"
    );
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 0);
    // Nothing left behind in the directory.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    let e = fails(&["bench", "--dir", d, "--size", "2 parsecs"]);
    assert!(e.contains("unknown size unit"), "{e}");

    // Several sizes, one report each, and the chart of GB/s against size.
    let svg = dir.path().join("bench.svg");
    let v = json(&ok(&[
        "bench",
        "--dir",
        d,
        "--sizes",
        "4MiB,8MiB",
        "--rounds",
        "1",
        "--budget-mib",
        "4",
        "--cold",
        "file",
        "--plot",
        svg.to_str().unwrap(),
        "--json",
    ]));
    let sizes: Vec<u64> = v["sizes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["size_bytes"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [4 << 20, 8 << 20]);
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.starts_with("<svg"), "{chart}");
    assert_eq!(chart.matches("<polyline").count(), 7, "{chart}");
    std::fs::remove_file(&svg).unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn demo_runs_through_the_uring_backend() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("demo");
    let dir_s = dir.to_str().unwrap();
    let args = [
        "demo",
        "--io",
        "uring",
        "--dir",
        dir_s,
        "--state-mib",
        "8",
        "--steps",
        "8",
        "--save-every",
        "2",
        "--keep",
    ];
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with("ckptstore demo: ok"),
        "{}",
        stdout(&o)
    );
    // The backend in use is said (uring where the kernel has it, else std and why).
    let err = stderr(&o);
    assert!(
        err.contains("I/O backend uring") || err.contains("uring unavailable"),
        "{err}"
    );
    ok(&["verify", dir_s]);
    let e = fails(&["demo", "--io", "tokio"]);
    assert!(e.contains("expected auto, std or uring"), "{e}");
}

/// Issue 14, item 4: `recover`, `ls`, `inspect` and `verify` on a store whose WAL header needs
/// an incompatible feature this build lacks say it was written by a newer ckptstore, one
/// line, no salvage hint, and change nothing.
#[test]
fn a_store_from_a_newer_build_is_refused_by_every_command() {
    use ckptstore::features::FeatureSet;
    use ckptstore::wal::{WalHeader, WAL_HEADER_LEN};
    let d = store();
    let dir = d.path().to_str().unwrap();
    let wal = support::live_wal(d.path());
    let mut b = std::fs::read(&wal).unwrap();
    let h = WalHeader {
        features: FeatureSet {
            incompat: 1 << 4,
            ..FeatureSet::EMPTY
        },
        ..WalHeader::decode(&b).unwrap()
    };
    b[..WAL_HEADER_LEN].copy_from_slice(&h.encode());
    std::fs::write(&wal, &b).unwrap();
    let before = support::snapshot_tree(d.path());
    for args in [
        vec!["recover", dir],
        vec!["recover", dir, "--salvage"],
        vec!["ls", dir],
        vec!["inspect", dir],
        vec!["verify", dir],
    ] {
        let e = fails(&args);
        assert!(
            e.contains("written by a newer ckptstore: needs incompatible feature bit 4"),
            "{args:?}: {e}"
        );
        assert!(!e.contains("salvage"), "{args:?}: {e}");
        assert_eq!(e.trim_end().lines().count(), 1, "{args:?}: {e}");
    }
    let mut after = support::snapshot_tree(d.path());
    after.remove(Path::new("LOCK"));
    let mut before = before;
    before.remove(Path::new("LOCK"));
    assert_eq!(after, before, "the store changed");
}

/// Issue 14, items 1 and 2: CURRENT removed and the WAL header overwritten. `recover` refuses
/// and deletes nothing; `recover --rebuild` brings every checkpoint back, bit-exact and
/// verified, and keeps the damaged WAL in lost+found/. On a healthy store it refuses.
#[test]
fn recover_rebuild_brings_back_a_store_whose_current_and_wal_header_are_gone() {
    let d = store();
    let dir = d.path().to_str().unwrap();
    let e = fails(&["recover", dir, "--rebuild"]);
    assert!(e.contains("nothing to rebuild"), "{e}");
    let before = json(&ok(&["ls", dir, "--json"]));
    std::fs::remove_file(d.path().join("CURRENT")).unwrap();
    let wal = d.path().join("00000001.wal");
    let mut b = std::fs::read(&wal).unwrap();
    b[0..4].copy_from_slice(b"XXXX");
    std::fs::write(&wal, &b).unwrap();
    let tree = support::snapshot_tree(d.path());
    let e = fails(&["recover", dir]);
    assert!(e.contains("recover --rebuild"), "{e}");
    let mut after = support::snapshot_tree(d.path());
    after.remove(Path::new("LOCK"));
    let mut tree = tree;
    tree.remove(Path::new("LOCK"));
    assert_eq!(after, tree, "recover changed the store");

    let v = json(&ok(&["recover", dir, "--rebuild", "--json"]));
    assert_eq!(
        v["rebuild"]["restored"],
        serde_json::json!([1, 2, 3]),
        "{v}"
    );
    assert_eq!(v["verify_failures"], serde_json::json!([]), "{v}");
    assert_eq!(json(&ok(&["ls", dir, "--json"])), before);
    ok(&["verify", dir, "--all"]);
    assert_eq!(
        std::fs::read(d.path().join("lost+found/00000001.wal")).unwrap(),
        b
    );
}
