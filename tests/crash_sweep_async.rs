//! Power-loss sweep of the asynchronous write path: a workload that keeps several saves in
//! flight through the `Pipeline` is crashed at every sync call, in every crash mode of
//! `SimIo`, and each crash image is recovered and checked — the power-loss counterpart of
//! a process killed with saves in flight.
//!
//! Invariants checked after each crash and recovery (docs/GUARANTEES.md):
//! (a) the store opens;
//! (b) every acknowledged save (its `SaveHandle::wait()` returned `Ok`) is listed and reads
//!     back bit-exact — tensors, blobs, metadata, step, epoch; an acknowledged delete means
//!     absent; a delete in flight happened wholly or not at all;
//! (c) the saves in flight (begun, not acknowledged) that are listed are the oldest of them,
//!     in submission order: a later save never survives an earlier one that was lost; each
//!     reads back bit-exact and everything listed verifies (nothing torn);
//! (d) no space leaks: every segment file is referenced by a live checkpoint, the only WAL
//!     file is the one `CURRENT` names, no `CURRENT.tmp`;
//! (e) the pipeline saves again after recovery (two saves in flight), and those survive
//!     another power cut and reopen.
//! For a sample of crash points, a crash at every sync of the recovery is recovered too.
//!
//! Determinism: while saves are in flight only the pipeline's I/O thread touches the store
//! (deletes, compactions and reopens run with the pipeline drained), so the sync calls come
//! in the same order on every run and "crash at sync N" names one point of the workload.
//! `CKPT_SWEEP_CASE=N` reruns only crash index N and prints the simulator's trace of it.

#[macro_use]
mod support;

use ckptstore::io::{CrashMode, Fault, OpKind, SimIo};
use ckptstore::{DType, MetaValue, Options, Pipeline, PipelineOptions, SaveHandle};
use ckptstore::{Error, Store};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use support::expect::{check_content, Expected};
use support::{data, CHUNK};

const DIR: &str = "/ckpts";

/// Shape of the workload.
#[derive(Debug, Clone, Copy)]
struct Params {
    saves: u64,
    /// Most saves submitted and not waited for.
    in_flight: usize,
    /// Wait for every save in flight after each step that is a multiple of this, then delete
    /// (keep-last `keep`), compact or reopen.
    drain_every: u64,
    keep: usize,
    /// Explicit `compact_wal()` at the drain after this step.
    compact_at: u64,
    /// Close the pipeline, reopen the store, start a new pipeline at the drain after this step.
    reopen_at: u64,
    /// Staging buffers, in chunks: fewer than a save needs, so staging waits for writes.
    pool_chunks: usize,
    /// Check a crash at every sync of the recovery for every this-many-th crash point.
    recovery_every: u64,
}

/// Three saves in flight, a pool smaller than one save: staging waits for writes.
const CI: Params = Params {
    saves: 16,
    in_flight: 3,
    drain_every: 5,
    keep: 3,
    compact_at: 10,
    reopen_at: 5,
    pool_chunks: 6,
    recovery_every: 1,
};

/// Four saves in flight and a pool that holds them all: every save is snapshotted before
/// the first one is written.
const CI_WIDE: Params = Params {
    saves: 13,
    in_flight: 4,
    drain_every: 8,
    keep: 2,
    compact_at: 8,
    reopen_at: 99,
    pool_chunks: 64,
    recovery_every: 3,
};

fn opts(sim: &SimIo) -> Options {
    Options {
        io: Arc::new(sim.clone()),
        chunk_size: CHUNK,
        segment_max_bytes: 1 << 20,
        // Small, so that automatic compaction happens after a few commits.
        wal_compact_min_bytes: 8 << 10,
        ..Default::default()
    }
}

fn pipeline(store: Store, p: &Params) -> Pipeline {
    Pipeline::new(
        store,
        PipelineOptions {
            budget_bytes: p.pool_chunks * CHUNK,
            hash_workers: 2,
        },
    )
    .expect("a pipeline on a writable store")
}

