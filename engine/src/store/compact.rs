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

use super::gc::Freed;
use super::state::State;
use super::{Options, Store, SEGMENTS_DIR};
use crate::error::{Error, Result};
use crate::io::StorageFile;
use crate::manifest;
use crate::segment::{self, ChunkEntry, FrameHeader, SEGMENT_DATA_OFFSET};
use crate::wal::{self, RecordType};
use ckptstore_proto::v1 as pb;
use prost::Message;
use std::collections::BTreeMap;
use std::path::PathBuf;

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

/// The distinct live chunks of each segment, by offset.
fn live_chunks(state: &State) -> BTreeMap<u64, BTreeMap<u64, pb::ChunkRef>> {
    let mut out: BTreeMap<u64, BTreeMap<u64, pb::ChunkRef>> = BTreeMap::new();
    for m in state.checkpoints.values() {
        for c in manifest::all_chunks(m) {
            out.entry(c.segment)
                .or_default()
                .entry(c.offset)
                .or_insert_with(|| c.clone());
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

fn frame_len(run: &[pb::ChunkRef]) -> u64 {
    let payload: u64 = run.iter().map(|c| c.stored_len).sum();
    segment::align_up(segment::header_len_for(run.len()) + payload)
}

/// Bytes `chunks` take when copied (frames of their runs, no segment header).
fn rewritten_len(chunks: &[pb::ChunkRef]) -> u64 {
    runs(chunks).into_iter().map(frame_len).sum()
}

/// Picks the segments to compact: every one whose live content, rewritten, would take less
/// than `compact_live_fraction` of its data bytes; then, while the segments would still take
/// more than `max_space_amplification` times the live bytes, the emptiest of the rest (below
/// a live fraction of 0.9). Segments recovery found damaged are never touched.
pub(crate) fn plan(state: &State, opts: &Options) -> CompactionPlan {
    let live = live_chunks(state);
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
        if state.damaged_segments.contains(&id) || seg.len <= SEGMENT_DATA_OFFSET {
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
}

/// A new segment being filled.
struct Output {
    id: u64,
    path: PathBuf,
    file: Box<dyn StorageFile>,
    end: u64,
}

impl Store {
    /// Runs `plan`: copy, make durable, commit the Relocate record, free the sources.
    pub(super) fn compact_segments(
        &mut self,
        plan: &CompactionPlan,
        progress: &mut impl FnMut(u64, u64),
    ) -> Result<Compacted> {
        self.check_writable()?;
        let mut outputs: Vec<Output> = Vec::new();
        let copied = self.copy_live_chunks(plan, &mut outputs, progress);
        let moves = match copied {
            Ok(moves) => moves,
            Err((e, poison)) => {
                // Nothing references the new files yet: remove them (recovery would too).
                for o in outputs.drain(..) {
                    drop(o.file);
                    let _ = self.opts.io.remove_file(&o.path);
                }
                return Err(if poison { self.poison(e) } else { e });
            }
        };
        let record = pb::RelocateRecord {
            new_segments: outputs
                .iter()
                .map(|o| pb::SegmentInfo {
                    id: o.id,
                    length: o.end,
                })
                .collect(),
            moves,
        };
        let payload = record.encode_to_vec();
        if payload.len() > wal::MAX_RECORD_LEN as usize {
            for o in outputs.drain(..) {
                drop(o.file);
                let _ = self.opts.io.remove_file(&o.path);
            }
            return Err(Error::invalid("relocation record above the WAL record cap"));
        }
        let lens: BTreeMap<u64, u64> = self
            .state
            .segments
            .iter()
            .map(|(&k, s)| (k, s.len))
            .collect();
        let wal = self.wal.as_mut().expect("checked writable");
        if let Err(e) = wal.append_durable(RecordType::Relocate, &payload) {
            // It may have reached the disk: the new files stay (recovery decides).
            return Err(self.poison(e));
        }
        let dead = self
            .state
            .apply_relocate(&record, super::commit_record_len, "compaction")
            .expect("a relocation this store built applies");
        let dead = dead
            .into_iter()
            .map(|s| (s, lens.get(&s).copied().unwrap_or(0)));
        let freed = self.free_segments(dead);
        self.compact_after_durable_write();
        Ok(Compacted {
            written: outputs.iter().map(|o| o.id).collect(),
            bytes_written: outputs.iter().map(|o| o.end).sum(),
            freed,
        })
    }

    /// Copies the plan's live chunks into new segments (pushed to `outputs` as they are
    /// created) and makes them durable. Errors carry whether they must poison the store (a
    /// failed sync).
    fn copy_live_chunks(
        &mut self,
        plan: &CompactionPlan,
        outputs: &mut Vec<Output>,
        progress: &mut impl FnMut(u64, u64),
    ) -> std::result::Result<Vec<pb::ChunkMove>, (Error, bool)> {
        let live = live_chunks(&self.state);
        let io = self.opts.io.clone();
        let seg_dir = self.dir.join(SEGMENTS_DIR);
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
        let plain = |e| (e, false);
        for &src in &plan.sources {
            let Some(chunks) = live.get(&src) else {
                continue;
            };
            let chunks: Vec<pb::ChunkRef> = chunks.values().cloned().collect();
            let src_file = self.segment_file(src).map_err(plain)?;
            let src_path = self.segment_path(src);
            for run in runs(&chunks) {
                let flen = frame_len(run);
                let full = outputs
                    .last()
                    .is_none_or(|o| o.end > SEGMENT_DATA_OFFSET && o.end + flen > max);
                if full {
                    let id = self.state.next_segment_id;
                    if id == u64::MAX {
                        return Err(plain(Error::invalid("segment ids are exhausted")));
                    }
                    self.state.next_segment_id += 1;
                    let path = seg_dir.join(segment::file_name(id));
                    let file = io
                        .create_new(&path)
                        .map_err(|e| plain(Error::io("create", &path, e)))?;
                    let o = Output {
                        id,
                        path,
                        file,
                        end: SEGMENT_DATA_OFFSET,
                    };
                    outputs.push(o);
                    let o = outputs.last().expect("pushed");
                    o.file
                        .write_at(&segment::encode_header(id), 0)
                        .map_err(|e| plain(Error::io("write", &o.path, e)))?;
                }
                let o = outputs.last_mut().expect("an open output");
                let start = o.end;
                let header_len = segment::header_len_for(run.len());
                let mut at = start + header_len;
                let mut entries = Vec::with_capacity(run.len());
                for c in run {
                    let mut buf = vec![0u8; c.stored_len as usize];
                    src_file
                        .read_at(&mut buf, c.offset)
                        .map_err(|e| plain(Error::io("read", &src_path, e)))?;
                    // BLAKE3 covers the raw bytes: a compressed chunk is decoded to check it
                    // (its stored bytes are copied as they are).
                    let hash = if c.codec == pb::Codec::None as i32 {
                        *blake3::hash(&buf).as_bytes()
                    } else {
                        let mut raw = vec![0u8; c.raw_len as usize];
                        match crate::codec::decode(c.codec, &buf, &mut raw, &mut Vec::new()) {
                            Ok(()) => *blake3::hash(&raw).as_bytes(),
                            Err(_) => [0u8; 32], // not a valid frame: corrupt below
                        }
                    };
                    if hash.as_slice() != c.blake3.as_slice() {
                        return Err(plain(Error::CompactionSourceCorrupt {
                            path: src_path.clone(),
                            offset: c.offset,
                        }));
                    }
                    o.file
                        .write_at(&buf, at)
                        .map_err(|e| plain(Error::io("write", &o.path, e)))?;
                    moves.push(pb::ChunkMove {
                        from_segment: src,
                        from_offset: c.offset,
                        to_segment: o.id,
                        to_offset: at,
                    });
                    entries.push(ChunkEntry {
                        blake3: hash,
                        stored_len: c.stored_len,
                        raw_len: c.raw_len,
                    });
                    at += c.stored_len;
                    done += c.stored_len;
                    progress(done, total);
                }
                let header = FrameHeader::new(run[0].codec as u8, o.id, entries).encode();
                o.file
                    .write_at(&header, start)
                    .map_err(|e| plain(Error::io("write", &o.path, e)))?;
                let end = segment::align_up(at);
                if end > at {
                    o.file
                        .write_at(&vec![0u8; (end - at) as usize], at)
                        .map_err(|e| plain(Error::io("write", &o.path, e)))?;
                }
                o.end = end;
            }
        }
        for o in outputs.iter() {
            o.file
                .sync_data()
                .map_err(|e| (Error::io("fdatasync", &o.path, e), true))?;
        }
        if !outputs.is_empty() {
            io.sync_dir(&seg_dir)
                .map_err(|e| (Error::io("fsync dir", &seg_dir, e), true))?;
        }
        // Moves sorted by (from_segment, from_offset), as docs/FORMAT.md says.
        moves.sort_by_key(|m| (m.from_segment, m.from_offset));
        Ok(moves)
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
