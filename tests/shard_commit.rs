//! Multi-process checkpoints (`ShardWriter` + `Store::commit_external`, the engine side of
//! the `torch.distributed.checkpoint` writer): shards write their own segments in reserved id
//! ranges and one writer commits them. Invariants: a committed multi-shard checkpoint reads
//! back bit-exact and verifies; nothing a failed or abandoned shard wrote is ever visible, and
//! recovery (or `abort_external`) removes its files; `commit_external` refuses segments it did
//! not reserve, missing or short files and bad headers; a power cut at any sync of the
//! sequence leaves either the whole checkpoint or none of it (docs/GUARANTEES.md).

mod support;

use ckptstore::io::{CrashMode, Fault, OpKind, SimIo};
use ckptstore::{
    DType, Error, MetaValue, Options, Selector, ShardFragment, ShardOptions, ShardWriter, Store,
};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use support::{data, segment_files, CHUNK};

fn shard_opts(store: &Store) -> ShardOptions {
    ShardOptions {
        chunk_size: store.options().chunk_size,
        segment_max_bytes: store.options().segment_max_bytes,
        io: store.options().io.clone(),
    }
}

fn small_opts(io: Option<SimIo>) -> Options {
    let mut o = Options {
        chunk_size: CHUNK,
        segment_max_bytes: 1 << 20,
        ..Default::default()
    };
    if let Some(sim) = io {
        o.io = Arc::new(sim);
    }
    o
}

/// Rank `r`'s tensors: a row shard of a 2-D f32 tensor, a rank-local one bigger than a
/// segment (so it spans two segment files), and an empty one.
fn rank_tensors(r: u64) -> Vec<(String, DType, Vec<u64>, Vec<u8>)> {
    vec![
        (
            format!("w@{}", r * 4),
            DType::F32,
            vec![4, 300],
            data(r, 4 * 300 * 4),
        ),
        (
            format!("big.{r}"),
            DType::U8,
            vec![(1 << 20) + 3 * CHUNK as u64],
            data(100 + r, (1 << 20) + 3 * CHUNK),
        ),
        (format!("empty.{r}"), DType::F16, vec![0, 3], Vec::new()),
    ]
}

fn write_shard(dir: &Path, ids: std::ops::Range<u64>, o: ShardOptions, r: u64) -> ShardFragment {
    let mut w = ShardWriter::new(dir, ids, o).unwrap();
    for (name, dt, shape, bytes) in rank_tensors(r) {
        w.put_tensor(&name, dt, &shape, &bytes).unwrap();
    }
    w.put_blob(&format!("meta.{r}"), &data(200 + r, 77))
        .unwrap();
    w.finish().unwrap()
}

fn assert_rank_data(store: &Store, id: u64, ranks: u64) {
    let ck = store.checkpoint(Selector::Id(id)).unwrap();
    for r in 0..ranks {
        for (name, dt, shape, bytes) in rank_tensors(r) {
            let t = ck.tensor(&name).unwrap();
            assert_eq!((t.dtype, t.shape.clone()), (dt, shape), "{name}");
            assert!(t.data == bytes[..], "{name} differs");
        }
        assert_eq!(ck.blob(&format!("meta.{r}")).unwrap(), data(200 + r, 77));
    }
    store.verify(id).unwrap();
}

