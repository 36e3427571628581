//! Key rotation's rewrite: every live checkpoint not sealed under the current key (sealed
//! under an old key, or plain) is resealed under it, crash-safely, with compaction's
//! machinery: the chunks are copied through the one segment writer into new segments (made
//! durable first), then the WAL is rewritten holding the new manifests — the one atomic
//! switch of `CURRENT` that WAL compaction uses — and only then are the old segments freed.
//! A crash before the switch leaves the old store and orphan new segments (recovery sets
//! them aside); after it, the new store and orphan old ones.

use super::state::State;
use super::{Store, SEGMENTS_DIR};
use crate::crypt::{ChunkHash, Sealer};
use crate::error::{Error, Result};
use crate::manifest::{self, Manifest};
use crate::segment::{self, SegmentWriter, SEGMENT_DATA_OFFSET};
use ckptstore_proto::v1 as pb;
use std::collections::HashMap;
use std::sync::Arc;

/// What [`Store::rekey`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RekeyReport {
    /// Checkpoints resealed under the current key.
    pub checkpoints: Vec<u64>,
    /// Chunks written (sealed) under the current key.
    pub chunks_written: u64,
    /// Their stored bytes.
    pub bytes_written: u64,
    /// Segment files freed afterwards (their bytes under the old keys are gone once unlinked).
    pub segments_freed: Vec<u64>,
    /// Segments an open reader still holds: freed when it closes.
    pub segments_pending: Vec<u64>,
}

impl Store {
    /// Reseals every live checkpoint that is not sealed under [`crate::Options::encryption_key`]
    /// (plain ones, and ones under the keys in `old_keys`, which must be supplied) under it:
    /// new chunk ids, nonces, tags and manifest bodies, a fresh commit MAC for each (chained in
    /// id order). Ids, steps, metadata, pins and contents stay. `progress(done, total)` in
    /// chunks.
    pub fn rekey(&mut self, mut progress: impl FnMut(u64, u64)) -> Result<RekeyReport> {
        self.check_writable()?;
        let Some(current) = self.keys.current().cloned() else {
            return Err(Error::invalid(
                "rekey needs the new key (Options::encryption_key, --key-file)",
            ));
        };
        let targets: Vec<Arc<Manifest>> = self
            .state
            .checkpoints
            .values()
            .filter(|m| m.key_id[..] != current.id().0[..])
            .cloned()
            .collect();
        if targets.is_empty() {
            return Ok(RekeyReport::default());
        }
        let mut writer = SegmentWriter::new(self.opts.io.clone(), self.dir.join(SEGMENTS_DIR))
            .sealing(Some(current.clone()));
        let mut report = RekeyReport::default();
        let copied =
            self.reseal_chunks(&targets, &current, &mut writer, &mut report, &mut progress);
        let (moved, outputs) = match copied.and_then(|m| Ok((m, writer.finish()?))) {
            Ok(done) => done,
            Err(e) if writer.sync_failed() => return Err(self.poison(e)),
            Err(e) => return Err(e),
        };
        let new_state = self.rekeyed_state(&targets, &moved, &outputs, &current)?;
        let lens: HashMap<u64, u64> = self
            .state
            .segments
            .iter()
            .map(|(&k, s)| (k, s.len))
            .collect();
        let (state, dead) = new_state;
        // From the WAL rewrite on, the new segments are the store's.
        let old = std::mem::replace(&mut self.state, state);
        writer.release();
        if let Err(e) = self.rewrite_wal(self.features) {
            self.state = old;
            return Err(e);
        }
        let freed = self.free_segments(
            dead.into_iter()
                .map(|s| (s, lens.get(&s).copied().unwrap_or(0))),
        );
        report.checkpoints = targets.iter().map(|m| m.id).collect();
        report.segments_freed = freed.freed;
        report.segments_pending = freed.pending;
        Ok(report)
    }

