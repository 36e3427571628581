//! Saving: one checkpoint's tensors, blobs and metadata committed through one engine
//! transaction, either now (`save`, durable on return) or on the store's background committer
//! (`save_async`: the caller's bytes are copied first — the stall — and committed in order on
//! one thread, so checkpoints commit in the order they were handed in).

use crate::errors::Failure;
use crate::host_bytes::HostBytes;
use ckptstore_engine::{CommitInfo, DType, MetaValue, Store};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// One tensor of a save: name, dtype, shape and its bytes (lent or snapshotted).
pub struct TensorIn<B> {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub bytes: B,
}

/// Everything of one checkpoint except the tensor bytes' form.
pub struct SaveRequest<B> {
    pub step: u64,
    pub epoch: Option<u64>,
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<TensorIn<B>>,
    pub blobs: Vec<(String, Vec<u8>)>,
}

/// What Python sees of a commit.
#[derive(Debug, Clone)]
pub struct Committed {
    pub info: CommitInfo,
    pub stall_seconds: f64,
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
        d.set_item("duration_seconds", i.duration.as_secs_f64())?;
        d.set_item("stall_seconds", self.stall_seconds)?;
        Ok(d)
    }
}

/// Runs one engine transaction; `commit` is durable when this returns `Ok`. Any error drops
/// the transaction, which removes what it wrote: nothing torn, the previous checkpoint stays
/// the latest.
pub fn commit<B: AsRef<[u8]>>(
    store: &mut Store,
    req: &SaveRequest<B>,
) -> Result<CommitInfo, Failure> {
    let mut tx = store.begin(req.step)?;
    if let Some(e) = req.epoch {
        tx.set_epoch(e);
    }
    for (k, v) in &req.metadata {
        tx.set_metadata(k.clone(), v.clone());
    }
    for t in &req.tensors {
        tx.put_tensor(&t.name, t.dtype, &t.shape, t.bytes.as_ref())?;
    }
    for (name, data) in &req.blobs {
        tx.put_blob(name, data)?;
    }
    Ok(tx.commit()?)
}

impl AsRef<[u8]> for HostBytes {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

/// The snapshot of an async save: the caller's bytes copied, so the caller may change its
/// tensors as soon as `save_async` returns.
pub fn snapshot(req: SaveRequest<HostBytes>) -> SaveRequest<Vec<u8>> {
    SaveRequest {
        step: req.step,
        epoch: req.epoch,
        metadata: req.metadata,
        tensors: req
            .tensors
            .into_iter()
            .map(|t| TensorIn {
                bytes: t.bytes.as_slice().to_vec(),
                name: t.name,
                dtype: t.dtype,
                shape: t.shape,
            })
            .collect(),
        blobs: req.blobs,
    }
}

/// Where a background save stands; shared by its handle and the committer.
#[derive(Default)]
pub struct Progress {
    result: Mutex<Option<Result<Committed, Failure>>>,
    cond: Condvar,
}

impl Progress {
    pub fn finish(&self, r: Result<Committed, Failure>) {
        *self.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        self.cond.notify_all();
    }

    /// Blocks until the save has committed or failed.
    pub fn wait(&self) -> Result<Committed, Failure> {
        let mut g = self.result.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = g.as_ref() {
                return r.clone();
            }
            g = self.cond.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub fn is_done(&self) -> bool {
        self.result
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

/// A save queued for the committer.
pub struct Job {
    pub req: SaveRequest<Vec<u8>>,
    pub stall_seconds: f64,
    pub progress: Arc<Progress>,
}

/// The store's background committer: one thread, jobs in order.
pub struct Committer {
    tx: std::sync::mpsc::Sender<Job>,
}

impl Committer {
    pub fn start(store: Arc<Mutex<Option<Store>>>) -> Result<Committer, Failure> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("ckptstore-commit".into())
            .spawn(move || {
                for job in rx {
                    let r = {
                        let mut g = store.lock().unwrap_or_else(|p| p.into_inner());
                        match g.as_mut() {
                            None => {
                                Err(Failure::store("store was closed before the save committed"))
                            }
                            Some(s) => commit(s, &job.req),
                        }
                    };
                    drop(job.req);
                    job.progress.finish(r.map(|info| Committed {
                        info,
                        stall_seconds: job.stall_seconds,
                    }));
                }
            })
            .map_err(|e| Failure::store(format!("cannot start the commit thread: {e}")))?;
        Ok(Committer { tx })
    }

    pub fn submit(&self, job: Job) -> Result<(), Failure> {
        let progress = job.progress.clone();
        self.tx.send(job).map_err(|_| {
            let f = Failure::store("the commit thread has stopped");
            progress.finish(Err(f.clone()));
            f
        })
    }
}

/// Returned by `save_async`: the snapshot is taken; the commit runs in the background.
#[pyclass(module = "ckptstore._native", frozen)]
pub struct SaveHandle {
    pub progress: Arc<Progress>,
    pub stall_seconds: f64,
    pub started: Instant,
}

#[pymethods]
impl SaveHandle {
    /// Blocks (without the GIL) until the checkpoint is durable and returns the commit
    /// summary; re-raises the save's error if it failed (every call raises it again).
    fn wait<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let p = self.progress.clone();
        match py.allow_threads(move || p.wait()) {
            Ok(c) => c.to_dict(py),
            Err(f) => Err(f.into()),
        }
    }

    /// Whether the commit has finished (successfully or not); never blocks.
    fn done(&self) -> bool {
        self.progress.is_done()
    }

    /// Seconds the caller was blocked: the snapshot copy (and waiting for an earlier save to
    /// leave the pipeline).
    #[getter]
    fn stall_seconds(&self) -> f64 {
        self.stall_seconds
    }
}
