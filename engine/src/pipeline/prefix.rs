//! The "saves form a prefix" rule for failures, not only for crashes: once a save fails,
//! every save begun before the caller has seen that failure fails too (it is never committed
//! after a hole), and the error of a failed save whose handle was dropped unread is reported
//! by the next [`super::Pipeline::begin`] instead of being lost.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// A failed save.
#[derive(Debug, Clone)]
pub(super) struct Failed {
    pub seq: u64,
    pub step: u64,
    pub cause: String,
}

#[derive(Debug, Default)]
struct State {
    /// The latest failure that breaks the prefix.
    failed: Option<Failed>,
    /// Saves numbered after `failed` and below this fail too. `u64::MAX` until the caller
    /// has seen the failure (a handle returned an error, or `begin` reported it); then the
    /// number of the next save begun, so saves begun after it run again.
    resume_at: u64,
    /// Saves whose handle was dropped before its result was read.
    dropped: BTreeSet<u64>,
}

/// Shared by the pipeline, its I/O thread and the save handles.
#[derive(Debug, Clone, Default)]
pub(super) struct Prefix {
    state: Arc<Mutex<State>>,
    /// Number of the next save `begin` hands out.
    next_seq: Arc<AtomicU64>,
}

impl Prefix {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Numbers a new save. Called by `begin` only (one at a time: `&mut Pipeline`).
    pub fn next(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::SeqCst)
    }

    /// The failure that save `seq` must not be committed after, if any.
    pub fn blocking(&self, seq: u64) -> Option<Failed> {
        let s = self.lock();
        s.failed
            .as_ref()
            .filter(|f| seq > f.seq && seq < s.resume_at)
            .cloned()
    }

    /// Runs `report` (which sends a save's result to its handle) under the lock, after
    /// recording the save's own failure (`Some`: it failed by itself, not for an earlier one).
    /// Under the lock so that a handle dropped at the same time is seen consistently.
    pub fn finish(&self, seq: u64, own_failure: Option<(u64, String)>, report: impl FnOnce()) {
        let mut s = self.lock();
        match own_failure {
            Some((step, cause)) if s.failed.is_none() || seq >= s.resume_at => {
                s.failed = Some(Failed { seq, step, cause });
                s.resume_at = u64::MAX;
            }
            Some(_) => {}
            None => {
                s.dropped.remove(&seq);
            }
        }
        // Numbers below the failure can never matter again.
        if let Some(f) = &s.failed {
            let keep_from = f.seq;
            s.dropped.retain(|&d| d >= keep_from);
        }
        report();
    }

    /// A handle returned an error: the caller has seen the failure.
    pub fn seen(&self) {
        let mut s = self.lock();
        if s.failed.is_some() && s.resume_at == u64::MAX {
            s.resume_at = self.next_seq.load(Ordering::SeqCst);
        }
    }

    /// Handle `seq` is dropped unread. `peek` looks at its result under the lock (`Some(true)`:
    /// it came and was a success, nothing to keep); since [`Prefix::finish`] sends results
    /// under the same lock, a result either has come or will find the handle marked dropped.
    pub fn dropped(&self, seq: u64, peek: impl FnOnce() -> Option<bool>) {
        let mut s = self.lock();
        if peek() != Some(true) {
            s.dropped.insert(seq);
        }
    }

    /// For `begin`: a failure whose handle was dropped unread, reported once (the caller has
    /// now seen it).
    pub fn take_unseen(&self) -> Option<Failed> {
        let mut s = self.lock();
        let f = s.failed.clone()?;
        if s.resume_at != u64::MAX || !s.dropped.contains(&f.seq) {
            return None;
        }
        s.resume_at = self.next_seq.load(Ordering::SeqCst);
        Some(f)
    }
}
