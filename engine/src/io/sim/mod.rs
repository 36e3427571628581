//! `SimIo`: a power-loss simulator behind the [`Storage`](crate::io::Storage) seam.
//!
//! An in-memory file system that remembers, for every file, the writes, `set_len`s and
//! `allocate`s made since that file's last successful `sync_data`/`sync_all`, and for every
//! directory the creates, renames and unlinks made since its last `sync_dir`. From that it
//! builds the image a power cut could leave ([`SimIo::crash_image`]), deterministically from a
//! seed, in one of the [`CrashMode`]s. Files are inodes: a directory entry names an inode, so a
//! rename whose directory entry was not synced leaves the old name pointing at the old inode,
//! and an unlinked file stays writable through an open handle (and vanishes at the crash).
//!
//! # Crash points
//! [`SimIo::crash_at_sync`]`(n)` arms a crash at the `n`-th sync call (`sync_data`, `sync_all`
//! or `sync_dir`, counted from the creation of this `SimIo`, starting at 1). That call does
//! **not** happen: it returns EIO, and so does every later call of any kind, so the workload
//! stops where it stood. [`SimIo::crash_image`] then gives a fresh, all-durable `SimIo` to
//! reopen. `crash_image` works without an armed crash too: it is a power cut "now".
//!
//! # What the modes may and may not do
//! Every mode keeps all durable state (data synced by `sync_data`/`sync_all`, entries synced
//! by `sync_dir`): the documented assumptions (docs/GUARANTEES.md) are that fsync works and a
//! sector written in full is old or new. Modes only choose among the outcomes of the
//! *unsynced* operations:
//! * [`CrashMode::DropUnsynced`]: nothing unsynced survives (data or entries).
//! * [`CrashMode::TornPrefix`]: per file, a random prefix of its unsynced operations survives
//!   in order, the last write cut at a random byte.
//! * [`CrashMode::Garbage`]: all unsynced operations reach the disk, then each 512-byte sector
//!   an unsynced write touched becomes old, new, or random bytes. Garbage is only put in a
//!   sector that held no synced byte (past the file's synced length): a sector holding synced
//!   bytes — the synced tail of a log sharing a sector with the next, unsynced record, or a
//!   sector rewritten in place — comes back old or new, never garbage. Garbage there would be
//!   synced data destroyed, which breaks the documented assumption (a sector written in full
//!   is old or new) and which no engine could survive.
//! * [`CrashMode::LoseDirEntries`]: every unsynced create, rename and unlink is lost; each
//!   surviving file keeps either only its synced data or all of its writes (chosen per file).
//! * [`CrashMode::Reorder`]: the unsynced writes of each file, cut at sector boundaries, reach
//!   the disk as a random subset applied in random order (a `set_len` is one piece too).
//!
//! In the three data modes (torn, garbage, reorder) each directory keeps a random subset of its
//! unsynced entry operations (applied in order; each create, rename or unlink is atomic): the
//! file system orders nothing for us, so a rename may survive while the create before it in the
//! same directory does not.
//!
//! # Faults
//! [`SimIo::inject`] arms a [`Fault`]: EIO on the n-th call of an [`OpKind`], ENOSPC after a
//! byte budget, a short write. A failed `sync_data`/`sync_all` drops that file's unsynced
//! writes from the durable path (Linux marks the dirty pages clean after a writeback error):
//! reads still see them, a later sync reports success, and a crash loses them — so a store
//! that retries the fsync and trusts it is caught.
//!
//! Determinism: the image depends only on the sequence of calls, the mode and the seed.

mod faults;
mod fs;
mod image;
mod storage;
#[cfg(test)]
mod tests;

pub use faults::{Fault, OpKind};
pub use image::CrashMode;

use fs::{norm, Entry, Fs};
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

/// The power-loss simulator. Clones share the same file system.
#[derive(Clone)]
pub struct SimIo {
    fs: Arc<Mutex<Fs>>,
}

impl Default for SimIo {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for SimIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fs = self.lock();
        f.debug_struct("SimIo")
            .field("files", &fs.inodes.len())
            .field("syncs", &fs.syncs)
            .field("crashed", &fs.crashed)
            .finish()
    }
}

impl SimIo {
    /// An empty file system (just `/`).
    pub fn new() -> Self {
        SimIo {
            fs: Arc::new(Mutex::new(Fs::new())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Fs> {
        self.fs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sync calls made so far (`sync_data`, `sync_all`, `sync_dir`, failed ones included).
    pub fn sync_count(&self) -> u64 {
        self.lock().syncs
    }

    /// Calls of `kind` made so far (failed ones included).
    pub fn call_count(&self, kind: OpKind) -> u64 {
        self.lock().calls[kind as usize]
    }

    /// Bytes passed to `write_at` so far.
    pub fn bytes_written(&self) -> u64 {
        self.lock().bytes_written
    }

    /// Arms a crash at the `n`-th sync call counted from this file system's creation (1 is
    /// the first): that call does not happen, it and every later call fail with EIO.
    pub fn crash_at_sync(&self, n: u64) {
        self.lock().crash_at = Some(n);
    }

    /// Where the armed crash happened, if it did: "crash at sync #N: sync_data /path".
    pub fn crashed(&self) -> Option<String> {
        self.lock().crashed.clone()
    }

    /// Starts recording a line per mutating call and sync, for debugging a failing case.
    pub fn set_trace(&self, on: bool) {
        self.lock().trace = on.then(Vec::new);
    }

    /// The recorded trace (see [`SimIo::set_trace`]).
    pub fn trace(&self) -> Vec<String> {
        self.lock().trace.clone().unwrap_or_default()
    }

    /// A file's current bytes (what reads see), if the path names a file.
    pub fn read_file(&self, path: &Path) -> Option<Vec<u8>> {
        let fs = self.lock();
        match fs.lookup(path).ok()? {
            Entry::File(ino) => Some(fs.inodes[&ino].data.clone()),
            Entry::Dir => None,
        }
    }

    /// Names in a directory now (files and directories), sorted; `None` if it is not one.
    pub fn list_dir(&self, dir: &Path) -> Option<Vec<String>> {
        let fs = self.lock();
        Some(fs.dirs.get(&norm(dir))?.entries.keys().cloned().collect())
    }

    /// An independent copy of the whole state (unsynced operations included), with no faults,
    /// no locks, no crash, and the sync count reset to 0.
    pub fn fork(&self) -> SimIo {
        let fs = self.lock();
        SimIo {
            fs: Arc::new(Mutex::new(Fs {
                inodes: fs.inodes.clone(),
                next_ino: fs.next_ino,
                dirs: fs.dirs.clone(),
                ..Fs::default()
            })),
        }
    }
}
