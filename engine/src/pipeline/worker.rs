//! The pipeline's threads: hash workers (which also compress, when the store compresses) and
//! the one I/O thread.

use super::gate::CopyGate;
use super::prefix::Prefix;
use super::StagingBuf;
use crate::codec::{Compression, Encoder};
use crate::crypt::ChunkHash;
use crate::device::Fence;
use crate::error::{Error, Result};
use crate::manifest::MetaValue;
use crate::store::{StagedChunk, StagedEntry, Store};
use crate::CommitInfo;
use ckptstore_proto::v1 as pb;
use crossbeam_channel::{Receiver, Sender};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A hashed (and maybe compressed) chunk, or why it could not be staged. A compressed chunk's
/// frame replaces its raw bytes in the staging buffer (it is shorter by at least 1/8).
pub(super) type Hashed = Result<StagedChunk<StagingBuf>>;

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
    /// Its place in the order saves were begun.
    pub seq: u64,
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
    /// The codec to try after hashing ([`pb::Codec::None`]: store raw).
    pub codec: pb::Codec,
    pub reply: Sender<Hashed>,
}

impl Drop for HashJob {
    fn drop(&mut self) {
        if let Some(f) = self.fence.take() {
            let _ = f.wait();
        }
    }
}

/// Hash worker: waits for each chunk's copy, hashes it (`how`: keyed when the store seals), compresses it in place when the
/// store compresses (after hashing: BLAKE3 covers the raw bytes), hands it to the I/O thread.
/// A reply nobody waits for any more (the save failed) just drops the buffer back into the
/// pool.
///
/// Compressing in place keeps the pipeline's memory bound: a worker holds one chunk-sized
/// scratch buffer (the shuffled raw bytes) besides the pool, whatever the checkpoint size.
#[allow(clippy::expect_used)] // the stager sets a job's buffer and fence before sending it
pub(super) fn hash_loop(
    rx: Receiver<HashJob>,
    gate: &CopyGate,
    compression: Compression,
    how: ChunkHash,
) {
    yield_to_the_caller();
    // Levels are checked when the store opens, so this only fails if zstd cannot allocate
    // its context; each chunk then reports the error rather than being stored differently.
    let mut encoder = Encoder::for_compression(compression);
    for mut job in rx {
        gate.wait_open();
        let mut buf = job.buf.take().expect("set by the stager");
        let fence = job.fence.take().expect("set by the stager");
        let out = fence.wait().and_then(|()| {
            let hash = how.hash(buf.bytes());
            let raw_len = buf.bytes().len();
            let mut codec = pb::Codec::None;
            if job.codec != pb::Codec::None {
                let enc = match &mut encoder {
                    Ok(Some(enc)) => enc,
                    Ok(None) => unreachable!("a codec is asked for only when compression is on"),
                    Err(e) => return Err(Error::invalid(format!("compression: {e}"))),
                };
                if let Some(n) = enc.encode_in_place(job.codec, buf.bytes_mut()) {
                    buf.fill(n);
                    codec = job.codec;
                }
            }
            Ok(StagedChunk {
                bytes: buf,
                raw_len,
                codec,
                hash,
            })
        });
        let _ = job.reply.send(out);
    }
}

/// The I/O thread: runs saves one after another, in submission order.
pub(super) fn io_loop(
    store: Arc<Mutex<Store>>,
    jobs: Receiver<Job>,
    poisoned: Arc<Mutex<Option<String>>>,
    prefix: Prefix,
) {
    yield_to_the_caller();
    for job in jobs {
        let blocked = prefix.blocking(job.seq);
        let (result, own_failure) = {
            let mut guard = store.lock().unwrap_or_else(|p| p.into_inner());
            let (r, own_failure) = match &blocked {
                // Never committed after a hole: an earlier save failed and the caller had
                // not seen it when this one was begun.
                Some(f) => (
                    Err(Error::EarlierSaveFailed {
                        step: f.step,
                        cause: f.cause.clone(),
                    }),
                    None,
                ),
                None => match run(&mut guard, &job) {
                    Ok(c) => (Ok(c), None),
                    // The caller's own abort (dropped before submit) breaks nothing.
                    Err(Ran::Aborted(e)) => (Err(e), None),
                    Err(Ran::Failed(e)) => {
                        let cause = e.to_string();
                        (Err(e), Some((job.step, cause)))
                    }
                },
            };
            if r.is_err() {
                // Take back every buffer the failed save has queued before reporting, so
                // that when its handle returns the pool holds them all again.
                drain_items(&job.items);
            }
            *poisoned.lock().unwrap_or_else(|p| p.into_inner()) =
                guard.poisoned().map(str::to_owned);
            (r, own_failure)
        };
        // Report, then drop the save's queues: a caller still staging sees its send fail and
        // finds this result.
        prefix.finish(job.seq, own_failure, || {
            let _ = job.done.send((result, Instant::now()));
        });
        drop(job);
    }
}

/// How a save that did not commit ended.
enum Ran {
    /// Dropped by the caller before submit.
    Aborted(Error),
    /// Failed.
    Failed(Error),
}

impl From<Error> for Ran {
    fn from(e: Error) -> Self {
        Ran::Failed(e)
    }
}

fn run(store: &mut Store, job: &Job) -> std::result::Result<CommitInfo, Ran> {
    let mut txn = store.begin(job.step)?;
    for item in job.items.iter() {
        match item {
            Item::Entry { entry, chunks } => {
                let staged = chunks.iter().map(|slot| {
                    slot.recv()
                        .map_err(|_| Error::invalid("a pipeline hash thread stopped"))?
                });
                if let Err(e) = txn.put_staged(entry, staged) {
                    drain_chunks(&chunks);
                    return Err(Ran::Failed(e));
                }
            }
            Item::Commit { epoch, metadata } => {
                txn.set_epoch(epoch);
                for (k, v) in metadata {
                    txn.set_metadata(k, v);
                }
                return Ok(txn.commit()?);
            }
            Item::Abort => break,
        }
    }
    Err(Ran::Aborted(Error::invalid(
        "save dropped before it was submitted; nothing committed",
    )))
}

/// Waits for the hash results of a failed entry's queued chunks and drops them: their buffers
/// return to the pool here, not later in a hash worker. Ends when the stager closes the
/// entry's queue (it finishes the entry or drops it).
fn drain_chunks(chunks: &Receiver<Receiver<Hashed>>) {
    for slot in chunks.iter() {
        let _ = slot.recv();
    }
}

/// [`drain_chunks`] for every entry a failed save has queued so far.
fn drain_items(items: &Receiver<Item>) {
    while let Ok(item) = items.try_recv() {
        if let Item::Entry { chunks, .. } = item {
            drain_chunks(&chunks);
        }
    }
}

/// How much nicer than the caller the pipeline's threads run (Linux nice levels).
const BACKGROUND_NICE: i32 = 10;

/// Lowers this thread's scheduling priority (Linux: the nice value is per thread) so that on
/// a machine with few cores the caller's copy into the staging pool — the stall — and the
/// trainer's own work get the cores first, and hashing and writing take what is left (issue
/// 13). Best effort: where the call is refused the thread runs at the caller's priority.
fn yield_to_the_caller() {
    #[cfg(target_os = "linux")]
    {
        let tid = rustix::thread::gettid();
        if let Ok(now) = rustix::process::getpriority_process(Some(tid)) {
            let _ = rustix::process::setpriority_process(Some(tid), now + BACKGROUND_NICE);
        }
    }
}
