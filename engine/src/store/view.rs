//! Zero-copy tensor views: memory-mapped segments, or cold runs read straight from the disk.
//!
//! An uncompressed tensor whose chunks lie back to back in one segment (the writer lays out a
//! tensor's new chunks as one run per segment, so this is the common case) is returned without
//! a copy: where its pages are in the page cache (or the backend has no direct reads), as a
//! slice of the segment's read-only map; where they are cold, as memory of its own that the
//! disk read them into (O_DIRECT, no bounce buffer, no page cache — see
//! [`CheckpointReader::read_run_direct`] and DECISIONS "Cold views read direct"). Anything else (chunks spread
//! over segments or frames, deduplicated chunks referenced where they already were, a backend
//! that does not map such as `MemIo`/`SimIo`) falls back to the owned read path of
//! [`CheckpointReader::tensor_with`].

use super::direct_run::{too_large, DirectRun};
use super::reader::{CheckpointReader, Route, Tensor};
use crate::dtype::DType;
use crate::error::Result;
use crate::io::{MappedFile, ViewBuf};
use ckptstore_proto::v1 as pb;
use std::ops::Range;
use std::sync::Arc;

/// A tensor's bytes: borrowed from a segment's map (zero-copy) or owned.
///
/// A view keeps its map alive by itself (it holds an `Arc`), so it may outlive the reader and
/// the store; the segment's pages stay readable even if GC unlinks the file meanwhile.
#[derive(Debug, Clone)]
pub struct TensorView {
    dtype: DType,
    shape: Vec<u64>,
    data: ViewData,
}

#[derive(Debug, Clone)]
enum ViewData {
    Mapped {
        map: Arc<MappedFile>,
        range: Range<usize>,
    },
    /// A cold run read directly into memory of its own (no CPU copy either).
    Read {
        buf: Arc<ViewBuf>,
        range: Range<usize>,
    },
    /// A cold run read ahead and copied once into memory of its own (the memory of a dropped
    /// view where one fits: `io::recycle`).
    Copied {
        buf: Arc<ViewBuf>,
        len: usize,
    },
    Owned(Vec<u8>),
}

impl TensorView {
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Shape.
    pub fn shape(&self) -> &[u64] {
        &self.shape
    }

    /// Row-major bytes, `dtype.size() × product(shape)` of them.
    pub fn data(&self) -> &[u8] {
        match &self.data {
            ViewData::Mapped { map, range } => &map.as_slice()[range.clone()],
            ViewData::Read { buf, range } => &buf.as_slice()[range.clone()],
            ViewData::Copied { buf, len } => &buf.as_slice()[..*len],
            ViewData::Owned(v) => v,
        }
    }

    /// Whether no copy of the bytes was made: they are the segment's map
    /// ([`TensorView::is_mapped`]) or the memory the disk read a cold run into directly.
    pub fn is_zero_copy(&self) -> bool {
        matches!(self.data, ViewData::Mapped { .. } | ViewData::Read { .. })
    }

    /// Whether the bytes are borrowed from a segment's memory map (its pages were in the page
    /// cache, or the view was not verified).
    pub fn is_mapped(&self) -> bool {
        matches!(self.data, ViewData::Mapped { .. })
    }

    /// A view over memory a direct read filled (`range` of `buf`).
    pub(super) fn read(
        dtype: DType,
        shape: Vec<u64>,
        buf: Arc<ViewBuf>,
        range: Range<usize>,
    ) -> Self {
        let data = ViewData::Read { buf, range };
        TensorView { dtype, shape, data }
    }

    /// A view owning its bytes.
    pub(super) fn owned(dtype: DType, shape: Vec<u64>, data: Vec<u8>) -> Self {
        let data = ViewData::Owned(data);
        TensorView { dtype, shape, data }
    }

