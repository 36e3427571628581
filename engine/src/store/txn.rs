//! Write transactions: staging (chunking, hashing, compressing) and deduplication. New chunks
//! go to segment files through the [`SegmentWriter`]; `commit` hands the manifest to the
//! commit protocol ([`Store::commit_manifest`], in `commit.rs`).

use super::{Store, SEGMENTS_DIR};
use crate::codec::{Compression, Encoder};
use crate::crypt::ChunkHash;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::manifest::{self, CheckpointInfo, MetaValue};
use crate::segment::{self, Run, SegmentWriter};
use ckptstore_proto::v1 as pb;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

/// What a commit wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct CommitInfo {
    /// The committed checkpoint.
    pub checkpoint: CheckpointInfo,
    /// Payload bytes written to segments (as stored: compressed where a chunk was).
    pub bytes_written: u64,
    /// Raw bytes of the chunks written, before compression (equals `bytes_written` when
    /// nothing was compressed); `raw_bytes_written / bytes_written` is the ratio achieved.
    pub raw_bytes_written: u64,
    /// Payload bytes not written because an identical chunk was already stored.
    pub bytes_deduplicated: u64,
    /// Chunks written.
    pub chunks_written: u64,
    /// Chunks referenced instead of written.
    pub chunks_deduplicated: u64,
    /// From `begin` to the commit record being durable.
    pub duration: Duration,
}

/// Hashes the hashing thread may compute ahead of the writer.
const HASH_LOOKAHEAD: usize = 64;
/// Encoded chunks each compressing thread may hold ahead of the writer (they are up to 7/8
/// of a chunk each, so few).
const ENCODE_LOOKAHEAD: usize = 2;

/// A checkpoint being written. Dropping it without [`Transaction::commit`] aborts it: the
/// segment files it wrote are removed by its [`SegmentWriter`] (and would be removed by
/// recovery anyway).
pub struct Transaction<'s> {
    store: &'s mut Store,
    started: Instant,
    manifest: pb::Manifest,
    metadata: BTreeMap<String, MetaValue>,
    tensor_names: HashSet<String>,
    blob_names: HashSet<String>,
    /// The segment files this transaction writes (removed unless the commit takes them).
    writer: SegmentWriter,
    /// Chunks written by this transaction, for deduplication within it.
    local_index: HashMap<[u8; 32], pb::ChunkRef>,
    bytes_written: u64,
    raw_bytes_written: u64,
    bytes_deduplicated: u64,
    chunks_written: u64,
    chunks_deduplicated: u64,
    /// A failed write leaves the transaction unusable.
    failed: Option<String>,
    /// The encoder of single-chunk puts, made at the first one (when compression is on).
    encoder: Option<Encoder>,
}

/// What the write pipeline adds to a transaction: a tensor or a blob.
#[derive(Debug, Clone)]
pub(crate) enum StagedEntry {
    Tensor {
        name: String,
        dtype: DType,
        shape: Vec<u64>,
    },
    Blob {
        name: String,
        nbytes: u64,
    },
}

/// A chunk ready to be placed: its stored bytes (raw, or a codec's frame of them), with the
/// BLAKE3 of its raw bytes.
pub(crate) struct StagedChunk<C> {
    /// What goes to disk: the raw bytes when `codec` is `None`, else the frame.
    pub bytes: C,
    /// Length of the raw bytes.
    pub raw_len: usize,
    /// How `bytes` encode the raw bytes.
    pub codec: pb::Codec,
    /// BLAKE3 of the raw bytes.
    pub hash: [u8; 32],
}

/// A chunk's stored bytes on the synchronous path: borrowed from the caller, or a frame.
enum Stored<'a> {
    Raw(&'a [u8]),
    Encoded(Vec<u8>),
}

impl AsRef<[u8]> for Stored<'_> {
    fn as_ref(&self) -> &[u8] {
        match self {
            Stored::Raw(b) => b,
            Stored::Encoded(v) => v,
        }
    }
}

