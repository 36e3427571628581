//! The async save's stall against its floor: a `memcpy` of the same bytes into memory that is
//! already faulted in (target: stall ≤ 1.1× that memcpy), and the async save's time to
//! durable against the synchronous save, same run.
//!
//! 192 MiB of tensors (48 chunks of 4 MiB) with a 256 MiB staging budget, so the stall is the
//! copy into staging buffers alone (a checkpoint bigger than the budget stalls for the disk:
//! see `ckptstore bench`). Every iteration changes one `u64` per chunk (untimed) so nothing
//! dedups; older checkpoints are deleted after each iteration (untimed).
//!
//! Run: `cargo bench --bench pipeline`

mod common;

use ckptstore::{DType, Options, Pipeline, PipelineOptions, Store};
use common::{bench_root, splitmix64};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use std::hint::black_box;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
const CHUNK: usize = 4 * MIB;
const TENSORS: usize = 6;
const TENSOR_MIB: usize = 32;

fn make_tensors() -> Vec<Vec<u8>> {
    let mut seed = 0xA5_u64;
    (0..TENSORS)
        .map(|_| {
            let mut b = vec![0u8; TENSOR_MIB * MIB];
            for w in b.chunks_exact_mut(8) {
                w.copy_from_slice(&splitmix64(&mut seed).to_le_bytes());
            }
            b
        })
        .collect()
}

fn perturb(tensors: &mut [Vec<u8>], iteration: u64) {
    for t in tensors {
        for region in t.chunks_mut(CHUNK) {
            let v = u64::from_le_bytes(region[..8].try_into().unwrap()) ^ (iteration + 1);
            region[..8].copy_from_slice(&v.to_le_bytes());
        }
    }
}

fn keep_latest(store: &mut Store) {
    let list = store.list();
    for c in &list[..list.len().saturating_sub(1)] {
        store.delete(c.id).expect("delete");
    }
}

fn bench(c: &mut Criterion) {
    let root = bench_root("bench-tmp").join("pipeline");
    let _ = std::fs::remove_dir_all(&root);
    let total = TENSORS * TENSOR_MIB * MIB;
    let mut tensors = make_tensors();
    let mut g = c.benchmark_group("async_save_192MiB");
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Bytes(total as u64));

    // Floor: memcpy into reused (faulted-in) memory, the same bytes.
    let mut dst: Vec<Vec<u8>> = tensors.to_vec();
    g.bench_function("memcpy_reused", |b| {
        b.iter(|| {
            for (d, s) in dst.iter_mut().zip(&tensors) {
                d.copy_from_slice(s);
            }
            black_box(&dst);
        })
    });

    let mut p = Pipeline::new(
        Store::open(root.join("async"), Options::default()).unwrap(),
        PipelineOptions::default(),
    )
    .unwrap();
    let mut iteration = 0u64;
    let mut durable = Vec::new();
    g.bench_function("stall", |b| {
        b.iter_custom(|iters| {
            let mut stalled = Duration::ZERO;
            for _ in 0..iters {
                iteration += 1;
                perturb(&mut tensors, iteration);
                let mut s = p.begin(iteration).unwrap();
                for (i, t) in tensors.iter().enumerate() {
                    s.put_tensor(&format!("t{i}"), DType::F32, &[(t.len() / 4) as u64], t)
                        .unwrap();
                }
                let h = s.submit().unwrap();
                stalled += h.stall();
                let r = h.wait().unwrap();
                assert_eq!(r.commit.bytes_written, total as u64, "nothing may dedup");
                durable.push(r.time_to_durable);
                keep_latest(&mut p.store());
            }
            stalled
        })
    });
    g.bench_function("async_time_to_durable", |b| {
        b.iter_custom(|iters| {
            let mut sum = Duration::ZERO;
            for _ in 0..iters {
                iteration += 1;
                perturb(&mut tensors, iteration);
                let t = Instant::now();
                let mut s = p.begin(iteration).unwrap();
                for (i, x) in tensors.iter().enumerate() {
                    s.put_tensor(&format!("t{i}"), DType::F32, &[(x.len() / 4) as u64], x)
                        .unwrap();
                }
                s.submit().unwrap().wait().unwrap();
                sum += t.elapsed();
                keep_latest(&mut p.store());
            }
            sum
        })
    });
    drop(p.close());

    let mut store = Store::open(root.join("sync"), Options::default()).unwrap();
    g.bench_function("sync_save_durable", |b| {
        b.iter_custom(|iters| {
            let mut sum = Duration::ZERO;
            for _ in 0..iters {
                iteration += 1;
                perturb(&mut tensors, iteration);
                let t = Instant::now();
                let mut txn = store.begin(iteration).unwrap();
                for (i, x) in tensors.iter().enumerate() {
                    txn.put_tensor(&format!("t{i}"), DType::F32, &[(x.len() / 4) as u64], x)
                        .unwrap();
                }
                txn.commit().unwrap();
                sum += t.elapsed();
                keep_latest(&mut store);
            }
            sum
        })
    });
    g.finish();
    drop(store);
    let _ = std::fs::remove_dir_all(&root);
}

criterion_group!(benches, bench);
criterion_main!(benches);
