//! GPU check (`scripts/gpu-check.sh`): saves random device tensors through the pipeline,
//! checks the checkpoint bit-exact against a host copy, and prints the device-to-host staging
//! bandwidth next to a plain pinned `cuMemcpyDtoH` of the same bytes, in the same run.
//!
//! ```sh
//! cargo run --release --features cuda --example gpu_check -- --size-gib 4 --dir /tmp/gpu-check
//! ```

use ckptstore::device::cuda::cudarc::driver::{CudaContext, DevicePtr};
use ckptstore::device::cuda::{driver_present, CudaStager};
use ckptstore::{DType, Options, Pipeline, PipelineOptions, Selector, Store};
use std::time::Instant;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn random(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let size_gib: f64 = arg("--size-gib").map_or(Ok(4.0), |s| s.parse())?;
    let n_tensors: usize = arg("--tensors").map_or(Ok(16), |s| s.parse())?;
    let dir = std::path::PathBuf::from(arg("--dir").unwrap_or("/tmp/ckpt-gpu-check".into()));
    if !driver_present() {
        return Err("no CUDA driver on this machine: the GPU check needs one".into());
    }
    let _ = std::fs::remove_dir_all(&dir);
    let total = (size_gib * (1u64 << 30) as f64) as u64;
    let per = (total / n_tensors as u64) & !3; // f32-sized
    let total = per * n_tensors as u64;
    let ctx = CudaContext::new(0)?;
    let stream = ctx.default_stream();
    println!(
        "gpu-check: {n_tensors} tensors × {:.1} MiB = {:.2} GiB, store in {}",
        per as f64 / (1 << 20) as f64,
        total as f64 / (1u64 << 30) as f64,
        dir.display()
    );
    let t = Instant::now();
    let host: Vec<Vec<u8>> = (0..n_tensors)
        .map(|i| random(i as u64 + 1, per as usize))
        .collect();
    let dev: Vec<_> = host
        .iter()
        .map(|h| stream.memcpy_stod(h))
        .collect::<Result<_, _>>()?;
    stream.synchronize()?;
    println!(
        "  made and uploaded the tensors in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let ptrs: Vec<(u64, u64)> = dev.iter().map(|d| (d.device_ptr(&stream).0, per)).collect();

    let mut rows = Vec::new();
    // Budget ≥ the checkpoint: the stall is the staging copy alone. Then the default budget
    // (256 MiB): the stall includes waiting for the disk to free buffers.
    let chunk = 4usize << 20;
    for (label, budget) in [
        ("budget ≥ checkpoint", total as usize + chunk),
        ("default 256 MiB budget", 256usize << 20),
    ] {
        let store_dir = dir.join(format!("store-{}", rows.len()));
        let store = Store::open(&store_dir, Options::default())?;
        let mut p = Pipeline::new(
            store,
            PipelineOptions {
                budget_bytes: budget,
                ..Default::default()
            },
        )?;
        let stager = CudaStager::new(0, p.pool())?;
        // Baseline, same run, same stream, same bytes.
        let base = stager.baseline_copy(&ptrs)?;
        let mut save = p.begin(1)?;
        for (i, &(ptr, len)) in ptrs.iter().enumerate() {
            let src = stager.source(ptr, len, Some(stream.cu_stream() as u64))?;
            save.put_tensor_from(&format!("layer{i}.weight"), DType::F32, &[len / 4], &src)?;
        }
        let h = save.submit()?;
        let r = h.wait()?;
        let t = Instant::now();
        {
            let store = p.store();
            let ck = store.checkpoint(Selector::Id(r.commit.checkpoint.id))?;
            for (i, h) in host.iter().enumerate() {
                let got = ck.tensor(&format!("layer{i}.weight"))?;
                if got.data != *h {
                    return Err(format!("tensor {i} differs from its host copy").into());
                }
            }
        }
        let verify = t.elapsed().as_secs_f64();
        println!(
            "  [{label}] pinned={} staged {:.2} GiB: stall {:.3} s ({:.2} GB/s D2H staging) vs plain pinned cuMemcpyDtoH {:.3} s ({:.2} GB/s) → ratio {:.2}; durable after {:.3} s ({:.2} GB/s); bit-exact check {:.2} s OK",
            p.pool().info().locked,
            total as f64 / (1u64 << 30) as f64,
            r.stall.as_secs_f64(),
            gbps(total, r.stall.as_secs_f64()),
            base.as_secs_f64(),
            gbps(total, base.as_secs_f64()),
            base.as_secs_f64() / r.stall.as_secs_f64(),
            r.time_to_durable.as_secs_f64(),
            gbps(total, r.time_to_durable.as_secs_f64()),
            verify
        );
        rows.push(format!(
            "{{\"label\":\"{label}\",\"bytes\":{total},\"stall_s\":{:.4},\"staging_gbps\":{:.3},\"baseline_pinned_gbps\":{:.3},\"durable_s\":{:.4},\"save_gbps\":{:.3}}}",
            r.stall.as_secs_f64(),
            gbps(total, r.stall.as_secs_f64()),
            gbps(total, base.as_secs_f64()),
            r.time_to_durable.as_secs_f64(),
            gbps(total, r.time_to_durable.as_secs_f64()),
        ));
        drop(stager);
        drop(p.close());
        let _ = std::fs::remove_dir_all(&store_dir);
    }
    println!("gpu-check: OK");
    println!("[{}]", rows.join(","));
    Ok(())
}
