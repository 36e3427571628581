//! Invariant: content addressing writes each distinct chunk once while any live checkpoint
//! holds it — across checkpoints, within one checkpoint, and per chunk of a partly changed
//! tensor — and every checkpoint sharing a chunk reads back bit-exact, across reopens,
//! compaction, and deletion of the checkpoint that first wrote the chunk.

mod support;

use ckptstore::{DType, Store};
use std::collections::BTreeMap;
use std::path::Path;
use support::*;

/// Total bytes of everything in `segments/`.
fn segment_bytes(dir: &Path) -> u64 {
    segment_files(dir).values().sum()
}

/// Checks that the segment files of `before` are unchanged and that exactly `trailer_only`
/// new ones exist, each holding no chunk: a header and a commit trailer, under 8 KiB (a
/// commit that writes no chunk still writes its trailer; docs/FORMAT.md, "Commit trailer").
fn assert_only_trailer_segments_added(
    dir: &Path,
    before: &BTreeMap<String, u64>,
    trailer_only: usize,
) {
    let after = segment_files(dir);
    for (name, len) in before {
        assert_eq!(after.get(name), Some(len), "{name} changed: {after:?}");
    }
    let added: Vec<u64> = after
        .iter()
        .filter(|(n, _)| !before.contains_key(*n))
        .map(|(_, &l)| l)
        .collect();
    assert_eq!(added.len(), trailer_only, "{after:?}");
    assert!(added.iter().all(|&l| l > 4096 && l < 8192), "{after:?}");
}

/// 5 chunks and a bit: 4 full ones and a 1000-byte tail.
fn big(seed: u64) -> Vec<u8> {
    data(seed, 4 * CHUNK + 1000)
}

#[test]
fn identical_checkpoint_writes_no_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let (a, b) = (big(1), data(2, 300));
    let first = commit(&mut s, 1, &[("a", &a), ("b", &b)]);
    assert_eq!(first.chunks_written, 6);
    assert_eq!(first.bytes_written, (a.len() + b.len()) as u64);
    let files_before = segment_files(dir.path());
    let bytes_before = segment_bytes(dir.path());

    let second = commit(&mut s, 2, &[("a", &a), ("b", &b)]);
    assert_eq!(second.chunks_written, 0);
    assert_eq!(second.bytes_written, 0);
    assert_eq!(second.chunks_deduplicated, 6);
    assert_eq!(second.bytes_deduplicated, (a.len() + b.len()) as u64);
    assert_only_trailer_segments_added(dir.path(), &files_before, 1);
    assert_eq!(s.stats().segments, 2);

    for id in [1, 2] {
        assert_holds(&s, id, &[("a", &a), ("b", &b)]);
    }
    drop(s);

    // The content index is rebuilt from the WAL: still nothing to write after a reopen.
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let third = commit(&mut s, 3, &[("a", &a), ("b", &b)]);
    assert_eq!(third.chunks_written, 0);
    // ...and after the WAL was compacted into a snapshot.
    s.compact_wal().unwrap();
    drop(s);
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let fourth = commit(&mut s, 4, &[("a", &a), ("b", &b)]);
    assert_eq!(fourth.chunks_written, 0);
    assert_only_trailer_segments_added(dir.path(), &files_before, 3);
    assert!(segment_bytes(dir.path()) < bytes_before + 3 * 8192);
    for id in 1..=4 {
        assert_holds(&s, id, &[("a", &a), ("b", &b)]);
    }
}

#[test]
fn identical_tensors_in_one_checkpoint_are_written_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let a = big(3);
    let mut t = s.begin(1).unwrap();
    t.put_tensor("a", DType::U8, &[a.len() as u64], &a).unwrap();
    t.put_tensor("a_copy", DType::U8, &[a.len() as u64], &a)
        .unwrap();
    // Same bytes under another dtype and shape, and as a blob: still the same chunks.
    t.put_tensor("a_as_f32", DType::F32, &[(a.len() / 4) as u64], &a)
        .unwrap();
    t.put_blob("a_blob", &a).unwrap();
    let info = t.commit().unwrap();
    assert_eq!(info.chunks_written, 5);
    assert_eq!(info.bytes_written, a.len() as u64);
    assert_eq!(info.chunks_deduplicated, 15);
    assert_eq!(info.bytes_deduplicated, 3 * a.len() as u64);
    let on_disk = segment_bytes(dir.path());
    assert!(on_disk < 4096 + 2 * a.len() as u64, "{on_disk}");
    drop(s);

    let s = Store::open(dir.path(), opts()).unwrap();
    let ck = s.checkpoint(ckptstore::Selector::Id(1)).unwrap();
    assert!(ck.tensor("a").unwrap().data == a);
    assert!(ck.tensor("a_copy").unwrap().data == a);
    let f = ck.tensor("a_as_f32").unwrap();
    assert_eq!(f.dtype, DType::F32);
    assert!(f.data == a);
    assert!(ck.blob("a_blob").unwrap() == a);
    s.verify(1).unwrap();
}