    /// The bytes, writable, where this view is their only holder: owned bytes, or memory a
    /// direct read filled that no clone of the view shares. `None` for a segment's map
    /// (read-only, shared with the page cache) or shared memory.
    pub fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        match &mut self.data {
            ViewData::Owned(v) => Some(v),
            ViewData::Read { buf, range } => {
                Arc::get_mut(buf).map(|b| &mut b.as_mut_slice()[range.clone()])
            }
            ViewData::Copied { buf, len } => {
                Arc::get_mut(buf).map(|b| &mut b.as_mut_slice()[..*len])
            }
            ViewData::Mapped { .. } => None,
        }
    }

    /// An owned [`Tensor`] (copies the bytes of a zero-copy view).
    pub fn into_tensor(self) -> Tensor {
        let data = match self.data {
            ViewData::Owned(v) => v,
            ViewData::Mapped { map, range } => map.as_slice()[range].to_vec(),
            ViewData::Read { buf, range } => buf.as_slice()[range].to_vec(),
            ViewData::Copied { buf, len } => buf.as_slice()[..len].to_vec(),
        };
        Tensor {
            dtype: self.dtype,
            shape: self.shape,
            data,
        }
    }
}

impl AsRef<[u8]> for TensorView {
    fn as_ref(&self) -> &[u8] {
        self.data()
    }
}

impl std::ops::Deref for TensorView {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.data()
    }
}

