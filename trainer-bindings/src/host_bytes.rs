//! Host memory crossing the Python boundary without a copy, both ways. The one module of the
//! bindings with `unsafe` (docs/DECISIONS.md, "unsafe in the Python bindings"): a raw
//! pointer from `torch.Tensor.data_ptr()` or a buffer export is turned into a slice on the way
//! in, and a segment's read-only map is exported as a buffer on the way out.

use ckptstore_engine::TensorView;
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyBufferError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use std::ffi::{c_int, c_void};

/// Bytes the caller lends for the duration of a save: either a buffer export (numpy arrays,
/// `bytes`, anything with the buffer protocol) or `(tensor, address, nbytes)` for memory the
/// buffer protocol cannot describe (torch tensors of any dtype, bfloat16 and float8 included:
/// `tensor.data_ptr()` and `tensor.nbytes`). Either way the owner is referenced here, so the
/// memory stays allocated while the slice is alive. The caller promises not to change it until
/// the save returns (sync) or until `save_async` returns (the snapshot is taken by then).
///
/// A raw source is not taken on trust: its owner must be a torch tensor, and the range must
/// lie inside that tensor's storage (`untyped_storage()`), whose Python object is held too, so
/// `tensor.set_()` or dropping the tensor from another thread while the GIL is released cannot
/// free the memory being read. A `resize_()` can still reallocate the storage in place (torch
/// offers no way to forbid it): [`HostBytes::check_unchanged`], called once the read is over,
/// reports it, and the save is undone.
pub enum HostBytes {
    Buffer(PyBuffer<u8>),
    Raw {
        _owner: Py<PyAny>,
        /// The tensor's `untyped_storage()`, and its `(data_ptr, nbytes)` when lent.
        storage: Py<PyAny>,
        extent: (usize, usize),
        addr: usize,
        len: usize,
    },
}

/// `(data_ptr(), nbytes())` of a torch storage.
fn storage_extent(storage: &Bound<'_, PyAny>) -> PyResult<(usize, usize)> {
    Ok((
        storage.call_method0("data_ptr")?.extract()?,
        storage.call_method0("nbytes")?.extract()?,
    ))
}

impl HostBytes {
    /// Accepts a C-contiguous byte buffer, or a tuple `(owner, address, nbytes)`.
    pub fn from_py(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        if let Ok(t) = obj.downcast::<PyTuple>() {
            let (owner, addr, len): (Py<PyAny>, usize, usize) = t.extract().map_err(|_| {
                PyTypeError::new_err(format!(
                    "tensor {name:?}: a raw source is (owner, address, nbytes)"
                ))
            })?;
            if addr == 0 && len != 0 {
                return Err(PyValueError::new_err(format!(
                    "tensor {name:?}: null address for {len} bytes"
                )));
            }
            let storage = owner
                .bind(obj.py())
                .call_method0("untyped_storage")
                .map_err(|_| {
                    PyTypeError::new_err(format!(
                        "tensor {name:?}: the owner of a raw source must be a torch tensor \
                         (its untyped_storage() bounds the address range)"
                    ))
                })?;
            let extent = storage_extent(&storage)?;
            let (base, size) = extent;
            let inside = addr >= base
                && addr
                    .checked_add(len)
                    .is_some_and(|end| end <= base.saturating_add(size));
            if len != 0 && !inside {
                return Err(PyValueError::new_err(format!(
                    "tensor {name:?}: {len} bytes at {addr:#x} are not inside the tensor's \
                     storage ({size} bytes at {base:#x})"
                )));
            }
            return Ok(HostBytes::Raw {
                _owner: owner,
                storage: storage.unbind(),
                extent,
                addr,
                len,
            });
        }
        let buf = PyBuffer::<u8>::get(obj).map_err(|e| {
            PyTypeError::new_err(format!(
                "tensor {name:?}: not a byte buffer (give a uint8 view of the array): {e}"
            ))
        })?;
        if !buf.is_c_contiguous() {
            return Err(PyValueError::new_err(format!(
                "tensor {name:?}: buffer is not C-contiguous; make it contiguous first"
            )));
        }
        Ok(HostBytes::Buffer(buf))
    }

