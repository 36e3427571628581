//! A reference model of a store, driven by a list of operations. Shared by the proptest
//! `tests/model_proptest.rs` and the cargo-fuzz target `fuzz/fuzz_targets/store_ops.rs`
//! (which includes this file by path), so `cargo test` and the fuzzer check the same thing.
//!
//! The model is the set of live checkpoints (id → step and tensors). After every operation
//! the store lists exactly the model's ids; on `Reopen`, `Crash`, `Verify` and at the end every
//! tensor reads back bit-exact and `latest_valid()` is the newest model checkpoint. Any
//! divergence, an unexpected error, or a panic is a failure.
//!
//! The file system is the power-loss simulator (`SimIo`): `Crash` cuts the power in the middle
//! of a commit (at one of its syncs, or just after it) and reopens on the image a power cut
//! could leave. An acknowledged commit must survive; the one in flight must be wholly there or
//! wholly absent.
#![allow(dead_code)]

#[path = "../support/mod.rs"]
mod support;

use ckptstore::io::{CrashMode, SimIo};
use ckptstore::{DType, Error, Options, Selector, Store};
use std::collections::BTreeMap;
use std::path::Path;

/// One operation on the store.
#[derive(Debug, Clone)]
pub enum Op {
    /// Stage a tensor for the next commit. `name` comes from a small space (so duplicate names
    /// happen), `seed` too (so identical contents, hence deduplication, happen).
    Put {
        /// Name index (`t0`..`t7`).
        name: u8,
        /// Byte length, taken modulo 20 000 (0 is a zero-sized tensor).
        len: u16,
        /// Content seed, taken modulo 6.
        seed: u8,
        /// Stored as `f32` with shape `[len/4]` when the length allows, else `u8`.
        float: bool,
    },
    /// Commit the staged tensors (possibly none: an empty checkpoint).
    Commit {
        /// Training step.
        step: u8,
    },
    /// Drop the staged tensors without committing (a transaction that is aborted).
    Abort,
    /// Delete a live checkpoint (`pick` modulo the live count), or, when `pick % 5 == 4`, an
    /// id that does not exist (must be `NotFound` and change nothing).
    Delete {
        /// Which one.
        pick: u8,
    },
    /// Rewrite the WAL as a snapshot.
    Compact,
    /// Drop the store and open it again (recovery over a clean shutdown).
    Reopen,
    /// Open a read-only view next to the writer: it lists the same checkpoints.
    ReadOnlyView,
    /// Read every tensor of one live checkpoint and compare with the model.
    Verify {
        /// Which one.
        pick: u8,
    },
    /// Commit the staged tensors and cut the power at the `within % 6`-th sync from now (past
    /// the commit's last sync, the cut comes after it returned); reopen on a crash image.
    Crash {
        /// Which sync of the commit is the last one not to happen.
        within: u8,
        /// The crash mode (`CrashMode::ALL[mode % 5]`).
        mode: u8,
        /// Seed of the crash image.
        seed: u8,
    },
    /// Pin (`on`) or unpin a live checkpoint (`pick` modulo the live count). A pinned one must
    /// then refuse `Delete` with `Error::Pinned` and stay pinned through reopens, compactions
    /// and crashes.
    Pin {
        /// Which one.
        pick: u8,
        /// Pin or unpin.
        on: bool,
    },
    /// Apply a keep-last retention policy (`keep % 4 + 1`): the model keeps the newest that
    /// many, every pinned one, and deletes the rest.
    Retain {
        /// How many newest to keep, modulo 4, plus 1.
        keep: u8,
    },
    /// `Store::gc`: compacts mostly-dead segments (copy live chunks, Relocate record, free the
    /// old ones). Changes no checkpoint: every one must read back as before, and the space
    /// accounting must add up.
    Gc,
    /// Open a read-only store and keep it open across the following operations (replacing
    /// one held before). Its lease keeps what it saw readable through deletions and gc.
    HoldReader,
    /// Read every checkpoint the held reader saw at its open — deleted since or not —
    /// bit-exact, then close it (no-op without one).
    ReleaseReader,
}

/// Deterministic pseudo-random bytes (xorshift), different for every seed: the helper the
/// behaviour tests share (included by path, so the fuzz crate compiles it too).
pub use support::data as bytes;

#[derive(Debug, Clone, PartialEq)]
struct ModelTensor {
    name: String,
    dtype: DType,
    shape: Vec<u64>,
    data: Vec<u8>,
}

#[derive(Debug, Clone)]
struct ModelCkpt {
    step: u64,
    tensors: Vec<ModelTensor>,
    pinned: bool,
}

