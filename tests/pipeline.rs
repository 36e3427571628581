//! The asynchronous write pipeline: several saves in flight commit in order and bit-exact;
//! the caller may change its tensors once a save is submitted; memory stays within the
//! staging budget; errors reach every handle and no staging buffer leaks.

mod support;

use ckptstore::io::MemIo;
use ckptstore::{DType, Error, Options, Pipeline, PipelineOptions, Selector, Store};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use support::{assert_holds, data, opts, CHUNK};

const DIR: &str = "/ckpts";

fn small_pool(buffers: usize) -> PipelineOptions {
    PipelineOptions {
        budget_bytes: buffers * CHUNK,
        hash_workers: 2,
    }
}

fn mem_store(mem: &MemIo) -> Store {
    Store::open(
        DIR,
        Options {
            io: Arc::new(mem.clone()),
            ..opts()
        },
    )
    .unwrap()
}

fn tensors(step: u64) -> Vec<(String, Vec<u8>)> {
    vec![
        ("w".into(), data(step, 7 * CHUNK + 123)),
        ("b".into(), data(500 + step, 17)),
        ("empty".into(), Vec::new()),
        ("frozen".into(), data(9999, 3 * CHUNK)),
    ]
}

fn refs(t: &[(String, Vec<u8>)]) -> Vec<(&str, &[u8])> {
    t.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect()
}

fn submit(p: &mut Pipeline, step: u64, t: &[(String, Vec<u8>)]) -> ckptstore::SaveHandle {
    try_submit(p, step, t).unwrap()
}

/// Begins save `step` and stages `t`. `Err` when the save fails while it is being staged:
/// when the I/O thread has already failed it (for an earlier save's failure, say), the
/// `put_tensor` or `submit` staging it returns that error instead of its handle — which of
/// the two depends on thread timing (docs/GUARANTEES.md).
fn try_submit(
    p: &mut Pipeline,
    step: u64,
    t: &[(String, Vec<u8>)],
) -> ckptstore::Result<ckptstore::SaveHandle> {
    let mut s = p.begin(step)?;
    s.set_epoch(step / 10);
    s.set_metadata("lr", 0.5f64);
    for (name, bytes) in t {
        s.put_tensor(name, DType::U8, &[bytes.len() as u64], bytes)?;
    }
    s.submit()
}

/// A save's outcome, wherever it surfaced: from its staging or from its handle.
fn outcome(
    staged: ckptstore::Result<ckptstore::SaveHandle>,
) -> ckptstore::Result<ckptstore::SaveReport> {
    staged.and_then(|h| h.wait())
}

#[test]
fn saves_in_flight_commit_in_order_and_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    // A pool of 3 chunks for checkpoints of 11 chunks: staging must wait for writes.
    let mut p = Pipeline::new(Store::open(dir.path(), opts()).unwrap(), small_pool(3)).unwrap();
    let handles: Vec<_> = (1..=5).map(|s| submit(&mut p, s, &tensors(s))).collect();
    let reports: Vec<_> = handles.into_iter().map(|h| h.wait().unwrap()).collect();
    for (i, r) in reports.iter().enumerate() {
        assert_eq!(r.commit.checkpoint.step, i as u64 + 1);
        assert_eq!(r.bytes_staged, 10 * CHUNK as u64 + 123 + 17);
        assert!(r.stall <= r.time_to_durable);
    }
    let ids: Vec<u64> = reports.iter().map(|r| r.commit.checkpoint.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "commit order {ids:?}");
    // The frozen tensor is written once, then referenced.
    assert_eq!(reports[0].commit.chunks_deduplicated, 0);
    assert_eq!(reports[1].commit.chunks_deduplicated, 3);
    assert_eq!(p.pool().in_use(), 0, "a staging buffer leaked");
    drop(p.close());
    let store = Store::open(dir.path(), opts()).unwrap();
    for (i, id) in ids.iter().enumerate() {
        let step = i as u64 + 1;
        assert_holds(&store, *id, &refs(&tensors(step)));
        let info = store.info(Selector::Id(*id)).unwrap();
        assert_eq!(info.epoch, step / 10);
    }
}

