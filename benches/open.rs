//! Open (recovery) time of a store holding 1,000 checkpoints × 100 tensors, read-only and as
//! the writer, for two stores with the same checkpoint and tensor counts but tensors of 16 B
//! and of 4 KiB. Recovery reads metadata only (the WAL, a stat per segment), so the two must
//! open in about the same time although one holds 256× the tensor bytes.
//!
//! The stores are built once under `target/bench-stores/` (1,000 durable commits each, which
//! takes a while) and reused by later runs when they list 1,000 checkpoints. Set
//! `CKPTSTORE_BENCH_DIR` to put them elsewhere.
//!
//! Run: `cargo bench --bench open`

mod common;

use ckptstore::{DType, Options, Store};
use common::{bench_root, splitmix64};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::path::Path;
use std::time::{Duration, Instant};

const CHECKPOINTS: u64 = 1000;
const TENSORS: u64 = 100;
const CHUNK: usize = 4096;

fn writer_options() -> Options {
    Options {
        chunk_size: CHUNK,
        ..Default::default()
    }
}

fn read_only_options() -> Options {
    Options {
        chunk_size: CHUNK,
        ..Options::read_only()
    }
}

/// Builds (or reuses) a store of `CHECKPOINTS` checkpoints of `TENSORS` f32 tensors of
/// `tensor_bytes` each; every tensor of every checkpoint has distinct bytes, so nothing dedups.
fn ensure_store(dir: &Path, tensor_bytes: usize) {
    if let Ok(s) = Store::open(dir, read_only_options()) {
        if s.list().len() as u64 == CHECKPOINTS {
            return;
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    eprintln!(
        "building {} ({CHECKPOINTS} checkpoints × {TENSORS} tensors × {tensor_bytes} B)...",
        dir.display()
    );
    let started = Instant::now();
    let mut store = Store::open(dir, writer_options()).expect("create store");
    let mut seed = tensor_bytes as u64;
    let mut buf = vec![0u8; tensor_bytes];
    for step in 0..CHECKPOINTS {
        let mut t = store.begin(step).expect("begin");
        t.set_metadata("lr", 0.1f64);
        for k in 0..TENSORS {
            for w in buf.chunks_mut(8) {
                let v = splitmix64(&mut seed).to_le_bytes();
                w.copy_from_slice(&v[..w.len()]);
            }
            let name = format!("model.layers.{k}.weight");
            t.put_tensor(&name, DType::F32, &[(tensor_bytes / 4) as u64], &buf)
                .expect("put_tensor");
        }
        t.commit().expect("commit");
    }
    eprintln!("built in {:.1?}", started.elapsed());
}

fn open(c: &mut Criterion) {
    let root = bench_root("bench-stores");
    let stores = [("16B", 16usize), ("4KiB", 4096usize)];
    for (label, size) in stores {
        let dir = root.join(format!("open-{CHECKPOINTS}x{TENSORS}-{label}"));
        ensure_store(&dir, size);
        let s = Store::open(&dir, read_only_options()).expect("open");
        let st = s.stats();
        let logical: u64 = s.list().iter().map(|c| c.bytes).sum();
        // A read-only store has no WAL writer; measure the log files on disk.
        let wal_bytes: u64 = std::fs::read_dir(&dir)
            .expect("list store dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "wal"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        eprintln!(
            "store {label}: {} checkpoints, {} segments, {} segment bytes, {wal_bytes} WAL \
             bytes, {logical} tensor bytes",
            st.checkpoints, st.segments, st.segment_bytes
        );
    }

    let mut group = c.benchmark_group("open_1000x100");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for (mode, opts) in [
        ("read_only", read_only_options as fn() -> Options),
        ("writer", writer_options),
    ] {
        for (label, _) in stores {
            let dir = root.join(format!("open-{CHECKPOINTS}x{TENSORS}-{label}"));
            group.bench_with_input(BenchmarkId::new(mode, label), &dir, |b, dir| {
                // Time the open only; the drop (which releases the writer lock) is untimed.
                b.iter_custom(|iters| {
                    let mut timed = Duration::ZERO;
                    for _ in 0..iters {
                        let start = Instant::now();
                        let s = Store::open(dir, opts()).expect("open");
                        timed += start.elapsed();
                        assert_eq!(s.list().len() as u64, CHECKPOINTS);
                        drop(s);
                    }
                    timed
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, open);
criterion_main!(benches);
