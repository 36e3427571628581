//! Write transactions: chunking, hashing, deduplication, segment writes, and the commit
//! protocol (segments fdatasync'ed and their directory entries durable, then the commit record
//! appended to the WAL and fdatasync'ed, then `commit` returns).

use super::{CheckpointInfo, Store, SEGMENTS_DIR};
use crate::error::{Error, Result};
use crate::io::StorageFile;
use crate::manifest::{self, DType, MetaValue};
use crate::segment::{self, ChunkEntry, FrameHeader};
use crate::wal::RecordType;
use ckptstore_proto::v1 as pb;
use prost::Message;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What a commit wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct CommitInfo {
    /// The committed checkpoint.
    pub checkpoint: CheckpointInfo,
    /// Payload bytes written to segments.
    pub bytes_written: u64,
    /// Payload bytes not written because an identical chunk was already stored.
    pub bytes_deduplicated: u64,
    /// Chunks written.
    pub chunks_written: u64,
    /// Chunks referenced instead of written.
    pub chunks_deduplicated: u64,
    /// From `begin` to the commit record being durable.
    pub duration: Duration,
}

/// Payload bytes written between two writeback hints.
const WRITEBACK_SLICE: usize = 16 << 20;

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
    bytes_deduplicated: u64,
    chunks_written: u64,
    chunks_deduplicated: u64,
    /// A failed write leaves the transaction unusable.
    failed: Option<String>,
}