/// The store under test and the model it must match.
pub struct Harness {
    sim: SimIo,
    store: Option<Store>,
    /// A read-only store held open, and the checkpoints it saw at its open.
    held: Option<(Store, BTreeMap<u64, ModelCkpt>)>,
    model: BTreeMap<u64, ModelCkpt>,
    /// Staged tensors; the flag marks a duplicate name that `put_tensor` must refuse.
    pending: Vec<(ModelTensor, bool)>,
    last_id: u64,
}

const DIR: &str = "/model-store";

fn options(sim: &SimIo, read_only: bool) -> Options {
    Options {
        read_only,
        chunk_size: 4096,
        segment_max_bytes: 1 << 20,
        // Small, so automatic compaction after commits and deletes happens often.
        wal_compact_min_bytes: 4096,
        io: std::sync::Arc::new(sim.clone()),
        ..Default::default()
    }
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

impl Harness {
    /// A new, empty store on a fresh in-memory file system.
    pub fn new() -> Self {
        let sim = SimIo::new();
        let store = Store::open(DIR, options(&sim, false)).expect("create store");
        Harness {
            sim,
            store: Some(store),
            held: None,
            model: BTreeMap::new(),
            pending: Vec::new(),
            last_id: 0,
        }
    }

    fn store(&mut self) -> &mut Store {
        self.store.as_mut().expect("store open")
    }

    /// Applies one operation and checks the listing against the model.
    pub fn apply(&mut self, op: &Op) {
        match *op {
            Op::Put {
                name,
                len,
                seed,
                float,
            } => {
                let name = format!("t{}", name % 8);
                let len = (len % 20_000) as usize;
                let data = bytes(u64::from(seed % 6), len);
                let (dtype, shape) = if float && len.is_multiple_of(4) {
                    (DType::F32, vec![(len / 4) as u64])
                } else {
                    (DType::U8, vec![len as u64])
                };
                let dup = self.pending.iter().any(|(t, d)| !d && t.name == name);
                self.pending.push((
                    ModelTensor {
                        name,
                        dtype,
                        shape,
                        data,
                    },
                    dup,
                ));
            }
            Op::Commit { step } => self.commit(u64::from(step)),
            Op::Abort => {
                let pending = std::mem::take(&mut self.pending);
                let mut t = self.store().begin(0).expect("begin");
                for (m, _) in pending.iter().take(3) {
                    // Duplicates may fail here; the transaction is aborted anyway.
                    let _ = t.put_tensor(&m.name, m.dtype, &m.shape, &m.data);
                }
                t.abort();
            }
            Op::Delete { pick } => {
                let ids: Vec<u64> = self.model.keys().copied().collect();
                if pick % 5 == 4 || ids.is_empty() {
                    let missing = self.last_id + 1000;
                    match self.store().delete(missing) {
                        Err(Error::NotFound(_)) => {}
                        other => panic!("delete of missing id {missing}: {other:?}"),
                    }
                } else {
                    let id = ids[pick as usize % ids.len()];
                    let r = self.store().delete(id);
                    match (r, self.model[&id].pinned) {
                        (Err(Error::Pinned { id: p }), true) if p == id => {}
                        (Ok(_), false) => {
                            self.model.remove(&id);
                        }
                        (r, pinned) => panic!("delete {id} (pinned: {pinned}): {r:?}"),
                    }
                }
            }
            Op::Pin { pick, on } => {
                let ids: Vec<u64> = self.model.keys().copied().collect();
                if !ids.is_empty() {
                    let id = ids[pick as usize % ids.len()];
                    let was = self.model[&id].pinned;
                    let s = self.store();
                    let changed = if on { s.pin(id) } else { s.unpin(id) }
                        .unwrap_or_else(|e| panic!("pin {id} {on}: {e}"));
                    assert_eq!(
                        changed,
                        was != on,
                        "pin {id} {on} reported the wrong change"
                    );
                    self.model.get_mut(&id).expect("live").pinned = on;
                }
            }
            Op::Retain { keep } => {
                let n = usize::from(keep % 4) + 1;
                let policy = ckptstore::RetentionPolicy::new().keep_last(n);
                let newest: Vec<u64> = self.model.keys().rev().take(n).copied().collect();
                let want: Vec<u64> = self
                    .model
                    .iter()
                    .filter(|(id, c)| !c.pinned && !newest.contains(id))
                    .map(|(&id, _)| id)
                    .collect();
                let done = self
                    .store()
                    .apply_retention(&policy)
                    .unwrap_or_else(|e| panic!("retain last {n}: {e}"));
                let got: Vec<u64> = done.iter().map(|d| d.id).collect();
                assert_eq!(got, want, "retain last {n} deleted the wrong checkpoints");
                for id in got {
                    self.model.remove(&id);
                }
            }
            Op::Compact => self.store().compact_wal().expect("compact"),
            Op::Gc => {
                let reading = self.held.is_some();
                let g = self.store().gc().expect("gc");
                assert!(reading || g.segments_pending.is_empty(), "no reader: {g:?}");
                // Every byte accounted for: live segments and segments kept for readers.
                let (a, b) = (&g.after, &g.before);
                assert_eq!(
                    a.segment_bytes + a.pending_bytes + g.bytes_freed,
                    b.segment_bytes + b.pending_bytes + g.bytes_written,
                    "{g:?}"
                );
                assert_eq!(g.after.live_bytes, g.before.live_bytes, "{g:?}");
                self.check_contents();
            }
            Op::Reopen => {
                // Segments the writer kept for a reader: orphans once it is gone.
                let pending: Vec<String> = self
                    .store()
                    .pending_segments()
                    .iter()
                    .map(|&(id, _)| ckptstore::segment::file_name(id))
                    .collect();
                self.store = None;
                let s = Store::open(DIR, options(&self.sim, false)).expect("reopen");
                let r = s.recovery_report();
                assert_eq!(r.truncated_tail_bytes, 0, "clean shutdown left a torn tail");
                assert!(r.damaged_segments.is_empty(), "{:?}", r.damaged_segments);
                // Only segments the last writer kept for readers are left over (removed now,
                // or kept again for a reader still open).
                for o in &r.orphan_segments {
                    let name = o.file_name().unwrap().to_string_lossy().into_owned();
                    assert!(
                        pending.contains(&name),
                        "orphan {o:?} not pending {pending:?}"
                    );
                }
                assert!(self.held.is_some() || r.orphans_leased.is_empty());
                self.store = Some(s);
                self.check_contents();
            }
            Op::HoldReader => {
                self.held = None;
                let r = Store::open(DIR, options(&self.sim, true)).expect("read-only open");
                assert!(r.reader_lease().is_some(), "a reader holds a lease");
                self.held = Some((r, self.model.clone()));
            }
            Op::ReleaseReader => {
                if let Some((r, saw)) = self.held.take() {
                    for (&id, c) in &saw {
                        let ck = r.checkpoint(Selector::Id(id)).expect("held checkpoint");
                        for t in &c.tensors {
                            let got = ck
                                .tensor(&t.name)
                                .unwrap_or_else(|e| panic!("held reader, {id}/{}: {e}", t.name));
                            assert!(got.data == t.data, "held reader: {id}/{} differs", t.name);
                        }
                    }
                }
            }
            Op::ReadOnlyView => {
                let ro = Store::open(DIR, options(&self.sim, true)).expect("read-only open");
                let ids: Vec<(u64, bool)> = ro.list().iter().map(|c| (c.id, c.pinned)).collect();
                let want: Vec<(u64, bool)> =
                    self.model.iter().map(|(&id, c)| (id, c.pinned)).collect();
                assert_eq!(ids, want);
            }
            Op::Verify { pick } => {
                let ids: Vec<u64> = self.model.keys().copied().collect();
                if !ids.is_empty() {
                    self.check_one(ids[pick as usize % ids.len()]);
                }
            }
            Op::Crash { within, mode, seed } => self.crash(within, mode, seed),
        }
        self.check_listing();
        assert!(self.store().poisoned().is_none(), "healthy file system");
    }

    fn commit(&mut self, step: u64) {
        let pending = std::mem::take(&mut self.pending);
        let mut t = self.store().begin(step).expect("begin");
        t.set_metadata("step", step as i64);
        let mut kept = Vec::new();
        for (m, dup) in pending {
            let r = t.put_tensor(&m.name, m.dtype, &m.shape, &m.data);
            match (r, dup) {
                (Ok(()), false) => kept.push(m),
                (Err(Error::InvalidArgument(msg)), true) => {
                    assert!(msg.contains("duplicate"), "{msg}")
                }
                (r, dup) => panic!("put {:?} (duplicate: {dup}): {r:?}", m.name),
            }
        }
        let info = t.commit().expect("commit");
        let id = info.checkpoint.id;
        assert!(
            id > self.last_id,
            "ids increase: {id} after {}",
            self.last_id
        );
        assert_eq!(info.checkpoint.step, step);
        assert_eq!(info.checkpoint.tensors, kept.len());
        self.last_id = id;
        self.model.insert(
            id,
            ModelCkpt {
                step,
                tensors: kept,
                pinned: false,
            },
        );
    }

    fn crash(&mut self, within: u8, mode: u8, seed: u8) {
        let sim = self.sim.clone();
        sim.crash_at_sync(sim.sync_count() + 1 + u64::from(within % 6));
        let staged: Vec<ModelTensor> = std::mem::take(&mut self.pending)
            .into_iter()
            .filter(|(_, dup)| !dup)
            .map(|(m, _)| m)
            .collect();
        let step = u64::from(within);
        let result = (|| {
            let mut t = self.store().begin(step)?;
            for m in &staged {
                t.put_tensor(&m.name, m.dtype, &m.shape, &m.data)?;
            }
            t.commit()
        })();
        if let Ok(info) = &result {
            // Acknowledged: it must survive the power cut.
            self.last_id = info.checkpoint.id;
            let tensors = staged.clone();
            self.model.insert(
                info.checkpoint.id,
                ModelCkpt {
                    step,
                    tensors,
                    pinned: false,
                },
            );
        }
        // The process is gone: nothing of it runs again (its drops see a dead file system).
        // A power cut ends the readers too.
        self.store = None;
        self.held = None;
        let mode = CrashMode::ALL[usize::from(mode) % CrashMode::ALL.len()];
        let where_ = sim.crashed().unwrap_or_else(|| "after the commit".into());
        self.sim = sim.crash_image(mode, u64::from(seed));
        let s = Store::open(DIR, options(&self.sim, false))
            .unwrap_or_else(|e| panic!("reopen after {mode} crash ({where_}): {e}"));
        let listed: Vec<u64> = s.list().iter().map(|c| c.id).collect();
        for id in self.model.keys() {
            assert!(
                listed.contains(id),
                "acknowledged checkpoint {id} lost ({mode}, {where_})"
            );
        }
        let extra: Vec<u64> = listed
            .iter()
            .copied()
            .filter(|id| !self.model.contains_key(id))
            .collect();
        match (extra.as_slice(), &result) {
            ([], _) => {}
            // The commit in flight reached the disk whole before the cut.
            ([id], Err(_)) if *id > self.last_id => {
                self.last_id = *id;
                self.model.insert(
                    *id,
                    ModelCkpt {
                        step,
                        tensors: staged,
                        pinned: false,
                    },
                );
            }
            _ => panic!("unexpected checkpoints {extra:?} after {mode} crash ({where_})"),
        }
        let r = s.recovery_report();
        assert!(r.damaged_segments.is_empty(), "{:?}", r.damaged_segments);
        self.store = Some(s);
        self.check_contents();
    }

    fn check_listing(&mut self) {
        let listed: Vec<(u64, u64, bool)> = self
            .store()
            .list()
            .iter()
            .map(|c| (c.id, c.step, c.pinned))
            .collect();
        let want: Vec<(u64, u64, bool)> = self
            .model
            .iter()
            .map(|(&id, c)| (id, c.step, c.pinned))
            .collect();
        assert_eq!(listed, want, "listing diverged from the model");
    }

    fn check_one(&mut self, id: u64) {
        let want = self.model[&id].clone();
        let s = self.store.as_ref().expect("store open");
        let ck = s
            .checkpoint(Selector::Id(id))
            .expect("listed checkpoint opens");
        let names: Vec<&str> = want.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(ck.tensor_names(), names, "checkpoint {id}");
        for m in &want.tensors {
            let t = ck
                .tensor(&m.name)
                .unwrap_or_else(|e| panic!("checkpoint {id} tensor {}: {e}", m.name));
            assert_eq!((t.dtype, &t.shape), (m.dtype, &m.shape), "{id} {}", m.name);
            assert!(
                t.data == m.data,
                "checkpoint {id} tensor {} differs",
                m.name
            );
        }
        s.verify(id).expect("verify");
    }

    /// Every live checkpoint reads back bit-exact; `latest_valid` is the newest.
    pub fn check_contents(&mut self) {
        let ids: Vec<u64> = self.model.keys().copied().collect();
        for id in ids {
            self.check_one(id);
        }
        let latest = self
            .store
            .as_ref()
            .expect("store open")
            .latest_valid()
            .expect("latest_valid")
            .map(|c| c.id);
        assert_eq!(latest, self.model.keys().next_back().copied());
    }

    /// The simulated file system (for tests that inspect it).
    pub fn sim(&self) -> &SimIo {
        &self.sim
    }

    /// The store directory.
    pub fn dir() -> &'static Path {
        Path::new(DIR)
    }
}

/// Runs `ops` on a fresh store, then reopens and checks everything.
pub fn run(ops: &[Op]) {
    let mut h = Harness::new();
    for op in ops {
        h.apply(op);
    }
    h.apply(&Op::Reopen);
}
