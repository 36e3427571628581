//! Durable save of 1 GiB of realistic float tensors with and without compression
//! (`Options::compression`), and the machine's plain `write_all` + `fdatasync` of the same
//! bytes, in one run on one file system: does zstd level 1 with byte-shuffling make a save
//! faster (fewer bytes to the disk) or slower (CPU) here?
//!
//! The data is what a trainer saves, not random bytes and not zeros: f32 weights drawn from
//! N(0, 0.02), Adam's first moment (N(0, 1e-4)) and second moment (squares of N(0, 1e-3):
//! positive, a narrow exponent range), and bf16 weights (the f32 weights rounded to bf16).
//! Every iteration changes one `u64` in every 4 MiB region (untimed), so nothing dedups.
//! The compression ratio of the bytes (raw / stored) is printed before the timings.
//!
//! The files live under `target/bench-tmp/` (the project's disk, not tmpfs); set
//! `CKPTSTORE_BENCH_DIR` to use another directory, `CKPT_BENCH_MIB` to save other than
//! 1024 MiB, and `CKPT_BENCH_LEVEL` for another zstd level.
//!
//! Run: `cargo bench --bench compress`

mod common;

use ckptstore::{Compression, DType, Options, Store};
use common::{bench_root, splitmix64};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use std::fs::File;
use std::hint::black_box;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
/// The store's chunk size (the default, 4 MiB); also the stride of the per-iteration edits.
const CHUNK: usize = 4 * MIB;

/// What each tensor holds.
#[derive(Clone, Copy)]
enum Kind {
    /// N(0, 0.02) weights.
    Weight,
    /// Adam exp_avg: N(0, 1e-4).
    Moment1,
    /// Adam exp_avg_sq: N(0, 1e-3)².
    Moment2,
}

/// (name, dtype, kind, share of the total in 1/16ths): 1/4 f32 weights, 1/4 + 1/4 Adam
/// moments in f32, 1/4 bf16 weights.
const MIX: &[(&str, DType, Kind, usize)] = &[
    ("model.weight", DType::F32, Kind::Weight, 4),
    ("optim.exp_avg", DType::F32, Kind::Moment1, 4),
    ("optim.exp_avg_sq", DType::F32, Kind::Moment2, 4),
    ("bf16.model.weight", DType::BF16, Kind::Weight, 4),
];

struct Tensor {
    name: &'static str,
    dtype: DType,
    shape: [u64; 1],
    bytes: Vec<u8>,
}

