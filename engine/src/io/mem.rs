//! `MemIo`: a small in-memory file system for unit tests, with injectable faults (a failing
//! sync, a read-only file system, a full disk, failing reads, denied permissions). It keeps no
//! crash images: the power-loss simulator is a separate, fuller backend.

use super::{Storage, StorageFile};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

type Data = Arc<Mutex<Vec<u8>>>;

/// Locks `m`. A test that panicked while holding the lock leaves the tree as consistent as
/// any single call leaves it, so a poisoned lock is taken as it is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, Default)]
struct Tree {
    files: BTreeMap<PathBuf, Data>,
    dirs: BTreeSet<PathBuf>,
    locks: BTreeSet<PathBuf>,
}

/// Faults a test can arm on a [`MemIo`].
#[derive(Debug, Default)]
pub struct MemFaults {
    /// Counts down on every `sync_data`/`sync_all`/`sync_dir`; the call that takes it from 1
    /// to 0 fails with EIO (and so does every later one while it stays at 0 after being armed).
    pub fail_sync_countdown: AtomicI64,
    /// When set, every call that would modify the tree or a file fails with EROFS.
    pub read_only: AtomicBool,
    /// Disk space: when positive, the bytes that `write_at`/`allocate`/`set_len` may still add
    /// (each call is charged the bytes it writes or grows a file by). A call that needs more
    /// fails with ENOSPC and writes nothing, and so does every later one that needs any space
    /// (the budget sticks at -1) until the test sets it again. 0 means unlimited.
    pub enospc_after_bytes: AtomicI64,
    /// When set, every `read_at` fails with EIO (a bad sector, a dying disk).
    pub fail_reads: AtomicBool,
    /// Paths (and everything below them) that may not be opened, created, listed, renamed or
    /// removed: such calls fail with EACCES, as on a directory or file whose mode denies the
    /// process (root bypasses chmod, so tests of this use `MemIo`). Files opened before a path
    /// was denied keep working.
    pub denied: Mutex<Vec<PathBuf>>,
}

impl MemFaults {
    /// Denies access to `path` and everything below it (see [`MemFaults::denied`]).
    pub fn deny(&self, path: impl Into<PathBuf>) {
        lock(&self.denied).push(path.into());
    }

    /// Lifts every denial.
    pub fn allow_all(&self) {
        lock(&self.denied).clear();
    }

    fn check_access(&self, path: &Path) -> io::Result<()> {
        if lock(&self.denied).iter().any(|d| path.starts_with(d)) {
            return Err(io::Error::from_raw_os_error(13)); // EACCES
        }
        Ok(())
    }

    /// Charges `bytes` of new data against the space budget.
    fn charge(&self, bytes: u64) -> io::Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let left = self.enospc_after_bytes.load(Ordering::SeqCst);
        if left == 0 {
            return Ok(());
        }
        if left < 0 || (bytes as i64) > left {
            self.enospc_after_bytes.store(-1, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(28)); // ENOSPC
        }
        let rest = left - bytes as i64;
        // 0 would read as "unlimited": an exhausted budget is -1.
        self.enospc_after_bytes
            .store(if rest == 0 { -1 } else { rest }, Ordering::SeqCst);
        Ok(())
    }
}

/// In-memory file system. Clones share the same tree.
#[derive(Debug, Default, Clone)]
pub struct MemIo {
    tree: Arc<Mutex<Tree>>,
    /// Armed faults, shared by all clones and open files.
    pub faults: Arc<MemFaults>,
}

struct MemFile {
    data: Data,
    writable: bool,
    faults: Arc<MemFaults>,
    lock: Option<(Arc<Mutex<Tree>>, PathBuf)>,
}

fn not_found(p: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} not found", p.display()),
    )
}

fn check_sync(faults: &MemFaults) -> io::Result<()> {
    let armed = faults.fail_sync_countdown.load(Ordering::SeqCst);
    if armed > 0 {
        let left = faults.fail_sync_countdown.fetch_sub(1, Ordering::SeqCst) - 1;
        if left == 0 {
            // Stay armed (at a negative marker) so every later sync fails too.
            faults.fail_sync_countdown.store(-1, Ordering::SeqCst);
            return Err(io::Error::other("injected EIO on sync"));
        }
    } else if armed < 0 {
        return Err(io::Error::other("injected EIO on sync"));
    }
    Ok(())
}

fn check_writable(faults: &MemFaults) -> io::Result<()> {
    if faults.read_only.load(Ordering::SeqCst) {
        return Err(io::Error::from_raw_os_error(30)); // EROFS
    }
    Ok(())
}

impl MemIo {
    /// A new empty file system.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of a file's bytes, for tests that inspect or corrupt the image.
    pub fn read_file(&self, path: &Path) -> Option<Vec<u8>> {
        let tree = lock(&self.tree);
        tree.files.get(path).map(|d| lock(d).clone())
    }

    /// Replaces a file's bytes (creating it), for tests that corrupt the image.
    pub fn write_file(&self, path: &Path, bytes: Vec<u8>) {
        let mut tree = lock(&self.tree);
        tree.files
            .insert(path.to_path_buf(), Arc::new(Mutex::new(bytes)));
    }

