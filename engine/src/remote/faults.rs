//! A fault injector for [`super::Bucket`]: counts requests and fails chosen ones, so tests can
//! stop a writer between any two requests (a crash as the bucket sees it), make requests fail
//! transiently (retried), or make them slow (past the request timeout, retried).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

/// What happens to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A transient failure (as a 503 or a reset connection): retried.
    Error,
    /// The request takes this long before it starts (a slow part): past the request timeout,
    /// it is abandoned and retried.
    Slow(Duration),
}

#[derive(Debug, Default)]
struct State {
    requests: u64,
    stop_after: Option<u64>,
    at: BTreeMap<u64, Fault>,
    every: Option<Fault>,
}

/// Shared by a test and the [`super::Bucket`] it injects into.
#[derive(Debug, Default)]
pub struct Faults {
    state: Mutex<State>,
}

/// The verdict for one request.
pub(crate) enum Verdict {
    Go,
    Fault(Fault),
    /// The writer is dead: no request reaches the bucket any more.
    Stopped,
}

impl Faults {
    /// No faults yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Requests after the first `n` never reach the bucket: the writer "dies" there.
    pub fn stop_after(&self, n: u64) {
        self.state().stop_after = Some(n);
    }

    /// Request number `n` (1-based, counting from now on the total) gets `fault`.
    pub fn at(&self, n: u64, fault: Fault) {
        self.state().at.insert(n, fault);
    }

    /// Every request gets `fault` (None: stop doing so).
    pub fn every(&self, fault: Option<Fault>) {
        self.state().every = fault;
    }

    /// Requests seen so far (including stopped and faulted ones).
    pub fn requests(&self) -> u64 {
        self.state().requests
    }

    pub(crate) fn next(&self) -> Verdict {
        let mut s = self.state();
        s.requests += 1;
        let n = s.requests;
        if s.stop_after.is_some_and(|k| n > k) {
            return Verdict::Stopped;
        }
        if let Some(f) = s.at.remove(&n).or(s.every) {
            return Verdict::Fault(f);
        }
        Verdict::Go
    }
}
