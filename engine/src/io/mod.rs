//! The I/O seam: every durability-relevant call the engine makes goes through [`Storage`] and
//! [`StorageFile`]. Nothing else in the engine touches the file system, so a simulated backend
//! can see (and break) every write, sync, rename and unlink.
//!
//! Errors here are plain `std::io::Error`; the layers above attach the path and operation.

mod direct_read;
pub mod huge;
mod mem;
mod mmap;
pub mod private_fs;
mod recycle;
mod sim;
mod std_io;
#[cfg(target_os = "linux")]
mod uring;
mod with_mode;

pub use direct_read::{prefault, ReadBuf, ViewBuf, DIRECT_ALIGN};
pub use mem::{MemFaults, MemIo};
pub use mmap::MappedFile;
pub use private_fs::{DirStatus, DEFAULT_FILE_MODE};
pub use sim::{CrashMode, Fault, OpKind, SimIo};
pub use std_io::StdIo;
#[cfg(target_os = "linux")]
pub use uring::{UringConfig, UringIo, UringSimConfig, UringStats, UringUnavailable};
pub use with_mode::WithMode;

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

    /// [`Storage::create_new`] with permission bits `mode` (less the umask). Backends without
    /// permissions (in memory) ignore it: the default.
    fn create_new_mode(&self, path: &Path, mode: u32) -> io::Result<Box<dyn StorageFile>> {
        let _ = mode;
        self.create_new(path)
    }
    /// [`Storage::create_dir_all`] creating the missing directories with `mode`.
    fn create_dir_all_mode(&self, path: &Path, mode: u32) -> io::Result<()> {
        let _ = mode;
        self.create_dir_all(path)
    }
    /// [`Storage::try_lock`] creating the lock file (if absent) with `mode`.
    fn try_lock_mode(&self, path: &Path, mode: u32) -> io::Result<Option<Box<dyn StorageFile>>> {
        let _ = mode;
        self.try_lock(path)
    }
    /// Owner, mode and kind of a directory (see [`DirStatus`]), for the store's refusal of
    /// world-writable, foreign-owned or symlinked directories. `Ok(None)`: nothing there, or a
    /// backend without owners and links (in memory): the default.
    fn dir_status(&self, path: &Path) -> io::Result<Option<DirStatus>> {
        let _ = path;
        Ok(None)
    }
}

/// An open file. Positioned I/O only: the engine tracks offsets itself.
pub trait StorageFile: Send + Sync {
    /// Writes all of `buf` at `offset` (pwrite, looping over short writes).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes every `(offset, bytes)` pair, as `write_at` each; all written or an error (then
    /// any of them may be partly written). A backend may keep them in flight together
    /// (`UringIo` does): the seam for an I/O thread that holds several chunks at once.
    /// Default: one `write_at` after another.
    fn write_many(&self, writes: &[(u64, &[u8])]) -> io::Result<()> {
        for &(offset, buf) in writes {
            self.write_at(buf, offset)?;
        }
        Ok(())
    }
    /// Fills `buf` from `offset` (pread); `UnexpectedEof` if the file is shorter.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// The `len` bytes at `offset`, read into `scratch` (a reused buffer of the calling thread)
    /// the fastest way for bytes that may be cold: a backend with direct I/O (`StdIo` on a
    /// file system that takes O_DIRECT) reads bytes not in the page cache around it, into the
    /// reused buffer; bytes in the cache are copied from it. The returned slice lies inside
    /// `scratch`. Default: [`StorageFile::read_at`] into `scratch`.
    fn read_cold<'b>(
        &self,
        offset: u64,
        len: usize,
        scratch: &'b mut ReadBuf,
    ) -> io::Result<&'b mut [u8]> {
        let buf = scratch.get_mut(len);
        self.read_at(buf, offset)?;
        Ok(buf)
    }
    /// Reads `dst.len()` bytes at `offset` directly into `dst`, bypassing the page cache,
    /// where the backend reads direct and `offset`, `dst`'s address and length are aligned
    /// for it: `Ok(Some(n))`, `n` short of `dst.len()` only where the file ends first.
    /// `Ok(None)`: not this way (no direct reads here, refused, or unaligned) — the caller
    /// reads with [`StorageFile::read_at`]. Default: `Ok(None)`.
    fn read_direct(&self, offset: u64, dst: &mut [u8]) -> io::Result<Option<usize>> {
        let _ = (offset, dst);
        Ok(None)
    }
    /// Whether `len` bytes from `offset` are best read through the page cache (a map, a
    /// pread): true for a backend without direct reads (the default) and for bytes already
    /// cached; false for cold bytes a direct read fetches faster (see
    /// [`StorageFile::read_cold`]), which a reader should then not hint into the cache with
    /// [`StorageFile::will_need`]. Only a choice of route: both return the same bytes.
    fn cached(&self, offset: u64, len: u64) -> bool {
        let _ = (offset, len);
        true
    }
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
    /// A hint: `len` bytes from `offset` will be read soon; start reading them into the page
    /// cache now, without waiting (POSIX_FADV_WILLNEED). Lets a reader keep the disk busy
    /// ahead of the chunk it is on. Changes nothing a read returns. Default: no-op.
    fn will_need(&self, offset: u64, len: u64) {
        let _ = (offset, len);
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

/// Which backend to write through: the choice behind `--io auto|std|uring`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IoBackend {
    /// The process default ([`default_storage`]): `UringIo` where io_uring can be set up,
    /// else `StdIo`; `CKPTSTORE_IO=std|uring` overrides it.
    #[default]
    Auto,
    /// [`StdIo`]: pwrite + fdatasync. Always available, and the fallback.
    Std,
    /// `UringIo` (Linux): batched io_uring writes, O_DIRECT where the file system takes it.
    Uring,
}