impl CheckpointReader<'_> {
    /// A tensor's bytes without copying them where that is not slower, every chunk verified:
    /// from the segment's map when its pages are cached, read in place when cold, but a cold
    /// run of 16 MiB or more is read with its reads run ahead and copied once (faster than in
    /// place where a device splits reads into scattered pages; `is_zero_copy()` says false).
    pub fn tensor_view(&self, name: &str) -> Result<TensorView> {
        self.tensor_view_with(name, true)
    }

    /// Like [`CheckpointReader::tensor_view`]; `verify = false` skips the BLAKE3 check (a
    /// trusted fast path: the view is then returned without touching its pages).
    pub fn tensor_view_with(&self, name: &str, verify: bool) -> Result<TensorView> {
        self.view(name, verify, true)
    }

    /// Like [`CheckpointReader::tensor_view_with`], but a run that can be mapped is always
    /// served from the segment's map ([`TensorView::is_mapped`]), cold or not (verified through
    /// the page cache): for callers that need the file's pages themselves — a private
    /// copy-on-write map of the same bytes (Python's `load(mmap=True)`), paging on demand.
    pub fn tensor_map(&self, name: &str, verify: bool) -> Result<TensorView> {
        self.view(name, verify, false)
    }

    /// A view; `direct`: cold runs are read direct into memory of their own.
    fn view(&self, name: &str, verify: bool, direct: bool) -> Result<TensorView> {
        let t = self.tensor_entry(name)?;
        self.check_segments(&t.chunks)?;
        let dtype = crate::manifest::tensor_dtype(t)?;
        if let Some((map, range)) = self.mapped_run(&t.chunks)? {
            let verify = verify
                || self
                    .store
                    .always_verify(t.chunks.first().map_or(0, |c| c.segment));
            if verify
                && direct
                && super::prefetch::runs_ahead(&t.chunks)
                && !self.cached(&t.chunks)?
            {
                // Cold and large: read with the reads run ahead and copied once into memory
                // of its own, faster than in place (DECISIONS "Cold reads run ahead of the
                // hashing"); not zero-copy. The memory is a dropped view's where one fits
                // (DECISIONS "A dropped view's memory serves the next view").
                let len = usize::try_from(t.nbytes).map_err(|_| too_large(&t.name, t.nbytes))?;
                let mut buf = ViewBuf::new(len).map_err(|_| too_large(&t.name, t.nbytes))?;
                let out = &mut buf.as_mut_slice()[..len];
                self.read_chunks("tensor", &t.name, &t.chunks, out, verify)?;
                return Ok(TensorView {
                    dtype,
                    shape: t.shape.clone(),
                    data: ViewData::Copied {
                        buf: Arc::new(buf),
                        len,
                    },
                });
            }
            if verify && direct {
                if let Some((buf, range)) = self.read_run_direct(&t.name, &t.chunks)? {
                    return Ok(TensorView {
                        dtype,
                        shape: t.shape.clone(),
                        data: ViewData::Read { buf, range },
                    });
                }
            }
            if verify {
                self.verify_mapped(&t.name, &t.chunks, &map, range.start)?;
            }
            return Ok(TensorView {
                dtype,
                shape: t.shape.clone(),
                data: ViewData::Mapped { map, range },
            });
        }
        let owned = self.tensor_with(name, verify)?;
        Ok(TensorView {
            dtype: owned.dtype,
            shape: owned.shape,
            data: ViewData::Owned(owned.data),
        })
    }

    /// Whether every page of a run (see [`CheckpointReader::mapped_run`]) is in the page
    /// cache, or its backend reads no other way than through it.
    pub(super) fn cached(&self, chunks: &[pb::ChunkRef]) -> Result<bool> {
        let (Some(first), Some(last)) = (chunks.first(), chunks.last()) else {
            return Ok(true);
        };
        let file = self.store.segment_file(first.segment)?;
        Ok(file.cached(first.offset, last.offset + last.stored_len - first.offset))
    }

    /// The map and byte range of `chunks` if they are uncompressed, in one segment, back to
    /// back, and that segment's backend maps it (covering the whole range); else `None`.
    pub(super) fn mapped_run(
        &self,
        chunks: &[pb::ChunkRef],
    ) -> Result<Option<(Arc<MappedFile>, Range<usize>)>> {
        let Some(first) = chunks.first() else {
            return Ok(None);
        };
        // Sealed bytes on disk are ciphertext: an encrypted checkpoint is never mapped; its
        // tensors are decrypted into memory of their own (`is_zero_copy()` says false).
        if self.sealer.is_some() {
            return Ok(None);
        }
        let mut end = first.offset;
        for c in chunks {
            if c.segment != first.segment
                || c.offset != end
                || c.codec != pb::Codec::None as i32
                || c.stored_len != c.raw_len
            {
                return Ok(None);
            }
            end += c.stored_len;
        }
        let file = self.store.segment_file(first.segment)?;
        // A backend that cannot map right now (an mmap failure, say) still reads by pread.
        let Ok(Some(map)) = file.map() else {
            return Ok(None);
        };
        let (Ok(start), Ok(end)) = (usize::try_from(first.offset), usize::try_from(end)) else {
            return Ok(None);
        };
        if end > map.len() {
            return Ok(None);
        }
        Ok(Some((map, start..end)))
    }

    /// Verifies the run's chunks (read on every core into reused buffers and hashed there, see
    /// `CheckpointReader::verify_chunks`), which leaves their pages in the page cache for the
    /// view's map; and hints the bytes past the run (the next tensor of a load in order).
    fn verify_mapped(
        &self,
        name: &str,
        chunks: &[pb::ChunkRef],
        map: &MappedFile,
        start: usize,
    ) -> Result<()> {
        let total: usize = chunks.iter().map(|c| c.stored_len as usize).sum();
        let past = (total as u64).min(super::reader::READ_AHEAD_BYTES) as usize;
        map.will_need(start + total, past);
        self.verify_chunks("tensor", name, chunks)
    }

    /// A verified run (see [`CheckpointReader::mapped_run`]) whose bytes are not all in the
    /// page cache, read directly from the disk into one new buffer ([`DirectRun`]): `Ok(None)`
    /// where they are cached or the backend reads no other way than through the cache (the
    /// map is then as fast, and shares the cache's pages). A bad chunk is named like any
    /// other.
    fn read_run_direct(
        &self,
        name: &str,
        chunks: &[pb::ChunkRef],
    ) -> Result<Option<(Arc<ViewBuf>, Range<usize>)>> {
        let Some(mut run) = DirectRun::plan(self, name, chunks, true)? else {
            return Ok(None);
        };
        {
            let (layout, parts) = run.parts();
            self.each_chunk(chunks, parts, Route::Cold, |i, part, _scratch| {
                layout.read_part(self, i, part)
            })?;
        }
        let complete = run.check(self, |_| true)?;
        debug_assert!(complete);
        Ok(Some(run.into_buf()))
    }
}
