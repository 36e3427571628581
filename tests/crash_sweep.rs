//! Power-loss sweep: a crash at every sync call of a deterministic workload, in every crash
//! mode of `SimIo`, and a crash at every sync call of the recovery that follows.
//!
//! Invariants checked after each crash and recovery (docs/GUARANTEES.md):
//! (a) the store opens;
//! (b) every acknowledged checkpoint (its `commit()` returned `Ok`) is listed and reads back
//!     bit-exact — tensors, blobs, metadata, step, epoch; an acknowledged delete means absent;
//!     the one operation in flight at the crash happened wholly or not at all;
//! (c) every listed checkpoint verifies (nothing torn is reported valid);
//! (d) no space leaks: every file in `segments/` is a segment a live checkpoint references,
//!     the only WAL file is the one `CURRENT` names, there is no `CURRENT.tmp`;
//! (e) a new commit after recovery works and survives another power cut and reopen.
//!
//! A crash *during* recovery (at each of its sync calls) is recovered by the next open, with
//! the same invariants, and recovers exactly the checkpoints an uninterrupted recovery would.
//! A failing sync (EIO, no crash) at each sync index poisons the store and loses nothing
//! acknowledged.
//!
//! A sweep of its own covers quarantine and healing
//! (`quarantine_and_healing_survive_a_crash_at_every_sync_in_every_mode`): a frozen chunk rots,
//! a verified read finds it, a save quarantines and heals; after every crash, a verified read
//! and the next save heal every checkpoint, durably.
//!
//! Every failing case prints its crash point, mode and seed; `CKPT_SWEEP_CASE=N` reruns only
//! crash index N and prints the simulator's trace of it.
//!
//! CI (default, debug): `cargo test --test crash_sweep -- --nocapture` prints the crash
//! states checked per mode. The long sweep — a bigger workload with multi-segment
//! checkpoints and `CKPT_SWEEP_SEEDS` images per crash point and mode (default 20):
//! `CKPT_SWEEP_SEEDS=50 cargo test --release --test crash_sweep -- --ignored --nocapture`
//! (about 70 s of release-build time per seed on 2 cores: ~490 crash points x 5 modes, plus
//! the recovery crashes of each image).

#[macro_use]
mod support;

use ckptstore::io::{CrashMode, Fault, OpKind, SimIo, UringConfig, UringIo, UringSimConfig};
use ckptstore::{Compression, DType, Error, MetaValue, Options, Selector, Store};
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
    commits: u64,
    /// Keep-last-N retention (milestones every 10 steps are kept forever).
    keep: usize,
    /// Drop and reopen the store after this step.
    reopen_at: u64,
    /// Explicit `compact_wal()` after this step.
    compact_at: u64,
    /// `gc()` (segment compaction) after the deletions of every step that is a multiple of it.
    gc_every: u64,
    /// Add a tensor bigger than a segment (1 MiB) every 25 steps.
    big: bool,
    /// Images per crash point and mode.
    seeds: u64,
    /// The writer compresses (zstd), and the float tensors hold compressible bytes.
    compress: bool,
    /// Every open writes through the io_uring backend's own logic over the simulator
    /// (`UringIo::simulated`), not through `SimIo` directly.
    uring: bool,
}

const CI: Params = Params {
    commits: 52,
    keep: 3,
    reopen_at: 26,
    compact_at: 40,
    gc_every: 8,
    big: false,
    seeds: 1,
    compress: false,
    uring: false,
};

/// A shorter workload whose writer compresses: compressed frames, raw chunks among them, and
/// (through the reopen-and-commit check of every image) raw checkpoints deduplicating against
/// compressed ones.
const CI_ZSTD: Params = Params {
    commits: 21,
    keep: 3,
    reopen_at: 11,
    compact_at: 16,
    gc_every: 8,
    big: false,
    seeds: 1,
    compress: true,
    uring: false,
};

/// The default backend's own logic under the sweep: writes cut into 4 KiB pieces, O_DIRECT
/// and bounce routes, a reserve ahead of direct writes cut before each sync, files whose
/// O_DIRECT is refused midway, short writes, EBUSY, entries executed and completed out of
/// order (`UringIo::simulated`). A shorter workload: each crash image costs more here.
const CI_URING: Params = Params {
    commits: 21,
    keep: 3,
    reopen_at: 11,
    compact_at: 16,
    gc_every: 8,
    big: false,
    seeds: 1,
    compress: false,
    uring: true,
};

/// The io_uring backend's settings in the uring sweep: 4 KiB pieces (a chunk's frame is cut
/// in several), 4 in flight, direct I/O, a reserve ahead of direct writes (rounded up to a MiB).
const URING: UringConfig = UringConfig {
    queue_depth: 4,
    piece_bytes: 4096,
    direct: true,
    prealloc_bytes: 64 << 10,
};

fn opts(sim: &SimIo, p: &Params) -> Options {
    Options {
        io: if p.uring {
            Arc::new(UringIo::simulated(sim, URING, UringSimConfig::default()).unwrap())
        } else {
            Arc::new(sim.clone())
        },
        chunk_size: CHUNK,
        segment_max_bytes: 1 << 20,
        // Small, so that automatic compaction happens every dozen records or so.
        wal_compact_min_bytes: 12 << 10,
        ..Default::default()
    }
}

/// The workload writer's options: [`opts`], compressing when `p.compress`.
fn writer_opts(sim: &SimIo, p: &Params) -> Options {
    Options {
        compression: if p.compress {
            Compression::zstd()
        } else {
            Compression::None
        },
        ..opts(sim, p)
    }
}

