//! Saving: one checkpoint's tensors, blobs and metadata, either committed now through one
//! engine transaction (`save`, durable on return) or staged into the engine's write pipeline
//! (`save_async`: the caller is blocked only while its bytes are copied into the pipeline's
//! staging buffers; hashing, writes, fdatasync and the commit record happen on the engine's
//! threads, in submission order).

use crate::device_bytes::{DeviceBytes, Stagers};
use crate::errors::Failure;
use crate::host_bytes::HostBytes;
use ckptstore_engine::{CommitInfo, DType, MetaValue, Pipeline, Store};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::Mutex;

/// One tensor of a save: name, dtype, shape and the caller's bytes.
pub struct TensorIn {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub bytes: TensorBytes,
}

/// Where a tensor's bytes are: host memory, or a GPU's (staged by the engine's `CudaStager`).
pub enum TensorBytes {
    Host(HostBytes),
    Device(DeviceBytes),
}

/// One checkpoint to save.
pub struct SaveRequest {
    pub step: u64,
    pub epoch: Option<u64>,
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<TensorIn>,
    pub blobs: Vec<(String, Vec<u8>)>,
}

impl SaveRequest {
    /// The devices of its GPU tensors (empty: a host-only save).
    pub fn devices(&self) -> Vec<usize> {
        let mut d: Vec<usize> = self
            .tensors
            .iter()
            .filter_map(|t| match &t.bytes {
                TensorBytes::Device(b) => Some(b.device),
                TensorBytes::Host(_) => None,
            })
            .collect();
        d.sort_unstable();
        d.dedup();
        d
    }

    /// `Err` naming the first tensor whose raw source changed under the read (see
    /// [`HostBytes::check_unchanged`]). Call with the GIL held, after the engine read them.
    pub fn check_sources(&self, py: Python<'_>) -> Result<(), Failure> {
        for t in &self.tensors {
            // (a GPU source is read by the engine's stager under CUDA's own checks)
            if let TensorBytes::Host(b) = &t.bytes {
                b.check_unchanged(py)
                    .map_err(|why| Failure::store(format!("tensor {:?}: {why}", t.name)))?;
            }
        }
        Ok(())
    }
}

/// What Python sees of a commit.
#[derive(Debug, Clone)]
pub struct Committed {
    pub info: CommitInfo,
    pub stall_seconds: f64,
    pub time_to_durable_seconds: f64,
}

impl Committed {
    pub fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let i = &self.info;
        d.set_item("id", i.checkpoint.id)?;
        d.set_item("step", i.checkpoint.step)?;
        d.set_item("epoch", i.checkpoint.epoch)?;
        d.set_item("bytes_written", i.bytes_written)?;
        d.set_item("bytes_deduplicated", i.bytes_deduplicated)?;
        d.set_item("chunks_written", i.chunks_written)?;
        d.set_item("chunks_deduplicated", i.chunks_deduplicated)?;
        d.set_item("stall_seconds", self.stall_seconds)?;
        d.set_item("time_to_durable_seconds", self.time_to_durable_seconds)?;
        Ok(d)
    }
}

/// Runs one engine transaction; the checkpoint is durable when this returns `Ok`. Any error
/// drops the transaction, which removes what it wrote: nothing torn, the previous checkpoint
/// stays the newest.
pub fn commit(store: &mut Store, req: &SaveRequest) -> Result<CommitInfo, Failure> {
    let mut tx = store.begin(req.step)?;
    if let Some(e) = req.epoch {
        tx.set_epoch(e);
    }
    for (k, v) in &req.metadata {
        tx.set_metadata(k.clone(), v.clone());
    }
    for t in &req.tensors {
        match &t.bytes {
            TensorBytes::Host(b) => tx.put_tensor(&t.name, t.dtype, &t.shape, b.as_slice())?,
            // (PyStore::save sends saves with GPU tensors through the pipeline)
            TensorBytes::Device(_) => {
                return Err(Failure::store(format!(
                    "tensor {:?}: a GPU tensor needs the write pipeline",
                    t.name
                )))
            }
        }
    }
    for (name, data) in &req.blobs {
        tx.put_blob(name, data)?;
    }
    Ok(tx.commit()?)
}

