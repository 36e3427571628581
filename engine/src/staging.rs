//! The staging pool: a fixed byte budget of page-aligned host buffers, allocated once,
//! pre-faulted and page-locked where the OS allows, reused for every checkpoint.
//!
//! Copying into memory that is already faulted in runs an order of magnitude faster than
//! into fresh pages (the kernel zeroes and maps every new page), so reuse is the point: the
//! trainer's stall is one `memcpy` into warm memory. A buffer returns to the pool when its
//! [`StagingBuf`] is dropped — after its chunk was written, or on any error path — so the
//! pool never leaks, and a caller that finds it empty blocks until the I/O thread frees one
//! (backpressure).

use crate::error::{Error, Result};
use crossbeam_channel::{Receiver, Sender};
use memmap2::{MmapMut, MmapOptions};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the pool's memory came from and what the OS granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolInfo {
    /// Buffers in the pool.
    pub buffers: usize,
    /// Bytes per buffer (the store's chunk size).
    pub buffer_bytes: usize,
    /// Whether every buffer is page-locked (`mlock`, or CUDA pinned memory). `false` when
    /// `RLIMIT_MEMLOCK` is too small: the buffers are then pre-faulted but swappable.
    pub locked: bool,
}

struct Shared {
    free_tx: Sender<MmapMut>,
    free_rx: Receiver<MmapMut>,
    buffer_bytes: usize,
    buffers: usize,
    in_use: AtomicUsize,
    locked: bool,
}

/// A fixed set of reusable staging buffers. Cheap to clone (shared).
#[derive(Clone)]
pub struct StagingPool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for StagingPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagingPool")
            .field("info", &self.info())
            .field("in_use", &self.in_use())
            .finish()
    }
}

impl StagingPool {
    /// Allocates `budget / buffer_bytes` buffers of `buffer_bytes` each (page-aligned,
    /// pre-faulted, `mlock`ed when allowed). A budget below one buffer is an error: a pool
    /// with no buffer would block its first caller forever.
    #[allow(clippy::expect_used)] // the channel has room for every buffer of the pool
    pub fn new(budget: usize, buffer_bytes: usize) -> Result<StagingPool> {
        if buffer_bytes == 0 {
            return Err(Error::invalid("staging buffer size must be positive"));
        }
        let buffers = budget / buffer_bytes;
        if buffers == 0 {
            return Err(Error::invalid(format!(
                "staging budget of {budget} bytes is smaller than one chunk ({buffer_bytes} \
                 bytes); raise the budget or lower the store's chunk_size"
            )));
        }
        let (free_tx, free_rx) = crossbeam_channel::bounded(buffers);
        let mut locked = true;
        for _ in 0..buffers {
            let map = MmapOptions::new()
                .len(buffer_bytes)
                .populate()
                .map_anon()
                .map_err(|e| {
                    Error::invalid(format!(
                        "cannot allocate a {buffer_bytes}-byte staging buffer: {e}"
                    ))
                })?;
            // Only a request: a small RLIMIT_MEMLOCK refuses it, and the buffers still work.
            locked &= map.lock().is_ok();
            free_tx.send(map).expect("the channel holds every buffer");
        }
        Ok(StagingPool {
            shared: Arc::new(Shared {
                free_tx,
                free_rx,
                buffer_bytes,
                buffers,
                in_use: AtomicUsize::new(0),
                locked,
            }),
        })
    }

    /// The pool's shape and whether its memory is locked.
    pub fn info(&self) -> PoolInfo {
        PoolInfo {
            buffers: self.shared.buffers,
            buffer_bytes: self.shared.buffer_bytes,
            locked: self.shared.locked,
        }
    }

    /// Buffers currently handed out (0 when every save has finished: nothing leaked).
    pub fn in_use(&self) -> usize {
        self.shared.in_use.load(Ordering::SeqCst)
    }

    /// Takes a buffer, blocking while the pool is empty. Returns it with the time spent
    /// waiting.
    #[allow(clippy::expect_used)] // the pool owns a sender, so the channel never disconnects
    pub fn acquire(&self) -> (StagingBuf, Duration) {
        let t = Instant::now();
        if let Some(buf) = self.try_acquire() {
            return (buf, t.elapsed());
        }
        let map = self
            .shared
            .free_rx
            .recv()
            .expect("the pool owns a sender, so the channel never disconnects");
        self.shared.in_use.fetch_add(1, Ordering::SeqCst);
        (
            StagingBuf {
                map: Some(map),
                len: 0,
                pool: self.shared.clone(),
            },
            t.elapsed(),
        )
    }

