//! The store through `UringIo` (io_uring, O_DIRECT bodies, preallocated segments): round trip
//! with unaligned tails, reopen, verify, dedup, a kill mid-write and a torn WAL tail — the
//! same guarantees as through `StdIo`, and byte-identical segment files.
#![cfg(target_os = "linux")]

mod support;

use ckptstore::io::{StdIo, Storage, UringConfig, UringIo};
use ckptstore::segment::trailer::{self, TRAILER_HEADER_LEN};
use ckptstore::{DType, Options, Selector, Store};
use std::path::Path;
use std::sync::Arc;
use support::*;

const MIB: usize = 1 << 20;

fn uring() -> UringIo {
    UringIo::new().expect("io_uring on the test machine")
}

fn with_io(io: Arc<dyn Storage>, chunk: usize) -> Options {
    Options {
        chunk_size: chunk,
        segment_max_bytes: 8 << 20,
        io,
        ..Default::default()
    }
}

/// Odd sizes: tails that are no multiple of 4096, tensors spanning chunks and segments.
fn tensors(step: u64) -> Vec<(String, Vec<u8>)> {
    vec![
        ("embed".into(), data(step, 9 * MIB + 123)),
        ("head".into(), data(100 + step, 3 * MIB + 4097)),
        ("bias".into(), data(200 + step, 77)),
    ]
}

fn refs(t: &[(String, Vec<u8>)]) -> Vec<(&str, &[u8])> {
    t.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect()
}

fn save_three(dir: &Path, io: Arc<dyn Storage>, chunk: usize) {
    let mut s = Store::open(dir, with_io(io, chunk)).unwrap();
    for step in 1..=3 {
        commit(&mut s, step, &refs(&tensors(step)));
    }
}

/// Segment file `name` of the store at `dir`, walked: its frames' end and its trailer.
fn walk_segment(dir: &Path, name: &str) -> trailer::Walked {
    let id = ckptstore::segment::parse_file_name(name).unwrap();
    let f = StdIo.open(&dir.join("segments").join(name), false).unwrap();
    trailer::walk(&*f, id).unwrap()
}

#[test]
fn round_trip_reopen_and_verify_through_uring() {
    let dir = tempfile::tempdir().unwrap();
    let io = uring();
    save_three(dir.path(), Arc::new(io.clone()), 4 * MIB);
    let s = Store::open(dir.path(), with_io(Arc::new(io.clone()), 4 * MIB)).unwrap();
    assert_eq!(s.list().len(), 3);
    for step in 1..=3 {
        assert_holds(&s, step, &refs(&tensors(step)));
    }
    assert!(s.verify_all().iter().all(|(_, r)| r.is_ok()));
    let st = io.stats();
    if st.direct_refused_files == 0 {
        assert!(st.direct_pieces > 0, "chunk bodies went direct: {st:?}");
    }
    // Segment files hold exactly what was written: frames to a 64-byte boundary, then the
    // commit trailer where a commit left one — the preallocated reserve was cut at sync.
    for (name, len) in segment_files(dir.path()) {
        let w = walk_segment(dir.path(), &name);
        assert_eq!(
            w.frames_end % 64,
            0,
            "{name}: frames end at {}",
            w.frames_end
        );
        let trailer = w.trailer.map_or(0, |t| TRAILER_HEADER_LEN + t.len()) as u64;
        assert_eq!(len, w.frames_end + trailer, "{name} is {len} bytes");
    }
    // And a StdIo store reads it.
    drop(s);
    let s = Store::open(dir.path(), with_io(Arc::new(StdIo), 4 * MIB)).unwrap();
    assert_holds(&s, 2, &refs(&tensors(2)));
}

#[test]
fn segments_are_byte_identical_to_std_io() {
    for chunk in [4096, 4 * MIB] {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        save_three(a.path(), Arc::new(StdIo), chunk);
        save_three(b.path(), Arc::new(uring()), chunk);
        let sa = snapshot_tree(&a.path().join("segments"));
        let sb = snapshot_tree(&b.path().join("segments"));
        assert_eq!(sa.keys().collect::<Vec<_>>(), sb.keys().collect::<Vec<_>>());
        // The frames are byte-identical; the commit trailers both hold a commit record, whose
        // commit time differs between the two runs.
        for (k, v) in &sa {
            let name = k.to_str().unwrap();
            let (wa, wb) = (walk_segment(a.path(), name), walk_segment(b.path(), name));
            assert_eq!(
                wa.frames_end, wb.frames_end,
                "segment {k:?} (chunk {chunk})"
            );
            let end = wa.frames_end as usize;
            assert!(
                sb[k][..end] == v[..end],
                "segment {k:?} differs (chunk {chunk})"
            );
            assert_eq!(wa.trailer.is_some(), wb.trailer.is_some(), "segment {k:?}");
        }
    }
}

