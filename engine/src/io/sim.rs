//! `SimIo`: a power-loss simulator behind the [`Storage`] seam.
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

use super::{Storage, StorageFile};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Sector size of the simulated disk: the unit of garbage and of reordering.
pub const SECTOR: u64 = 512;

/// What a power cut leaves of the unsynced operations (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CrashMode {
    /// Only durable state survives.
    DropUnsynced,
    /// A random prefix of each file's unsynced writes survives, the last one cut at a random
    /// byte.
    TornPrefix,
    /// Sectors touched by unsynced writes are old, new or random bytes (never a sector holding
    /// synced bytes that were not rewritten).
    Garbage,
    /// Unsynced creates, renames and unlinks are lost; file data kept synced-only or in full.
    LoseDirEntries,
    /// A random subset of each file's unsynced sector writes, applied in random order.
    Reorder,
}

impl CrashMode {
    /// Every mode, in a fixed order.
    pub const ALL: [CrashMode; 5] = [
        CrashMode::DropUnsynced,
        CrashMode::TornPrefix,
        CrashMode::Garbage,
        CrashMode::LoseDirEntries,
        CrashMode::Reorder,
    ];
}

impl fmt::Display for CrashMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Kinds of calls a [`Fault::Eio`] can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// `write_at`, `set_len`, `allocate`.
    Write,
    /// `read_at`.
    Read,
    /// `sync_data`, `sync_all`, `sync_dir`.
    Sync,
    /// `create_new`, `create_dir_all` (when it creates), `try_lock` (when it creates).
    Create,
    /// `rename`.
    Rename,
    /// `remove_file`.
    Remove,
}

/// An injectable fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The `nth` call (1 = the next) of `kind` from now fails with EIO, once. A failed file
    /// sync drops the file's unsynced writes from the durable path.
    Eio {
        /// Which calls count.
        kind: OpKind,
        /// Which of them fails.
        nth: u64,
    },
    /// Once `bytes` more bytes have been written, writes fail with ENOSPC (the write that
    /// crosses the line writes what fits first) until [`SimIo::clear_faults`].
    Enospc {
        /// The byte budget.
        bytes: u64,
    },
    /// The `nth` `write_at` from now writes only its first `keep` bytes, then fails with EIO.
    ShortWrite {
        /// Which write.
        nth: u64,
        /// How many bytes it writes.
        keep: usize,
    },
}

const ENOSPC: i32 = 28;

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("SimIo: {what}"))
}

fn not_found(p: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} not found", p.display()),
    )
}

/// SplitMix64: small, deterministic, good enough to pick outcomes.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64, mode: CrashMode) -> Self {
        Rng(seed ^ (mode as u64 + 1).wrapping_mul(0xa076_1d64_78bd_642f))
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

type Ino = u64;

#[derive(Debug, Clone)]
enum FileOp {
    Write { off: u64, data: Vec<u8> },
    SetLen(u64),
    Extend(u64),
}

