//! Invariant: damage anywhere but the WAL tail is reported as a typed error naming what is
//! damaged (never a panic, a giant allocation, or a silent loss): corrupt WAL records, bad
//! chunks, missing or short segments, broken or dangling `CURRENT`, newer format versions;
//! intact checkpoints stay readable and foreign files are never touched.

mod support;

use ckptstore::proto::v1 as pb;
use ckptstore::proto::Message;
use ckptstore::wal::{self, RecordType};
use ckptstore::{DType, Error, Options, RecoveryMode, Selector, Store};
use std::path::{Path, PathBuf};
use support::*;

fn w(step: u64) -> Vec<u8> {
    data(step, 3 * CHUNK)
}

/// A store with checkpoints at steps 1..=n, each holding tensor "w" = `w(step)`; returns the
/// WAL length after each commit.
fn store_with(dir: &Path, n: u64) -> Vec<u64> {
    let mut s = Store::open(dir, opts()).unwrap();
    let mut ends = Vec::new();
    for step in 1..=n {
        commit(&mut s, step, &[("w", &w(step))]);
        ends.push(file_len(&live_wal(dir)));
    }
    ends
}

/// `store_with(dir, 2)`; returns the id and path of the segment holding the first chunk of
/// checkpoint 2's "w".
fn store_with_segment_of_2(dir: &Path) -> (u64, PathBuf) {
    store_with(dir, 2);
    let s = Store::open(dir, opts()).unwrap();
    let (seg, _) = chunk_location(&s, 2, "w", 0);
    drop(s);
    (seg, segment_path(dir, seg))
}

fn with_mode(mode: RecoveryMode) -> Options {
    Options {
        recovery_mode: mode,
        ..opts()
    }
}

fn read_only() -> Options {
    Options {
        read_only: true,
        ..opts()
    }
}

/// Every file under `dir` except the lock file (whose content is the last writer's pid).
fn files_without_lock(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut t = snapshot_tree(dir);
    t.remove(Path::new("LOCK"));
    t
}

fn flip(path: &Path, at: u64, mask: u8) {
    let mut b = std::fs::read(path).unwrap();
    b[at as usize] ^= mask;
    std::fs::write(path, b).unwrap();
}

/// Rewrites a little-endian u16 version field at `at` and the CRC32C over `0..crc_at` stored
/// at `crc_at`.
fn set_version(path: &Path, at: usize, version: u16, crc_at: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[at..at + 2].copy_from_slice(&version.to_le_bytes());
    let crc = crc32c(&b[..crc_at]);
    b[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(path, b).unwrap();
}

// ---------------------------------------------------------------- WAL corruption

#[test]
fn flipped_bit_before_the_tail_refuses_with_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let ends = store_with(dir.path(), 3);
    let wal = live_wal(dir.path());
    // Every byte of the second record's frame header, and a few payload bytes.
    let second = ends[0];
    let mut positions: Vec<u64> = (second..second + 12).collect();
    positions.extend([second + 12, second + 40, ends[1] - 1]);
    let pristine = std::fs::read(&wal).unwrap();
    for at in positions {
        std::fs::write(&wal, &pristine).unwrap();
        flip(&wal, at, 0x01);
        let before = files_without_lock(dir.path());
        for o in [
            opts(),
            read_only(),
            with_mode(RecoveryMode::AbsoluteConsistency),
        ] {
            match Store::open(dir.path(), o) {
                Err(Error::WalCorrupt { path, offset, .. }) => {
                    assert_eq!(path, wal, "flip at {at}");
                    assert_eq!(offset, second, "flip at {at}");
                }
                other => panic!("flip at {at}: {other:?}"),
            }
        }
        assert_eq!(
            before,
            files_without_lock(dir.path()),
            "refused open modified the store"
        );
    }
}

