//! `UringIo` (Linux): the write path through io_uring, O_DIRECT where the file system takes it.
//!
//! * A large `write_at` is cut into pieces ([`plan`]) that are submitted together, up to
//!   [`UringConfig::queue_depth`] in flight, and waited for before the call returns.
//! * Pieces whose file offset and length are aligned go through a second, O_DIRECT
//!   descriptor of the same file — from the caller's memory when its address is aligned, else
//!   through an aligned bounce buffer (a memcpy is far cheaper than the page cache's copy plus
//!   writeback). The unaligned head and tail of a write go through the page cache.
//! * A file system that refuses O_DIRECT (at open, in `statx`, or with EINVAL on a write) makes
//!   that file buffered from then on; the first refusal is logged on stderr, all are counted
//!   ([`UringIo::stats`]). Durability never depends on the route: `sync_data` is an
//!   fdatasync in every case (O_DIRECT does not flush the device's cache).
//! * Files written direct are preallocated ahead of the writes (16× the write's size, at
//!   most [`UringConfig::prealloc_bytes`]), so writes land inside the file's length: on ext4 that
//!   lets aligned direct writes run in parallel (an extending one takes the inode lock
//!   exclusively). The reserve past the written end is cut off before every sync, so after a
//!   sync the file's length is what was written, as with `StdIo`.
//! * Write→fdatasync ordering is explicit: writes are reaped before `write_at` returns, and
//!   the fdatasync entry carries IO_DRAIN.
//!
//! Directory calls, read-only opens and locks are `StdIo`'s: io_uring buys nothing there.
//! All `unsafe` for buffer lifetimes is in `ring.rs`, each block with its `SAFETY` note.

mod file;
pub(crate) mod plan;
mod ring;
mod sim_device;

pub use sim_device::UringSimConfig;

