//! `ckptstore._native.Store`: one engine `Store` behind a mutex (owned, after the first
//! `save_async`, by the engine's write pipeline), so calls from Python threads take turns.
//! Every call that does I/O releases the GIL.

use crate::device_bytes::{DeviceBytes, Stagers};
use crate::errors::{self, Failure};
use crate::host_bytes::{HostBytes, LoadTarget, MappedBytes, OwnedBytes};
use crate::save_job::{self, Committed, InFlight, SaveHandle, SaveRequest, TensorBytes, TensorIn};
use ckptstore_engine::crypt::Key;
use ckptstore_engine::remote::Replication;
use ckptstore_engine::{
    CheckpointInfo, DType, MetaValue, MetricMode, Options, Pipeline, PipelineOptions, RecoveryMode,
    RetentionPolicy, Selector, Store,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// The engine store, alone or (after the first `save_async`) owned by its write pipeline.
enum Inner {
    Plain(Box<Store>),
    Piped(Pipeline),
}

#[pyclass(module = "ckptstore._native", name = "Store", frozen)]
pub struct PyStore {
    dir: PathBuf,
    read_only: bool,
    pipeline_opts: PipelineOptions,
    store: Mutex<Option<Inner>>,
    /// The newest pipeline save, waited for before a synchronous save, a deletion, retention
    /// or close, so checkpoints commit in the order they were handed in.
    last_async: Mutex<Option<Arc<InFlight>>>,
    /// The CUDA stagers of the pipeline's pool, one per device (locked after `store`).
    stagers: Mutex<Stagers>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn closed(dir: &std::path::Path) -> Failure {
    Failure::store(format!("store {} is closed", dir.display()))
}

fn selector(id: Option<u64>, step: Option<u64>) -> PyResult<Selector> {
    match (id, step) {
        (Some(_), Some(_)) => Err(PyValueError::new_err("give id or step, not both")),
        (Some(i), None) => Ok(Selector::Id(i)),
        (None, Some(s)) => Ok(Selector::Step(s)),
        (None, None) => Ok(Selector::Latest),
    }
}

fn meta_to_py(py: Python<'_>, v: &MetaValue) -> PyResult<PyObject> {
    Ok(match v {
        MetaValue::Bytes(b) => PyBytes::new(py, b).into_any().unbind(),
        MetaValue::Str(s) => PyString::new(py, s).into_any().unbind(),
        MetaValue::Int(i) => i.into_pyobject(py)?.into_any().unbind(),
        MetaValue::Float(f) => f.into_pyobject(py)?.into_any().unbind(),
    })
}

fn meta_from_py(key: &str, v: &Bound<'_, PyAny>) -> PyResult<MetaValue> {
    if v.is_instance_of::<PyBool>() {
        Ok(MetaValue::Int(i64::from(v.extract::<bool>()?)))
    } else if v.is_instance_of::<PyInt>() {
        v.extract::<i64>().map(MetaValue::Int).map_err(|_| {
            PyValueError::new_err(format!("metadata {key:?}: integer outside the i64 range"))
        })
    } else if v.is_instance_of::<PyFloat>() {
        Ok(MetaValue::Float(v.extract()?))
    } else if v.is_instance_of::<PyString>() {
        Ok(MetaValue::Str(v.extract()?))
    } else if v.is_instance_of::<PyBytes>() {
        Ok(MetaValue::Bytes(v.extract()?))
    } else {
        Err(PyTypeError::new_err(format!(
            "metadata {key:?}: {} is not int, float, str or bytes",
            v.get_type().name()?
        )))
    }
}

fn info_to_py<'py>(py: Python<'py>, c: &CheckpointInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("id", c.id)?;
    d.set_item("step", c.step)?;
    d.set_item("epoch", c.epoch)?;
    d.set_item("wall_time_unix_ns", c.wall_time_unix_ns)?;
    d.set_item("tensors", c.tensors)?;
    d.set_item("blobs", c.blobs)?;
    d.set_item("bytes", c.bytes)?;
    d.set_item("pinned", c.pinned)?;
    let m = PyDict::new(py);
    for (k, v) in &c.metadata {
        m.set_item(k, meta_to_py(py, v)?)?;
    }
    d.set_item("metadata", m)?;
    Ok(d)
}

type TensorArg<'py> = (String, String, Vec<u64>, Bound<'py, PyAny>);