#[test]
fn the_caller_may_change_its_tensor_once_put_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Pipeline::new(Store::open(dir.path(), opts()).unwrap(), small_pool(64)).unwrap();
    let mut w = data(1, 20 * CHUNK);
    let original = w.clone();
    let mut s = p.begin(1).unwrap();
    s.put_tensor("w", DType::U8, &[w.len() as u64], &w).unwrap();
    w.iter_mut().for_each(|b| *b = !*b); // the trainer's next step
    s.put_blob("rng", b"state").unwrap();
    let h = s.submit().unwrap();
    let r = h.wait().unwrap();
    let store = p.store();
    let ck = store
        .checkpoint(Selector::Id(r.commit.checkpoint.id))
        .unwrap();
    assert!(ck.tensor("w").unwrap().data == original);
    assert_eq!(ck.blob("rng").unwrap(), b"state");
}

#[test]
fn a_budget_smaller_than_one_chunk_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    let e = Pipeline::new(
        store,
        PipelineOptions {
            budget_bytes: CHUNK - 1,
            hash_workers: 1,
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("smaller than one chunk"), "{e}");
}

#[test]
fn bad_tensors_are_refused_when_put_and_nothing_is_committed() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Pipeline::new(Store::open(dir.path(), opts()).unwrap(), small_pool(4)).unwrap();
    let mut s = p.begin(1).unwrap();
    let e = s.put_tensor("w", DType::F32, &[3], &[0u8; 11]).unwrap_err();
    assert!(e.to_string().contains("needs 12"), "{e}");
    s.put_tensor("w", DType::F32, &[3], &[0u8; 12]).unwrap();
    let e = s.put_tensor("w", DType::F32, &[3], &[0u8; 12]).unwrap_err();
    assert!(e.to_string().contains("duplicate"), "{e}");
    drop(s); // aborted
    assert!(p.store().list().is_empty());
    // The pipeline still works after an aborted save.
    let h = submit(&mut p, 2, &tensors(2));
    assert_eq!(h.wait().unwrap().commit.checkpoint.step, 2);
    assert_eq!(p.store().list().len(), 1);
    assert_eq!(p.pool().in_use(), 0);
}

#[test]
fn a_failed_fsync_fails_the_save_and_poisons_later_ones_with_the_reason() {
    let mem = MemIo::new();
    let mut p = Pipeline::new(mem_store(&mem), small_pool(4)).unwrap();
    let first = submit(&mut p, 1, &tensors(1)).wait().unwrap();
    mem.faults.fail_sync_countdown.store(1, SeqCst);
    let e = submit(&mut p, 2, &tensors(2)).wait().unwrap_err();
    assert!(e.to_string().contains("fdatasync"), "{e}");
    let e = p.begin(3).err().expect("a poisoned store refuses saves");
    assert!(matches!(e, Error::Poisoned { .. }), "{e}");
    assert!(e.to_string().contains("fdatasync"), "{e}");
    assert_eq!(p.pool().in_use(), 0);
    mem.faults.fail_sync_countdown.store(0, SeqCst);
    drop(p.close());
    let store = mem_store(&mem);
    assert_eq!(store.latest().unwrap().id, first.commit.checkpoint.id);
    assert_holds(&store, first.commit.checkpoint.id, &refs(&tensors(1)));
}

/// Regression (found by tests/crash_sweep_async.rs): a failed fsync in a delete made through
/// `Pipeline::store()` poisoned the store, but `begin` (which reads the poison reason the I/O
/// thread last saw) still accepted the next save. Now the store's guard records it on drop.
#[test]
fn a_failed_fsync_in_a_delete_through_store_makes_the_next_begin_refuse() {
    let mem = MemIo::new();
    let mut p = Pipeline::new(mem_store(&mem), small_pool(4)).unwrap();
    let first = submit(&mut p, 1, &tensors(1)).wait().unwrap();
    let second = submit(&mut p, 2, &tensors(2)).wait().unwrap();
    mem.faults.fail_sync_countdown.store(1, SeqCst);
    let e = p.store().delete(first.commit.checkpoint.id).unwrap_err();
    assert!(e.to_string().contains("fdatasync"), "{e}");
    mem.faults.fail_sync_countdown.store(0, SeqCst);
    let e = p.begin(3).err().expect("a poisoned store refuses saves");
    assert!(matches!(e, Error::Poisoned { .. }), "{e}");
    assert!(e.to_string().contains("fdatasync"), "{e}");
    assert_eq!(p.pool().in_use(), 0);
    drop(p.close());
    let store = mem_store(&mem);
    assert_holds(&store, second.commit.checkpoint.id, &refs(&tensors(2)));
}