use super::{DirStatus, SimIo, StdIo, Storage, StorageFile, DEFAULT_FILE_MODE};
use file::UringFile;
use ring::Ring;
use sim_device::SimBase;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Settings of [`UringIo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UringConfig {
    /// Pieces in flight at once (the ring's size). Default 16; bounds 1..=4096.
    pub queue_depth: u32,
    /// A write is cut into pieces of at most this many bytes. Default 1 MiB; a multiple of
    /// 4096 in 4 KiB..=64 MiB. The bounce memory is `queue_depth × piece_bytes`, allocated on
    /// first need.
    pub piece_bytes: usize,
    /// Use O_DIRECT where the file system allows it. Default `true`; `false` writes every
    /// piece through the page cache (still batched).
    pub direct: bool,
    /// A file written direct is preallocated past the write's end by 16 times the write's
    /// size, at most this many bytes (rounded up to a MiB). Default 256 MiB; 0 turns
    /// preallocation off.
    pub prealloc_bytes: u64,
}

impl Default for UringConfig {
    fn default() -> Self {
        UringConfig {
            queue_depth: 16,
            piece_bytes: 1 << 20,
            direct: true,
            prealloc_bytes: 256 << 20,
        }
    }
}

impl UringConfig {
    fn validate(&self) -> Result<(), UringUnavailable> {
        if !(1..=4096).contains(&self.queue_depth) {
            return Err(UringUnavailable::BadConfig(format!(
                "queue_depth {} outside 1..=4096",
                self.queue_depth
            )));
        }
        if !(4096..=64 << 20).contains(&self.piece_bytes) || !self.piece_bytes.is_multiple_of(4096)
        {
            return Err(UringUnavailable::BadConfig(format!(
                "piece_bytes {} is not a multiple of 4096 in 4096..=67108864",
                self.piece_bytes
            )));
        }
        Ok(())
    }
}

/// Why [`UringIo::new`] could not give an io_uring backend. Callers fall back to `StdIo`
/// (see [`super::IoBackend::open`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UringUnavailable {
    /// The kernel refused to set up a ring: too old (ENOSYS), disabled by
    /// `kernel.io_uring_disabled` or a seccomp filter (EPERM), or out of locked memory
    /// (ENOMEM).
    #[error("io_uring setup failed: {0} (old kernel, seccomp, or kernel.io_uring_disabled); use the std backend")]
    Setup(#[source] io::Error),
    /// The configuration is out of bounds.
    #[error("invalid io_uring config: {0}")]
    BadConfig(String),
}

/// Counters of what the backend did, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UringStats {
    /// Files that fell back to buffered writes because the file system refused O_DIRECT.
    pub direct_refused_files: u64,
    /// Pieces written with O_DIRECT (from caller memory or a bounce buffer).
    pub direct_pieces: u64,
    /// Pieces written through the page cache.
    pub buffered_pieces: u64,
}

/// The io_uring backend. Cheap to clone (one shared ring).
#[derive(Debug, Clone)]
pub struct UringIo {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    cfg: UringConfig,
    /// The power-loss simulator under a [`UringIo::simulated`]; `None`: the real file system.
    sim: Option<SimBase>,
    ring: Mutex<Ring>,
    refused: AtomicU64,
    refusal_logged: AtomicBool,
    direct_pieces: AtomicU64,
    buffered_pieces: AtomicU64,
}

impl Shared {
    /// Counts a file's fall back to buffered writes; logs the first one.
    fn note_refusal(&self, path: &Path, why: &str) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        // A simulated device refuses on purpose, in every test open: counted, not logged.
        if self.sim.is_none() && !self.refusal_logged.swap(true, Ordering::Relaxed) {
            eprintln!(
                "ckptstore: O_DIRECT refused for {} ({why}); writing such files through the page \
                 cache (fdatasync still makes them durable). Logged once.",
                path.display()
            );
        }
    }
}

impl UringIo {
    /// An io_uring backend with the default [`UringConfig`].
    pub fn new() -> Result<UringIo, UringUnavailable> {
        Self::with_config(UringConfig::default())
    }

    /// An io_uring backend with `cfg`; a typed error when the kernel has no io_uring for us.
    pub fn with_config(cfg: UringConfig) -> Result<UringIo, UringUnavailable> {
        cfg.validate()?;
        let ring = Ring::new(cfg.queue_depth, cfg.piece_bytes).map_err(UringUnavailable::Setup)?;
        Ok(Self::build(cfg, ring, None))
    }

    /// The io_uring backend's own logic — pieces, O_DIRECT routes, the reserve and its trim,
    /// the direct → buffered fallback, short-write continuation, completion matching, fsync
    /// results — over the power-loss simulator `sim`, through a simulated device that
    /// executes and completes the ring's entries in random order, answers EBUSY, makes writes
    /// short and refuses O_DIRECT as `dev` says. Needs no kernel io_uring. Crash points,
    /// faults and crash images are `sim`'s, as for the `SimIo` itself.
    pub fn simulated(
        sim: &SimIo,
        cfg: UringConfig,
        dev: UringSimConfig,
    ) -> Result<UringIo, UringUnavailable> {
        cfg.validate()?;
        let (base, queue) = sim_device::device(sim, dev, cfg.queue_depth);
        let ring = Ring::over(Box::new(queue), cfg.queue_depth, cfg.piece_bytes);
        Ok(Self::build(cfg, ring, Some(base)))
    }

    fn build(cfg: UringConfig, ring: Ring, sim: Option<SimBase>) -> UringIo {
        UringIo {
            shared: Arc::new(Shared {
                cfg,
                sim,
                ring: Mutex::new(ring),
                refused: AtomicU64::new(0),
                refusal_logged: AtomicBool::new(false),
                direct_pieces: AtomicU64::new(0),
                buffered_pieces: AtomicU64::new(0),
            }),
        }
    }

    /// Where directory calls and read-only opens go: the real file system, or the simulator.
    fn base(&self) -> &dyn Storage {
        match &self.shared.sim {
            Some(b) => &b.sim,
            None => &StdIo,
        }
    }

    /// Opens `path` for writing as a `UringFile`.
    fn open_file(&self, path: &Path, create_new: bool, mode: u32) -> io::Result<UringFile> {
        match &self.shared.sim {
            Some(b) => b.open(path, create_new, self.shared.clone()),
            None => UringFile::open(path, create_new, mode, self.shared.clone()),
        }
    }

    /// The settings in force.
    pub fn config(&self) -> UringConfig {
        self.shared.cfg
    }

    /// What the backend did so far.
    pub fn stats(&self) -> UringStats {
        UringStats {
            direct_refused_files: self.shared.refused.load(Ordering::Relaxed),
            direct_pieces: self.shared.direct_pieces.load(Ordering::Relaxed),
            buffered_pieces: self.shared.buffered_pieces.load(Ordering::Relaxed),
        }
    }

    #[cfg(test)]
    fn inject_direct_errno(&self, count: usize, errno: i32) {
        self.shared.ring.lock().unwrap().inject_direct_errno = Some((count, errno));
    }
}

impl Storage for UringIo {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.base().create_dir_all(path)
    }

    fn create_new(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        self.create_new_mode(path, DEFAULT_FILE_MODE)
    }

    fn open(&self, path: &Path, write: bool) -> io::Result<Box<dyn StorageFile>> {
        if !write {
            return self.base().open(path, false);
        }
        Ok(Box::new(self.open_file(path, false, 0)?))
    }

    fn create_new_mode(&self, path: &Path, mode: u32) -> io::Result<Box<dyn StorageFile>> {
        Ok(Box::new(self.open_file(path, true, mode)?))
    }

    fn create_dir_all_mode(&self, path: &Path, mode: u32) -> io::Result<()> {
        self.base().create_dir_all_mode(path, mode)
    }

    fn try_lock_mode(&self, path: &Path, mode: u32) -> io::Result<Option<Box<dyn StorageFile>>> {
        self.base().try_lock_mode(path, mode)
    }

    fn dir_status(&self, path: &Path) -> io::Result<Option<DirStatus>> {
        self.base().dir_status(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.base().rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.base().remove_file(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.base().sync_dir(path)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.base().list(dir)
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        self.base().exists(path)
    }

    fn try_lock(&self, path: &Path) -> io::Result<Option<Box<dyn StorageFile>>> {
        self.base().try_lock(path)
    }

    fn try_lock_existing(&self, path: &Path) -> io::Result<Option<Box<dyn StorageFile>>> {
        self.base().try_lock_existing(path)
    }
}

#[cfg(test)]
mod tests;
