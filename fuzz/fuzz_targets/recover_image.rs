//! Recovery of a damaged store image. A small valid store (a few commits, a delete, shared
//! chunks, a segment compaction and its Relocate record; in one variant a compacted WAL that
//! starts with a snapshot record) is built once in
//! a `MemIo`; the input then damages a copy of it — flips bytes, truncates, splices one file
//! into another, writes bytes, deletes files, copies a file under another store name, turns a
//! file into a directory, and (optionally) recomputes every CRC so the damage gets past the
//! checksums — and the store is opened read-only and as a writer.
//!
//! Invariants: no panic; no unbounded allocation; every listed checkpoint verifies or fails
//! with a typed error; `latest_valid()` never returns a checkpoint that fails verification;
//! unless CRCs were forged, a checkpoint that verifies holds exactly the bytes committed under
//! its id; a writer's recovery never loses a checkpoint that verified before it, and a commit
//! on the recovered store survives a reopen.
#![no_main]

#[path = "../../tests/support/mod.rs"]
mod support;

use ckptstore::io::{MemIo, Storage};
use ckptstore::{DType, Options, RecoveryMode, Selector, Store};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use support::data as bytes;

const DIR: &str = "/s";
/// Files never grow past this while being damaged.
const MAX_FILE: usize = 1 << 20;

/// A committed checkpoint's contents: tensors then blobs, name → bytes.
type Contents = Vec<(String, Vec<u8>)>;

struct Image {
    files: BTreeMap<PathBuf, Vec<u8>>,
    expected: BTreeMap<u64, (Contents, Contents)>,
}

fn opts(mem: &MemIo, read_only: bool, mode: RecoveryMode) -> Options {
    Options {
        read_only,
        recovery_mode: mode,
        chunk_size: 4096,
        segment_max_bytes: 1 << 20,
        io: Arc::new(mem.clone()),
        ..Default::default()
    }
}

fn build(compacted: bool) -> Image {
    let mem = MemIo::new();
    // Compact any segment with a dead byte, so the image holds a Relocate record (or, compacted,
    // relocated manifests).
    let build_opts = Options {
        compact_live_fraction: 1.0,
        ..opts(&mem, false, RecoveryMode::default())
    };
    let mut s = Store::open(DIR, build_opts).unwrap();
    let mut expected = BTreeMap::new();
    let steps: [(&[(&str, u64, usize)], &[(&str, u64, usize)]); 4] = [
        (&[("a", 1, 10_000), ("b", 2, 100)], &[]),
        (&[("a", 1, 10_000), ("c", 3, 5_000)], &[("opt", 4, 300)]),
        (&[("z", 5, 0), ("d", 6, 4096)], &[]),
        (&[("a", 7, 10_000), ("b", 2, 100)], &[("opt", 8, 50)]),
    ];
    for (i, (tensors, blobs)) in steps.iter().enumerate() {
        let mut t = s.begin(i as u64 + 1).unwrap();
        t.set_metadata("lr", 0.1 * i as f64);
        let mut tc = Vec::new();
        for &(name, seed, len) in tensors.iter() {
            let b = bytes(seed, len);
            t.put_tensor(name, DType::U8, &[len as u64], &b).unwrap();
            tc.push((name.to_string(), b));
        }
        let mut bc = Vec::new();
        for &(name, seed, len) in blobs.iter() {
            let b = bytes(seed, len);
            t.put_blob(name, &b).unwrap();
            bc.push((name.to_string(), b));
        }
        let id = t.commit().unwrap().checkpoint.id;
        expected.insert(id, (tc, bc));
        if i == 1 {
            // Its contents stay in `expected`: a damaged WAL may bring it back, and then it
            // must still hold what it held.
            s.delete(1).unwrap();
            assert!(!s.gc().unwrap().segments_compacted.is_empty());
            if compacted {
                s.compact_wal().unwrap();
            }
        }
    }
    drop(s);
    let mut files = BTreeMap::new();
    for sub in ["", "segments"] {
        let d = Path::new(DIR).join(sub);
        for name in mem.list(&d).unwrap() {
            let p = d.join(&name);
            if let Some(b) = mem.read_file(&p) {
                files.insert(p, b);
            }
        }
    }
    Image { files, expected }
}

fn images() -> &'static [Image; 2] {
    static IMAGES: OnceLock<[Image; 2]> = OnceLock::new();
    IMAGES.get_or_init(|| [build(false), build(true)])
}

/// Reads the input front to back; runs out as zeros.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