/// Salvage (issue 14, item 1) skips the damaged record and keeps every valid record after it
/// that applies to the state; it used to drop everything from the damage on. The WAL is
/// rewritten as a snapshot (a new file, CURRENT switched) and the old one kept in lost+found/.
#[test]
fn point_in_time_skips_the_damaged_record_and_keeps_the_valid_ones_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let ends = store_with(dir.path(), 3);
    let wal = live_wal(dir.path());
    flip(&wal, ends[0] + 30, 0x80);
    let damaged = std::fs::read(&wal).unwrap();
    let mut s = Store::open(dir.path(), with_mode(RecoveryMode::PointInTime)).unwrap();
    assert!(s.recovery_report().salvaged_corruption.is_some());
    let steps: Vec<u64> = s.list().iter().map(|c| c.step).collect();
    assert_eq!(
        steps,
        vec![1, 3],
        "checkpoint 2's record was the damaged one"
    );
    assert_holds(&s, 1, &[("w", &w(1))]);
    assert_holds(&s, 3, &[("w", &w(3))]);
    assert_ne!(live_wal(dir.path()), wal);
    assert_eq!(
        std::fs::read(dir.path().join("lost+found").join(wal.file_name().unwrap())).unwrap(),
        damaged
    );
    let info = commit(&mut s, 9, &[("w", &w(9))]);
    drop(s);
    let s = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(s.list().len(), 3);
    assert_holds(&s, 1, &[("w", &w(1))]);
    assert_holds(&s, 3, &[("w", &w(3))]);
    assert_holds(&s, info.checkpoint.id, &[("w", &w(9))]);
}

#[test]
fn huge_record_length_is_an_error_or_a_tail_never_an_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let ends = store_with(dir.path(), 3);
    let wal = live_wal(dir.path());
    let pristine = std::fs::read(&wal).unwrap();
    let set_len_field = |record_at: u64, len: u32| {
        let mut b = pristine.clone();
        let at = record_at as usize + 4;
        b[at..at + 4].copy_from_slice(&len.to_le_bytes());
        std::fs::write(&wal, b).unwrap();
    };

    // In the middle: corruption.
    for len in [u32::MAX, wal::MAX_RECORD_LEN + 1, 1 << 30] {
        set_len_field(ends[0], len);
        match Store::open(dir.path(), opts()) {
            Err(Error::WalCorrupt { offset, .. }) => assert_eq!(offset, ends[0]),
            other => panic!("length {len} mid-log: {other:?}"),
        }
    }
    // The last record: a torn tail, cut off.
    set_len_field(ends[1], u32::MAX);
    let s = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(s.list().len(), 2);
    assert_eq!(file_len(&wal), ends[1]);
    drop(s);

    // A frame header claiming u32::MAX bytes appended after the last record.
    let mut frame = vec![0u8; 12];
    frame[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    frame[8] = RecordType::Commit as u8;
    let mut b = std::fs::read(&wal).unwrap();
    b.extend_from_slice(&frame);
    std::fs::write(&wal, b).unwrap();
    let s = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(s.list().len(), 2);
    assert_eq!(file_len(&wal), ends[1]);
    assert_holds(&s, 2, &[("w", &w(2))]);
}

fn wal_salt(wal: &Path) -> u32 {
    let b = std::fs::read(wal).unwrap();
    ckptstore::wal::WalHeader::decode(&b).unwrap().salt
}

/// Appends a valid, CRC'd commit record carrying `m` to the live WAL.
fn append_commit(dir: &Path, m: pb::Manifest) {
    let wal = live_wal(dir);
    let payload = pb::CommitRecord { manifest: Some(m) }.encode_to_vec();
    let mut b = std::fs::read(&wal).unwrap();
    wal::encode_record(&mut b, wal_salt(&wal), RecordType::Commit, &payload);
    std::fs::write(&wal, b).unwrap();
}

