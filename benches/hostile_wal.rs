//! Open time of a store whose WAL ends in a crafted 128 MiB tail (issue 14: "a crafted
//! 128 MiB WAL hangs any open"). A small store (3 commits) is built once; each case copies it
//! and appends one tail to `00000001.wal`:
//!
//! * `cells`: a bad frame, then 16-byte cells, each a well-formed frame header (type 1, zero
//!   reserved bytes) claiming up to 64 MiB inside the file — the torn-tail search would
//!   checksum ~8 million candidates of up to 64 MiB each without its budget;
//! * `claims_to_end`: a bad frame, then a frame header every 16 bytes claiming exactly the rest
//!   of the file (each candidate costs the whole remaining tail to checksum);
//! * `zeros`: 128 MiB of zeros (a preallocated reserve a power cut kept): a torn tail;
//! * `bad_crc_records`: back-to-back whole 4 KiB records with wrong checksums.
//!
//! Every open is read-only, so the crafted file is never repaired between iterations; the
//! outcome (refused as corruption, or the tail ignored as torn) is asserted, the time measured.
//! The outcomes are tested in `tests/bad_input_fs.rs`.
//!
//! And `salvage_after_early_damage`: a store of `SALVAGE_COMMITS` checkpoints (32 distinct
//! chunks each) whose second commit record has a flipped payload byte, opened read-only with
//! `RecoveryMode::PointInTime`: the salvage skips that record and applies every record after
//! it (asserted: the same checkpoints every iteration). It cloned the whole state for each of them
//! (O(records x state)); it is linear now.
//!
//! Run: `cargo bench --bench hostile_wal`

#[allow(dead_code, reason = "this bench needs only the bench directory")]
mod common;

use ckptstore::wal::{self, WalHeader, RECORD_HEADER_LEN};
use ckptstore::{DType, Error, Options, RecoveryMode, Store};
use common::bench_root;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const TAIL: usize = 128 << 20;

fn base_store(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    let mut s = Store::open(dir, Options::default()).expect("create store");
    for step in 1..=3u64 {
        let w: Vec<u8> = (0..40_000u32).map(|i| (i as u64 * step) as u8).collect();
        let mut t = s.begin(step).expect("begin");
        t.put_tensor("w", DType::U8, &[w.len() as u64], &w)
            .expect("put");
        t.commit().expect("commit");
    }
}

/// A frame header: crc, length, type, zero reserved bytes.
fn header(crc: u32, len: u32, ty: u8) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[0..4].copy_from_slice(&crc.to_le_bytes());
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h[8] = ty;
    h
}

/// The crafted tail of `case`, appended to `wal` (bytes of the store's WAL).
fn craft(case: &str, wal: &mut Vec<u8>) {
    let bad_frame = [0xeeu8; RECORD_HEADER_LEN];
    match case {
        "cells" => {
            wal.extend_from_slice(&bad_frame);
            let cells = TAIL / 16;
            for i in 0..cells {
                let left = ((cells - i) * 16 - RECORD_HEADER_LEN) as u32;
                wal.extend_from_slice(&header(i as u32, left.min(wal::MAX_RECORD_LEN), 1));
                wal.extend_from_slice(&[0xab; 4]);
            }
        }
        "claims_to_end" => {
            wal.extend_from_slice(&bad_frame);
            let cells = TAIL / 16;
            for i in 0..cells {
                let left = ((cells - i) * 16 - RECORD_HEADER_LEN) as u32;
                wal.extend_from_slice(&header(!(i as u32), left.min(wal::MAX_RECORD_LEN), 2));
                wal.extend_from_slice(&[0x11; 4]);
            }
        }
        "zeros" => wal.resize(wal.len() + TAIL, 0),
        "bad_crc_records" => {
            let payload = [0x5au8; 4096 - RECORD_HEADER_LEN];
            for i in 0..TAIL / 4096 {
                wal.extend_from_slice(&header(i as u32, payload.len() as u32, 1));
                wal.extend_from_slice(&payload);
            }
        }
        other => panic!("unknown case {other}"),
    }
}

const CASES: [&str; 4] = ["cells", "claims_to_end", "zeros", "bad_crc_records"];