/// The deterministic checkpoint of `step`: several dtypes and sizes, multi-chunk tensors,
/// frozen tensors and blobs (deduplicated), a partly changing tensor (per-chunk dedup).
fn checkpoint_for(step: u64, p: &Params) -> Expected {
    let mut t = Vec::new();
    let mut tensor = |name: &str, dtype: DType, shape: Vec<u64>, seed: u64| {
        let n = shape.iter().product::<u64>() as usize * dtype.size();
        let mut bytes = data(seed, n);
        if p.compress && matches!(dtype, DType::F32 | DType::BF16 | DType::F64) {
            // 4 bits of entropy a byte: compresses well past the 1/8 the writer asks for.
            bytes.iter_mut().for_each(|b| *b &= 0x0f);
        }
        t.push((name.to_string(), dtype, shape, bytes));
    };
    tensor("embed.frozen", DType::F32, vec![2, 1100], 7); // 3 chunks, never changes
    tensor("layer.w", DType::BF16, vec![8 + (step * 7) % 40, 64], step);
    tensor("layer.b", DType::F64, vec![8], 1000 + step);
    tensor("counts", DType::I64, vec![3], 2000 + step);
    tensor("mask", DType::Bool, vec![17], 3000 + step % 2);
    tensor("i16", DType::I16, vec![5 + step % 4], 4000 + step);
    tensor("empty", DType::F16, vec![0, 4], 0);
    if step % 7 == 3 {
        tensor("f8", DType::F8E4M3, vec![33], 5000 + step);
    }
    if p.big && step.is_multiple_of(25) {
        tensor(
            "big",
            DType::U8,
            vec![(1 << 20) + 3 * CHUNK as u64],
            6000 + step,
        );
    }
    // A raw run long enough that its frame header is padded so its payload starts on a page
    // (segment::PAD_MIN_RUN_BYTES), changing every 3 steps: padded frames under every crash
    // mode, in rebuilds and compactions too.
    tensor(
        "paged",
        DType::U8,
        vec![ckptstore::segment::PAD_MIN_RUN_BYTES + 5],
        8000 + step / 3,
    );
    // Two constant chunks and a tail that changes every 5 steps.
    let mut partial = data(8, 2 * CHUNK);
    partial.extend(data(9000 + step / 5, 10));
    t.push((
        "partial".into(),
        DType::U8,
        vec![partial.len() as u64],
        partial,
    ));
    let mut blobs = vec![("optimizer.cfg".to_string(), data(7000 + step, 90))];
    if step.is_multiple_of(3) {
        blobs.push(("tokenizer".into(), data(11, 5000)));
    }
    let metadata = BTreeMap::from([
        ("lr".to_string(), MetaValue::Float(0.1 / step as f64)),
        ("step".to_string(), MetaValue::Int(step as i64)),
        ("tag".to_string(), MetaValue::Str(format!("run-a/{step}"))),
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

#[derive(Debug, Clone, PartialEq)]
enum InFlight {
    Nothing,
    Open,
    Commit(Box<Expected>),
    Delete(u64),
    Compact,
    /// `Store::gc`: copies live chunks, commits a Relocate record, frees old segments.
    SegmentGc,
}

impl std::fmt::Display for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InFlight::Commit(e) => write!(f, "commit of step {}", e.step),
            InFlight::Delete(id) => write!(f, "delete of checkpoint {id}"),
            other => write!(f, "{other:?}"),
        }
    }
}

/// The reference model: what was acknowledged, and what was in flight when the workload
/// stopped.
#[derive(Debug, Clone)]
struct Model {
    acked: BTreeMap<u64, Expected>,
    in_flight: InFlight,
    /// Segments compacted by acknowledged `gc()` calls (the sweep must cover that path).
    compacted: usize,
}

fn commit(store: &mut Store, e: &Expected) -> ckptstore::Result<u64> {
    let mut t = store.begin(e.step)?;
    t.set_epoch(e.epoch);
    for (k, v) in &e.metadata {
        t.set_metadata(k.clone(), v.clone());
    }
    for (name, dtype, shape, bytes) in &e.tensors {
        t.put_tensor(name, *dtype, shape, bytes)?;
    }
    for (name, bytes) in &e.blobs {
        t.put_blob(name, bytes)?;
    }
    Ok(t.commit()?.checkpoint.id)
}

/// Runs the workload until the first error (the crash, or a fault), recording in `m`. The
/// store stays in `slot`, to be probed after a failure.
fn workload(
    sim: &SimIo,
    p: &Params,
    m: &mut Model,
    slot: &mut Option<Store>,
) -> ckptstore::Result<()> {
    m.in_flight = InFlight::Open;
    *slot = Some(Store::open(DIR, writer_opts(sim, p))?);
    let mut retained = VecDeque::new();
    for step in 1..=p.commits {
        let store = slot.as_mut().unwrap();
        let e = checkpoint_for(step, p);
        m.in_flight = InFlight::Commit(Box::new(e.clone()));
        let id = commit(store, &e)?;
        m.acked.insert(id, e.clone());
        if step % 10 != 0 {
            retained.push_back(id);
        }
        if step == DEDUP_SAVE_AT {
            // The same state saved again (a frozen model): every chunk deduplicated, so the
            // commit writes no chunk, only a segment holding its trailer.
            m.in_flight = InFlight::Commit(Box::new(e.clone()));
            let id = commit(store, &e)?;
            m.acked.insert(id, e);
            retained.push_back(id);
        }
        while retained.len() > p.keep {
            let victim = retained.pop_front().unwrap();
            m.in_flight = InFlight::Delete(victim);
            store.delete(victim)?;
            m.acked.remove(&victim);
        }
        if step.is_multiple_of(p.gc_every) {
            m.in_flight = InFlight::SegmentGc;
            m.compacted += store.gc()?.segments_compacted.len();
        }
        if step == p.compact_at {
            m.in_flight = InFlight::Compact;
            store.compact_wal()?;
        }
        if step == p.reopen_at {
            m.in_flight = InFlight::Open;
            *slot = None;
            *slot = Some(Store::open(DIR, writer_opts(sim, p))?);
        }
        m.in_flight = InFlight::Nothing;
    }
    // A failure after a durable write (the WAL compaction a commit or delete triggers)
    // poisons the store without failing that operation; the next write would report it. The
    // workload has no next write, so it reports it here: a crash at its last syncs stops it
    // like a crash anywhere else.
    if let Some(cause) = slot.as_ref().and_then(|s| s.poisoned()) {
        return Err(Error::Poisoned {
            cause: cause.to_string(),
        });
    }
    Ok(())
}