    /// `Err(why)` if a raw source's storage was reallocated or resized since it was lent (a
    /// `resize_()` from another thread while the GIL was released): the bytes read may be
    /// from freed memory, and the save must not stand.
    pub fn check_unchanged(&self, py: Python<'_>) -> Result<(), String> {
        let HostBytes::Raw {
            storage, extent, ..
        } = self
        else {
            return Ok(());
        };
        match storage_extent(storage.bind(py)) {
            Ok(now) if now == *extent => Ok(()),
            Ok((base, size)) => Err(format!(
                "its storage changed while it was being saved ({} bytes at {:#x}, now {size} \
                 bytes at {base:#x}): a resize_() from another thread; do not resize a tensor \
                 while it is being saved",
                extent.1, extent.0
            )),
            Err(e) => Err(format!("its storage cannot be checked: {e}")),
        }
    }

    /// The lent bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            HostBytes::Buffer(b) => {
                let len = b.len_bytes();
                if len == 0 {
                    return &[];
                }
                #[allow(unsafe_code)]
                // SAFETY: the buffer export (held in `b`) keeps the exporter's memory
                // allocated and unmoved until the PyBuffer is released (drop); it is
                // C-contiguous (checked in from_py) and `len_bytes` long. Concurrent writes
                // by the owner would be a broken caller promise (documented), not UB of ours
                // beyond reading changing bytes, which the hash then records as they were.
                unsafe {
                    std::slice::from_raw_parts(b.buf_ptr() as *const u8, len)
                }
            }
            HostBytes::Raw { addr, len, .. } => {
                if *len == 0 {
                    return &[];
                }
                #[allow(unsafe_code)]
                // SAFETY: `addr..addr+len` was checked (from_py) to lie inside the tensor's
                // storage, whose Python object `storage` keeps alive (a `set_()` or a dropped
                // tensor cannot free it). A concurrent `resize_()` could still reallocate it:
                // a broken caller promise, detected by `check_unchanged` after the read,
                // which undoes the save.
                unsafe {
                    std::slice::from_raw_parts(*addr as *const u8, *len)
                }
            }
        }
    }
}

/// Memory a load writes into: `(owner, address, nbytes)` of a contiguous CPU tensor the Python
/// wrapper has just allocated for this load (`torch.empty`) and not handed to anyone yet. The
/// owner is referenced here, so the memory stays allocated while this value lives; the wrapper
/// promises nothing else reads or writes it until the load returns.
pub struct LoadTarget {
    _owner: Py<PyAny>,
    addr: usize,
    len: usize,
}

impl LoadTarget {
    /// Accepts a tuple `(owner, address, nbytes)`.
    pub fn from_py(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        let (owner, addr, len): (Py<PyAny>, usize, usize) = obj.extract().map_err(|_| {
            PyTypeError::new_err(format!(
                "tensor {name:?}: a load target is (owner, address, nbytes)"
            ))
        })?;
        if addr == 0 && len != 0 {
            return Err(PyValueError::new_err(format!(
                "tensor {name:?}: null address for {len} bytes"
            )));
        }
        Ok(LoadTarget {
            _owner: owner,
            addr,
            len,
        })
    }

    /// `Err(why)` if two of `targets` share a byte: each becomes a `&mut` slice, and two
    /// aliasing ones would be undefined behaviour, so overlapping targets are refused before
    /// any is written.
    pub fn check_disjoint(targets: &[(String, LoadTarget)]) -> Result<(), String> {
        let mut spans: Vec<(usize, usize, &str)> = targets
            .iter()
            .filter(|(_, t)| t.len != 0)
            .map(|(n, t)| (t.addr, t.addr.saturating_add(t.len), n.as_str()))
            .collect();
        spans.sort_unstable();
        match spans.windows(2).find(|w| w[1].0 < w[0].1) {
            Some(w) => Err(format!(
                "load targets of tensors {:?} and {:?} overlap",
                w[0].2, w[1].2
            )),
            None => Ok(()),
        }
    }

