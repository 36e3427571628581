//! Segment compaction: the live chunks of mostly-dead segments are copied into new segments,
//! the relocation is committed with one WAL record, then the old segments are freed.
//!
//! Order, each step durable before the next (docs/GUARANTEES.md, "Compaction"):
//! 1. new segment files, each chunk's bytes checked against its BLAKE3 as it is copied, every
//!    run of contiguous chunks kept contiguous (a tensor stays one range, for zero-copy maps);
//! 2. fdatasync of each new file, fsync of `segments/`;
//! 3. a Relocate record appended to the WAL and fdatasync'ed;
//! 4. the sources, now unreferenced, unlinked — unless a reader's lease holds them.
//!
//! A crash before 3 leaves the new files as orphans (removed at the next open) and the old
//! ones live; after 3, the old ones are orphans. Either way every live chunk is readable.

use super::free::Freed;
use super::state::State;
use super::{Options, Store, SEGMENTS_DIR};
use crate::crypt::{ChunkHash, KeyId};
use crate::error::{Error, Result};
use crate::manifest;
use crate::segment::{self, SegmentWriter, SEGMENT_DATA_OFFSET};
use crate::wal::{self, RecordType};
use ckptstore_proto::v1 as pb;
use prost::Message;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Segments with a live fraction at or above this are never compacted for the amplification
/// rule alone: rewriting them would give back little for the bytes copied.
const AMPLIFICATION_RULE_MAX_FRACTION: f64 = 0.9;
/// Most chunk moves one compaction commits (keeps the Relocate record far below the WAL's
/// 64 MiB record cap: about 20 bytes a move).
const MAX_MOVES: usize = 1 << 20;

/// What a compaction would do.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CompactionPlan {
    /// Segments whose live chunks would be copied, ascending.
    pub sources: Vec<u64>,
    /// Their bytes (freed once no reader holds them).
    pub source_bytes: u64,
    /// Bytes the new segments would take.
    pub output_bytes: u64,
    /// New segment files it would write.
    pub outputs: usize,
    /// Live chunks it would move.
    pub chunks: usize,
}

/// The distinct live chunks of each segment that compaction may move, by offset: every live
/// chunk but the quarantined ones (their bytes are bad; they stay where they are, and keep
/// their segment, until a save heals them or their checkpoints are deleted).
fn live_chunks(state: &State) -> BTreeMap<u64, BTreeMap<u64, pb::ChunkRef>> {
    let mut out: BTreeMap<u64, BTreeMap<u64, pb::ChunkRef>> = BTreeMap::new();
    for m in state.checkpoints.values() {
        for c in manifest::all_chunks(m) {
            if state.quarantined.contains_key(&(c.segment, c.offset)) {
                continue;
            }
            out.entry(c.segment)
                .or_default()
                .entry(c.offset)
                .or_insert_with(|| c.clone());
        }
    }
    out
}

/// The segments that hold a live checkpoint's commit trailer: the highest id of each one's
/// `new_segments` (docs/FORMAT.md, "Commit trailer"). Compaction never picks them: freeing one
/// would free the trailer with it, and a rebuild could no longer restore that checkpoint
/// (compaction writes no trailer of its own). Every chunk of such a segment is live (its
/// checkpoint wrote them), so it was only ever a candidate when its frames hold bytes a copy
/// would not — table room reserved and not used, padding ahead of a payload: the rebuild
/// sweep lost acknowledged checkpoints that way once headers were padded (issue 13).
fn trailer_segments(state: &State) -> BTreeSet<u64> {
    state
        .checkpoints
        .values()
        .filter_map(|m| m.new_segments.iter().map(|s| s.id).max())
        .collect()
}

/// The key id of each sealed live chunk, by (segment, offset).
fn sealing_keys(state: &State) -> HashMap<(u64, u64), KeyId> {
    let mut out = HashMap::new();
    for m in state.checkpoints.values() {
        if let Some(id) = KeyId::from_slice(&m.key_id) {
            for c in manifest::all_chunks(m) {
                out.insert((c.segment, c.offset), id);
            }
        }
    }
    out
}

