//! Write transactions: chunking, hashing, deduplication, segment writes, and the commit
//! protocol (segments fdatasync'ed and their directory entries durable, then the commit record
//! appended to the WAL and fdatasync'ed, then `commit` returns).

use super::{CheckpointInfo, Store, SEGMENTS_DIR};
use crate::codec::{Compression, Encoder};
use crate::error::{Error, Result};
use crate::io::StorageFile;
use crate::manifest::{self, DType, MetaValue};
use crate::segment::{self, ChunkEntry, FrameHeader};
use crate::wal::RecordType;
use ckptstore_proto::v1 as pb;
use prost::Message;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// A frame being filled: payloads are written as their chunks arrive; the header, with the
/// chunk table, goes to `start` when the run ends.
struct OpenFrame {
    start: u64,
    /// Bytes reserved for the header (table room for `capacity` chunks).
    header_len: u64,
    capacity: usize,
    /// Where the next payload goes.
    next: u64,
    chunks: Vec<ChunkEntry>,
    /// Codec of every chunk in the frame (a frame holds one codec; a change ends the run).
    codec: pb::Codec,
}

struct OpenSegment {
    id: u64,
    path: PathBuf,
    file: Box<dyn StorageFile>,
    end: u64,
}

/// A checkpoint being written. Dropping it without [`Transaction::commit`] aborts it: the
/// segment files it wrote are removed (and would be removed by recovery anyway).
pub struct Transaction<'s> {
    store: &'s mut Store,
    started: Instant,
    manifest: pb::Manifest,
    metadata: BTreeMap<String, MetaValue>,
    tensor_names: HashSet<String>,
    blob_names: HashSet<String>,
    segment: Option<OpenSegment>,
    /// Segments this transaction filled, with their final lengths, already fdatasync'ed.
    finished_segments: Vec<(u64, PathBuf, u64)>,
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

/// BLAKE3 of a chunk hashed on its own (nothing else running): on all cores when it is big.
fn hash_alone(chunk: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    if chunk.len() >= 1 << 20 {
        h.update_rayon(chunk);
    } else {
        h.update(chunk);
    }
    *h.finalize().as_bytes()
}

