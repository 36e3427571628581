//! The engine side of `ckptstore.dcp` (torch.distributed.checkpoint): the coordinator's
//! writer store, which reserves segment ids for the ranks and commits their fragments as one
//! checkpoint, and `write_shard`, which a rank calls to write its tensors into new segments
//! (engine `ShardWriter`). See docs/DECISIONS.md, "Multi-process checkpoints".

use crate::errors::{self, Failure};
use crate::host_bytes::HostBytes;
use ckptstore_engine::{
    DType, MetaValue, Options, ShardFragment, ShardOptions, ShardWriter, Store,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyFloat, PyInt, PyString};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

type TensorArg<'py> = (String, String, Vec<u64>, Bound<'py, PyAny>);

/// The coordinator's store: opened as the writer (holding the lock) for one DCP save.
#[pyclass(module = "ckptstore._native", name = "DcpCoordinator", frozen)]
pub struct DcpCoordinator {
    dir: PathBuf,
    store: Mutex<Option<Store>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DcpCoordinator {
    fn with_store<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Store) -> Result<T, Failure> + Send,
    ) -> PyResult<T> {
        let (store, dir) = (&self.store, &self.dir);
        py.allow_threads(|| match lock(store).as_mut() {
            Some(s) => f(s),
            None => Err(Failure::store(format!(
                "the DCP coordinator of {} is closed",
                dir.display()
            ))),
        })
        .map_err(Into::into)
    }
}

fn meta_value(key: &str, v: &Bound<'_, PyAny>) -> PyResult<MetaValue> {
    if v.is_instance_of::<PyInt>() {
        Ok(MetaValue::Int(v.extract()?))
    } else if v.is_instance_of::<PyFloat>() {
        Ok(MetaValue::Float(v.extract()?))
    } else if v.is_instance_of::<PyString>() {
        Ok(MetaValue::Str(v.extract()?))
    } else if v.is_instance_of::<PyBytes>() {
        Ok(MetaValue::Bytes(v.extract()?))
    } else {
        Err(PyTypeError::new_err(format!(
            "metadata {key:?}: not int, float, str or bytes"
        )))
    }
}

#[pymethods]
impl DcpCoordinator {
    /// Opens (creating if needed) the store in `path` as its writer and runs recovery.
    #[new]
    #[pyo3(signature = (path, *, chunk_size=None, segment_max_bytes=None))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        chunk_size: Option<usize>,
        segment_max_bytes: Option<u64>,
    ) -> PyResult<Self> {
        let mut opts = Options::default();
        if let Some(c) = chunk_size {
            opts.chunk_size = c;
        }
        if let Some(s) = segment_max_bytes {
            opts.segment_max_bytes = s;
        }
        let p = path.clone();
        let store = errors::py(py.allow_threads(move || Store::open(&p, opts)))?;
        Ok(DcpCoordinator {
            dir: path,
            store: Mutex::new(Some(store)),
        })
    }

    /// `(chunk_size, segment_max_bytes)` the ranks must write with.
    fn options(&self, py: Python<'_>) -> PyResult<(usize, u64)> {
        self.with_store(py, |s| {
            Ok((s.options().chunk_size, s.options().segment_max_bytes))
        })
    }

    /// The newest checkpoint's step, or None.
    fn latest_step(&self, py: Python<'_>) -> PyResult<Option<u64>> {
        self.with_store(py, |s| Ok(s.latest().map(|c| c.step)))
    }

    /// Reserves `count` disjoint ranges of `per_range` segment ids: `[(start, end), ...]`.
    fn reserve(&self, py: Python<'_>, count: usize, per_range: u64) -> PyResult<Vec<(u64, u64)>> {
        self.with_store(py, |s| {
            Ok(s.reserve_segment_ids(count, per_range)?
                .into_iter()
                .map(|r| (r.start, r.end))
                .collect())
        })
    }

    /// Writes `blobs` (the coordinator's own: DCP's metadata) into a reserved range, then
    /// commits them with the ranks' `fragments` as one checkpoint at `step`; durable when it
    /// returns. Returns the checkpoint id.
    #[pyo3(signature = (step, fragments, blobs, *, epoch=0, metadata=None))]
    fn commit(
        &self,
        py: Python<'_>,
        step: u64,
        fragments: Vec<Vec<u8>>,
        blobs: Vec<(String, Vec<u8>)>,
        epoch: u64,
        metadata: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<u64> {
        let mut meta = BTreeMap::new();
        if let Some(m) = metadata {
            for (k, v) in m.iter() {
                let key: String = k
                    .extract()
                    .map_err(|_| PyTypeError::new_err("metadata keys must be str"))?;
                let val = meta_value(&key, &v)?;
                meta.insert(key, val);
            }
        }
        let frags = fragments
            .iter()
            .map(|b| ShardFragment::decode(b))
            .collect::<Result<Vec<_>, _>>();
        let mut frags = errors::py(frags)?;
        let dir = self.dir.clone();
        self.with_store(py, move |s| {
            if !blobs.is_empty() {
                let ids = s.reserve_segment_ids(1, 16)?.remove(0);
                let o = ShardOptions {
                    chunk_size: s.options().chunk_size,
                    segment_max_bytes: s.options().segment_max_bytes,
                    io: Arc::clone(&s.options().io),
                };
                let mut w = ShardWriter::new(&dir, ids, o)?;
                for (name, bytes) in &blobs {
                    w.put_blob(name, bytes)?;
                }
                frags.push(w.finish()?);
            }
            Ok(s.commit_external(step, epoch, meta, &frags)?.id)
        })
    }

    /// Removes what ranks wrote into reservations no commit took; returns the file count.
    fn abort(&self, py: Python<'_>) -> PyResult<usize> {
        self.with_store(py, |s| Ok(s.abort_external()?.len()))
    }

    /// Aborts what was not committed and releases the store and its writer lock.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let store = &self.store;
        py.allow_threads(|| {
            let taken = lock(store).take();
            match taken {
                Some(mut s) => s.abort_external().map(drop).map_err(Failure::from),
                None => Ok(()),
            }
        })
        .map_err(Into::into)
    }

    #[getter]
    fn closed(&self) -> bool {
        lock(&self.store).is_none()
    }
}

