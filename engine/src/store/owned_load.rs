//! Loading several tensors into memory of their own, in one call: the Python torch load.
//!
//! A batch of at least 16 MiB (`prefetch::runs_ahead`) is read with its reads run ahead of
//! the hashing (store/prefetch.rs), every tensor copied once out of the huge-page read
//! buffers into a new zeroed `Vec`: on the 2-core VM that read 2.15 GB in 0.84–0.97 s against
//! 1.34–1.40 s read in place, because a read into scattered 4 KiB pages is split into requests
//! a quarter the size and each thread waited for its own read (DECISIONS "Cold reads run ahead
//! of the hashing"). A smaller batch is read as follows. A tensor whose chunks are one cold uncompressed run (the common case, see
//! `CheckpointReader::mapped_run`) and at least [`DIRECT_LOAD_MIN_BYTES`] long is read with O_DIRECT
//! straight into a buffer of its own ([`DirectRun`]): the disk's DMA and BLAKE3 are the only
//! things that touch its bytes, no bounce buffer, no copy, no page-cache page. Every other
//! tensor (cached, compressed, sealed, split, small, or a backend without direct reads) is
//! read into a new zeroed `Vec` by the ordinary path (`read_chunk`: one copy from the read
//! buffer, decoding and decryption where needed). The chunks of all tensors go to one set of
//! reading threads (`each_chunk`), so the disk never drains at a tensor's end.
//! DECISIONS "Torch loads keep the memory the disk read into".

use super::direct_run::{DirectRun, Part};
use super::reader::{CheckpointReader, Route};
use super::view::TensorView;
use crate::error::{Error, Result};
use ckptstore_proto::v1 as pb;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Tensors below this many bytes are copied into a `Vec` instead of getting a direct-read
/// buffer of their own: a direct buffer is one anonymous map with up to two 4 KiB blocks of
/// alignment around the bytes, so at 1 MiB a tensor keeps at most 0.8% more memory alive
/// than its bytes, and a load makes at most one map per MiB.
pub const DIRECT_LOAD_MIN_BYTES: u64 = 1 << 20;

/// Where one tensor of the batch is read.
enum Slot<'c> {
    Direct(DirectRun<'c>),
    Owned(Vec<u8>),
}

/// One chunk's work: a direct part, or a chunk read (and copied) into its owned slice.
enum Item<'a> {
    /// (the run's layout among the batch's, the chunk's index in its run, its part)
    Part(usize, usize, Part<'a>),
    /// (its tensor's name, its index in the tensor, where its raw bytes go)
    Copy(&'a str, usize, &'a mut [u8]),
}

