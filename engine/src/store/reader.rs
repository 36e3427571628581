//! Reading a committed checkpoint: tensors, blobs, metadata; every chunk decoded (compressed
//! chunks, see [`crate::codec`]) and verified against the BLAKE3 of its raw bytes unless the
//! caller opts out.

use super::Store;
use crate::crypt::{ChunkHash, Sealer};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::io::{ReadBuf, StorageFile};
use crate::manifest::CheckpointInfo;
use crate::manifest::{Manifest, MetaValue};
use ckptstore_proto::v1 as pb;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Below this many bytes a verified read stays on the calling thread.
const PARALLEL_READ_MIN_BYTES: u64 = 8 << 20;
/// At least this many reading threads (more where there are more cores): a direct read blocks
/// its thread on the disk, so the disk is kept busy by several reads in flight, not by the
/// kernel's read-ahead (direct reads have none).
const READ_THREADS: usize = 4;
/// Chunks up to this size get [`READ_THREADS`]; larger ones one thread per core.
const READ_THREADS_MAX_CHUNK: u64 = 64 << 20;
/// How far ahead of the chunk being read the disk is asked to read (POSIX_FADV_WILLNEED).
pub(super) const READ_AHEAD_BYTES: u64 = 64 << 20;

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
    /// The key of a sealed checkpoint (every chunk is then decrypted and checked against its
    /// keyed BLAKE3); `None` for a plain one.
    pub(super) sealer: Option<Arc<Sealer>>,
    /// The manifest index of the tensor the last single-tensor read read (`usize::MAX`:
    /// none yet): a read of the one after it is part of a sequential load, and reads the
    /// next tensor's first chunks ahead ([`CheckpointReader::next_in_order`]).
    last_tensor: AtomicUsize,
}

impl<'s> CheckpointReader<'s> {
    /// A reader of `manifest`; fails when it is sealed under a key not supplied.
    pub(super) fn new(store: &'s Store, manifest: Arc<Manifest>) -> Result<Self> {
        let sealer = store.sealer_for(&manifest)?;
        Ok(CheckpointReader {
            store,
            manifest,
            sealer,
            last_tensor: AtomicUsize::new(usize::MAX),
        })
    }