impl PyStore {
    /// Runs `f` on the open store with the GIL released.
    fn with_store<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Store) -> Result<T, Failure> + Send,
    ) -> PyResult<T> {
        let store = &self.store;
        let dir = &self.dir;
        py.allow_threads(|| {
            let mut g = lock(store);
            match g.as_mut().ok_or_else(|| closed(dir))? {
                Inner::Plain(s) => f(s),
                // Waits while the pipeline's I/O thread is writing a save.
                Inner::Piped(p) => f(&mut p.store()),
            }
        })
        .map_err(Into::into)
    }

    /// Deletes checkpoint `id` (just committed from `req`) and raises if a raw source of `req`
    /// changed while the engine read it (`HostBytes::check_unchanged`).
    fn undo_if_sources_changed(&self, py: Python<'_>, req: &SaveRequest, id: u64) -> PyResult<()> {
        match req.check_sources(py) {
            Ok(()) => Ok(()),
            Err(changed) => Err(self.undo(py, id, changed)),
        }
    }

    /// Deletes checkpoint `id`; the error to raise: `changed`, saying whether it is gone.
    fn undo(&self, py: Python<'_>, id: u64, changed: Failure) -> PyErr {
        let deleted = self.with_store(py, move |s| Ok(s.delete(id)?));
        let what = match deleted {
            Ok(_) => format!("checkpoint {id} was deleted"),
            Err(e) => format!("checkpoint {id} could not be deleted ({e}); delete it"),
        };
        changed.context(&format!("save undone, {what}")).into()
    }

    /// Waits (GIL released) for the newest background save to finish; its outcome belongs to
    /// its own handle.
    fn drain(&self, py: Python<'_>) {
        let last = lock(&self.last_async).clone();
        if let Some(p) = last {
            py.allow_threads(move || {
                let _ = p.wait();
            });
        }
    }

    fn request(
        step: u64,
        epoch: Option<u64>,
        metadata: Option<&Bound<'_, PyDict>>,
        tensors: Vec<TensorArg<'_>>,
        blobs: Vec<(String, Vec<u8>)>,
    ) -> PyResult<SaveRequest> {
        let mut meta = Vec::new();
        if let Some(m) = metadata {
            for (k, v) in m.iter() {
                let key: String = k
                    .extract()
                    .map_err(|_| PyTypeError::new_err("metadata keys must be str"))?;
                let val = meta_from_py(&key, &v)?;
                meta.push((key, val));
            }
        }
        let mut ts = Vec::with_capacity(tensors.len());
        for (name, dtype, shape, src) in tensors {
            let dt = DType::from_name(&dtype).ok_or_else(|| {
                PyTypeError::new_err(format!("tensor {name:?}: unknown dtype {dtype:?}"))
            })?;
            let bytes = match DeviceBytes::from_py(&name, &src)? {
                Some(d) => TensorBytes::Device(d),
                None => TensorBytes::Host(HostBytes::from_py(&name, &src)?),
            };
            ts.push(TensorIn {
                name,
                dtype: dt,
                shape,
                bytes,
            });
        }
        Ok(SaveRequest {
            step,
            epoch,
            metadata: meta,
            tensors: ts,
            blobs,
        })
    }
}