/// Splits chunks sorted by offset into runs that are contiguous on disk (same codec), each
/// at most one frame's worth: a run is copied as one frame and stays contiguous.
fn runs(chunks: &[pb::ChunkRef]) -> Vec<&[pb::ChunkRef]> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=chunks.len() {
        let split = i == chunks.len()
            || i - start == segment::MAX_FRAME_CHUNKS
            || chunks[i].codec != chunks[i - 1].codec
            || chunks[i].offset != chunks[i - 1].offset + chunks[i - 1].stored_len;
        if split {
            out.push(&chunks[start..i]);
            start = i;
        }
    }
    out
}

fn payload_len(run: &[pb::ChunkRef]) -> u64 {
    run.iter().map(|c| c.stored_len).sum()
}

/// Whether the copy of `run` has its header padded (segment::pads).
fn pads(run: &[pb::ChunkRef]) -> bool {
    segment::pads(run[0].codec as u8, payload_len(run))
}

/// The most bytes the copy of `run` takes (its padding depends on where it lands).
fn frame_len(run: &[pb::ChunkRef]) -> u64 {
    segment::frame_len_at_most(pads(run), run.len(), payload_len(run))
}

/// Bytes `chunks` take when copied (frames of their runs, no segment header).
fn rewritten_len(chunks: &[pb::ChunkRef]) -> u64 {
    runs(chunks).into_iter().map(frame_len).sum()
}

/// Picks the segments to compact: every one whose live content, rewritten, would take less
/// than `compact_live_fraction` of its data bytes; then, while the segments would still take
/// more than `max_space_amplification` times the live bytes, the emptiest of the rest (below
/// a live fraction of 0.9). Segments recovery found damaged are never touched, nor those in
/// `remote` (still in the bucket after a lazy restore: compacting them would download them to
/// reclaim no local space), nor those holding a live checkpoint's commit trailer
/// ([`trailer_segments`]).
pub(crate) fn plan(state: &State, opts: &Options, remote: &[u64]) -> CompactionPlan {
    let live = live_chunks(state);
    let trailers = trailer_segments(state);
    let live_bytes: u64 = live
        .values()
        .flat_map(|c| c.values())
        .map(|c| c.stored_len)
        .sum();
    let total: u64 = state.segments.values().map(|s| s.len).sum();
    let mut candidates = Vec::new();
    for (&id, seg) in &state.segments {
        let Some(chunks) = live.get(&id) else {
            continue;
        };
        if state.damaged_segments.contains(&id)
            || remote.contains(&id)
            || trailers.contains(&id)
            || seg.len <= SEGMENT_DATA_OFFSET
        {
            continue;
        }
        let chunks: Vec<pb::ChunkRef> = chunks.values().cloned().collect();
        let rewritten = rewritten_len(&chunks);
        let fraction = rewritten as f64 / (seg.len - SEGMENT_DATA_OFFSET) as f64;
        if fraction < 1.0 {
            candidates.push((fraction, id, seg.len, rewritten, chunks.len()));
        }
    }
    candidates.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut out = CompactionPlan::default();
    let mut projected = total;
    let mut copied = 0u64;
    for (fraction, id, len, rewritten, n) in candidates {
        let by_threshold = fraction < opts.compact_live_fraction;
        let by_amplification = fraction < AMPLIFICATION_RULE_MAX_FRACTION
            && projected as f64 > opts.max_space_amplification * live_bytes as f64;
        if !(by_threshold || by_amplification) || out.chunks + n > MAX_MOVES {
            continue;
        }
        out.sources.push(id);
        out.source_bytes += len;
        out.chunks += n;
        copied += rewritten;
        projected = projected - len + rewritten;
    }
    if !out.sources.is_empty() {
        // Outputs roll at segment_max_bytes; each starts with a header block.
        let room = opts
            .segment_max_bytes
            .saturating_sub(SEGMENT_DATA_OFFSET)
            .max(1);
        out.outputs = copied.div_ceil(room).max(1) as usize;
        out.output_bytes = copied + out.outputs as u64 * SEGMENT_DATA_OFFSET;
    }
    out.sources.sort_unstable();
    out
}

/// What a compaction did.
pub(crate) struct Compacted {
    pub written: Vec<u64>,
    pub bytes_written: u64,
    pub freed: Freed,
    /// Chunks that failed their BLAKE3 while being copied: left in place and quarantined.
    pub corrupt: Vec<(u64, u64)>,
}

