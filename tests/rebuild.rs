//! Invariant: the WAL is a cache of the segments. With `CURRENT` and the WAL lost or damaged,
//! `Store::rebuild` (`ckptstore recover --rebuild`) restores every checkpoint whose commit
//! trailer and chunks are present — every live one — bit-exact, and deletes nothing: the old
//! `CURRENT` and WAL files go to `lost+found/` (docs/FORMAT.md, "Rebuild from segments").

mod support;

use ckptstore::store::LOST_FOUND_DIR;
use ckptstore::{Compression, DType, Error, Options, Selector, Store};
use std::collections::BTreeMap;
use std::path::Path;
use support::*;

/// Four checkpoints: a frozen tensor (deduplicated), a changing one, a blob; the second of
/// them compressed. Returns (id → tensors) of what was committed.
fn make_store(dir: &Path) -> BTreeMap<u64, Vec<(String, Vec<u8>)>> {
    let mut out = BTreeMap::new();
    let frozen = data(99, 3 * CHUNK);
    for step in 1..=4u64 {
        let o = Options {
            compression: if step == 2 {
                Compression::zstd()
            } else {
                Compression::None
            },
            ..opts()
        };
        let mut s = Store::open(dir, o).unwrap();
        let w = data(step, 2 * CHUNK + 100);
        let info = commit(&mut s, step * 10, &[("frozen", &frozen), ("w", &w)]);
        out.insert(
            info.checkpoint.id,
            vec![("frozen".to_string(), frozen.clone()), ("w".to_string(), w)],
        );
    }
    out
}

fn assert_all(s: &Store, want: &BTreeMap<u64, Vec<(String, Vec<u8>)>>) {
    for (id, tensors) in want {
        let t: Vec<(&str, &[u8])> = tensors
            .iter()
            .map(|(n, b)| (n.as_str(), b.as_slice()))
            .collect();
        assert_holds(s, *id, &t);
    }
}

fn lost_found_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join(LOST_FOUND_DIR))
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Issue 14's case: CURRENT removed and the WAL header overwritten. `recover` refuses and
/// deletes nothing (item 1); a rebuild brings every checkpoint back bit-exact, and keeps the
/// damaged WAL in lost+found/.
#[test]
fn current_removed_and_wal_header_overwritten_rebuilds_every_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let want = make_store(dir.path());
    std::fs::remove_file(dir.path().join("CURRENT")).unwrap();
    let wal = dir.path().join("00000001.wal");
    let mut b = std::fs::read(&wal).unwrap();
    b[0..4].copy_from_slice(b"XXXX");
    std::fs::write(&wal, &b).unwrap();
    let before = snapshot_tree(dir.path());
    assert!(matches!(
        Store::open(dir.path(), opts()),
        Err(Error::CurrentMissing { .. })
    ));
    let (s, report) = Store::rebuild(dir.path(), opts()).unwrap();
    assert_eq!(report.restored, want.keys().copied().collect::<Vec<_>>());
    assert!(report.unrestorable.is_empty(), "{report:?}");
    assert_all(&s, &want);
    for (id, r) in s.verify_all() {
        r.unwrap_or_else(|e| panic!("{id}: {e}"));
    }
    // Nothing lost: the damaged WAL is in lost+found/, byte for byte; every segment stays.
    let after = snapshot_tree(dir.path());
    let kept: Vec<&Vec<u8>> = after.values().collect();
    for (p, bytes) in &before {
        if p != Path::new("LOCK") {
            assert!(kept.contains(&bytes), "{} lost", p.display());
        }
    }
    assert!(
        lost_found_names(dir.path()).contains(&"00000001.wal".to_string()),
        "{:?}",
        lost_found_names(dir.path())
    );
    // The rebuilt store is an ordinary one.
    drop(s);
    let mut s = Store::open(dir.path(), opts()).unwrap();
    commit(&mut s, 50, &[("w", &data(5, 100))]);
    s.compact_wal().unwrap();
}

