//! Checkpoints written by several processes: each writes its own segment files with a
//! [`ShardWriter`], in a range of segment ids the one writer (which holds the store's lock)
//! reserved for it, and hands back a [`ShardFragment`]; the writer commits every fragment as
//! one checkpoint with [`Store::commit_external`]. This is how `torch.distributed.checkpoint`
//! ranks save into one store (docs/DECISIONS.md, "Multi-process checkpoints").
//!
//! The segment and frame format, the chunking and the hashing are the ones of a
//! [`super::Transaction`]; what differs is who commits. A shard writer never touches the WAL:
//! until the commit record naming its segments is durable, they are orphans, removed by the
//! next recovery (or by [`Store::abort_external`], in `external.rs` with the commit side).

use super::SEGMENTS_DIR;
use crate::error::{Error, Result};
use crate::io::{Storage, StorageFile};
use crate::manifest::{self, DType};
use crate::segment::{self, ChunkEntry, FrameHeader};
use ckptstore_proto::v1 as pb;
use prost::Message;
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where and how a shard writes. `chunk_size` and `segment_max_bytes` should be the store's
/// (the reserving writer hands them out with the id range); the bounds are the store's.
#[derive(Debug, Clone)]
pub struct ShardOptions {
    /// Bytes per chunk (the unit of hashing). Bounds 4 KiB ..= 1 GiB.
    pub chunk_size: usize,
    /// A new segment file is started once the current one reaches this size. At least 1 MiB.
    pub segment_max_bytes: u64,
    /// The file system.
    pub io: Arc<dyn Storage>,
}

/// What one shard wrote: its tensors and blobs (names, dtypes, shapes, chunk references) and
/// the segment files it created with their synced lengths. Crosses process boundaries as
/// bytes ([`ShardFragment::encode`]: a protobuf `Manifest` holding only those fields).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShardFragment {
    pub(super) manifest: pb::Manifest,
}

impl ShardFragment {
    /// The protobuf bytes of the fragment.
    pub fn encode(&self) -> Vec<u8> {
        self.manifest.encode_to_vec()
    }

    /// Decodes [`ShardFragment::encode`]'s bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let manifest = pb::Manifest::decode(bytes)
            .map_err(|e| Error::invalid(format!("shard fragment does not decode: {e}")))?;
        Ok(ShardFragment { manifest })
    }

    /// Names of the tensors, in the order they were written.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.manifest.tensors.iter().map(|t| t.name.as_str())
    }

    /// Segment ids the shard created, with their lengths.
    pub fn segments(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.manifest.new_segments.iter().map(|s| (s.id, s.length))
    }

    /// Payload bytes the shard wrote.
    pub fn bytes(&self) -> u64 {
        manifest::logical_bytes(&self.manifest)
    }
}

struct OpenSegment {
    id: u64,
    path: PathBuf,
    file: Box<dyn StorageFile>,
    end: u64,
}

/// Writes one process's share of a checkpoint into new segment files with ids from a reserved
/// range. [`ShardWriter::finish`] makes them durable (fdatasync of each file, fsync of
/// `segments/`) and returns the fragment to commit. Dropping it unfinished removes its files.
pub struct ShardWriter {
    opts: ShardOptions,
    seg_dir: PathBuf,
    ids: Range<u64>,
    next_id: u64,
    segment: Option<OpenSegment>,
    finished: Vec<(u64, PathBuf, u64)>,
    manifest: pb::Manifest,
    tensor_names: HashSet<String>,
    blob_names: HashSet<String>,
    local_index: HashMap<[u8; 32], pb::ChunkRef>,
    failed: Option<String>,
}

impl ShardWriter {
    /// A shard writer for the store in `dir` (which must exist: the reserving writer created
    /// it), creating segments with ids in `ids` only.
    pub fn new(dir: impl AsRef<Path>, ids: Range<u64>, opts: ShardOptions) -> Result<Self> {
        if !(4096..=1 << 30).contains(&opts.chunk_size) {
            return Err(Error::invalid(format!(
                "chunk_size {} outside 4096..=1073741824",
                opts.chunk_size
            )));
        }
        if opts.segment_max_bytes < 1 << 20 {
            return Err(Error::invalid(format!(
                "segment_max_bytes {} below 1 MiB",
                opts.segment_max_bytes
            )));
        }
        if ids.is_empty() || ids.start == 0 {
            return Err(Error::invalid(format!(
                "empty or invalid segment id range {ids:?}"
            )));
        }
        let seg_dir = dir.as_ref().join(SEGMENTS_DIR);
        match opts.io.exists(&seg_dir) {
            Ok(true) => {}
            Ok(false) => {
                return Err(Error::invalid(format!(
                    "{} is not a store (no {SEGMENTS_DIR}/): the coordinator opens it first",
                    dir.as_ref().display()
                )))
            }
            Err(e) => return Err(Error::io("stat", &seg_dir, e)),
        }
        Ok(ShardWriter {
            opts,
            seg_dir,
            next_id: ids.start,
            ids,
            segment: None,
            finished: Vec::new(),
            manifest: pb::Manifest::default(),
            tensor_names: HashSet::new(),
            blob_names: HashSet::new(),
            local_index: HashMap::new(),
            failed: None,
        })
    }

