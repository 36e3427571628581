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
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::io::Storage;
use crate::manifest;
use crate::segment::{self, Run, SegmentWriter};
use ckptstore_proto::v1 as pb;
use prost::Message;
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::Path;
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

/// Writes one process's share of a checkpoint into new segment files with ids from a reserved
/// range. [`ShardWriter::finish`] makes them durable (fdatasync of each file, fsync of
/// `segments/`) and returns the fragment to commit. Dropping it unfinished removes its files.
pub struct ShardWriter {
    opts: ShardOptions,
    ids: Range<u64>,
    next_id: u64,
    /// The segment files this shard writes (removed unless `finish` hands them over).
    writer: SegmentWriter,
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
            writer: SegmentWriter::new(opts.io.clone(), seg_dir),
            opts,
            next_id: ids.start,
            ids,
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
        let new_segments = self.writer.finish()?;
        // Durable: the segments are the fragment's now (the store's commit takes them, or
        // its recovery removes them).
        self.writer.release();
        let mut m = std::mem::take(&mut self.manifest);
        m.new_segments = new_segments;
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
        let max = self.opts.segment_max_bytes;
        let total = data.len();
        let mut refs = Vec::with_capacity(total.div_ceil(cs));
        let mut run: Option<Run> = None;
        for (k, (chunk, hash)) in chunks.enumerate() {
            if let Some(r) = self.local_index.get(&hash).cloned() {
                self.writer.end(&mut run)?;
                refs.push(r);
                continue;
            }
            // A new run reserves table room for as many chunks from `k` on as fit.
            let r = self.writer.append(
                &mut run,
                pb::Codec::None,
                segment::run_bytes(total, cs, k),
                |at| segment::frame_capacity(at, max, total, cs, k),
                || next_shard_id(&mut self.next_id, &self.ids),
                chunk,
                chunk.len() as u64,
                hash,
            )?;
            self.local_index.insert(hash, r.clone());
            refs.push(r);
        }
        self.writer.end(&mut run)?;
        Ok(refs)
    }
}

/// The next id of the shard's reserved range.
fn next_shard_id(next: &mut u64, ids: &Range<u64>) -> Result<u64> {
    if *next >= ids.end {
        return Err(Error::invalid(format!(
            "the shard's reserved segment ids {ids:?} are used up; reserve a larger range"
        )));
    }
    *next += 1;
    Ok(*next - 1)
}