    /// Takes a buffer if one is free, without waiting.
    pub fn try_acquire(&self) -> Option<StagingBuf> {
        let map = self.shared.free_rx.try_recv().ok()?;
        self.shared.in_use.fetch_add(1, Ordering::SeqCst);
        Some(StagingBuf {
            map: Some(map),
            len: 0,
            pool: self.shared.clone(),
        })
    }

    /// Calls `f` with each buffer's memory once, while no buffer is handed out (CUDA host
    /// registration). Fails if a buffer is in use.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    #[allow(clippy::expect_used)] // the channel has room for every buffer of the pool
    pub(crate) fn for_each_buffer(&self, mut f: impl FnMut(&mut [u8]) -> Result<()>) -> Result<()> {
        let mut taken = Vec::with_capacity(self.shared.buffers);
        for _ in 0..self.shared.buffers {
            match self.shared.free_rx.try_recv() {
                Ok(m) => taken.push(m),
                Err(_) => break,
            }
        }
        let all = taken.len() == self.shared.buffers;
        let mut out = Ok(());
        if all {
            for m in taken.iter_mut() {
                if let Err(e) = f(&mut m[..]) {
                    out = Err(e);
                    break;
                }
            }
        } else {
            out = Err(Error::invalid("staging pool is in use"));
        }
        for m in taken {
            self.shared.free_tx.send(m).expect("room for every buffer");
        }
        out
    }
}

/// One staging buffer, holding `len()` valid bytes. Returns to its pool when dropped.
pub struct StagingBuf {
    map: Option<MmapMut>,
    len: usize,
    pool: Arc<Shared>,
}

impl std::fmt::Debug for StagingBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "StagingBuf({} of {} bytes)",
            self.len, self.pool.buffer_bytes
        )
    }
}

impl StagingBuf {
    /// The buffer's capacity (the pool's buffer size).
    pub fn capacity(&self) -> usize {
        self.pool.buffer_bytes
    }

    /// Sets how many bytes are valid and returns them for writing.
    #[allow(clippy::expect_used)] // the buffer's memory is present until drop
    pub fn fill(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= self.capacity(), "chunk larger than a staging buffer");
        self.len = len;
        &mut self.map.as_mut().expect("present until drop")[..len]
    }

    /// The valid bytes.
    #[allow(clippy::expect_used)] // the buffer's memory is present until drop
    pub fn bytes(&self) -> &[u8] {
        &self.map.as_ref().expect("present until drop")[..self.len]
    }

    /// The valid bytes, writable.
    #[allow(clippy::expect_used)] // the buffer's memory is present until drop
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.map.as_mut().expect("present until drop")[..len]
    }
}

impl AsRef<[u8]> for StagingBuf {
    fn as_ref(&self) -> &[u8] {
        self.bytes()
    }
}

impl Drop for StagingBuf {
    fn drop(&mut self) {
        if let Some(map) = self.map.take() {
            self.pool.in_use.fetch_sub(1, Ordering::SeqCst);
            // The pool's own receiver keeps the channel open, and it has room for every
            // buffer, so this never blocks or fails.
            let _ = self.pool.free_tx.send(map);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_below_one_buffer_is_refused() {
        let e = StagingPool::new(1000, 4096).unwrap_err().to_string();
        assert!(e.contains("smaller than one chunk"), "{e}");
    }

    #[test]
    fn buffers_are_page_aligned_reused_and_returned_on_drop() {
        let pool = StagingPool::new(3 * 8192, 8192).unwrap();
        assert_eq!(pool.info().buffers, 3);
        let (mut a, _) = pool.acquire();
        assert_eq!(a.as_ref().as_ptr() as usize % 4096, 0);
        a.fill(5).copy_from_slice(b"hello");
        let addr = a.bytes().as_ptr();
        assert_eq!(pool.in_use(), 1);
        drop(a);
        assert_eq!(pool.in_use(), 0);
        let held: Vec<_> = (0..3).map(|_| pool.acquire().0).collect();
        assert!(held
            .iter()
            .any(|b| b.map.as_ref().unwrap().as_ptr() == addr));
        assert_eq!(pool.in_use(), 3);
    }

    #[test]
    fn an_empty_pool_blocks_until_a_buffer_returns() {
        let pool = StagingPool::new(4096, 4096).unwrap();
        let (held, _) = pool.acquire();
        let p2 = pool.clone();
        let waiter = std::thread::spawn(move || p2.acquire().1);
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !waiter.is_finished(),
            "acquire returned while the pool was empty"
        );
        drop(held);
        let waited = waiter.join().unwrap();
        assert!(waited > Duration::ZERO);
    }
}
