//! The handle of a save in flight, and its report.

use crate::error::{Error, Result};
use crate::CommitInfo;
use crossbeam_channel::Receiver;
use std::time::{Duration, Instant};

/// What a finished save did.
#[derive(Debug, Clone, PartialEq)]
pub struct SaveReport {
    /// The committed checkpoint and the bytes written vs deduplicated.
    pub commit: CommitInfo,
    /// Time the caller was blocked, from `begin` to the return of `submit` (copies into the
    /// staging buffers, and waiting for a free buffer).
    pub stall: Duration,
    /// Part of `stall` spent waiting for a free staging buffer (the pool was empty).
    pub pool_wait: Duration,
    /// From `begin` to the commit record being durable.
    pub time_to_durable: Duration,
    /// Bytes staged (tensor and blob bytes of the checkpoint).
    pub bytes_staged: u64,
}

/// A save whose snapshot is taken and whose commit is in progress. [`SaveHandle::wait`]
/// returns the committed checkpoint or the save's error; dropping the handle does not cancel
/// the save (it still commits, or fails, in order).
#[derive(Debug)]
pub struct SaveHandle {
    done: Receiver<(Result<CommitInfo>, Instant)>,
    started: Instant,
    stall: Duration,
    pool_wait: Duration,
    bytes: u64,
}

impl SaveHandle {
    pub(super) fn new(
        done: Receiver<(Result<CommitInfo>, Instant)>,
        started: Instant,
        stall: Duration,
        pool_wait: Duration,
        bytes: u64,
    ) -> Self {
        SaveHandle {
            done,
            started,
            stall,
            pool_wait,
            bytes,
        }
    }

    /// Time the caller was blocked staging this save.
    pub fn stall(&self) -> Duration {
        self.stall
    }

    /// Whether the save has finished (committed or failed); `wait` will not block.
    pub fn is_done(&self) -> bool {
        !self.done.is_empty()
    }

    /// Waits until the checkpoint is durable (or the save failed).
    pub fn wait(self) -> Result<SaveReport> {
        let (result, at) = self.done.recv().map_err(|_| {
            Error::invalid("the pipeline stopped before this save finished; nothing committed")
        })?;
        let commit = result?;
        Ok(SaveReport {
            commit,
            stall: self.stall,
            pool_wait: self.pool_wait,
            time_to_durable: at.saturating_duration_since(self.started),
            bytes_staged: self.bytes,
        })
    }
}
