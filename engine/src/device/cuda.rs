//! GPU tensors as pipeline sources (cargo feature `cuda`): device memory is copied into the
//! staging pool with `cuMemcpyDtoHAsync` on a dedicated stream, one event per chunk; the hash
//! stage waits on a chunk's event before reading it.
//!
//! CUDA is loaded at run time (cudarc's dynamic loading), so a build with this feature runs on
//! a machine with no driver: [`CudaStager::new`] then returns [`Error::Device`] saying so,
//! instead of the panic cudarc gives when its library is missing.
//!
//! The pool's buffers are registered as pinned memory (`cuMemHostRegister`), so the copies
//! are real DMA that overlaps the hashing and writing of earlier chunks.
//!
//! This module calls the CUDA driver through FFI; each `unsafe` block says why it is sound.
#![allow(unsafe_code)]

use super::{Fence, Source};
use crate::error::{Error, Result};
use crate::staging::{StagingBuf, StagingPool};
use cudarc::driver::{result, sys, CudaContext, CudaEvent, CudaStream, DriverError};
use std::sync::Arc;

/// The cudarc crate this module is built on (for callers that allocate device memory).
pub use cudarc;

fn cuda_err(what: &str) -> impl Fn(DriverError) -> Error + '_ {
    move |e| Error::Device(format!("{what}: {e:?}"))
}

/// Whether a CUDA driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library by its known names; touches no CUDA
    // state.
    unsafe { sys::is_culib_present() }
}

/// A CUDA context and copy stream bound to a staging pool whose buffers it registered as
/// pinned memory. Unregisters them when dropped.
pub struct CudaStager {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    pool: StagingPool,
    registered: Vec<usize>,
}

impl std::fmt::Debug for CudaStager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaStager")
            .field("device", &self.ctx.ordinal())
            .field("registered_buffers", &self.registered.len())
            .finish()
    }
}