    /// Copies every distinct chunk of `targets` resealed under `current` (checked against its
    /// old chunk id on the way); returns the new reference of each old location.
    fn reseal_chunks(
        &mut self,
        targets: &[Arc<Manifest>],
        current: &Arc<Sealer>,
        writer: &mut SegmentWriter,
        report: &mut RekeyReport,
        progress: &mut impl FnMut(u64, u64),
    ) -> Result<HashMap<(u64, u64), pb::ChunkRef>> {
        let max = self.opts.segment_max_bytes;
        let total: u64 = targets
            .iter()
            .map(|m| manifest::all_chunks(m).count() as u64)
            .sum();
        let mut moved: HashMap<(u64, u64), pb::ChunkRef> = HashMap::new();
        let mut by_id: HashMap<[u8; 32], pb::ChunkRef> = HashMap::new();
        let mut done = 0u64;
        for m in targets {
            let old = self.sealer_for(m)?;
            let old_hash = old.as_ref().map_or(ChunkHash::Plain, |s| s.chunk_hash());
            for c in manifest::all_chunks(m) {
                done += 1;
                if moved.contains_key(&(c.segment, c.offset)) {
                    continue;
                }
                let corrupt = || Error::CompactionSourceCorrupt {
                    path: self.segment_path(c.segment),
                    offset: c.offset,
                };
                let mut stored = vec![0u8; c.stored_len as usize];
                self.segment_file(c.segment)?
                    .read_at(&mut stored, c.offset)
                    .map_err(|e| Error::io("read", self.segment_path(c.segment), e))?;
                if let Some(s) = &old {
                    if !s.open(&mut stored, &c.nonce, &c.tag, &c.blake3, c.raw_len, c.codec) {
                        return Err(corrupt());
                    }
                }
                let raw = if c.codec == pb::Codec::None as i32 {
                    stored.clone()
                } else {
                    let mut raw = vec![0u8; c.raw_len as usize];
                    crate::codec::decode(c.codec, &stored, &mut raw, &mut Vec::new())
                        .map_err(|_| corrupt())?;
                    raw
                };
                if old_hash.hash(&raw)[..] != c.blake3[..] {
                    return Err(corrupt());
                }
                let id = current.chunk_hash().hash(&raw);
                let known = by_id.get(&id).or_else(|| self.state.lookup(&id)).cloned();
                let r = match known {
                    Some(r) => r,
                    None => {
                        let codec = pb::Codec::try_from(c.codec)
                            .map_err(|_| Error::invalid(format!("unknown codec {}", c.codec)))?;
                        let len = stored.len() as u64;
                        let mut run = None;
                        let fits = |at: segment::FrameAt| {
                            usize::from(at.start == SEGMENT_DATA_OFFSET || at.end(1, len) <= max)
                        };
                        let state = &mut self.state;
                        let r = writer.append(
                            &mut run,
                            codec,
                            len,
                            fits,
                            || state.allocate_segment_id(),
                            &stored,
                            c.raw_len,
                            id,
                        )?;
                        writer.end(&mut run)?;
                        report.chunks_written += 1;
                        report.bytes_written += len;
                        by_id.insert(id, r.clone());
                        r
                    }
                };
                moved.insert((c.segment, c.offset), r);
                progress(done, total);
            }
        }
        Ok(moved)
    }

    /// The state after the rewrite: every target's chunks replaced, resealed and MAC'd in id
    /// order; the segments nothing references any more, to free.
    fn rekeyed_state(
        &self,
        targets: &[Arc<Manifest>],
        moved: &HashMap<(u64, u64), pb::ChunkRef>,
        outputs: &[pb::SegmentInfo],
        current: &Arc<Sealer>,
    ) -> Result<(State, Vec<u64>)> {
        let mut snapshot = self.state.snapshot();
        snapshot.segments.extend_from_slice(outputs);
        let mut st = State::new();
        st.apply_snapshot(&snapshot);
        let rekeyed: std::collections::HashSet<u64> = targets.iter().map(|m| m.id).collect();
        for m in self.state.checkpoints.values() {
            let mut m = (**m).clone();
            if rekeyed.contains(&m.id) {
                let chunks = m
                    .tensors
                    .iter_mut()
                    .flat_map(|t| t.chunks.iter_mut())
                    .chain(m.blobs.iter_mut().flat_map(|b| b.chunks.iter_mut()));
                for c in chunks {
                    *c = moved[&(c.segment, c.offset)].clone();
                }
                m.key_id = current.id().0.to_vec();
                m.new_segments.clear();
                m.sealed_body.clear();
            }
            // Every checkpoint is now under the current key: the MAC chain is rebuilt over
            // all of them, in id order (an untouched one's body stays valid: it binds only
            // the id and key id).
            m.prev_mac = st.head_mac().unwrap_or_default();
            m.mac = current.commit_mac(&m).to_vec();
            if rekeyed.contains(&m.id) {
                current.seal_body(&mut m)?;
            }
            let len = super::commit_record_len(&m);
            st.apply_commit(m, len, "rekey")?;
        }
        for &id in &self.state.pinned {
            st.apply_pin(id, true, "rekey")?;
        }
        let dead = st.drop_unreferenced_segments();
        Ok((st, dead))
    }
}
