//! The in-memory file system behind `SimIo`: inodes with their current, durable and pending
//! contents, directories with their current, durable and pending entries.

use super::faults::{Countdown, OpKind};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};

pub(super) fn eio(what: &str) -> io::Error {
    io::Error::other(format!("SimIo: {what}"))
}

pub(super) fn not_found(p: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} not found", p.display()),
    )
}

pub(super) type Ino = u64;

#[derive(Debug, Clone)]
pub(super) enum FileOp {
    Write { off: u64, data: Vec<u8> },
    SetLen(u64),
    Extend(u64),
}

pub(super) fn apply(buf: &mut Vec<u8>, op: &FileOp) {
    match op {
        FileOp::Write { off, data } => {
            if data.is_empty() {
                return;
            }
            let (off, end) = (*off as usize, *off as usize + data.len());
            if buf.len() < end {
                grow(buf, end);
            }
            buf[off..end].copy_from_slice(data);
        }
        FileOp::SetLen(n) => {
            if buf.len() < *n as usize {
                grow(buf, *n as usize);
            } else {
                buf.truncate(*n as usize);
            }
        }
        FileOp::Extend(n) => {
            if buf.len() < *n as usize {
                grow(buf, *n as usize);
            }
        }
    }
}

/// Extends `buf` with zeros to `len` bytes. A large extension takes zeroed memory from the
/// allocator and copies once, not a byte-at-a-time fill (which a debug build makes slow: the
/// io_uring backend reserves a MiB ahead of its direct writes); a small one (appends) keeps
/// `Vec`'s amortized growth.
fn grow(buf: &mut Vec<u8>, len: usize) {
    if len - buf.len() < 64 << 10 {
        buf.resize(len, 0);
        return;
    }
    let mut v = vec![0u8; len];
    v[..buf.len()].copy_from_slice(buf);
    *buf = v;
}

#[derive(Debug, Clone, Default)]
pub(super) struct Inode {
    /// What reads see now.
    pub(super) data: Vec<u8>,
    /// What survives any crash.
    pub(super) durable: Vec<u8>,
    /// Operations since the last successful sync, in order.
    pub(super) pending: Vec<FileOp>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Entry {
    File(Ino),
    Dir,
}

#[derive(Debug, Clone)]
pub(super) enum DirOp {
    Set(String, Entry),
    /// Unlinks the name if it still names this entry.
    Remove(String, Entry),
    /// The new name names the entry; the old one goes if it still names it.
    Rename(String, String, Entry),
}

pub(super) fn apply_dir(entries: &mut BTreeMap<String, Entry>, op: &DirOp) {
    match op {
        DirOp::Set(name, e) => {
            entries.insert(name.clone(), *e);
        }
        DirOp::Remove(name, e) => {
            if entries.get(name) == Some(e) {
                entries.remove(name);
            }
        }
        DirOp::Rename(from, to, e) => {
            if entries.get(from) == Some(e) {
                entries.remove(from);
            }
            entries.insert(to.clone(), *e);
        }
    }
}

#[derive(Debug, Clone, Default)]
pub(super) struct DirState {
    pub(super) entries: BTreeMap<String, Entry>,
    pub(super) durable: BTreeMap<String, Entry>,
    pub(super) pending: Vec<DirOp>,
}

#[derive(Debug, Default)]
pub(super) struct Fs {
    pub(super) inodes: BTreeMap<Ino, Inode>,
    pub(super) next_ino: Ino,
    pub(super) dirs: BTreeMap<PathBuf, DirState>,
    pub(super) locks: BTreeSet<Ino>,
    pub(super) syncs: u64,
    /// Calls per [`OpKind`] (index `kind as usize`) and bytes passed to `write_at`.
    pub(super) calls: [u64; 6],
    pub(super) bytes_written: u64,
    pub(super) crash_at: Option<u64>,
    pub(super) crashed: Option<String>,
    pub(super) eio: Vec<Countdown>,
    pub(super) enospc_left: Option<u64>,
    pub(super) short_write: Option<(u64, usize)>,
    pub(super) trace: Option<Vec<String>>,
}

/// The root of the simulated tree: absolute paths hang off `/`, relative ones too.
pub(super) fn norm(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        Path::new("/").join(p)
    }
}

pub(super) fn split(p: &Path) -> io::Result<(PathBuf, String)> {
    let p = norm(p);
    let parent = p.parent().ok_or_else(|| eio("no parent"))?.to_path_buf();
    let name = p
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| eio("bad file name"))?
        .to_owned();
    Ok((parent, name))
}

impl Fs {
    pub(super) fn new() -> Self {
        let mut fs = Fs {
            next_ino: 1,
            ..Default::default()
        };
        fs.dirs.insert(PathBuf::from("/"), DirState::default());
        fs
    }

    pub(super) fn log(&mut self, f: impl FnOnce() -> String) {
        if let Some(t) = &mut self.trace {
            t.push(f());
        }
    }

    pub(super) fn dir(&self, p: &Path) -> io::Result<&DirState> {
        self.dirs.get(p).ok_or_else(|| not_found(p))
    }

    #[allow(clippy::expect_used)] // callers look the directory up first
    pub(super) fn dir_op(&mut self, dir: &Path, op: DirOp) {
        let d = self.dirs.get_mut(dir).expect("checked by the caller");
        apply_dir(&mut d.entries, &op);
        d.pending.push(op);
    }

    pub(super) fn lookup(&self, p: &Path) -> io::Result<Entry> {
        let p = norm(p);
        if self.dirs.contains_key(&p) && p.parent().is_none() {
            return Ok(Entry::Dir);
        }
        let (parent, name) = split(&p)?;
        self.dir(&parent)?
            .entries
            .get(&name)
            .copied()
            .ok_or_else(|| not_found(&p))
    }

    #[allow(clippy::expect_used)] // an open file's inode lives as long as the file
    pub(super) fn file_op(&mut self, ino: Ino, op: FileOp) {
        let node = self.inodes.get_mut(&ino).expect("open inode");
        apply(&mut node.data, &op);
        node.pending.push(op);
    }

    pub(super) fn new_file(&mut self, parent: &Path, name: String) -> Ino {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(ino, Inode::default());
        self.dir_op(parent, DirOp::Set(name, Entry::File(ino)));
        ino
    }
}

impl Fs {
    /// Fails every call after the crash, then counts `kind` against armed EIO faults.
    pub(super) fn enter(&mut self, kind: Option<OpKind>) -> io::Result<()> {
        if let Some(c) = &self.crashed {
            return Err(eio(&format!("crashed ({c})")));
        }
        let Some(kind) = kind else { return Ok(()) };
        self.calls[kind as usize] += 1;
        let mut fire = false;
        self.eio.retain_mut(|c| {
            if c.kind != kind {
                return true;
            }
            c.left -= 1;
            if c.left == 0 {
                fire = true;
                return false;
            }
            true
        });
        if fire {
            return Err(eio(&format!("injected EIO on {kind:?}")));
        }
        Ok(())
    }

    /// Counts a sync call; the armed one crashes the system instead of happening.
    pub(super) fn sync_point(&mut self, what: &str) -> io::Result<()> {
        if let Some(c) = &self.crashed {
            return Err(eio(&format!("crashed ({c})")));
        }
        self.syncs += 1;
        if self.crash_at == Some(self.syncs) {
            let desc = format!("crash at sync #{}: {what}", self.syncs);
            self.log(|| desc.clone());
            self.crashed = Some(desc.clone());
            return Err(eio(&desc));
        }
        self.enter(Some(OpKind::Sync))
    }
}
