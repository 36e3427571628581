//! `StdIo`: the reference backend on std::fs (pwrite, pread, fdatasync, fsync on directories).

use super::private_fs::{self, Create, DirStatus, DEFAULT_FILE_MODE};
use super::{MappedFile, Storage, StorageFile};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// The real file system through std and rustix. Always available. Files are opened without
/// following symlinks and must be regular files; new ones are private to the owner (0600,
/// directories 0700) unless created through the `*_mode` calls (see `io::private_fs`).
#[derive(Debug, Default, Clone, Copy)]
pub struct StdIo;

struct StdFile(File, Mutex<Option<Arc<MappedFile>>>);

impl StdFile {
    fn boxed(f: File) -> Box<dyn StorageFile> {
        Box::new(StdFile(f, Mutex::new(None)))
    }
}

impl Storage for StdIo {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.create_dir_all_mode(path, private_fs::dir_mode_for(DEFAULT_FILE_MODE))
    }

    fn create_new(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        self.create_new_mode(path, DEFAULT_FILE_MODE)
    }

    fn open(&self, path: &Path, write: bool) -> io::Result<Box<dyn StorageFile>> {
        let f = private_fs::open_file(path, write, Create::No, 0)?;
        Ok(StdFile::boxed(f))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        private_fs::open_dir(path, false)?.sync_all()
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        path.try_exists()
    }

    fn try_lock(&self, path: &Path) -> io::Result<Option<Box<dyn StorageFile>>> {
        self.try_lock_mode(path, DEFAULT_FILE_MODE)
    }

    fn try_lock_existing(&self, path: &Path) -> io::Result<Option<Box<dyn StorageFile>>> {
        // Read-only is enough for flock(2); it never creates the file.
        lock(private_fs::open_file(path, false, Create::No, 0)?)
    }

    fn create_new_mode(&self, path: &Path, mode: u32) -> io::Result<Box<dyn StorageFile>> {
        let f = private_fs::open_file(path, true, Create::New, mode)?;
        Ok(StdFile::boxed(f))
    }

    fn create_dir_all_mode(&self, path: &Path, mode: u32) -> io::Result<()> {
        private_fs::create_dir_all(path, mode)
    }

    fn try_lock_mode(&self, path: &Path, mode: u32) -> io::Result<Option<Box<dyn StorageFile>>> {
        lock(private_fs::open_file(path, true, Create::IfAbsent, mode)?)
    }

    fn dir_status(&self, path: &Path) -> io::Result<Option<DirStatus>> {
        private_fs::dir_status(path)
    }
}

/// flock(2) without blocking: `Ok(None)` when another holder has it.
fn lock(f: File) -> io::Result<Option<Box<dyn StorageFile>>> {
    match f.try_lock() {
        Ok(()) => Ok(Some(StdFile::boxed(f))),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

impl StorageFile for StdFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.0.sync_all()
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        match rustix::fs::fallocate(&self.0, rustix::fs::FallocateFlags::empty(), 0, len) {
            Ok(()) => Ok(()),
            // Some file systems (tmpfs on old kernels, some FUSE) cannot reserve space; growing
            // the file keeps the length contract, only the reservation is lost.
            Err(rustix::io::Errno::OPNOTSUPP) => {
                if self.0.metadata()?.len() < len {
                    self.0.set_len(len)?;
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        // POSIX_FADV_DONTNEED starts asynchronous writeback of the dirty pages in the range
        // (Linux: filemap_fdatawrite_range with WB_SYNC_NONE) and drops the clean ones, so a
        // checkpoint does not evict the trainer's page cache. It never waits for the disk.
        let Some(len) = std::num::NonZeroU64::new(len) else {
            return Ok(());
        };
        rustix::fs::fadvise(&self.0, offset, Some(len), rustix::fs::Advice::DontNeed)?;
        Ok(())
    }

    fn will_need(&self, offset: u64, len: u64) {
        if let Some(len) = std::num::NonZeroU64::new(len) {
            // Only a hint: a file system that refuses it reads on demand.
            let _ = rustix::fs::fadvise(&self.0, offset, Some(len), rustix::fs::Advice::WillNeed);
        }
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn map(&self) -> io::Result<Option<Arc<MappedFile>>> {
        // One map per open file, reused while it covers the whole file; a file that grew since
        // (the segment being appended to) gets a new, longer map. Views of the old one keep it
        // alive through their Arc.
        let len = self.len()?;
        let mut cached = self.1.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = cached.as_ref().filter(|m| m.len() as u64 >= len) {
            return Ok(Some(m.clone()));
        }
        let m = MappedFile::map(&self.0)?.map(Arc::new);
        cached.clone_from(&m);
        Ok(m)
    }
}