fn prepare(root: &Path) -> Vec<(&'static str, PathBuf)> {
    let base = root.join("base");
    base_store(&base);
    let wal_bytes = std::fs::read(base.join("00000001.wal")).expect("read WAL");
    WalHeader::decode(&wal_bytes).expect("a WAL header");
    CASES
        .iter()
        .map(|&case| {
            let dir = root.join(case);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("segments")).expect("mkdir");
            for e in std::fs::read_dir(base.join("segments")).expect("list") {
                let e = e.expect("entry");
                std::fs::copy(e.path(), dir.join("segments").join(e.file_name())).expect("copy");
            }
            std::fs::copy(base.join("CURRENT"), dir.join("CURRENT")).expect("copy CURRENT");
            let mut wal = wal_bytes.clone();
            craft(case, &mut wal);
            std::fs::write(dir.join("00000001.wal"), &wal).expect("write WAL");
            (case, dir)
        })
        .collect()
}

/// Opens read-only and checks the outcome: refused as corruption, or the 3 checkpoints.
fn open_once(case: &str, dir: &Path) {
    let r = Store::open(dir, Options::read_only());
    match (case, r) {
        ("zeros", Ok(s)) => assert_eq!(s.list().len(), 3),
        ("zeros", Err(e)) => panic!("zeros: {e}"),
        (_, Err(Error::WalCorrupt { .. })) => {}
        (case, other) => panic!("{case}: {:?}", other.map(|s| s.list().len())),
    }
}

fn hostile_wal(c: &mut Criterion) {
    let root = bench_root("bench-hostile-wal");
    let started = Instant::now();
    let cases = prepare(&root);
    eprintln!(
        "prepared {} stores with a {} MiB crafted WAL tail in {:.1?}",
        cases.len(),
        TAIL >> 20,
        started.elapsed()
    );
    let mut group = c.benchmark_group("open_crafted_128mib_wal");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for (case, dir) in &cases {
        group.bench_with_input(BenchmarkId::from_parameter(case), dir, |b, dir| {
            b.iter(|| open_once(case, dir))
        });
    }
    group.finish();
    for (_, dir) in cases {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Checkpoints of the salvage case's store.
const SALVAGE_COMMITS: u64 = 600;

/// The salvage case's store: `SALVAGE_COMMITS` commits of 32 distinct 4 KiB chunks, the
/// payload of the WAL's second record damaged.
fn salvage_store(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    let o = Options {
        chunk_size: 4096,
        ..Options::default()
    };
    let mut s = Store::open(dir, o).expect("create store");
    for step in 1..=SALVAGE_COMMITS {
        let w: Vec<u8> = (0..32 * 4096u64)
            .map(|i| (i.wrapping_mul(2654435761) ^ step.wrapping_mul(0x9e37_79b9)) as u8)
            .collect();
        let mut t = s.begin(step).expect("begin");
        t.put_tensor("w", DType::U8, &[w.len() as u64], &w)
            .expect("put");
        t.commit().expect("commit");
    }
    drop(s);
    let path = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|x| x == "wal"))
        .expect("a WAL");
    let mut b = std::fs::read(&path).expect("read WAL");
    let h = WalHeader::decode(&b).expect("a WAL header");
    let scan = wal::scan(&b, h.salt);
    let second = scan.records[1].payload.start + 8;
    b[second] ^= 0x55;
    std::fs::write(&path, &b).expect("write WAL");
}

fn salvage(c: &mut Criterion) {
    let dir = bench_root("bench-hostile-wal").join("salvage");
    let started = Instant::now();
    salvage_store(&dir);
    eprintln!(
        "prepared a {SALVAGE_COMMITS}-checkpoint store with its second record damaged in {:.1?}",
        started.elapsed()
    );
    let opts = Options {
        recovery_mode: RecoveryMode::PointInTime,
        ..Options::read_only()
    };
    // The salvage's decisions are tested in tests/bad_input_fs.rs; here every iteration must
    // reach the same ones as the first.
    let kept = Store::open(&dir, opts.clone())
        .expect("salvage")
        .list()
        .len();
    eprintln!("salvage keeps {kept} of {SALVAGE_COMMITS} checkpoints");
    assert!(kept as u64 > SALVAGE_COMMITS / 2);
    let mut group = c.benchmark_group("salvage_after_early_damage");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    group.bench_function(BenchmarkId::from_parameter(SALVAGE_COMMITS), |b| {
        b.iter(|| {
            let s = Store::open(&dir, opts.clone()).expect("salvage");
            assert_eq!(s.list().len(), kept);
        })
    });
    group.finish();
    let _ = std::fs::remove_dir_all(dir);
}

criterion_group!(benches, hostile_wal, salvage);
criterion_main!(benches);
