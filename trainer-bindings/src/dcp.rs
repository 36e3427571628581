//! The engine side of `ckptstore.dcp` (torch.distributed.checkpoint): the coordinator's
//! writer store, which reserves segment ids for the ranks and commits their fragments as one
//! checkpoint, and `write_shard`, which a rank calls to write its tensors into new segments
//! (engine `ShardWriter`). See docs/DECISIONS.md, "Multi-process checkpoints". For a bucket
//! store (`s3://`), a rank writes into a scratch directory of its own and uploads its
//! segments (`write_shard_remote`), and `DcpRemoteView` fetches only what a rank reads.

use crate::errors::{self, Failure};
use crate::host_bytes::HostBytes;
use ckptstore_engine::remote::{is_url, SegmentObject};
use ckptstore_engine::{
    DType, MetaValue, Options, RemoteView, ShardFragment, ShardOptions, ShardWriter, Store,
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
        let store = errors::py(
            py.allow_threads(move || match p.to_str().filter(|s| is_url(s)) {
                // A cache of the state only: the coordinator never downloads the ranks' segments.
                Some(url) => ckptstore_engine::store::open_shard_writer(url, opts),
                None => Store::open(&p, opts),
            }),
        )?;
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
    /// returns. `uploaded`: `(segment id, object key, length)` of the segments ranks uploaded
    /// to a bucket store (`write_shard_remote`). Returns the checkpoint id.
    #[pyo3(signature = (step, fragments, blobs, *, epoch=0, metadata=None, uploaded=Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn commit(
        &self,
        py: Python<'_>,
        step: u64,
        fragments: Vec<Vec<u8>>,
        blobs: Vec<(String, Vec<u8>)>,
        epoch: u64,
        metadata: Option<&Bound<'_, PyDict>>,
        uploaded: Vec<(u64, String, u64)>,
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
        let remote = self.dir.to_str().is_some_and(is_url);
        let uploaded: Vec<(u64, SegmentObject)> = uploaded
            .into_iter()
            .map(|(id, key, len)| (id, SegmentObject { key, len }))
            .collect();
        self.with_store(py, move |s| {
            if !blobs.is_empty() {
                // Reserved last: the highest id, so this (local) segment takes the trailer.
                let ids = s.reserve_segment_ids(1, 16)?.remove(0);
                let o = ShardOptions {
                    chunk_size: s.options().chunk_size,
                    segment_max_bytes: s.options().segment_max_bytes,
                    io: Arc::clone(&s.options().io),
                };
                // The store's directory: for a bucket store, its cache.
                let mut w = ShardWriter::new(s.dir(), ids, o)?;
                for (name, bytes) in &blobs {
                    w.put_blob(name, bytes)?;
                }
                frags.push(w.finish()?);
            }
            let info = if remote || !uploaded.is_empty() {
                s.commit_external_remote(step, epoch, meta, &frags, &uploaded)?
            } else {
                s.commit_external(step, epoch, meta, &frags)?
            };
            Ok(info.id)
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

type ShardArgs = Vec<(String, DType, Vec<u64>, HostBytes)>;

fn shard_args(tensors: Vec<TensorArg<'_>>) -> PyResult<ShardArgs> {
    let mut ts = Vec::with_capacity(tensors.len());
    for (name, dtype, shape, src) in tensors {
        let dt = DType::from_name(&dtype).ok_or_else(|| {
            PyValueError::new_err(format!("tensor {name:?}: unknown dtype {dtype:?}"))
        })?;
        let bytes = HostBytes::from_py(&name, &src)?;
        ts.push((name, dt, shape, bytes));
    }
    Ok(ts)
}

/// Writes the shard into the store directory `dir` (its `segments/` must exist).
fn write_into(
    dir: &std::path::Path,
    ids: std::ops::Range<u64>,
    chunk_size: usize,
    segment_max_bytes: u64,
    ts: &ShardArgs,
    blobs: &[(String, Vec<u8>)],
) -> Result<ShardFragment, Failure> {
    let o = ShardOptions {
        chunk_size,
        segment_max_bytes,
        // The store's default backend (io_uring where it can be set up, else std).
        io: ckptstore_engine::io::default_storage(),
    };
    let mut w = ShardWriter::new(dir, ids, o)?;
    for (name, dt, shape, bytes) in ts {
        w.put_tensor(name, *dt, shape, bytes.as_slice())?;
    }
    for (name, bytes) in blobs {
        w.put_blob(name, bytes)?;
    }
    Ok(w.finish()?)
}

/// A raw source resized while it was read: the fragment is not handed out, so nothing of it
/// is committed (its segment files are removed with the unfinished save).
fn check_sources(py: Python<'_>, ts: &ShardArgs) -> PyResult<()> {
    for (name, _, _, bytes) in ts {
        bytes
            .check_unchanged(py)
            .map_err(|why| Failure::store(format!("tensor {name:?}: {why}")))?;
    }
    Ok(())
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
    let ts = shard_args(tensors)?;
    let out = py.allow_threads(|| {
        write_into(
            &path,
            start..end,
            chunk_size,
            segment_max_bytes,
            &ts,
            &blobs,
        )
        .map(|f| f.encode())
    })?;
    check_sources(py, &ts)?;
    Ok(PyBytes::new(py, &out))
}

/// `write_shard` for a bucket store (`url`): the shard is written into a scratch directory of
/// this host's cache, its segments uploaded as objects under a fresh token, the directory
/// removed. Returns `(fragment, [(segment id, object key, length), ...])` for the
/// coordinator's commit. Nothing names the objects until that commit; a save that never
/// commits leaves them to the next writer's sweep (after the orphan grace).
#[pyfunction]
#[pyo3(signature = (url, start, end, chunk_size, segment_max_bytes, tensors, blobs))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn write_shard_remote<'py>(
    py: Python<'py>,
    url: String,
    start: u64,
    end: u64,
    chunk_size: usize,
    segment_max_bytes: u64,
    tensors: Vec<TensorArg<'py>>,
    blobs: Vec<(String, Vec<u8>)>,
) -> PyResult<(Bound<'py, PyBytes>, Vec<(u64, String, u64)>)> {
    let ts = shard_args(tensors)?;
    let (frag, objs) = py.allow_threads(|| -> Result<_, Failure> {
        let opts = Options::default();
        let scratch = ckptstore_engine::store::shard_scratch(&url, &opts)?;
        // Removed when dropped, whatever happens (a killed process's by a later one).
        write_into(
            scratch.path(),
            start..end,
            chunk_size,
            segment_max_bytes,
            &ts,
            &blobs,
        )
        .and_then(|f| {
            let objs = ckptstore_engine::store::upload_shard(&url, scratch.path(), &f, &opts)?;
            Ok((f.encode(), objs))
        })
    })?;
    check_sources(py, &ts)?;
    let objs = objs.into_iter().map(|(id, o)| (id, o.key, o.len)).collect();
    Ok((PyBytes::new(py, &frag), objs))
}

/// A rank's partial view of a bucket store (engine `RemoteView`): the newest state in a
/// directory of this host's cache, segments fetched on demand; the directory is removed by
/// `close()` (or when collected).
#[pyclass(module = "ckptstore._native", name = "DcpRemoteView", frozen)]
pub struct DcpRemoteView {
    view: Mutex<Option<RemoteView>>,
    dir: PathBuf,
}

#[pymethods]
impl DcpRemoteView {
    #[new]
    fn new(py: Python<'_>, url: String) -> PyResult<Self> {
        let view = errors::py(py.allow_threads(|| RemoteView::open(&url, &Options::default())))?;
        Ok(DcpRemoteView {
            dir: view.dir().to_path_buf(),
            view: Mutex::new(Some(view)),
        })
    }

    /// The view's store directory (open it read-only).
    #[getter]
    fn dir(&self) -> String {
        self.dir.to_string_lossy().into_owned()
    }

    /// Downloads the segments holding the tensors and blobs `names` of checkpoint `id`;
    /// returns their ids.
    fn fetch(&self, py: Python<'_>, id: u64, names: Vec<String>) -> PyResult<Vec<u64>> {
        let view = &self.view;
        py.allow_threads(|| match lock(view).as_ref() {
            Some(v) => v.fetch(id, &names).map_err(Failure::from),
            None => Err(Failure::store("the DCP view is closed")),
        })
        .map_err(Into::into)
    }

    /// Removes the view's directory.
    fn close(&self) {
        drop(lock(&self.view).take());
    }
}