impl std::str::FromStr for IoBackend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(IoBackend::Auto),
            "std" => Ok(IoBackend::Std),
            "uring" => Ok(IoBackend::Uring),
            other => Err(format!(
                "unknown I/O backend {other:?} (expected auto, std or uring)"
            )),
        }
    }
}

impl std::fmt::Display for IoBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoBackend::Auto => "auto",
            IoBackend::Std => "std",
            IoBackend::Uring => "uring",
        })
    }
}

/// The outcome of [`IoBackend::open`]: the storage, which backend it is, and why it is not
/// the one asked for (the caller logs that).
#[derive(Debug, Clone)]
pub struct OpenedBackend {
    /// The storage to put in `Options.io`.
    pub io: Arc<dyn Storage>,
    /// The backend actually in use (`Std` or `Uring`, never `Auto`).
    pub backend: IoBackend,
    /// Set when the one asked for was unavailable and `StdIo` is used instead.
    pub fallback_reason: Option<String>,
}

impl IoBackend {
    /// Opens the backend; `Uring` falls back to `StdIo` (with the reason) where io_uring is
    /// unavailable: not Linux, an old kernel, a seccomp filter, `kernel.io_uring_disabled`.
    pub fn open(self) -> OpenedBackend {
        match self {
            IoBackend::Auto => default_backend().clone(),
            IoBackend::Std => OpenedBackend {
                io: Arc::new(StdIo),
                backend: IoBackend::Std,
                fallback_reason: None,
            },
            IoBackend::Uring => open_uring(),
        }
    }
}

/// The default storage of `Options`: decided once per process and shared (one io_uring for
/// every store of the process). `UringIo` where io_uring can be set up — it measured faster
/// than `StdIo` for durable saves (docs/DECISIONS.md) — else `StdIo`, with the reason printed
/// once on stderr. `CKPTSTORE_IO=std` (or `uring`) in the environment forces a backend.
pub fn default_storage() -> Arc<dyn Storage> {
    default_backend().io.clone()
}

/// The backend behind [`default_storage`], with the reason when it is not the one wanted.
pub fn default_backend() -> &'static OpenedBackend {
    static DEFAULT: std::sync::OnceLock<OpenedBackend> = std::sync::OnceLock::new();
    DEFAULT.get_or_init(|| {
        let forced = std::env::var("CKPTSTORE_IO").ok();
        let wanted = match forced.as_deref().map(str::parse::<IoBackend>) {
            None | Some(Ok(IoBackend::Auto)) => IoBackend::Uring,
            Some(Ok(b)) => b,
            Some(Err(e)) => {
                eprintln!("ckptstore: CKPTSTORE_IO: {e}; choosing automatically");
                IoBackend::Uring
            }
        };
        let o = wanted.open();
        if let Some(why) = &o.fallback_reason {
            eprintln!("ckptstore: I/O backend std: {why}");
        }
        o
    })
}

#[cfg(target_os = "linux")]
fn open_uring() -> OpenedBackend {
    fallback_if_unavailable(UringIo::new())
}

/// `UringIo` when it could be set up, else `StdIo` with the reason.
#[cfg(target_os = "linux")]
fn fallback_if_unavailable(r: Result<UringIo, UringUnavailable>) -> OpenedBackend {
    match r {
        Ok(u) => OpenedBackend {
            io: Arc::new(u),
            backend: IoBackend::Uring,
            fallback_reason: None,
        },
        Err(e) => OpenedBackend {
            io: Arc::new(StdIo),
            backend: IoBackend::Std,
            fallback_reason: Some(e.to_string()),
        },
    }
}

#[cfg(not(target_os = "linux"))]
fn open_uring() -> OpenedBackend {
    OpenedBackend {
        io: Arc::new(StdIo),
        backend: IoBackend::Std,
        fallback_reason: Some("io_uring is Linux-only".into()),
    }
}

#[cfg(all(test, target_os = "linux"))]
mod backend_tests {
    use super::*;

    #[test]
    fn names_parse_and_print() {
        for b in [IoBackend::Auto, IoBackend::Std, IoBackend::Uring] {
            assert_eq!(b.to_string().parse::<IoBackend>(), Ok(b));
        }
        let e = "tokio".parse::<IoBackend>().unwrap_err();
        assert!(e.contains("auto, std or uring"), "{e}");
    }

    #[test]
    fn unavailable_uring_falls_back_to_std_with_the_reason() {
        let bad = UringIo::with_config(UringConfig {
            queue_depth: 0,
            ..Default::default()
        });
        let o = fallback_if_unavailable(bad);
        assert_eq!(o.backend, IoBackend::Std);
        assert!(o.fallback_reason.unwrap().contains("queue_depth"));
        let setup = UringUnavailable::Setup(std::io::Error::from_raw_os_error(38));
        let o = fallback_if_unavailable(Err(setup));
        assert_eq!(o.backend, IoBackend::Std);
        assert!(o.fallback_reason.unwrap().contains("io_uring setup failed"));
    }
}