/// The deterministic checkpoint of `step`: multi-chunk tensors, a frozen tensor and blob
/// (deduplicated against the save committed just before, itself possibly still in flight
/// when this one was staged), a partly changing tensor, an empty one.
fn checkpoint_for(step: u64) -> Expected {
    let mut t = Vec::new();
    let mut tensor = |name: &str, dtype: DType, shape: Vec<u64>, seed: u64| {
        let n = shape.iter().product::<u64>() as usize * dtype.size();
        t.push((name.to_string(), dtype, shape, data(seed, n)));
    };
    tensor("embed.frozen", DType::F32, vec![2, 1100], 7); // 3 chunks, never changes
    tensor("layer.w", DType::BF16, vec![8 + (step * 7) % 40, 64], step);
    tensor("layer.b", DType::F64, vec![8], 1000 + step);
    tensor("empty", DType::F16, vec![0, 4], 0);
    let mut partial = data(8, 2 * CHUNK);
    partial.extend(data(9000 + step / 3, 10));
    t.push((
        "partial".into(),
        DType::U8,
        vec![partial.len() as u64],
        partial,
    ));
    let mut blobs = vec![("optimizer.cfg".to_string(), data(7000 + step, 90))];
    if step.is_multiple_of(2) {
        blobs.push(("tokenizer".into(), data(11, 5000)));
    }
    let metadata = BTreeMap::from([
        ("lr".to_string(), MetaValue::Float(0.1 / step as f64)),
        ("step".to_string(), MetaValue::Int(step as i64)),
        ("rng".to_string(), MetaValue::Bytes(data(step, 16))),
    ]);
    Expected {
        step,
        epoch: step / 10,
        tensors: t,
        blobs,
        metadata,
    }
}

fn submit(p: &mut Pipeline, e: &Expected) -> ckptstore::Result<SaveHandle> {
    let mut s = p.begin(e.step)?;
    s.set_epoch(e.epoch);
    for (k, v) in &e.metadata {
        s.set_metadata(k.clone(), v.clone());
    }
    for (name, dtype, shape, bytes) in &e.tensors {
        s.put_tensor(name, *dtype, shape, bytes)?;
    }
    for (name, bytes) in &e.blobs {
        s.put_blob(name, bytes)?;
    }
    s.submit()
}

/// What the main thread was doing when the workload stopped (besides saves in flight).
#[derive(Debug, Clone, PartialEq)]
enum Op {
    Nothing,
    Open,
    Delete(u64),
    Compact,
}

/// The reference model: what was acknowledged, and what was in flight when the workload
/// stopped.
#[derive(Debug, Clone)]
struct Model {
    acked: BTreeMap<u64, Expected>,
    /// Saves begun and not acknowledged, in submission order.
    pending: Vec<Expected>,
    op: Op,
    /// After a failure: what beginning one more save on the same pipeline gave (the error
    /// as `{:?}`).
    save_after_failure: Option<Result<(), String>>,
}

impl Model {
    fn new() -> Model {
        Model {
            acked: BTreeMap::new(),
            pending: Vec::new(),
            op: Op::Nothing,
            save_after_failure: None,
        }
    }

    fn describe(&self) -> String {
        let steps: Vec<u64> = self.pending.iter().map(|e| e.step).collect();
        format!("saves in flight {steps:?}, main thread {:?}", self.op)
    }
}

/// Waits for the oldest handle; an `Ok` acknowledges the oldest pending save.
fn ack_oldest(handles: &mut VecDeque<SaveHandle>, m: &mut Model) -> ckptstore::Result<u64> {
    let h = handles.pop_front().expect("a save in flight");
    let id = h.wait()?.commit.checkpoint.id;
    let e = m.pending.remove(0);
    m.acked.insert(id, e);
    Ok(id)
}

/// Runs the workload until the first error (the crash), recording in `m`. After an error it
/// still waits for every handle: a save whose handle returns `Ok` was durable when it did.
fn workload(sim: &SimIo, p: &Params, m: &mut Model) -> ckptstore::Result<()> {
    let mut handles = VecDeque::new();
    let mut slot = None;
    let r = run(sim, p, m, &mut handles, &mut slot);
    if r.is_err() {
        while !handles.is_empty() {
            if ack_oldest(&mut handles, m).is_err() {
                // Not acknowledged: it stays pending, in order (every later one fails too).
                continue;
            }
        }
    }
    if let Some(mut pl) = slot.take() {
        if r.is_err() {
            m.save_after_failure = Some(pl.begin(u64::MAX).map(drop).map_err(|e| format!("{e:?}")));
        }
        drop(pl.close());
    }
    r
}

