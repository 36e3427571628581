//! GPU sources (cargo feature `cuda`): device tensors staged through the pipeline land
//! bit-exact; bad device pointers are CUDA errors and commit nothing; without a driver the
//! stager is a typed error, not a panic. Tests that need a GPU say so and return where none
//! is present (`scripts/gpu-check.sh` runs them on a GPU machine).
#![cfg(feature = "cuda")]

mod support;

use ckptstore::device::cuda::cudarc::driver::{CudaContext, DevicePtr};
use ckptstore::device::cuda::{driver_present, CudaStager};
use ckptstore::{DType, Error, Pipeline, PipelineOptions, Selector, Store};
use support::{data, opts, CHUNK};

fn pipeline(dir: &std::path::Path, buffers: usize) -> Pipeline {
    let opts = PipelineOptions {
        budget_bytes: buffers * CHUNK,
        hash_workers: 2,
    };
    Pipeline::new(Store::open(dir, support::opts()).unwrap(), opts).unwrap()
}

/// Whether a GPU is usable; prints why not. With `CKPT_REQUIRE_GPU=1` (set by
/// `scripts/gpu-check.sh`) a missing GPU fails the test instead of skipping it.
fn gpu() -> bool {
    let required = std::env::var_os("CKPT_REQUIRE_GPU").is_some_and(|v| v == "1");
    if !driver_present() {
        assert!(
            !required,
            "CKPT_REQUIRE_GPU=1 but no CUDA driver is present"
        );
        eprintln!("SKIP: no CUDA driver on this machine; run scripts/gpu-check.sh on a GPU host");
        return false;
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => true,
        other => {
            assert!(
                !required,
                "CKPT_REQUIRE_GPU=1 but no CUDA device: {other:?}"
            );
            eprintln!("SKIP: CUDA driver present but no device ({other:?})");
            false
        }
    }
}

#[test]
fn without_a_driver_the_stager_is_a_typed_error() {
    if driver_present() {
        eprintln!("SKIP: a CUDA driver is present; this test checks the no-driver path");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), 4);
    let e = CudaStager::new(0, p.pool()).unwrap_err();
    assert!(matches!(e, Error::Device(_)), "{e}");
    assert!(e.to_string().contains("no CUDA driver"), "{e}");
}

#[test]
fn device_tensors_round_trip_bit_exact() {
    if !gpu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A pool smaller than the tensor: staging waits for writes, buffers are reused while DMA
    // into other buffers is in flight.
    let mut p = pipeline(dir.path(), 3);
    let stager = CudaStager::new(0, p.pool()).unwrap();
    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.default_stream();
    let host = data(7, 9 * CHUNK + 77);
    let dev = stream.memcpy_stod(&host).unwrap();
    let (ptr, _sync) = dev.device_ptr(&stream);
    let src = stager
        .source(ptr, host.len() as u64, Some(stream.cu_stream() as u64))
        .unwrap();
    let mut s = p.begin(1).unwrap();
    s.put_tensor_from("w", DType::U8, &[host.len() as u64], &src)
        .unwrap();
    s.put_tensor("host", DType::U8, &[5], b"hello").unwrap();
    let r = s.submit().unwrap().wait().unwrap();
    assert_eq!(p.pool().in_use(), 0);
    let store = p.store();
    let ck = store
        .checkpoint(Selector::Id(r.commit.checkpoint.id))
        .unwrap();
    assert!(
        ck.tensor("w").unwrap().data == host,
        "device tensor differs"
    );
    assert_eq!(ck.tensor("host").unwrap().data, b"hello");
}

#[test]
fn a_freed_or_overrun_pointer_is_a_cuda_error_and_nothing_is_committed() {
    if !gpu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), 4);
    let stager = CudaStager::new(0, p.pool()).unwrap();
    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.default_stream();
    let dev = stream.memcpy_stod(&data(1, 3 * CHUNK)).unwrap();
    let ptr = {
        let (ptr, _sync) = dev.device_ptr(&stream);
        ptr
    };
    let e = stager.source(ptr, 3 * CHUNK as u64 + 1, None).unwrap_err();
    assert!(matches!(e, Error::Device(_)), "{e}");
    assert!(e.to_string().contains("past the end"), "{e}");
    drop(dev);
    stream.synchronize().unwrap();
    let e = stager.source(ptr, 16, None).unwrap_err();
    assert!(matches!(e, Error::Device(_)), "{e}");
    let e = stager.source(0x10, 16, None).unwrap_err();
    assert!(matches!(e, Error::Device(_)), "{e}");
    assert!(p.store().list().is_empty());
    let _ = opts();
}
