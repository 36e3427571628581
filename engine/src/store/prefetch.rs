//! Cold reads that run ahead of the CPU work: a load's chunks are read by [`READERS`] threads
//! that do nothing else, into the per-thread read buffers of the store's pool, while one
//! worker per core hashes each chunk, faults its destination in and copies it out. Neither
//! waits for the other unless it is the slower: the disk always has a read in flight, and a
//! core never sits in iowait while another chunk's bytes are ready.
//!
//! Why (docs/DECISIONS.md, "Cold reads run ahead of the hashing"): when each thread read its
//! chunk and then hashed and copied it, the disk was busy 82–93 % of a load and the two cores
//! idle or in iowait about half of it — every thread waited for its own read.
//!
//! Order and bounds: the readers take a free buffer, then the next chunk in order, so every
//! chunk a reader has claimed is read (no reader waits for a buffer while holding a chunk a
//! worker waits for); workers take chunks in order too. At most [`AHEAD`] buffers are in use
//! beyond one per worker. A read that fails is left to the worker, which reads the chunk itself
//! and reports the error exactly as without read-ahead; the first (lowest-index) error is the
//! one returned, and after it nothing further is started.
//!
//! Buffers in rotation: the chunks an earlier call read ahead arrive in buffers of their own,
//! and count against the same bound — a load of one tensor per call reads into one buffer per
//! worker plus [`AHEAD`], not that plus the buffers read ahead. On the 2-core VM the device
//! serves a read more slowly the more distinct memory the reads land in (DECISIONS "A dropped
//! view's memory serves the next view"); counting them cut a per-tensor load from six buffers
//! to four and its time by 5–8 % (DECISIONS "Buffers read ahead count against the rotation").

use super::reader::{CheckpointReader, Route, Scratch};
use crate::error::{Error, Result};
use ckptstore_proto::v1 as pb;
use crossbeam_channel::{bounded, select, unbounded, Receiver, Sender};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Threads that only read. Two, not three: on the 2-core VM the device's time per request
/// grows with the number of distinct buffers reads land in (a raw read rotating over 1, 2, 3,
/// 4, 6 huge-page buffers: 0.82–0.92, 0.85–0.90, 0.87–0.96, 0.97–1.08, 1.12–1.17 s for
/// 2.15 GB), so fewer readers and buffers read faster (DECISIONS "A dropped view's memory
/// serves the next view", last paragraph).
const READERS: usize = 2;
/// Buffers beyond one per worker, and chunks of the next tensor read ahead across calls.
/// Per-tensor views of 2.15 GB: 0.95–1.10 s (median 1.03) with 2 readers and 2 ahead against
/// 1.06–1.19 s (median 1.14) with 3 and 4, alternating in one sitting; one call for every
/// tensor the same either way (0.89–1.00 s).
const AHEAD: usize = 2;
/// Below this many bytes a read runs as before ([`CheckpointReader::each_chunk`]).
const MIN_BYTES: u64 = 16 << 20;
/// Chunks larger than this are read as before: the buffers ahead would hold too much.
const MAX_CHUNK: u64 = 16 << 20;

/// Whether a cold read of `chunks` runs its reads ahead ([`CheckpointReader::each_chunk_ahead`]):
/// enough bytes to keep a disk busy, none too large to hold a few of in memory.
pub(super) fn runs_ahead<'c>(chunks: impl IntoIterator<Item = &'c pb::ChunkRef>) -> bool {
    let (mut total, mut count, mut largest) = (0u64, 0usize, 0u64);
    for c in chunks {
        total += c.stored_len;
        count += 1;
        largest = largest.max(c.stored_len.max(c.raw_len));
    }
    total >= MIN_BYTES && count >= 2 && largest <= MAX_CHUNK
}

