//! The [`Storage`] and [`StorageFile`] implementations of `SimIo`: every call is recorded as
//! a pending operation until the matching sync makes it durable.

use super::faults::{OpKind, ENOSPC};
use super::fs::{apply, eio, norm, not_found, split, DirOp, DirState, Entry, FileOp, Fs, Ino};
use super::SimIo;
use crate::io::{Storage, StorageFile};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

struct SimFile {
    fs: Arc<Mutex<Fs>>,
    ino: Ino,
    path: PathBuf,
    writable: bool,
    locked: bool,
}

impl SimFile {
    fn lock(&self) -> MutexGuard<'_, Fs> {
        self.fs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(9)) // EBADF
        }
    }

    #[allow(clippy::expect_used)] // an open file's inode lives as long as the file
    fn sync(&self, what: &str) -> io::Result<()> {
        let mut fs = self.lock();
        let desc = format!("{what} {}", self.path.display());
        fs.sync_point(&desc).inspect_err(|_| {
            if fs.crashed.is_none() {
                // A failed writeback: the pages are clean again, the data never reached
                // the disk, and nothing will retry it.
                fs.log(|| format!("{desc} FAILED"));
                fs.inodes.get_mut(&self.ino).expect("open").pending.clear();
            }
        })?;
        fs.log(|| desc.clone());
        let node = fs.inodes.get_mut(&self.ino).expect("open inode");
        for op in std::mem::take(&mut node.pending) {
            apply(&mut node.durable, &op);
        }
        Ok(())
    }
}

impl Drop for SimFile {
    fn drop(&mut self) {
        if self.locked {
            let ino = self.ino;
            self.lock().locks.remove(&ino);
        }
    }
}

impl StorageFile for SimFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        let mut fs = self.lock();
        fs.enter(Some(OpKind::Write))?;
        fs.bytes_written += buf.len() as u64;
        let mut keep = buf.len();
        let mut err = None;
        if let Some((nth, k)) = fs.short_write {
            if nth <= 1 {
                fs.short_write = None;
                keep = keep.min(k);
                err = Some(eio("injected short write"));
            } else {
                fs.short_write = Some((nth - 1, k));
            }
        }
        if let Some(left) = fs.enospc_left {
            if (keep as u64) > left {
                keep = left as usize;
                err = Some(io::Error::from_raw_os_error(ENOSPC));
            }
            fs.enospc_left = Some(left - keep as u64);
        }
        fs.log(|| {
            format!(
                "write {} @{offset} +{keep}{}",
                self.path.display(),
                if err.is_some() { " (then error)" } else { "" }
            )
        });
        if keep > 0 {
            fs.file_op(
                self.ino,
                FileOp::Write {
                    off: offset,
                    data: buf[..keep].to_vec(),
                },
            );
        }
        err.map_or(Ok(()), Err)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut fs = self.lock();
        fs.enter(Some(OpKind::Read))?;
        let d = &fs.inodes[&self.ino].data;
        let start = offset as usize;
        if start.checked_add(buf.len()).is_none_or(|end| end > d.len()) {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        buf.copy_from_slice(&d[start..start + buf.len()]);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.sync("sync_data")
    }

    fn sync_all(&self) -> io::Result<()> {
        self.sync("sync_all")
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        self.check_writable()?;
        let mut fs = self.lock();
        fs.enter(Some(OpKind::Write))?;
        let cur = fs.inodes[&self.ino].data.len() as u64;
        if cur >= len {
            return Ok(());
        }
        if let Some(left) = fs.enospc_left {
            if len - cur > left {
                return Err(io::Error::from_raw_os_error(ENOSPC));
            }
            fs.enospc_left = Some(left - (len - cur));
        }
        fs.log(|| format!("allocate {} {len}", self.path.display()));
        fs.file_op(self.ino, FileOp::Extend(len));
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let mut fs = self.lock();
        fs.enter(None)?;
        Ok(fs.inodes[&self.ino].data.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_writable()?;
        let mut fs = self.lock();
        fs.enter(Some(OpKind::Write))?;
        fs.log(|| format!("set_len {} {len}", self.path.display()));
        fs.file_op(self.ino, FileOp::SetLen(len));
        Ok(())
    }
}

impl SimIo {
    fn handle(&self, ino: Ino, path: &Path, writable: bool, locked: bool) -> Box<dyn StorageFile> {
        Box::new(SimFile {
            fs: self.fs.clone(),
            ino,
            path: norm(path),
            writable,
            locked,
        })
    }
}