fn run(
    sim: &SimIo,
    p: &Params,
    m: &mut Model,
    handles: &mut VecDeque<SaveHandle>,
    slot: &mut Option<Pipeline>,
) -> ckptstore::Result<()> {
    m.op = Op::Open;
    *slot = Some(pipeline(Store::open(DIR, opts(sim))?, p));
    m.op = Op::Nothing;
    let mut retained = VecDeque::new();
    for step in 1..=p.saves {
        let pl = slot.as_mut().expect("open");
        let e = checkpoint_for(step);
        m.pending.push(e.clone());
        handles.push_back(submit(pl, &e)?);
        while handles.len() >= p.in_flight {
            retained.push_back(ack_oldest(handles, m)?);
        }
        if !step.is_multiple_of(p.drain_every) && step != p.saves {
            continue;
        }
        // Drained: the main thread's own store work, with no save in flight.
        while !handles.is_empty() {
            retained.push_back(ack_oldest(handles, m)?);
        }
        while retained.len() > p.keep {
            let victim = retained.pop_front().expect("longer than keep");
            m.op = Op::Delete(victim);
            pl.store().delete(victim)?;
            m.acked.remove(&victim);
        }
        if step == p.compact_at {
            m.op = Op::Compact;
            pl.store().compact_wal()?;
        }
        if step == p.reopen_at {
            m.op = Op::Open;
            drop(slot.take().expect("open").close());
            *slot = Some(pipeline(Store::open(DIR, opts(sim))?, p));
        }
        m.op = Op::Nothing;
    }
    Ok(())
}

/// (b), (c), (d) on a freshly recovered store. Returns the live checkpoints and how many
/// saves in flight were found committed.
fn check_recovered(store: &Store, m: &Model) -> Result<(BTreeMap<u64, Expected>, usize), String> {
    let report = store.recovery_report();
    ensure!(
        report.damaged_segments.is_empty(),
        "recovery found damaged segments after a power cut: {:?}",
        report.damaged_segments
    );
    let listed: Vec<(u64, u64)> = store.list().iter().map(|c| (c.id, c.step)).collect();
    let listed_ids: BTreeSet<u64> = listed.iter().map(|l| l.0).collect();
    for (id, e) in &m.acked {
        ensure!(
            listed_ids.contains(id) || m.op == Op::Delete(*id),
            "acknowledged checkpoint {id} (step {}) lost; listed {listed:?}",
            e.step
        );
    }
    let max_acked = m.acked.keys().max().copied().unwrap_or(0);
    let mut live = BTreeMap::new();
    let mut found = 0;
    // `listed` is in id order, which is commit order.
    for &(id, step) in &listed {
        let e = if let Some(e) = m.acked.get(&id) {
            e
        } else {
            ensure!(
                id > max_acked,
                "checkpoint {id} (step {step}) listed, not acknowledged, and older than the \
                 newest acknowledged {max_acked}; listed {listed:?}"
            );
            // The saves in flight that committed are the oldest of them, in order.
            let Some(e) = m.pending.get(found) else {
                return Err(format!(
                    "checkpoint {id} (step {step}) listed but neither acknowledged nor in \
                     flight ({}); listed {listed:?}",
                    m.describe()
                ));
            };
            ensure!(
                e.step == step,
                "checkpoint {id} is step {step}, but the save in flight that should commit \
                 next was step {} ({}): a later save survived an earlier one; listed {listed:?}",
                e.step,
                m.describe()
            );
            found += 1;
            e
        };
        check_content(store, id, e)?;
        live.insert(id, e.clone());
    }
    for (id, res) in store.verify_all() {
        res.map_err(|x| format!("checkpoint {id} does not verify: {x}"))?;
    }
    // (d) nothing leaked.
    let left = store.leftovers();
    ensure!(left.is_empty(), "{}", left.join("; "));
    Ok((live, found))
}

/// Opens the crash image `img`, checks (a)-(d), then (e): two saves in flight through a new
/// pipeline, which must survive a power cut in `mode` and another reopen. Returns the ids
/// live after the first recovery and how many saves in flight were found committed.
fn check_image(
    img: &SimIo,
    m: &Model,
    p: &Params,
    mode: CrashMode,
    seed: u64,
) -> Result<(BTreeSet<u64>, usize), String> {
    let store = Store::open(DIR, opts(img)).map_err(|e| format!("(a) reopen failed: {e}"))?;
    let (live, found) = check_recovered(&store, m)?;
    let ids = live.keys().copied().collect();
    // (e) The pipeline saves again: two saves in flight, deduplicating against old chunks.
    let mut pl = pipeline(store, p);
    let again: Vec<Expected> = (0..2).map(|i| checkpoint_for(1_000_000 + i)).collect();
    let handles: Vec<SaveHandle> = again
        .iter()
        .map(|e| submit(&mut pl, e))
        .collect::<ckptstore::Result<_>>()
        .map_err(|x| format!("(e) submit after recovery: {x}"))?;
    let mut acked = live;
    for (h, e) in handles.into_iter().zip(again) {
        let r = h
            .wait()
            .map_err(|x| format!("(e) save after recovery: {x}"))?;
        acked.insert(r.commit.checkpoint.id, e);
    }
    drop(pl.close());
    let img2 = img.crash_image(mode, seed ^ 0x5eed);
    let store = Store::open(DIR, opts(&img2)).map_err(|x| format!("(e) second reopen: {x}"))?;
    let m2 = Model {
        acked,
        ..Model::new()
    };
    check_recovered(&store, &m2).map_err(|x| format!("(e) after second reopen: {x}"))?;
    Ok((ids, found))
}