fn chunk(segment: u64, offset: u64, len: u64) -> pb::ChunkRef {
    pb::ChunkRef {
        segment,
        offset,
        stored_len: len,
        raw_len: len,
        codec: pb::Codec::None as i32,
        blake3: vec![7; 32],
        nonce: vec![],
        tag: vec![],
    }
}

#[test]
fn crcd_manifest_with_huge_chunk_length_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 1);
    let huge = 1u64 << 60;
    let m = pb::Manifest {
        id: 50,
        step: 50,
        tensors: vec![pb::TensorEntry {
            name: "huge".into(),
            dtype: pb::DType::U8 as i32,
            shape: vec![huge],
            nbytes: huge,
            chunks: vec![chunk(1, 4096, huge)],
        }],
        ..Default::default()
    };
    append_commit(dir.path(), m);
    for o in [opts(), read_only()] {
        match Store::open(dir.path(), o) {
            Err(Error::BadManifest { reason, .. }) => {
                assert!(reason.contains("outside"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn crcd_manifest_naming_a_huge_missing_segment_never_allocates_it() {
    // Every chunk within the 1 GiB cap, but 2^40 bytes in all, in a segment that is not there:
    // reads and verification must report the missing segment before allocating anything.
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 1);
    let gib = 1u64 << 30;
    let n = 1024u64;
    let m = pb::Manifest {
        id: 60,
        step: 60,
        tensors: vec![pb::TensorEntry {
            name: "huge".into(),
            dtype: pb::DType::U8 as i32,
            shape: vec![n * gib],
            nbytes: n * gib,
            chunks: (0..n).map(|i| chunk(999, 4096 + i * gib, gib)).collect(),
        }],
        new_segments: vec![pb::SegmentInfo {
            id: 999,
            length: 4096 + n * gib,
        }],
        ..Default::default()
    };
    append_commit(dir.path(), m);
    let s = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(
        s.recovery_report().damaged_segments,
        vec![(999, "missing".to_string())]
    );
    let ck = s.checkpoint(Selector::Id(60)).unwrap();
    assert!(matches!(
        ck.tensor("huge"),
        Err(Error::SegmentMissing { checkpoint: 60, .. })
    ));
    assert!(matches!(
        ck.tensor_with("huge", false),
        Err(Error::SegmentMissing { checkpoint: 60, .. })
    ));
    assert!(matches!(
        s.verify(60),
        Err(Error::SegmentMissing { checkpoint: 60, .. })
    ));
    assert_eq!(s.latest_valid().unwrap().unwrap().id, 1);
}

// ---------------------------------------------------------------- chunk corruption

#[test]
fn corrupt_chunk_names_checkpoint_tensor_and_chunk() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 2);
    let s = Store::open(dir.path(), opts()).unwrap();
    let (seg, off) = chunk_location(&s, 2, "w", 1);
    drop(s);
    flip(&segment_path(dir.path(), seg), off + 17, 0x04);

    let s = Store::open(dir.path(), opts()).unwrap();
    assert!(s.recovery_report().damaged_segments.is_empty());
    let check = |e: Error| match e {
        Error::ChunkCorrupt {
            checkpoint,
            kind,
            name,
            chunk,
            segment,
            offset,
            reason,
        } => {
            assert_eq!(
                (checkpoint, kind, name.as_str(), chunk),
                (2, "tensor", "w", 1)
            );
            assert_eq!((segment, offset), (seg, off));
            assert!(reason.contains("BLAKE3"), "{reason}");
        }
        other => panic!("{other:?}"),
    };
    check(s.verify(2).unwrap_err());
    let ck = s.checkpoint(Selector::Id(2)).unwrap();
    check(ck.tensor("w").unwrap_err());
    // The trusted fast path returns the bytes as stored.
    let raw = ck.tensor_with("w", false).unwrap().data;
    let mut want = w(2);
    want[CHUNK + 17] ^= 0x04;
    assert!(raw == want);
    let results = s.verify_all();
    assert!(results[0].1.is_ok());
    assert!(matches!(results[1].1, Err(Error::ChunkCorrupt { .. })));
    assert_eq!(s.latest_valid().unwrap().unwrap().id, 1);
    assert_holds(&s, 1, &[("w", &w(1))]);
}

// ---------------------------------------------------------------- missing / short segments

/// Damages the segment of checkpoint 2 with `damage`, then checks the whole contract.
fn damaged_segment_case(damage: impl Fn(&Path), problem: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (seg, seg_path) = store_with_segment_of_2(dir.path());
    damage(&seg_path);

    let before = files_without_lock(dir.path());
    match Store::open(dir.path(), with_mode(RecoveryMode::AbsoluteConsistency)) {
        Err(Error::SegmentMissing {
            path,
            problem: p,
            checkpoint,
            ..
        }) => {
            assert_eq!(path, seg_path);
            assert!(p.starts_with(problem), "{p}");
            assert_eq!(checkpoint, 2);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(before, files_without_lock(dir.path()));

    let mut s = Store::open(dir.path(), opts()).unwrap();
    let damaged = &s.recovery_report().damaged_segments;
    assert_eq!(damaged.len(), 1);
    assert_eq!(damaged[0].0, seg);
    assert!(damaged[0].1.starts_with(problem), "{:?}", damaged[0]);
    assert_eq!(s.list().len(), 2, "damaged checkpoint stays listed");
    let is_missing = |r: Result<_, Error>| matches!(r, Err(Error::SegmentMissing { checkpoint: 2, ref path, .. }) if *path == seg_path);
    let ck = s.checkpoint(Selector::Id(2)).unwrap();
    assert!(is_missing(ck.tensor("w").map(|_| ())));
    assert!(is_missing(ck.tensor_with("w", false).map(|_| ())));
    assert!(is_missing(s.verify(2)));
    assert_eq!(s.latest_valid().unwrap().unwrap().id, 1);
    assert_holds(&s, 1, &[("w", &w(1))]);

    // The same bytes committed again must be written anew, not referenced in the bad segment.
    let again = commit(&mut s, 3, &[("w", &w(2))]);
    assert_eq!(again.chunks_written, 3);
    assert_eq!(again.chunks_deduplicated, 0);
    assert_holds(&s, again.checkpoint.id, &[("w", &w(2))]);
    // And once more: dedup against the healthy copy is fine.
    let third = commit(&mut s, 4, &[("w", &w(2))]);
    assert_eq!(third.chunks_written, 0);
    assert_holds(&s, third.checkpoint.id, &[("w", &w(2))]);
    assert_eq!(s.latest_valid().unwrap().unwrap().id, third.checkpoint.id);

    // Freeing the healthy copy while the damaged one is live: the bytes are written again.
    s.delete(again.checkpoint.id).unwrap();
    let freed = s.delete(third.checkpoint.id).unwrap();
    // The healthy copy's segment, and the trailer-only segment of `third` (it wrote no chunk).
    assert_eq!(freed.segments_freed.len(), 2);
    let fourth = commit(&mut s, 5, &[("w", &w(2))]);
    assert_eq!(fourth.chunks_written, 3);
    assert_holds(&s, fourth.checkpoint.id, &[("w", &w(2))]);

    // Deleting the damaged checkpoint must not make its chunks look reusable either.
    s.delete(2).unwrap();
    let fifth = commit(&mut s, 6, &[("w", &w(2))]);
    assert_holds(&s, fifth.checkpoint.id, &[("w", &w(2))]);
    let sixth = commit(&mut s, 7, &[("w", &w(2))]);
    assert_holds(&s, sixth.checkpoint.id, &[("w", &w(2))]);
    drop(s);

    let s = Store::open(dir.path(), opts()).unwrap();
    assert!(s.recovery_report().damaged_segments.is_empty());
    assert_eq!(s.list().len(), 4);
    for id in [
        fourth.checkpoint.id,
        fifth.checkpoint.id,
        sixth.checkpoint.id,
    ] {
        assert_holds(&s, id, &[("w", &w(2))]);
    }
    assert_holds(&s, 1, &[("w", &w(1))]);
}

#[test]
fn missing_segment_is_reported_skipped_and_never_deduplicated_against() {
    damaged_segment_case(|p| std::fs::remove_file(p).unwrap(), "missing");
}

#[test]
fn truncated_segment_is_reported_skipped_and_never_deduplicated_against() {
    damaged_segment_case(
        |p| {
            // 100 bytes short of its committed length: the end of its frames, where its
            // commit trailer (docs/FORMAT.md), past that length, starts.
            let bytes = std::fs::read(p).unwrap();
            let committed = bytes
                .windows(8)
                .rposition(|w| w == b"CKPTTRL\0")
                .expect("a commit trailer");
            let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
            f.set_len(committed as u64 - 100).unwrap();
        },
        "truncated",
    );
}

#[test]
fn segment_truncated_inside_its_header_is_reported() {
    damaged_segment_case(
        |p| {
            let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
            f.set_len(10).unwrap();
        },
        "truncated",
    );
}

#[test]
fn damaged_segment_reopens_without_losing_the_damage_report() {
    let dir = tempfile::tempdir().unwrap();
    let (seg, seg_path) = store_with_segment_of_2(dir.path());
    std::fs::remove_file(&seg_path).unwrap();
    for _ in 0..2 {
        let s = Store::open(dir.path(), opts()).unwrap();
        assert_eq!(
            s.recovery_report().damaged_segments,
            vec![(seg, "missing".to_string())]
        );
        assert_eq!(s.list().len(), 2);
    }
}

// ---------------------------------------------------------------- CURRENT

#[test]
fn current_naming_a_missing_wal_is_dangling() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 1);
    std::fs::write(dir.path().join("CURRENT"), ckptstore::current::encode(99)).unwrap();
    for o in [opts(), read_only()] {
        match Store::open(dir.path(), o) {
            Err(Error::CurrentDangling { path, target }) => {
                assert_eq!(path, dir.path().join("CURRENT"));
                assert_eq!(target, "00000099.wal");
            }
            other => panic!("{other:?}"),
        }
    }
    // The WAL it used to name is still there: nothing was deleted.
    assert!(dir.path().join("00000001.wal").exists());
}

#[test]
fn deleted_live_wal_is_dangling() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 1);
    std::fs::remove_file(live_wal(dir.path())).unwrap();
    assert!(matches!(
        Store::open(dir.path(), opts()),
        Err(Error::CurrentDangling { .. })
    ));
}