/// Writes one rank's tensors and blobs into new segment files with ids in `[start, end)` of
/// the store in `path` (fdatasync'ed, directory fsync'ed) and returns the fragment to commit
/// (bytes). `tensors`: `(name, dtype, shape, source)` as for `Store.save`. The GIL is
/// released while writing. On error nothing it wrote stays behind.
#[pyfunction]
#[pyo3(signature = (path, start, end, chunk_size, segment_max_bytes, tensors, blobs))]
#[allow(clippy::too_many_arguments)]
pub fn write_shard<'py>(
    py: Python<'py>,
    path: PathBuf,
    start: u64,
    end: u64,
    chunk_size: usize,
    segment_max_bytes: u64,
    tensors: Vec<TensorArg<'py>>,
    blobs: Vec<(String, Vec<u8>)>,
) -> PyResult<Bound<'py, PyBytes>> {
    let mut ts = Vec::with_capacity(tensors.len());
    for (name, dtype, shape, src) in tensors {
        let dt = DType::from_name(&dtype).ok_or_else(|| {
            PyValueError::new_err(format!("tensor {name:?}: unknown dtype {dtype:?}"))
        })?;
        let bytes = HostBytes::from_py(&name, &src)?;
        ts.push((name, dt, shape, bytes));
    }
    let out = py.allow_threads(|| -> Result<Vec<u8>, Failure> {
        let o = ShardOptions {
            chunk_size,
            segment_max_bytes,
            // The store's default backend (io_uring where it can be set up, else std).
            io: ckptstore_engine::io::default_storage(),
        };
        let mut w = ShardWriter::new(&path, start..end, o)?;
        for (name, dt, shape, bytes) in &ts {
            w.put_tensor(name, *dt, shape, bytes.as_slice())?;
        }
        for (name, bytes) in &blobs {
            w.put_blob(name, bytes)?;
        }
        Ok(w.finish()?.encode())
    })?;
    // A raw source resized while it was read: the fragment is not handed out, so nothing of
    // it is committed (its segment files are removed with the unfinished save).
    for (name, _, _, bytes) in &ts {
        bytes
            .check_unchanged(py)
            .map_err(|why| Failure::store(format!("tensor {name:?}: {why}")))?;
    }
    Ok(PyBytes::new(py, &out))
}