/// The step whose state the workload saves twice: the second save is fully deduplicated.
const DEDUP_SAVE_AT: u64 = 5;

fn new_model() -> Model {
    Model {
        acked: BTreeMap::new(),
        in_flight: InFlight::Nothing,
        compacted: 0,
    }
}

fn run_workload(sim: &SimIo, p: &Params) -> (Model, ckptstore::Result<()>) {
    let mut m = new_model();
    let r = workload(sim, p, &mut m, &mut None);
    (m, r)
}

/// (b), (c), (d) on a freshly recovered store. Returns the live checkpoints.
fn check_recovered(store: &Store, m: &Model) -> Result<BTreeMap<u64, Expected>, String> {
    let report = store.recovery_report();
    ensure!(
        report.damaged_segments.is_empty(),
        "recovery found damaged segments after a power cut: {:?}",
        report.damaged_segments
    );
    let listed: Vec<(u64, u64)> = store.list().iter().map(|c| (c.id, c.step)).collect();
    let listed_ids: BTreeSet<u64> = listed.iter().map(|l| l.0).collect();
    let mut live = BTreeMap::new();
    for (id, e) in &m.acked {
        if !listed_ids.contains(id) {
            ensure!(
                m.in_flight == InFlight::Delete(*id),
                "acknowledged checkpoint {id} (step {}) lost; listed {listed:?}",
                e.step
            );
        }
    }
    let max_acked = m.acked.keys().max().copied().unwrap_or(0);
    for &(id, step) in &listed {
        let e = match (m.acked.get(&id), &m.in_flight) {
            (Some(e), _) => e,
            (None, InFlight::Commit(e)) if e.step == step && id > max_acked => e,
            _ => {
                return Err(format!(
                    "checkpoint {id} (step {step}) listed but neither acknowledged nor in \
                     flight ({}); listed {listed:?}",
                    m.in_flight
                ))
            }
        };
        check_content(store, id, e)?;
        live.insert(id, e.clone());
    }
    // (d) nothing leaked.
    let left = store.leftovers();
    ensure!(left.is_empty(), "{}", left.join("; "));
    Ok(live)
}

/// Opens the crash image `img`, checks (a)-(d), then (e): a new commit that must survive a
/// power cut in `mode` and another reopen. Returns the ids live after the first recovery.
fn check_image(
    img: &SimIo,
    m: &Model,
    p: &Params,
    mode: CrashMode,
    seed: u64,
) -> Result<BTreeSet<u64>, String> {
    let mut store =
        Store::open(DIR, opts(img, p)).map_err(|e| format!("(a) reopen failed: {e}"))?;
    let live = check_recovered(&store, m)?;
    let ids = live.keys().copied().collect();
    // (e) The store keeps working: a commit that also deduplicates against old chunks.
    let e = checkpoint_for(1_000_000, p);
    let id = commit(&mut store, &e).map_err(|x| format!("(e) commit after recovery: {x}"))?;
    drop(store);
    let img2 = img.crash_image(mode, seed ^ 0x5eed);
    let store = Store::open(DIR, opts(&img2, p)).map_err(|x| format!("(e) second reopen: {x}"))?;
    let mut acked = live;
    acked.insert(id, e);
    let m2 = Model {
        acked,
        in_flight: InFlight::Nothing,
        compacted: 0,
    };
    check_recovered(&store, &m2).map_err(|x| format!("(e) after second reopen: {x}"))?;
    Ok(ids)
}