#[test]
fn corrupt_current_is_a_bad_header() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 1);
    let cur = dir.path().join("CURRENT");
    let good = std::fs::read(&cur).unwrap();
    let mut cases: Vec<Vec<u8>> = Vec::new();
    for i in 0..good.len() {
        let mut b = good.clone();
        b[i] ^= 0x10;
        cases.push(b);
    }
    cases.push(good[..10].to_vec());
    cases.push(Vec::new());
    cases.push([good.clone(), vec![0]].concat());
    for (i, bytes) in cases.into_iter().enumerate() {
        std::fs::write(&cur, &bytes).unwrap();
        let before = files_without_lock(dir.path());
        match Store::open(dir.path(), opts()) {
            Err(Error::BadHeader { path, what }) => {
                assert_eq!(path, cur, "case {i}");
                assert_eq!(what, "CURRENT");
            }
            other => panic!("case {i}: {other:?}"),
        }
        assert_eq!(before, files_without_lock(dir.path()), "case {i}");
    }
    std::fs::write(&cur, &good).unwrap();
    assert_holds(
        &Store::open(dir.path(), opts()).unwrap(),
        1,
        &[("w", &w(1))],
    );
}

#[test]
fn missing_current_with_committed_wal_refuses_and_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 2);
    std::fs::remove_file(dir.path().join("CURRENT")).unwrap();
    let before = files_without_lock(dir.path());
    for o in [opts(), read_only()] {
        match Store::open(dir.path(), o) {
            Err(Error::CurrentMissing { path, .. }) => assert_eq!(path, dir.path()),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(before, files_without_lock(dir.path()));
    assert!(!dir.path().join("CURRENT").exists());
}

#[test]
fn missing_current_after_compaction_refuses() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 2);
    let mut s = Store::open(dir.path(), opts()).unwrap();
    s.compact_wal().unwrap();
    drop(s);
    assert!(dir.path().join("00000002.wal").exists());
    std::fs::remove_file(dir.path().join("CURRENT")).unwrap();
    let before = files_without_lock(dir.path());
    assert!(matches!(
        Store::open(dir.path(), opts()),
        Err(Error::CurrentMissing { .. })
    ));
    assert_eq!(before, files_without_lock(dir.path()));
}