impl CheckpointReader<'_> {
    /// Reads the tensors `names`, each into memory of its own, in one call (see the module
    /// comment): the views returned are `is_zero_copy()` where the disk read the bytes into
    /// place, owned otherwise, never a segment's map, and their bytes are writable
    /// ([`TensorView::bytes_mut`]). Every chunk is verified unless `verify` is false; the
    /// error names the first bad chunk in the order of `names`, and nothing is returned.
    pub fn tensors_owned(&self, names: &[&str], verify: bool) -> Result<Vec<TensorView>> {
        let mut entries = Vec::with_capacity(names.len());
        for name in names {
            let t = self.tensor_entry(name)?;
            self.check_segments(&t.chunks)?;
            entries.push((t, crate::manifest::tensor_dtype(t)?));
        }
        // A batch large enough to run its reads ahead is read that way, every tensor copied
        // out of the read buffers: faster here than reading in place (module comment).
        let ahead = super::prefetch::runs_ahead(entries.iter().flat_map(|(t, _)| &t.chunks));
        let mut slots = Vec::with_capacity(entries.len());
        for (t, _) in &entries {
            let seg = t.chunks.first().map_or(0, |c| c.segment);
            let verify = verify || self.store.always_verify(seg);
            let run = if !ahead
                && t.nbytes >= DIRECT_LOAD_MIN_BYTES
                && self.mapped_run(&t.chunks)?.is_some()
            {
                DirectRun::plan(self, &t.name, &t.chunks, verify)?
            } else {
                None
            };
            slots.push(match run {
                Some(run) => Slot::Direct(run),
                None => Slot::Owned(crate::alloc::zeroed(t.nbytes, || {
                    format!("tensor {:?} of checkpoint {}", t.name, self.manifest.id)
                })?),
            });
        }
        self.read_slots(&entries, &mut slots, verify)?;
        Ok(entries
            .into_iter()
            .zip(slots)
            .map(|((t, dtype), slot)| match slot {
                Slot::Direct(run) => {
                    let (buf, range) = run.into_buf();
                    TensorView::read(dtype, t.shape.clone(), buf, range)
                }
                Slot::Owned(v) => TensorView::owned(dtype, t.shape.clone(), v),
            })
            .collect())
    }

    /// Reads every slot's chunks on one set of threads and checks the direct runs' hashes;
    /// the error is the first bad chunk's, in the batch's order.
    fn read_slots(
        &self,
        entries: &[(&pb::TensorEntry, crate::dtype::DType)],
        slots: &mut [Slot<'_>],
        verify: bool,
    ) -> Result<()> {
        let direct = slots.iter().any(|s| matches!(s, Slot::Direct(_)));
        let mut chunks: Vec<pb::ChunkRef> = Vec::new();
        // Per slot, the index of its first chunk in `chunks`.
        let mut firsts = Vec::with_capacity(slots.len());
        let mut items = Vec::new();
        let mut layouts = Vec::new();
        for ((t, _), slot) in entries.iter().zip(slots.iter_mut()) {
            firsts.push(chunks.len());
            chunks.extend(t.chunks.iter().cloned());
            match slot {
                Slot::Direct(run) => {
                    let (layout, parts) = run.parts();
                    let l = layouts.len();
                    layouts.push(layout);
                    items.extend(
                        parts
                            .into_iter()
                            .enumerate()
                            .map(|(i, p)| Item::Part(l, i, p)),
                    );
                }
                Slot::Owned(v) => items.extend(
                    super::reader::split_per_chunk(v, &t.chunks)
                        .into_iter()
                        .enumerate()
                        .map(|(i, dst)| Item::Copy(t.name.as_str(), i, dst)),
                ),
            }
        }
        let done: Vec<AtomicBool> = chunks.iter().map(|_| AtomicBool::new(false)).collect();
        let failed = AtomicUsize::new(usize::MAX);
        let each = |k: usize, item: Item<'_>, scratch: &mut super::reader::Scratch| {
            let r = match item {
                Item::Part(l, i, part) => layouts[l].read_part(self, i, part),
                Item::Copy(name, i, dst) => {
                    self.read_chunk_into_new("tensor", name, i, &chunks[k], dst, scratch, verify)
                }
            };
            match &r {
                Ok(()) => done[k].store(true, Ordering::Relaxed),
                Err(_) => {
                    failed.fetch_min(k, Ordering::Relaxed);
                }
            }
            r
        };
        let r = if direct {
            self.each_chunk(&chunks, items, Route::Cold, each)
        } else {
            self.each_chunk_ahead(&chunks, &[], items, each)
        };
        let failed = failed.load(Ordering::Relaxed);
        // The direct runs' chunks are checked after the reads (their tails lie in the next
        // part): in order, each up to the first chunk not read; a mismatch before the failed
        // read (if any) is the error.
        for ((slot, &first), (t, _)) in slots.iter_mut().zip(&firsts).zip(entries) {
            if first > failed {
                break;
            }
            if let Slot::Direct(run) = slot {
                let read = |i: usize| first + i < failed && done[first + i].load(Ordering::Relaxed);
                match run.check(self, read) {
                    Err(e) => return Err(e),
                    Ok(true) => {}
                    Ok(false) if r.is_err() => break,
                    Ok(false) => {
                        return Err(Error::invalid(format!(
                            "tensor {:?}: a chunk was not read",
                            t.name
                        )))
                    }
                }
            }
        }
        r
    }
}