/// Encodes `raw` with `codec` if an encoder is given and it saves enough; else stores it raw.
fn stage<'a>(
    raw: &'a [u8],
    hash: [u8; 32],
    codec: pb::Codec,
    enc: Option<&mut Encoder>,
) -> StagedChunk<Stored<'a>> {
    let raw_chunk = StagedChunk {
        bytes: Stored::Raw(raw),
        raw_len: raw.len(),
        codec: pb::Codec::None,
        hash,
    };
    let Some(enc) = enc else {
        return raw_chunk;
    };
    let mut frame = Vec::new();
    match enc.encode(codec, raw, &mut frame) {
        pb::Codec::None => raw_chunk,
        used => StagedChunk {
            bytes: Stored::Encoded(frame),
            raw_len: raw.len(),
            codec: used,
            hash,
        },
    }
}

/// Chunk id (BLAKE3, keyed when sealing) of a chunk hashed on its own (nothing else
/// running): on all cores when it is big.
fn hash_alone(how: ChunkHash, chunk: &[u8]) -> [u8; 32] {
    let mut h = how.hasher();
    if chunk.len() >= 1 << 20 {
        h.update_rayon(chunk);
    } else {
        h.update(chunk);
    }
    *h.finalize().as_bytes()
}

impl<'s> Transaction<'s> {
    pub(super) fn new(store: &'s mut Store, step: u64) -> Self {
        let writer = SegmentWriter::new(store.opts.io.clone(), store.dir.join(SEGMENTS_DIR))
            .sealing(store.keys().current().cloned())
            .tapped(store.segment_tap());
        let key_id = store
            .keys()
            .current()
            .map_or(Vec::new(), |k| k.id().0.to_vec());
        Transaction {
            store,
            started: Instant::now(),
            manifest: pb::Manifest {
                step,
                key_id,
                ..Default::default()
            },
            metadata: BTreeMap::new(),
            tensor_names: HashSet::new(),
            blob_names: HashSet::new(),
            writer,
            local_index: HashMap::new(),
            bytes_written: 0,
            raw_bytes_written: 0,
            bytes_deduplicated: 0,
            chunks_written: 0,
            chunks_deduplicated: 0,
            failed: None,
            encoder: None,
        }
    }

    /// Sets the epoch (default 0).
    pub fn set_epoch(&mut self, epoch: u64) {
        self.manifest.epoch = epoch;
    }

    /// Sets a user metadata value (learning rate, RNG state, data-loader position, ...).
    pub fn set_metadata(&mut self, key: impl Into<String>, value: impl Into<MetaValue>) {
        self.metadata.insert(key.into(), value.into());
    }

    /// Adds a tensor. `data` must hold exactly `dtype.size() × product(shape)` bytes. The
    /// bytes are written to a segment now (or referenced, if identical chunks are stored).
    pub fn put_tensor(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[u64],
        data: &[u8],
    ) -> Result<()> {
        self.check_usable()?;
        if self.tensor_names.contains(name) {
            return Err(Error::invalid(format!(
                "duplicate tensor name {name:?} in one checkpoint"
            )));
        }
        let expected = manifest::tensor_nbytes(dtype, shape)
            .ok_or_else(|| Error::invalid(format!("tensor {name:?}: shape {shape:?} overflows")))?;
        if expected != data.len() as u64 {
            return Err(Error::invalid(format!(
                "tensor {name:?}: {} bytes given, {dtype} × {shape:?} needs {expected}",
                data.len()
            )));
        }
        let chunks = self.write_chunks(data, Some(dtype))?;
        self.tensor_names.insert(name.to_owned());
        self.manifest.tensors.push(pb::TensorEntry {
            name: name.to_owned(),
            dtype: dtype.to_pb() as i32,
            shape: shape.to_vec(),
            nbytes: data.len() as u64,
            chunks,
        });
        Ok(())
    }

    /// Adds a tensor whose `dtype.size() × product(shape)` bytes are read from `src`, one
    /// chunk in memory at a time (an import of a file larger than RAM). `src_path` names the
    /// source in errors. A read error, or `src` ending early, fails the transaction; bytes
    /// `src` holds beyond the tensor are not read.
    pub fn put_tensor_from(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[u64],
        src: &mut dyn Read,
        src_path: &Path,
    ) -> Result<()> {
        let nbytes = manifest::tensor_nbytes(dtype, shape)
            .ok_or_else(|| Error::invalid(format!("tensor {name:?}: shape {shape:?} overflows")))?;
        let entry = StagedEntry::Tensor {
            name: name.to_owned(),
            dtype,
            shape: shape.to_vec(),
        };
        self.put_from_reader(entry, nbytes, src, src_path)
    }