    /// Whether this checkpoint's chunks are encrypted (then no read is zero-copy).
    pub fn is_sealed(&self) -> bool {
        self.sealer.is_some()
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

    /// The entry of tensor `name` for a read into a destination of `len` bytes: refused unless
    /// `len` is exactly the tensor's byte length, and unless its segments are there.
    fn destination_entry(&self, name: &str, len: usize) -> Result<&pb::TensorEntry> {
        let t = self.tensor_entry(name)?;
        if len as u64 != t.nbytes {
            return Err(Error::invalid(format!(
                "tensor {name:?} holds {} bytes; the destination has {len}",
                t.nbytes
            )));
        }
        self.check_segments(&t.chunks)?;
        Ok(t)
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

    /// Reads a tensor into `out`, which must be exactly its byte length: the one copy a load
    /// into memory the caller owns needs (a fresh framework tensor, a reused buffer). Every
    /// chunk is verified unless `verify` is false. On an error `out` holds partial bytes.
    pub fn tensor_into(&self, name: &str, out: &mut [u8], verify: bool) -> Result<()> {
        let t = self.destination_entry(name, out.len())?;
        self.read_chunks("tensor", &t.name, &t.chunks, out, verify)
    }

    /// [`CheckpointReader::tensor_into`] for several tensors at once: `(name, out)` pairs,
    /// each `out` exactly its tensor's byte length. The chunks of all of them are read on one
    /// set of threads (see [`CheckpointReader::each_chunk`]), so the disk stays busy across
    /// tensor boundaries instead of draining at the end of every tensor, and a tensor smaller
    /// than a parallel read is not read on the calling thread alone. Every length is checked
    /// before the first byte is read; the error of a bad chunk names its tensor and index. On
    /// an error the outputs hold partial bytes.
    pub fn tensors_into(&self, outs: Vec<(&str, &mut [u8])>, verify: bool) -> Result<()> {
        let mut chunks = Vec::new();
        let mut items = Vec::new();
        for (name, out) in outs {
            let t = self.destination_entry(name, out.len())?;
            let slices = split_per_chunk(out, &t.chunks);
            chunks.extend(t.chunks.iter().cloned());
            items.extend(
                slices
                    .into_iter()
                    .enumerate()
                    .map(|(i, dst)| (t.name.as_str(), i, dst)),
            );
        }
        self.each_chunk_ahead(&chunks, &[], items, |k, (name, i, dst), scratch| {
            self.read_chunk_into_new("tensor", name, i, &chunks[k], dst, scratch, verify)
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

    /// Every tensor's and blob's chunk list, with its kind and name, in manifest order.
    fn chunk_lists(&self) -> impl Iterator<Item = (&'static str, &String, &Vec<pb::ChunkRef>)> {
        let tensors = self.manifest.tensors.iter();
        let blobs = self.manifest.blobs.iter();
        tensors
            .map(|t| ("tensor", &t.name, &t.chunks))
            .chain(blobs.map(|b| ("blob", &b.name, &b.chunks)))
    }

    /// [`CheckpointReader::verify`], skipping chunks `seen` already holds as intact and adding
    /// the ones this call finds intact. A damaged chunk is never recorded, so every checkpoint
    /// that uses it fails.
    pub fn verify_with(&self, seen: &mut VerifiedChunks) -> Result<()> {
        let items = self.chunk_lists();
        // Every chunk not yet seen, once, in order: read and hashed on every core like a
        // load's chunks (`each_chunk`); the error is the first damaged one's in that order.
        let mut todo = Vec::new();
        let mut refs = Vec::new();
        let mut keys = std::collections::HashSet::new();
        for (kind, name, chunks) in items {
            for (i, c) in chunks.iter().enumerate() {
                let key = chunk_key(c);
                if seen.0.contains(&key) || !keys.insert(key) {
                    continue;
                }
                self.check_segment(c)?;
                todo.push((kind, name.as_str(), i));
                refs.push(c.clone());
            }
        }
        let r = self.each_chunk_ahead(&refs, &[], todo, |k, (kind, name, i), scratch| {
            self.read_chunk(kind, name, i, &refs[k], None, Route::Cold, scratch, true)
        });
        // Chunks before the first damaged one were all read and found intact.
        let intact = match &r {
            Ok(()) => refs.len(),
            Err(Error::ChunkCorrupt {
                segment, offset, ..
            }) => refs
                .iter()
                .position(|c| (c.segment, c.offset) == (*segment, *offset))
                .unwrap_or(0),
            Err(_) => 0,
        };
        seen.0.extend(refs[..intact].iter().map(chunk_key));
        r
    }

    /// Reads and hashes every chunk that neither `seen` (intact) nor `bad` holds, adding each
    /// to one of them: unlike [`CheckpointReader::verify_with`] it goes on past a bad chunk
    /// (each bad one is noted for quarantine by the read itself). Returns the stored bytes
    /// read and the first error that is not about a chunk's bytes (a missing segment).
    pub(super) fn scrub_with(
        &self,
        seen: &mut VerifiedChunks,
        bad: &mut VerifiedChunks,
    ) -> (u64, Option<Error>) {
        let mut scratch = Scratch::default();
        let mut read = 0u64;
        let mut other = None;
        let items = self.chunk_lists();
        for (kind, name, chunks) in items {
            for (i, c) in chunks.iter().enumerate() {
                let key = chunk_key(c);
                if seen.0.contains(&key) || bad.0.contains(&key) {
                    continue;
                }
                if let Err(e) = self.check_segment(c) {
                    other.get_or_insert(e);
                    continue;
                }
                read += c.stored_len;
                match self.read_chunk(kind, name, i, c, None, Route::Cold, &mut scratch, true) {
                    Ok(()) => seen.0.insert(key),
                    Err(_) => bad.0.insert(key),
                };
            }
        }
        (read, other)
    }

    /// Reads `chunks` into `out` (their raw bytes, back to back), verified unless `verify` is
    /// false; see [`CheckpointReader::each_chunk`] for the threads.
    pub(super) fn read_chunks(
        &self,
        kind: &'static str,
        name: &str,
        chunks: &[pb::ChunkRef],
        out: &mut [u8],
        verify: bool,
    ) -> Result<()> {
        let slices = split_per_chunk(out, chunks);
        let next = self.next_in_order(kind, name);
        self.each_chunk_ahead(chunks, next, slices, |i, dst, scratch| {
            self.read_chunk_into_new(kind, name, i, &chunks[i], dst, scratch, verify)
        })
    }

    /// The chunks of the tensor after `name` in the manifest when this read of `name` follows
    /// a read of the tensor before it (a load of every tensor in order, one call each), so
    /// that they are read while this one finishes; else none.
    fn next_in_order(&self, kind: &str, name: &str) -> &[pb::ChunkRef] {
        let tensors = &self.manifest.tensors;
        let Some(k) = tensors
            .iter()
            .position(|t| t.name == name)
            .filter(|_| kind == "tensor")
        else {
            return &[];
        };
        let before = self.last_tensor.swap(k, Ordering::Relaxed);
        match tensors.get(k + 1) {
            Some(t) if before.wrapping_add(1) == k => &t.chunks,
            _ => &[],
        }
    }

    /// Reads chunk `index` of `name` cold into `dst`, new memory. New memory (a fresh tensor)
    /// is zeroed and mapped by the kernel at its first touch: it is faulted in a chunk at a
    /// time, in one call, by the thread that fills it, so the faulting of one chunk overlaps
    /// the disk reads of others. Not in huge pages: with `defrag=madvise` a MADV_HUGEPAGE
    /// fault compacts memory, and under memory pressure that took 22-25 s per GiB here
    /// (DECISIONS "Cold reads go direct").
    #[allow(clippy::too_many_arguments)]
    pub(super) fn read_chunk_into_new(
        &self,
        kind: &'static str,
        name: &str,
        index: usize,
        c: &pb::ChunkRef,
        dst: &mut [u8],
        scratch: &mut Scratch,
        verify: bool,
    ) -> Result<()> {
        crate::io::prefault(dst);
        self.read_chunk(
            kind,
            name,
            index,
            c,
            Some(dst),
            Route::Cold,
            scratch,
            verify,
        )
    }

    /// Reads (through the page cache: [`Route::Cache`]) and hashes `chunks` without keeping
    /// their bytes: each thread reads its chunks into
    /// one reused buffer and hashes them while they are in the CPU's cache. This is how a
    /// zero-copy view is verified: after it the pages are in the page cache, and the view maps
    /// them. Hashing through the map instead measured 1.3–2× the CPU time here (cold pages
    /// reached through 4 KiB user mappings), and on two shared cores CPU time is wall time
    /// (DECISIONS.md, "Cold loads").
    pub(super) fn verify_chunks(
        &self,
        kind: &'static str,
        name: &str,
        chunks: &[pb::ChunkRef],
    ) -> Result<()> {
        self.each_chunk(
            chunks,
            vec![(); chunks.len()],
            Route::Cache,
            |i, (), scratch| {
                self.read_chunk(kind, name, i, &chunks[i], None, Route::Cache, scratch, true)
            },
        )
    }

    /// Runs `work(i, items[i], scratch)` for every chunk: reads of several megabytes on one
    /// thread per core (at least [`READ_THREADS`]), chunk `i` on thread `i % threads`, each
    /// thread reading its chunk and hashing it while it is still in the CPU's cache — copies,
    /// the first-touch faults of new memory and BLAKE3 spread over the cores, instead of one
    /// thread reading while another hashes. The disk is kept busy by the threads' reads in
    /// flight and, for bytes read through the page cache, by [`ReadAhead`] hints. `scratch`
    /// is one reused set of buffers per thread, from the store's pool. The error is the first
    /// (lowest-index) chunk's.
    #[allow(clippy::expect_used)] // a read thread does not panic
    pub(super) fn each_chunk<T: Send>(
        &self,
        chunks: &[pb::ChunkRef],
        items: Vec<T>,
        route: Route,
        work: impl Fn(usize, T, &mut Scratch) -> Result<()> + Sync,
    ) -> Result<()> {
        let ahead = ReadAhead::new(self, chunks, route);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Each thread holds one chunk-sized buffer: extra threads only for ordinary chunks.
        let largest = chunks.iter().map(|c| c.stored_len.max(c.raw_len)).max();
        let extra = largest.unwrap_or(0) <= READ_THREADS_MAX_CHUNK;
        let threads = if extra {
            cores.max(READ_THREADS)
        } else {
            cores
        }
        .min(chunks.len());
        let total: u64 = chunks.iter().map(|c| c.raw_len).sum();
        if threads < 2 || total < PARALLEL_READ_MIN_BYTES {
            let mut scratch = self.store.read_scratch.take();
            let r = items.into_iter().enumerate().try_for_each(|(i, item)| {
                ahead.advance(i);
                work(i, item, &mut scratch)
            });
            self.store.read_scratch.give_back(scratch);
            return r;
        }
        let mut per_thread: Vec<Vec<(usize, T)>> = (0..threads).map(|_| Vec::new()).collect();
        for (i, item) in items.into_iter().enumerate() {
            per_thread[i % threads].push((i, item));
        }
        let failed = std::sync::atomic::AtomicUsize::new(usize::MAX);
        let first_err = std::thread::scope(|scope| {
            let handles: Vec<_> = per_thread
                .into_iter()
                .map(|mine| {
                    let (ahead, failed, work) = (&ahead, &failed, &work);
                    scope.spawn(move || -> Option<(usize, Error)> {
                        let pool = &self.store.read_scratch;
                        let mut scratch = pool.take();
                        let mut err = None;
                        for (i, item) in mine {
                            // A lower chunk failed: the error is that one, stop early.
                            if failed.load(Ordering::Relaxed) < i {
                                break;
                            }
                            ahead.advance(i);
                            if let Err(e) = work(i, item, &mut scratch) {
                                failed.fetch_min(i, Ordering::Relaxed);
                                err = Some((i, e));
                                break;
                            }
                        }
                        pool.give_back(scratch);
                        err
                    })
                })
                .collect();
            handles
                .into_iter()
                .filter_map(|h| h.join().expect("read thread panicked"))
                .min_by_key(|(i, _)| *i)
        });
        match first_err {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    pub(super) fn chunk_error(
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

    /// Reads chunk `index` (`c`) of `name`: its stored bytes through
    /// [`StorageFile::read_cold`] into `scratch`, decoded if compressed, hashed (unless
    /// `verify` is false) where they lie — in the reused buffer, still in the CPU's cache — and
    /// copied into `out` when there is one (a verification keeps nothing).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn read_chunk(
        &self,
        kind: &'static str,
        name: &str,
        index: usize,
        c: &pb::ChunkRef,
        out: Option<&mut [u8]>,
        route: Route,
        scratch: &mut Scratch,
        verify: bool,
    ) -> Result<()> {
        self.check_segment(c)?;
        let verify = verify || self.store.always_verify(c.segment);
        let corrupt = |reason: String| self.chunk_error(kind, name, index, c, reason);
        let file = self.store.segment_file(c.segment)?;
        let plain = c.codec == pb::Codec::None as i32;
        let len = stored_read_len(c);
        let ahead = scratch.ready.take().filter(|r| {
            (r.segment, r.offset, r.len) == (c.segment, c.offset, len) && route == Route::Cold
        });
        let stored: &mut [u8] = match (route, ahead) {
            (_, Some(r)) => Ok(&mut scratch.read.get_mut(r.at + len)[r.at..]),
            (Route::Cold, None) => file.read_cold(c.offset, len, &mut scratch.read),
            (Route::Cache, None) => {
                let buf = scratch.read.get_mut(len);
                file.read_at(buf, c.offset).map(|()| buf)
            }
        }
        .map_err(|e| corrupt(format!("read failed: {e}")))?;
        // A sealed chunk is authenticated and decrypted in place after the read (whatever
        // `verify` says: the tag check is part of decrypting).
        if let Some(s) = &self.sealer {
            if !s.open(stored, &c.nonce, &c.tag, &c.blake3, c.raw_len, c.codec) {
                // Not the bytes committed: quarantined like a BLAKE3 mismatch.
                self.store.suspect(c);
                return Err(corrupt(format!(
                    "AES-GCM authentication failed under key id {} (damaged or altered ciphertext)",
                    s.id()
                )));
            }
        }
        let hash = self.chunk_hash();
        let raw: &[u8] = if plain {
            stored
        } else {
            // A compressed chunk: its frame (shorter than the raw bytes, the manifest says
            // so) decoded into `out`, or into the scratch when only verifying; a bad frame is
            // a corrupt chunk.
            let dst = match out {
                Some(o) => o,
                None => {
                    scratch.decoded.resize(c.raw_len as usize, 0);
                    &mut scratch.decoded[..]
                }
            };
            if let Err(why) = crate::codec::decode(c.codec, stored, dst, &mut Vec::new()) {
                self.store.suspect(c);
                return Err(corrupt(why));
            }
            if verify && hash.hash(dst)[..] != c.blake3[..] {
                // The bytes on disk are not the ones committed: quarantined by the writer's
                // next `heal` (store/quarantine.rs).
                self.store.suspect(c);
                return Err(corrupt("BLAKE3 mismatch".into()));
            }
            return Ok(());
        };
        if verify && hash.hash(raw)[..] != c.blake3[..] {
            // The bytes on disk are not the ones committed: quarantined by the writer's next
            // `heal` (store/quarantine.rs).
            self.store.suspect(c);
            return Err(corrupt("BLAKE3 mismatch".into()));
        }
        if let Some(out) = out {
            out.copy_from_slice(raw);
        }
        Ok(())
    }

    /// Reads chunk `c`'s stored bytes cold into `s` for a later [`CheckpointReader::read_chunk`]
    /// of it on another thread (store/prefetch.rs). A read that fails leaves nothing ready:
    /// the later read tries again and reports the error.
    pub(super) fn read_ahead(&self, c: &pb::ChunkRef, s: &mut Scratch) {
        s.ready = None;
        let len = stored_read_len(c);
        let Ok(file) = self.store.segment_file(c.segment) else {
            return;
        };
        let Ok(bytes) = file.read_cold(c.offset, len, &mut s.read) else {
            return;
        };
        let start = bytes.as_ptr() as usize;
        let at = start - s.read.get_mut(len).as_ptr() as usize;
        s.ready = Some(Ready {
            segment: c.segment,
            offset: c.offset,
            len,
            at,
        });
    }

    /// How this checkpoint's chunk ids are computed.
    pub(super) fn chunk_hash(&self) -> ChunkHash {
        self.sealer
            .as_ref()
            .map_or(ChunkHash::Plain, |s| s.chunk_hash())
    }
}

/// How a read brings bytes in.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// The fastest way for bytes that may be cold ([`StorageFile::read_cold`]: direct where
    /// the backend can), for reads whose bytes end up in memory of their own (or nowhere).
    Cold,
    /// Through the page cache, hinted ahead, leaving the pages there: the verification of a
    /// zero-copy view, whose map then reads the same pages.
    Cache,
}

/// One reading thread's reused buffers: what it reads into (aligned for direct reads) and,
/// when verifying a compressed chunk, what it decodes into.
#[derive(Default)]
pub(super) struct Scratch {
    read: ReadBuf,
    decoded: Vec<u8>,
    /// Which chunk's bytes `read` holds, read ahead ([`CheckpointReader::read_ahead`]).
    ready: Option<Ready>,
}

/// The bytes a read of chunk `c` takes from its segment: an uncompressed chunk is its raw
/// bytes; a compressed one, its stored frame (sealed: the ciphertext of those, as long).
fn stored_read_len(c: &pb::ChunkRef) -> usize {
    let plain = c.codec == pb::Codec::None as i32;
    (if plain { c.raw_len } else { c.stored_len }) as usize
}

impl Scratch {
    /// The (segment, offset) of the chunk whose bytes this holds, read ahead.
    pub(super) fn ready_for(&self) -> Option<(u64, u64)> {
        self.ready.map(|r| (r.segment, r.offset))
    }

    /// This, holding no chunk.
    pub(super) fn unready(mut self) -> Self {
        self.ready = None;
        self
    }
}

/// A chunk's stored bytes read ahead into a [`Scratch`]: `read[at..at + len]`.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Ready {
    segment: u64,
    offset: u64,
    len: usize,
    at: usize,
}

/// A store's [`Scratch`] buffers between reads: a read's threads take one each and give it
/// back, so a load of many tensors maps its read buffers once, not once per tensor (each
/// mapping of a new buffer costs page faults: 3% of a cold load's samples before).
#[derive(Default)]
pub(super) struct ScratchPool(Mutex<Vec<Scratch>>);

impl ScratchPool {
    /// Kept at most: one per reading thread of a machine with this many cores.
    const MAX_KEPT: usize = 16;
    /// Buffers larger than this (a store with huge chunks) are freed, not kept: the pool
    /// holds at most `MAX_KEPT` × this between reads.
    const MAX_KEPT_BYTES: usize = 32 << 20;

    /// Every buffer kept (a read that runs ahead looks for the chunks an earlier one read
    /// for it).
    pub(super) fn take_all(&self) -> Vec<Scratch> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(super) fn take(&self) -> Scratch {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_default()
    }

    pub(super) fn give_back(&self, s: Scratch) {
        if s.read.capacity() + s.decoded.capacity() > Self::MAX_KEPT_BYTES {
            return;
        }
        let mut pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < Self::MAX_KEPT {
            pool.push(s);
        }
    }
}

/// Read-ahead hints for one read of `chunks`: before chunk `i` is read, every chunk that
/// starts less than [`READ_AHEAD_BYTES`] past it has been hinted (once, merged into one hint
/// per contiguous run in a segment). After the last chunk, as many bytes past the run's end as
/// the run holds (at most [`READ_AHEAD_BYTES`]) are hinted too: a load reads tensors in the
/// order they were put, which is their order in the segment, so the next tensor's bytes are
/// on their way while this one finishes. Hints change nothing a read returns.
struct ReadAhead<'r, 's> {
    reader: &'r CheckpointReader<'s>,
    chunks: &'r [pb::ChunkRef],
    /// `starts[i]`: bytes before chunk `i` in the read (stored lengths).
    starts: Vec<u64>,
    /// The next chunk to hint (`chunks.len() + 1` once the trailing hint is out too).
    next: Mutex<usize>,
    route: Route,
}

impl<'r, 's> ReadAhead<'r, 's> {
    fn new(reader: &'r CheckpointReader<'s>, chunks: &'r [pb::ChunkRef], route: Route) -> Self {
        let mut at = 0;
        let starts = chunks
            .iter()
            .map(|c| {
                let s = at;
                at += c.stored_len;
                s
            })
            .collect();
        ReadAhead {
            reader,
            chunks,
            starts,
            next: Mutex::new(0),
            route,
        }
    }

    /// Hints what lies within the window ahead of chunk `i`.
    fn advance(&self, i: usize) {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let n = self.chunks.len();
        let horizon = self.starts[i] + READ_AHEAD_BYTES;
        let mut run: Option<(u64, u64, u64)> = None; // (segment, offset, len)
        while *next < n && self.starts[*next] < horizon {
            let c = &self.chunks[*next];
            run = match run {
                Some((seg, off, len)) if seg == c.segment && off + len == c.offset => {
                    Some((seg, off, len + c.stored_len))
                }
                Some(r) => {
                    self.hint(r);
                    Some((c.segment, c.offset, c.stored_len))
                }
                None => Some((c.segment, c.offset, c.stored_len)),
            };
            *next += 1;
        }
        if let Some(r) = run {
            self.hint(r);
        }
        if *next == n {
            *next += 1;
            let last = &self.chunks[n - 1];
            let total = self.starts[n - 1] + last.stored_len;
            let past = total.min(READ_AHEAD_BYTES);
            self.hint((last.segment, last.offset + last.stored_len, past));
        }
    }

    fn hint(&self, (segment, offset, len): (u64, u64, u64)) {
        if let Ok(f) = self.reader.store.segment_file(segment) {
            let f: &dyn StorageFile = &*f;
            // Cold bytes a direct read will fetch are not wanted in the page cache: filling
            // it is the slow part of a cold read here (`StorageFile::read_cold`).
            if self.route == Route::Cache || f.cached(offset, len) {
                f.will_need(offset, len);
            }
        }
    }
}

/// `out` cut into one slice per chunk, each the chunk's raw length, in order (the chunks'
/// raw lengths add up to `out`'s length: checked by the callers).
pub(super) fn split_per_chunk<'a>(out: &'a mut [u8], chunks: &[pb::ChunkRef]) -> Vec<&'a mut [u8]> {
    let mut slices = Vec::with_capacity(chunks.len());
    let mut rest = out;
    for c in chunks {
        let (dst, tail) = std::mem::take(&mut rest).split_at_mut(c.raw_len as usize);
        slices.push(dst);
        rest = tail;
    }
    slices
}
