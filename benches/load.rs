//! Load of a 1 GiB checkpoint (16 tensors × 64 MiB, 4 MiB chunks, nothing deduplicated) with
//! a cold page cache: `tensor()` (pread + BLAKE3), `tensor_view()` (mmap, zero-copy, BLAKE3
//! across threads) and, in the same run, a raw `std::fs::read` of the segment files holding
//! the same bytes, the machine's own limit. Also the warm time to first tensor: open the
//! store, open the checkpoint, view one 64 MiB tensor (verified and not).
//!
//! The cache is emptied before every iteration with POSIX_FADV_DONTNEED on the segment files
//! (`/proc/sys/vm/drop_caches` is not writable in every VM; the advice drops the clean pages
//! of these files, which is what matters). The store is reopened each iteration so no map of a
//! previous one keeps pages resident.
//!
//! The store is built once under `target/bench-stores/load` and reused. Run:
//! `cargo bench --bench load`

mod common;

use ckptstore::io::{StdIo, Storage};
use ckptstore::{DType, Options, Selector, Store};
use common::{bench_root, splitmix64};
use criterion::{criterion_group, criterion_main, Criterion};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const TENSORS: usize = 16;
const TENSOR_BYTES: usize = 64 << 20;

fn ensure_store(dir: &Path) {
    if let Ok(s) = Store::open(dir, Options::read_only()) {
        if s.list().len() == 1 {
            return;
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    let mut store = Store::open(dir, Options::default()).expect("create store");
    let mut t = store.begin(1).expect("begin");
    let mut seed = 42u64;
    let mut buf = vec![0u8; TENSOR_BYTES];
    for k in 0..TENSORS {
        for w in buf.chunks_mut(8) {
            w.copy_from_slice(&splitmix64(&mut seed).to_le_bytes());
        }
        t.put_tensor(
            &format!("t{k:02}"),
            DType::F32,
            &[(TENSOR_BYTES / 4) as u64],
            &buf,
        )
        .expect("put");
    }
    t.commit().expect("commit");
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("segments"))
        .expect("segments")
        .map(|e| e.expect("entry").path())
        .collect();
    v.sort();
    v
}

/// Drops the segment files' clean pages from the page cache.
fn evict(files: &[PathBuf]) {
    for p in files {
        let f = StdIo.open(p, false).expect("open segment");
        let len = f.len().expect("len");
        f.start_writeback(0, len).expect("fadvise DONTNEED");
    }
}

fn open(dir: &Path) -> Store {
    Store::open(dir, Options::read_only()).expect("open")
}

fn load(c: &mut Criterion) {
    let dir = bench_root("bench-stores").join("load");
    ensure_store(&dir);
    let files = segment_files(&dir);
    let names: Vec<String> = (0..TENSORS).map(|k| format!("t{k:02}")).collect();

    let mut g = c.benchmark_group("load_1GiB_cold");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(20));
    g.bench_function("raw_fs_read", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                evict(&files);
                let t0 = Instant::now();
                for p in &files {
                    std::hint::black_box(std::fs::read(p).expect("read"));
                }
                total += t0.elapsed();
            }
            total
        })
    });
    g.bench_function("tensor", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                evict(&files);
                let s = open(&dir);
                let ck = s.checkpoint(Selector::Latest).expect("checkpoint");
                let t0 = Instant::now();
                for n in &names {
                    std::hint::black_box(ck.tensor(n).expect("tensor"));
                }
                total += t0.elapsed();
            }
            total
        })
    });
    g.bench_function("tensor_view", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                evict(&files);
                let s = open(&dir);
                let ck = s.checkpoint(Selector::Latest).expect("checkpoint");
                let t0 = Instant::now();
                let views: Vec<_> = names
                    .iter()
                    .map(|n| ck.tensor_view(n).expect("view"))
                    .collect();
                total += t0.elapsed();
                // The tensor that straddles the 1 GiB segment boundary falls back to a copy.
                let zc = views.iter().filter(|v| v.is_zero_copy()).count();
                assert!(zc + 1 >= views.len(), "only {zc} zero-copy views");
            }
            total
        })
    });
    g.finish();

    let mut g = c.benchmark_group("first_tensor_warm");
    g.sample_size(20);
    for verify in [true, false] {
        let id = if verify {
            "open_view_verified"
        } else {
            "open_view_unverified"
        };
        g.bench_function(id, |b| {
            b.iter(|| {
                let s = open(&dir);
                let ck = s.checkpoint(Selector::Latest).expect("checkpoint");
                let v = ck.tensor_view_with(&names[0], verify).expect("view");
                std::hint::black_box(v.data()[0])
            })
        });
    }
    g.finish();
}

criterion_group!(benches, load);
criterion_main!(benches);