#[test]
fn one_changed_chunk_writes_exactly_one_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let a = big(4);
    commit(&mut s, 1, &[("a", &a)]);

    // One byte in the middle chunk.
    let mut a2 = a.clone();
    a2[2 * CHUNK + 5] ^= 1;
    let before = segment_bytes(dir.path());
    let info = commit(&mut s, 2, &[("a", &a2)]);
    assert_eq!(info.chunks_written, 1);
    assert_eq!(info.bytes_written, CHUNK as u64);
    assert_eq!(info.chunks_deduplicated, 4);
    let grew = segment_bytes(dir.path()) - before;
    assert!(
        grew < 4096 + 2 * CHUNK as u64,
        "new segment of {grew} bytes"
    );

    // One byte in the short last chunk.
    let mut a3 = a2.clone();
    *a3.last_mut().unwrap() ^= 0x80;
    let info = commit(&mut s, 3, &[("a", &a3)]);
    assert_eq!(info.chunks_written, 1);
    assert_eq!(info.bytes_written, 1000);

    // The first and the last chunk at once: two runs, two chunks.
    let mut a4 = a3.clone();
    a4[0] ^= 1;
    a4[4 * CHUNK] ^= 1;
    let info = commit(&mut s, 4, &[("a", &a4)]);
    assert_eq!(info.chunks_written, 2);
    assert_eq!(info.chunks_deduplicated, 3);

    drop(s);
    let s = Store::open(dir.path(), opts()).unwrap();
    for (id, bytes) in [(1, &a), (2, &a2), (3, &a3), (4, &a4)] {
        assert_holds(&s, id, &[("a", bytes)]);
    }
}

#[test]
fn shared_chunks_outlive_the_checkpoint_that_wrote_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let (a, b) = (big(5), data(6, 3000));
    let mut a_changed = a.clone();
    a_changed[CHUNK] ^= 0xff;
    commit(&mut s, 1, &[("a", &a), ("b", &b)]);
    commit(&mut s, 2, &[("a", &a), ("b", &b)]);
    commit(&mut s, 3, &[("a", &a_changed), ("b", &b)]);
    let v2: &[(&str, &[u8])] = &[("a", &a), ("b", &b)];
    let v3: &[(&str, &[u8])] = &[("a", &a_changed), ("b", &b)];

    // Checkpoint 1 wrote every chunk 2 and 3 use (but one): nothing may be freed.
    let d = s.delete(1).unwrap();
    assert!(d.segments_freed.is_empty(), "{d:?}");
    assert_eq!(d.bytes_freed, 0);
    assert_holds(&s, 2, v2);
    assert_holds(&s, 3, v3);
    drop(s);

    let mut s = Store::open(dir.path(), opts()).unwrap();
    assert!(s.recovery_report().orphan_segments.is_empty());
    assert!(s.recovery_report().damaged_segments.is_empty());
    assert_holds(&s, 2, v2);
    assert_holds(&s, 3, v3);
    // Unchanged bytes still deduplicate against the first writer's segment.
    let again = commit(&mut s, 4, v2);
    assert_eq!(again.chunks_written, 0);

    // Checkpoint 3 still uses segment 1 through 4 of its 5 chunks.
    s.delete(2).unwrap();
    s.delete(4).unwrap();
    assert_holds(&s, 3, v3);
    assert!(s.verify_all().iter().all(|(_, r)| r.is_ok()));
    drop(s);

    let mut s = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(s.list().len(), 1);
    assert_holds(&s, 3, v3);
    assert_eq!(segment_files(dir.path()).len(), 2);

    // The last holder goes: every segment is freed.
    let d = s.delete(3).unwrap();
    assert_eq!(d.segments_freed.len(), 2);
    assert!(segment_files(dir.path()).is_empty());
    drop(s);
    let s = Store::open(dir.path(), opts()).unwrap();
    assert!(s.list().is_empty());
    assert!(s.recovery_report().orphan_segments.is_empty());
}

#[test]
fn freed_chunks_are_written_again_not_referenced() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let a = big(8);
    commit(&mut s, 1, &[("a", &a)]);
    s.delete(1).unwrap();
    assert!(segment_files(dir.path()).is_empty());
    let info = commit(&mut s, 2, &[("a", &a)]);
    assert_eq!(info.chunks_written, 5);
    assert_holds(&s, 2, &[("a", &a)]);
    drop(s);
    let s = Store::open(dir.path(), opts()).unwrap();
    assert_holds(&s, 2, &[("a", &a)]);
}