/// Segment compaction moves live chunks out of the segments whose trailers name them: a
/// rebuild finds them by BLAKE3 in the compacted segments. The deleted checkpoint whose
/// chunks compaction dropped stays deleted; a deleted one whose chunks are still stored may
/// come back (never a live one lost).
#[test]
fn rebuild_after_deletes_and_segment_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let mut want = make_store(dir.path());
    let mut s = Store::open(dir.path(), opts()).unwrap();
    s.delete(1).unwrap();
    want.remove(&1);
    let gc = s.gc().unwrap();
    assert!(!gc.segments_compacted.is_empty(), "{gc:?}");
    drop(s);
    std::fs::remove_file(dir.path().join("CURRENT")).unwrap();
    std::fs::remove_file(live_wal_or_any(dir.path())).unwrap();
    let (s, report) = Store::rebuild(dir.path(), opts()).unwrap();
    assert!(report.repointed_chunks > 0, "{report:?}");
    assert_all(&s, &want);
    assert!(
        s.info(Selector::Id(1)).is_err(),
        "its chunks were compacted away"
    );
    for (id, r) in s.verify_all() {
        r.unwrap_or_else(|e| panic!("{id}: {e}"));
    }
}

fn live_wal_or_any(dir: &Path) -> std::path::PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "wal"))
        .unwrap()
}

/// A checkpoint deleted while its segment lives on (a later checkpoint shares a chunk of it)
/// comes back; pins do not.
#[test]
fn rebuild_resurrects_a_deleted_checkpoint_whose_chunks_remain_and_drops_pins() {
    let dir = tempfile::tempdir().unwrap();
    let want = make_store(dir.path());
    let mut s = Store::open(
        dir.path(),
        Options {
            // No compaction: checkpoint 1's segment stays whole (checkpoint 2.. share it).
            compact_live_fraction: 0.0,
            max_space_amplification: f64::INFINITY,
            ..opts()
        },
    )
    .unwrap();
    s.pin(3).unwrap();
    s.delete(1).unwrap();
    s.gc().unwrap();
    drop(s);
    std::fs::write(dir.path().join("CURRENT"), b"garbage").unwrap();
    let (s, report) = Store::rebuild(dir.path(), opts()).unwrap();
    assert_eq!(report.restored, vec![1, 2, 3, 4]);
    assert_all(&s, &want);
    assert!(s.pinned().is_empty());
    assert!(lost_found_names(dir.path())
        .iter()
        .any(|n| n.starts_with("CURRENT.before-rebuild")));
}