#[test]
fn shards_commit_as_one_checkpoint_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), small_opts(None)).unwrap();
    support::commit(&mut store, 1, &[("x", &data(9, 5000))]);
    let ranges = store.reserve_segment_ids(3, 16).unwrap();
    assert_eq!(ranges.len(), 3);
    assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
    // Shards run on their own (here: threads, in DCP: processes), without the store.
    let frags: Vec<ShardFragment> = std::thread::scope(|s| {
        let hs: Vec<_> = ranges
            .iter()
            .enumerate()
            .map(|(r, ids)| {
                let (o, d, ids) = (shard_opts(&store), dir.path(), ids.clone());
                s.spawn(move || write_shard(d, ids, o, r as u64))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // The fragment crosses a process boundary as bytes.
    let frags: Vec<ShardFragment> = frags
        .iter()
        .map(|f| ShardFragment::decode(&f.encode()).unwrap())
        .collect();
    assert!(frags.iter().all(|f| f.segments().count() == 2));
    let meta = BTreeMap::from([("dcp".to_string(), MetaValue::Int(1))]);
    let info = store.commit_external(7, 2, meta, &frags).unwrap();
    assert_eq!(
        (info.step, info.epoch, info.tensors, info.blobs),
        (7, 2, 9, 3)
    );
    assert_rank_data(&store, info.id, 3);
    // An ordinary commit afterwards takes an id past every reservation.
    support::commit(&mut store, 8, &[("y", &data(10, 100))]);
    drop(store);

    let store = Store::open(dir.path(), small_opts(None)).unwrap();
    assert!(store.recovery_report().orphan_segments.is_empty());
    let ids: Vec<u64> = store.list().iter().map(|c| c.step).collect();
    assert_eq!(ids, vec![1, 7, 8]);
    assert_rank_data(&store, info.id, 3);
}

#[test]
fn a_failed_shard_commits_nothing_and_recovery_removes_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), small_opts(None)).unwrap();
    support::commit(&mut store, 1, &[("x", &data(9, 5000))]);
    let before = segment_files(dir.path());
    let ranges = store.reserve_segment_ids(2, 16).unwrap();
    // Rank 0 finishes; rank 1 dies part-way (its writer is forgotten, files stay behind).
    let _f0 = write_shard(dir.path(), ranges[0].clone(), shard_opts(&store), 0);
    let mut w1 = ShardWriter::new(dir.path(), ranges[1].clone(), shard_opts(&store)).unwrap();
    w1.put_tensor("big.1", DType::U8, &[3 * CHUNK as u64], &data(5, 3 * CHUNK))
        .unwrap();
    std::mem::forget(w1);
    assert!(segment_files(dir.path()).len() > before.len());
    // The coordinator never commits; the process ends.
    drop(store);

    let store = Store::open(dir.path(), small_opts(None)).unwrap();
    assert_eq!(store.recovery_report().orphan_segments.len(), 3);
    assert_eq!(store.latest().unwrap().step, 1);
    assert_eq!(segment_files(dir.path()), before);
    support::assert_holds(&store, 1, &[("x", &data(9, 5000))]);
}

#[test]
fn abort_external_removes_what_shards_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), small_opts(None)).unwrap();
    support::commit(&mut store, 1, &[("x", &data(9, 5000))]);
    let before = segment_files(dir.path());
    let ranges = store.reserve_segment_ids(2, 16).unwrap();
    let f0 = write_shard(dir.path(), ranges[0].clone(), shard_opts(&store), 0);
    assert_eq!(store.abort_external().unwrap().len(), 2);
    assert_eq!(segment_files(dir.path()), before);
    // The reservation is over: its fragment can no longer be committed.
    let e = store
        .commit_external(2, 0, BTreeMap::new(), &[f0])
        .unwrap_err();
    assert!(
        e.to_string().contains("not in a range this store reserved"),
        "{e}"
    );
    // Its ids are never reused by this store, and it keeps working.
    let c = support::commit(&mut store, 3, &[("z", &data(1, 10))]);
    assert_eq!(store.latest().unwrap().id, c.checkpoint.id);
}