impl<'s> Transaction<'s> {
    pub(super) fn new(store: &'s mut Store, step: u64) -> Self {
        Transaction {
            store,
            started: Instant::now(),
            manifest: pb::Manifest {
                step,
                ..Default::default()
            },
            metadata: BTreeMap::new(),
            tensor_names: HashSet::new(),
            blob_names: HashSet::new(),
            segment: None,
            finished_segments: Vec::new(),
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
            let hash = hash_alone(&buf);
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

    fn fail<T>(&mut self, e: Error) -> Result<T> {
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
        let placed = if data.len() <= cs {
            let mut enc = match self.encoder.take() {
                Some(e) => Some(e),
                None => Encoder::for_compression(compression)?,
            };
            let chunks = data
                .chunks(cs)
                .map(|c| Ok(stage(c, hash_alone(c), codec, enc.as_mut())));
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
                            let hash = *blake3::hash(chunk).as_bytes();
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
        let mut refs = Vec::with_capacity(total.div_ceil(cs));
        let mut frame: Option<OpenFrame> = None;
        for (k, item) in chunks.enumerate() {
            let chunk = item?;
            let hash = chunk.hash;
            let known = self
                .local_index
                .get(&hash)
                .or_else(|| self.store.state.lookup(&hash))
                .cloned();
            if let Some(r) = known {
                if let Some(f) = frame.take() {
                    self.close_frame(f)?;
                }
                self.bytes_deduplicated += chunk.raw_len as u64;
                self.chunks_deduplicated += 1;
                refs.push(r);
                continue;
            }
            if let Some(f) =
                frame.take_if(|f| f.chunks.len() == f.capacity || f.codec != chunk.codec)
            {
                self.close_frame(f)?;
            }
            let f = match &mut frame {
                Some(f) => f,
                None => frame.insert(self.open_frame(total, cs, k, chunk.codec)?),
            };
            let r = self.write_payload(f, &chunk)?;
            self.local_index.entry(hash).or_insert_with(|| r.clone());
            refs.push(r);
        }
        if let Some(f) = frame.take() {
            self.close_frame(f)?;
        }
        Ok(refs)
    }

    /// Starts a frame for a run beginning at chunk `k`, in the open segment if the run's first
    /// chunk fits there, else in a new one. Reserves table space for as many of the chunks
    /// from `k` on as fit in the segment, since the run's length is not known yet.
    /// Payloads are budgeted at their raw length: a compressed run only ends up shorter.
    fn open_frame(
        &mut self,
        total: usize,
        cs: usize,
        k: usize,
        codec: pb::Codec,
    ) -> Result<OpenFrame> {
        let max = self.store.opts.segment_max_bytes;
        let fits = |end: u64| segment::frame_capacity(end, max, total, cs, k);
        let mut capacity = self.segment.as_ref().map_or(0, |seg| fits(seg.end));
        if capacity == 0 {
            self.finish_segment()?;
            self.open_segment()?;
            let seg = self.segment.as_ref().expect("just opened");
            // An empty segment takes at least one chunk even if it overflows the soft limit.
            capacity = fits(seg.end).max(1);
        }
        let start = self.segment.as_ref().expect("segment open").end;
        let header_len = segment::header_len_for(capacity);
        Ok(OpenFrame {
            start,
            header_len,
            capacity,
            next: start + header_len,
            chunks: Vec::new(),
            codec,
        })
    }

    /// Writes one new chunk's payload at the end of the frame's run.
    fn write_payload<C: AsRef<[u8]>>(
        &mut self,
        f: &mut OpenFrame,
        staged: &StagedChunk<C>,
    ) -> Result<pb::ChunkRef> {
        debug_assert_eq!(f.codec, staged.codec);
        let chunk = staged.bytes.as_ref();
        let hash = staged.hash;
        let raw_len = staged.raw_len as u64;
        let seg = self.segment.as_ref().expect("segment open");
        super::files::write_with_writeback(&*seg.file, &seg.path, chunk, f.next)?;
        let len = chunk.len() as u64;
        f.chunks.push(ChunkEntry {
            blake3: hash,
            stored_len: len,
            raw_len,
        });
        let r = pb::ChunkRef {
            segment: seg.id,
            offset: f.next,
            stored_len: len,
            raw_len,
            codec: staged.codec as i32,
            blake3: hash.to_vec(),
        };
        f.next += len;
        self.bytes_written += len;
        self.raw_bytes_written += raw_len;
        self.chunks_written += 1;
        Ok(r)
    }

    /// Ends a run: writes the frame header (with its chunk table) before the payloads, and the
    /// zero padding after them.
    fn close_frame(&mut self, f: OpenFrame) -> Result<()> {
        let seg = self.segment.as_mut().expect("segment open");
        let mut header = FrameHeader::new(f.codec as u8, seg.id, f.chunks);
        header.header_len = f.header_len;
        let wr = |buf: &[u8], off: u64| {
            seg.file
                .write_at(buf, off)
                .map_err(|e| Error::io("write", &seg.path, e))
        };
        wr(&header.encode(), f.start)?;
        let end = segment::align_up(f.next);
        if end > f.next {
            wr(
                &[0u8; segment::FRAME_ALIGN as usize][..(end - f.next) as usize],
                f.next,
            )?;
        }
        seg.end = end;
        Ok(())
    }

    fn open_segment(&mut self) -> Result<()> {
        let id = self.store.state.next_segment_id;
        if id == u64::MAX {
            // Only reachable through a WAL or a file name holding an id near u64::MAX.
            return Err(Error::invalid(
                "segment ids are exhausted (u64::MAX reached)",
            ));
        }
        self.store.state.next_segment_id += 1;
        let path = self
            .store
            .dir
            .join(SEGMENTS_DIR)
            .join(segment::file_name(id));
        let io = self.store.opts.io.clone();
        let file = io
            .create_new(&path)
            .map_err(|e| Error::io("create", &path, e))?;
        file.write_at(&segment::encode_header(id), 0)
            .map_err(|e| Error::io("write", &path, e))?;
        self.segment = Some(OpenSegment {
            id,
            path,
            file,
            end: segment::SEGMENT_DATA_OFFSET,
        });
        Ok(())
    }

    /// fdatasyncs the open segment and sets it aside with its final length.
    fn finish_segment(&mut self) -> Result<()> {
        if let Some(seg) = self.segment.take() {
            let synced = seg.file.sync_data();
            self.finished_segments
                .push((seg.id, seg.path.clone(), seg.end));
            if let Err(e) = synced {
                return Err(self.store.poison(Error::io("fdatasync", &seg.path, e)));
            }
        }
        Ok(())
    }

    /// Commits: fdatasync the segments written, fsync the segments directory (their entries),
    /// append the commit record to the WAL and fdatasync it. Returns only when the checkpoint
    /// is durable. An fsync failure poisons the store.
    pub fn commit(mut self) -> Result<CommitInfo> {
        self.check_usable()?;
        self.finish_segment()?;
        let io = self.store.opts.io.clone();
        if !self.finished_segments.is_empty() {
            let seg_dir = self.store.dir.join(SEGMENTS_DIR);
            if let Err(e) = io.sync_dir(&seg_dir) {
                return Err(self.store.poison(Error::io("fsync dir", &seg_dir, e)));
            }
        }
        let mut m = std::mem::take(&mut self.manifest);
        m.id = self.store.state.next_checkpoint_id;
        if m.id == u64::MAX || self.store.state.checkpoints.contains_key(&m.id) {
            // Only reachable through a WAL holding a checkpoint id near u64::MAX; the record
            // must not be written, as applying it would fail after it is durable.
            return Err(Error::invalid(format!(
                "checkpoint ids are exhausted (next id {})",
                m.id
            )));
        }
        m.wall_time_unix_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        m.metadata = std::mem::take(&mut self.metadata)
            .into_iter()
            .map(|(key, v)| pb::MetaEntry {
                key,
                value: Some(v.to_pb()),
            })
            .collect();
        m.new_segments = self
            .finished_segments
            .iter()
            .map(|(id, _, len)| pb::SegmentInfo {
                id: *id,
                length: *len,
            })
            .collect();
        let context = format!("checkpoint at step {}", m.step);
        manifest::validate(&m, &context)?;
        let payload = pb::CommitRecord {
            manifest: Some(m.clone()),
        }
        .encode_to_vec();
        if payload.len() > crate::wal::MAX_RECORD_LEN as usize {
            return Err(Error::invalid(format!(
                "manifest of {} bytes exceeds the {}-byte WAL record limit (too many tensors)",
                payload.len(),
                crate::wal::MAX_RECORD_LEN
            )));
        }
        let wal = self.store.wal.as_mut().expect("writable store has a WAL");
        let record_len = match wal.append_durable(RecordType::Commit, &payload) {
            Ok(n) => n,
            Err(e) => {
                // The record may or may not have reached the disk: keep the segments, so
                // that if it did they are there; if it did not, recovery removes them.
                self.finished_segments.clear();
                return Err(self.store.poison(e));
            }
        };
        // Durable: from here on the segments belong to the store, not to this transaction.
        self.finished_segments.clear();
        self.store
            .state
            .apply_commit(m, record_len, &context)
            .expect("a validated manifest applies");
        let info = {
            let m = self
                .store
                .state
                .checkpoints
                .values()
                .next_back()
                .expect("just committed");
            CheckpointInfo::of(m, &self.store.state)
        };
        let out = CommitInfo {
            checkpoint: info,
            bytes_written: self.bytes_written,
            raw_bytes_written: self.raw_bytes_written,
            bytes_deduplicated: self.bytes_deduplicated,
            chunks_written: self.chunks_written,
            chunks_deduplicated: self.chunks_deduplicated,
            duration: self.started.elapsed(),
        };
        self.store.compact_after_durable_write();
        Ok(out)
    }

    /// Aborts explicitly (same as dropping).
    pub fn abort(self) {}
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        // Not committed: remove what this transaction wrote. Best effort; recovery removes
        // any segment no commit record references.
        let io = self.store.opts.io.clone();
        if let Some(seg) = self.segment.take() {
            drop(seg.file);
            let _ = io.remove_file(&seg.path);
        }
        for (_, path, _) in self.finished_segments.drain(..) {
            let _ = io.remove_file(&path);
        }
    }
}
