//! [`Replicator`]: a background thread that publishes a local store's states to its replica
//! bucket, newest first among those waiting (older ones are skipped: the bucket only ever holds
//! a state the local store had, so its checkpoints are a prefix of the local commits). A failed
//! round is retried with backoff; a lost race with another writer stops it for good.

use super::bucket::Bucket;
use super::publish::{LocalImage, Publisher};
use crate::error::{Error, Result};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::collections::BTreeSet;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where one checkpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replication {
    /// Committed locally; not yet in the bucket.
    LocalOnly,
    /// In the bucket's newest commit object.
    Replicated,
}

/// What the replicator has done.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// Sequence number of the newest commit object it created (or found).
    pub seq: u64,
    /// The local generation that object holds.
    pub generation: u64,
    /// The checkpoints it holds.
    pub checkpoints: BTreeSet<u64>,
    /// The last failure, until a round succeeds.
    pub last_error: Option<String>,
    /// Set when it stopped for good (another writer won the bucket).
    pub stopped: bool,
}

type Shared = Arc<(Mutex<ReplicaStatus>, Condvar)>;

/// The background replicator of one store.
pub struct Replicator {
    tx: Option<Sender<LocalImage>>,
    shared: Shared,
    bucket: Arc<Bucket>,
    handle: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Replicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator")
            .field("bucket", &self.bucket)
            .field("status", &self.status())
            .finish()
    }
}

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, ReplicaStatus> {
    s.0.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Replicator {
    /// Starts the thread; `known` are the checkpoints the bucket's head already holds.
    pub fn start(publisher: Publisher, known: BTreeSet<u64>) -> Result<Replicator> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let shared: Shared = Arc::new((
            Mutex::new(ReplicaStatus {
                seq: publisher.head_seq(),
                checkpoints: known,
                ..Default::default()
            }),
            Condvar::new(),
        ));
        let bucket = publisher.bucket().clone();
        let s = shared.clone();
        let handle = std::thread::Builder::new()
            .name("ckptstore-replicator".into())
            .spawn(move || run(publisher, rx, s))
            .map_err(|e| Error::invalid(format!("cannot start the replicator thread: {e}")))?;
        Ok(Replicator {
            tx: Some(tx),
            shared,
            bucket,
            handle: Some(handle),
        })
    }

    /// Queues a state to publish (a newer one queued later supersedes it).
    pub fn submit(&self, img: LocalImage) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(img);
        }
    }

    /// Records that the bucket already holds generation `generation` (nothing to publish).
    pub fn mark_current(&self, generation: u64) {
        lock(&self.shared).generation = generation;
        self.shared.1.notify_all();
    }

    /// What it has done.
    pub fn status(&self) -> ReplicaStatus {
        lock(&self.shared).clone()
    }

    /// Waits until the bucket holds local generation `generation` or newer. `Err` with the
    /// status on timeout or when the replicator stopped.
    pub fn wait(
        &self,
        generation: u64,
        timeout: Option<Duration>,
    ) -> std::result::Result<(), ReplicaStatus> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = lock(&self.shared);
        loop {
            if st.generation >= generation {
                return Ok(());
            }
            if st.stopped {
                return Err(st.clone());
            }
            let wait = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) => left.min(Duration::from_millis(200)),
                    None => return Err(st.clone()),
                },
                None => Duration::from_millis(200),
            };
            st = self
                .shared
                .1
                .wait_timeout(st, wait)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for Replicator {
    /// Stops between two requests (an upload in flight is abandoned: the next open resumes
    /// it) and joins the thread.
    fn drop(&mut self) {
        self.tx = None;
        self.bucket.cancel();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn run(mut publisher: Publisher, rx: Receiver<LocalImage>, shared: Shared) {
    let newest = |first: LocalImage| rx.try_iter().fold(first, |_, newer| newer);
    let Ok(first) = rx.recv() else { return };
    let mut img = newest(first);
    let mut backoff = Duration::from_millis(100);
    loop {
        match publisher.publish(&img) {
            Ok(seq) => {
                let mut st = lock(&shared);
                st.seq = seq;
                st.generation = img.generation;
                st.checkpoints = img.checkpoints.iter().copied().collect();
                st.last_error = None;
                drop(st);
                shared.1.notify_all();
                backoff = Duration::from_millis(100);
                match rx.recv() {
                    Ok(next) => img = newest(next),
                    Err(_) => return,
                }
            }
            Err(e) => {
                // Another writer won the bucket, or this client was stopped: for good.
                let stop =
                    matches!(e, Error::WriterConflict { .. }) || publisher.bucket().is_stopped();
                let mut st = lock(&shared);
                st.last_error = Some(e.to_string());
                st.stopped = stop;
                drop(st);
                shared.1.notify_all();
                if stop {
                    return;
                }
                match rx.recv_timeout(backoff) {
                    Ok(next) => img = newest(next),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}