#[derive(Default)]
struct Tally {
    /// Crash images checked, per mode.
    images: BTreeMap<CrashMode, u64>,
    /// Images of a crash during recovery checked, per mode of that second crash.
    recovery_images: BTreeMap<CrashMode, u64>,
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

/// One crash point: run the workload with the crash at sync `index`, then check every mode
/// (and `p.seeds` seeds of each), and a crash at every sync of each image's recovery.
fn sweep_index(index: u64, total: u64, p: &Params, recovery_every: u64, tally: &mut Tally) {
    let sim = SimIo::new();
    if std::env::var("CKPT_SWEEP_CASE").is_ok() {
        sim.set_trace(true);
    }
    sim.crash_at_sync(index);
    let (m, r) = run_workload(&sim, p);
    let point = sim
        .crashed()
        .unwrap_or_else(|| format!("end of workload (after sync #{total})"));
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
    }
    for (mi, mode) in CrashMode::ALL.into_iter().enumerate() {
        for s in 0..p.seeds {
            let seed = index * 1_000_003 + s;
            let case = format!(
                "[{point}] mode {mode} seed {seed}, in flight {}",
                m.in_flight
            );
            let img = sim.crash_image(mode, seed);
            // Checked on a copy: `img` stays the untouched image for the recovery crashes.
            let clean = catch(|| check_image(&img.fork(), &m, p, mode, seed));
            *tally.images.entry(mode).or_default() += 1;
            let clean_ids = match clean {
                Ok(ids) => ids,
                Err(e) => {
                    tally.failures.push(format!("{case}: {e}"));
                    if std::env::var("CKPT_SWEEP_CASE").is_ok() {
                        eprintln!("trace:\n{}", sim.trace().join("\n"));
                    }
                    continue;
                }
            };
            if !(index + s).is_multiple_of(recovery_every) {
                continue;
            }
            // A crash at each sync of the recovery of this image, then recovery again.
            let probe = img.fork();
            let _ = Store::open(DIR, opts(&probe, p));
            let syncs = probe.sync_count();
            for r in 1..=syncs {
                let mode2 = CrashMode::ALL[(mi + r as usize) % CrashMode::ALL.len()];
                let seed2 = seed ^ (r << 40);
                let case2 =
                    format!("{case}; recovery crash at sync #{r}, mode {mode2} seed {seed2}");
                let res = catch(|| {
                    let f = img.fork();
                    f.crash_at_sync(r);
                    ensure!(
                        Store::open(DIR, opts(&f, p)).is_err(),
                        "recovery did not stop at the crash"
                    );
                    let img2 = f.crash_image(mode2, seed2);
                    let ids = check_image(&img2, &m, p, mode2, seed2)?;
                    ensure!(
                        ids == clean_ids,
                        "recovered {ids:?}, an uninterrupted recovery {clean_ids:?}"
                    );
                    Ok(())
                });
                *tally.recovery_images.entry(mode2).or_default() += 1;
                if let Err(e) = res {
                    tally.failures.push(format!("{case2}: {e}"));
                }
            }
        }
    }
}

/// Syncs of one full, crash-free run of the workload.
fn count_syncs(p: &Params) -> u64 {
    let sim = SimIo::new();
    let (m, r) = run_workload(&sim, p);
    r.expect("the workload runs clean without a crash");
    assert!(m.acked.len() >= 5);
    sim.sync_count()
}

fn sweep(p: Params, recovery_every: u64) {
    let started = Instant::now();
    let total = count_syncs(&p);
    assert_eq!(
        total,
        count_syncs(&p),
        "the workload's syncs are not deterministic"
    );
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
                    sweep_index(index, total, &p, recovery_every, &mut mine);
                }
                let mut t = tally.lock().unwrap();
                for (k, v) in mine.images {
                    *t.images.entry(k).or_default() += v;
                }
                for (k, v) in mine.recovery_images {
                    *t.recovery_images.entry(k).or_default() += v;
                }
                t.failures.extend(mine.failures);
            });
        }
    });
    let t = tally.into_inner().unwrap();
    println!(
        "crash sweep: {} sync calls in the workload, {} crash points, {} seed(s) per point and \
         mode, {:.1?}",
        total,
        indices.len(),
        p.seeds,
        started.elapsed()
    );
    for mode in CrashMode::ALL {
        println!(
            "  {mode:>14}: {:>5} crash images checked, {:>5} images of a crash during their \
             recovery",
            t.images.get(&mode).copied().unwrap_or(0),
            t.recovery_images.get(&mode).copied().unwrap_or(0)
        );
    }
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
}

/// The workload compacts segments, so the sweep below crashes inside segment compaction
/// (copy, fdatasync, directory fsync, Relocate record, unlink) and its recovery.
#[test]
fn the_workload_compacts_segments() {
    let (m, r) = run_workload(&SimIo::new(), &CI);
    r.unwrap();
    assert!(m.compacted >= 2, "segments compacted: {}", m.compacted);
}

/// Every sync index × every crash mode, and a crash at every sync of each image's recovery.
#[test]
fn crash_at_every_sync_in_every_mode() {
    sweep(CI, 1);
}

/// The same sweep over a writer that compresses.
#[test]
fn crash_at_every_sync_in_every_mode_compressed() {
    // The workload does write compressed chunks, and raw ones among them.
    let sim = SimIo::new();
    run_workload(&sim, &CI_ZSTD).1.unwrap();
    let store = Store::open(DIR, opts(&sim, &CI_ZSTD)).unwrap();
    let ck = store.checkpoint(Selector::Latest).unwrap();
    let m = ck.manifest();
    let codecs: std::collections::BTreeSet<i32> = m
        .tensors
        .iter()
        .flat_map(|t| &t.chunks)
        .chain(m.blobs.iter().flat_map(|b| &b.chunks))
        .map(|c| c.codec)
        .collect();
    use ckptstore::proto::v1::Codec;
    for codec in [Codec::None, Codec::ZstdShuffle2, Codec::ZstdShuffle4] {
        assert!(codecs.contains(&(codec as i32)), "{codec:?} in {codecs:?}");
    }
    drop(store);
    sweep(CI_ZSTD, 1);
}

/// The sweep through the io_uring backend's own logic (see [`CI_URING`]).
#[test]
fn crash_at_every_sync_in_every_mode_through_the_uring_backend() {
    // A crash during the recovery of every 4th image (the plain sweeps do every image).
    sweep(CI_URING, 4);
}

