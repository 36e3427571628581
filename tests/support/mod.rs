//! Helpers shared by the engine's behaviour tests: deterministic data, small-chunk options,
//! and locating and copying the files of a store directory.
#![allow(dead_code, unused_macros)]

use ckptstore::{CommitInfo, DType, Options, Selector, Store};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `return Err(format!(...))` unless `$cond`: the early exit of checkers that report a
/// property's failure as a message (`#[macro_use] mod support;` to use it).
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err(format!($($fmt)*));
        }
    };
}

pub mod expect;

/// Chunk size of every test store: small, so multi-chunk tensors stay small.
pub const CHUNK: usize = 4096;

/// Deterministic pseudo-random bytes (xorshift), different for every seed.
pub fn data(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Default options with 4 KiB chunks.
pub fn opts() -> Options {
    Options {
        chunk_size: CHUNK,
        ..Default::default()
    }
}

/// Commits one checkpoint at `step` holding `tensors` (all `u8`, one-dimensional).
pub fn commit(store: &mut Store, step: u64, tensors: &[(&str, &[u8])]) -> CommitInfo {
    let mut t = store.begin(step).unwrap();
    t.set_metadata("step", step as i64);
    for (name, bytes) in tensors {
        t.put_tensor(name, DType::U8, &[bytes.len() as u64], bytes)
            .unwrap();
    }
    t.commit().unwrap()
}

/// Asserts that checkpoint `id` holds exactly `tensors`, bit-exact, and verifies.
pub fn assert_holds(store: &Store, id: u64, tensors: &[(&str, &[u8])]) {
    let ck = store.checkpoint(Selector::Id(id)).unwrap();
    let names: Vec<&str> = tensors.iter().map(|(n, _)| *n).collect();
    assert_eq!(ck.tensor_names(), names, "checkpoint {id}");
    for (name, bytes) in tensors {
        let t = ck.tensor(name).unwrap();
        assert_eq!(t.dtype, DType::U8);
        assert_eq!(t.shape, vec![bytes.len() as u64]);
        assert!(t.data == *bytes, "checkpoint {id} tensor {name} differs");
    }
    store.verify(id).unwrap();
}

/// Path of the live WAL file, as named by `CURRENT`.
pub fn live_wal(dir: &Path) -> PathBuf {
    let cur = std::fs::read(dir.join("CURRENT")).unwrap();
    let n = ckptstore::current::decode(&cur).expect("valid CURRENT");
    dir.join(ckptstore::store::wal_file_name(n))
}

/// Length of a file in bytes.
pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// Segment files (`segments/*.seg`) with their lengths.
pub fn segment_files(dir: &Path) -> BTreeMap<String, u64> {
    std::fs::read_dir(dir.join("segments"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .collect()
}

/// Every file under `dir` (relative path → contents).
pub fn snapshot_tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, at: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(at).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Copies the store directory `from` into the (existing, empty) directory `to`.
pub fn copy_tree(from: &Path, to: &Path) {
    for (rel, bytes) in snapshot_tree(from) {
        let dst = to.join(rel);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::write(dst, bytes).unwrap();
    }
    std::fs::create_dir_all(to.join("segments")).unwrap();
}

/// The segment id and payload offset of chunk `chunk` of tensor `name` in checkpoint `id`.
pub fn chunk_location(store: &Store, id: u64, name: &str, chunk: usize) -> (u64, u64) {
    let ck = store.checkpoint(Selector::Id(id)).unwrap();
    let t = ck
        .manifest()
        .tensors
        .iter()
        .find(|t| t.name == name)
        .unwrap();
    (t.chunks[chunk].segment, t.chunks[chunk].offset)
}

/// Path of segment `id`.
pub fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join("segments").join(ckptstore::segment::file_name(id))
}

/// CRC-32C (Castagnoli), bitwise; independent of the engine's implementation.
pub fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