/// A store written before the trailers has nothing to rebuild from: refused, nothing changed.
#[test]
fn a_store_without_trailers_is_refused_and_unchanged() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/stores/baseline-v1");
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&fixture, dir.path());
    std::fs::remove_file(dir.path().join("CURRENT")).unwrap();
    let before = snapshot_tree(dir.path());
    match Store::rebuild(dir.path(), Options::default()) {
        Err(e @ Error::NotFound(_)) => {
            let msg = e.to_string();
            assert!(msg.contains("commit trailer"), "{msg}");
            assert!(msg.contains("nothing was changed"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
    let mut after = snapshot_tree(dir.path());
    after.remove(Path::new("LOCK"));
    assert_eq!(after, before);
}

/// Checkpoints of several dtypes and a multi-process (sharded) commit come back too; a
/// checkpoint whose segment is gone is reported, not invented.
#[test]
fn rebuild_restores_shard_commits_and_reports_what_it_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let a = data(1, 3 * CHUNK);
    let mut t = s.begin(1).unwrap();
    t.put_tensor("a", DType::F32, &[3, CHUNK as u64 / 4], &a)
        .unwrap();
    t.commit().unwrap();
    let ranges = s.reserve_segment_ids(2, 4).unwrap();
    let mut frags = Vec::new();
    for (r, ids) in ranges.into_iter().enumerate() {
        let o = ckptstore::ShardOptions {
            chunk_size: CHUNK,
            segment_max_bytes: 1 << 20,
            io: s.options().io.clone(),
        };
        let mut w = ckptstore::ShardWriter::new(dir.path(), ids, o).unwrap();
        w.put_tensor(
            &format!("r{r}"),
            DType::U8,
            &[5000],
            &data(10 + r as u64, 5000),
        )
        .unwrap();
        frags.push(w.finish().unwrap());
    }
    let sharded = s.commit_external(2, 0, BTreeMap::new(), &frags).unwrap().id;
    let c = commit(&mut s, 3, &[("c", &data(3, 2 * CHUNK))])
        .checkpoint
        .id;
    let c_seg = chunk_location(&s, c, "c", 0).0;
    drop(s);
    std::fs::remove_file(segment_path(dir.path(), c_seg)).unwrap();
    std::fs::remove_file(dir.path().join("CURRENT")).unwrap();
    let (s, report) = Store::rebuild(dir.path(), opts()).unwrap();
    assert_eq!(report.restored, vec![1, sharded]);
    assert!(
        report.unrestorable.is_empty(),
        "its trailer went with it: {report:?}"
    );
    assert_eq!(
        s.checkpoint(Selector::Id(1))
            .unwrap()
            .tensor("a")
            .unwrap()
            .data,
        a
    );
    for r in 0..2u64 {
        let t = s
            .checkpoint(Selector::Id(sharded))
            .unwrap()
            .tensor(&format!("r{r}"))
            .unwrap();
        assert_eq!(t.data, data(10 + r, 5000));
    }
}

/// Regression (issue 14 follow-up): a commit that writes no chunk — a fully deduplicated save
/// (a frozen model saved again), or a checkpoint of no tensor — had no segment, so no trailer,
/// and a rebuilt store silently lost it. Each now gets a segment holding only its trailer;
/// gc and compaction leave that segment while its checkpoint lives and free it with it.
#[test]
fn a_fully_deduplicated_save_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let frozen = data(7, 3 * CHUNK + 5);
    let first = commit(&mut s, 1, &[("frozen", &frozen)]);
    let again = commit(&mut s, 2, &[("frozen", &frozen)]);
    assert_eq!(again.chunks_written, 0, "{again:?}");
    let empty = commit(&mut s, 3, &[]);
    let ids = [
        first.checkpoint.id,
        again.checkpoint.id,
        empty.checkpoint.id,
    ];
    // The trailer-only segments survive gc and compaction while their checkpoints live.
    let gc = s.gc().unwrap();
    assert!(gc.segments_compacted.is_empty(), "{gc:?}");
    drop(s);
    std::fs::remove_file(dir.path().join("CURRENT")).unwrap();
    std::fs::remove_file(live_wal_or_any(dir.path())).unwrap();
    let (s, report) = Store::rebuild(dir.path(), opts()).unwrap();
    assert_eq!(report.restored, ids.to_vec(), "{report:?}");
    assert!(report.unrestorable.is_empty(), "{report:?}");
    assert_holds(&s, ids[0], &[("frozen", &frozen)]);
    assert_holds(&s, ids[1], &[("frozen", &frozen)]);
    assert_holds(&s, ids[2], &[]);
    for (id, r) in s.verify_all() {
        r.unwrap_or_else(|e| panic!("{id}: {e}"));
    }
    // Deleting the deduplicated checkpoint frees its trailer-only segment with it.
    drop(s);
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let segs_before = std::fs::read_dir(dir.path().join("segments"))
        .unwrap()
        .count();
    s.delete(ids[1]).unwrap();
    s.gc().unwrap();
    let segs_after = std::fs::read_dir(dir.path().join("segments"))
        .unwrap()
        .count();
    assert_eq!(segs_after + 1, segs_before);
    assert_holds(&s, ids[0], &[("frozen", &frozen)]);
}

/// A build from before trailer-only segments sees one as an orphan and sets it aside in
/// lost+found/ (checked against the landed build 5936fcd). Its checkpoint reads no chunk from
/// it: the store opens with no damage, the checkpoint verifies (it only cannot be rebuilt).
#[test]
fn a_trailer_only_segment_set_aside_by_an_older_build_is_not_damage() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let frozen = data(8, 2 * CHUNK);
    commit(&mut s, 1, &[("frozen", &frozen)]);
    let again = commit(&mut s, 2, &[("frozen", &frozen)]).checkpoint.id;
    drop(s);
    let segs: Vec<std::path::PathBuf> = std::fs::read_dir(dir.path().join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let trailer_only = segs
        .iter()
        .find(|p| std::fs::metadata(p).unwrap().len() < 8192)
        .expect("a trailer-only segment");
    std::fs::remove_file(trailer_only).unwrap();
    let s = Store::open(dir.path(), opts()).unwrap();
    let r = s.recovery_report();
    assert!(r.damaged_segments.is_empty(), "{r:?}");
    assert_holds(&s, again, &[("frozen", &frozen)]);
    drop(s);
    let s = Store::open(dir.path(), opts()).unwrap();
    assert!(s.recovery_report().damaged_segments.is_empty());
}

/// Regression (issue 14 follow-up): the quarantine lives in the WAL, so a rebuild lost it
/// and restored references to a rotten chunk as the trailers hold them. The rebuild now
/// scrubs: the rotten chunk is quarantined again and healed with the fresh copy a later save
/// wrote, and every checkpoint verifies.
#[test]
fn a_rebuild_finds_the_quarantine_again_and_heals() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let frozen = data(21, 2 * CHUNK);
    let a = commit(&mut s, 1, &[("frozen", &frozen)]).checkpoint.id;
    let b = commit(&mut s, 2, &[("frozen", &frozen), ("w", &data(2, 100))])
        .checkpoint
        .id;
    let (seg, off) = chunk_location(&s, a, "frozen", 0);
    drop(s);
    let path = segment_path(dir.path(), seg);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[off as usize + 3] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    // Found and quarantined; the next save of the same bytes writes a fresh copy and heals.
    let mut s = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(s.scrub().unwrap().heal.quarantined.len(), 1);
    let c = commit(&mut s, 3, &[("frozen", &frozen)]).checkpoint.id;
    for (id, r) in s.verify_all() {
        r.unwrap_or_else(|e| panic!("healed, checkpoint {id}: {e}"));
    }
    drop(s);
    std::fs::remove_file(dir.path().join("CURRENT")).unwrap();
    std::fs::remove_file(live_wal_or_any(dir.path())).unwrap();
    let (s, report) = Store::rebuild(dir.path(), opts()).unwrap();
    assert_eq!(report.restored, vec![a, b, c], "{report:?}");
    assert_eq!(
        report.scrub.heal.quarantined,
        vec![(seg, off)],
        "{report:?}"
    );
    assert_eq!(report.scrub.heal.healed.len(), 1, "{report:?}");
    assert!(report.scrub.broken.is_empty(), "{report:?}");
    for (id, r) in s.verify_all() {
        r.unwrap_or_else(|e| panic!("rebuilt, checkpoint {id}: {e}"));
    }
    assert_holds(&s, a, &[("frozen", &frozen)]);
}

