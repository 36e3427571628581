//! The asynchronous write path: the caller's thread only copies its tensors into staging
//! buffers; hashing runs on worker threads and writes, fdatasyncs and the commit record on
//! one I/O thread, in bounded memory.
//!
//! ```text
//! caller (save)          hash workers                  I/O thread
//! stage ──copy──▶ pool buffer ──▶ BLAKE3 (+zstd) ──▶ dedup, write chunk ──▶ fdatasync ──▶ commit record
//!   ▲                                                   │
//!   └── blocks only when the pool is empty ◀── buffer back to the pool once written
//! ```
//!
//! Several saves may be in flight; they commit in submission order, each through the same
//! [`Transaction`](crate::Transaction) code (and so the same commit protocol) as a
//! synchronous save. A failed save reports its error through its handle; a failed fsync
//! poisons the store, and every later save reports that. Saves commit as a prefix of those
//! begun even when one fails without poisoning: the saves begun before the caller has seen
//! the failure fail too (`Error::EarlierSaveFailed`), and a failure whose handle was dropped
//! unread is reported by the next `begin` (see `prefix.rs`).

mod gate;
mod handle;
mod prefix;
mod worker;

pub use crate::staging::{PoolInfo, StagingBuf, StagingPool};
pub use handle::{SaveHandle, SaveReport};

use crate::device::{HostSource, Source};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::manifest::{self, MetaValue};
use crate::store::{StagedEntry, Store};
use crossbeam_channel::{Receiver, Sender};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use worker::{HashJob, Item, Job};

/// Most chunks staged (copied) together: a host tensor's batch is copied on several cores.
const COPY_BATCH: usize = 8;

/// Options of [`Pipeline::new`].
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// Bytes of staging buffers (one buffer per chunk of the store's `chunk_size`). Default
    /// 256 MiB. Peak extra memory of the pipeline stays within it whatever the checkpoint
    /// size. Must hold at least one chunk.
    pub budget_bytes: usize,
    /// Threads that hash staged chunks. Default: half the cores, 1 to 4.
    pub hash_workers: usize,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        PipelineOptions {
            budget_bytes: 256 << 20,
            hash_workers: (cores / 2).clamp(1, 4),
        }
    }
}

/// A store with its write pipeline. Owns the store; reach it with [`Pipeline::store`] (which
/// waits while a save is being written) and take it back with [`Pipeline::close`].
pub struct Pipeline {
    store: Option<Arc<Mutex<Store>>>,
    /// Why the store is poisoned, as the I/O thread last saw it (checked without waiting for
    /// the store's lock, which the I/O thread holds while a save is written).
    poisoned: Arc<Mutex<Option<String>>>,
    pool: StagingPool,
    chunk_size: usize,
    /// The store's compression, applied by the hash workers.
    compression: crate::codec::Compression,
    jobs: Option<Sender<Job>>,
    hash_tx: Option<Sender<HashJob>>,
    threads: Vec<JoinHandle<()>>,
    prefix: prefix::Prefix,
    /// Held closed while the caller copies: the hash workers wait (copy first, hash later).
    gate: Arc<gate::CopyGate>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("pool", &self.pool)
            .field("chunk_size", &self.chunk_size)
            .finish()
    }
}