#[test]
fn a_full_disk_with_three_saves_in_flight_fails_each_and_keeps_earlier_checkpoints() {
    let mem = MemIo::new();
    // A pool big enough that all three saves are staged (snapshotted) before the first write.
    let mut p = Pipeline::new(mem_store(&mem), small_pool(40)).unwrap();
    let first = submit(&mut p, 1, &tensors(1)).wait().unwrap();
    // Room for a little more, not for three more checkpoints of fresh data.
    mem.faults
        .enospc_after_bytes
        .store(5 * CHUNK as i64, SeqCst);
    // Each fails for the full disk (save 2 by itself, 3 and 4 naming save 2's failure),
    // through its handle or, when the I/O thread failed it while it was still being staged,
    // through its staging.
    let staged: Vec<_> = (2..=4)
        .map(|s| try_submit(&mut p, s, &tensors(s)))
        .collect();
    for (i, r) in staged.into_iter().enumerate() {
        let e = outcome(r).expect_err("the disk is full");
        assert!(e.to_string().contains("space"), "save {i}: {e}");
    }
    assert_eq!(p.pool().in_use(), 0, "a staging buffer leaked");
    mem.faults.enospc_after_bytes.store(0, SeqCst);
    // Space is back: the pipeline saves again.
    let again = submit(&mut p, 5, &tensors(5)).wait().unwrap();
    drop(p.close());
    let store = mem_store(&mem);
    let ids: Vec<u64> = store.list().iter().map(|c| c.id).collect();
    assert_eq!(
        ids,
        vec![first.commit.checkpoint.id, again.commit.checkpoint.id]
    );
    assert_holds(&store, first.commit.checkpoint.id, &refs(&tensors(1)));
    assert_holds(&store, again.commit.checkpoint.id, &refs(&tensors(5)));
}

#[test]
fn close_waits_for_saves_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Pipeline::new(Store::open(dir.path(), opts()).unwrap(), small_pool(2)).unwrap();
    let handles: Vec<_> = (1..=3).map(|s| submit(&mut p, s, &tensors(s))).collect();
    let store = p.close();
    assert_eq!(store.list().len(), 3);
    for h in handles {
        assert!(h.is_done());
        h.wait().unwrap();
    }
}

/// Opened once by the test; until then the fences of a [`FailingCopy`] wait.
#[derive(Clone, Default)]
struct Latch(Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>);

impl Latch {
    fn open(&self) {
        *self.0 .0.lock().unwrap() = true;
        self.0 .1.notify_all();
    }

    fn wait(&self) {
        let mut open = self.0 .0.lock().unwrap();
        while !*open {
            open = self.0 .1.wait(open).unwrap();
        }
    }
}

/// A tensor source whose copy fails when waited on (a device DMA error), once `fail` is
/// opened: the save fails in the pipeline's threads, after submit, without poisoning the store.
struct FailingCopy {
    len: usize,
    fail: Latch,
}

impl ckptstore::device::Source for FailingCopy {
    fn len(&self) -> u64 {
        self.len as u64
    }
    fn stage(
        &self,
        _offset: u64,
        len: usize,
        buf: &mut ckptstore::pipeline::StagingBuf,
    ) -> ckptstore::Result<ckptstore::device::Fence> {
        buf.fill(len);
        let fail = self.fail.clone();
        Ok(ckptstore::device::Fence::Pending(Box::new(move || {
            fail.wait();
            Err(Error::Device("injected copy failure".into()))
        })))
    }
}

/// Stages and submits a save whose copy fails, and only then lets the copy fail: the failure
/// reaches its handle. (A copy failing at once could beat `submit` to the I/O thread, which
/// would then fail the save while it is still being staged, and `submit` would return the
/// error instead of a handle.)
fn submit_failing(p: &mut Pipeline, step: u64) -> ckptstore::SaveHandle {
    let fail = Latch::default();
    let src = FailingCopy {
        len: 3 * CHUNK,
        fail: fail.clone(),
    };
    let mut s = p.begin(step).unwrap();
    s.put_tensor_from("w", DType::U8, &[3 * CHUNK as u64], &src)
        .unwrap();
    let h = s.submit().unwrap();
    fail.open();
    h
}

