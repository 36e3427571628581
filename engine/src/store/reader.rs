//! Reading a committed checkpoint: tensors, blobs, metadata; every chunk decoded (compressed
//! chunks, see [`crate::codec`]) and verified against the BLAKE3 of its raw bytes unless the
//! caller opts out.

use super::Store;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::manifest::CheckpointInfo;
use crate::manifest::{Manifest, MetaValue};
use ckptstore_proto::v1 as pb;
use std::collections::BTreeMap;
use std::sync::Arc;

/// A tensor read back from a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tensor {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
    /// Row-major bytes, `dtype.size() × product(shape)` of them.
    pub data: Vec<u8>,
}

/// Chunks found intact during one verification pass over several checkpoints: a chunk shared
/// by deduplication is read and hashed once, not once per checkpoint. Keyed by the whole
/// reference — location, length and BLAKE3 — not the location alone: segments are never
/// rewritten, but a damaged WAL could hold two manifests that claim different bytes at one
/// offset, and each claim must be checked on its own.
#[derive(Debug, Default)]
pub struct VerifiedChunks(std::collections::HashSet<(u64, u64, u64, [u8; 32])>);

fn chunk_key(c: &pb::ChunkRef) -> (u64, u64, u64, [u8; 32]) {
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&c.blake3); // validated 32 bytes
    (c.segment, c.offset, c.stored_len, hash)
}

/// A committed checkpoint, open for reading.
pub struct CheckpointReader<'s> {
    pub(super) store: &'s Store,
    pub(super) manifest: Arc<Manifest>,
}

impl<'s> CheckpointReader<'s> {
    pub(super) fn new(store: &'s Store, manifest: Arc<Manifest>) -> Self {
        CheckpointReader { store, manifest }
    }

    /// Summary: id, step, epoch, time, counts, metadata.
    pub fn info(&self) -> CheckpointInfo {
        self.store.state.info(&self.manifest)
    }

    /// User metadata.
    pub fn metadata(&self) -> BTreeMap<String, MetaValue> {
        self.info().metadata
    }

    /// The raw manifest (for inspection tools).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Tensor names, in the order they were put.
    pub fn tensor_names(&self) -> Vec<&str> {
        self.manifest
            .tensors
            .iter()
            .map(|t| t.name.as_str())
            .collect()
    }

    /// Blob names, in the order they were put.
    pub fn blob_names(&self) -> Vec<&str> {
        self.manifest
            .blobs
            .iter()
            .map(|b| b.name.as_str())
            .collect()
    }

