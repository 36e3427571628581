//! `WithMode`: a storage that creates every file and directory with one store's permission
//! bits (`Options::file_mode`), over any backend. `Store::open` puts it around `Options.io`, so
//! every create of the store — WAL, `CURRENT`, segments, `LOCK`, leases, directories — gets
//! the mode without each call site passing it.

use super::{private_fs, DirStatus, Storage, StorageFile};
use std::io;
use std::path::Path;
use std::sync::Arc;

/// `inner`, creating files with `file_mode` and directories with the matching directory mode
/// (`private_fs::dir_mode_for`).
#[derive(Debug, Clone)]
pub struct WithMode {
    inner: Arc<dyn Storage>,
    file_mode: u32,
}

impl WithMode {
    /// Wraps `inner`. Wrapping a `WithMode` again is harmless: the outer mode is the one passed
    /// down (the `*_mode` calls pass through unchanged).
    pub fn wrap(inner: Arc<dyn Storage>, file_mode: u32) -> Arc<dyn Storage> {
        Arc::new(WithMode { inner, file_mode })
    }

    fn dir_mode(&self) -> u32 {
        private_fs::dir_mode_for(self.file_mode)
    }
}

impl Storage for WithMode {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.inner.create_dir_all_mode(path, self.dir_mode())
    }
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        self.inner.create_new_mode(path, self.file_mode)
    }
    fn open(&self, path: &Path, write: bool) -> io::Result<Box<dyn StorageFile>> {
        self.inner.open(path, write)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.inner.remove_file(path)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.inner.sync_dir(path)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.inner.list(dir)
    }
    fn exists(&self, path: &Path) -> io::Result<bool> {
        self.inner.exists(path)
    }
    fn try_lock(&self, path: &Path) -> io::Result<Option<Box<dyn StorageFile>>> {
        self.inner.try_lock_mode(path, self.file_mode)
    }
    fn try_lock_existing(&self, path: &Path) -> io::Result<Option<Box<dyn StorageFile>>> {
        self.inner.try_lock_existing(path)
    }
    fn create_new_mode(&self, path: &Path, mode: u32) -> io::Result<Box<dyn StorageFile>> {
        self.inner.create_new_mode(path, mode)
    }
    fn create_dir_all_mode(&self, path: &Path, mode: u32) -> io::Result<()> {
        self.inner.create_dir_all_mode(path, mode)
    }
    fn try_lock_mode(&self, path: &Path, mode: u32) -> io::Result<Option<Box<dyn StorageFile>>> {
        self.inner.try_lock_mode(path, mode)
    }
    fn dir_status(&self, path: &Path) -> io::Result<Option<DirStatus>> {
        self.inner.dir_status(path)
    }
}
