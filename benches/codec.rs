//! The chunk codec on one core: byte-shuffle + zstd level 1 encode and decode of one 4 MiB
//! chunk of realistic float data (f32 and bf16 weights drawn from N(0, 0.02)), next to BLAKE3
//! of the same chunk (what a save costs per chunk without compression). Throughput is of the
//! raw bytes. Read together with `benches/compress.rs`: a save can only gain from compression
//! when the cores that compress outrun the disk by more than the ratio.
//!
//! Run: `cargo bench --bench codec`

#[allow(dead_code, reason = "this bench needs only the data generator")]
mod common;

use ckptstore::codec::{self, Encoder};
use ckptstore::proto::v1 as pb;
use common::splitmix64;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;

const CHUNK: usize = 4 << 20;

fn normal(seed: &mut u64) -> f32 {
    let u = ((splitmix64(seed) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let v = (splitmix64(seed) >> 11) as f64 / (1u64 << 53) as f64;
    ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos() * 0.02) as f32
}

fn chunk(dtype: pb::Codec) -> Vec<u8> {
    let mut seed = 7;
    let mut b = Vec::with_capacity(CHUNK);
    while b.len() < CHUNK {
        let v = normal(&mut seed).to_le_bytes();
        match dtype {
            pb::Codec::ZstdShuffle2 => b.extend_from_slice(&v[2..]),
            _ => b.extend_from_slice(&v),
        }
    }
    b
}

fn codec_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec_4MiB_chunk");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Bytes(CHUNK as u64));
    let mut enc = Encoder::new(1).expect("zstd");
    for (label, codec) in [
        ("f32", pb::Codec::ZstdShuffle4),
        ("bf16", pb::Codec::ZstdShuffle2),
    ] {
        let raw = chunk(codec);
        let mut frame = Vec::new();
        assert_eq!(enc.encode(codec, &raw, &mut frame), codec, "compressible");
        eprintln!(
            "{label}: 4 MiB chunk -> {} bytes, stored/raw {:.3}",
            frame.len(),
            frame.len() as f64 / raw.len() as f64
        );
        g.bench_function(format!("{label}/blake3"), |b| {
            b.iter(|| blake3::hash(black_box(&raw)))
        });
        let mut shuffled = vec![0u8; raw.len()];
        let width = codec::shuffle_width(codec as i32).expect("a zstd codec");
        g.bench_function(format!("{label}/shuffle"), |b| {
            b.iter(|| codec::shuffle(black_box(&raw), width, &mut shuffled))
        });
        g.bench_function(format!("{label}/encode_zstd1"), |b| {
            b.iter(|| enc.encode(codec, black_box(&raw), &mut frame))
        });
        let mut out = vec![0u8; raw.len()];
        let mut scratch = Vec::new();
        g.bench_function(format!("{label}/decode"), |b| {
            b.iter(|| codec::decode(codec as i32, black_box(&frame), &mut out, &mut scratch))
        });
    }
    g.finish();
}

criterion_group!(benches, codec_bench);
criterion_main!(benches);
