//! A cold run of chunks read with O_DIRECT straight into memory of its own ([`ViewBuf`]): the
//! one implementation behind a cold zero-copy view ([`CheckpointReader::tensor_view`]) and a
//! load of tensors into memory of their own ([`CheckpointReader::tensors_owned`], the Python
//! torch load). DECISIONS "Cold views read direct" and "Torch loads keep the memory the disk
//! read into".
//!
//! The buffer covers the run's [`DIRECT_ALIGN`]-aligned span, laid out so that file offset `o`
//! lands at `buf + (o - span_start)`; it is cut at the aligned offset at or below each chunk's
//! start into one part per chunk. Each reading thread faults its part in (one call), reads it
//! directly into place (buffered where the file system refuses) and hashes the bytes of its
//! chunk that lie in it while they are fresh. The few bytes of a chunk that lie in the next
//! part (less than one aligned block: frames start on 64-byte boundaries) are hashed after
//! every part is in, from the buffer ([`DirectRun::finish`]): what is verified is exactly what
//! is handed out.

use super::reader::CheckpointReader;
use crate::error::{Error, Result};
use crate::io::{StorageFile, ViewBuf, DIRECT_ALIGN};
use ckptstore_proto::v1 as pb;
use std::ops::Range;
use std::sync::Arc;

/// One run planned for a direct read: its buffer and where each chunk's part lies.
pub(super) struct DirectRun<'c> {
    layout: Layout<'c>,
    buf: ViewBuf,
    /// One BLAKE3 state per chunk (`None`: not verified).
    hashers: Vec<Option<blake3::Hasher>>,
}

/// Where a [`DirectRun`]'s chunks and parts lie (shared by its reading threads).
pub(super) struct Layout<'c> {
    name: &'c str,
    chunks: &'c [pb::ChunkRef],
    file: Arc<dyn StorageFile>,
    /// Part i is `[bounds[i], bounds[i + 1])` of the file (empty for a chunk shorter than a
    /// block that starts in the same block as the next).
    bounds: Vec<u64>,
    begin: u64,
    end: u64,
}

/// A part of a [`DirectRun`], for one reading thread.
pub(super) struct Part<'r> {
    bytes: &'r mut [u8],
    hasher: Option<&'r mut blake3::Hasher>,
}

impl<'c> DirectRun<'c> {
    /// Plans a direct read of `chunks` (uncompressed, back to back in one segment: see
    /// `CheckpointReader::mapped_run`), `None` where their bytes are all in the page cache or
    /// the backend reads no other way than through it (the cache is then as fast).
    pub(super) fn plan(
        reader: &CheckpointReader<'_>,
        name: &'c str,
        chunks: &'c [pb::ChunkRef],
        verify: bool,
    ) -> Result<Option<Self>> {
        let (Some(first), Some(last)) = (chunks.first(), chunks.last()) else {
            return Ok(None);
        };
        if reader.cached(chunks)? {
            return Ok(None);
        }
        let file = reader.store.segment_file(first.segment)?;
        let (begin, end) = (first.offset, last.offset + last.stored_len);
        let a = DIRECT_ALIGN;
        let span_start = begin - begin % a;
        let span_end = end.div_ceil(a) * a;
        let mut bounds: Vec<u64> = chunks.iter().map(|c| c.offset - c.offset % a).collect();
        bounds[0] = span_start;
        bounds.push(span_end);
        let len = usize::try_from(span_end - span_start).map_err(|_| too_large(name, end))?;
        let buf = ViewBuf::new(len).map_err(|_| too_large(name, end - begin))?;
        let hash = reader.chunk_hash();
        let hashers = chunks
            .iter()
            .map(|_| verify.then(|| hash.hasher()))
            .collect();
        Ok(Some(DirectRun {
            layout: Layout {
                name,
                chunks,
                file,
                bounds,
                begin,
                end,
            },
            buf,
            hashers,
        }))
    }