impl Pipeline {
    /// Starts the pipeline's threads and allocates its staging pool. The store must be
    /// writable.
    pub fn new(store: Store, opts: PipelineOptions) -> Result<Pipeline> {
        store.check_writable()?;
        if opts.hash_workers == 0 {
            return Err(Error::invalid("hash_workers must be at least 1"));
        }
        let chunk_size = store.options().chunk_size;
        let compression = store.options().compression;
        let how = store.keys().chunk_hash();
        let pool = StagingPool::new(opts.budget_bytes, chunk_size)?;
        let store = Arc::new(Mutex::new(store));
        let (hash_tx, hash_rx) = crossbeam_channel::unbounded::<HashJob>();
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded::<Job>();
        let mut threads = Vec::new();
        let gate = Arc::new(gate::CopyGate::default());
        for i in 0..opts.hash_workers {
            let rx = hash_rx.clone();
            let gate = gate.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("ckpt-hash-{i}"))
                    .spawn(move || worker::hash_loop(rx, &gate, compression, how))
                    .map_err(|e| Error::invalid(format!("cannot start a hash thread: {e}")))?,
            );
        }
        let io_store = store.clone();
        let poisoned = Arc::new(Mutex::new(None));
        let io_poisoned = poisoned.clone();
        let prefix = prefix::Prefix::default();
        let io_prefix = prefix.clone();
        threads.push(
            std::thread::Builder::new()
                .name("ckpt-io".into())
                .spawn(move || worker::io_loop(io_store, jobs_rx, io_poisoned, io_prefix))
                .map_err(|e| Error::invalid(format!("cannot start the I/O thread: {e}")))?,
        );
        Ok(Pipeline {
            store: Some(store),
            poisoned,
            pool,
            chunk_size,
            compression,
            jobs: Some(jobs_tx),
            hash_tx: Some(hash_tx),
            threads,
            prefix,
            gate,
        })
    }

    /// The staging pool (its shape, and how many buffers are in use).
    pub fn pool(&self) -> &StagingPool {
        &self.pool
    }

    /// The store, for listing, reading and deleting. Waits while a save is being written.
    /// If what the caller does through it poisons the store (a delete whose fsync fails),
    /// the next [`Pipeline::begin`] refuses with the reason.
    #[allow(clippy::expect_used)] // the store and the channels are present until close/submit
    pub fn store(&self) -> StoreGuard<'_> {
        StoreGuard {
            store: self
                .store
                .as_ref()
                .expect("present until close")
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
            poisoned: &self.poisoned,
        }
    }

    /// Starts a save at `step`. Add tensors, then [`Save::submit`]. One save is staged at a
    /// time (the `&mut` borrow), which is what keeps the pool free of deadlock: a save's
    /// chunks are all queued before the next one takes buffers.
    #[allow(clippy::expect_used)] // the store and the channels are present until close/submit
    pub fn begin(&mut self, step: u64) -> Result<Save<'_>> {
        if let Some(why) = self
            .poisoned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return Err(Error::Poisoned { cause: why.clone() });
        }
        if let Some(f) = self.prefix.take_unseen() {
            return Err(Error::EarlierSaveFailed {
                step: f.step,
                cause: format!("{} (its handle was dropped unread)", f.cause),
            });
        }
        let seq = self.prefix.next();
        let (items_tx, items_rx) = crossbeam_channel::unbounded();
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        self.jobs
            .as_ref()
            .expect("open until close")
            .send(Job {
                seq,
                step,
                items: items_rx,
                done: done_tx,
            })
            .map_err(|_| Error::invalid("the pipeline's I/O thread has stopped"))?;
        Ok(Save {
            seq,
            pipeline: self,
            items: Some(items_tx),
            done: Some(done_rx),
            started: Instant::now(),
            stall: Duration::ZERO,
            pool_wait: Duration::ZERO,
            names: HashSet::new(),
            blob_names: HashSet::new(),
            metadata: BTreeMap::new(),
            epoch: 0,
            bytes: 0,
            failed: None,
        })
    }

    /// Waits for every save in flight, stops the threads and returns the store.
    #[allow(clippy::expect_used)] // the store and the channels are present until close/submit
    pub fn close(mut self) -> Store {
        self.shutdown();
        let store = self.store.take().expect("present until close");
        match Arc::try_unwrap(store) {
            Ok(m) => m.into_inner().unwrap_or_else(|p| p.into_inner()),
            Err(_) => unreachable!("every thread holding the store has been joined"),
        }
    }

    fn shutdown(&mut self) {
        self.jobs.take();
        self.hash_tx.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The pipeline's store, borrowed (see [`Pipeline::store`]). On drop it records whether
/// the store is poisoned, for [`Pipeline::begin`] (which does not wait for the store's lock).
pub struct StoreGuard<'p> {
    store: MutexGuard<'p, Store>,
    poisoned: &'p Mutex<Option<String>>,
}

impl std::ops::Deref for StoreGuard<'_> {
    type Target = Store;
    fn deref(&self) -> &Store {
        &self.store
    }
}

