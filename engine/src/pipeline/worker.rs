//! The pipeline's threads: hash workers and the one I/O thread.

use super::StagingBuf;
use crate::device::Fence;
use crate::error::{Error, Result};
use crate::manifest::MetaValue;
use crate::store::{StagedEntry, Store};
use crate::CommitInfo;
use crossbeam_channel::{Receiver, Sender};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A hashed chunk, or why it could not be staged.
pub(super) type Hashed = Result<(StagingBuf, [u8; 32])>;

/// What a save sends the I/O thread, in order.
pub(super) enum Item {
    /// A tensor or blob; its chunks' results arrive, in order, on `chunks`.
    Entry {
        entry: StagedEntry,
        chunks: Receiver<Receiver<Hashed>>,
    },
    /// Everything is staged: commit.
    Commit {
        epoch: u64,
        metadata: BTreeMap<String, MetaValue>,
    },
    /// The save was dropped before submit.
    Abort,
}

/// One save, as the I/O thread sees it.
pub(super) struct Job {
    pub step: u64,
    pub items: Receiver<Item>,
    pub done: Sender<(Result<CommitInfo>, Instant)>,
}

/// A staged chunk waiting for its hash. If it is dropped before the hash worker waited on
/// its fence (the pipeline shutting down), the drop waits: a buffer must never return to the
/// pool while a device may still be copying into it.
pub(super) struct HashJob {
    pub buf: Option<StagingBuf>,
    pub fence: Option<Fence>,
    pub reply: Sender<Hashed>,
}

impl Drop for HashJob {
    fn drop(&mut self) {
        if let Some(f) = self.fence.take() {
            let _ = f.wait();
        }
    }
}

/// Hash worker: waits for each chunk's copy, hashes it, hands it to the I/O thread. A reply
/// nobody waits for any more (the save failed) just drops the buffer back into the pool.
pub(super) fn hash_loop(rx: Receiver<HashJob>) {
    for mut job in rx {
        let buf = job.buf.take().expect("set by the stager");
        let fence = job.fence.take().expect("set by the stager");
        let out = fence
            .wait()
            .map(|()| *blake3::hash(buf.bytes()).as_bytes())
            .map(|h| (buf, h));
        let _ = job.reply.send(out);
    }
}

/// The I/O thread: runs saves one after another, in submission order.
pub(super) fn io_loop(
    store: Arc<Mutex<Store>>,
    jobs: Receiver<Job>,
    poisoned: Arc<Mutex<Option<String>>>,
) {
    for job in jobs {
        let result = {
            let mut guard = store.lock().unwrap_or_else(|p| p.into_inner());
            let r = run(&mut guard, &job);
            *poisoned.lock().unwrap_or_else(|p| p.into_inner()) =
                guard.poisoned().map(str::to_owned);
            r
        };
        // Report first, then drop the save's queues: a caller still staging sees its send
        // fail and finds this result; queued chunks return their buffers as they drop.
        let _ = job.done.send((result, Instant::now()));
        drop(job);
    }
}

fn run(store: &mut Store, job: &Job) -> Result<CommitInfo> {
    let mut txn = store.begin(job.step)?;
    for item in job.items.iter() {
        match item {
            Item::Entry { entry, chunks } => {
                let staged = chunks.iter().map(|slot| {
                    slot.recv()
                        .map_err(|_| Error::invalid("a pipeline hash thread stopped"))?
                });
                txn.put_staged(entry, staged)?;
            }
            Item::Commit { epoch, metadata } => {
                txn.set_epoch(epoch);
                for (k, v) in metadata {
                    txn.set_metadata(k, v);
                }
                return txn.commit();
            }
            Item::Abort => break,
        }
    }
    Err(Error::invalid(
        "save dropped before it was submitted; nothing committed",
    ))
}
