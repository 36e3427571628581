//! Copy first, hash later: while the caller copies its tensors into staging buffers, the hash
//! workers wait, so that on a machine with few cores the copy — the caller's stall — has every
//! core to itself, and hashing (then writing) runs when the caller is back at its own work or
//! is waiting for a buffer (issue 13; DECISIONS.md, "The async stall on two cores").
//!
//! Lowering the workers' priority alone (`nice`) is not enough: a worker already hashing a
//! 4 MiB chunk keeps its core until the scheduler preempts it, and a chunk hashes in about a
//! millisecond, so the copy loses a share of a core for every chunk in flight.

use std::sync::{Condvar, Mutex};

/// How many copies are in progress (0: hashing may run).
#[derive(Debug, Default)]
pub(super) struct CopyGate {
    copying: Mutex<usize>,
    open: Condvar,
}

impl CopyGate {
    /// Closes the gate until the returned guard is dropped (on every path, a panic included).
    pub(super) fn close(&self) -> Closed<'_> {
        *self.copying.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        Closed { gate: self }
    }

    /// Waits while a copy is in progress.
    pub(super) fn wait_open(&self) {
        let mut n = self.copying.lock().unwrap_or_else(|p| p.into_inner());
        while *n > 0 {
            n = self.open.wait(n).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn reopen(&self) {
        let mut n = self.copying.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.open.notify_all();
        }
    }
}

/// The gate held closed by a copy in progress.
#[derive(Debug)]
pub(super) struct Closed<'g> {
    gate: &'g CopyGate,
}

impl Closed<'_> {
    /// Opens the gate for the duration of `f` (the caller blocks on something the workers
    /// must make progress on, such as a free staging buffer), then closes it again.
    pub(super) fn opened_for<T>(&mut self, f: impl FnOnce() -> T) -> T {
        self.gate.reopen();
        let out = f();
        *self.gate.copying.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        out
    }
}

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        self.gate.reopen();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn workers_wait_while_a_copy_runs_and_while_it_is_reopened_they_do_not() {
        let gate = Arc::new(CopyGate::default());
        let mut closed = gate.close();
        let g = gate.clone();
        let waiter = std::thread::spawn(move || g.wait_open());
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !waiter.is_finished(),
            "a worker ran while the copy held the gate"
        );
        // Waiting for a buffer: the workers must run (else the caller waits forever).
        closed.opened_for(|| {
            let g = gate.clone();
            std::thread::spawn(move || g.wait_open()).join().unwrap();
        });
        drop(closed);
        waiter.join().unwrap();
        gate.wait_open(); // open again: returns at once
    }
}