    /// The destination bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        #[allow(unsafe_code)]
        // SAFETY: `_owner` references the fresh contiguous CPU tensor whose `data_ptr()` and
        // `nbytes` the wrapper passed, so `len` bytes at `addr` stay allocated while `self`
        // lives; the wrapper has not shared the tensor yet, and `&mut self` makes this the only
        // slice of it.
        unsafe {
            std::slice::from_raw_parts_mut(self.addr as *mut u8, self.len)
        }
    }
}

/// A loaded tensor's bytes, exported to Python through the buffer protocol, read-only. When
/// the engine could serve the tensor from a segment's memory map (`zero_copy`), the buffer
/// *is* the map: numpy arrays built on it (`numpy.frombuffer`) copy nothing, and writing to
/// them raises. Otherwise it is the engine's one owned copy.
#[pyclass(module = "ckptstore._native", frozen)]
pub struct MappedBytes {
    view: TensorView,
}

impl MappedBytes {
    pub fn new(view: TensorView) -> Self {
        MappedBytes { view }
    }
}

#[pymethods]
impl MappedBytes {
    /// Whether no copy was made: the bytes are the segment's map itself, or (cold chunks)
    /// the memory the disk read them into directly.
    #[getter]
    fn zero_copy(&self) -> bool {
        self.view.is_zero_copy()
    }

    /// Engine dtype name (`f32`, `bf16`, ...).
    #[getter]
    fn dtype(&self) -> &'static str {
        self.view.dtype().name()
    }

    #[getter]
    fn shape(&self) -> Vec<u64> {
        self.view.shape().to_vec()
    }

    fn __len__(&self) -> usize {
        self.view.data().len()
    }

    #[allow(unsafe_code)]
    // SAFETY (of the whole method): `view` points at a valid Py_buffer (checked non-null)
    // that CPython hands us to fill. The exported memory is the TensorView's bytes, which stay
    // valid and unmoved while this object lives (the view owns an Arc of the map or a Vec that
    // is never touched again; the class is frozen), and `view.obj` takes a strong reference
    // to this object that CPython releases with the buffer. Writable requests are refused.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("null Py_buffer"));
        }
        if flags & ffi::PyBUF_WRITABLE == ffi::PyBUF_WRITABLE {
            return Err(PyBufferError::new_err(
                "checkpoint bytes are read-only (copy them to modify)",
            ));
        }
        let data = slf.get().view.data();
        let obj = slf.clone().into_any().into_ptr();
        // SAFETY: see the method comment.
        unsafe {
            fill_bytes_buffer(
                view,
                obj,
                data.as_ptr() as *mut c_void,
                data.len(),
                true,
                flags,
            )
        };
        Ok(())
    }

    #[allow(unsafe_code)]
    // SAFETY: nothing was allocated per export; CPython drops `view.obj` itself.
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

/// A loaded tensor's bytes in memory of their own, exported to Python through the buffer
/// protocol, **writable**: what a torch load hands to `torch.frombuffer` as the new tensor's
/// storage, kept alive by the tensor (the buffer export references this object). Either the
/// memory a direct read filled in place (`zero_copy`: the disk's DMA and BLAKE3 were the only
/// things to touch it) or the engine's one owned copy; never a segment's map.
#[pyclass(module = "ckptstore._native", frozen)]
pub struct OwnedBytes {
    /// Holds the memory; never read through again on the Rust side (Python writes to it).
    _view: TensorView,
    zero_copy: bool,
    addr: usize,
    len: usize,
}

