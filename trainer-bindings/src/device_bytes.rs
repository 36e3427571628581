//! CUDA tensors crossing the boundary for saves: `("cuda", owner, device, address, nbytes,
//! stream)` from Python (torch's `data_ptr()` and `torch.cuda.current_stream().cuda_stream`)
//! becomes a device range that the engine's `CudaStager` copies into its pinned staging pool,
//! ordered after the caller's stream. Built with the cargo feature `cuda` (CUDA is loaded at
//! run time); without it, or without a driver, `cuda_staging()` says why and Python stages
//! CUDA tensors through host memory instead. No `unsafe` here: the pointer is handed to the
//! engine, which checks it with CUDA before any copy.

use crate::errors::Failure;
use pyo3::prelude::*;
use pyo3::types::{PyString, PyTuple};

/// A range of device memory lent for the duration of a save; the owner (the tensor) is held
/// so the allocation stays alive.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // (read by the stager only)
pub struct DeviceBytes {
    _owner: Py<PyAny>,
    pub device: usize,
    pub ptr: u64,
    pub len: u64,
    pub stream: Option<u64>,
}

impl DeviceBytes {
    /// `Some` for a `("cuda", owner, device, address, nbytes, stream)` tuple (stream 0 or None:
    /// no ordering), `None` for anything else.
    pub fn from_py(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<Option<Self>> {
        let Ok(t) = obj.downcast::<PyTuple>() else {
            return Ok(None);
        };
        if t.len() != 6
            || !t
                .get_item(0)?
                .downcast::<PyString>()
                .is_ok_and(|s| s == "cuda")
        {
            return Ok(None);
        }
        let (_, owner, device, ptr, len, stream): (
            String,
            Py<PyAny>,
            usize,
            u64,
            u64,
            Option<u64>,
        ) = t.extract().map_err(|_| {
            pyo3::exceptions::PyTypeError::new_err(format!(
                "tensor {name:?}: a CUDA source is (\"cuda\", owner, device, address, nbytes, \
                     stream)"
            ))
        })?;
        Ok(Some(DeviceBytes {
            _owner: owner,
            device,
            ptr,
            len,
            stream: stream.filter(|s| *s != 0),
        }))
    }
}

/// One `CudaStager` per device, bound to the write pipeline's staging pool (made on a device's
/// first tensor, while no save holds a buffer of the pool).
#[derive(Default)]
pub struct Stagers {
    #[cfg(feature = "cuda")]
    by_device: std::collections::HashMap<usize, ckptstore_engine::device::cuda::CudaStager>,
}

impl Stagers {
    /// Whether device `d` has its stager already.
    pub fn has(&self, _d: usize) -> bool {
        #[cfg(feature = "cuda")]
        return self.by_device.contains_key(&_d);
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// Makes the stager of device `d` on `pool` (which must have no buffer in use).
    pub fn add(
        &mut self,
        _d: usize,
        _pool: &ckptstore_engine::pipeline::StagingPool,
    ) -> Result<(), Failure> {
        #[cfg(feature = "cuda")]
        {
            if let std::collections::hash_map::Entry::Vacant(e) = self.by_device.entry(_d) {
                e.insert(ckptstore_engine::device::cuda::CudaStager::new(_d, _pool)?);
            }
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        Err(unavailable())
    }

    /// Stages `b` into the save `s` as tensor `name`.
    pub fn put(
        &self,
        s: &mut ckptstore_engine::pipeline::Save<'_>,
        name: &str,
        dtype: ckptstore_engine::DType,
        shape: &[u64],
        b: &DeviceBytes,
    ) -> Result<(), Failure> {
        #[cfg(feature = "cuda")]
        {
            let st = self.by_device.get(&b.device).ok_or_else(|| {
                Failure::store(format!(
                    "tensor {name:?}: no CUDA stager for device {}",
                    b.device
                ))
            })?;
            let src = st.source(b.ptr, b.len, b.stream)?;
            s.put_tensor_from(name, dtype, shape, &src)?;
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (s, name, dtype, shape, b);
            Err(unavailable())
        }
    }

    /// Drops every stager (unregistering the pool's buffers).
    pub fn clear(&mut self) {
        #[cfg(feature = "cuda")]
        self.by_device.clear();
    }
}

#[cfg(not(feature = "cuda"))]
fn unavailable() -> Failure {
    Failure::store(
        "this build of ckptstore has no CUDA support (cargo feature `cuda`); CUDA tensors are \
         staged through host memory",
    )
}

/// `(available, reason)`: whether CUDA tensors can be staged by the engine, and if not, why.
#[pyfunction]
pub fn cuda_staging() -> (bool, String) {
    #[cfg(feature = "cuda")]
    {
        if ckptstore_engine::device::cuda::driver_present() {
            (
                true,
                "the engine stages CUDA tensors through its pinned pool".into(),
            )
        } else {
            (false, "no CUDA driver could be loaded (libcuda.so)".into())
        }
    }
    #[cfg(not(feature = "cuda"))]
    (
        false,
        "this build has no CUDA support (cargo feature `cuda`)".into(),
    )
}