/// The uring sweep's workload does go through the backend's paths: pieces written direct and
/// buffered, and files whose O_DIRECT the device refused midway (and that went on buffered).
#[test]
fn the_uring_workload_takes_direct_buffered_and_fallback_paths() {
    let sim = SimIo::new();
    let uring = UringIo::simulated(&sim, URING, UringSimConfig::default()).unwrap();
    let mut store = Store::open(
        DIR,
        Options {
            io: Arc::new(uring.clone()),
            ..writer_opts(&sim, &CI_URING)
        },
    )
    .unwrap();
    for step in 1..=CI_URING.commits {
        commit(&mut store, &checkpoint_for(step, &CI_URING)).unwrap();
    }
    let s = uring.stats();
    assert!(s.direct_pieces > 0 && s.buffered_pieces > 0, "{s:?}");
    assert!(s.direct_refused_files > 0, "{s:?}");
}

/// fsyncgate through the ring: a failing fdatasync at each sync index, reported through the
/// simulated io_uring (EBUSY, completions out of order), poisons the store and loses nothing.
#[test]
fn failed_sync_at_every_index_poisons_through_the_uring_backend() {
    let total = count_syncs(&CI_URING);
    let failures: Vec<String> = (1..=total)
        .filter_map(|nth| {
            let f = Fault::Eio {
                kind: OpKind::Sync,
                nth,
            };
            fault_case(&CI_URING, f, true).err()
        })
        .collect();
    report("failed-sync sweep (uring)", total, failures);
}

/// The long sweep: a bigger workload with multi-segment checkpoints, many seeds per crash
/// point (`CKPT_SWEEP_SEEDS`, default 20). See the module docs for the command.
#[test]
#[ignore = "long; run with --release -- --ignored"]
fn long_crash_sweep() {
    let seeds = std::env::var("CKPT_SWEEP_SEEDS")
        .ok()
        .map_or(20, |v| v.parse().expect("CKPT_SWEEP_SEEDS=<n>"));
    sweep(
        Params {
            commits: 120,
            keep: 5,
            reopen_at: 61,
            compact_at: 90,
            gc_every: 8,
            big: true,
            seeds,
            compress: false,
            uring: false,
        },
        1,
    );
}

/// Runs the workload with `fault` armed until it fails, then checks the store is poisoned
/// (when `must_poison`), and that a restart without power loss and a power cut in every mode
/// each recover to the acknowledged state.
fn fault_case(p: &Params, fault: Fault, must_poison: bool) -> Result<(), String> {
    let sim = SimIo::new();
    sim.inject(fault);
    let mut m = new_model();
    let res = catch(|| {
        let mut slot = None;
        let Err(e) = workload(&sim, p, &mut m, &mut slot) else {
            return Ok(());
        };
        if let Some(store) = slot.as_mut().filter(|_| must_poison) {
            if m.in_flight != InFlight::Open {
                ensure!(
                    store.poisoned().is_some(),
                    "a failed sync ({e}) did not poison the store"
                );
                ensure!(
                    matches!(store.begin(1).err(), Some(Error::Poisoned { .. })),
                    "a poisoned store accepted a transaction"
                );
            }
        }
        Ok(())
    })
    .and_then(|()| {
        sim.clear_faults();
        check_image(&sim.fork(), &m, p, CrashMode::DropUnsynced, 1)
            .map_err(|e| format!("restart without power loss: {e}"))?;
        for (i, mode) in CrashMode::ALL.into_iter().enumerate() {
            let img = sim.crash_image(mode, i as u64);
            check_image(&img, &m, p, mode, i as u64).map_err(|e| format!("{mode}: {e}"))?;
        }
        Ok(())
    });
    res.map_err(|e| format!("{fault:?} (in flight {}): {e}", m.in_flight))
}

fn report(name: &str, cases: u64, failures: Vec<String>) {
    println!("{name}: {cases} fault cases, each checked after a restart and in every mode");
    for f in failures.iter().take(20) {
        eprintln!("FAILED {f}");
    }
    assert!(failures.is_empty(), "{name}: {} failed", failures.len());
}

/// fsyncgate: an fdatasync/fsync that fails (EIO, no crash) at each sync index poisons the
/// store — the failed operation returns an error, or, for an automatic compaction after a
/// durable commit, the next write does — and a power cut after it, in any mode, loses nothing
/// acknowledged. (`SimIo` drops the data a failed sync was to persist, as Linux does, so a
/// store that retried the sync and trusted it would lose acknowledged checkpoints here.)
#[test]
fn failed_sync_at_every_index_poisons() {
    let total = count_syncs(&CI);
    let failures: Vec<String> = (1..=total)
        .filter_map(|nth| {
            let f = Fault::Eio {
                kind: OpKind::Sync,
                nth,
            };
            fault_case(&CI, f, true).err()
        })
        .collect();
    report("failed-sync sweep", total, failures);
}

/// EIO on creates, renames and removes at every index, short writes and EIO on writes at a
/// sample of indices, ENOSPC at a sample of byte budgets: the operation fails, nothing
/// acknowledged is lost, and recovery leaves no leak.
#[test]
fn io_errors_lose_nothing_acknowledged() {
    let sim = SimIo::new();
    run_workload(&sim, &CI).1.unwrap();
    let mut faults = Vec::new();
    for kind in [OpKind::Create, OpKind::Rename, OpKind::Remove] {
        for nth in 1..=sim.call_count(kind) {
            faults.push(Fault::Eio { kind, nth });
        }
    }
    let writes = sim.call_count(OpKind::Write);
    for nth in (1..=writes).step_by(7) {
        faults.push(Fault::Eio {
            kind: OpKind::Write,
            nth,
        });
        faults.push(Fault::ShortWrite {
            nth: nth + 3,
            keep: (nth as usize * 37) % 600,
        });
    }
    let bytes = sim.bytes_written();
    for k in 0..40 {
        faults.push(Fault::Enospc {
            bytes: bytes * k / 40 + k * 13,
        });
    }
    let failures: Vec<String> = faults
        .iter()
        .filter_map(|&f| fault_case(&CI, f, false).err())
        .collect();
    report("I/O error sweep", faults.len() as u64, failures);
}