/// Issue 14, item 5: "saves form a prefix" held only for crashes: when save N failed without
/// poisoning the store, save N+1, already begun, still committed — a checkpoint after a hole.
/// Now it fails too, naming N's failure; saves begun after the caller has seen it run again.
#[test]
fn a_non_poisoning_failure_of_save_n_keeps_save_n_plus_1_from_committing() {
    let mem = MemIo::new();
    let mut p = Pipeline::new(mem_store(&mem), small_pool(40)).unwrap();
    let first = submit(&mut p, 1, &tensors(1)).wait().unwrap();
    let h2 = submit_failing(&mut p, 2);
    // Save 3 fails naming save 2's failure, through its handle or (the I/O thread having
    // refused it first) through its staging.
    match outcome(try_submit(&mut p, 3, &tensors(3))) {
        Err(Error::EarlierSaveFailed { step, cause }) => {
            assert_eq!(step, 2);
            assert!(cause.contains("injected copy failure"), "{cause}");
        }
        other => panic!("save 3 must not commit after the failed save 2: {other:?}"),
    }
    let e = h2.wait().expect_err("the copy failed");
    assert!(e.to_string().contains("injected copy failure"), "{e}");
    assert!(p.store().poisoned().is_none());
    // Seen: the next save commits.
    let fourth = submit(&mut p, 4, &tensors(4)).wait().unwrap();
    assert_eq!(p.pool().in_use(), 0, "a staging buffer leaked");
    let store = p.close();
    let ids: Vec<u64> = store.list().iter().map(|c| c.id).collect();
    assert_eq!(
        ids,
        vec![first.commit.checkpoint.id, fourth.commit.checkpoint.id]
    );
    assert_holds(&store, fourth.commit.checkpoint.id, &refs(&tensors(4)));
}

/// Regression (ciguard, CI timing): the tests above took every save's failure from its
/// handle, but when the I/O thread fails save N while save N+1 is still being staged, N+1's
/// `put_tensor` returns the failure (`EarlierSaveFailed`) and `submit` is never reached —
/// which of the two happens depends on thread timing. Forced here: save 3 is staged only
/// after save 2 has failed, so the I/O thread refuses it during staging. The staging error
/// names save 2's failure, and the caller has then seen it: the next save commits without
/// save 2's handle having been read (before the fix it failed too, for the same failure).
#[test]
fn regression_a_save_refused_while_staged_names_the_failure_and_counts_as_seen() {
    let mem = MemIo::new();
    let mut p = Pipeline::new(mem_store(&mem), small_pool(40)).unwrap();
    let first = submit(&mut p, 1, &tensors(1)).wait().unwrap();
    let h2 = submit_failing(&mut p, 2);
    let mut third = p.begin(3).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !h2.is_done() {
        assert!(std::time::Instant::now() < deadline, "save 2 never failed");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // The I/O thread takes save 3 right after save 2 failed and refuses it; staging sees that
    // as soon as it has happened.
    let mut k = 0;
    let e = loop {
        match third.put_tensor(&format!("t{k}"), DType::U8, &[4], &[1, 2, 3, 4]) {
            Ok(()) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "save 3 was never refused"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
                k += 1;
            }
            Err(e) => break e,
        }
    };
    match &e {
        Error::EarlierSaveFailed { step: 2, cause } => {
            assert!(cause.contains("injected copy failure"), "{cause}")
        }
        other => panic!("save 3's staging must name save 2's failure: {other:?}"),
    }
    drop(third);
    // Seen through save 3's staging: save 4 commits, save 2's handle still unread.
    let fourth = submit(&mut p, 4, &tensors(4)).wait().unwrap();
    let e = h2.wait().expect_err("the copy failed");
    assert!(e.to_string().contains("injected copy failure"), "{e}");
    assert_eq!(p.pool().in_use(), 0, "a staging buffer leaked");
    let store = p.close();
    let ids: Vec<u64> = store.list().iter().map(|c| c.id).collect();
    assert_eq!(
        ids,
        vec![first.commit.checkpoint.id, fourth.commit.checkpoint.id]
    );
}

