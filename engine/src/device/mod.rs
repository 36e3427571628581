//! Where tensor bytes come from: host memory, or (behind the cargo feature `cuda`) GPU memory.
//!
//! A [`Source`] copies a byte range of a tensor into a staging buffer. The copy may finish
//! later (a GPU's DMA engine): [`Source::stage`] returns a [`Fence`] that the pipeline waits
//! on before it hashes or writes the buffer, and before the buffer can return to the pool.

#[cfg(feature = "cuda")]
pub mod cuda;

use crate::error::Result;
use crate::staging::StagingBuf;

/// A copy in progress into a staging buffer.
pub enum Fence {
    /// The bytes are already in the buffer.
    Ready,
    /// Call to wait for the copy; returns its error, if any.
    Pending(Box<dyn FnOnce() -> Result<()> + Send>),
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Fence::Ready => "Fence::Ready",
            Fence::Pending(_) => "Fence::Pending",
        })
    }
}

impl Fence {
    /// Waits for the copy.
    pub fn wait(self) -> Result<()> {
        match self {
            Fence::Ready => Ok(()),
            Fence::Pending(f) => f(),
        }
    }
}

/// The bytes of one tensor (or blob), wherever they live.
pub trait Source {
    /// Total bytes.
    fn len(&self) -> u64;

    /// Whether the source holds no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts copying `len` bytes from `offset` into `buf` (through [`StagingBuf::fill`]).
    /// The buffer must not be read before the returned fence completes.
    fn stage(&self, offset: u64, len: usize, buf: &mut StagingBuf) -> Result<Fence>;

    /// Stages several ranges, `ranges[i]` = `(offset, len)` into `bufs[i]`. The default
    /// stages them one after another; on an error it waits for the copies it started before
    /// returning it (a buffer never goes back to the pool while a device writes into it).
    fn stage_many(&self, ranges: &[(u64, usize)], bufs: &mut [StagingBuf]) -> Result<Vec<Fence>> {
        let mut fences = Vec::with_capacity(ranges.len());
        for (&(off, len), buf) in ranges.iter().zip(bufs.iter_mut()) {
            match self.stage(off, len, buf) {
                Ok(f) => fences.push(f),
                Err(e) => {
                    for f in fences {
                        let _ = f.wait();
                    }
                    return Err(e);
                }
            }
        }
        Ok(fences)
    }

    /// Called once after every range was staged and before the save is reported as
    /// snapshotted: a source whose copies run asynchronously waits for them here, so the
    /// caller may change its memory as soon as the save returns.
    fn finish_snapshot(&self) -> Result<()> {
        Ok(())
    }
}

/// Bytes in host memory, copied with `memcpy`.
#[derive(Debug, Clone, Copy)]
pub struct HostSource<'a>(pub &'a [u8]);

impl Source for HostSource<'_> {
    fn len(&self) -> u64 {
        self.0.len() as u64
    }

    fn stage(&self, offset: u64, len: usize, buf: &mut StagingBuf) -> Result<Fence> {
        let start = offset as usize;
        buf.fill(len).copy_from_slice(&self.0[start..start + len]);
        Ok(Fence::Ready)
    }

    /// Copies the ranges in parallel (one memcpy runs ~10 GB/s a core; several cores copy a
    /// batch faster than one, which is what the caller's stall is made of).
    fn stage_many(&self, ranges: &[(u64, usize)], bufs: &mut [StagingBuf]) -> Result<Vec<Fence>> {
        use rayon::prelude::*;
        let bytes: usize = ranges.iter().map(|r| r.1).sum();
        if ranges.len() < 2 || bytes < PARALLEL_COPY_MIN_BYTES {
            for (&(off, len), buf) in ranges.iter().zip(bufs.iter_mut()) {
                self.stage(off, len, buf)?;
            }
        } else {
            bufs.par_iter_mut()
                .zip(ranges.par_iter())
                .for_each(|(buf, &(off, len))| {
                    let start = off as usize;
                    buf.fill(len).copy_from_slice(&self.0[start..start + len]);
                });
        }
        Ok(ranges.iter().map(|_| Fence::Ready).collect())
    }
}

/// Below this many bytes a batch is copied on the calling thread alone.
const PARALLEL_COPY_MIN_BYTES: usize = 1 << 20;