    fn parent_exists(tree: &Tree, path: &Path) -> io::Result<()> {
        match path.parent() {
            Some(p) if !p.as_os_str().is_empty() && !tree.dirs.contains(p) => Err(not_found(p)),
            _ => Ok(()),
        }
    }
}

impl Storage for MemIo {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut tree = lock(&self.tree);
        let mut missing = Vec::new();
        for anc in path.ancestors() {
            if anc.as_os_str().is_empty() || tree.dirs.contains(anc) {
                break;
            }
            missing.push(anc.to_path_buf());
        }
        if !missing.is_empty() {
            check_writable(&self.faults)?;
        }
        tree.dirs.extend(missing);
        Ok(())
    }

    fn create_new(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        check_writable(&self.faults)?;
        self.faults.check_access(path)?;
        let mut tree = lock(&self.tree);
        Self::parent_exists(&tree, path)?;
        if tree.files.contains_key(path) || tree.dirs.contains(path) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "exists"));
        }
        let data = Data::default();
        tree.files.insert(path.to_path_buf(), data.clone());
        Ok(Box::new(MemFile {
            data,
            writable: true,
            faults: self.faults.clone(),
            lock: None,
        }))
    }

    fn open(&self, path: &Path, write: bool) -> io::Result<Box<dyn StorageFile>> {
        self.faults.check_access(path)?;
        let tree = lock(&self.tree);
        let data = tree.files.get(path).ok_or_else(|| not_found(path))?.clone();
        Ok(Box::new(MemFile {
            data,
            writable: write,
            faults: self.faults.clone(),
            lock: None,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        check_writable(&self.faults)?;
        self.faults.check_access(from)?;
        self.faults.check_access(to)?;
        let mut tree = lock(&self.tree);
        Self::parent_exists(&tree, to)?;
        let data = tree.files.remove(from).ok_or_else(|| not_found(from))?;
        tree.files.insert(to.to_path_buf(), data);
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        check_writable(&self.faults)?;
        self.faults.check_access(path)?;
        let mut tree = lock(&self.tree);
        tree.files
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| not_found(path))
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.faults.check_access(path)?;
        if !lock(&self.tree).dirs.contains(path) {
            return Err(not_found(path));
        }
        check_sync(&self.faults)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.faults.check_access(dir)?;
        let tree = lock(&self.tree);
        if !tree.dirs.contains(dir) {
            return Err(not_found(dir));
        }
        let children = tree.files.keys().chain(tree.dirs.iter());
        Ok(children
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect())
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        let tree = lock(&self.tree);
        Ok(tree.files.contains_key(path) || tree.dirs.contains(path))
    }

    fn try_lock(&self, path: &Path) -> io::Result<Option<Box<dyn StorageFile>>> {
        self.faults.check_access(path)?;
        let mut tree = lock(&self.tree);
        if tree.locks.contains(path) {
            return Ok(None);
        }
        let data = match tree.files.get(path) {
            Some(d) => d.clone(),
            None => {
                check_writable(&self.faults)?;
                Self::parent_exists(&tree, path)?;
                let d = Data::default();
                tree.files.insert(path.to_path_buf(), d.clone());
                d
            }
        };
        tree.locks.insert(path.to_path_buf());
        Ok(Some(Box::new(MemFile {
            data,
            writable: true,
            faults: self.faults.clone(),
            lock: Some((self.tree.clone(), path.to_path_buf())),
        })))
    }

    fn try_lock_existing(&self, path: &Path) -> io::Result<Option<Box<dyn StorageFile>>> {
        self.faults.check_access(path)?;
        let mut tree = lock(&self.tree);
        let data = tree.files.get(path).ok_or_else(|| not_found(path))?.clone();
        if !tree.locks.insert(path.to_path_buf()) {
            return Ok(None);
        }
        Ok(Some(Box::new(MemFile {
            data,
            writable: false,
            faults: self.faults.clone(),
            lock: Some((self.tree.clone(), path.to_path_buf())),
        })))
    }
}

impl Drop for MemFile {
    fn drop(&mut self) {
        if let Some((tree, path)) = self.lock.take() {
            lock(&tree).locks.remove(&path);
        }
    }
}

impl MemFile {
    fn check_write(&self) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(9)); // EBADF
        }
        check_writable(&self.faults)
    }
}

impl StorageFile for MemFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_write()?;
        let mut d = lock(&self.data);
        self.faults.charge(buf.len() as u64)?;
        let end = offset as usize + buf.len();
        if d.len() < end {
            d.resize(end, 0);
        }
        d[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.faults.fail_reads.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(5)); // EIO
        }
        let d = lock(&self.data);
        let start = offset as usize;
        if start.checked_add(buf.len()).is_none_or(|end| end > d.len()) {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        buf.copy_from_slice(&d[start..start + buf.len()]);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        check_sync(&self.faults)
    }

    fn sync_all(&self) -> io::Result<()> {
        check_sync(&self.faults)
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        self.check_write()?;
        let mut d = lock(&self.data);
        if (d.len() as u64) < len {
            self.faults.charge(len - d.len() as u64)?;
            d.resize(len as usize, 0);
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.data).len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_write()?;
        let mut d = lock(&self.data);
        self.faults.charge(len.saturating_sub(d.len() as u64))?;
        d.resize(len as usize, 0);
        Ok(())
    }
}