/// How the rebuild sweep damages the log of crash image `index` before rebuilding.
fn damage_log(img: &SimIo, index: u64) -> &'static str {
    use ckptstore::io::Storage;
    let dir = std::path::Path::new(DIR);
    let current = dir.join("CURRENT");
    let wals: Vec<String> = img
        .list_dir(dir)
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.ends_with(".wal"))
        .collect();
    let overwrite = |path: &std::path::Path, at: u64, bytes: &[u8]| {
        if let Ok(f) = img.open(path, true) {
            let _ = f.write_at(bytes, at);
        }
    };
    let _ = img.remove_file(&current);
    match index % 4 {
        0 => "CURRENT removed",
        1 => {
            for w in &wals {
                let _ = img.remove_file(&dir.join(w));
            }
            "CURRENT and the WAL removed"
        }
        2 => {
            for w in &wals {
                overwrite(&dir.join(w), 0, b"XXXX");
            }
            "CURRENT removed, the WAL header overwritten"
        }
        _ => {
            for w in &wals {
                overwrite(&dir.join(w), 40, &[0xff; 64]);
            }
            if let Ok(f) = img.create_new(&current) {
                let _ = f.write_at(b"garbage", 0);
            }
            "CURRENT garbage, the WAL's first record damaged"
        }
    }
}

/// Issue 14, item 2: after every step of the workload (a power cut at every sync, one crash
/// mode per point, in turn), the WAL and `CURRENT` are damaged or removed and the store is
/// rebuilt from its segments: every acknowledged, not-deleted checkpoint is back bit-exact,
/// and every other checkpoint listed is one the workload committed (a deleted one, or the
/// commit in flight), whole and verifying.
#[test]
fn rebuild_after_every_step_restores_every_acknowledged_checkpoint() {
    let p = CI_ZSTD;
    let total = count_syncs(&p);
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut restored = 0usize;
    for index in 1..=total + 1 {
        let sim = SimIo::new();
        sim.crash_at_sync(index);
        let (m, _) = run_workload(&sim, &p);
        let mode = CrashMode::ALL[index as usize % CrashMode::ALL.len()];
        let img = sim.crash_image(mode, index);
        let how = damage_log(&img, index);
        let case = format!("crash at sync {index}/{total}, mode {mode}, {how}");
        let res = catch(|| {
            let (store, report) = match Store::rebuild(DIR, opts(&img, &p)) {
                Ok(r) => r,
                Err(e) if m.acked.is_empty() => return Ok(format!("nothing to rebuild: {e}")),
                Err(e) => return Err(format!("rebuild failed: {e}")),
            };
            let listed: BTreeMap<u64, u64> = store.list().iter().map(|c| (c.id, c.step)).collect();
            for (id, e) in &m.acked {
                ensure!(
                    listed.get(id) == Some(&e.step) || m.in_flight == InFlight::Delete(*id),
                    "acknowledged checkpoint {id} (step {}) not rebuilt; {report:?}",
                    e.step
                );
            }
            for (&id, &step) in &listed {
                ensure!(
                    step <= p.commits,
                    "checkpoint {id} at step {step}: never written"
                );
                check_content(&store, id, &checkpoint_for(step, &p))?;
                store.verify(id).map_err(|e| format!("{id}: {e}"))?;
            }
            Ok(format!("{} restored", listed.len()))
        });
        match res {
            Ok(_) => restored += 1,
            Err(e) => failures.push(format!("{case}: {e}")),
        }
    }
    println!(
        "rebuild sweep: {} crash points rebuilt in {:.1?}",
        restored,
        started.elapsed()
    );
    for f in failures.iter().take(20) {
        eprintln!("FAILED {f}");
    }
    assert!(failures.is_empty(), "{} rebuilds failed", failures.len());
}

// ------------------------------------------------------------ quarantine and healing sweep

/// What the healing workload acknowledged.
#[derive(Debug, Clone)]
struct HealModel {
    acked: BTreeMap<u64, Expected>,
    in_flight: InFlight,
    /// Where the frozen tensor's chunks were flipped (segment, offset).
    flipped: Vec<(u64, u64)>,
    /// Chunks acknowledged gc calls found corrupt while compacting (the sweep must cover it).
    corrupt_found: usize,
    /// A save after the quarantine was acknowledged: its begin made the Quarantine record
    /// durable, so any writer open from then on heals (the heal record itself may be lost).
    heal_acked: bool,
}

/// Flips one byte of `segment` at `offset` on the simulated disk, durably: bit rot.
fn rot(sim: &SimIo, segment: u64, offset: u64) -> std::io::Result<()> {
    use ckptstore::io::Storage;
    let path = std::path::Path::new(DIR)
        .join("segments")
        .join(format!("{segment:08}.seg"));
    let f = sim.open(&path, true)?;
    let mut b = [0u8; 1];
    f.read_at(&mut b, offset)?;
    f.write_at(&[b[0] ^ 0x10], offset)?;
    f.sync_data()
}

