//! Invariant: `tensor_view` returns the same bytes as `tensor`, borrowed from the segment's
//! read-only map (no copy) when the tensor's chunks are one contiguous uncompressed run in a
//! mapped segment, and an owned buffer otherwise (deduplicated or scattered chunks, MemIo);
//! verification through a view catches a flipped payload byte unless the caller opts out.

mod support;

use ckptstore::io::MemIo;
use ckptstore::{DType, Error, Options, Selector, Store};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use support::*;

fn flip_byte(dir: &std::path::Path, (segment, offset): (u64, u64)) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(segment_path(dir, segment))
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], offset).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn contiguous_tensor_view_is_bit_exact_and_zero_copy() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let (a, b, tiny) = (data(1, 5 * CHUNK + 77), data(2, 3 * CHUNK), data(3, 10));
    // `a2` is all of `a` again: deduplicated, so its chunks are `a`'s run, still contiguous.
    let id = commit(
        &mut s,
        1,
        &[("a", &a), ("b", &b), ("tiny", &tiny), ("a2", &a)],
    )
    .checkpoint
    .id;
    let ck = s.checkpoint(Selector::Id(id)).unwrap();
    for (name, bytes) in [("a", &a), ("b", &b), ("tiny", &tiny), ("a2", &a)] {
        let v = ck.tensor_view(name).unwrap();
        assert!(v.is_zero_copy(), "{name}");
        assert_eq!(v.dtype(), DType::U8);
        assert_eq!(v.shape(), &[bytes.len() as u64]);
        assert!(v.data() == &bytes[..], "{name} differs");
        assert!(ck.tensor(name).unwrap().data == v.data());
        // A second view borrows the very same bytes (the same map, the same place).
        let again = ck.tensor_view_with(name, false).unwrap();
        assert_eq!(again.data().as_ptr(), v.data().as_ptr(), "{name}");
    }
    let (va, va2) = (ck.tensor_view("a").unwrap(), ck.tensor_view("a2").unwrap());
    assert_eq!(
        va.data().as_ptr(),
        va2.data().as_ptr(),
        "dedup shares the run"
    );
    // A view outlives the reader and the store.
    drop(ck);
    drop(s);
    assert!(va.data() == &a[..]);
    assert!(va.into_tensor().data == a);
}

#[test]
fn partly_deduplicated_tensor_falls_back_to_an_owned_copy() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let a = data(1, 4 * CHUNK);
    commit(&mut s, 1, &[("a", &a)]);
    // The first two chunks are `a`'s (referenced where they are), the rest are new.
    let mut mixed = a[..2 * CHUNK].to_vec();
    mixed.extend(data(9, 3 * CHUNK + 5));
    let id = commit(&mut s, 2, &[("mixed", &mixed), ("a", &a)])
        .checkpoint
        .id;
    let ck = s.checkpoint(Selector::Id(id)).unwrap();
    let v = ck.tensor_view("mixed").unwrap();
    assert!(!v.is_zero_copy());
    assert!(v.data() == &mixed[..]);
    assert!(ck.tensor_view("a").unwrap().is_zero_copy());
    drop(ck);

    // Corruption in the deduplicated part is caught on the fallback path too.
    flip_byte(dir.path(), chunk_location(&s, id, "mixed", 1));
    drop(s);
    let s = Store::open(dir.path(), opts()).unwrap();
    let ck = s.checkpoint(Selector::Id(id)).unwrap();
    assert!(matches!(
        ck.tensor_view("mixed"),
        Err(Error::ChunkCorrupt { chunk: 1, .. })
    ));
}

#[test]
fn mem_io_views_are_owned_and_exact() {
    let mem = MemIo::new();
    let o = Options {
        io: Arc::new(mem.clone()),
        ..opts()
    };
    let mut s = Store::open("/s", o).unwrap();
    let a = data(4, 3 * CHUNK + 1);
    let id = commit(&mut s, 1, &[("a", &a)]).checkpoint.id;
    let ck = s.checkpoint(Selector::Id(id)).unwrap();
    let v = ck.tensor_view("a").unwrap();
    assert!(!v.is_zero_copy());
    assert!(v.data() == &a[..]);
    assert!(matches!(ck.tensor_view("nope"), Err(Error::NotFound(_))));
}

#[test]
fn flipped_byte_is_chunk_corrupt_through_the_view_unless_verify_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let a = data(5, 6 * CHUNK);
    let id = commit(&mut s, 1, &[("a", &a)]).checkpoint.id;
    let loc = chunk_location(&s, id, "a", 4);
    drop(s);
    flip_byte(dir.path(), loc);
    let s = Store::open(dir.path(), opts()).unwrap();
    let ck = s.checkpoint(Selector::Id(id)).unwrap();
    match ck.tensor_view("a") {
        Err(Error::ChunkCorrupt {
            chunk,
            segment,
            offset,
            ..
        }) => assert_eq!((chunk, (segment, offset)), (4, loc)),
        other => panic!("expected ChunkCorrupt, got {other:?}"),
    }
    let v = ck.tensor_view_with("a", false).unwrap();
    assert!(v.is_zero_copy());
    let at = 4 * CHUNK;
    assert_eq!(v.data()[at], a[at] ^ 0x40, "the flipped byte, unverified");
    assert_eq!(v.data()[at + 1..], a[at + 1..]);
}

#[test]
fn many_chunk_view_verifies_in_parallel_and_names_the_first_bad_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), opts()).unwrap();
    // 9 MiB of 4 KiB chunks: past the threshold for hashing on several threads.
    let a = data(6, 9 << 20);
    let id = commit(&mut s, 1, &[("a", &a)]).checkpoint.id;
    {
        let ck = s.checkpoint(Selector::Id(id)).unwrap();
        let v = ck.tensor_view("a").unwrap();
        assert!(v.is_zero_copy());
        assert!(v.data() == &a[..]);
    }
    let (late, early) = (
        chunk_location(&s, id, "a", 2000),
        chunk_location(&s, id, "a", 7),
    );
    drop(s);
    flip_byte(dir.path(), late);
    flip_byte(dir.path(), early);
    let s = Store::open(dir.path(), opts()).unwrap();
    let ck = s.checkpoint(Selector::Id(id)).unwrap();
    assert!(matches!(
        ck.tensor_view("a"),
        Err(Error::ChunkCorrupt { chunk: 7, .. })
    ));
}