/// A standard normal (Box-Muller over SplitMix64).
fn normal(seed: &mut u64) -> f64 {
    let u = ((splitmix64(seed) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let v = (splitmix64(seed) >> 11) as f64 / (1u64 << 53) as f64;
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

fn make_tensors(total: usize) -> Vec<Tensor> {
    let mut seed = 0x5EED_u64;
    MIX.iter()
        .map(|&(name, dtype, kind, share)| {
            let nbytes = (total / 16 * share) / CHUNK * CHUNK;
            let n = nbytes / dtype.size();
            let mut bytes = Vec::with_capacity(nbytes);
            for _ in 0..n {
                let z = normal(&mut seed);
                let v = match kind {
                    Kind::Weight => z * 0.02,
                    Kind::Moment1 => z * 1e-4,
                    Kind::Moment2 => (z * 1e-3) * (z * 1e-3),
                } as f32;
                match dtype {
                    DType::BF16 => bytes.extend_from_slice(&v.to_le_bytes()[2..]),
                    _ => bytes.extend_from_slice(&v.to_le_bytes()),
                }
            }
            Tensor {
                name,
                dtype,
                shape: [n as u64],
                bytes,
            }
        })
        .collect()
}

/// Changes one `u64` at the start of every chunk-sized region, so every chunk's hash differs
/// from every earlier iteration's (the exponent bytes stay realistic: the low bytes change).
fn perturb(tensors: &mut [Tensor], iteration: u64) {
    for t in tensors {
        for region in t.bytes.chunks_mut(CHUNK) {
            region[0] ^= iteration as u8 | 1;
            region[1] ^= (iteration >> 8) as u8;
        }
    }
}

fn settle(dir: &Path) {
    let mut dirs = vec![dir.to_path_buf()];
    if let Ok(rd) = std::fs::read_dir(dir) {
        dirs.extend(
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    for d in dirs {
        File::open(&d)
            .and_then(|f| f.sync_all())
            .expect("fsync dir");
    }
}

/// One durable save (timed: `begin` to `commit` returning); then, untimed, deletion of every
/// checkpoint. Returns the time and (raw bytes, stored bytes) written.
fn store_save(store: &mut Store, tensors: &mut [Tensor], iteration: u64) -> (Duration, u64, u64) {
    perturb(tensors, iteration);
    let start = Instant::now();
    let mut t = store.begin(iteration).expect("begin");
    for x in tensors.iter() {
        t.put_tensor(x.name, x.dtype, &x.shape, &x.bytes)
            .expect("put_tensor");
    }
    let info = t.commit().expect("commit");
    let timed = start.elapsed();
    assert_eq!(info.bytes_deduplicated, 0, "nothing may dedup");
    // Every checkpoint goes, the new one too: at most one save's bytes are on disk at a time
    // (nothing would dedup against it anyway).
    for old in store.list() {
        store.delete(old.id).expect("delete");
    }
    settle(store.dir());
    (timed, info.raw_bytes_written, info.bytes_written)
}

fn plain_save(path: &Path, tensors: &mut [Tensor], iteration: u64) -> Duration {
    perturb(tensors, iteration);
    let start = Instant::now();
    let mut f = File::create(path).expect("create");
    for x in tensors.iter() {
        f.write_all(black_box(&x.bytes)).expect("write_all");
    }
    f.sync_data().expect("fdatasync");
    let timed = start.elapsed();
    drop(f);
    std::fs::remove_file(path).expect("remove");
    settle(path.parent().expect("file in a dir"));
    timed
}

fn compress(c: &mut Criterion) {
    let mib = std::env::var("CKPT_BENCH_MIB")
        .ok()
        .map_or(1024, |v| v.parse().expect("CKPT_BENCH_MIB=<MiB>"));
    let level = std::env::var("CKPT_BENCH_LEVEL")
        .ok()
        .map_or(1, |v| v.parse().expect("CKPT_BENCH_LEVEL=<zstd level>"));
    let mut tensors = make_tensors(mib * MIB);
    let total: usize = tensors.iter().map(|t| t.bytes.len()).sum();
    let root = bench_root("bench-tmp");
    let mut iteration = 0u64;

    let mut group = c.benchmark_group(format!("save_{mib}MiB_floats"));
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Bytes(total as u64));

    for (label, compression) in [
        ("store_commit_raw", Compression::None),
        (
            &*format!("store_commit_zstd{level}_shuffle"),
            Compression::Zstd { level },
        ),
    ] {
        let dir = root.join("compress-store");
        let _ = std::fs::remove_dir_all(&dir);
        let mut store = Store::open(
            &dir,
            Options {
                chunk_size: CHUNK,
                compression,
                ..Default::default()
            },
        )
        .expect("open store");
        // Untimed saves first (page-cache memory faulted in), and the ratio of each tensor.
        for _ in 0..2 {
            iteration += 1;
            store_save(&mut store, &mut tensors, iteration);
        }
        iteration += 1;
        perturb(&mut tensors, iteration);
        for x in &tensors {
            let mut t = store.begin(iteration).expect("begin");
            t.put_tensor(x.name, x.dtype, &x.shape, &x.bytes)
                .expect("put");
            let info = t.commit().expect("commit");
            let id = info.checkpoint.id;
            eprintln!(
                "{label}: {:<18} {:>5} MiB raw -> {:>5} MiB stored, ratio {:.3} (stored/raw {:.3})",
                x.name,
                info.raw_bytes_written / MIB as u64,
                info.bytes_written / MIB as u64,
                info.raw_bytes_written as f64 / info.bytes_written.max(1) as f64,
                info.bytes_written as f64 / info.raw_bytes_written.max(1) as f64,
            );
            store.delete(id).expect("delete");
        }
        let (_, raw, stored) = store_save(&mut store, &mut tensors, {
            iteration += 1;
            iteration
        });
        eprintln!(
            "{label}: all {} MiB raw -> {} MiB stored, ratio {:.3}",
            raw / MIB as u64,
            stored / MIB as u64,
            raw as f64 / stored as f64
        );
        group.bench_function(label, |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        iteration += 1;
                        store_save(&mut store, &mut tensors, iteration).0
                    })
                    .sum()
            })
        });
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    let file_path = root.join("compress-baseline.bin");
    let _ = std::fs::remove_file(&file_path);
    for _ in 0..2 {
        iteration += 1;
        plain_save(&file_path, &mut tensors, iteration);
    }
    group.bench_function("write_all_fdatasync", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    iteration += 1;
                    plain_save(&file_path, &mut tensors, iteration)
                })
                .sum()
        })
    });
    group.finish();
}

criterion_group!(benches, compress);
criterion_main!(benches);