fn apply(buf: &mut Vec<u8>, op: &FileOp) {
    match op {
        FileOp::Write { off, data } => {
            if data.is_empty() {
                return;
            }
            let (off, end) = (*off as usize, *off as usize + data.len());
            if buf.len() < end {
                buf.resize(end, 0);
            }
            buf[off..end].copy_from_slice(data);
        }
        FileOp::SetLen(n) => buf.resize(*n as usize, 0),
        FileOp::Extend(n) => {
            if buf.len() < *n as usize {
                buf.resize(*n as usize, 0);
            }
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Inode {
    /// What reads see now.
    data: Vec<u8>,
    /// What survives any crash.
    durable: Vec<u8>,
    /// Operations since the last successful sync, in order.
    pending: Vec<FileOp>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    File(Ino),
    Dir,
}

#[derive(Debug, Clone)]
enum DirOp {
    Set(String, Entry),
    /// Unlinks the name if it still names this entry.
    Remove(String, Entry),
    /// The new name names the entry; the old one goes if it still names it.
    Rename(String, String, Entry),
}

fn apply_dir(entries: &mut BTreeMap<String, Entry>, op: &DirOp) {
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
struct DirState {
    entries: BTreeMap<String, Entry>,
    durable: BTreeMap<String, Entry>,
    pending: Vec<DirOp>,
}

#[derive(Debug, Clone, Copy)]
struct Countdown {
    kind: OpKind,
    left: u64,
}

#[derive(Debug, Default)]
struct Fs {
    inodes: BTreeMap<Ino, Inode>,
    next_ino: Ino,
    dirs: BTreeMap<PathBuf, DirState>,
    locks: BTreeSet<Ino>,
    syncs: u64,
    /// Calls per [`OpKind`] (index `kind as usize`) and bytes passed to `write_at`.
    calls: [u64; 6],
    bytes_written: u64,
    crash_at: Option<u64>,
    crashed: Option<String>,
    eio: Vec<Countdown>,
    enospc_left: Option<u64>,
    short_write: Option<(u64, usize)>,
    trace: Option<Vec<String>>,
}

/// The root of the simulated tree: absolute paths hang off `/`, relative ones too.
fn norm(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        Path::new("/").join(p)
    }
}

fn split(p: &Path) -> io::Result<(PathBuf, String)> {
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
    fn new() -> Self {
        let mut fs = Fs {
            next_ino: 1,
            ..Default::default()
        };
        fs.dirs.insert(PathBuf::from("/"), DirState::default());
        fs
    }

    fn log(&mut self, f: impl FnOnce() -> String) {
        if let Some(t) = &mut self.trace {
            t.push(f());
        }
    }

    /// Fails every call after the crash, then counts `kind` against armed EIO faults.
    fn enter(&mut self, kind: Option<OpKind>) -> io::Result<()> {
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
    fn sync_point(&mut self, what: &str) -> io::Result<()> {
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

    fn dir(&self, p: &Path) -> io::Result<&DirState> {
        self.dirs.get(p).ok_or_else(|| not_found(p))
    }

    fn dir_op(&mut self, dir: &Path, op: DirOp) {
        let d = self.dirs.get_mut(dir).expect("checked by the caller");
        apply_dir(&mut d.entries, &op);
        d.pending.push(op);
    }

    fn lookup(&self, p: &Path) -> io::Result<Entry> {
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

    fn file_op(&mut self, ino: Ino, op: FileOp) {
        let node = self.inodes.get_mut(&ino).expect("open inode");
        apply(&mut node.data, &op);
        node.pending.push(op);
    }

    fn new_file(&mut self, parent: &Path, name: String) -> Ino {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(ino, Inode::default());
        self.dir_op(parent, DirOp::Set(name, Entry::File(ino)));
        ino
    }
}

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

    /// Arms a fault.
    pub fn inject(&self, fault: Fault) {
        let mut fs = self.lock();
        match fault {
            Fault::Eio { kind, nth } => fs.eio.push(Countdown {
                kind,
                left: nth.max(1),
            }),
            Fault::Enospc { bytes } => fs.enospc_left = Some(bytes),
            Fault::ShortWrite { nth, keep } => fs.short_write = Some((nth.max(1), keep)),
        }
    }

    /// Disarms every fault (not an armed or happened crash).
    pub fn clear_faults(&self) {
        let mut fs = self.lock();
        fs.eio.clear();
        fs.enospc_left = None;
        fs.short_write = None;
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

    /// The file system a power cut at this moment (or at the armed crash, if it happened)
    /// could leave, chosen by `mode` and `seed`: a fresh `SimIo` whose state is all durable.
    pub fn crash_image(&self, mode: CrashMode, seed: u64) -> SimIo {
        let fs = self.lock();
        let mut rng = Rng::new(seed, mode);
        let mut out = Fs::new();
        out.next_ino = fs.next_ino;
        let mut files = BTreeSet::new();
        // Walk the namespace from the root, choosing each directory's surviving entries.
        let mut todo = vec![PathBuf::from("/")];
        while let Some(path) = todo.pop() {
            let d = &fs.dirs[&path];
            let mut entries = d.durable.clone();
            if matches!(
                mode,
                CrashMode::TornPrefix | CrashMode::Garbage | CrashMode::Reorder
            ) {
                for op in &d.pending {
                    if rng.coin() {
                        apply_dir(&mut entries, op);
                    }
                }
            }
            for (name, e) in &entries {
                match e {
                    Entry::File(ino) => {
                        files.insert(*ino);
                    }
                    Entry::Dir => {
                        let child = path.join(name);
                        if fs.dirs.contains_key(&child) {
                            todo.push(child);
                        }
                    }
                }
            }
            out.dirs.insert(
                path,
                DirState {
                    durable: entries.clone(),
                    entries,
                    pending: Vec::new(),
                },
            );
        }
        // Dropped directories' entries: a child directory whose own state was not kept.
        let kept: BTreeSet<PathBuf> = out.dirs.keys().cloned().collect();
        for (path, d) in out.dirs.iter_mut() {
            d.entries
                .retain(|name, e| *e != Entry::Dir || kept.contains(&path.join(name)));
            d.durable = d.entries.clone();
        }
        for ino in files {
            let content = image_content(&fs.inodes[&ino], mode, &mut rng);
            out.inodes.insert(
                ino,
                Inode {
                    data: content.clone(),
                    durable: content,
                    pending: Vec::new(),
                },
            );
        }
        SimIo {
            fs: Arc::new(Mutex::new(out)),
        }
    }
}

fn image_content(node: &Inode, mode: CrashMode, rng: &mut Rng) -> Vec<u8> {
    let mut buf = node.durable.clone();
    let ops = &node.pending;
    match mode {
        CrashMode::DropUnsynced => {}
        CrashMode::LoseDirEntries => {
            if rng.coin() {
                ops.iter().for_each(|op| apply(&mut buf, op));
            }
        }
        CrashMode::TornPrefix => {
            let k = rng.below(ops.len() as u64 + 1) as usize;
            ops[..k].iter().for_each(|op| apply(&mut buf, op));
            if let Some(FileOp::Write { off, data }) = ops.get(k) {
                let cut = rng.below(data.len() as u64) as usize;
                apply(
                    &mut buf,
                    &FileOp::Write {
                        off: *off,
                        data: data[..cut].to_vec(),
                    },
                );
            }
        }
        CrashMode::Reorder => {
            let mut pieces = Vec::new();
            for op in ops {
                match op {
                    FileOp::Write { off, data } => {
                        let mut at = 0usize;
                        while at < data.len() {
                            let pos = off + at as u64;
                            let room = (SECTOR - pos % SECTOR) as usize;
                            let n = room.min(data.len() - at);
                            pieces.push(FileOp::Write {
                                off: pos,
                                data: data[at..at + n].to_vec(),
                            });
                            at += n;
                        }
                    }
                    other => pieces.push(other.clone()),
                }
            }
            pieces.retain(|_| rng.coin());
            for i in (1..pieces.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                pieces.swap(i, j);
            }
            pieces.iter().for_each(|op| apply(&mut buf, op));
        }
        CrashMode::Garbage => {
            // Bytes below `old_limit` are synced ones nothing truncated in between.
            let mut old_limit = buf.len() as u64;
            let mut writes = Vec::new();
            for op in ops {
                match op {
                    FileOp::Write { off, data } if !data.is_empty() => {
                        writes.push((*off, off + data.len() as u64))
                    }
                    FileOp::SetLen(n) => old_limit = old_limit.min(*n),
                    _ => {}
                }
            }
            let old = buf.clone();
            ops.iter().for_each(|op| apply(&mut buf, op));
            let sectors: BTreeSet<u64> = writes
                .iter()
                .flat_map(|&(a, b)| a / SECTOR..b.div_ceil(SECTOR))
                .collect();
            for s in sectors {
                let (a, b) = (s * SECTOR, ((s + 1) * SECTOR).min(buf.len() as u64));
                if a >= b {
                    continue;
                }
                // A sector that holds synced bytes (even ones an unsynced write is replacing)
                // comes back old or new, never garbage.
                let eligible = a >= old_limit;
                let pick = rng.below(4);
                let range = a as usize..b as usize;
                if eligible && pick < 2 {
                    for byte in &mut buf[range] {
                        *byte = rng.next() as u8;
                    }
                } else if pick % 2 == 1 {
                    // Old contents.
                    for i in range {
                        buf[i] = if (i as u64) < old_limit { old[i] } else { 0 };
                    }
                }
            }
        }
    }
    buf
}

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
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEEDS: u64 = 200;

    fn p(s: &str) -> &Path {
        Path::new(s)
    }

    /// `/d` durable, holding `f` with `synced` synced and then `unsynced` appended.
    fn one_file(synced: &[u8], unsynced: &[&[u8]]) -> SimIo {
        let sim = SimIo::new();
        sim.create_dir_all(p("/d")).unwrap();
        sim.sync_dir(p("/")).unwrap();
        let f = sim.create_new(p("/d/f")).unwrap();
        f.write_at(synced, 0).unwrap();
        f.sync_data().unwrap();
        sim.sync_dir(p("/d")).unwrap();
        let mut at = synced.len() as u64;
        for w in unsynced {
            f.write_at(w, at).unwrap();
            at += w.len() as u64;
        }
        sim
    }

    fn image(sim: &SimIo, mode: CrashMode, seed: u64) -> Option<Vec<u8>> {
        sim.crash_image(mode, seed).read_file(p("/d/f"))
    }

    #[test]
    fn drop_unsynced_keeps_only_synced_data_and_entries() {
        let sim = one_file(b"durable", &[b"lost", b"lost too"]);
        let g = sim.create_new(p("/d/g")).unwrap();
        g.write_at(b"synced data, unsynced entry", 0).unwrap();
        g.sync_data().unwrap();
        for seed in 0..SEEDS {
            let img = sim.crash_image(CrashMode::DropUnsynced, seed);
            assert_eq!(img.read_file(p("/d/f")).unwrap(), b"durable");
            assert_eq!(img.read_file(p("/d/g")), None);
            assert_eq!(img.list_dir(p("/d")).unwrap(), vec!["f"]);
        }
        // The image is all durable: a second cut changes nothing.
        let img = sim.crash_image(CrashMode::TornPrefix, 1);
        assert_eq!(
            img.crash_image(CrashMode::Garbage, 2).read_file(p("/d/f")),
            img.read_file(p("/d/f"))
        );
    }

    #[test]
    fn torn_prefix_keeps_a_prefix_cut_at_a_byte() {
        let full = b"durable|first write|second write".to_vec();
        let sim = one_file(&full[..8], &[&full[8..20], &full[20..]]);
        let mut lens = BTreeSet::new();
        for seed in 0..SEEDS {
            let got = image(&sim, CrashMode::TornPrefix, seed).unwrap();
            assert!(
                got.len() >= 8 && full.starts_with(&got),
                "seed {seed}: {got:?}"
            );
            lens.insert(got.len());
        }
        // Nothing, everything, and cuts inside each write all happen.
        assert!(lens.contains(&8) && lens.contains(&full.len()), "{lens:?}");
        assert!(lens.iter().any(|&l| l > 8 && l < 20), "{lens:?}");
        assert!(lens.iter().any(|&l| l > 20 && l < full.len()), "{lens:?}");
    }

    #[test]
    fn garbage_only_in_sectors_of_unsynced_bytes() {
        // Sector 0 is synced up to byte 100; the unsynced append shares it, then fills
        // sectors 1 and 2.
        let synced = vec![7u8; 100];
        let new = vec![9u8; 1300];
        let sim = one_file(&synced, &[&new]);
        let mut full = synced.clone();
        full.extend_from_slice(&new);
        let (mut garbage, mut old, mut fresh) = (false, false, false);
        for seed in 0..SEEDS {
            let got = image(&sim, CrashMode::Garbage, seed).unwrap();
            assert_eq!(got.len(), full.len());
            assert_eq!(
                &got[..100],
                &synced[..],
                "seed {seed}: synced bytes touched"
            );
            let s0 = &got[100..512];
            assert!(
                s0 == &full[100..512] || s0.iter().all(|&b| b == 0),
                "seed {seed}"
            );
            for s in 1..3 {
                let sec = &got[s * 512..((s + 1) * 512).min(full.len())];
                if sec.iter().all(|&b| b == 9) {
                    fresh = true;
                } else if sec.iter().all(|&b| b == 0) {
                    old = true;
                } else {
                    garbage = true;
                }
            }
        }
        assert!(garbage && old && fresh);
    }

    #[test]
    fn lose_dir_entries_models_inodes() {
        let sim = SimIo::new();
        sim.create_dir_all(p("/d")).unwrap();
        sim.sync_dir(p("/")).unwrap();
        for name in ["a", "kept", "gone"] {
            let f = sim.create_new(&Path::new("/d").join(name)).unwrap();
            f.write_at(name.as_bytes(), 0).unwrap();
            f.sync_data().unwrap();
        }
        sim.sync_dir(p("/d")).unwrap();
        // Renamed (synced data), replaced, unlinked and created: none of it synced.
        sim.rename(p("/d/a"), p("/d/b")).unwrap();
        let tmp = sim.create_new(p("/d/tmp")).unwrap();
        tmp.write_at(b"new kept", 0).unwrap();
        tmp.sync_data().unwrap();
        sim.rename(p("/d/tmp"), p("/d/kept")).unwrap();
        sim.remove_file(p("/d/gone")).unwrap();
        let n = sim.create_new(p("/d/new")).unwrap();
        n.write_at(b"x", 0).unwrap();
        n.sync_data().unwrap();
        let f = sim.open(p("/d/kept"), true).unwrap();
        f.write_at(b"!", 8).unwrap();
        let (mut synced_only, mut in_full) = (false, false);
        for seed in 0..SEEDS {
            let img = sim.crash_image(CrashMode::LoseDirEntries, seed);
            assert_eq!(img.list_dir(p("/d")).unwrap(), vec!["a", "gone", "kept"]);
            assert_eq!(img.read_file(p("/d/a")).unwrap(), b"a");
            assert_eq!(img.read_file(p("/d/gone")).unwrap(), b"gone");
            assert_eq!(img.read_file(p("/d/kept")).unwrap(), b"kept");
        }
        // Once the rename is durable, the data written after the file's sync ("!" and "?")
        // is kept or lost, per file.
        sim.sync_dir(p("/d")).unwrap();
        f.write_at(b"?", 9).unwrap();
        for seed in 0..SEEDS {
            let got = image_of(&sim, "/d/kept", seed);
            match got.as_slice() {
                b"new kept" => synced_only = true,
                b"new kept!?" => in_full = true,
                other => panic!("seed {seed}: {other:?}"),
            }
        }
        assert!(synced_only && in_full);

        fn image_of(sim: &SimIo, path: &str, seed: u64) -> Vec<u8> {
            sim.crash_image(CrashMode::LoseDirEntries, seed)
                .read_file(Path::new(path))
                .unwrap()
        }
    }

    #[test]
    fn data_modes_keep_a_subset_of_directory_operations() {
        let sim = SimIo::new();
        sim.create_dir_all(p("/d")).unwrap();
        sim.sync_dir(p("/")).unwrap();
        sim.create_new(p("/d/1")).unwrap();
        sim.create_new(p("/d/2")).unwrap();
        sim.rename(p("/d/1"), p("/d/3")).unwrap();
        // Any subset of {create 1, create 2, rename 1 -> 3}, each atomic.
        let allowed: [&[&str]; 6] = [&[], &["1"], &["2"], &["3"], &["1", "2"], &["2", "3"]];
        let mut seen = BTreeSet::new();
        for mode in [
            CrashMode::TornPrefix,
            CrashMode::Garbage,
            CrashMode::Reorder,
        ] {
            for seed in 0..SEEDS {
                let names = sim.crash_image(mode, seed).list_dir(p("/d")).unwrap();
                let i = allowed.iter().position(|a| *a == names).expect("a subset");
                seen.insert(i);
            }
        }
        assert_eq!(seen.len(), 6);
        // The directory itself was made durable; a new unsynced one may vanish whole.
        sim.create_dir_all(p("/d/sub/x")).unwrap();
        let img = sim.crash_image(CrashMode::DropUnsynced, 0);
        assert_eq!(img.list_dir(p("/d/sub")), None);
        assert!(!img.exists(p("/d/sub/x")).unwrap());
    }

    #[test]
    fn reorder_applies_a_subset_of_sector_writes_in_any_order() {
        // Two unsynced writes to the same sector and one to a later sector.
        let sim = one_file(&[1u8; 512], &[]);
        let f = sim.open(p("/d/f"), true).unwrap();
        f.write_at(&[2u8; 512], 512).unwrap();
        f.write_at(&[3u8; 512], 512).unwrap();
        f.write_at(&[4u8; 512], 1024).unwrap();
        let mut outcomes = BTreeSet::new();
        for seed in 0..SEEDS {
            let got = image(&sim, CrashMode::Reorder, seed).unwrap();
            assert_eq!(&got[..512], &[1u8; 512]);
            let s1 = got.get(512..1024).map(|s| s[0]).unwrap_or(0);
            let s2 = got.get(1024..1536).map(|s| s[0]).unwrap_or(0);
            outcomes.insert((s1, s2));
        }
        // The older value of sector 1 can win, and sector 2 can land without sector 1.
        assert!(
            outcomes.contains(&(2, 0)) && outcomes.contains(&(2, 4)),
            "{outcomes:?}"
        );
        assert!(
            outcomes.contains(&(0, 4)) && outcomes.contains(&(3, 4)),
            "{outcomes:?}"
        );
    }

    #[test]
    fn same_seed_same_image() {
        let sim = one_file(b"abc", &[&[5u8; 3000], &[6u8; 700]]);
        for mode in CrashMode::ALL {
            let images: BTreeSet<Vec<u8>> =
                (0..20).map(|s| image(&sim, mode, s).unwrap()).collect();
            assert_eq!(image(&sim, mode, 7), image(&sim, mode, 7), "{mode}");
            if mode != CrashMode::DropUnsynced {
                assert!(images.len() > 1, "{mode}: every seed gave the same image");
            }
        }
    }

    #[test]
    fn crash_at_the_nth_sync_freezes_everything_before_it() {
        let sim = SimIo::new();
        sim.crash_at_sync(3);
        sim.create_dir_all(p("/d")).unwrap();
        sim.sync_dir(p("/")).unwrap(); // 1
        let f = sim.create_new(p("/d/f")).unwrap();
        f.write_at(b"one", 0).unwrap();
        f.sync_data().unwrap(); // 2
        f.write_at(b"two", 3).unwrap();
        assert!(f.sync_data().is_err()); // 3: does not happen
        assert!(sim.crashed().unwrap().contains("sync #3: sync_data /d/f"));
        assert!(f.write_at(b"x", 6).is_err());
        assert!(f.read_at(&mut [0u8; 1], 0).is_err());
        assert!(sim.list(p("/d")).is_err());
        assert!(sim.sync_dir(p("/d")).is_err());
        assert_eq!(sim.sync_count(), 3);
        // The entry of f was never synced; its data was.
        for mode in CrashMode::ALL {
            for seed in 0..20 {
                let img = sim.crash_image(mode, seed);
                if let Some(got) = img.read_file(p("/d/f")) {
                    assert_ne!(mode, CrashMode::DropUnsynced);
                    // Unsynced bytes are there, or zeros where the length grew without them.
                    assert!(got.starts_with(b"one") && got.len() <= 6, "{mode} {got:?}");
                    for (i, &b) in got.iter().enumerate().skip(3) {
                        assert!(b == b"onetwo"[i] || b == 0, "{mode} {got:?}");
                    }
                }
                // The image is a healthy file system.
                img.create_new(p("/d/g")).unwrap().sync_data().unwrap();
            }
        }
    }

    #[test]
    fn eio_on_the_nth_call_of_a_kind() {
        let sim = SimIo::new();
        let f = sim.create_new(p("/f")).unwrap();
        sim.inject(Fault::Eio {
            kind: OpKind::Write,
            nth: 2,
        });
        f.write_at(b"a", 0).unwrap();
        assert!(f.write_at(b"b", 1).is_err());
        f.write_at(b"c", 1).unwrap();
        for (kind, call) in [
            (OpKind::Read, 0),
            (OpKind::Create, 1),
            (OpKind::Rename, 2),
            (OpKind::Remove, 3),
            (OpKind::Sync, 4),
        ] {
            sim.inject(Fault::Eio { kind, nth: 1 });
            let failed = match call {
                0 => f.read_at(&mut [0u8; 1], 0).is_err(),
                1 => sim.create_new(p("/g")).is_err(),
                2 => sim.rename(p("/f"), p("/h")).is_err(),
                3 => sim.remove_file(p("/f")).is_err(),
                _ => sim.sync_dir(p("/")).is_err(),
            };
            assert!(failed, "{kind:?}");
        }
        assert_eq!(sim.read_file(p("/f")).unwrap(), b"ac");
    }

    #[test]
    fn enospc_and_short_writes_write_a_prefix() {
        let sim = SimIo::new();
        let f = sim.create_new(p("/f")).unwrap();
        sim.inject(Fault::Enospc { bytes: 5 });
        f.write_at(b"abc", 0).unwrap();
        let e = f.write_at(b"defg", 3).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(ENOSPC));
        assert_eq!(sim.read_file(p("/f")).unwrap(), b"abcde");
        assert!(f.allocate(100).is_err());
        sim.clear_faults();
        sim.inject(Fault::ShortWrite { nth: 2, keep: 2 });
        f.write_at(b"X", 0).unwrap();
        assert!(f.write_at(b"123456", 5).is_err());
        assert_eq!(sim.read_file(p("/f")).unwrap(), b"Xbcde12");
        f.write_at(b"3", 7).unwrap();
    }

    /// fsyncgate: a failed fdatasync loses the data it was to persist even though reads still
    /// see it and a later fdatasync succeeds.
    #[test]
    fn failed_sync_is_not_fixed_by_a_retry() {
        let sim = one_file(b"durable", &[b"+doomed"]);
        let f = sim.open(p("/d/f"), true).unwrap();
        sim.inject(Fault::Eio {
            kind: OpKind::Sync,
            nth: 1,
        });
        assert!(f.sync_data().is_err());
        f.sync_data().unwrap();
        assert_eq!(sim.read_file(p("/d/f")).unwrap(), b"durable+doomed");
        f.write_at(b"+later", 14).unwrap();
        f.sync_data().unwrap();
        for mode in CrashMode::ALL {
            let got = image(&sim, mode, 3).unwrap();
            assert_eq!(got, b"durable\0\0\0\0\0\0\0+later", "{mode}");
        }
    }

    #[test]
    fn locks_and_unlinked_open_files() {
        let sim = SimIo::new();
        let l = sim.try_lock(p("/LOCK")).unwrap().unwrap();
        assert!(sim.try_lock(p("/LOCK")).unwrap().is_none());
        drop(l);
        assert!(sim.try_lock(p("/LOCK")).unwrap().is_some());
        let f = sim.create_new(p("/f")).unwrap();
        sim.sync_dir(p("/")).unwrap();
        sim.remove_file(p("/f")).unwrap();
        f.write_at(b"still writable", 0).unwrap();
        f.sync_data().unwrap();
        sim.sync_dir(p("/")).unwrap();
        assert!(!sim
            .crash_image(CrashMode::Garbage, 0)
            .exists(p("/f"))
            .unwrap());
    }
}