/// Entries of the damaged image: a file's bytes, or `None` for a directory.
type Tree = BTreeMap<PathBuf, Option<Vec<u8>>>;

fn pick(tree: &Tree, i: u8) -> Option<PathBuf> {
    if tree.is_empty() {
        return None;
    }
    tree.keys().nth(i as usize % tree.len()).cloned()
}

fn other_name(inp: &mut Input) -> PathBuf {
    let d = Path::new(DIR);
    match inp.u8() % 10 {
        0 => d.join("00000001.wal"),
        1 => d.join("00000002.wal"),
        2 => d.join("00000003.wal"),
        3 => d.join("CURRENT"),
        4 => d.join("CURRENT.tmp"),
        5 => d.join("segments/18446744073709551615.seg"),
        6 => d.join("segments/99999999999999999999.seg"),
        7 => d
            .join("segments")
            .join(ckptstore::segment::file_name(u64::from(inp.u8() % 12))),
        8 => d.join(format!("{:08}.wal", inp.u32())),
        _ => d.join("segments").join(format!("{:08}.seg", inp.u32())),
    }
}

fn crc_fix(tree: &mut Tree) {
    for (path, entry) in tree.iter_mut() {
        let Some(b) = entry else { continue };
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name == "CURRENT" && b.len() == 24 {
            let c = crc32c::crc32c(&b[..20]);
            b[20..24].copy_from_slice(&c.to_le_bytes());
        } else if name.ends_with(".seg") && b.len() >= 32 {
            let c = crc32c::crc32c(&b[..28]);
            b[28..32].copy_from_slice(&c.to_le_bytes());
        } else if name.ends_with(".wal") && b.len() >= 32 {
            let c = crc32c::crc32c(&b[..28]);
            b[28..32].copy_from_slice(&c.to_le_bytes());
            let salt = u32::from_le_bytes(b[12..16].try_into().unwrap());
            let mut at = 32;
            while at + 12 <= b.len() {
                let len = u32::from_le_bytes(b[at + 4..at + 8].try_into().unwrap()) as usize;
                if !(1..=3).contains(&b[at + 8]) || at + 12 + len > b.len() {
                    break;
                }
                let c = crc32c::crc32c(&salt.to_le_bytes());
                let c = crc32c::crc32c_append(c, &b[at + 4..at + 12]);
                let c = crc32c::crc32c_append(c, &b[at + 12..at + 12 + len]);
                b[at..at + 4].copy_from_slice(&c.to_le_bytes());
                at += 12 + len;
            }
        }
    }
}

fn damage(tree: &mut Tree, inp: &mut Input) -> bool {
    let mut forged = false;
    for _ in 0..8 {
        if inp.0.is_empty() {
            break;
        }
        let op = inp.u8();
        let Some(path) = pick(tree, inp.u8()) else {
            break;
        };
        match op % 9 {
            0 => {
                // Flip bits of one byte.
                let (at, mask) = (inp.u32() as usize, inp.u8().max(1));
                if let Some(Some(b)) = tree.get_mut(&path) {
                    if !b.is_empty() {
                        let n = b.len();
                        b[at % n] ^= mask;
                    }
                }
            }
            1 => {
                // Truncate.
                let len = inp.u32() as usize;
                if let Some(Some(b)) = tree.get_mut(&path) {
                    let n = b.len();
                    b.truncate(len % (n + 1));
                }
            }
            2 => {
                // Splice a range of another file over this one.
                let src = pick(tree, inp.u8()).unwrap();
                let (from, n, to) = (
                    inp.u32() as usize,
                    inp.u32() as usize % 8192,
                    inp.u32() as usize,
                );
                let Some(Some(s)) = tree.get(&src) else {
                    continue;
                };
                if s.is_empty() {
                    continue;
                }
                let from = from % s.len();
                let piece = s[from..(from + n).min(s.len())].to_vec();
                if let Some(Some(b)) = tree.get_mut(&path) {
                    let to = to % (b.len() + 1);
                    if to + piece.len() <= MAX_FILE {
                        if b.len() < to + piece.len() {
                            b.resize(to + piece.len(), 0);
                        }
                        b[to..to + piece.len()].copy_from_slice(&piece);
                    }
                }
            }
            3 => {
                tree.remove(&path);
            }
            4 => {
                // Write input bytes at an offset (may extend the file).
                let at = inp.u32() as usize;
                let n = inp.u8() as usize;
                let lit = inp.take(n).to_vec();
                if let Some(Some(b)) = tree.get_mut(&path) {
                    let at = at % (b.len() + 1);
                    if b.len() < at + lit.len() {
                        b.resize(at + lit.len(), 0);
                    }
                    b[at..at + lit.len()].copy_from_slice(&lit);
                }
            }
            5 => {
                // Copy a file under another store name (a stale WAL, a foreign segment...).
                let to = other_name(inp);
                let v = tree[&path].clone();
                tree.insert(to, v);
            }
            6 => {
                // Replace a file by a directory of the same name.
                tree.insert(path, None);
            }
            7 => {
                // Append zeros (preallocated space) or garbage.
                let n = inp.u32() as usize % 4096;
                let fill = inp.u8();
                if let Some(Some(b)) = tree.get_mut(&path) {
                    if b.len() + n <= MAX_FILE {
                        b.resize(b.len() + n, fill);
                    }
                }
            }
            _ => {
                crc_fix(tree);
                forged = true;
            }
        }
    }
    forged
}