    /// Adds a blob of `nbytes` bytes read from `src`, one chunk in memory at a time (see
    /// [`Self::put_tensor_from`]).
    pub fn put_blob_from(
        &mut self,
        name: &str,
        nbytes: u64,
        src: &mut dyn Read,
        src_path: &Path,
    ) -> Result<()> {
        let entry = StagedEntry::Blob {
            name: name.to_owned(),
            nbytes,
        };
        self.put_from_reader(entry, nbytes, src, src_path)
    }

    /// Reads `nbytes` from `src` chunk by chunk, hashing each, into [`Self::put_staged`]: one
    /// chunk is alive at a time.
    fn put_from_reader(
        &mut self,
        entry: StagedEntry,
        nbytes: u64,
        src: &mut dyn Read,
        src_path: &Path,
    ) -> Result<()> {
        let cs = self.store.opts.chunk_size as u64;
        let how = self.store.keys().chunk_hash();
        let mut left = nbytes;
        let chunks = std::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            let mut buf = vec![0u8; left.min(cs) as usize];
            if let Err(e) = src.read_exact(&mut buf) {
                let e = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    std::io::Error::new(
                        e.kind(),
                        format!("the source ended within the last {left} bytes of the entry"),
                    )
                } else {
                    e
                };
                left = 0;
                return Some(Err(Error::io("read", src_path, e)));
            }
            left -= buf.len() as u64;
            let hash = hash_alone(how, &buf);
            Some(Ok(StagedChunk {
                raw_len: buf.len(),
                bytes: buf,
                codec: pb::Codec::None,
                hash,
            }))
        });
        self.put_staged(entry, chunks)
    }

    /// Adds an opaque blob (a pickled optimizer config, a tokenizer file, ...).
    pub fn put_blob(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.check_usable()?;
        if self.blob_names.contains(name) {
            return Err(Error::invalid(format!(
                "duplicate blob name {name:?} in one checkpoint"
            )));
        }
        let chunks = self.write_chunks(data, None)?;
        self.blob_names.insert(name.to_owned());
        self.manifest.blobs.push(pb::BlobEntry {
            name: name.to_owned(),
            nbytes: data.len() as u64,
            chunks,
        });
        Ok(())
    }

    fn check_usable(&self) -> Result<()> {
        if let Some(why) = &self.failed {
            return Err(Error::invalid(format!(
                "transaction failed earlier ({why}); drop it and begin a new one"
            )));
        }
        self.store.check_writable()
    }

    /// Marks the transaction failed by `e`; a failed fdatasync also poisons the store.
    fn fail<T>(&mut self, e: Error) -> Result<T> {
        let e = if self.writer.sync_failed() {
            self.store.poison(e)
        } else {
            e
        };
        self.failed = Some(e.to_string());
        Err(e)
    }

    /// Hashes `data` chunk by chunk, references stored chunks, and writes runs of new chunks
    /// as frames whose payloads are contiguous. `dtype` (`None`: a blob) picks the codec when
    /// compression is on.
    ///
    /// A tensor of several chunks is hashed (and, with compression on, compressed) on one
    /// thread per core, chunk `k` on thread `k % threads`, while this one writes, taking the
    /// results in order: hashing runs ahead of the writes, so it costs no time on the
    /// trainer's path, and a save of mostly unchanged chunks (nothing to write, only hashes to
    /// compare) runs at every core's BLAKE3 pace, not one core's (issue 13, DECISIONS.md).
    /// Payloads go out as soon as their hash is known to be new; the frame header, which lists
    /// the run's hashes, is written when the run ends. Chunks are compressed before the
    /// deduplication lookup, so an unchanged chunk costs its compression but not its write.
    fn write_chunks(&mut self, data: &[u8], dtype: Option<DType>) -> Result<Vec<pb::ChunkRef>> {
        let cs = self.store.opts.chunk_size;
        let compression = self.store.opts.compression;
        let codec = compression.codec_for(dtype);
        let how = self.store.keys().chunk_hash();
        let placed = if data.len() <= cs {
            let mut enc = match self.encoder.take() {
                Some(e) => Some(e),
                None => Encoder::for_compression(compression)?,
            };
            let chunks = data
                .chunks(cs)
                .map(|c| Ok(stage(c, hash_alone(how, c), codec, enc.as_mut())));
            let placed = self.place_chunks(data.len(), chunks);
            self.encoder = enc;
            placed
        } else {
            let threads = std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(data.len().div_ceil(cs));
            std::thread::scope(|scope| {
                let mut slots = Vec::with_capacity(threads);
                // Raw chunks are borrowed, so hashes may run far ahead; encoded ones are
                // buffers, so few.
                let lookahead = if compression == Compression::None {
                    HASH_LOOKAHEAD / threads
                } else {
                    ENCODE_LOOKAHEAD
                };
                for t in 0..threads {
                    let (tx, rx) = std::sync::mpsc::sync_channel(lookahead);
                    slots.push(rx);
                    scope.spawn(move || {
                        let mut enc = match Encoder::for_compression(compression) {
                            Ok(e) => e,
                            Err(e) => {
                                let _ = tx.send(Err(e));
                                return;
                            }
                        };
                        for chunk in data.chunks(cs).skip(t).step_by(threads) {
                            let hash = how.hash(chunk);
                            if tx
                                .send(Ok(stage(chunk, hash, codec, enc.as_mut())))
                                .is_err()
                            {
                                break; // the writer stopped on an error
                            }
                        }
                    });
                }
                let chunks = (0..data.len().div_ceil(cs)).map(|k| {
                    slots[k % threads]
                        .recv()
                        .map_err(|_| Error::invalid("a hashing thread stopped"))?
                });
                self.place_chunks(data.len(), chunks)
            })
        };
        placed.or_else(|e| self.fail(e))
    }

    /// Adds a tensor whose chunks were staged and hashed elsewhere (the write pipeline):
    /// `chunks` yields, in order, each chunk of `chunk_size` bytes (the last one shorter) with
    /// its BLAKE3. The caller has checked the name and the size against dtype × shape.
    pub(crate) fn put_staged<C: AsRef<[u8]>>(
        &mut self,
        entry: StagedEntry,
        chunks: impl Iterator<Item = Result<StagedChunk<C>>>,
    ) -> Result<()> {
        self.check_usable()?;
        let (name, nbytes) = match &entry {
            StagedEntry::Tensor { name, shape, dtype } => {
                let n = manifest::tensor_nbytes(*dtype, shape).ok_or_else(|| {
                    Error::invalid(format!("tensor {name:?}: shape {shape:?} overflows"))
                })?;
                if self.tensor_names.contains(name) {
                    return Err(Error::invalid(format!(
                        "duplicate tensor name {name:?} in one checkpoint"
                    )));
                }
                (name.clone(), n)
            }
            StagedEntry::Blob { name, nbytes } => {
                if self.blob_names.contains(name) {
                    return Err(Error::invalid(format!(
                        "duplicate blob name {name:?} in one checkpoint"
                    )));
                }
                (name.clone(), *nbytes)
            }
        };
        let cs = self.store.opts.chunk_size;
        let mut seen = 0u64;
        let mut count = 0usize;
        let total = usize::try_from(nbytes).map_err(|_| {
            Error::invalid(format!("{name:?}: {nbytes} bytes do not fit in memory"))
        })?;
        let expected = total.div_ceil(cs);
        let checked = chunks.map(|c| {
            let c = c?;
            let len = c.raw_len;
            let want = total.saturating_sub(count * cs).min(cs);
            if count >= expected || len != want {
                return Err(Error::invalid(format!(
                    "{name:?}: staged chunk {count} holds {len} bytes, expected {want}"
                )));
            }
            count += 1;
            seen += len as u64;
            Ok(c)
        });
        let placed = self.place_chunks(total, checked);
        let chunks = placed.or_else(|e| self.fail(e))?;
        if chunks.len() != expected {
            return self.fail(Error::invalid(format!(
                "{name:?}: {} of {expected} chunks staged",
                chunks.len()
            )));
        }
        debug_assert_eq!(seen, nbytes);
        match entry {
            StagedEntry::Tensor { name, shape, dtype } => {
                self.tensor_names.insert(name.clone());
                self.manifest.tensors.push(pb::TensorEntry {
                    name,
                    dtype: dtype.to_pb() as i32,
                    shape,
                    nbytes,
                    chunks,
                });
            }
            StagedEntry::Blob { name, nbytes } => {
                self.blob_names.insert(name.clone());
                self.manifest.blobs.push(pb::BlobEntry {
                    name,
                    nbytes,
                    chunks,
                });
            }
        }
        Ok(())
    }

    /// References stored chunks and writes runs of new ones as frames whose payloads are
    /// contiguous. `chunks` yields the `total` bytes in chunks of `chunk_size` with their
    /// hashes, in order.
    fn place_chunks<C: AsRef<[u8]>>(
        &mut self,
        total: usize,
        chunks: impl Iterator<Item = Result<StagedChunk<C>>>,
    ) -> Result<Vec<pb::ChunkRef>> {
        let cs = self.store.opts.chunk_size;
        let max = self.store.opts.segment_max_bytes;
        let mut refs = Vec::with_capacity(total.div_ceil(cs));
        let mut run: Option<Run> = None;
        for (k, item) in chunks.enumerate() {
            let chunk = item?;
            let hash = chunk.hash;
            let known = self
                .local_index
                .get(&hash)
                .or_else(|| self.store.state.lookup(&hash))
                .cloned();
            if let Some(r) = known {
                self.writer.end(&mut run)?;
                self.bytes_deduplicated += chunk.raw_len as u64;
                self.chunks_deduplicated += 1;
                refs.push(r);
                continue;
            }
            let stored = chunk.bytes.as_ref();
            // A new run reserves table room for as many chunks from `k` on as fit in the
            // segment, since its length is not known yet. Payloads are budgeted at their raw
            // length: a compressed run only ends up shorter.
            let r = self.writer.append(
                &mut run,
                chunk.codec,
                segment::run_bytes(total, cs, k),
                |at| segment::frame_capacity(at, max, total, cs, k),
                || self.store.state.allocate_segment_id(),
                stored,
                chunk.raw_len as u64,
                hash,
            )?;
            self.bytes_written += stored.len() as u64;
            self.raw_bytes_written += chunk.raw_len as u64;
            self.chunks_written += 1;
            self.local_index.entry(hash).or_insert_with(|| r.clone());
            refs.push(r);
        }
        self.writer.end(&mut run)?;
        Ok(refs)
    }

    /// Commits: fdatasyncs the segments written and hands the manifest to the commit
    /// protocol ([`Store::commit_manifest`]). Returns only when the checkpoint is durable. An
    /// fsync failure poisons the store.
    pub fn commit(mut self) -> Result<CommitInfo> {
        self.check_usable()?;
        let new_segments = match self.writer.sync() {
            Ok(s) => s,
            Err(e) => return Err(self.store.poison(e)),
        };
        let mut m = std::mem::take(&mut self.manifest);
        m.new_segments = new_segments;
        let metadata = std::mem::take(&mut self.metadata);
        let context = format!("checkpoint at step {}", m.step);
        // From the append on, the segments belong to the store (or to recovery, if the append
        // failed: the record may have reached the disk).
        let writer = &mut self.writer;
        let checkpoint = self
            .store
            .commit_manifest(m, metadata, &context, |_| writer.release())?;
        Ok(CommitInfo {
            checkpoint,
            bytes_written: self.bytes_written,
            raw_bytes_written: self.raw_bytes_written,
            bytes_deduplicated: self.bytes_deduplicated,
            chunks_written: self.chunks_written,
            chunks_deduplicated: self.chunks_deduplicated,
            duration: self.started.elapsed(),
        })
    }

    /// Aborts explicitly (same as dropping).
    pub fn abort(self) {}
}