/// Four checkpoints sharing the frozen tensor; its middle chunk rots; a verified read finds
/// it (`latest_valid`); a save quarantines it (WAL rewritten with the feature, Quarantine
/// record) and heals the four (heal record, old segment freed); then a delete, a gc, a WAL
/// compaction, a reopen and one more save.
fn heal_workload(
    sim: &SimIo,
    m: &mut HealModel,
    slot: &mut Option<Store>,
) -> ckptstore::Result<()> {
    m.in_flight = InFlight::Open;
    *slot = Some(Store::open(DIR, opts(sim, &CI))?);
    let step_commit = |store: &mut Store, m: &mut HealModel, step: u64| {
        let e = checkpoint_for(step, &CI);
        m.in_flight = InFlight::Commit(Box::new(e.clone()));
        let id = commit(store, &e)?;
        m.acked.insert(id, e);
        m.in_flight = InFlight::Nothing;
        ckptstore::Result::Ok(id)
    };
    for step in 1..=4 {
        step_commit(slot.as_mut().unwrap(), m, step)?;
    }
    let store = slot.as_mut().unwrap();
    let c = store.checkpoint(Selector::Id(1))?.manifest().tensors[0].chunks[1].clone();
    m.flipped.push((c.segment, c.offset));
    rot(sim, c.segment, c.offset + 11).map_err(|source| Error::Io {
        op: "rot",
        path: DIR.into(),
        source,
    })?;
    assert_eq!(store.latest_valid()?, None, "the rot is found");
    step_commit(store, m, 5)?;
    m.heal_acked = true;
    m.in_flight = InFlight::Delete(1);
    store.delete(1)?;
    m.acked.remove(&1);
    m.in_flight = InFlight::SegmentGc;
    store.gc()?;
    step_commit(store, m, 6)?;
    m.in_flight = InFlight::Compact;
    store.compact_wal()?;
    m.in_flight = InFlight::Open;
    *slot = None;
    *slot = Some(Store::open(DIR, opts(sim, &CI))?);
    step_commit(slot.as_mut().unwrap(), m, 7)?;
    // Another chunk the next save holds again rots; this time segment compaction finds it:
    // checkpoints 2..=5 go, gc plans their mostly dead segments, meets the rotten chunk while
    // copying, quarantines it and moves the rest; the save of step 8 heals 6 and 7.
    let store = slot.as_mut().unwrap();
    for id in 2..=5 {
        m.in_flight = InFlight::Delete(id);
        store.delete(id)?;
        m.acked.remove(&id);
    }
    let plan = store.plan_compaction();
    let mut target = None;
    for id in [6, 7] {
        let ck = store.checkpoint(Selector::Id(id))?;
        for t in &ck.manifest().tensors {
            let constant = match t.name.as_str() {
                "embed.frozen" => t.chunks.len(),
                "partial" => 2,
                _ => 0,
            };
            target = target.or_else(|| {
                t.chunks[..constant]
                    .iter()
                    .find(|c| plan.sources.contains(&c.segment))
                    .cloned()
            });
        }
    }
    let c = target.expect("a constant chunk in a segment gc compacts");
    m.heal_acked = false;
    m.flipped.push((c.segment, c.offset));
    rot(sim, c.segment, c.offset + 5).map_err(|source| Error::Io {
        op: "rot",
        path: DIR.into(),
        source,
    })?;
    m.in_flight = InFlight::SegmentGc;
    m.corrupt_found += store.gc()?.corrupt_chunks.len();
    step_commit(store, m, 8)?;
    m.heal_acked = true;
    Ok(())
}

/// Checks a recovered store against the healing model: every acknowledged checkpoint is
/// listed (an acknowledged delete absent), nothing unacknowledged but the one in flight;
/// each reads back bit-exact — or, only before a healing save was acknowledged, fails at the
/// rotten chunk alone — and nothing leaked. `healed`: everything must be bit-exact.
fn check_heal_store(store: &Store, m: &HealModel, healed: bool) -> Result<(), String> {
    let listed: BTreeSet<u64> = store.list().iter().map(|c| c.id).collect();
    for id in m.acked.keys() {
        ensure!(
            listed.contains(id) || m.in_flight == InFlight::Delete(*id),
            "acknowledged checkpoint {id} lost; listed {listed:?}"
        );
    }
    let max_acked = m.acked.keys().max().copied().unwrap_or(0);
    for &id in &listed {
        let step = store
            .info(Selector::Id(id))
            .map_err(|e| e.to_string())?
            .step;
        let e = match (m.acked.get(&id), &m.in_flight) {
            (Some(e), _) => e,
            (None, InFlight::Commit(e)) if e.step == step && id > max_acked => e,
            _ => return Err(format!("checkpoint {id} listed but not acknowledged")),
        };
        let Err(why) = check_content(store, id, e) else {
            continue;
        };
        ensure!(
            !healed && !m.heal_acked,
            "checkpoint {id} unhealed after a healing save: {why}"
        );
        match store.verify(id) {
            Err(Error::ChunkCorrupt {
                segment, offset, ..
            }) if m.flipped.contains(&(segment, offset)) => {}
            other => return Err(format!("checkpoint {id}: {why} ({other:?})")),
        }
        // Every tensor without a rotten chunk reads back bit-exact.
        let ck = store
            .checkpoint(Selector::Id(id))
            .map_err(|x| x.to_string())?;
        for (name, _, _, bytes) in &e.tensors {
            let rotten = ck.manifest().tensors.iter().any(|t| {
                t.name == *name
                    && t.chunks
                        .iter()
                        .any(|c| m.flipped.contains(&(c.segment, c.offset)))
            });
            if rotten {
                continue;
            }
            let t = ck.tensor(name).map_err(|x| format!("{id} {name}: {x}"))?;
            ensure!(t.data == *bytes, "checkpoint {id} tensor {name} differs");
        }
    }
    let left = store.leftovers();
    ensure!(left.is_empty(), "{}", left.join("; "));
    Ok(())
}