#[test]
fn commit_external_refuses_bad_fragments() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), small_opts(None)).unwrap();
    let ranges = store.reserve_segment_ids(2, 16).unwrap();
    let o = shard_opts(&store);
    let seg_dir = dir.path().join("segments");

    // A segment outside every reservation (a shard given the wrong range).
    let outside = ranges[1].end + 100..ranges[1].end + 116;
    let f = write_shard(dir.path(), outside, o.clone(), 0);
    let e = store
        .commit_external(1, 0, BTreeMap::new(), &[f])
        .unwrap_err();
    assert!(
        e.to_string().contains("not in a range this store reserved"),
        "{e}"
    );

    // Duplicate tensor names across shards.
    let mut a =
        ShardWriter::new(dir.path(), ranges[0].start..ranges[0].start + 1, o.clone()).unwrap();
    a.put_tensor("same", DType::U8, &[4], &[1, 2, 3, 4])
        .unwrap();
    let mut b =
        ShardWriter::new(dir.path(), ranges[1].start..ranges[1].start + 1, o.clone()).unwrap();
    b.put_tensor("same", DType::U8, &[4], &[5, 6, 7, 8])
        .unwrap();
    let (fa, fb) = (a.finish().unwrap(), b.finish().unwrap());
    let e = store
        .commit_external(1, 0, BTreeMap::new(), &[fa.clone(), fb.clone()])
        .unwrap_err();
    assert!(e.to_string().contains("duplicate tensor"), "{e}");

    // A segment file that is short, then one with a damaged header, then one missing.
    let (id, len) = fb.segments().next().unwrap();
    let path = seg_dir.join(format!("{id:08}.seg"));
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 1).unwrap();
    let e = store
        .commit_external(1, 0, BTreeMap::new(), std::slice::from_ref(&fb))
        .unwrap_err();
    assert!(matches!(e, Error::SegmentMissing { .. }), "{e}");
    f.set_len(len).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"X", 0).unwrap();
    let e = store
        .commit_external(1, 0, BTreeMap::new(), std::slice::from_ref(&fb))
        .unwrap_err();
    assert!(matches!(e, Error::BadHeader { .. }), "{e}");
    std::fs::remove_file(&path).unwrap();
    let e = store
        .commit_external(1, 0, BTreeMap::new(), &[fb])
        .unwrap_err();
    assert!(matches!(e, Error::SegmentMissing { .. }), "{e}");

    // The good fragment alone still commits; nothing was committed before.
    assert!(store.list().is_empty());
    let info = store.commit_external(1, 0, BTreeMap::new(), &[fa]).unwrap();
    assert_eq!(
        store
            .checkpoint(Selector::Id(info.id))
            .unwrap()
            .tensor("same")
            .unwrap()
            .data,
        [1, 2, 3, 4]
    );

    // A shard that runs out of its reserved ids says so.
    let ranges = store.reserve_segment_ids(1, 1).unwrap();
    let mut w = ShardWriter::new(dir.path(), ranges[0].clone(), o).unwrap();
    let e = w
        .put_tensor("huge", DType::U8, &[(2 << 20) as u64], &data(3, 2 << 20))
        .unwrap_err();
    assert!(e.to_string().contains("used up"), "{e}");
}

/// Runs: commit step 1; reserve; two shards; commit_external (step 2). Returns whether the
/// external commit was acknowledged (`Ok`).
fn workload(sim: &SimIo) -> bool {
    let run = || -> ckptstore::Result<bool> {
        let mut store = Store::open("/s", small_opts(Some(sim.clone())))?;
        let mut t = store.begin(1)?;
        t.put_tensor("x", DType::U8, &[5000], &data(9, 5000))?;
        t.commit()?;
        let ranges = store.reserve_segment_ids(2, 8)?;
        let mut frags = Vec::new();
        for (r, ids) in ranges.into_iter().enumerate() {
            let mut w = ShardWriter::new("/s", ids, shard_opts(&store))?;
            for (name, dt, shape, bytes) in rank_tensors(r as u64) {
                w.put_tensor(&name, dt, &shape, &bytes)?;
            }
            w.put_blob(&format!("meta.{r}"), &data(200 + r as u64, 77))?;
            frags.push(w.finish()?);
        }
        store.commit_external(2, 0, BTreeMap::new(), &frags)?;
        Ok(true)
    };
    run().unwrap_or(false)
}