/// Stages one save into the pipeline; returns once every byte is copied out of the caller's
/// memory. An error drops the staged save (nothing is committed).
pub fn submit(
    p: &mut Pipeline,
    stagers: &Stagers,
    req: &SaveRequest,
) -> Result<ckptstore_engine::SaveHandle, Failure> {
    let mut s = p.begin(req.step)?;
    if let Some(e) = req.epoch {
        s.set_epoch(e);
    }
    for (k, v) in &req.metadata {
        s.set_metadata(k.clone(), v.clone());
    }
    for t in &req.tensors {
        match &t.bytes {
            TensorBytes::Host(b) => s.put_tensor(&t.name, t.dtype, &t.shape, b.as_slice())?,
            TensorBytes::Device(b) => stagers.put(&mut s, &t.name, t.dtype, &t.shape, b)?,
        }
    }
    for (name, data) in &req.blobs {
        s.put_blob(name, data)?;
    }
    Ok(s.submit()?)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A pipeline save in flight, shared by its Python handle and the store (which waits for the
/// newest one before a synchronous save, a deletion or close). The engine's handle is waited
/// for once; its outcome is kept so every `wait()` returns or raises it again.
pub struct InFlight {
    handle: Mutex<Option<ckptstore_engine::SaveHandle>>,
    result: Mutex<Option<Result<Committed, Failure>>>,
}

impl InFlight {
    pub fn new(h: ckptstore_engine::SaveHandle) -> Self {
        InFlight {
            handle: Mutex::new(Some(h)),
            result: Mutex::new(None),
        }
    }

    /// Blocks until the save is durable or failed.
    pub fn wait(&self) -> Result<Committed, Failure> {
        let mut r = lock(&self.result);
        if let Some(done) = r.as_ref() {
            return done.clone();
        }
        let h = lock(&self.handle)
            .take()
            .expect("the handle is taken only under the result lock, which then fills it");
        let out = h
            .wait()
            .map(|rep| Committed {
                info: rep.commit,
                stall_seconds: rep.stall.as_secs_f64(),
                time_to_durable_seconds: rep.time_to_durable.as_secs_f64(),
            })
            .map_err(Failure::from);
        *r = Some(out.clone());
        out
    }

    /// Whether the save has finished; never blocks (a `wait` in progress counts as not yet).
    pub fn is_done(&self) -> bool {
        match self.result.try_lock() {
            Ok(r) if r.is_some() => true,
            Ok(_) => lock(&self.handle).as_ref().is_some_and(|h| h.is_done()),
            Err(_) => false,
        }
    }
}

/// Returned by `save_async`: the snapshot is taken; the commit runs in the background.
#[pyclass(module = "ckptstore._native", frozen)]
pub struct SaveHandle {
    pub state: std::sync::Arc<InFlight>,
    pub stall_seconds: f64,
}

#[pymethods]
impl SaveHandle {
    /// Blocks (without the GIL) until the checkpoint is durable and returns the commit
    /// summary; re-raises the save's error if it failed (every call raises it again).
    /// Ctrl-C interrupts the wait (not the save, which still commits or fails in order).
    fn wait<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        while !self.state.is_done() {
            py.allow_threads(|| std::thread::sleep(std::time::Duration::from_millis(1)));
            py.check_signals()?;
        }
        let s = self.state.clone();
        match py.allow_threads(move || s.wait()) {
            Ok(c) => c.to_dict(py),
            Err(f) => Err(f.into()),
        }
    }

    /// Whether the commit has finished (successfully or not); never blocks.
    fn done(&self) -> bool {
        self.state.is_done()
    }

    /// Seconds `save_async` blocked the caller: copying its bytes into the pipeline's staging
    /// buffers, including any wait for a free buffer.
    #[getter]
    fn stall_seconds(&self) -> f64 {
        self.stall_seconds
    }
}