#[derive(Default)]
struct Tally {
    /// Crash images checked, per mode.
    images: BTreeMap<CrashMode, u64>,
    /// Images of a crash during recovery checked.
    recovery_images: u64,
    /// Crash points by the number of saves begun and not acknowledged when the workload
    /// stopped (lost, or committed without the caller hearing of it).
    points_by_in_flight: BTreeMap<usize, u64>,
    /// Images where saves in flight were found committed, by how many.
    images_by_found: BTreeMap<usize, u64>,
    failures: Vec<String>,
}

fn catch<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => Err(format!(
            "panicked: {}",
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        )),
    }
}

/// One crash point: run the workload with the crash at sync `index`, then check every mode,
/// and for a sample of points a crash at every sync of each image's recovery.
fn sweep_index(index: u64, total: u64, p: &Params, tally: &mut Tally) {
    let sim = SimIo::new();
    let tracing = std::env::var("CKPT_SWEEP_CASE").is_ok();
    sim.set_trace(tracing);
    sim.crash_at_sync(index);
    let mut m = Model::new();
    let r = catch(|| Ok(workload(&sim, p, &mut m)));
    let point = sim
        .crashed()
        .unwrap_or_else(|| format!("end of workload (after sync #{total})"));
    let r = match r {
        Ok(r) => r,
        Err(panic) => {
            tally.failures.push(format!("{point}: workload {panic}"));
            return;
        }
    };
    if index <= total && (r.is_ok() || sim.crashed().is_none()) {
        tally.failures.push(format!(
            "{point}: the workload did not stop at the crash ({r:?}); not deterministic?"
        ));
        return;
    }
    if index > total {
        if let Err(e) = r {
            tally
                .failures
                .push(format!("{point}: workload failed: {e}"));
            return;
        }
    } else if let Err(e) = &r {
        if !surfaced_as_the_crash(e, &point) {
            tally
                .failures
                .push(format!("{point}: the crash surfaced as {e:?}"));
        }
    }
    *tally
        .points_by_in_flight
        .entry(m.pending.len())
        .or_default() += 1;
    for (mi, mode) in CrashMode::ALL.into_iter().enumerate() {
        let seed = index * 1_000_003;
        let case = format!("[{point}] mode {mode} seed {seed}, {}", m.describe());
        let img = sim.crash_image(mode, seed);
        let clean = catch(|| check_image(&img.fork(), &m, p, mode, seed));
        *tally.images.entry(mode).or_default() += 1;
        let clean_ids = match clean {
            Ok((ids, found)) => {
                *tally.images_by_found.entry(found).or_default() += 1;
                ids
            }
            Err(e) => {
                tally.failures.push(format!("{case}: {e}"));
                if tracing {
                    eprintln!("trace:\n{}", sim.trace().join("\n"));
                }
                continue;
            }
        };
        if !index.is_multiple_of(p.recovery_every) {
            continue;
        }
        // A crash at each sync of the recovery of this image, then recovery again.
        let probe = img.fork();
        let _ = Store::open(DIR, opts(&probe));
        for r in 1..=probe.sync_count() {
            let mode2 = CrashMode::ALL[(mi + r as usize) % CrashMode::ALL.len()];
            let seed2 = seed ^ (r << 40);
            let res = catch(|| {
                let f = img.fork();
                f.crash_at_sync(r);
                ensure!(
                    Store::open(DIR, opts(&f)).is_err(),
                    "recovery did not stop at the crash"
                );
                let img2 = f.crash_image(mode2, seed2);
                let (ids, _) = check_image(&img2, &m, p, mode2, seed2)?;
                ensure!(
                    ids == clean_ids,
                    "recovered {ids:?}, an uninterrupted recovery {clean_ids:?}"
                );
                Ok(())
            });
            tally.recovery_images += 1;
            if let Err(e) = res {
                tally.failures.push(format!(
                    "{case}; recovery crash at sync #{r}, mode {mode2} seed {seed2}: {e}"
                ));
            }
        }
    }
}