/// Issue 14, item 5: the error of a failed save whose handle was dropped unread was lost.
/// The next `begin` reports it, once.
#[test]
fn a_dropped_handles_failure_is_reported_by_the_next_begin() {
    let mem = MemIo::new();
    let mut p = Pipeline::new(mem_store(&mem), small_pool(40)).unwrap();
    let h = submit_failing(&mut p, 7);
    while !h.is_done() {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    drop(h);
    match p.begin(8) {
        Err(Error::EarlierSaveFailed { step, cause }) => {
            assert_eq!(step, 7);
            assert!(cause.contains("injected copy failure"), "{cause}");
            assert!(cause.contains("dropped unread"), "{cause}");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("the dropped handle's failure was lost"),
    }
    // Reported once: the pipeline saves again.
    let ok = submit(&mut p, 8, &tensors(8)).wait().unwrap();
    // A dropped handle of a save that succeeded reports nothing.
    drop(submit(&mut p, 9, &tensors(9)));
    let last = submit(&mut p, 10, &tensors(10)).wait().unwrap();
    let store = p.close();
    assert_eq!(store.list().len(), 3);
    assert_holds(&store, ok.commit.checkpoint.id, &refs(&tensors(8)));
    assert_holds(&store, last.commit.checkpoint.id, &refs(&tensors(10)));
}

/// The pipeline's hash and I/O threads run nicer than the caller, so on a machine with few
/// cores the caller's copy (the stall) gets the cores first (issue 13).
#[cfg(target_os = "linux")]
#[test]
fn pipeline_threads_run_nicer_than_the_caller() {
    let mem = MemIo::new();
    let p = Pipeline::new(mem_store(&mem), small_pool(4)).unwrap();
    // Field 19 of /proc/self/task/TID/stat is the nice value (after the ")" of the name).
    let nice_of = |stat: &str| -> i32 {
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        rest.split_whitespace().nth(16).unwrap().parse().unwrap()
    };
    let mine = nice_of(&std::fs::read_to_string("/proc/thread-self/stat").unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut seen = Vec::new();
        for e in std::fs::read_dir("/proc/self/task").unwrap() {
            let dir = e.unwrap().path();
            let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if name.starts_with("ckpt-hash") || name.trim() == "ckpt-io" {
                let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
                seen.push((name.trim().to_owned(), nice_of(&stat)));
            }
        }
        // (A caller already at the lowest priority, nice 19, has nothing below it.)
        let all_nicer = seen.len() >= 2 && seen.iter().all(|(_, n)| *n > mine || mine == 19);
        if all_nicer {
            break;
        }
        // The threads lower their priority as they start: give them a moment.
        assert!(
            std::time::Instant::now() < deadline,
            "{seen:?} vs caller {mine}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    drop(p.close());
}

/// A host source that copies slowly and records, at each chunk, how many staging buffers are
/// handed out.
struct SlowSource<'a> {
    bytes: &'a [u8],
    pool: ckptstore::staging::StagingPool,
    in_use: std::sync::Mutex<Vec<usize>>,
}

impl ckptstore::device::Source for SlowSource<'_> {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn stage(
        &self,
        offset: u64,
        len: usize,
        buf: &mut ckptstore::staging::StagingBuf,
    ) -> ckptstore::Result<ckptstore::device::Fence> {
        std::thread::sleep(std::time::Duration::from_millis(5));
        self.in_use.lock().unwrap().push(self.pool.in_use());
        let at = offset as usize;
        buf.fill(len).copy_from_slice(&self.bytes[at..at + len]);
        Ok(ckptstore::device::Fence::Ready)
    }
}

/// Copy first, hash later (issue 13): while the caller copies a tensor into staging buffers,
/// no chunk of it is hashed, so none is written and no buffer returns to the pool (on two
/// cores a hashing worker would take a core from the copy, the caller's stall). Without the
/// gate the first batch's chunks are hashed and written during the slow copies of the next.
#[test]
fn hash_workers_wait_while_the_caller_copies() {
    let mem = MemIo::new();
    let mut p = Pipeline::new(mem_store(&mem), small_pool(32)).unwrap();
    let bytes = data(77, 24 * CHUNK);
    let src = SlowSource {
        bytes: &bytes,
        pool: p.pool().clone(),
        in_use: std::sync::Mutex::new(Vec::new()),
    };
    let mut s = p.begin(1).unwrap();
    s.put_tensor_from("w", DType::U8, &[bytes.len() as u64], &src)
        .unwrap();
    let h = s.submit().unwrap();
    let seen = src.in_use.into_inner().unwrap();
    // Chunks are staged in batches of up to 8 buffers: at the k-th copy, k rounded up to the
    // batch are held, and none was given back.
    let held: Vec<usize> = (0..seen.len()).map(|k| (k / 8 + 1) * 8).collect();
    assert_eq!(seen, held, "buffers returned while the caller was copying");
    let c = h.wait().unwrap();
    let store = p.close();
    assert_holds(&store, c.commit.checkpoint.id, &[("w", &bytes[..])]);
}