// ---------------------------------------------------------------- foreign files

#[test]
fn foreign_files_are_ignored_and_never_deleted() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 2);
    let foreign = [
        "notes.txt",
        "123.seg",
        "00000001.wal.bak",
        "CURRENT.bak",
        "1.wal",
        "segments/notes.txt",
        "segments/123.seg",
        "segments/00000001.wal.bak",
        "segments/00000001.seg.tmp",
        "segments/0000000x.seg",
    ];
    for (i, name) in foreign.iter().enumerate() {
        std::fs::write(dir.path().join(name), format!("foreign {i}")).unwrap();
    }
    let check = |dir: &Path| {
        for (i, name) in foreign.iter().enumerate() {
            assert_eq!(
                std::fs::read_to_string(dir.join(name)).unwrap(),
                format!("foreign {i}"),
                "{name}"
            );
        }
    };
    let mut s = Store::open(dir.path(), opts()).unwrap();
    assert!(s.recovery_report().orphan_segments.is_empty());
    assert!(s.recovery_report().stale_files.is_empty());
    assert_holds(&s, 1, &[("w", &w(1))]);
    commit(&mut s, 3, &[("w", &w(3))]);
    s.delete(1).unwrap();
    s.delete(2).unwrap();
    s.compact_wal().unwrap();
    check(dir.path());
    drop(s);
    let s = Store::open(dir.path(), read_only()).unwrap();
    assert_eq!(s.list().len(), 1);
    drop(s);
    let s = Store::open(dir.path(), opts()).unwrap();
    assert_holds(&s, 3, &[("w", &w(3))]);
    check(dir.path());
}