/// Regression (issue 13): segment compaction picked the segment holding a live checkpoint's
/// commit trailer — all its chunks live, but its frames held bytes a copy would not (table
/// room reserved for a run that deduplication then cut short; padding before a payload) — and
/// freed the trailer with it, so a rebuild lost an acknowledged checkpoint. The crash sweep's
/// rebuild found it at 46 of 128 crash points once frame headers were padded to a page.
#[test]
fn regression_segment_gc_freed_a_live_checkpoints_trailer_so_rebuild_lost_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), opts()).unwrap();
    // 400 chunks, all but the first two the same: the run reserves table room for 400
    // (a padded header of about 20 KiB) and lists 2, so a copy would take a third of it.
    let mut w = data(1, 400 * CHUNK);
    let repeated = w[CHUNK..2 * CHUNK].to_vec();
    for c in w.chunks_mut(CHUNK).skip(2) {
        c.copy_from_slice(&repeated);
    }
    let id = commit(&mut s, 10, &[("w", &w)]).checkpoint.id;
    let gc = s.gc().unwrap();
    assert!(gc.segments_compacted.is_empty(), "{gc:?}");
    drop(s);
    std::fs::remove_file(dir.path().join("CURRENT")).unwrap();
    std::fs::remove_file(live_wal_or_any(dir.path())).unwrap();
    let (s, report) = Store::rebuild(dir.path(), opts()).unwrap();
    assert_eq!(report.restored, vec![id], "{report:?}");
    let ck = s.checkpoint(Selector::Id(id)).unwrap();
    assert_eq!(ck.tensor("w").unwrap().data, w);
}
