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

use super::reader::{CheckpointReader, Tensor};
use crate::dtype::DType;
use crate::error::Result;
use crate::io::{MappedFile, ViewBuf, DIRECT_ALIGN};
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

    /// An owned [`Tensor`] (copies the bytes of a zero-copy view).
    pub fn into_tensor(self) -> Tensor {
        let data = match self.data {
            ViewData::Owned(v) => v,
            ViewData::Mapped { map, range } => map.as_slice()[range].to_vec(),
            ViewData::Read { buf, range } => buf.as_slice()[range].to_vec(),
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
    /// A tensor's bytes without copying them where possible, every chunk verified.
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

    /// The map and byte range of `chunks` if they are uncompressed, in one segment, back to
    /// back, and that segment's backend maps it (covering the whole range); else `None`.
    fn mapped_run(
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
    /// page cache, read directly from the disk into one new buffer: `Ok(None)` where they are
    /// cached or the backend reads no other way than through the cache (the map is then as
    /// fast, and shares the cache's pages).
    ///
    /// The buffer covers the run's [`DIRECT_ALIGN`]-aligned span; it is cut at the aligned
    /// offset at or below each chunk's start into one part per chunk, and each reading thread
    /// (see `CheckpointReader::each_chunk`) faults in its part in one call, reads it directly
    /// into place (buffered where the file system refuses) and hashes the bytes of its chunk
    /// that lie in it while they are fresh. The few bytes of a chunk that lie in the next part
    /// (less than one aligned block) are hashed after every part is in, from the buffer: what
    /// is verified is exactly what the view returns. A bad chunk is named like any other.
    fn read_run_direct(
        &self,
        name: &str,
        chunks: &[pb::ChunkRef],
    ) -> Result<Option<(Arc<ViewBuf>, Range<usize>)>> {
        let (Some(first), Some(last)) = (chunks.first(), chunks.last()) else {
            return Ok(None);
        };
        let file = self.store.segment_file(first.segment)?;
        let (begin, end) = (first.offset, last.offset + last.stored_len);
        if file.cached(begin, end - begin) {
            return Ok(None);
        }
        let a = DIRECT_ALIGN;
        let span_start = begin - begin % a;
        let span_end = end.div_ceil(a) * a;
        // Part i: [bounds[i], bounds[i + 1]) of the file (possibly empty for a chunk shorter
        // than a block).
        let mut bounds: Vec<u64> = chunks.iter().map(|c| c.offset - c.offset % a).collect();
        bounds[0] = span_start;
        bounds.push(span_end);
        let len = usize::try_from(span_end - span_start).map_err(|_| too_large(name, end))?;
        let mut buf = ViewBuf::new(len).map_err(|_| too_large(name, end - begin))?;
        let hash = self.chunk_hash();
        let mut hashers: Vec<blake3::Hasher> = chunks.iter().map(|_| hash.hasher()).collect();
        // Where chunk i's bytes stop being in part i (its tail lies in part i + 1).
        let owned_end = |i: usize| -> u64 {
            let c = &chunks[i];
            bounds[i + 1].clamp(c.offset, c.offset + c.stored_len)
        };
        {
            let mut parts = Vec::with_capacity(chunks.len());
            let mut rest = buf.as_mut_slice();
            for i in 0..chunks.len() {
                let n = (bounds[i + 1] - bounds[i]) as usize;
                let (part, tail) = std::mem::take(&mut rest).split_at_mut(n);
                parts.push(part);
                rest = tail;
            }
            let items: Vec<_> = parts.into_iter().zip(hashers.iter_mut()).collect();
            let route = super::reader::Route::Cold;
            self.each_chunk(chunks, items, route, |i, (part, hasher), _scratch| {
                let c = &chunks[i];
                let at = bounds[i];
                // Bytes of the file this part must hold: all of it, but for the last part
                // only up to the run's end (the file may end within the block).
                let need = (end.min(bounds[i + 1]) - at) as usize;
                crate::io::prefault(part);
                let read = match file.read_direct(at, part) {
                    Ok(Some(n)) if n >= need => Ok(()),
                    Ok(Some(_)) => Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "read past the end of the file",
                    )),
                    Ok(None) => file.read_at(&mut part[..need], at),
                    Err(e) => Err(e),
                };
                read.map_err(|e| {
                    self.chunk_error("tensor", name, i, c, format!("read failed: {e}"))
                })?;
                let from = (c.offset.max(at) - at) as usize;
                let to = (owned_end(i) - at) as usize;
                if to > from {
                    hasher.update(&part[from..to]);
                }
                Ok(())
            })?;
        }
        let bytes = buf.as_slice();
        for (i, (c, mut hasher)) in chunks.iter().zip(hashers).enumerate() {
            let (from, to) = (owned_end(i), c.offset + c.stored_len);
            if to > from {
                hasher.update(&bytes[(from - span_start) as usize..(to - span_start) as usize]);
            }
            if hasher.finalize().as_bytes()[..] != c.blake3[..] {
                // The bytes on disk are not the ones committed: quarantined by the writer's
                // next `heal` (store/quarantine.rs).
                self.store.suspect(c);
                return Err(self.chunk_error("tensor", name, i, c, "BLAKE3 mismatch".into()));
            }
        }
        let range = (begin - span_start) as usize..(end - span_start) as usize;
        Ok(Some((Arc::new(buf), range)))
    }
}

/// The error for a view too large to allocate.
fn too_large(name: &str, bytes: u64) -> crate::error::Error {
    crate::error::Error::TooLarge {
        what: format!("view of tensor {name:?}"),
        bytes,
    }
}