// ---------------------------------------------------------------- newer versions

fn expect_unsupported(dir: &Path, file: &Path) {
    expect_unsupported_version(dir, file, 2, 1)
}

fn expect_unsupported_version(dir: &Path, file: &Path, want_found: u32, want_supported: u32) {
    for o in [opts(), read_only(), with_mode(RecoveryMode::PointInTime)] {
        match Store::open(dir, o) {
            Err(Error::UnsupportedVersion {
                path,
                found,
                supported,
            }) => {
                assert_eq!(path, file);
                assert_eq!((found, supported), (want_found, want_supported));
            }
            other => panic!("{}: {other:?}", file.display()),
        }
    }
}

#[test]
fn newer_current_version_is_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 1);
    let cur = dir.path().join("CURRENT");
    set_version(&cur, 8, 2, 20);
    expect_unsupported(dir.path(), &cur);
}

#[test]
fn newer_wal_version_is_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 1);
    let wal = live_wal(dir.path());
    // Version 2 is the header with feature flags (docs/FORMAT.md): 3 is the first unknown one.
    set_version(&wal, 8, 3, 28);
    let before = files_without_lock(dir.path());
    expect_unsupported_version(dir.path(), &wal, 3, 2);
    assert_eq!(before, files_without_lock(dir.path()));
}

