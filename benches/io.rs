//! The I/O backends side by side, 1 GiB each, same run, same file system: the figures the
//! choice of the default backend rests on (docs/DECISIONS.md).
//!
//! * `std_write_fdatasync`: `StdIo`, one new file, 16 MiB `write_at`s, one fdatasync
//!   (what `StdIo` does under the store).
//! * `uring_direct_qd16_fallocated`: `UringIo` (O_DIRECT, 1 MiB pieces, queue depth 16) into
//!   a file fallocated beforehand (untimed), from 4096-aligned memory; then fdatasync.
//! * `uring_direct_qd16_growing`: the same into a new file, which `UringIo` preallocates
//!   itself 256 MiB ahead of its 16 MiB writes (timed), as it does for segments.
//! * `uring_direct_qd16_growing_no_prealloc`: the same with preallocation off (every write
//!   extends the file).
//! * `uring_buffered_qd16_fallocated`: `UringIo` with O_DIRECT off, into a fallocated file.
//! * `store_save_std` / `store_save_uring`: a durable store save (begin, 4 × 256 MiB tensors,
//!   commit) through each backend, from ordinary (malloc'ed, unaligned) memory.
//!
//! Every iteration writes new bytes (nothing dedups, nothing is rewritten in place); files and
//! older checkpoints are removed after each iteration and the directory fsynced, untimed.
//! Files live under `target/bench-tmp/` unless `CKPTSTORE_BENCH_DIR` says otherwise.
//!
//! Run: `cargo bench --bench io` (Linux; elsewhere it does nothing).

mod common;

#[cfg(target_os = "linux")]
mod linux {
    use super::common::{bench_root, splitmix64};
    use ckptstore::io::{StdIo, Storage, UringConfig, UringIo};
    use ckptstore::{DType, Options, Store};
    use criterion::{Criterion, SamplingMode, Throughput};
    use std::fs::File;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    const MIB: usize = 1 << 20;
    const TOTAL: usize = 1 << 30;

    /// 1 GiB of random bytes at a 4096-aligned address.
    struct Aligned {
        v: Vec<u8>,
        at: usize,
    }

    impl Aligned {
        fn new() -> Aligned {
            let mut v = vec![0u8; TOTAL + 4096];
            let at = v.as_ptr().align_offset(4096);
            let mut seed = 0x10_u64;
            for w in v[at..at + TOTAL].chunks_exact_mut(8) {
                w.copy_from_slice(&splitmix64(&mut seed).to_le_bytes());
            }
            Aligned { v, at }
        }
        fn bytes(&mut self, iteration: u64) -> &[u8] {
            let b = &mut self.v[self.at..self.at + TOTAL];
            for region in b.chunks_mut(4 * MIB) {
                region[0] ^= iteration as u8 | 1;
            }
            &self.v[self.at..self.at + TOTAL]
        }
    }

    fn settle(dir: &Path) {
        for d in [dir.to_path_buf(), dir.join("segments")] {
            if d.exists() {
                File::open(&d)
                    .and_then(|f| f.sync_all())
                    .expect("fsync dir");
            }
        }
    }

    /// One file written through `io` (timed from create to fdatasync), then removed.
    fn raw(io: &dyn Storage, path: &Path, buf: &[u8], fallocate: bool, step: usize) -> Duration {
        let _ = std::fs::remove_file(path);
        let mut timed = Duration::ZERO;
        let mut start = Instant::now();
        let f = io.create_new(path).expect("create");
        if fallocate {
            f.allocate(buf.len() as u64).expect("fallocate");
            settle(path.parent().unwrap());
            start = Instant::now();
        }
        for (i, piece) in buf.chunks(step).enumerate() {
            f.write_at(piece, (i * step) as u64).expect("write");
        }
        f.sync_data().expect("fdatasync");
        timed += start.elapsed();
        drop(f);
        std::fs::remove_file(path).expect("remove");
        settle(path.parent().unwrap());
        timed
    }