impl CheckpointReader<'_> {
    /// [`CheckpointReader::each_chunk`] for cold reads whose `work` reads chunk `i` through
    /// [`CheckpointReader::read_chunk`] (which takes the bytes read ahead from its scratch):
    /// the same results and errors, with the reads run ahead (module comment).
    ///
    /// `next`: chunks a caller expects to read next (the next tensor of a sequential load):
    /// the first [`AHEAD`] of them are read too, once every chunk of this call is claimed, and
    /// left ready in the store's buffer pool for the call that reads them, so the disk does
    /// not drain between two calls.
    pub(super) fn each_chunk_ahead<T: Send>(
        &self,
        chunks: &[pb::ChunkRef],
        next: &[pb::ChunkRef],
        items: Vec<T>,
        work: impl Fn(usize, T, &mut Scratch) -> Result<()> + Sync,
    ) -> Result<()> {
        if !runs_ahead(chunks) {
            return self.each_chunk(chunks, items, Route::Cold, work);
        }
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(chunks.len());
        let n = chunks.len();
        let trailing = next
            .iter()
            .take(AHEAD)
            .take_while(|c| c.stored_len.max(c.raw_len) <= MAX_CHUNK)
            .count();
        let buffers = workers + AHEAD;
        let (free_tx, free_rx) = bounded::<Scratch>(buffers + READERS + AHEAD);
        // Slot i holds chunk i's buffer once read: already, for the chunks an earlier call
        // read ahead.
        let (slot_tx, slot_rx): (Vec<Sender<Scratch>>, Vec<Receiver<Scratch>>) =
            (0..n).map(|_| bounded(1)).unzip();
        let index: HashMap<(u64, u64), usize> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| ((c.segment, c.offset), i))
            .collect();
        let mut filled = vec![false; n];
        let mut spare = Vec::new();
        for s in self.store.read_scratch.take_all() {
            match s.ready_for().and_then(|k| index.get(&k)) {
                Some(&i) if !filled[i] => {
                    filled[i] = true;
                    let _ = slot_tx[i].send(s);
                }
                _ => spare.push(s.unready()),
            }
        }
        // The buffers that arrive read count against the rotation (one reader each is free all
        // the same, so the disk starts at once): a load of one tensor per call keeps reading
        // into the same `buffers` buffers, never more (module comment, last paragraph).
        let ready = filled.iter().filter(|&&f| f).count();
        let mut spare = spare.into_iter();
        for _ in 0..buffers.saturating_sub(ready).max(READERS) {
            let _ = free_tx.send(spare.next().unwrap_or_default());
        }
        for s in spare {
            self.store.read_scratch.give_back(s);
        }
        let left = Mutex::new(Vec::new());
        let (todo_tx, todo_rx) = unbounded();
        for item in items.into_iter().enumerate() {
            let _ = todo_tx.send(item);
        }
        drop(todo_tx);
        let next_read = AtomicUsize::new(0);
        let failed = AtomicUsize::new(usize::MAX);
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let first_err = std::thread::scope(|scope| {
            for _ in 0..READERS {
                let (free_tx, free_rx, slot_tx) = (&free_tx, &free_rx, &slot_tx);
                let (stop_rx, next_read, failed) = (&stop_rx, &next_read, &failed);
                let (filled, left) = (&filled, &left);
                scope.spawn(move || loop {
                    // A buffer first, then a chunk: a claimed chunk is always sent on.
                    let mut s = select! {
                        recv(free_rx) -> s => match s { Ok(s) => s, Err(_) => break },
                        recv(stop_rx) -> _ => break,
                    };
                    // The next chunk not already read (the buffer stays in hand meanwhile).
                    let mut i = next_read.fetch_add(1, Ordering::Relaxed);
                    while i < n && filled[i] {
                        i = next_read.fetch_add(1, Ordering::Relaxed);
                    }
                    if i >= n {
                        // Every chunk of this call is claimed: read the next call's first.
                        if i < n + trailing && failed.load(Ordering::Relaxed) == usize::MAX {
                            self.read_ahead(&next[i - n], &mut s);
                            left.lock().unwrap_or_else(|e| e.into_inner()).push(s);
                            continue;
                        }
                        let _ = free_tx.send(s);
                        break;
                    }
                    // After an earlier chunk failed, sent on unread (its worker stops).
                    if failed.load(Ordering::Relaxed) > i {
                        self.read_ahead(&chunks[i], &mut s);
                    }
                    let _ = slot_tx[i].send(s);
                });
            }
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    let (todo_rx, slot_rx, free_tx) = (&todo_rx, &slot_rx, &free_tx);
                    let (failed, work) = (&failed, &work);
                    scope.spawn(move || -> Option<(usize, Error)> {
                        while let Ok((i, item)) = todo_rx.recv() {
                            if failed.load(Ordering::Relaxed) < i {
                                break;
                            }
                            let Ok(mut s) = slot_rx[i].recv() else {
                                break;
                            };
                            if failed.load(Ordering::Relaxed) < i {
                                let _ = free_tx.send(s);
                                break;
                            }
                            let r = work(i, item, &mut s);
                            let _ = free_tx.send(s);
                            if let Err(e) = r {
                                failed.fetch_min(i, Ordering::Relaxed);
                                return Some((i, e));
                            }
                        }
                        None
                    })
                })
                .collect();
            #[allow(clippy::expect_used)] // a worker does not panic
            let first = handles
                .into_iter()
                .filter_map(|h| h.join().expect("read worker panicked"))
                .min_by_key(|(i, _)| *i);
            // Readers waiting for a buffer are done too.
            drop(stop_tx);
            first
        });
        // Every buffer back to the store's pool: first the next call's, read ahead (the pool
        // keeps a bounded number), then the free ones and any read for a chunk no worker took
        // (after an error).
        for s in left.into_inner().unwrap_or_else(|e| e.into_inner()) {
            self.store.read_scratch.give_back(s);
        }
        drop(free_tx);
        for s in free_rx
            .try_iter()
            .chain(slot_rx.iter().filter_map(|r| r.try_recv().ok()))
        {
            self.store.read_scratch.give_back(s.unready());
        }
        match first_err {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }
}