    /// Adds a tensor: `data` holds `dtype.size() × product(shape)` bytes, written now.
    pub fn put_tensor(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[u64],
        data: &[u8],
    ) -> Result<()> {
        self.check_usable()?;
        if !self.tensor_names.insert(name.to_owned()) {
            return Err(Error::invalid(format!(
                "duplicate tensor name {name:?} in one shard"
            )));
        }
        let expected = manifest::tensor_nbytes(dtype, shape)
            .ok_or_else(|| Error::invalid(format!("tensor {name:?}: shape {shape:?} overflows")))?;
        if expected != data.len() as u64 {
            self.tensor_names.remove(name);
            return Err(Error::invalid(format!(
                "tensor {name:?}: {} bytes given, {dtype} × {shape:?} needs {expected}",
                data.len()
            )));
        }
        let chunks = self.write_chunks(data)?;
        self.manifest.tensors.push(pb::TensorEntry {
            name: name.to_owned(),
            dtype: dtype.to_pb() as i32,
            shape: shape.to_vec(),
            nbytes: data.len() as u64,
            chunks,
        });
        Ok(())
    }

    /// Adds an opaque blob.
    pub fn put_blob(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.check_usable()?;
        if !self.blob_names.insert(name.to_owned()) {
            return Err(Error::invalid(format!(
                "duplicate blob name {name:?} in one shard"
            )));
        }
        let chunks = self.write_chunks(data)?;
        self.manifest.blobs.push(pb::BlobEntry {
            name: name.to_owned(),
            nbytes: data.len() as u64,
            chunks,
        });
        Ok(())
    }

    /// fdatasyncs every segment written, fsyncs `segments/` (their directory entries), and
    /// returns the fragment. Nothing is committed: that is the store writer's
    /// [`Store::commit_external`].
    pub fn finish(mut self) -> Result<ShardFragment> {
        self.check_usable()?;
        self.finish_segment()?;
        if !self.finished.is_empty() {
            self.opts
                .io
                .sync_dir(&self.seg_dir)
                .map_err(|e| Error::io("fsync dir", &self.seg_dir, e))?;
        }
        let mut m = std::mem::take(&mut self.manifest);
        m.new_segments = self
            .finished
            .drain(..)
            .map(|(id, _, length)| pb::SegmentInfo { id, length })
            .collect();
        Ok(ShardFragment { manifest: m })
    }

    fn check_usable(&self) -> Result<()> {
        match &self.failed {
            Some(why) => Err(Error::invalid(format!(
                "shard writer failed earlier ({why}); drop it"
            ))),
            None => Ok(()),
        }
    }

    fn write_chunks(&mut self, data: &[u8]) -> Result<Vec<pb::ChunkRef>> {
        let r = self.place_chunks(data);
        if let Err(e) = &r {
            self.failed = Some(e.to_string());
        }
        r
    }