impl Storage for SimIo {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut fs = self.lock();
        fs.enter(None)?;
        let path = norm(path);
        let mut missing = Vec::new();
        for anc in path.ancestors() {
            if fs.dirs.contains_key(anc) {
                break;
            }
            if fs.lookup(anc).is_ok() {
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, "a file"));
            }
            missing.push(anc.to_path_buf());
        }
        if missing.is_empty() {
            return Ok(());
        }
        fs.enter(Some(OpKind::Create))?;
        for dir in missing.into_iter().rev() {
            let (parent, name) = split(&dir)?;
            fs.log(|| format!("mkdir {}", dir.display()));
            fs.dir_op(&parent, DirOp::Set(name, Entry::Dir));
            fs.dirs.insert(dir, DirState::default());
        }
        Ok(())
    }

    fn create_new(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        let mut fs = self.lock();
        fs.enter(Some(OpKind::Create))?;
        let (parent, name) = split(path)?;
        if fs.dir(&parent)?.entries.contains_key(&name) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "exists"));
        }
        fs.log(|| format!("create {}", path.display()));
        let ino = fs.new_file(&parent, name);
        Ok(self.handle(ino, path, true, false))
    }

    fn open(&self, path: &Path, write: bool) -> io::Result<Box<dyn StorageFile>> {
        let mut fs = self.lock();
        fs.enter(None)?;
        match fs.lookup(path)? {
            Entry::File(ino) => Ok(self.handle(ino, path, write, false)),
            Entry::Dir => Err(io::Error::new(io::ErrorKind::IsADirectory, "a directory")),
        }
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut fs = self.lock();
        fs.enter(Some(OpKind::Rename))?;
        let Entry::File(ino) = fs.lookup(from)? else {
            return Err(eio("renaming directories is not simulated"));
        };
        let (fp, fname) = split(from)?;
        let (tp, tname) = split(to)?;
        fs.dir(&tp)?;
        if fs.lookup(to).is_ok_and(|e| e == Entry::Dir) {
            return Err(io::Error::new(io::ErrorKind::IsADirectory, "a directory"));
        }
        fs.log(|| format!("rename {} -> {}", from.display(), to.display()));
        if fp == tp {
            fs.dir_op(&fp, DirOp::Rename(fname, tname, Entry::File(ino)));
        } else {
            // Two directories, two entries, each durable with its own directory's sync.
            fs.dir_op(&fp, DirOp::Remove(fname, Entry::File(ino)));
            fs.dir_op(&tp, DirOp::Set(tname, Entry::File(ino)));
        }
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut fs = self.lock();
        fs.enter(Some(OpKind::Remove))?;
        let e = fs.lookup(path)?;
        if e == Entry::Dir {
            return Err(io::Error::new(io::ErrorKind::IsADirectory, "dir"));
        }
        let (parent, name) = split(path)?;
        fs.log(|| format!("unlink {}", path.display()));
        fs.dir_op(&parent, DirOp::Remove(name, e));
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut fs = self.lock();
        let p = norm(path);
        let desc = format!("sync_dir {}", p.display());
        fs.sync_point(&desc)?;
        fs.log(|| desc.clone());
        let d = fs.dirs.get_mut(&p).ok_or_else(|| not_found(&p))?;
        d.durable = d.entries.clone();
        d.pending.clear();
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut fs = self.lock();
        fs.enter(None)?;
        Ok(fs.dir(&norm(dir))?.entries.keys().cloned().collect())
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        let mut fs = self.lock();
        fs.enter(None)?;
        Ok(fs.lookup(path).is_ok())
    }

    fn try_lock(&self, path: &Path) -> io::Result<Option<Box<dyn StorageFile>>> {
        let mut fs = self.lock();
        fs.enter(None)?;
        let ino = match fs.lookup(path) {
            Ok(Entry::File(ino)) => ino,
            Ok(Entry::Dir) => return Err(io::Error::new(io::ErrorKind::IsADirectory, "dir")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs.enter(Some(OpKind::Create))?;
                let (parent, name) = split(path)?;
                fs.dir(&parent)?;
                fs.log(|| format!("create {}", path.display()));
                fs.new_file(&parent, name)
            }
            Err(e) => return Err(e),
        };
        if !fs.locks.insert(ino) {
            return Ok(None);
        }
        Ok(Some(self.handle(ino, path, true, true)))
    }

    fn try_lock_existing(&self, path: &Path) -> io::Result<Option<Box<dyn StorageFile>>> {
        let mut fs = self.lock();
        fs.enter(None)?;
        let ino = match fs.lookup(path)? {
            Entry::File(ino) => ino,
            Entry::Dir => return Err(io::Error::new(io::ErrorKind::IsADirectory, "dir")),
        };
        if !fs.locks.insert(ino) {
            return Ok(None);
        }
        Ok(Some(self.handle(ino, path, false, true)))
    }
}