/// Recovery of a crash image, then the healing guarantee itself: a verified read and the next
/// save of the frozen tensor heal every checkpoint, and that survives another power cut.
fn check_heal_image(img: &SimIo, m: &HealModel, mode: CrashMode, seed: u64) -> Result<(), String> {
    let mut store = Store::open(DIR, opts(img, &CI)).map_err(|e| format!("(a) reopen: {e}"))?;
    check_heal_store(&store, m, false)?;
    let _ = store.verify_all();
    let e = checkpoint_for(1_000_000, &CI);
    let id = commit(&mut store, &e).map_err(|x| format!("healing save: {x}"))?;
    let mut m2 = m.clone();
    m2.acked = store
        .list()
        .iter()
        .map(|c| {
            let known = m.acked.get(&c.id).or(match &m.in_flight {
                InFlight::Commit(e) => Some(e),
                _ => None,
            });
            (c.id, known.cloned().unwrap_or_else(|| e.clone()))
        })
        .collect();
    m2.acked.insert(id, e);
    m2.in_flight = InFlight::Nothing;
    m2.heal_acked = true;
    check_heal_store(&store, &m2, true).map_err(|x| format!("after the healing save: {x}"))?;
    drop(store);
    let img2 = img.crash_image(mode, seed ^ 0x5eed);
    let store = Store::open(DIR, opts(&img2, &CI)).map_err(|x| format!("second reopen: {x}"))?;
    check_heal_store(&store, &m2, true).map_err(|x| format!("after a power cut: {x}"))
}

fn run_heal_workload(sim: &SimIo) -> (HealModel, ckptstore::Result<()>) {
    let mut m = HealModel {
        acked: BTreeMap::new(),
        in_flight: InFlight::Nothing,
        flipped: Vec::new(),
        corrupt_found: 0,
        heal_acked: false,
    };
    let r = heal_workload(sim, &mut m, &mut None);
    (m, r)
}

/// Quarantine and healing survive a power cut at every sync of the healing workload in every
/// crash mode, and at every sync of the recovery of each image (whose writer open may heal):
/// nothing acknowledged is lost, nothing is reported intact that is not, and a verified read
/// plus the next save of the same bytes heal every checkpoint, durably.
#[test]
fn quarantine_and_healing_survive_a_crash_at_every_sync_in_every_mode() {
    let started = Instant::now();
    let (clean, r) = run_heal_workload(&SimIo::new());
    r.expect("the healing workload runs clean");
    assert!(clean.heal_acked);
    assert_eq!(clean.corrupt_found, 1, "gc found the second rot");
    let total = {
        let sim = SimIo::new();
        run_heal_workload(&sim).1.unwrap();
        sim.sync_count()
    };
    let (mut images, mut recovery_images, mut failures) = (0u64, 0u64, Vec::new());
    for index in 1..=total + 1 {
        let sim = SimIo::new();
        sim.crash_at_sync(index);
        let (m, r) = run_heal_workload(&sim);
        // (A crash at the sync of a heal after a commit leaves the commit acknowledged.)
        if index <= total && (r.is_ok() && sim.crashed().is_none()) {
            failures.push(format!(
                "sync #{index}: the workload did not stop at the crash"
            ));
            continue;
        }
        for (mi, mode) in CrashMode::ALL.into_iter().enumerate() {
            let seed = index * 7919 + mi as u64;
            let case = format!(
                "crash at sync #{index}, mode {mode}, in flight {}",
                m.in_flight
            );
            let img = sim.crash_image(mode, seed);
            images += 1;
            if let Err(e) = catch(|| check_heal_image(&img.fork(), &m, mode, seed)) {
                failures.push(format!("{case}: {e}"));
                continue;
            }
            // A crash at each sync of the recovery: of one mode's image per crash point (the
            // mode rotating with the point), to keep the sweep to seconds.
            if mi as u64 != index % CrashMode::ALL.len() as u64 {
                continue;
            }
            let probe = img.fork();
            let _ = Store::open(DIR, opts(&probe, &CI));
            for r in 1..=probe.sync_count() {
                let mode2 = CrashMode::ALL[(mi + r as usize) % CrashMode::ALL.len()];
                recovery_images += 1;
                let res = catch(|| {
                    let f = img.fork();
                    f.crash_at_sync(r);
                    ensure!(
                        Store::open(DIR, opts(&f, &CI)).is_err(),
                        "recovery did not stop"
                    );
                    check_heal_image(&f.crash_image(mode2, seed ^ r), &m, mode2, seed ^ r)
                });
                if let Err(e) = res {
                    failures.push(format!(
                        "{case}; recovery crash at sync #{r} ({mode2}): {e}"
                    ));
                }
            }
        }
    }
    println!(
        "healing sweep: {total} syncs, {images} crash images, {recovery_images} images of a \
         crash during their recovery, {:.1?}",
        started.elapsed()
    );
    for f in failures.iter().take(20) {
        eprintln!("FAILED {f}");
    }
    assert!(
        failures.is_empty(),
        "{} crash states failed",
        failures.len()
    );
}