fn hash_chunks(data: &[u8], chunk_size: usize) -> Vec<[u8; 32]> {
    let hash = |c: &[u8]| {
        let mut h = blake3::Hasher::new();
        if c.len() >= 256 << 10 {
            h.update_rayon(c);
        } else {
            h.update(c);
        }
        *h.finalize().as_bytes()
    };
    data.chunks(chunk_size).map(hash).collect()
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
            bytes_deduplicated: 0,
            chunks_written: 0,
            chunks_deduplicated: 0,
            failed: None,
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
        let chunks = self.write_chunks(data)?;
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

    /// Adds an opaque blob (a pickled optimizer config, a tokenizer file, ...).
    pub fn put_blob(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.check_usable()?;
        if self.blob_names.contains(name) {
            return Err(Error::invalid(format!(
                "duplicate blob name {name:?} in one checkpoint"
            )));
        }
        let chunks = self.write_chunks(data)?;
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
    /// as frames whose payloads are contiguous.
    fn write_chunks(&mut self, data: &[u8]) -> Result<Vec<pb::ChunkRef>> {
        let cs = self.store.opts.chunk_size;
        let hashes = hash_chunks(data, cs);
        let mut refs: Vec<Option<pb::ChunkRef>> = Vec::with_capacity(hashes.len());
        for (i, h) in hashes.iter().enumerate() {
            let known = self
                .local_index
                .get(h)
                .or_else(|| self.store.state.lookup(h))
                .cloned();
            let len = data[i * cs..].len().min(cs) as u64;
            if known.is_some() {
                self.bytes_deduplicated += len;
                self.chunks_deduplicated += 1;
            }
            refs.push(known);
        }
        // Write each run of consecutive new chunks as one frame (split at segment limits).
        let mut i = 0;
        while i < refs.len() {
            if refs[i].is_some() {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < refs.len() && refs[j].is_none() {
                j += 1;
            }
            let mut start = i;
            while start < j {
                let (seg_id, end) = match self.segment_with_room(data, cs, start, j) {
                    Ok(v) => v,
                    Err(e) => return self.fail(e),
                };
                let written = match self.write_frame(data, cs, &hashes, start, end, seg_id) {
                    Ok(r) => r,
                    Err(e) => return self.fail(e),
                };
                for (k, r) in (start..end).zip(written) {
                    // A chunk repeated inside this run is stored twice; later ones dedup.
                    self.local_index
                        .entry(hashes[k])
                        .or_insert_with(|| r.clone());
                    refs[k] = Some(r);
                }
                start = end;
            }
            i = j;
        }
        Ok(refs
            .into_iter()
            .map(|r| r.expect("every chunk placed"))
            .collect())
    }

    /// Makes sure a segment is open with room for at least chunk `start`; returns its id and
    /// how many of the chunks `start..limit` fit.
    fn segment_with_room(
        &mut self,
        data: &[u8],
        cs: usize,
        start: usize,
        limit: usize,
    ) -> Result<(u64, usize)> {
        let max = self.store.opts.segment_max_bytes;
        let chunk_len = |k: usize| data[k * cs..].len().min(cs) as u64;
        let frame_len = |n: usize, payload: u64| {
            segment::align_up(
                (segment::FRAME_FIXED_LEN + segment::CHUNK_ENTRY_LEN * n) as u64 + payload,
            )
        };
        let fits = |end: u64, from: usize| -> usize {
            let mut payload = 0;
            let mut k = from;
            while k < limit && end + frame_len(k + 1 - from, payload + chunk_len(k)) <= max {
                payload += chunk_len(k);
                k += 1;
            }
            k
        };
        if let Some(seg) = &self.segment {
            let k = fits(seg.end, start);
            if k > start {
                return Ok((seg.id, k));
            }
            self.finish_segment()?;
        }
        self.open_segment()?;
        let seg = self.segment.as_ref().expect("just opened");
        // An empty segment takes at least one chunk even if it overflows the soft limit.
        Ok((seg.id, fits(seg.end, start).max(start + 1)))
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

    fn write_frame(
        &mut self,
        data: &[u8],
        cs: usize,
        hashes: &[[u8; 32]],
        start: usize,
        end: usize,
        seg_id: u64,
    ) -> Result<Vec<pb::ChunkRef>> {
        let lo = start * cs;
        let hi = (end * cs).min(data.len());
        let header = FrameHeader {
            codec: 0,
            segment_id: seg_id,
            chunks: (start..end)
                .map(|k| {
                    let len = data[k * cs..].len().min(cs) as u64;
                    ChunkEntry {
                        blake3: hashes[k],
                        stored_len: len,
                        raw_len: len,
                    }
                })
                .collect(),
        };
        let seg = self.segment.as_mut().expect("segment open");
        let head = header.encode();
        let frame_start = seg.end;
        let wr = |buf: &[u8], off: u64| {
            seg.file
                .write_at(buf, off)
                .map_err(|e| Error::io("write", &seg.path, e))
        };
        wr(&head, frame_start)?;
        let payload_at = frame_start + head.len() as u64;
        // Write in slices and ask for writeback of each as soon as it is in the page cache, so
        // the disk works while later slices are copied and the commit's fdatasync finds little
        // left to do. The hint changes nothing about durability: the fdatasync still decides.
        let mut at = payload_at;
        for slice in data[lo..hi].chunks(WRITEBACK_SLICE) {
            wr(slice, at)?;
            // Only a hint: a file system that refuses it just flushes at fdatasync.
            let _ = seg.file.start_writeback(at, slice.len() as u64);
            at += slice.len() as u64;
        }
        let frame_end = segment::align_up(payload_at + (hi - lo) as u64);
        let pad = (frame_end - (payload_at + (hi - lo) as u64)) as usize;
        if pad > 0 {
            wr(
                &[0u8; segment::FRAME_ALIGN as usize][..pad],
                frame_end - pad as u64,
            )?;
        }
        seg.end = frame_end;
        let mut off = payload_at;
        let refs = header
            .chunks
            .iter()
            .map(|c| {
                let r = pb::ChunkRef {
                    segment: seg_id,
                    offset: off,
                    stored_len: c.stored_len,
                    raw_len: c.raw_len,
                    codec: pb::Codec::None as i32,
                    blake3: c.blake3.to_vec(),
                };
                off += c.stored_len;
                r
            })
            .collect();
        self.bytes_written += (hi - lo) as u64;
        self.chunks_written += (end - start) as u64;
        Ok(refs)
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
            CheckpointInfo::of(m)
        };
        let out = CommitInfo {
            checkpoint: info,
            bytes_written: self.bytes_written,
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