/// A power cut at every sync of the sequence, in every crash mode: the store opens, holds
/// step 1 always, holds step 2 whole (bit-exact, verifying) if it was acknowledged and
/// either whole or absent otherwise, and keeps no orphan segment file.
#[test]
fn power_cut_at_every_sync_of_a_multi_shard_commit() {
    let total = {
        let sim = SimIo::new();
        assert!(workload(&sim));
        sim.sync_count()
    };
    let mut images = 0;
    for index in 1..=total + 1 {
        let sim = SimIo::new();
        sim.crash_at_sync(index);
        let acked = workload(&sim);
        for (k, mode) in CrashMode::ALL.into_iter().enumerate() {
            let img = sim.crash_image(mode, index * 31 + k as u64);
            let ctx = format!("crash at sync {index}/{total}, mode {mode}");
            let store = match Store::open("/s", small_opts(Some(img.clone()))) {
                Ok(s) => s,
                // Before the first commit's record was durable the store may be empty or not
                // even initialised; both are fine, nothing was acknowledged.
                Err(e) => panic!("{ctx}: reopen failed: {e}"),
            };
            let steps: Vec<u64> = store.list().iter().map(|c| c.step).collect();
            if acked {
                assert_eq!(steps, vec![1, 2], "{ctx}");
            }
            assert!(steps.iter().all(|s| [1, 2].contains(s)), "{ctx}: {steps:?}");
            if let Some(c) = store.list().iter().find(|c| c.step == 2) {
                assert_rank_data(&store, c.id, 2);
            }
            if let Some(c) = store.list().iter().find(|c| c.step == 1) {
                store.verify(c.id).unwrap();
            }
            let live = store.stats().segments;
            let on_disk = img.list_dir(Path::new("/s/segments")).unwrap_or_default();
            assert_eq!(
                on_disk.len(),
                live,
                "{ctx}: orphan segment files {on_disk:?}"
            );
            images += 1;
        }
    }
    eprintln!("power_cut_at_every_sync_of_a_multi_shard_commit: {images} crash images checked");
}

/// A failed WAL fdatasync in `commit_external` poisons the store, and the abort that follows
/// removes nothing: the record may be on disk, and then its segments must be there. After a
/// reopen the checkpoint is either whole (and verifies) or absent with no orphan left.
#[test]
fn failed_commit_sync_poisons_and_abort_keeps_the_segments() {
    let sim = SimIo::new();
    let mut store = Store::open("/s", small_opts(Some(sim.clone()))).unwrap();
    let ranges = store.reserve_segment_ids(2, 8).unwrap();
    let frags: Vec<ShardFragment> = ranges
        .into_iter()
        .enumerate()
        .map(|(r, ids)| write_shard(Path::new("/s"), ids, shard_opts(&store), r as u64))
        .collect();
    let before = sim.list_dir(Path::new("/s/segments")).unwrap();
    // The directory fsync is the first sync of the commit, the commit trailer's fdatasync
    // the second, the WAL's fdatasync the third.
    sim.inject(Fault::Eio {
        kind: OpKind::Sync,
        nth: 3,
    });
    let e = store
        .commit_external(2, 0, BTreeMap::new(), &frags)
        .unwrap_err();
    assert!(store.poisoned().is_some(), "{e}");
    assert!(store.abort_external().unwrap().is_empty());
    assert_eq!(sim.list_dir(Path::new("/s/segments")).unwrap(), before);
    drop(store);
    sim.clear_faults();
    let store = Store::open("/s", small_opts(Some(sim.clone()))).unwrap();
    match store.list().as_slice() {
        [] => assert!(sim.list_dir(Path::new("/s/segments")).unwrap().is_empty()),
        [c] => assert_rank_data(&store, c.id, 2),
        more => panic!("{more:?}"),
    }
}

/// A failed fdatasync of the commit trailer (docs/FORMAT.md) fails the commit before its
/// commit point: nothing is committed, and the store is poisoned like after any failed sync.
/// After a reopen nothing was committed and no orphan is left in `segments/`.
#[test]
fn failed_trailer_sync_fails_the_commit_before_its_commit_point() {
    let sim = SimIo::new();
    let mut store = Store::open("/s", small_opts(Some(sim.clone()))).unwrap();
    let ranges = store.reserve_segment_ids(2, 8).unwrap();
    let frags: Vec<ShardFragment> = ranges
        .into_iter()
        .enumerate()
        .map(|(r, ids)| write_shard(Path::new("/s"), ids, shard_opts(&store), r as u64))
        .collect();
    sim.inject(Fault::Eio {
        kind: OpKind::Sync,
        nth: 2,
    });
    let e = store
        .commit_external(2, 0, BTreeMap::new(), &frags)
        .unwrap_err();
    assert!(e.to_string().contains("fdatasync"), "{e}");
    assert!(store.poisoned().is_some(), "{e}");
    assert!(store.list().is_empty());
    sim.clear_faults();
    drop(store);
    let store = Store::open("/s", small_opts(Some(sim.clone()))).unwrap();
    assert!(store.list().is_empty());
    assert!(sim.list_dir(Path::new("/s/segments")).unwrap().is_empty());
}