impl std::ops::DerefMut for StoreGuard<'_> {
    fn deref_mut(&mut self) -> &mut Store {
        &mut self.store
    }
}

impl Drop for StoreGuard<'_> {
    fn drop(&mut self) {
        if let Some(why) = self.store.poisoned() {
            // Poisoning is for good (until reopened): only ever set it here.
            *self.poisoned.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.to_owned());
        }
    }
}

/// A save being staged. Dropping it without [`Save::submit`] aborts it (nothing is
/// committed; what was written is removed).
pub struct Save<'p> {
    seq: u64,
    pipeline: &'p mut Pipeline,
    items: Option<Sender<Item>>,
    done: Option<Receiver<(Result<crate::CommitInfo>, Instant)>>,
    started: Instant,
    stall: Duration,
    pool_wait: Duration,
    names: HashSet<String>,
    blob_names: HashSet<String>,
    metadata: BTreeMap<String, MetaValue>,
    epoch: u64,
    bytes: u64,
    failed: Option<String>,
}

impl Save<'_> {
    /// Sets the epoch (default 0).
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    /// Sets a user metadata value.
    pub fn set_metadata(&mut self, key: impl Into<String>, value: impl Into<MetaValue>) {
        self.metadata.insert(key.into(), value.into());
    }

    /// Copies a host tensor into staging buffers; returns once the copy is done (the caller
    /// may change `data` from then on). Blocks while the pool is empty.
    pub fn put_tensor(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[u64],
        data: &[u8],
    ) -> Result<()> {
        self.put_tensor_from(name, dtype, shape, &HostSource(data))
    }

    /// Stages a tensor from any [`Source`] (host memory, a GPU).
    pub fn put_tensor_from(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[u64],
        src: &dyn Source,
    ) -> Result<()> {
        self.check_usable()?;
        if !self.names.insert(name.to_owned()) {
            return Err(Error::invalid(format!(
                "duplicate tensor name {name:?} in one checkpoint"
            )));
        }
        let expected = manifest::tensor_nbytes(dtype, shape)
            .ok_or_else(|| Error::invalid(format!("tensor {name:?}: shape {shape:?} overflows")))?;
        if expected != src.len() {
            self.names.remove(name);
            return Err(Error::invalid(format!(
                "tensor {name:?}: {} bytes given, {dtype} × {shape:?} needs {expected}",
                src.len()
            )));
        }
        let entry = StagedEntry::Tensor {
            name: name.to_owned(),
            dtype,
            shape: shape.to_vec(),
        };
        self.stage(entry, src)
    }

    /// Copies an opaque blob into staging buffers.
    pub fn put_blob(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.check_usable()?;
        if !self.blob_names.insert(name.to_owned()) {
            return Err(Error::invalid(format!(
                "duplicate blob name {name:?} in one checkpoint"
            )));
        }
        let entry = StagedEntry::Blob {
            name: name.to_owned(),
            nbytes: data.len() as u64,
        };
        self.stage(entry, &HostSource(data))
    }

    fn check_usable(&self) -> Result<()> {
        if let Some(why) = &self.failed {
            return Err(Error::invalid(format!(
                "save failed earlier ({why}); drop it and begin a new one"
            )));
        }
        Ok(())
    }

    fn stage(&mut self, entry: StagedEntry, src: &dyn Source) -> Result<()> {
        let t = Instant::now();
        let out = self.stage_chunks(entry, src);
        self.stall += t.elapsed();
        if let Err(e) = &out {
            self.failed = Some(e.to_string());
        }
        out
    }

    #[allow(clippy::expect_used)] // the store and the channels are present until close/submit
    fn stage_chunks(&mut self, entry: StagedEntry, src: &dyn Source) -> Result<()> {
        let total = src.len();
        let cs = self.pipeline.chunk_size as u64;
        let n = total.div_ceil(cs);
        let codec = self.pipeline.compression.codec_for(match &entry {
            StagedEntry::Tensor { dtype, .. } => Some(*dtype),
            StagedEntry::Blob { .. } => None,
        });
        let (chunks_tx, chunks_rx) = crossbeam_channel::unbounded();
        self.send(Item::Entry {
            entry,
            chunks: chunks_rx,
        })?;
        let hash_tx = self.pipeline.hash_tx.clone().expect("open until close");
        // Chunks are staged in batches, so a source can copy several at once (a host tensor
        // is copied on several cores). A batch never holds more buffers than the pool has:
        // every other buffer belongs to a chunk already queued, which the I/O thread frees.
        let batch = COPY_BATCH.min(self.pipeline.pool.info().buffers) as u64;
        // Copy first, hash later: the hash workers wait while this copies, except while it
        // waits for a buffer (which only they and the I/O thread can free).
        let gate = self.pipeline.gate.clone();
        let mut copying = gate.close();
        let mut k = 0;
        while k < n {
            let b = batch.min(n - k);
            let mut bufs = Vec::with_capacity(b as usize);
            let mut ranges = Vec::with_capacity(b as usize);
            for j in k..k + b {
                let off = j * cs;
                let pool = &self.pipeline.pool;
                let (buf, waited) = match pool.try_acquire() {
                    Some(buf) => (buf, Duration::ZERO),
                    None => copying.opened_for(|| pool.acquire()),
                };
                self.pool_wait += waited;
                bufs.push(buf);
                ranges.push((off, (total - off).min(cs) as usize));
            }
            let fences = src.stage_many(&ranges, &mut bufs)?;
            for (buf, fence) in bufs.into_iter().zip(fences) {
                let (tx, rx) = crossbeam_channel::bounded(1);
                let job = HashJob {
                    buf: Some(buf),
                    fence: Some(fence),
                    codec,
                    reply: tx,
                };
                // Queue the result slot first so the I/O thread sees chunks in order.
                if chunks_tx.send(rx).is_err() {
                    drop(job); // waits for its copy before the buffer goes back
                    return Err(self.io_stopped());
                }
                hash_tx
                    .send(job)
                    .map_err(|_| Error::invalid("the pipeline's hash threads have stopped"))?;
            }
            k += b;
        }
        drop(copying);
        src.finish_snapshot()?;
        self.bytes += total;
        Ok(())
    }

    #[allow(clippy::expect_used)] // the store and the channels are present until close/submit
    fn send(&mut self, item: Item) -> Result<()> {
        match self.items.as_ref().expect("open until submit").send(item) {
            Ok(()) => Ok(()),
            Err(_) => Err(self.io_stopped()),
        }
    }

    /// The I/O thread dropped this save's queue: it failed, and its result, taken here, is
    /// the error the staging call returns (this save never gets a handle).
    fn io_stopped(&mut self) -> Error {
        match self.done.as_ref().and_then(|d| d.try_recv().ok()) {
            Some((Err(e), _)) => {
                // The caller sees the failure now, as through a handle's `wait`: saves begun
                // from here on run again. (Else the next save, begun after the caller was
                // told, would still fail for it — or not, had the failure reached a handle:
                // the outcome would hang on thread timing.)
                self.pipeline.prefix.seen();
                e
            }
            _ => Error::invalid("the pipeline's I/O thread has stopped"),
        }
    }

    /// Ends staging: the snapshot is taken (the caller may change every tensor it passed).
    /// The returned handle reports the commit. Blocks only while staging buffers are busy.
    #[allow(clippy::expect_used)] // the store and the channels are present until close/submit
    pub fn submit(mut self) -> Result<SaveHandle> {
        self.check_usable()?;
        let t = Instant::now();
        let commit = Item::Commit {
            epoch: self.epoch,
            metadata: std::mem::take(&mut self.metadata),
        };
        self.send(commit)?;
        self.items.take();
        self.stall += t.elapsed();
        Ok(SaveHandle::new(
            self.seq,
            self.pipeline.prefix.clone(),
            self.done.take().expect("present until submit"),
            self.started,
            self.stall,
            self.pool_wait,
            self.bytes,
        ))
    }
}

impl Drop for Save<'_> {
    fn drop(&mut self) {
        if let Some(items) = self.items.take() {
            // Not submitted: tell the I/O thread to abort, and wait so that the next save
            // starts from a clean state.
            let _ = items.send(Item::Abort);
            drop(items);
            if let Some(done) = self.done.take() {
                let _ = done.recv();
            }
        }
    }
}