impl PyStore {
    /// Stages `req` into the write pipeline (started by the first call) and returns its
    /// handle. A save with GPU tensors first makes the stagers of their devices, waiting for
    /// the saves in flight so that no staging buffer is in use while they register the pool.
    fn submit_async(&self, py: Python<'_>, req: SaveRequest) -> PyResult<SaveHandle> {
        if self.read_only {
            return Err(Failure::from(ckptstore_engine::Error::ReadOnly {
                path: self.dir.clone(),
            })
            .into());
        }
        let devices = req.devices();
        if devices.iter().any(|d| !lock(&self.stagers).has(*d)) {
            self.drain(py);
        }
        let store = &self.store;
        let stagers = &self.stagers;
        let dir = &self.dir;
        let opts = self.pipeline_opts.clone();
        let handle = py.allow_threads(|| -> Result<ckptstore_engine::SaveHandle, Failure> {
            let mut g = lock(store);
            let mut p = match g.take().ok_or_else(|| closed(dir))? {
                Inner::Piped(p) => p,
                // A failure here (no memory for the staging pool) closes the store: the
                // engine consumed it. The error says so; reopen to go on.
                Inner::Plain(s) => Pipeline::new(*s, opts).map_err(|e| {
                    Failure::from(e).context("cannot start the write pipeline; the store is closed")
                })?,
            };
            let mut st = lock(stagers);
            let h = devices
                .iter()
                .try_for_each(|d| st.add(*d, p.pool()))
                .and_then(|()| save_job::submit(&mut p, &st, &req));
            drop(st);
            *g = Some(Inner::Piped(p));
            h
        })?;
        let stall_seconds = handle.stall().as_secs_f64();
        let state = Arc::new(InFlight::new(handle));
        if let Err(changed) = req.check_sources(py) {
            // The copy into the staging buffers is over: wait for the commit, then undo it.
            let s2 = state.clone();
            return match py.allow_threads(move || s2.wait()) {
                Ok(c) => Err(self.undo(py, c.info.checkpoint.id, changed)),
                Err(_) => Err(changed.into()),
            };
        }
        drop(req);
        *lock(&self.last_async) = Some(state.clone());
        Ok(SaveHandle {
            state,
            stall_seconds,
        })
    }
}

/// A store key from Python: 32 bytes, or 64 hex digits. Errors never show it.
#[derive(FromPyObject)]
pub enum KeyArg {
    #[pyo3(transparent, annotation = "bytes")]
    Bytes(Vec<u8>),
    #[pyo3(transparent, annotation = "str")]
    Hex(String),
}

impl KeyArg {
    /// The engine key (which zeroes its bytes when dropped; the Python object the caller
    /// passed is theirs to manage).
    fn key(self) -> PyResult<Key> {
        match &self {
            KeyArg::Bytes(b) => Key::from_bytes(b),
            KeyArg::Hex(h) => Key::from_hex(h),
        }
        .map_err(|e| PyValueError::new_err(format!("encryption_key: {e}")))
    }
}