    /// The layout and one part per chunk, in order, for [`Layout::read_part`].
    pub(super) fn parts(&mut self) -> (&Layout<'c>, Vec<Part<'_>>) {
        let DirectRun {
            layout,
            buf,
            hashers,
        } = self;
        let mut parts = Vec::with_capacity(layout.chunks.len());
        let mut rest = buf.as_mut_slice();
        for (w, hasher) in layout.bounds.windows(2).zip(hashers.iter_mut()) {
            let (bytes, tail) = std::mem::take(&mut rest).split_at_mut((w[1] - w[0]) as usize);
            rest = tail;
            parts.push(Part {
                bytes,
                hasher: hasher.as_mut(),
            });
        }
        (layout, parts)
    }

    /// Hashes the tails and checks, in order, every chunk read completely (`read(i)`: part
    /// `i` is in; a chunk with a tail needs part `i + 1` too): `Err` names the first mismatch
    /// (and suspects the chunk), `Ok(false)` means a chunk not read completely was reached
    /// first (a batch whose read failed further on: an earlier damaged chunk is still the
    /// one named). Call once: the BLAKE3 states are consumed.
    pub(super) fn check(
        &mut self,
        reader: &CheckpointReader<'_>,
        read: impl Fn(usize) -> bool,
    ) -> Result<bool> {
        let l = &self.layout;
        let span_start = l.bounds[0];
        let n = l.chunks.len();
        for i in 0..n {
            let c = &l.chunks[i];
            let (from, to) = (l.owned_end(i), c.offset + c.stored_len);
            let tail = to > from;
            if !read(i) || (tail && (i + 1 >= n || !read(i + 1))) {
                return Ok(false);
            }
            let Some(mut hasher) = self.hashers[i].take() else {
                continue;
            };
            if tail {
                let bytes = self.buf.as_slice();
                hasher.update(&bytes[(from - span_start) as usize..(to - span_start) as usize]);
            }
            if hasher.finalize().as_bytes()[..] != c.blake3[..] {
                // The bytes on disk are not the ones committed: quarantined by the writer's
                // next `heal` (store/quarantine.rs).
                reader.store.suspect(c);
                let why = "BLAKE3 mismatch".to_owned();
                return Err(reader.chunk_error("tensor", l.name, i, c, why));
            }
        }
        Ok(true)
    }

    /// The buffer and the run's bytes in it, once every part was read and [`DirectRun::check`]
    /// passed.
    pub(super) fn into_buf(self) -> (Arc<ViewBuf>, Range<usize>) {
        let l = &self.layout;
        let range = (l.begin - l.bounds[0]) as usize..(l.end - l.bounds[0]) as usize;
        (Arc::new(self.buf), range)
    }
}

impl Layout<'_> {
    /// Where chunk `i`'s bytes stop being in part `i` (its tail lies in part `i + 1`).
    fn owned_end(&self, i: usize) -> u64 {
        let c = &self.chunks[i];
        self.bounds[i + 1].clamp(c.offset, c.offset + c.stored_len)
    }

    /// Reads part `i` (chunk `i`'s) into place and hashes the chunk's bytes in it; called on
    /// a reading thread of `CheckpointReader::each_chunk`. A failed read names the chunk.
    pub(super) fn read_part(
        &self,
        reader: &CheckpointReader<'_>,
        i: usize,
        part: Part<'_>,
    ) -> Result<()> {
        let c = &self.chunks[i];
        let at = self.bounds[i];
        // Bytes of the file this part must hold: all of it, but for the last part only up to
        // the run's end (the file may end within the block).
        let need = (self.end.min(self.bounds[i + 1]) - at) as usize;
        let Part { bytes, hasher } = part;
        crate::io::prefault(bytes);
        let read = match self.file.read_direct(at, bytes) {
            Ok(Some(n)) if n >= need => Ok(()),
            Ok(Some(_)) => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read past the end of the file",
            )),
            Ok(None) => self.file.read_at(&mut bytes[..need], at),
            Err(e) => Err(e),
        };
        read.map_err(|e| {
            reader.chunk_error("tensor", self.name, i, c, format!("read failed: {e}"))
        })?;
        let from = (c.offset.max(at) - at) as usize;
        let to = (self.owned_end(i) - at) as usize;
        if let Some(h) = hasher {
            if to > from {
                h.update(&bytes[from..to]);
            }
        }
        Ok(())
    }
}

/// The error for a view too large to allocate.
pub(super) fn too_large(name: &str, bytes: u64) -> Error {
    Error::TooLarge {
        what: format!("view of tensor {name:?}"),
        bytes,
    }
}