#[test]
fn newer_segment_version_is_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let (_, seg_path) = store_with_segment_of_2(dir.path());
    set_version(&seg_path, 8, 2, 28);
    let before = files_without_lock(dir.path());
    expect_unsupported(dir.path(), &seg_path);
    assert_eq!(before, files_without_lock(dir.path()));
}

#[test]
fn corrupt_segment_header_marks_the_segment_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let (seg, seg_path) = store_with_segment_of_2(dir.path());
    flip(&seg_path, 3, 0x01);
    let s = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(s.recovery_report().damaged_segments.len(), 1);
    assert_eq!(s.recovery_report().damaged_segments[0].0, seg);
    assert!(matches!(
        s.verify(2),
        Err(Error::SegmentMissing { checkpoint: 2, .. })
    ));
    assert_eq!(s.latest_valid().unwrap().unwrap().id, 1);
    drop(s);
    assert!(matches!(
        Store::open(dir.path(), with_mode(RecoveryMode::AbsoluteConsistency)),
        Err(Error::SegmentMissing { .. })
    ));
}

#[test]
fn tensor_dtype_survives_damage_checks() {
    // A multi-dtype checkpoint next to a damaged one still reads back with its dtype and shape.
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let f = data(5, 4 * 3 * 700);
    let mut t = s.begin(1).unwrap();
    t.put_tensor("f", DType::F32, &[3, 700], &f).unwrap();
    t.commit().unwrap();
    commit(&mut s, 2, &[("w", &w(2))]);
    let (seg, _) = chunk_location(&s, 2, "w", 0);
    drop(s);
    std::fs::remove_file(segment_path(dir.path(), seg)).unwrap();
    let s = Store::open(dir.path(), opts()).unwrap();
    let got = s.checkpoint(Selector::Id(1)).unwrap().tensor("f").unwrap();
    assert_eq!((got.dtype, got.shape), (DType::F32, vec![3, 700]));
    assert!(got.data == f);
}

// ---------------------------------------------------------------- races and durability of the directory

/// A file system whose first read of `CURRENT` sees the pointer from before a WAL compaction:
/// what a read-only open racing the writer's compaction sees.
#[derive(Debug)]
struct StaleCurrentOnce {
    inner: ckptstore::io::MemIo,
    stale: ckptstore::io::MemIo,
    served: std::sync::atomic::AtomicBool,
}

impl ckptstore::io::Storage for StaleCurrentOnce {
    fn create_dir_all(&self, p: &Path) -> std::io::Result<()> {
        self.inner.create_dir_all(p)
    }
    fn create_new(&self, p: &Path) -> std::io::Result<Box<dyn ckptstore::io::StorageFile>> {
        self.inner.create_new(p)
    }
    fn open(&self, p: &Path, write: bool) -> std::io::Result<Box<dyn ckptstore::io::StorageFile>> {
        if p.ends_with("CURRENT") && !self.served.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return self.stale.open(p, write);
        }
        self.inner.open(p, write)
    }
    fn rename(&self, a: &Path, b: &Path) -> std::io::Result<()> {
        self.inner.rename(a, b)
    }
    fn remove_file(&self, p: &Path) -> std::io::Result<()> {
        self.inner.remove_file(p)
    }
    fn sync_dir(&self, p: &Path) -> std::io::Result<()> {
        self.inner.sync_dir(p)
    }
    fn list(&self, p: &Path) -> std::io::Result<Vec<String>> {
        self.inner.list(p)
    }
    fn exists(&self, p: &Path) -> std::io::Result<bool> {
        self.inner.exists(p)
    }
    fn try_lock(&self, p: &Path) -> std::io::Result<Option<Box<dyn ckptstore::io::StorageFile>>> {
        self.inner.try_lock(p)
    }
    fn try_lock_existing(
        &self,
        p: &Path,
    ) -> std::io::Result<Option<Box<dyn ckptstore::io::StorageFile>>> {
        self.inner.try_lock_existing(p)
    }
}