    struct Tensors(Vec<Vec<u8>>);

    impl Tensors {
        fn new() -> Tensors {
            let mut seed = 0x5EED_u64;
            Tensors(
                (0..4)
                    .map(|_| {
                        let mut b = vec![0u8; 256 * MIB];
                        for w in b.chunks_exact_mut(8) {
                            w.copy_from_slice(&splitmix64(&mut seed).to_le_bytes());
                        }
                        b
                    })
                    .collect(),
            )
        }
    }

    fn store_save(store: &mut Store, t: &mut Tensors, iteration: u64) -> Duration {
        for b in &mut t.0 {
            for region in b.chunks_mut(4 * MIB) {
                let v = u64::from_le_bytes(region[..8].try_into().unwrap()) ^ iteration;
                region[..8].copy_from_slice(&v.to_le_bytes());
            }
        }
        let start = Instant::now();
        let mut tx = store.begin(iteration).expect("begin");
        for (i, b) in t.0.iter().enumerate() {
            tx.put_tensor(&format!("t{i}"), DType::F32, &[(b.len() / 4) as u64], b)
                .expect("put");
        }
        let info = tx.commit().expect("commit");
        let timed = start.elapsed();
        assert_eq!(info.bytes_written, TOTAL as u64, "nothing may dedup");
        for old in store.list() {
            if old.id != info.checkpoint.id {
                store.delete(old.id).expect("delete");
            }
        }
        settle(store.dir());
        timed
    }

    pub fn io(c: &mut Criterion) {
        let root = bench_root("bench-tmp");
        let uring = UringIo::new().expect("io_uring unavailable: nothing to compare");
        let buffered = UringIo::with_config(UringConfig {
            direct: false,
            ..Default::default()
        })
        .expect("io_uring");
        let mut group = c.benchmark_group("io_1GiB");
        group
            .sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(12))
            .throughput(Throughput::Bytes(TOTAL as u64));
        let mut buf = Aligned::new();
        let mut iteration = 0u64;
        let path = root.join("io-raw.bin");
        let no_prealloc = UringIo::with_config(UringConfig {
            prealloc_bytes: 0,
            ..Default::default()
        })
        .expect("io_uring");
        let raws: [(&str, &dyn Storage, bool); 5] = [
            ("std_write_fdatasync", &StdIo, false),
            ("uring_direct_qd16_fallocated", &uring, true),
            ("uring_direct_qd16_growing", &uring, false),
            ("uring_direct_qd16_growing_no_prealloc", &no_prealloc, false),
            ("uring_buffered_qd16_fallocated", &buffered, true),
        ];
        for (name, io, fallocate) in raws {
            group.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| {
                            iteration += 1;
                            raw(io, &path, buf.bytes(iteration), fallocate, 16 * MIB)
                        })
                        .sum()
                })
            });
        }
        drop(buf);
        assert_eq!(
            uring.stats().direct_refused_files,
            0,
            "O_DIRECT refused here"
        );

        let mut tensors = Tensors::new();
        let backends: [(&str, Arc<dyn Storage>); 2] = [
            ("store_save_std", Arc::new(StdIo)),
            ("store_save_uring", Arc::new(uring.clone())),
        ];
        for (name, io) in backends {
            let dir = root.join(format!("io-{name}"));
            let _ = std::fs::remove_dir_all(&dir);
            let mut store = Store::open(
                &dir,
                Options {
                    io,
                    ..Default::default()
                },
            )
            .expect("open store");
            group.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| {
                            iteration += 1;
                            store_save(&mut store, &mut tensors, iteration)
                        })
                        .sum()
                })
            });
            drop(store);
            let _ = std::fs::remove_dir_all(&dir);
        }
        group.finish();
    }
}

#[cfg(target_os = "linux")]
criterion::criterion_group!(benches, linux::io);
#[cfg(target_os = "linux")]
criterion::criterion_main!(benches);

#[cfg(not(target_os = "linux"))]
fn main() {}
