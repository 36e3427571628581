//! `SimIo::crash_image`: the file system a power cut leaves, in each [`CrashMode`].

use super::fs::{apply, apply_dir, DirState, Entry, FileOp, Fs, Inode};
use super::SimIo;
use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

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

impl SimIo {
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