/// Issue 14, item 5: a read-only open that read `CURRENT` just before the writer's WAL
/// compaction switched it (and removed the old WAL) failed with `CurrentDangling` (Python:
/// Corruption). It reads `CURRENT` again now.
#[test]
fn read_only_open_racing_a_wal_compaction_retries() {
    use ckptstore::io::{MemIo, Storage};
    let mem = MemIo::new();
    let o = |io: std::sync::Arc<dyn Storage>, read_only| Options {
        read_only,
        io,
        ..opts()
    };
    let mut s = Store::open("/s", o(std::sync::Arc::new(mem.clone()), false)).unwrap();
    commit(&mut s, 1, &[("w", &w(1))]);
    s.compact_wal().unwrap();
    drop(s);
    assert!(!mem.exists(Path::new("/s/00000001.wal")).unwrap());
    let stale = MemIo::new();
    stale.write_file(
        Path::new("/s/CURRENT"),
        ckptstore::current::encode(1).to_vec(),
    );
    let racing = StaleCurrentOnce {
        inner: mem.clone(),
        stale,
        served: Default::default(),
    };
    let r = Store::open("/s", o(std::sync::Arc::new(racing), true)).unwrap();
    assert_holds(&r, 1, &[("w", &w(1))]);
    // A CURRENT that really names a missing WAL is still CurrentDangling, after the retry.
    mem.write_file(
        Path::new("/s/CURRENT"),
        ckptstore::current::encode(1).to_vec(),
    );
    assert!(matches!(
        Store::open("/s", o(std::sync::Arc::new(mem.clone()), true)),
        Err(Error::CurrentDangling { .. })
    ));
}

/// Issue 14, item 5: the store directory's own entry was fsynced only through its parent
/// when the path had one, and the ancestors `create_dir_all` made never: a power cut that
/// loses unsynced directory entries lost the whole store after its first commit.
#[test]
fn store_directory_and_created_ancestors_survive_a_power_cut() {
    use ckptstore::io::{CrashMode, SimIo};
    for path in ["/a/b/store", "store"] {
        let sim = SimIo::new();
        let o = |sim: &SimIo, read_only| Options {
            read_only,
            io: std::sync::Arc::new(sim.clone()),
            ..opts()
        };
        let mut s = Store::open(path, o(&sim, false)).unwrap();
        commit(&mut s, 1, &[("w", &w(1))]);
        drop(s);
        for seed in 0..4 {
            let img = sim.crash_image(CrashMode::LoseDirEntries, seed);
            let r = Store::open(path, o(&img, true)).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_holds(&r, 1, &[("w", &w(1))]);
        }
    }
}

/// Issue 14, item 5: a reader whose lease could not be narrowed after reading the WAL
/// dropped it and read on with no lease, so a writer could free segments under it. The lease
/// stays now, holding everything.
#[test]
fn a_reader_whose_lease_narrowing_fails_keeps_its_lease() {
    use ckptstore::io::{Fault, OpKind, SimIo};
    let sim = SimIo::new();
    let o = |read_only| Options {
        read_only,
        io: std::sync::Arc::new(sim.clone()),
        ..opts()
    };
    let mut s = Store::open("/s", o(false)).unwrap();
    commit(&mut s, 1, &[("w", &w(1))]);
    drop(s);
    // Taking the lease writes it (write_at, set_len); narrowing is the third write.
    sim.inject(Fault::Eio {
        kind: OpKind::Write,
        nth: 3,
    });
    let r = Store::open("/s", o(true)).unwrap();
    let lease = r
        .reader_lease()
        .expect("the reader keeps its lease")
        .to_path_buf();
    assert!(sim.read_file(&lease).is_some());
    assert_holds(&r, 1, &[("w", &w(1))]);
}