#[test]
fn dedup_through_uring() {
    let dir = tempfile::tempdir().unwrap();
    let io: Arc<dyn Storage> = Arc::new(uring());
    let mut s = Store::open(dir.path(), with_io(io, 4 * MIB)).unwrap();
    let t1 = tensors(1);
    let first = commit(&mut s, 1, &refs(&t1));
    assert_eq!(first.chunks_deduplicated, 0);
    let again = commit(&mut s, 2, &refs(&t1));
    assert_eq!(again.bytes_written, 0);
    // One changed byte in the second chunk of `embed`: exactly one chunk written.
    let mut t3 = t1.clone();
    t3[0].1[4 * MIB + 5] ^= 1;
    let third = commit(&mut s, 3, &refs(&t3));
    assert_eq!(third.bytes_written, 4 * MIB as u64);
    drop(s);
    let s = Store::open(dir.path(), Options::default()).unwrap();
    assert_holds(&s, 1, &refs(&t1));
    assert_holds(&s, 3, &refs(&t3));
}

#[test]
fn killed_mid_write_recovers_the_last_commit_and_drops_the_orphan() {
    let dir = tempfile::tempdir().unwrap();
    let io = uring();
    let opts = || with_io(Arc::new(io.clone()), 4 * MIB);
    let mut s = Store::open(dir.path(), opts()).unwrap();
    commit(&mut s, 1, &refs(&tensors(1)));
    let before = segment_files(dir.path());
    // A transaction that wrote chunks (into a preallocated segment) and never committed; the
    // process "dies": no Drop cleanup, no sync, no trim of the reserve.
    let mut t = s.begin(2).unwrap();
    let big = data(9, 6 * MIB);
    t.put_tensor("w", DType::U8, &[big.len() as u64], &big)
        .unwrap();
    std::mem::forget(t);
    drop(s);
    assert!(segment_files(dir.path()).len() > before.len());
    let s = Store::open(dir.path(), opts()).unwrap();
    assert!(!s.recovery_report().orphan_segments.is_empty());
    assert_eq!(segment_files(dir.path()), before);
    assert_eq!(s.list().len(), 1);
    assert_holds(&s, 1, &refs(&tensors(1)));
}

#[test]
fn torn_wal_tail_written_through_uring_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let io = uring();
    let opts = || with_io(Arc::new(io.clone()), 4 * MIB);
    let mut s = Store::open(dir.path(), opts()).unwrap();
    commit(&mut s, 1, &refs(&tensors(1)));
    let good = file_len(&live_wal(dir.path()));
    commit(&mut s, 2, &refs(&tensors(2)));
    drop(s);
    // The second commit record torn halfway: it never was acknowledged.
    let wal = live_wal(dir.path());
    let full = file_len(&wal);
    let f = std::fs::OpenOptions::new().write(true).open(&wal).unwrap();
    f.set_len(good + (full - good) / 2).unwrap();
    drop(f);
    let mut s = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(s.list().len(), 1);
    assert_holds(&s, 1, &refs(&tensors(1)));
    assert_eq!(file_len(&live_wal(dir.path())), good);
    // Writing goes on after the cut.
    let c = commit(&mut s, 3, &refs(&tensors(3)));
    drop(s);
    let s = Store::open(dir.path(), opts()).unwrap();
    assert_holds(&s, c.checkpoint.id, &refs(&tensors(3)));
    assert!(s.checkpoint(Selector::Latest).is_ok());
}

#[test]
fn buffered_only_uring_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let io = UringIo::with_config(UringConfig {
        direct: false,
        queue_depth: 2,
        ..Default::default()
    })
    .unwrap();
    save_three(dir.path(), Arc::new(io.clone()), 4096);
    assert_eq!(io.stats().direct_pieces, 0);
    let s = Store::open(dir.path(), Options::default()).unwrap();
    for step in 1..=3 {
        assert_holds(&s, step, &refs(&tensors(step)));
    }
}