#[pymethods]
impl PyStore {
    /// Opens (creating if needed) the store in `path` and runs recovery.
    #[new]
    #[pyo3(signature = (path, *, read_only=false, chunk_size=None, segment_max_bytes=None,
                        wal_compact_min_bytes=None, recovery_mode=None, async_budget_bytes=None,
                        mode=None, allow_unsafe_dir=false, encryption_key=None,
                        old_encryption_keys=Vec::new(), replica=None, replica_keep_last=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        read_only: bool,
        chunk_size: Option<usize>,
        segment_max_bytes: Option<u64>,
        wal_compact_min_bytes: Option<u64>,
        recovery_mode: Option<&str>,
        async_budget_bytes: Option<usize>,
        mode: Option<u32>,
        allow_unsafe_dir: bool,
        encryption_key: Option<KeyArg>,
        old_encryption_keys: Vec<KeyArg>,
        replica: Option<String>,
        replica_keep_last: Option<usize>,
    ) -> PyResult<Self> {
        let mut pipeline_opts = PipelineOptions::default();
        if let Some(b) = async_budget_bytes {
            pipeline_opts.budget_bytes = b;
        }
        let mut opts = Options {
            read_only,
            allow_unsafe_dir,
            encryption_key: encryption_key.map(KeyArg::key).transpose()?,
            old_keys: old_encryption_keys
                .into_iter()
                .map(KeyArg::key)
                .collect::<PyResult<_>>()?,
            replica,
            replica_keep_last,
            ..Options::default()
        };
        if let Some(m) = mode {
            opts.file_mode = m;
        }
        if let Some(c) = chunk_size {
            opts.chunk_size = c;
        }
        if let Some(s) = segment_max_bytes {
            opts.segment_max_bytes = s;
        }
        if let Some(w) = wal_compact_min_bytes {
            opts.wal_compact_min_bytes = w;
        }
        if let Some(m) = recovery_mode {
            opts.recovery_mode = match m {
                "absolute_consistency" => RecoveryMode::AbsoluteConsistency,
                "tolerate_tail_corruption" => RecoveryMode::TolerateTailCorruption,
                "point_in_time" => RecoveryMode::PointInTime,
                other => {
                    return Err(PyValueError::new_err(format!(
                        "recovery_mode {other:?}: use absolute_consistency, \
                         tolerate_tail_corruption or point_in_time"
                    )))
                }
            };
        }
        let p = path.clone();
        let store = py.allow_threads(move || Store::open(&p, opts));
        let store = errors::py(store)?;
        Ok(PyStore {
            dir: path,
            read_only,
            pipeline_opts,
            store: Mutex::new(Some(Inner::Plain(Box::new(store)))),
            last_async: Mutex::new(None),
            stagers: Mutex::new(Stagers::default()),
        })
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.dir.clone()
    }

    #[getter]
    fn read_only(&self) -> bool {
        self.read_only
    }

    /// Waits for background saves, then releases the store (and its writer lock).
    fn close(&self, py: Python<'_>) {
        self.drain(py);
        let store = &self.store;
        let stagers = &self.stagers;
        py.allow_threads(|| {
            let mut g = lock(store);
            lock(stagers).clear(); // unregisters the pool's buffers while the pool lives
            if let Some(Inner::Piped(p)) = g.take() {
                drop(p.close()); // joins the pipeline's threads, then releases the store
            }
        });
    }

    /// Waits (GIL released) for every background save handed in so far to finish; their
    /// outcomes belong to their own handles. The store stays open.
    fn wait_saves(&self, py: Python<'_>) {
        self.drain(py);
    }

    #[getter]
    fn closed(&self) -> bool {
        lock(&self.store).is_none()
    }

    /// Commits one checkpoint; durable when it returns. `tensors`: `(name, dtype, shape,
    /// source)` with source a C-contiguous byte buffer or `(owner, address, nbytes)`.
    #[pyo3(signature = (step, tensors, blobs, *, epoch=None, metadata=None))]
    fn save<'py>(
        &self,
        py: Python<'py>,
        step: u64,
        tensors: Vec<TensorArg<'py>>,
        blobs: Vec<(String, Vec<u8>)>,
        epoch: Option<u64>,
        metadata: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let req = Self::request(step, epoch, metadata, tensors, blobs)?;
        if !req.devices().is_empty() {
            // GPU tensors are staged by the engine's stager, which feeds the write pipeline:
            // the save goes through it and is waited for.
            let h = self.submit_async(py, req)?;
            let state = h.state.clone();
            return match py.allow_threads(move || state.wait()) {
                Ok(c) => c.to_dict(py),
                Err(f) => Err(f.into()),
            };
        }
        self.drain(py);
        let started = Instant::now();
        let info = self.with_store(py, |s| save_job::commit(s, &req))?;
        self.undo_if_sources_changed(py, &req, info.checkpoint.id)?;
        drop(req);
        let secs = started.elapsed().as_secs_f64();
        Committed {
            info,
            stall_seconds: secs,
            time_to_durable_seconds: secs,
        }
        .to_dict(py)
    }

    /// Stages the tensors into the engine's write pipeline (the stall: copies into its
    /// staging buffers, GIL released) and returns; the commit follows on the pipeline's
    /// threads, in submission order. The pipeline (and its staging pool of
    /// `async_budget_bytes`) is started by the first call.
    #[pyo3(signature = (step, tensors, blobs, *, epoch=None, metadata=None))]
    fn save_async<'py>(
        &self,
        py: Python<'py>,
        step: u64,
        tensors: Vec<TensorArg<'py>>,
        blobs: Vec<(String, Vec<u8>)>,
        epoch: Option<u64>,
        metadata: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<SaveHandle> {
        let req = Self::request(step, epoch, metadata, tensors, blobs)?;
        self.submit_async(py, req)
    }

    /// Every live checkpoint, oldest first, as dicts.
    fn list<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let all = self.with_store(py, |s| Ok(s.list()))?;
        let l = PyList::empty(py);
        for c in &all {
            l.append(info_to_py(py, c)?)?;
        }
        Ok(l)
    }

    /// One checkpoint (by id or step; the newest without either).
    #[pyo3(signature = (*, id=None, step=None))]
    fn info<'py>(
        &self,
        py: Python<'py>,
        id: Option<u64>,
        step: Option<u64>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let sel = selector(id, step)?;
        let c = self.with_store(py, move |s| Ok(s.info(sel)?))?;
        info_to_py(py, &c)
    }

    /// The newest checkpoint whose every chunk verifies (walks back past damage), or None.
    fn latest_valid<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let c = self.with_store(py, |s| Ok(s.latest_valid()?))?;
        c.map(|c| info_to_py(py, &c)).transpose()
    }

    /// Tensor names of checkpoint `id`, in the order they were saved.
    fn tensor_names(&self, py: Python<'_>, id: u64) -> PyResult<Vec<String>> {
        self.with_store(py, move |s| {
            let ck = s.checkpoint(Selector::Id(id))?;
            Ok(ck.tensor_names().into_iter().map(str::to_owned).collect())
        })
    }

    /// Blob names of checkpoint `id`.
    fn blob_names(&self, py: Python<'_>, id: u64) -> PyResult<Vec<String>> {
        self.with_store(py, move |s| {
            let ck = s.checkpoint(Selector::Id(id))?;
            Ok(ck.blob_names().into_iter().map(str::to_owned).collect())
        })
    }

    /// `(dtype, shape)` of a tensor, reading no data.
    fn tensor_meta(&self, py: Python<'_>, id: u64, name: String) -> PyResult<(String, Vec<u64>)> {
        self.with_store(py, move |s| {
            let (d, shape) = s.checkpoint(Selector::Id(id))?.tensor_meta(&name)?;
            Ok((d.name().to_owned(), shape))
        })
    }

    /// A tensor's bytes without a copy where the engine can (the segment's map, or for cold
    /// chunks memory the disk read them into directly), else one copy; BLAKE3-verified unless
    /// `verify=False`. `mapped=True`: the segment's map wherever the engine can map the
    /// tensor, cold or not (for `load(mmap=True)`, which maps the same file pages privately).
    #[pyo3(signature = (id, name, *, verify=true, mapped=false))]
    fn tensor(
        &self,
        py: Python<'_>,
        id: u64,
        name: String,
        verify: bool,
        mapped: bool,
    ) -> PyResult<MappedBytes> {
        self.with_store(py, move |s| {
            let ck = s.checkpoint(Selector::Id(id))?;
            let v = if mapped {
                ck.tensor_map(&name, verify)?
            } else {
                ck.tensor_view_with(&name, verify)?
            };
            Ok(MappedBytes::new(v))
        })
    }

    /// Reads a tensor straight into `dst`, `(owner, address, nbytes)` of a fresh contiguous
    /// CPU tensor the caller allocated and holds: the one copy of a torch load, done by the
    /// engine's readers (chunks on every core, hashed as they land, the disk read ahead), GIL
    /// released. BLAKE3-verified unless `verify=False`.
    #[pyo3(signature = (id, name, dst, *, verify=true))]
    fn read_into(
        &self,
        py: Python<'_>,
        id: u64,
        name: String,
        dst: Bound<'_, PyAny>,
        verify: bool,
    ) -> PyResult<()> {
        let mut target = LoadTarget::from_py(&name, &dst)?;
        let out = &mut target;
        self.with_store(py, move |s| {
            s.checkpoint(Selector::Id(id))?
                .tensor_into(&name, out.as_mut_slice(), verify)?;
            Ok(())
        })
    }

    /// Reads several tensors straight into `targets`, `[(name, (owner, address, nbytes))]` of
    /// fresh contiguous CPU tensors the caller allocated and holds (as `read_into`), in one
    /// engine call: the chunks of all of them on one set of reading threads, so the disk never
    /// waits at a tensor's end and each new tensor's pages are faulted in by the thread that
    /// fills them, overlapping the other threads' reads. GIL released for the whole read.
    /// Targets that overlap are refused before any is written.
    #[pyo3(signature = (id, targets, *, verify=true))]
    fn read_many(
        &self,
        py: Python<'_>,
        id: u64,
        targets: Vec<(String, Bound<'_, PyAny>)>,
        verify: bool,
    ) -> PyResult<()> {
        let mut ts = Vec::with_capacity(targets.len());
        for (name, dst) in targets {
            let t = LoadTarget::from_py(&name, &dst)?;
            ts.push((name, t));
        }
        LoadTarget::check_disjoint(&ts).map_err(PyValueError::new_err)?;
        let ts = &mut ts;
        self.with_store(py, move |s| {
            let outs = ts
                .iter_mut()
                .map(|(n, t)| (n.as_str(), t.as_mut_slice()))
                .collect();
            s.checkpoint(Selector::Id(id))?.tensors_into(outs, verify)?;
            Ok(())
        })
    }

    /// Reads the tensors `names` into memory of their own, in one engine call (GIL released):
    /// one writable byte buffer each, for `torch.frombuffer` — the new tensors' storage. A cold
    /// uncompressed tensor of a MiB or more is read O_DIRECT straight into its buffer (no
    /// bounce copy, no page cache: `zero_copy`); the others are copied once from the read
    /// buffer (cached, compressed, sealed, small). Every chunk of all of them is read on one
    /// set of threads, BLAKE3-verified unless `verify=False`; the error names the first bad
    /// chunk in the order of `names`.
    #[pyo3(signature = (id, names, *, verify=true))]
    fn load_many(
        &self,
        py: Python<'_>,
        id: u64,
        names: Vec<String>,
        verify: bool,
    ) -> PyResult<Vec<OwnedBytes>> {
        let views = self.with_store(py, move |s| {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            Ok(s.checkpoint(Selector::Id(id))?
                .tensors_owned(&names, verify)?)
        })?;
        views
            .into_iter()
            .map(|v| {
                OwnedBytes::new(v).ok_or_else(|| {
                    pyo3::exceptions::PyRuntimeError::new_err("a loaded tensor's memory is shared")
                })
            })
            .collect()
    }

    /// A blob's bytes (always verified).
    fn blob<'py>(&self, py: Python<'py>, id: u64, name: String) -> PyResult<Bound<'py, PyBytes>> {
        let b = self.with_store(py, move |s| {
            Ok(s.checkpoint(Selector::Id(id))?.blob(&name)?)
        })?;
        Ok(PyBytes::new(py, &b))
    }

    /// Reads and BLAKE3-checks every chunk of checkpoint `id`.
    fn verify(&self, py: Python<'_>, id: u64) -> PyResult<()> {
        self.with_store(py, move |s| Ok(s.verify(id)?))
    }

    /// Verifies every chunk of every live checkpoint, quarantines the bad ones, heals what a
    /// stored copy can heal (`Store::scrub`). Returns what `ckptstore scrub --json` prints,
    /// as a dict. Runs after any queued background save has committed.
    fn scrub<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.drain(py);
        let r = self.with_store(py, move |s| Ok(s.scrub()?))?;
        let loc = |(segment, offset): (u64, u64)| -> PyResult<Bound<'py, PyDict>> {
            let d = PyDict::new(py);
            d.set_item("segment", segment)?;
            d.set_item("offset", offset)?;
            Ok(d)
        };
        let d = PyDict::new(py);
        d.set_item("ok", r.broken.is_empty())?;
        d.set_item("checkpoints", r.checkpoints)?;
        d.set_item("bytes_read", r.bytes_read)?;
        let quarantined = PyList::empty(py);
        for &l in &r.heal.quarantined {
            quarantined.append(loc(l)?)?;
        }
        d.set_item("quarantined", quarantined)?;
        let healed = PyList::empty(py);
        for &(from, (ts, to)) in &r.heal.healed {
            let h = loc(from)?;
            h.set_item("to_segment", ts)?;
            h.set_item("to_offset", to)?;
            healed.append(h)?;
        }
        d.set_item("healed", healed)?;
        let unhealed = PyList::empty(py);
        for (l, ids) in &r.heal.unhealed {
            let u = loc(*l)?;
            u.set_item("checkpoints", ids.clone())?;
            unhealed.append(u)?;
        }
        d.set_item("unhealed", unhealed)?;
        let broken = PyList::empty(py);
        for (id, e) in &r.broken {
            let b = PyDict::new(py);
            b.set_item("id", id)?;
            b.set_item("error", e)?;
            broken.append(b)?;
        }
        d.set_item("broken", broken)?;
        Ok(d)
    }

    /// The MAC chain over sealed commits (`Store::verify_chain`): a dict of `verified`,
    /// `unauthenticated`, `unchecked` (id lists), `breaks` (id pairs) and `head`
    /// (`(id, mac_hex)` or None).
    fn verify_chain<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let r = self.with_store(py, move |s| Ok(s.verify_chain()?))?;
        let d = PyDict::new(py);
        d.set_item("verified", r.verified)?;
        d.set_item("unauthenticated", r.unauthenticated)?;
        d.set_item("unchecked", r.unchecked)?;
        d.set_item("breaks", r.breaks)?;
        d.set_item("head", r.head)?;
        Ok(d)
    }

    /// Reseals every checkpoint not under the store's `encryption_key` (`Store::rekey`);
    /// returns the ids resealed.
    fn rekey(&self, py: Python<'_>) -> PyResult<Vec<u64>> {
        self.drain(py);
        self.with_store(py, move |s| Ok(s.rekey(|_, _| {})?.checkpoints))
    }

    /// Raises unless the store still holds the chain head `(id, mac_hex)` seen earlier.
    fn check_head(&self, py: Python<'_>, id: u64, mac_hex: String) -> PyResult<()> {
        self.with_store(py, move |s| Ok(s.check_head(id, &mac_hex)?))
    }

    /// Deletes checkpoint `id` durably; returns the bytes freed.
    fn delete(&self, py: Python<'_>, id: u64) -> PyResult<u64> {
        self.drain(py);
        self.with_store(py, move |s| Ok(s.delete(id)?.bytes_freed))
    }

    /// `[(id, "replicated" | "local_only")]` for every live checkpoint, oldest first.
    fn replication(&self, py: Python<'_>) -> PyResult<Vec<(u64, &'static str)>> {
        self.with_store(py, |s| {
            Ok(s.replication()
                .into_iter()
                .map(|(id, r)| {
                    let r = match r {
                        Replication::Replicated => "replicated",
                        Replication::LocalOnly => "local_only",
                    };
                    (id, r)
                })
                .collect())
        })
    }

    /// Blocks (without the GIL) until the replica holds the current state; raises StoreError
    /// after `timeout` seconds (None: no limit).
    #[pyo3(signature = (timeout=None))]
    fn wait_replicated(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        let t = match timeout {
            Some(t) if !(t.is_finite() && t >= 0.0) => {
                return Err(PyValueError::new_err(format!(
                    "timeout {t}: a number of seconds >= 0, or None"
                )))
            }
            Some(t) => Some(std::time::Duration::from_secs_f64(t)),
            None => None,
        };
        self.with_store(py, move |s| Ok(s.wait_replicated(t)?))
    }

    fn pin(&self, py: Python<'_>, id: u64) -> PyResult<bool> {
        self.with_store(py, move |s| Ok(s.pin(id)?))
    }

    fn unpin(&self, py: Python<'_>, id: u64) -> PyResult<bool> {
        self.with_store(py, move |s| Ok(s.unpin(id)?))
    }

    /// Applies the engine's retention policy (rules combine as a union; the newest and pinned
    /// checkpoints and the ids in `protect` are always kept); returns the deleted ids, oldest
    /// first. Runs after any queued background save has committed.
    #[pyo3(signature = (*, keep_last=None, keep_per_minutes=None, keep_every_steps=None,
                        keep_best=None, protect=Vec::new(), dry_run=false))]
    #[allow(clippy::too_many_arguments)]
    fn apply_retention(
        &self,
        py: Python<'_>,
        keep_last: Option<usize>,
        keep_per_minutes: Option<u64>,
        keep_every_steps: Option<u64>,
        keep_best: Option<(usize, String, String)>,
        protect: Vec<u64>,
        dry_run: bool,
    ) -> PyResult<Vec<u64>> {
        let mut p = RetentionPolicy::new();
        if let Some(n) = keep_last {
            p = p.keep_last(n);
        }
        if let Some(m) = keep_per_minutes {
            p = p.keep_one_per_minutes(m);
        }
        if let Some(s) = keep_every_steps {
            p = p.keep_every_steps(s);
        }
        if let Some((k, metric, mode)) = keep_best {
            let mode = match mode.as_str() {
                "min" => MetricMode::Min,
                "max" => MetricMode::Max,
                other => {
                    return Err(PyValueError::new_err(format!(
                        "keep_best mode {other:?}: use \"min\" or \"max\""
                    )))
                }
            };
            p = p.keep_best(k, metric, mode);
        }
        for id in protect {
            p = p.pin(id);
        }
        self.drain(py);
        self.with_store(py, move |s| {
            if dry_run {
                Ok(s.plan_retention(&p)?.delete.iter().map(|c| c.id).collect())
            } else {
                Ok(s.apply_retention(&p)?.iter().map(|d| d.id).collect())
            }
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "Store({:?}{})",
            self.dir.display(),
            if self.read_only {
                ", read_only=True"
            } else {
                ""
            }
        )
    }
}