/// How the crash may reach the caller: as an I/O error, as the poisoned store it left, or —
/// when the I/O thread fails an earlier save while the caller is still staging a later one
/// (which is then never committed after the hole) — as `EarlierSaveFailed` whose cause is
/// this very crash. Which of these the caller sees depends on thread timing; that the cause
/// is the crash does not.
fn surfaced_as_the_crash(e: &Error, point: &str) -> bool {
    match e {
        Error::Io { .. } | Error::Poisoned { .. } => true,
        Error::EarlierSaveFailed { cause, .. } => cause.contains(point),
        _ => false,
    }
}

/// Syncs of one full, crash-free run of the workload.
fn count_syncs(p: &Params) -> u64 {
    let sim = SimIo::new();
    let mut m = Model::new();
    workload(&sim, p, &mut m).expect("the workload runs clean without a crash");
    assert!(m.pending.is_empty());
    assert_eq!(m.acked.len(), p.keep, "kept: {:?}", m.acked.keys());
    sim.sync_count()
}

fn sweep(p: Params) {
    let started = Instant::now();
    let total = count_syncs(&p);
    for _ in 0..2 {
        assert_eq!(
            total,
            count_syncs(&p),
            "the workload's syncs are not deterministic"
        );
    }
    let only: Option<u64> = std::env::var("CKPT_SWEEP_CASE")
        .ok()
        .map(|v| v.parse().expect("CKPT_SWEEP_CASE=<sync index>"));
    let indices: Vec<u64> = match only {
        Some(i) => vec![i],
        None => (1..=total + 1).collect(),
    };
    let next = AtomicU64::new(0);
    let tally = Mutex::new(Tally::default());
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                let mut mine = Tally::default();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst) as usize;
                    let Some(&index) = indices.get(i) else { break };
                    sweep_index(index, total, &p, &mut mine);
                }
                let mut t = tally.lock().unwrap();
                for (k, v) in mine.images {
                    *t.images.entry(k).or_default() += v;
                }
                for (k, v) in mine.points_by_in_flight {
                    *t.points_by_in_flight.entry(k).or_default() += v;
                }
                for (k, v) in mine.images_by_found {
                    *t.images_by_found.entry(k).or_default() += v;
                }
                t.recovery_images += mine.recovery_images;
                t.failures.extend(mine.failures);
            });
        }
    });
    let t = tally.into_inner().unwrap();
    println!(
        "async crash sweep: {} sync calls in the workload ({} saves, up to {} in flight), {} \
         crash points, {:.1?}",
        total,
        p.saves,
        p.in_flight,
        indices.len(),
        started.elapsed()
    );
    for mode in CrashMode::ALL {
        println!(
            "  {mode:>14}: {:>5} crash images checked",
            t.images.get(&mode).copied().unwrap_or(0)
        );
    }
    println!(
        "  crash points by saves not acknowledged: {:?}; images by those found committed: \
         {:?}; {} images of a crash during recovery",
        t.points_by_in_flight, t.images_by_found, t.recovery_images
    );
    if !t.failures.is_empty() {
        for f in t.failures.iter().take(20) {
            eprintln!("FAILED {f}");
        }
        panic!(
            "{} crash states failed (first: {})",
            t.failures.len(),
            t.failures[0]
        );
    }
    if only.is_none() {
        // The sweep exercised what it is for: crashes with several saves in flight, and
        // images where some of them had committed and others not.
        let several: u64 = t
            .points_by_in_flight
            .iter()
            .filter(|(&n, _)| n >= 2)
            .map(|(_, &k)| k)
            .sum();
        assert!(
            several * 4 >= indices.len() as u64,
            "few crash points with 2+ saves in flight: {:?}",
            t.points_by_in_flight
        );
        assert!(
            t.images_by_found.keys().any(|&n| n >= 1),
            "no image kept a save that was in flight: {:?}",
            t.images_by_found
        );
        assert!(t.recovery_images > 0);
    }
}

/// Every sync index × every crash mode, with up to three saves in flight.
#[test]
fn async_saves_crash_at_every_sync_in_every_mode() {
    sweep(CI);
}

