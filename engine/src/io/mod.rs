//! The I/O seam: every durability-relevant call the engine makes goes through [`Storage`] and
//! [`StorageFile`]. Nothing else in the engine touches the file system, so a simulated backend
//! can see (and break) every write, sync, rename and unlink.
//!
//! Errors here are plain `std::io::Error`; the layers above attach the path and operation.

mod mem;
mod mmap;
mod sim;
mod std_io;

pub use mem::{MemFaults, MemIo};
pub use mmap::MappedFile;
pub use sim::{CrashMode, Fault, OpKind, SimIo};
pub use std_io::StdIo;

use std::io;
use std::path::Path;
use std::sync::Arc;

/// A file system: directories, names, and the directory-level durability calls.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Creates `path` and its missing parents. Does not make the entries durable (see
    /// [`Storage::sync_dir`]).
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Creates a new empty file, failing with `AlreadyExists` if there is one.
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn StorageFile>>;
    /// Opens an existing file, read-only unless `write`.
    fn open(&self, path: &Path, write: bool) -> io::Result<Box<dyn StorageFile>>;
    /// Atomically replaces `to` with `from` (rename(2)); durable only after `sync_dir`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Unlinks a file; durable only after `sync_dir`.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creates, renames, unlinks) durable (fsync on the dir).
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Names of the entries of a directory (files and directories), in no particular order.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Whether `path` exists.
    fn exists(&self, path: &Path) -> io::Result<bool>;
    /// Takes an exclusive advisory lock on `path` (created if absent), without blocking.
    /// `Ok(None)` means another holder has it. The lock lasts as long as the returned file.
    fn try_lock(&self, path: &Path) -> io::Result<Option<Box<dyn StorageFile>>>;
    /// [`Storage::try_lock`] of a file that must already exist: `NotFound` if it does not
    /// (never creates one). Used to probe whether another holder (a reader's lease) is alive:
    /// `Ok(None)` means it is; `Ok(Some(f))` means nobody held it, and now `f` does.
    fn try_lock_existing(&self, path: &Path) -> io::Result<Option<Box<dyn StorageFile>>>;
}

/// An open file. Positioned I/O only: the engine tracks offsets itself.
pub trait StorageFile: Send + Sync {
    /// Writes all of `buf` at `offset` (pwrite, looping over short writes).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Fills `buf` from `offset` (pread); `UnexpectedEof` if the file is shorter.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// fdatasync: the file's data and the metadata needed to read it back are durable.
    fn sync_data(&self) -> io::Result<()>;
    /// fsync: data and all metadata durable.
    fn sync_all(&self) -> io::Result<()>;
    /// Reserves space for `len` bytes from offset 0 (fallocate); the length grows to `len`
    /// if it was shorter.
    fn allocate(&self, len: u64) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// A hint: start writing `len` bytes from `offset` back to the disk now, without waiting,
    /// and without keeping them cached afterwards. Makes nothing durable (only a sync does);
    /// it lets the disk work while the caller produces the next bytes. Default: no-op.
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Sets the length (truncate or extend with zeros); durable only after a sync.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// A read-only memory map of the whole file as it is now, for zero-copy reads of bytes
    /// that never change (committed segment payloads; see `io::MappedFile` for the contract).
    /// `Ok(None)`: this backend does not map (the default), or the file is empty; readers then
    /// use [`StorageFile::read_at`].
    fn map(&self) -> io::Result<Option<Arc<MappedFile>>> {
        Ok(None)
    }
}