impl CudaStager {
    /// Opens device `ordinal`, makes a dedicated non-blocking copy stream, and page-locks the
    /// pool's buffers for DMA. The pool must have no buffer in use.
    pub fn new(ordinal: usize, pool: &StagingPool) -> Result<CudaStager> {
        if !driver_present() {
            return Err(Error::Device(
                "no CUDA driver on this machine (libcuda.so could not be loaded); GPU sources \
                 need an NVIDIA driver — stage tensors from host memory instead"
                    .into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(cuda_err("open device"))?;
        let stream = ctx.new_stream().map_err(cuda_err("create stream"))?;
        let mut registered = Vec::new();
        let reg = pool.for_each_buffer(|buf| {
            // SAFETY: `buf` is a live, page-aligned anonymous mapping owned by the pool; the
            // registration is removed in `Drop` while `self.pool` (a clone of the pool's Arc)
            // still keeps the mapping alive, so CUDA never holds a registration of freed
            // memory.
            let r = unsafe {
                sys::cuMemHostRegister_v2(
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    sys::CU_MEMHOSTREGISTER_PORTABLE,
                )
            };
            r.result().map_err(cuda_err("register staging buffer"))?;
            registered.push(buf.as_mut_ptr() as usize);
            Ok(())
        });
        let stager = CudaStager {
            ctx,
            stream,
            pool: pool.clone(),
            registered,
        };
        reg?;
        Ok(stager)
    }

    /// The device ordinal.
    pub fn device(&self) -> usize {
        self.ctx.ordinal()
    }

    /// A source for `len` bytes of device memory at `ptr` (a `CUdeviceptr`, e.g. torch's
    /// `tensor.data_ptr()`). If `after` is a raw `CUstream` (torch's
    /// `torch.cuda.current_stream().cuda_stream`), the copies start only after the work queued
    /// on it so far, so the snapshot sees the tensor as that stream leaves it.
    ///
    /// The pointer is checked with CUDA first: it must belong to this stager's device and
    /// `[ptr, ptr + len)` must lie inside one live allocation.
    pub fn source(&self, ptr: u64, len: u64, after: Option<u64>) -> Result<CudaSource<'_>> {
        self.ctx
            .bind_to_thread()
            .map_err(cuda_err("bind context"))?;
        if len > 0 {
            let ordinal = pointer_attr(
                ptr,
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            )
            .map_err(|e| {
                Error::Device(format!(
                    "device pointer {ptr:#x} is not a live CUDA allocation ({e:?})"
                ))
            })?;
            if ordinal as usize != self.ctx.ordinal() {
                return Err(Error::Device(format!(
                    "device pointer {ptr:#x} is on device {ordinal}, this stager copies from device {}",
                    self.ctx.ordinal()
                )));
            }
            let start = pointer_attr(
                ptr,
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
            )
            .map_err(cuda_err("query allocation start"))?;
            let size = pointer_attr(
                ptr,
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_SIZE,
            )
            .map_err(cuda_err("query allocation size"))?;
            if ptr.checked_add(len).is_none_or(|end| end > start + size) {
                return Err(Error::Device(format!(
                    "{len} bytes at {ptr:#x} run past the end of their allocation \
                     ({size} bytes at {start:#x})"
                )));
            }
        }
        if let Some(raw) = after {
            let ev = self
                .ctx
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
                .map_err(cuda_err("create event"))?;
            // SAFETY: `raw` is a stream handle the caller vouches for (documented above); the
            // event is live (owned by `ev`) and of this context.
            unsafe { result::event::record(ev.cu_event(), raw as sys::CUstream) }
                .map_err(cuda_err("record event on the caller's stream"))?;
            self.stream
                .wait(&ev)
                .map_err(cuda_err("order copy stream"))?;
        }
        Ok(CudaSource {
            stager: self,
            ptr,
            len,
        })
    }
}

impl CudaStager {
    /// The baseline the staging path is measured against: one plain `cuMemcpyDtoHAsync` per
    /// range into a single freshly registered (pinned, pre-faulted) host buffer, on this
    /// stager's stream, then one synchronize. Returns the time of the copies alone (not the
    /// allocation). For `scripts/gpu-check.sh` and benchmarks.
    pub fn baseline_copy(&self, ranges: &[(u64, u64)]) -> Result<std::time::Duration> {
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        let mut host = memmap2::MmapOptions::new()
            .len(total.max(1) as usize)
            .populate()
            .map_anon()
            .map_err(|e| Error::Device(format!("allocate {total} host bytes: {e}")))?;
        self.ctx
            .bind_to_thread()
            .map_err(cuda_err("bind context"))?;
        // SAFETY: `host` is a live anonymous mapping, unregistered below before it is dropped.
        unsafe {
            sys::cuMemHostRegister_v2(
                host.as_mut_ptr().cast(),
                host.len(),
                sys::CU_MEMHOSTREGISTER_PORTABLE,
            )
        }
        .result()
        .map_err(cuda_err("register host buffer"))?;
        let t = std::time::Instant::now();
        let mut out = Ok(());
        let mut at = 0usize;
        for &(ptr, len) in ranges {
            let dst = &mut host[at..at + len as usize];
            // SAFETY: `dst` is inside the registered mapping, which outlives the synchronize
            // below; the caller's ranges are live device allocations (checked by `source`).
            let r = unsafe { result::memcpy_dtoh_async(dst, ptr, self.stream.cu_stream()) };
            if let Err(e) = r {
                out = Err(cuda_err("cuMemcpyDtoHAsync")(e));
                break;
            }
            at += len as usize;
        }
        let synced = self.stream.synchronize();
        let elapsed = t.elapsed();
        // SAFETY: registered above; the stream is synchronized, so no copy into it is pending.
        let _ = unsafe { sys::cuMemHostUnregister(host.as_mut_ptr().cast()) };
        out?;
        synced.map_err(cuda_err("synchronize"))?;
        Ok(elapsed)
    }
}

impl Drop for CudaStager {
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
        let _ = self.pool.for_each_buffer(|buf| {
            if self.registered.contains(&(buf.as_mut_ptr() as usize)) {
                // SAFETY: this address was registered by `new`, and the copy stream is
                // synchronized, so no DMA into it is pending.
                let _ = unsafe { sys::cuMemHostUnregister(buf.as_mut_ptr().cast()) };
            }
            Ok(())
        });
    }
}

fn pointer_attr(ptr: u64, attr: sys::CUpointer_attribute) -> std::result::Result<u64, DriverError> {
    let mut out: u64 = 0;
    // SAFETY: every attribute queried here (device ordinal: int; range start: CUdeviceptr;
    // range size: size_t) fits in the 8 zeroed bytes `out` provides; CUDA writes nothing else.
    unsafe { sys::cuPointerGetAttribute((&mut out as *mut u64).cast(), attr, ptr) }.result()?;
    Ok(
        if attr == sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL {
            out & 0xffff_ffff
        } else {
            out
        },
    )
}

/// Device memory staged through a [`CudaStager`].
#[derive(Debug)]
pub struct CudaSource<'a> {
    stager: &'a CudaStager,
    ptr: u64,
    len: u64,
}

impl Source for CudaSource<'_> {
    fn len(&self) -> u64 {
        self.len
    }

    fn stage(&self, offset: u64, len: usize, buf: &mut StagingBuf) -> Result<Fence> {
        let st = self.stager;
        st.ctx.bind_to_thread().map_err(cuda_err("bind context"))?;
        let dst = buf.fill(len);
        // SAFETY: `dst` lies in a pool buffer registered as pinned memory by this stager; the
        // pipeline keeps that buffer alive and unread until the fence below completes (the
        // hash worker waits on it, and a staged chunk dropped early waits in its `Drop`); the
        // source range was checked against its allocation in `CudaStager::source`.
        unsafe { result::memcpy_dtoh_async(dst, self.ptr + offset, st.stream.cu_stream()) }
            .map_err(cuda_err("cuMemcpyDtoHAsync"))?;
        let ev: CudaEvent = st
            .stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .map_err(cuda_err("record event"))?;
        Ok(Fence::Pending(Box::new(move || {
            ev.synchronize().map_err(cuda_err("device-to-host copy"))
        })))
    }

    fn finish_snapshot(&self) -> Result<()> {
        self.stager
            .stream
            .synchronize()
            .map_err(cuda_err("device-to-host copy"))
    }
}