/// The same with four saves in flight, all staged before the first is written.
#[test]
fn async_saves_staged_ahead_crash_at_every_sync_in_every_mode() {
    sweep(CI_WIDE);
}

/// fsyncgate through the pipeline: an fdatasync/fsync that fails (EIO, no crash) at each sync
/// index, with saves in flight, fails the save it belongs to and every later one, and poisons
/// the store (a new save is refused with `Error::Poisoned`); a restart without power loss and
/// a power cut in every mode each recover the acknowledged saves, and of those in flight at
/// most the oldest ones, in order. (`SimIo` drops what a failed sync was to persist, as Linux
/// does, so a pipeline that carried on and trusted a later sync would lose acknowledged saves.)
#[test]
fn async_failed_sync_at_every_index_poisons_and_loses_nothing_acknowledged() {
    let p = CI;
    let total = count_syncs(&p);
    let mut failures = Vec::new();
    for nth in 1..=total {
        let sim = SimIo::new();
        sim.inject(Fault::Eio {
            kind: OpKind::Sync,
            nth,
        });
        let mut m = Model::new();
        let res = catch(|| {
            let r = workload(&sim, &p, &mut m);
            ensure!(r.is_err(), "the failed sync #{nth} was not reported");
            if m.op != Op::Open {
                ensure!(
                    matches!(&m.save_after_failure, Some(Err(e)) if e.starts_with("Poisoned")),
                    "after the failed sync #{nth} ({:?}) a new save gave {:?}, not Poisoned",
                    r,
                    m.save_after_failure
                );
            }
            sim.clear_faults();
            check_image(&sim.fork(), &m, &p, CrashMode::DropUnsynced, nth)
                .map_err(|e| format!("restart without power loss: {e}"))?;
            for (i, mode) in CrashMode::ALL.into_iter().enumerate() {
                let img = sim.crash_image(mode, nth * 31 + i as u64);
                check_image(&img, &m, &p, mode, nth).map_err(|e| format!("{mode}: {e}"))?;
            }
            Ok(())
        });
        if let Err(e) = res {
            failures.push(format!("failed sync #{nth} ({}): {e}", m.describe()));
        }
    }
    println!("async failed-sync sweep: {total} sync indices, each checked after a restart and in every mode");
    for f in failures.iter().take(20) {
        eprintln!("FAILED {f}");
    }
    assert!(failures.is_empty(), "{} failed", failures.len());
}

/// Regression (CI, stop 20): on a slower machine the staged-ahead sweep saw the crash of save
/// 3's WAL sync reach the caller through the staging of a later save, as
/// `EarlierSaveFailed { step: 3, cause: "…crash at sync #19…" }`, and counted it a failure.
/// Forced here without relying on timing: the later save is staged only once the failed one
/// has finished, and the error it gets must name the crash.
#[test]
fn regression_a_crash_reaching_a_later_saves_staging_is_the_crash() {
    let sim = SimIo::new();
    let store = Store::open(DIR, opts(&sim)).expect("a fresh store");
    let mut pl = pipeline(store, &CI_WIDE);
    // The first sync after open belongs to save 1.
    sim.crash_at_sync(sim.sync_count() + 1);
    let first = submit(&mut pl, &checkpoint_for(1)).expect("staged");
    let mut later = pl.begin(2).expect("begun before the failure is seen");
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    while !first.is_done() {
        assert!(Instant::now() < deadline, "save 1 never finished");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let point = sim.crashed().expect("save 1 hit the crash");
    // The I/O thread takes save 2 right after save 1 failed and refuses it; staging sees that
    // as soon as it has happened.
    let mut k = 0;
    let err = loop {
        match later.put_tensor(&format!("t{k}"), DType::U8, &[4], &[1, 2, 3, 4]) {
            Ok(()) => {
                assert!(Instant::now() < deadline, "save 2 was never refused");
                std::thread::sleep(std::time::Duration::from_millis(1));
                k += 1;
            }
            Err(e) => break e,
        }
    };
    assert!(
        matches!(&err, Error::EarlierSaveFailed { step: 1, .. }),
        "{err:?}"
    );
    assert!(surfaced_as_the_crash(&err, &point), "{err:?} vs {point}");
    // The sweep still refuses an error that is not the crash.
    let other = Error::EarlierSaveFailed {
        step: 1,
        cause: "disk full".into(),
    };
    assert!(!surfaced_as_the_crash(&other, &point));
    drop(later);
    let first = first.wait();
    assert!(matches!(first, Err(Error::Io { .. })), "{first:?}");
    drop(pl);
}