impl OwnedBytes {
    /// `None` where the view does not hold its bytes alone (a map, or shared memory).
    pub fn new(mut view: TensorView) -> Option<Self> {
        let zero_copy = view.is_zero_copy();
        let bytes = view.bytes_mut()?;
        let (addr, len) = (bytes.as_mut_ptr() as usize, bytes.len());
        Some(OwnedBytes {
            _view: view,
            zero_copy,
            addr,
            len,
        })
    }
}

#[pymethods]
impl OwnedBytes {
    /// Whether the disk read the bytes into this memory directly (no CPU copy).
    #[getter]
    fn zero_copy(&self) -> bool {
        self.zero_copy
    }

    fn __len__(&self) -> usize {
        self.len
    }

    #[allow(unsafe_code)]
    // SAFETY (of the whole method): `view` points at a valid Py_buffer (checked non-null)
    // that CPython hands us to fill. The exported memory is `len` bytes at `addr`, taken from
    // `TensorView::bytes_mut` — memory that view alone holds (owned, or a direct-read buffer
    // no clone shares) and that stays allocated and unmoved while this object lives (the class
    // is frozen, the view is never touched again on the Rust side, so no Rust reference to it
    // exists while Python writes). `view.obj` takes a strong reference to this object that
    // CPython releases with the buffer. Writable exports are allowed: the memory is this
    // load's own, shared with no file and no other tensor.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("null Py_buffer"));
        }
        let this = slf.get();
        // A zero-length export still needs a valid, non-null pointer.
        let buf = if this.len == 0 {
            std::ptr::NonNull::<u8>::dangling().as_ptr() as usize
        } else {
            this.addr
        };
        let obj = slf.clone().into_any().into_ptr();
        // SAFETY: see the method comment.
        unsafe { fill_bytes_buffer(view, obj, buf as *mut c_void, this.len, false, flags) };
        Ok(())
    }

    #[allow(unsafe_code)]
    // SAFETY: nothing was allocated per export; CPython drops `view.obj` itself.
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

/// Fills a one-dimensional, unsigned-byte `Py_buffer` export of `len` bytes at `buf`, owned by
/// `obj` (a new strong reference, which CPython releases with the buffer); `format`, `shape`
/// and `strides` only where `flags` asks for them. One implementation for the read-only
/// checkpoint bytes and the writable loaded tensors.
///
/// # Safety
/// `view` is a valid, non-null `Py_buffer` CPython handed to `__getbuffer__`; `buf..buf+len`
/// stays valid and unmoved while `obj` lives (and is writable where `readonly` is false).
#[allow(unsafe_code)]
unsafe fn fill_bytes_buffer(
    view: *mut ffi::Py_buffer,
    obj: *mut ffi::PyObject,
    buf: *mut c_void,
    len: usize,
    readonly: bool,
    flags: c_int,
) {
    // SAFETY: the caller's contract above; every field written is part of Py_buffer, and the
    // shape and strides point into the same Py_buffer, which CPython keeps for the export.
    unsafe {
        (*view).obj = obj;
        (*view).buf = buf;
        (*view).len = len as ffi::Py_ssize_t;
        (*view).readonly = c_int::from(readonly);
        (*view).itemsize = 1;
        (*view).format = if flags & ffi::PyBUF_FORMAT == ffi::PyBUF_FORMAT {
            c"B".as_ptr() as *mut _
        } else {
            std::ptr::null_mut()
        };
        (*view).ndim = 1;
        (*view).shape = if flags & ffi::PyBUF_ND == ffi::PyBUF_ND {
            &mut (*view).len
        } else {
            std::ptr::null_mut()
        };
        (*view).strides = if flags & ffi::PyBUF_STRIDES == ffi::PyBUF_STRIDES {
            &mut (*view).itemsize
        } else {
            std::ptr::null_mut()
        };
        (*view).suboffsets = std::ptr::null_mut();
        (*view).internal = std::ptr::null_mut();
    }
}
