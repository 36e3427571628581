//! Round trip through a real directory: put, commit, reopen, read back bit-exact; dedup of
//! unchanged tensors across checkpoints; delete frees space; WAL compaction keeps everything.

use ckptstore::{DType, MetaValue, Options, Selector, Store};

fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn small_chunks() -> Options {
    Options {
        chunk_size: 4096,
        ..Default::default()
    }
}

#[test]
fn commit_reopen_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let w = bytes(1, 3 * 4096 + 100);
    let b = bytes(2, 4 * 10);
    {
        let mut s = Store::open(dir.path(), small_chunks()).unwrap();
        assert!(s.recovery_report().created);
        let mut t = s.begin(10).unwrap();
        t.set_epoch(2);
        t.set_metadata("lr", 0.1);
        t.set_metadata("rng", vec![1u8, 2, 3]);
        t.put_tensor(
            "fc.weight",
            DType::BF16,
            &[2, (w.len() / 4) as u64],
            &w[..w.len() / 4 * 4],
        )
        .unwrap();
        t.put_tensor("fc.bias", DType::F32, &[10], &b).unwrap();
        t.put_blob("optimizer.json", b"{\"betas\":[0.9,0.999]}")
            .unwrap();
        let info = t.commit().unwrap();
        assert_eq!(info.checkpoint.id, 1);
        assert_eq!(info.chunks_deduplicated, 0);
    }
    let s = Store::open(dir.path(), small_chunks()).unwrap();
    assert!(!s.recovery_report().created);
    let list = s.list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].step, 10);
    assert_eq!(list[0].epoch, 2);
    assert_eq!(list[0].metadata["lr"], MetaValue::Float(0.1));
    let ck = s.checkpoint(Selector::Step(10)).unwrap();
    let t = ck.tensor("fc.weight").unwrap();
    assert_eq!(t.dtype, DType::BF16);
    assert_eq!(t.data, w[..w.len() / 4 * 4]);
    assert_eq!(ck.tensor("fc.bias").unwrap().data, b);
    assert_eq!(
        ck.blob("optimizer.json").unwrap(),
        b"{\"betas\":[0.9,0.999]}"
    );
    assert_eq!(ck.tensor_names(), vec!["fc.weight", "fc.bias"]);
    s.verify(1).unwrap();
}

#[test]
fn unchanged_tensors_are_not_written_again() {
    let dir = tempfile::tempdir().unwrap();
    let frozen = bytes(7, 64 * 1024);
    let mut s = Store::open(dir.path(), small_chunks()).unwrap();
    let mut written = Vec::new();
    for step in 0..3u64 {
        let trained = bytes(100 + step, 16 * 1024);
        let mut t = s.begin(step).unwrap();
        t.put_tensor("embed", DType::F32, &[16 * 1024], &frozen)
            .unwrap();
        t.put_tensor("head", DType::F32, &[4 * 1024], &trained)
            .unwrap();
        let info = t.commit().unwrap();
        written.push((info.bytes_written, info.bytes_deduplicated));
    }
    assert_eq!(written[0], (80 * 1024, 0));
    assert_eq!(written[1], (16 * 1024, 64 * 1024));
    assert_eq!(written[2], (16 * 1024, 64 * 1024));
    drop(s);
    let s = Store::open(dir.path(), small_chunks()).unwrap();
    for ck in s.list() {
        assert_eq!(
            s.checkpoint(Selector::Id(ck.id))
                .unwrap()
                .tensor("embed")
                .unwrap()
                .data,
            frozen
        );
    }
}

#[test]
fn delete_frees_segments_only_when_unreferenced() {
    let dir = tempfile::tempdir().unwrap();
    let shared = bytes(3, 8192);
    let mut s = Store::open(dir.path(), small_chunks()).unwrap();
    for step in 0..3u64 {
        let mut t = s.begin(step).unwrap();
        t.put_tensor("shared", DType::U8, &[8192], &shared).unwrap();
        t.put_tensor("own", DType::U8, &[4096], &bytes(50 + step, 4096))
            .unwrap();
        t.commit().unwrap();
    }
    // Checkpoint 1's segment holds `shared`, which 2 and 3 reference: it must survive.
    let d = s.delete(1).unwrap();
    assert!(d.segments_freed.is_empty());
    let d = s.delete(2).unwrap();
    assert_eq!(d.segments_freed.len(), 1);
    let s3 = s.checkpoint(Selector::Id(3)).unwrap();
    assert_eq!(s3.tensor("shared").unwrap().data, shared);
    drop(s3);
    drop(s);
    let s = Store::open(dir.path(), small_chunks()).unwrap();
    assert_eq!(s.list().len(), 1);
    assert!(s.recovery_report().orphan_segments.is_empty());
    s.verify(3).unwrap();
}

#[test]
fn wal_compaction_keeps_live_state() {
    let dir = tempfile::tempdir().unwrap();
    let opts = || Options {
        chunk_size: 4096,
        wal_compact_min_bytes: 0,
        ..Default::default()
    };
    let mut s = Store::open(dir.path(), opts()).unwrap();
    for step in 0..20u64 {
        let mut t = s.begin(step).unwrap();
        t.put_tensor("w", DType::U8, &[5000], &bytes(step, 5000))
            .unwrap();
        t.commit().unwrap();
        if step >= 3 {
            s.delete(step - 3 + 1).unwrap();
        }
    }
    s.compact_wal().unwrap();
    let before = s.list();
    drop(s);
    let s = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(s.list(), before);
    let wal_files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".wal"))
        .collect();
    assert_eq!(wal_files.len(), 1, "{wal_files:?}");
    for ck in &before {
        assert_eq!(
            s.checkpoint(Selector::Id(ck.id))
                .unwrap()
                .tensor("w")
                .unwrap()
                .data,
            bytes(ck.step, 5000)
        );
    }
    // Ids keep increasing after compaction.
    let mut s = s;
    let mut t = s.begin(99).unwrap();
    t.put_tensor("w", DType::U8, &[1], &[1]).unwrap();
    assert_eq!(t.commit().unwrap().checkpoint.id, 21);
}