fn materialize(tree: &Tree) -> MemIo {
    let mem = MemIo::new();
    mem.create_dir_all(&Path::new(DIR).join("segments"))
        .unwrap();
    for (p, e) in tree {
        match e {
            Some(b) => mem.write_file(p, b.clone()),
            None => mem.create_dir_all(p).unwrap(),
        }
    }
    mem
}

/// Checks what the store lists; returns the ids that verified.
fn check(s: &Store, img: &Image, forged: bool) -> Vec<u64> {
    let mut ok = Vec::new();
    for (id, r) in s.verify_all() {
        if r.is_err() {
            continue;
        }
        ok.push(id);
        if forged {
            continue;
        }
        let (tensors, blobs) = img
            .expected
            .get(&id)
            .unwrap_or_else(|| panic!("checkpoint {id} verifies but was never committed"));
        let ck = s.checkpoint(Selector::Id(id)).unwrap();
        let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(ck.tensor_names(), names);
        for (name, want) in tensors {
            let t = ck.tensor(name).expect("verified checkpoint reads");
            assert!(
                t.data == *want,
                "checkpoint {id} tensor {name}: wrong bytes"
            );
        }
        for (name, want) in blobs {
            let b = ck.blob(name).expect("verified checkpoint reads");
            assert!(b == *want, "checkpoint {id} blob {name}: wrong bytes");
        }
    }
    if let Ok(Some(c)) = s.latest_valid() {
        assert!(
            ok.contains(&c.id),
            "latest_valid returned checkpoint {} that fails verification",
            c.id
        );
    }
    ok
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let flags = inp.u8();
    let img = &images()[usize::from(flags & 1)];
    let mode = match (flags >> 1) % 3 {
        0 => RecoveryMode::TolerateTailCorruption,
        1 => RecoveryMode::PointInTime,
        _ => RecoveryMode::AbsoluteConsistency,
    };
    let mut tree: Tree = img
        .files
        .iter()
        .map(|(p, b)| (p.clone(), Some(b.clone())))
        .collect();
    let forged = damage(&mut tree, &mut inp);
    let mem = materialize(&tree);

    // Read-only first: it must not modify anything.
    let verified_before = match Store::open(DIR, opts(&mem, true, mode)) {
        Ok(s) => check(&s, img, forged),
        Err(e) => {
            let _ = e.to_string();
            Vec::new()
        }
    };
    let Ok(mut s) = Store::open(DIR, opts(&mem, false, mode)) else {
        return;
    };
    let verified = check(&s, img, forged);
    for id in &verified_before {
        assert!(
            verified.contains(id),
            "writer recovery lost verified checkpoint {id}"
        );
    }
    let committed = (|| {
        let mut t = s.begin(99).ok()?;
        t.put_tensor("new", DType::U8, &[5000], &bytes(42, 5000))
            .ok()?;
        t.commit().ok().map(|i| i.checkpoint.id)
    })();
    drop(s);
    let s = Store::open(DIR, opts(&mem, false, mode)).expect("a store that opened reopens");
    let after = s.list();
    for id in &verified {
        assert!(
            after.iter().any(|c| c.id == *id),
            "checkpoint {id} lost by a commit"
        );
        s.verify(*id).expect("still verifies");
    }
    if let Some(id) = committed {
        let t = s
            .checkpoint(Selector::Id(id))
            .expect("acknowledged commit listed");
        assert!(t.tensor("new").unwrap().data == bytes(42, 5000));
    }
});