    pub(super) fn tensor_entry(&self, name: &str) -> Result<&pb::TensorEntry> {
        self.manifest
            .tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| {
                let names = self.manifest.tensors.iter().map(|t| t.name.as_str());
                super::suggest::not_found("tensor", name, self.manifest.id, names)
            })
    }

    /// Dtype and shape of a tensor, without reading it.
    pub fn tensor_meta(&self, name: &str) -> Result<(DType, Vec<u64>)> {
        let t = self.tensor_entry(name)?;
        Ok((crate::manifest::tensor_dtype(t)?, t.shape.clone()))
    }

    /// Reads a tensor, verifying every chunk.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        self.tensor_with(name, true)
    }

    /// Reads a tensor; `verify = false` skips the BLAKE3 check (a trusted fast path).
    pub fn tensor_with(&self, name: &str, verify: bool) -> Result<Tensor> {
        let t = self.tensor_entry(name)?;
        self.check_segments(&t.chunks)?;
        let mut data = crate::alloc::zeroed(t.nbytes, || {
            format!("tensor {:?} of checkpoint {}", t.name, self.manifest.id)
        })?;
        self.read_chunks("tensor", &t.name, &t.chunks, &mut data, verify)?;
        Ok(Tensor {
            dtype: crate::manifest::tensor_dtype(t)?,
            shape: t.shape.clone(),
            data,
        })
    }

    /// Reads a blob, verifying every chunk.
    pub fn blob(&self, name: &str) -> Result<Vec<u8>> {
        let b = self
            .manifest
            .blobs
            .iter()
            .find(|b| b.name == name)
            .ok_or_else(|| {
                let names = self.manifest.blobs.iter().map(|b| b.name.as_str());
                super::suggest::not_found("blob", name, self.manifest.id, names)
            })?;
        self.check_segments(&b.chunks)?;
        let mut data = crate::alloc::zeroed(b.nbytes, || {
            format!("blob {:?} of checkpoint {}", b.name, self.manifest.id)
        })?;
        self.read_chunks("blob", &b.name, &b.chunks, &mut data, true)?;
        Ok(data)
    }

    /// Reads and hashes every chunk; the error names the first bad tensor/blob and chunk.
    pub fn verify(&self) -> Result<()> {
        self.verify_with(&mut VerifiedChunks::default())
    }

    /// [`CheckpointReader::verify`], skipping chunks `seen` already holds as intact and adding
    /// the ones this call finds intact. A damaged chunk is never recorded, so every checkpoint
    /// that uses it fails.
    pub fn verify_with(&self, seen: &mut VerifiedChunks) -> Result<()> {
        let mut buf = Vec::new();
        let items = self
            .manifest
            .tensors
            .iter()
            .map(|t| ("tensor", &t.name, &t.chunks))
            .chain(
                self.manifest
                    .blobs
                    .iter()
                    .map(|b| ("blob", &b.name, &b.chunks)),
            );
        for (kind, name, chunks) in items {
            for (i, c) in chunks.iter().enumerate() {
                if seen.0.contains(&chunk_key(c)) {
                    continue;
                }
                self.check_segment(c)?;
                buf.resize(c.raw_len as usize, 0);
                self.read_chunk(kind, name, i, c, &mut buf, true)?;
                seen.0.insert(chunk_key(c));
            }
        }
        Ok(())
    }

    #[allow(clippy::expect_used)] // the hashing thread does not panic
    fn read_chunks(
        &self,
        kind: &'static str,
        name: &str,
        chunks: &[pb::ChunkRef],
        out: &mut [u8],
        verify: bool,
    ) -> Result<()> {
        if !verify || chunks.len() < 2 {
            let mut at = 0usize;
            for (i, c) in chunks.iter().enumerate() {
                let len = c.raw_len as usize;
                self.read_chunk(kind, name, i, c, &mut out[at..at + len], verify)?;
                at += len;
            }
            return Ok(());
        }
        // Hash on a second thread while this one reads the next chunk: a cold load then costs
        // the disk's time, not the disk's plus BLAKE3's.
        let bad = std::thread::scope(|scope| -> Result<Option<usize>> {
            let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, &[u8])>(4);
            let hasher = scope.spawn(move || {
                rx.into_iter()
                    .find(|&(i, bytes)| blake3::hash(bytes).as_bytes()[..] != chunks[i].blake3[..])
                    .map(|(i, _)| i)
            });
            let mut rest: &mut [u8] = out;
            for (i, c) in chunks.iter().enumerate() {
                let (dst, tail) = std::mem::take(&mut rest).split_at_mut(c.raw_len as usize);
                rest = tail;
                self.read_chunk(kind, name, i, c, dst, false)?;
                let dst: &[u8] = dst;
                if tx.send((i, dst)).is_err() {
                    break; // the hasher stopped at a mismatch
                }
            }
            drop(tx);
            Ok(hasher.join().expect("hashing thread does not panic"))
        })?;
        match bad {
            Some(i) => Err(self.chunk_error(kind, name, i, &chunks[i], "BLAKE3 mismatch".into())),
            None => Ok(()),
        }
    }

    fn chunk_error(
        &self,
        kind: &'static str,
        name: &str,
        index: usize,
        c: &pb::ChunkRef,
        reason: String,
    ) -> Error {
        Error::ChunkCorrupt {
            checkpoint: self.manifest.id,
            kind,
            name: name.to_owned(),
            chunk: index,
            segment: c.segment,
            offset: c.offset,
            reason,
        }
    }

    /// Fails with `SegmentMissing` if any chunk lies in a segment recovery found missing or
    /// short. Called before allocating the output, so a manifest naming bytes that are not on
    /// disk never turns into a huge allocation.
    pub(super) fn check_segments(&self, chunks: &[pb::ChunkRef]) -> Result<()> {
        chunks.iter().try_for_each(|c| self.check_segment(c))
    }

    fn check_segment(&self, c: &pb::ChunkRef) -> Result<()> {
        match self.store.segment_damage(c.segment, self.manifest.id) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn read_chunk(
        &self,
        kind: &'static str,
        name: &str,
        index: usize,
        c: &pb::ChunkRef,
        out: &mut [u8],
        verify: bool,
    ) -> Result<()> {
        self.check_segment(c)?;
        let corrupt = |reason: String| self.chunk_error(kind, name, index, c, reason);
        let file = self.store.segment_file(c.segment)?;
        if c.codec == pb::Codec::None as i32 {
            file.read_at(out, c.offset)
                .map_err(|e| corrupt(format!("read failed: {e}")))?;
        } else {
            // A compressed chunk: its frame (shorter than `out`, the manifest says so) is
            // read whole, then decoded into `out`; a bad frame is a corrupt chunk.
            let mut stored = vec![0u8; c.stored_len as usize];
            file.read_at(&mut stored, c.offset)
                .map_err(|e| corrupt(format!("read failed: {e}")))?;
            crate::codec::decode(c.codec, &stored, out, &mut Vec::new()).map_err(corrupt)?;
        }
        if verify && blake3::hash(out).as_bytes()[..] != c.blake3[..] {
            return Err(corrupt("BLAKE3 mismatch".into()));
        }
        Ok(())
    }
}