    /// Hashes each chunk (on a second thread, ahead of the writes, for multi-chunk data),
    /// references chunks this shard already wrote, and writes runs of new chunks as frames.
    fn place_chunks(&mut self, data: &[u8]) -> Result<Vec<pb::ChunkRef>> {
        let cs = self.opts.chunk_size;
        if data.is_empty() {
            return Ok(Vec::new());
        }
        if data.len() <= cs {
            let h = *blake3::hash(data).as_bytes();
            return self.place(data, std::iter::once((data, h)));
        }
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel(64);
            scope.spawn(move || {
                for chunk in data.chunks(cs) {
                    if tx.send(*blake3::hash(chunk).as_bytes()).is_err() {
                        break;
                    }
                }
            });
            self.place(data, data.chunks(cs).zip(rx))
        })
    }

    fn place<'a>(
        &mut self,
        data: &[u8],
        chunks: impl Iterator<Item = (&'a [u8], [u8; 32])>,
    ) -> Result<Vec<pb::ChunkRef>> {
        let cs = self.opts.chunk_size;
        let total = data.len();
        let mut refs = Vec::with_capacity(total.div_ceil(cs));
        let mut frame: Option<Frame> = None;
        for (k, (chunk, hash)) in chunks.enumerate() {
            if let Some(r) = self.local_index.get(&hash).cloned() {
                if let Some(f) = frame.take() {
                    self.close_frame(f)?;
                }
                refs.push(r);
                continue;
            }
            if let Some(f) = frame.take_if(|f| f.chunks.len() == f.capacity) {
                self.close_frame(f)?;
            }
            let f = match &mut frame {
                Some(f) => f,
                None => frame.insert(self.open_frame(total, cs, k)?),
            };
            let r = self.write_payload(f, chunk, hash)?;
            self.local_index.insert(hash, r.clone());
            refs.push(r);
        }
        if let Some(f) = frame.take() {
            self.close_frame(f)?;
        }
        Ok(refs)
    }

    /// A frame for the run starting at chunk `k`, in the open segment if its first chunk fits,
    /// else in a new segment; table room for as many chunks as fit.
    fn open_frame(&mut self, total: usize, cs: usize, k: usize) -> Result<Frame> {
        let max = self.opts.segment_max_bytes;
        let fits = |end: u64| segment::frame_capacity(end, max, total, cs, k);
        let mut capacity = self.segment.as_ref().map_or(0, |s| fits(s.end));
        if capacity == 0 {
            self.finish_segment()?;
            self.open_segment()?;
            capacity = fits(segment::SEGMENT_DATA_OFFSET).max(1);
        }
        let start = self.segment.as_ref().expect("segment open").end;
        let header_len = segment::header_len_for(capacity);
        Ok(Frame {
            start,
            header_len,
            capacity,
            next: start + header_len,
            chunks: Vec::new(),
        })
    }

    fn write_payload(
        &mut self,
        f: &mut Frame,
        chunk: &[u8],
        hash: [u8; 32],
    ) -> Result<pb::ChunkRef> {
        let seg = self.segment.as_ref().expect("segment open");
        // The writeback hints change nothing about durability; the fdatasync in `finish` decides.
        super::files::write_with_writeback(&*seg.file, &seg.path, chunk, f.next)?;
        let len = chunk.len() as u64;
        f.chunks.push(ChunkEntry {
            blake3: hash,
            stored_len: len,
            raw_len: len,
        });
        let r = pb::ChunkRef {
            segment: seg.id,
            offset: f.next,
            stored_len: len,
            raw_len: len,
            codec: pb::Codec::None as i32,
            blake3: hash.to_vec(),
        };
        f.next += len;
        Ok(r)
    }

    fn close_frame(&mut self, f: Frame) -> Result<()> {
        let seg = self.segment.as_mut().expect("segment open");
        let mut header = FrameHeader::new(0, seg.id, f.chunks);
        header.header_len = f.header_len;
        seg.file
            .write_at(&header.encode(), f.start)
            .map_err(|e| Error::io("write", &seg.path, e))?;
        let end = segment::align_up(f.next);
        if end > f.next {
            seg.file
                .write_at(
                    &[0u8; segment::FRAME_ALIGN as usize][..(end - f.next) as usize],
                    f.next,
                )
                .map_err(|e| Error::io("write", &seg.path, e))?;
        }
        seg.end = end;
        Ok(())
    }

    fn open_segment(&mut self) -> Result<()> {
        if self.next_id >= self.ids.end {
            return Err(Error::invalid(format!(
                "the shard's reserved segment ids {:?} are used up; reserve a larger range",
                self.ids
            )));
        }
        let id = self.next_id;
        self.next_id += 1;
        let path = self.seg_dir.join(segment::file_name(id));
        let file = self
            .opts
            .io
            .create_new(&path)
            .map_err(|e| Error::io("create", &path, e))?;
        // Registered before the first write, so that a failed write still removes the file.
        self.segment = Some(OpenSegment {
            id,
            path: path.clone(),
            file,
            end: segment::SEGMENT_DATA_OFFSET,
        });
        let seg = self.segment.as_ref().expect("just set");
        seg.file
            .write_at(&segment::encode_header(id), 0)
            .map_err(|e| Error::io("write", &path, e))
    }

    fn finish_segment(&mut self) -> Result<()> {
        if let Some(seg) = self.segment.take() {
            let synced = seg.file.sync_data();
            self.finished.push((seg.id, seg.path.clone(), seg.end));
            synced.map_err(|e| Error::io("fdatasync", &seg.path, e))?;
        }
        Ok(())
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        // Not finished: remove what this shard wrote (best effort; recovery removes orphans).
        if let Some(seg) = self.segment.take() {
            drop(seg.file);
            let _ = self.opts.io.remove_file(&seg.path);
        }
        for (_, path, _) in self.finished.drain(..) {
            let _ = self.opts.io.remove_file(&path);
        }
    }
}

/// A frame being filled (see the transaction's `OpenFrame`).
struct Frame {
    start: u64,
    header_len: u64,
    capacity: usize,
    next: u64,
    chunks: Vec<ChunkEntry>,
}