impl Store {
    /// Runs `plan`: copy, make durable, commit the Relocate record, free the sources.
    pub(super) fn compact_segments(
        &mut self,
        plan: &CompactionPlan,
        progress: &mut impl FnMut(u64, u64),
    ) -> Result<Compacted> {
        self.check_writable()?;
        // Until the Relocate record may be on disk, dropping the writer removes the new files
        // (nothing references them; recovery would remove them too).
        let mut writer = SegmentWriter::new(self.opts.io.clone(), self.dir.join(SEGMENTS_DIR));
        let (moves, outputs, corrupt) = match self.copy_live_chunks(plan, &mut writer, progress) {
            Ok(done) => done,
            Err(e) if writer.sync_failed() => return Err(self.poison(e)),
            Err(e) => return Err(e),
        };
        if moves.is_empty() {
            // Every chunk of the plan was corrupt: no record, nothing moved, nothing written
            // (a frame begins only at a chunk that verifies). Quarantine what was found.
            self.heal()?;
            return Ok(Compacted {
                written: Vec::new(),
                bytes_written: 0,
                freed: Freed::default(),
                corrupt,
            });
        }
        let record = pb::RelocateRecord {
            new_segments: outputs.clone(),
            moves,
        };
        let payload = record.encode_to_vec();
        if payload.len() > wal::MAX_RECORD_LEN as usize {
            return Err(Error::invalid("relocation record above the WAL record cap"));
        }
        let lens: BTreeMap<u64, u64> = self
            .state
            .segments
            .iter()
            .map(|(&k, s)| (k, s.len))
            .collect();
        let appended = self
            .wal_mut()?
            .append_durable(RecordType::Relocate, &payload);
        // The record may have reached the disk even if the append failed: the new files stay
        // (recovery decides).
        writer.release();
        appended.map_err(|e| self.poison(e))?;
        let dead = match self
            .state
            .apply_relocate(&record, super::commit_record_len, "compaction")
        {
            Ok(dead) => dead,
            // Unreachable: this store built the relocation. Should it happen, the durable
            // record and the memory disagree: refuse further writes.
            Err(e) => return Err(self.poison(e)),
        };
        let dead = dead
            .into_iter()
            .map(|s| (s, lens.get(&s).copied().unwrap_or(0)));
        let freed = self.free_segments(dead);
        // The chunks found corrupt are quarantined now (their sources stay live).
        self.heal_after_durable_write();
        self.compact_after_durable_write();
        self.publish_after_durable_write()?;
        Ok(Compacted {
            written: outputs.iter().map(|o| o.id).collect(),
            bytes_written: outputs.iter().map(|o| o.length).sum(),
            freed,
            corrupt,
        })
    }

