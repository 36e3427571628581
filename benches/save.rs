//! Durable save of 1 GiB of tensors through the store, against the machine's own limit: a
//! plain `write_all` + `fdatasync` of the same bytes to a new file on the same file system.
//!
//! Both functions run in one group with `Throughput::Bytes`, so criterion reports MB/s for
//! each and the ratio store/baseline can be read off one run. Every iteration changes one
//! `u64` in every chunk-sized region of every tensor (untimed), so the store never dedups
//! against an earlier iteration; older checkpoints (and the baseline file) are deleted after
//! each iteration (untimed) so the disk does not fill, and the directories are fsynced
//! (untimed) so freeing those blocks is not charged to the next iteration.
//!
//! The files live under `target/bench-tmp/` (the project's disk, not tmpfs); set
//! `CKPTSTORE_BENCH_DIR` to use another directory.
//!
//! Run: `cargo bench --bench save`

mod common;

use ckptstore::{DType, Options, Store};
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

/// A transformer-ish mix (name, dtype, MiB): big f32 weights and optimizer state plus bf16
/// copies; 1 GiB in all.
const MIX: &[(&str, DType, usize)] = &[
    ("embed.weight", DType::F32, 256),
    ("optim.exp_avg", DType::F32, 256),
    ("layers.0.mlp.w1", DType::F32, 128),
    ("layers.0.mlp.w2", DType::F32, 64),
    ("layers.0.attn.qkv", DType::F32, 64),
    ("layers.0.attn.out", DType::F32, 32),
    ("layers.1.mlp.w1", DType::F32, 16),
    ("layers.1.mlp.w2", DType::F32, 16),
    ("bf16.embed.weight", DType::BF16, 128),
    ("bf16.layers.0.mlp.w1", DType::BF16, 32),
    ("bf16.layers.0.attn.qkv", DType::BF16, 16),
    ("bf16.layers.1.mlp.w1", DType::BF16, 16),
];

struct Tensor {
    name: &'static str,
    dtype: DType,
    shape: [u64; 1],
    bytes: Vec<u8>,
}

/// Random-looking bytes: nothing dedups, within a tensor or across tensors.
fn make_tensors() -> Vec<Tensor> {
    let mut seed = 0x5EED_u64;
    MIX.iter()
        .map(|&(name, dtype, mib)| {
            let nbytes = mib * MIB;
            let mut bytes = vec![0u8; nbytes];
            for w in bytes.chunks_exact_mut(8) {
                w.copy_from_slice(&splitmix64(&mut seed).to_le_bytes());
            }
            Tensor {
                name,
                dtype,
                shape: [(nbytes / dtype.size()) as u64],
                bytes,
            }
        })
        .collect()
}

/// Changes one `u64` at the start of every chunk-sized region, so every chunk's hash differs
/// from every earlier iteration's.
fn perturb(tensors: &mut [Tensor], iteration: u64) {
    for t in tensors {
        for region in t.bytes.chunks_mut(CHUNK) {
            let w = &mut region[..8];
            let v = u64::from_le_bytes(w.try_into().unwrap()) ^ iteration.wrapping_add(1);
            w.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// fsyncs `dir` and its subdirectories, untimed, after a deletion: the journal commit that
/// frees the deleted file's blocks (and, on a `-o discard` mount, discards them) then happens
/// here instead of inside the next iteration's timed fdatasync.
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

/// One durable save through the store (timed: `begin` to `commit` returning), then, untimed,
/// deletion of every older checkpoint and a settle.
fn store_save(store: &mut Store, tensors: &mut [Tensor], iteration: u64, total: usize) -> Duration {
    perturb(tensors, iteration);
    let start = Instant::now();
    let mut t = store.begin(iteration).expect("begin");
    for x in tensors.iter() {
        t.put_tensor(x.name, x.dtype, &x.shape, &x.bytes)
            .expect("put_tensor");
    }
    let info = t.commit().expect("commit");
    let timed = start.elapsed();
    assert_eq!(info.bytes_written, total as u64, "nothing may dedup");
    // Keep only the checkpoint just written (a live, previous checkpoint is what a trainer's
    // next save sees; its chunks are in the dedup index but never match).
    for old in store.list() {
        if old.id != info.checkpoint.id {
            store.delete(old.id).expect("delete");
        }
    }
    settle(store.dir());
    timed
}

/// The same bytes with `write_all` into one new file, then `fdatasync` (timed); then, untimed,
/// removal of the file and a settle.
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

fn save(c: &mut Criterion) {
    let mut tensors = make_tensors();
    let total: usize = tensors.iter().map(|t| t.bytes.len()).sum();
    let root = bench_root("bench-tmp");
    let mut iteration = 0u64;

    let mut group = c.benchmark_group("save_1GiB");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Bytes(total as u64));

    // Through the store: hash, dedup lookup, segment writes, commit (segment fdatasync, dir
    // fsync, WAL append + fdatasync). Durable when `commit` returns.
    let store_dir = root.join("save-store");
    let _ = std::fs::remove_dir_all(&store_dir);
    let mut store = Store::open(
        &store_dir,
        Options {
            chunk_size: CHUNK,
            ..Default::default()
        },
    )
    .expect("open store");
    // Two untimed saves first, whatever criterion's warm-up does: on this VM the first saves
    // that need fresh page-cache memory (the store keeps the previous checkpoint cached, ~2 GiB
    // in use) run 2-4x slower while the guest faults that memory in.
    for _ in 0..2 {
        iteration += 1;
        store_save(&mut store, &mut tensors, iteration, total);
    }
    group.bench_function("store_commit", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    iteration += 1;
                    store_save(&mut store, &mut tensors, iteration, total)
                })
                .sum()
        })
    });
    drop(store);
    let _ = std::fs::remove_dir_all(&store_dir);

    // The machine's limit for the same durability through the page cache: one new file,
    // write_all of every tensor, fdatasync.
    let file_path = root.join("save-baseline.bin");
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

criterion_group!(benches, save);
criterion_main!(benches);