    /// Copies the plan's live chunks, checked against their BLAKE3, into new segments
    /// through `writer`, and makes them durable. A chunk that fails its check is not copied:
    /// it is noted for quarantine and stays where it is, so its segment stays live (a corrupt
    /// source is skipped, never a reason to fail the plan). Returns the moves, sorted, the new
    /// segments with their lengths, and the corrupt chunks' locations.
    #[allow(clippy::type_complexity)]
    fn copy_live_chunks(
        &mut self,
        plan: &CompactionPlan,
        writer: &mut SegmentWriter,
        progress: &mut impl FnMut(u64, u64),
    ) -> Result<(Vec<pb::ChunkMove>, Vec<pb::SegmentInfo>, Vec<(u64, u64)>)> {
        let live = live_chunks(&self.state);
        let sealed_by = sealing_keys(&self.state);
        let max = self.opts.segment_max_bytes;
        let total: u64 = plan
            .sources
            .iter()
            .filter_map(|s| live.get(s))
            .flat_map(|c| c.values())
            .map(|c| c.stored_len)
            .sum();
        let mut done = 0u64;
        let mut moves = Vec::with_capacity(plan.chunks);
        let mut corrupt = Vec::new();
        for &src in &plan.sources {
            let Some(chunks) = live.get(&src) else {
                continue;
            };
            let chunks: Vec<pb::ChunkRef> = chunks.values().cloned().collect();
            let src_file = self.segment_file(src)?;
            let src_path = self.segment_path(src);
            for run in runs(&chunks) {
                let payload = payload_len(run);
                let codec = pb::Codec::try_from(run[0].codec)
                    .map_err(|_| Error::invalid(format!("unknown codec {}", run[0].codec)))?;
                // The run is copied as one frame: into the open output if it fits there (or
                // the output is empty), else into a new one. The frame begins at the run's
                // first chunk that verifies (none: no frame).
                let fits = |at: segment::FrameAt| {
                    if at.start == SEGMENT_DATA_OFFSET || at.end(run.len(), payload) <= max {
                        run.len()
                    } else {
                        0
                    }
                };
                let mut frame = None;
                for c in run {
                    let mut buf = vec![0u8; c.stored_len as usize];
                    src_file
                        .read_at(&mut buf, c.offset)
                        .map_err(|e| Error::io("read", &src_path, e))?;
                    // The chunk id covers the raw bytes: a compressed chunk is decoded, a
                    // sealed one decrypted (a copy) to check it; the stored bytes are copied
                    // as they are (a sealed chunk keeps its nonce and tag).
                    let key = sealed_by.get(&(src, c.offset));
                    let hash = self.source_chunk_id(src, c, &buf, key)?;
                    done += c.stored_len;
                    if hash.as_slice() != c.blake3.as_slice() {
                        self.suspect(c);
                        corrupt.push((src, c.offset));
                        progress(done, total);
                        continue;
                    }
                    let f = match frame.as_mut() {
                        Some(f) => f,
                        None => frame.insert(writer.begin_run(codec, payload, fits, || {
                            self.state.allocate_segment_id()
                        })?),
                    };
                    let to = writer.write_chunk(f, &buf, c.raw_len, hash)?;
                    moves.push(pb::ChunkMove {
                        from_segment: src,
                        from_offset: c.offset,
                        to_segment: to.segment,
                        to_offset: to.offset,
                    });
                    progress(done, total);
                }
                if let Some(f) = frame {
                    writer.end_run(f)?;
                }
            }
        }
        let outputs = writer.finish()?;
        // Moves sorted by (from_segment, from_offset), as docs/FORMAT.md says.
        moves.sort_by_key(|m| (m.from_segment, m.from_offset));
        Ok((moves, outputs, corrupt))
    }
}

impl Store {
    /// The chunk id of a compaction source chunk's stored bytes (decrypted under `key` when
    /// it is sealed, then decoded); all zeros when the bytes do not authenticate or decode,
    /// so the caller reports the source corrupt. A sealed chunk whose key was not supplied is
    /// `KeyRequired` / `WrongKey`.
    fn source_chunk_id(
        &self,
        src: u64,
        c: &pb::ChunkRef,
        stored: &[u8],
        key: Option<&KeyId>,
    ) -> Result<[u8; 32]> {
        let (how, mut bytes) = match key {
            Some(id) => {
                let sealer = self.sealer_by_id(id, || {
                    format!("segment {src} of {} (compaction)", self.dir.display())
                })?;
                let mut b = stored.to_vec();
                if !sealer.open(&mut b, &c.nonce, &c.tag, &c.blake3, c.raw_len, c.codec) {
                    return Ok([0u8; 32]);
                }
                (sealer.chunk_hash(), std::borrow::Cow::Owned(b))
            }
            None => (ChunkHash::Plain, std::borrow::Cow::Borrowed(stored)),
        };
        if c.codec != pb::Codec::None as i32 {
            let mut raw = vec![0u8; c.raw_len as usize];
            if crate::codec::decode(c.codec, &bytes, &mut raw, &mut Vec::new()).is_err() {
                return Ok([0u8; 32]);
            }
            bytes = std::borrow::Cow::Owned(raw);
        }
        Ok(how.hash(&bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(offset: u64, len: u64) -> pb::ChunkRef {
        pb::ChunkRef {
            segment: 1,
            offset,
            stored_len: len,
            raw_len: len,
            codec: 0,
            blake3: vec![0; 32],
            nonce: vec![],
            tag: vec![],
        }
    }

    /// Contiguous chunks are copied as one frame (a tensor stays one range); a gap splits.
    #[test]
    fn runs_follow_contiguity() {
        let c = [chunk(4096, 10), chunk(4106, 20), chunk(8192, 5)];
        let r = runs(&c);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].len(), 2);
        assert_eq!(r[1].len(), 1);
        assert_eq!(
            rewritten_len(&c),
            segment::align_up(segment::header_len_for(2) + 30)
                + segment::align_up(segment::header_len_for(1) + 5)
        );
    }
}
