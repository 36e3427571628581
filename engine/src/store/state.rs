//! The in-memory state rebuilt from the WAL: live checkpoints, the segment table with
//! reference counts, and the content index used for deduplication.

use crate::error::{Error, Result};
use crate::manifest::{self, CheckpointInfo, Manifest};
use ckptstore_proto::v1 as pb;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// A live segment.
#[derive(Debug, Clone)]
pub(crate) struct SegmentState {
    /// Length that was fdatasync'ed before the commit that created it.
    pub len: u64,
    /// Live checkpoints that reference at least one of its chunks.
    pub refs: usize,
}

#[derive(Debug, Clone)]
struct IndexEntry {
    chunk: pb::ChunkRef,
    refs: usize,
}

#[derive(Debug, Default, Clone)]
pub(crate) struct State {
    pub checkpoints: BTreeMap<u64, Arc<Manifest>>,
    pub segments: BTreeMap<u64, SegmentState>,
    index: HashMap<[u8; 32], IndexEntry>,
    /// Segments found missing or short at recovery: their chunks are never deduplicated against.
    pub damaged_segments: BTreeSet<u64>,
    pub next_checkpoint_id: u64,
    pub next_segment_id: u64,
    /// Sum of the encoded sizes of the live commit and pin records (to decide WAL compaction).
    pub live_record_bytes: u64,
    /// Pinned checkpoints (all live): never deleted until unpinned.
    pub pinned: BTreeSet<u64>,
    /// Chunks found not to match their BLAKE3 (Quarantine records), by (segment, offset):
    /// never deduplicated against; healed when a fresh copy of the same bytes is committed.
    pub quarantined: BTreeMap<(u64, u64), pb::ChunkRef>,
}

/// Encoded size of the WAL record that pins checkpoint `id` (what a compacted WAL holds for it).
pub(crate) fn pin_record_len(id: u64) -> u64 {
    use prost::Message;
    let rec = pb::PinRecord { id, pinned: true };
    (crate::wal::RECORD_HEADER_LEN + rec.encoded_len()) as u64
}

#[allow(clippy::expect_used)] // manifests are validated (32-byte BLAKE3) before they are applied
fn key(c: &pb::ChunkRef) -> [u8; 32] {
    c.blake3
        .as_slice()
        .try_into()
        .expect("validated 32-byte BLAKE3")
}

/// Whether chunk `c` may be referenced by a new commit: in a live segment that recovery did
/// not find damaged, and not quarantined.
fn usable(
    segments: &BTreeMap<u64, SegmentState>,
    damaged: &BTreeSet<u64>,
    quarantined: &BTreeMap<(u64, u64), pb::ChunkRef>,
    c: &pb::ChunkRef,
) -> bool {
    segments.contains_key(&c.segment)
        && !damaged.contains(&c.segment)
        && !quarantined.contains_key(&(c.segment, c.offset))
}

pub(crate) fn referenced_segments(m: &Manifest) -> BTreeSet<u64> {
    manifest::all_chunks(m).map(|c| c.segment).collect()
}

impl State {
    pub(crate) fn new() -> Self {
        State {
            next_checkpoint_id: 1,
            next_segment_id: 1,
            ..Default::default()
        }
    }

    /// The summary of live checkpoint `m`.
    /// The commit MAC of the newest live checkpoint that has one (the head of the MAC chain).
    pub(crate) fn head_mac(&self) -> Option<Vec<u8>> {
        self.checkpoints
            .values()
            .rev()
            .find(|m| !m.mac.is_empty())
            .map(|m| m.mac.clone())
    }

    pub(crate) fn info(&self, m: &Manifest) -> CheckpointInfo {
        CheckpointInfo::of(m, self.pinned.contains(&m.id))
    }

    /// Hands out the next segment id (for a new segment file of this store).
    pub(crate) fn allocate_segment_id(&mut self) -> Result<u64> {
        let id = self.next_segment_id;
        if id == u64::MAX {
            // Only reachable through a WAL or a file name holding an id near u64::MAX.
            return Err(Error::invalid(
                "segment ids are exhausted (u64::MAX reached)",
            ));
        }
        self.next_segment_id += 1;
        Ok(id)
    }

    /// A live chunk with this BLAKE3 that can be referenced instead of written again: only
    /// one in a live segment that recovery did not find damaged, never a quarantined one.
    pub(crate) fn lookup(&self, hash: &[u8; 32]) -> Option<&pb::ChunkRef> {
        self.index
            .get(hash)
            .map(|e| &e.chunk)
            .filter(|c| usable(&self.segments, &self.damaged_segments, &self.quarantined, c))
    }

    /// Applies a snapshot record: the state restarts from it.
    pub(crate) fn apply_snapshot(&mut self, s: &pb::SnapshotRecord) {
        *self = State::new();
        self.next_checkpoint_id = s.next_checkpoint_id.max(1);
        self.next_segment_id = s.next_segment_id.max(1);
        for seg in &s.segments {
            // Never hand out an id the snapshot names, even if the snapshot's counter is lower:
            // a reused id would collide with the old entry at the next replay.
            self.next_segment_id = self.next_segment_id.max(seg.id.saturating_add(1));
            self.segments.insert(
                seg.id,
                SegmentState {
                    len: seg.length,
                    refs: 0,
                },
            );
        }
    }

    /// Applies a commit. `context` names the record for errors.
    #[allow(clippy::expect_used)] // the segments were checked or are live
    pub(crate) fn apply_commit(
        &mut self,
        m: Manifest,
        record_bytes: u64,
        context: &str,
    ) -> Result<()> {
        manifest::validate(&m, context)?;
        let bad = |reason: String| Error::BadManifest {
            context: context.to_owned(),
            reason,
        };
        if self.checkpoints.contains_key(&m.id) {
            return Err(bad(format!("checkpoint id {} committed twice", m.id)));
        }
        // Validated in full before anything changes, so a bad record leaves the state as it
        // was (a salvage applies the records after the damage without a trial copy).
        let len_of = |id: u64| {
            self.segments
                .get(&id)
                .map(|s| s.len)
                .or_else(|| m.new_segments.iter().find(|s| s.id == id).map(|s| s.length))
        };
        for c in manifest::all_chunks(&m) {
            let len = len_of(c.segment)
                .ok_or_else(|| bad(format!("chunk in unknown segment {}", c.segment)))?;
            if c.offset + c.stored_len > len {
                return Err(bad(format!(
                    "chunk at {}+{} past the end of segment {} ({} bytes)",
                    c.offset, c.stored_len, c.segment, len
                )));
            }
        }
        for s in &m.new_segments {
            self.segments.entry(s.id).or_insert(SegmentState {
                len: s.length,
                refs: 0,
            });
            // Saturating: ids near u64::MAX in a record must not overflow; a transaction
            // refuses to allocate past the end (see `allocate_segment_id`).
            self.next_segment_id = self.next_segment_id.max(s.id.saturating_add(1));
        }
        for s in referenced_segments(&m) {
            self.segments.get_mut(&s).expect("checked above").refs += 1;
        }
        let (segments, damaged, quarantined) =
            (&self.segments, &self.damaged_segments, &self.quarantined);
        for c in manifest::all_chunks(&m) {
            self.index
                .entry(key(c))
                .and_modify(|e| {
                    e.refs += 1;
                    // A second copy exists only because the first was unusable (its segment
                    // damaged or since freed, or the chunk quarantined): point future
                    // deduplication (and healing) at the new one.
                    if !usable(segments, damaged, quarantined, &e.chunk) {
                        e.chunk = c.clone();
                    }
                })
                .or_insert_with(|| IndexEntry {
                    chunk: c.clone(),
                    refs: 1,
                });
        }
        self.next_checkpoint_id = self.next_checkpoint_id.max(m.id.saturating_add(1));
        self.live_record_bytes += record_bytes;
        self.checkpoints.insert(m.id, Arc::new(m));
        Ok(())
    }

    /// Removes a checkpoint; returns the segments no live checkpoint references any more.
    pub(crate) fn apply_delete(
        &mut self,
        id: u64,
        record_bytes_of: impl Fn(&Manifest) -> u64,
    ) -> Vec<u64> {
        let Some(m) = self.checkpoints.remove(&id) else {
            return Vec::new();
        };
        self.live_record_bytes = self.live_record_bytes.saturating_sub(record_bytes_of(&m));
        if self.pinned.remove(&id) {
            self.live_record_bytes = self.live_record_bytes.saturating_sub(pin_record_len(id));
        }
        for c in manifest::all_chunks(&m) {
            let k = key(c);
            if let Some(e) = self.index.get_mut(&k) {
                e.refs -= 1;
                if e.refs == 0 {
                    self.index.remove(&k);
                }
            }
        }
        let mut dead = Vec::new();
        for s in referenced_segments(&m) {
            if let Some(seg) = self.segments.get_mut(&s) {
                seg.refs -= 1;
                if seg.refs == 0 {
                    dead.push(s);
                }
            }
        }
        // Segments a deleted checkpoint created but never referenced (all its chunks were
        // deduplicated elsewhere) are dead too.
        for s in &m.new_segments {
            if self.segments.get(&s.id).is_some_and(|seg| seg.refs == 0) && !dead.contains(&s.id) {
                dead.push(s.id);
            }
        }
        self.forget_segments(&dead);
        dead
    }

    /// Drops freed segments from the table, with what is known about their damage, and the
    /// quarantined chunks no live checkpoint references any more (nothing can reach them:
    /// deduplication only finds chunks live checkpoints reference).
    fn forget_segments(&mut self, dead: &[u64]) {
        for s in dead {
            self.segments.remove(s);
            self.damaged_segments.remove(s);
        }
        if self.quarantined.is_empty() {
            return;
        }
        let referenced: BTreeSet<(u64, u64)> = self
            .checkpoints
            .values()
            .flat_map(|m| manifest::all_chunks(m))
            .map(|c| (c.segment, c.offset))
            .filter(|loc| self.quarantined.contains_key(loc))
            .collect();
        self.quarantined
            .retain(|loc, _| referenced.contains(loc) && !dead.contains(&loc.0));
    }

    /// Applies a relocation (segment compaction): the new segments join the table, every live
    /// chunk reference at a moved location points at its new one, and the segments left with
    /// no reference are returned (dropped from the table, to be freed). `context` names the
    /// record for errors. Validated in full before anything changes, so a bad record leaves
    /// the state as it was.
    #[allow(clippy::expect_used)] // the segments were checked or are live
    pub(crate) fn apply_relocate(
        &mut self,
        r: &pb::RelocateRecord,
        record_bytes_of: impl Fn(&Manifest) -> u64,
        context: &str,
    ) -> Result<Vec<u64>> {
        let bad = |reason: String| Error::BadManifest {
            context: context.to_owned(),
            reason,
        };
        let mut new_lens = BTreeMap::new();
        for s in &r.new_segments {
            if self.segments.contains_key(&s.id) || new_lens.insert(s.id, s.length).is_some() {
                return Err(bad(format!(
                    "relocation into segment {}, which exists",
                    s.id
                )));
            }
        }
        let mut moves: HashMap<(u64, u64), (u64, u64)> = HashMap::with_capacity(r.moves.len());
        for mv in &r.moves {
            if !self.segments.contains_key(&mv.from_segment) {
                return Err(bad(format!(
                    "relocation from unknown segment {}",
                    mv.from_segment
                )));
            }
            if !new_lens.contains_key(&mv.to_segment) {
                return Err(bad(format!(
                    "relocation into segment {}, which the record does not create",
                    mv.to_segment
                )));
            }
            let from = (mv.from_segment, mv.from_offset);
            if moves.insert(from, (mv.to_segment, mv.to_offset)).is_some() {
                return Err(bad(format!("chunk at {from:?} relocated twice")));
            }
        }
        // Rewrite the manifests that use a moved chunk; check every new location fits.
        let mut used = std::collections::HashSet::new();
        let mut rewritten = Vec::new();
        for m in self.checkpoints.values() {
            if !manifest::all_chunks(m).any(|c| moves.contains_key(&(c.segment, c.offset))) {
                continue;
            }
            let mut new = (**m).clone();
            let chunks = new
                .tensors
                .iter_mut()
                .flat_map(|t| t.chunks.iter_mut())
                .chain(new.blobs.iter_mut().flat_map(|b| b.chunks.iter_mut()));
            for c in chunks {
                let Some(&(seg, off)) = moves.get(&(c.segment, c.offset)) else {
                    continue;
                };
                if off
                    .checked_add(c.stored_len)
                    .is_none_or(|end| end > new_lens[&seg])
                {
                    return Err(bad(format!(
                        "chunk relocated to {off}+{} past the end of segment {seg}",
                        c.stored_len
                    )));
                }
                used.insert((c.segment, c.offset));
                c.segment = seg;
                c.offset = off;
            }
            rewritten.push((m.clone(), new));
        }
        if used.len() != moves.len() {
            return Err(bad(
                "relocation of a chunk no live checkpoint references".to_string()
            ));
        }
        // Valid: apply.
        for (&id, &len) in &new_lens {
            self.segments.insert(id, SegmentState { len, refs: 0 });
            self.next_segment_id = self.next_segment_id.max(id.saturating_add(1));
        }
        for e in self.index.values_mut() {
            if let Some(&(seg, off)) = moves.get(&(e.chunk.segment, e.chunk.offset)) {
                e.chunk.segment = seg;
                e.chunk.offset = off;
            }
        }
        // A quarantined chunk that was moved was verified as it was copied: the copy is good.
        self.quarantined.retain(|loc, _| !moves.contains_key(loc));
        Ok(self.replace_manifests(rewritten, &record_bytes_of))
    }

    /// Puts each rewritten manifest (validated, its segments in the table) in place of its old
    /// version: moves the segment references over, drops the segments left with none, and
    /// returns them (to be freed).
    #[allow(clippy::expect_used)] // the old manifest's segments are live, the new one's checked
    fn replace_manifests(
        &mut self,
        rewritten: Vec<(Arc<Manifest>, Manifest)>,
        record_bytes_of: &dyn Fn(&Manifest) -> u64,
    ) -> Vec<u64> {
        let mut touched = BTreeSet::new();
        for (old, new) in &rewritten {
            for s in referenced_segments(old) {
                self.segments.get_mut(&s).expect("live segment").refs -= 1;
                touched.insert(s);
            }
            for s in referenced_segments(new) {
                self.segments.get_mut(&s).expect("checked").refs += 1;
            }
        }
        let dead: Vec<u64> = touched
            .into_iter()
            .filter(|s| self.segments.get(s).is_some_and(|seg| seg.refs == 0))
            .collect();
        self.forget_segments(&dead);
        for (old, mut new) in rewritten {
            // A freed segment is no longer one this checkpoint "created" (a compacted WAL
            // must not bring it back).
            new.new_segments.retain(|s| !dead.contains(&s.id));
            self.live_record_bytes = self.live_record_bytes.saturating_sub(record_bytes_of(&old))
                + record_bytes_of(&new);
            self.checkpoints.insert(new.id, Arc::new(new));
        }
        dead
    }

    /// Applies a Quarantine record: its bad chunks join the quarantine, then every live
    /// reference at a healed location becomes its fresh copy (same BLAKE3 and raw length).
    /// Returns the segments left with no reference (dropped from the table, to be freed).
    /// `context` names the record for errors. Validated in full before anything changes, so a
    /// bad record leaves the state as it was.
    #[allow(clippy::expect_used)] // the segments were checked or are live
    pub(crate) fn apply_quarantine(
        &mut self,
        r: &pb::QuarantineRecord,
        record_bytes_of: impl Fn(&Manifest) -> u64,
        context: &str,
    ) -> Result<Vec<u64>> {
        let bad = |reason: String| Error::BadManifest {
            context: context.to_owned(),
            reason,
        };
        let inside = |c: &pb::ChunkRef| {
            c.blake3.len() == 32
                && self.segments.get(&c.segment).is_some_and(|s| {
                    c.offset
                        .checked_add(c.stored_len)
                        .is_some_and(|end| end <= s.len)
                })
        };
        for c in &r.bad {
            if !inside(c) {
                return Err(bad(format!(
                    "quarantine of a chunk at {}+{} of segment {}, outside the live segments",
                    c.offset, c.stored_len, c.segment
                )));
            }
        }
        let now_bad = |loc: &(u64, u64)| {
            self.quarantined.contains_key(loc)
                || r.bad.iter().any(|c| (c.segment, c.offset) == *loc)
        };
        let mut heals: HashMap<(u64, u64), &pb::ChunkRef> = HashMap::new();
        for h in &r.healed {
            let from = (h.from_segment, h.from_offset);
            let to = h
                .to
                .as_ref()
                .ok_or_else(|| bad(format!("heal of the chunk at {from:?} without a target")))?;
            if !inside(to) || now_bad(&(to.segment, to.offset)) || (to.segment, to.offset) == from {
                return Err(bad(format!(
                    "heal of the chunk at {from:?} onto segment {} offset {}: not a live, \
                     unquarantined chunk",
                    to.segment, to.offset
                )));
            }
            if heals.insert(from, to).is_some() {
                return Err(bad(format!("chunk at {from:?} healed twice")));
            }
        }
        // Rewrite the manifests that use a healed chunk; the copy must hold the same bytes.
        let mut used = std::collections::HashSet::new();
        let mut rewritten = Vec::new();
        for m in self.checkpoints.values() {
            if !manifest::all_chunks(m).any(|c| heals.contains_key(&(c.segment, c.offset))) {
                continue;
            }
            let mut new = (**m).clone();
            let chunks = new
                .tensors
                .iter_mut()
                .flat_map(|t| t.chunks.iter_mut())
                .chain(new.blobs.iter_mut().flat_map(|b| b.chunks.iter_mut()));
            for c in chunks {
                let loc = (c.segment, c.offset);
                let Some(&to) = heals.get(&loc) else {
                    continue;
                };
                if to.blake3 != c.blake3 || to.raw_len != c.raw_len {
                    return Err(bad(format!(
                        "heal of the chunk at {loc:?} onto a chunk of other bytes"
                    )));
                }
                used.insert(loc);
                *c = to.clone();
            }
            manifest::validate(&new, context)?;
            rewritten.push((m.clone(), new));
        }
        if used.len() != heals.len() {
            return Err(bad(
                "heal of a chunk no live checkpoint references".to_string()
            ));
        }
        // Valid: apply.
        for c in &r.bad {
            self.quarantined.insert((c.segment, c.offset), c.clone());
        }
        self.retarget_index_off_quarantine(&r.bad);
        for e in self.index.values_mut() {
            if let Some(&to) = heals.get(&(e.chunk.segment, e.chunk.offset)) {
                e.chunk = to.clone();
            }
        }
        self.quarantined.retain(|loc, _| !heals.contains_key(loc));
        Ok(self.replace_manifests(rewritten, &record_bytes_of))
    }

    /// Points the index entries of newly quarantined chunks at another usable copy of the
    /// same bytes a live checkpoint references, if there is one (two copies exist after a
    /// sharded commit, which does not deduplicate, or a rebuild): so that copy heals them.
    fn retarget_index_off_quarantine(&mut self, bad: &[pb::ChunkRef]) {
        for c in bad {
            let Some(e) = self.index.get(&key(c)) else {
                continue;
            };
            if usable(
                &self.segments,
                &self.damaged_segments,
                &self.quarantined,
                &e.chunk,
            ) {
                continue;
            }
            let copy = self
                .checkpoints
                .values()
                .flat_map(|m| manifest::all_chunks(m))
                .find(|x| {
                    x.blake3 == c.blake3
                        && usable(&self.segments, &self.damaged_segments, &self.quarantined, x)
                })
                .cloned();
            if let (Some(copy), Some(e)) = (copy, self.index.get_mut(&key(c))) {
                e.chunk = copy;
            }
        }
    }

    /// The heals possible once `also_bad` is quarantined too: every quarantined chunk a live
    /// checkpoint still references whose bytes have a usable copy (one a later save wrote),
    /// with that copy.
    pub(crate) fn heals(&self, also_bad: &[pb::ChunkRef]) -> Vec<pb::ChunkHeal> {
        if self.quarantined.is_empty() && also_bad.is_empty() {
            return Vec::new();
        }
        let mut bad = self.quarantined.clone();
        for c in also_bad {
            bad.insert((c.segment, c.offset), c.clone());
        }
        let referenced: BTreeSet<(u64, u64)> = self
            .checkpoints
            .values()
            .flat_map(|m| manifest::all_chunks(m))
            .map(|c| (c.segment, c.offset))
            .filter(|loc| bad.contains_key(loc))
            .collect();
        referenced
            .into_iter()
            .filter_map(|loc| {
                let chunk = &bad[&loc];
                let copy = &self.index.get(&key(chunk))?.chunk;
                let ok = usable(&self.segments, &self.damaged_segments, &bad, copy)
                    && copy.raw_len == chunk.raw_len;
                ok.then(|| pb::ChunkHeal {
                    from_segment: loc.0,
                    from_offset: loc.1,
                    to: Some(copy.clone()),
                })
            })
            .collect()
    }

    /// Quarantined chunks that live checkpoints still reference, with those checkpoints'
    /// ids: what no save has healed yet.
    pub(crate) fn unhealed(&self) -> BTreeMap<(u64, u64), (pb::ChunkRef, Vec<u64>)> {
        let mut out: BTreeMap<(u64, u64), (pb::ChunkRef, Vec<u64>)> = BTreeMap::new();
        for m in self.checkpoints.values() {
            for c in manifest::all_chunks(m) {
                let loc = (c.segment, c.offset);
                if let Some(q) = self.quarantined.get(&loc) {
                    let e = out.entry(loc).or_insert_with(|| (q.clone(), Vec::new()));
                    if e.1.last() != Some(&m.id) {
                        e.1.push(m.id);
                    }
                }
            }
        }
        out
    }

    /// Applies a pin record. `context` names the record for errors: a pin of a checkpoint that
    /// is not live is refused (the writer never writes one; a WAL holding one is damaged).
    pub(crate) fn apply_pin(&mut self, id: u64, pinned: bool, context: &str) -> Result<()> {
        if !self.checkpoints.contains_key(&id) {
            return Err(Error::BadManifest {
                context: context.to_owned(),
                reason: format!("pin record for checkpoint {id}, which is not live"),
            });
        }
        let changed = if pinned {
            self.pinned.insert(id)
        } else {
            self.pinned.remove(&id)
        };
        if changed && pinned {
            self.live_record_bytes += pin_record_len(id);
        } else if changed {
            self.live_record_bytes = self.live_record_bytes.saturating_sub(pin_record_len(id));
        }
        Ok(())
    }

    /// Drops segments that no live checkpoint references nor created (left by a snapshot, by
    /// a crash). A segment a live checkpoint created stays while it lives, even with no chunk
    /// referenced: it holds the checkpoint's commit trailer (a commit that wrote no chunk gets
    /// a segment holding only its trailer; docs/FORMAT.md, "Commit trailer"). Returns them.
    pub(crate) fn drop_unreferenced_segments(&mut self) -> Vec<u64> {
        let created: BTreeSet<u64> = self
            .checkpoints
            .values()
            .flat_map(|m| m.new_segments.iter().map(|s| s.id))
            .collect();
        let dead: Vec<u64> = self
            .segments
            .iter()
            .filter(|(id, s)| s.refs == 0 && !created.contains(id))
            .map(|(&id, _)| id)
            .collect();
        self.forget_segments(&dead);
        dead
    }

    /// The records of a WAL holding exactly this state: a snapshot, a commit per live
    /// checkpoint, then a pin per pinned one (pins follow the commits they name,
    /// docs/FORMAT.md; only pinned ones, so a store without pins gives a WAL an older reader
    /// still opens). What a WAL compaction, and a salvage that keeps records after damage,
    /// write.
    pub(crate) fn compacted_records(&self) -> Vec<(crate::wal::RecordType, Vec<u8>)> {
        use crate::wal::RecordType;
        use prost::Message;
        let mut records = vec![(RecordType::Snapshot, self.snapshot().encode_to_vec())];
        for m in self.checkpoints.values() {
            let rec = pb::CommitRecord {
                manifest: Some(crate::crypt::wal_form(m).into_owned()),
            };
            records.push((RecordType::Commit, rec.encode_to_vec()));
        }
        for &id in &self.pinned {
            let rec = pb::PinRecord { id, pinned: true };
            records.push((RecordType::Pin, rec.encode_to_vec()));
        }
        // Only when something is quarantined: a store without bad chunks holds no type-6
        // record (and needs no format feature).
        if !self.quarantined.is_empty() {
            let rec = pb::QuarantineRecord {
                bad: self.quarantined.values().cloned().collect(),
                healed: Vec::new(),
            };
            records.push((RecordType::Quarantine, rec.encode_to_vec()));
        }
        records
    }

    /// The snapshot record describing the whole live state.
    pub(crate) fn snapshot(&self) -> pb::SnapshotRecord {
        pb::SnapshotRecord {
            next_checkpoint_id: self.next_checkpoint_id,
            next_segment_id: self.next_segment_id,
            segments: self
                .segments
                .iter()
                .map(|(&id, s)| pb::SegmentInfo { id, length: s.len })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(id: u64, segment: u64, hash: u8) -> Manifest {
        Manifest {
            id,
            tensors: vec![pb::TensorEntry {
                name: "t".into(),
                dtype: pb::DType::U8 as i32,
                shape: vec![10],
                nbytes: 10,
                chunks: vec![pb::ChunkRef {
                    segment,
                    offset: 4096,
                    stored_len: 10,
                    raw_len: 10,
                    codec: 0,
                    blake3: vec![hash; 32],
                    nonce: vec![],
                    tag: vec![],
                }],
            }],
            new_segments: vec![pb::SegmentInfo {
                id: segment,
                length: 4106,
            }],
            ..Default::default()
        }
    }

    /// Regression (salvage_clones_no_state_per_record): a salvage applies the records after
    /// the damage to the state itself, with no trial copy, so a commit that does not apply
    /// must leave the state exactly as it was — no segment of its `new_segments` added, the
    /// next segment id not moved (it was, before the chunk checks moved ahead).
    #[test]
    fn a_commit_that_does_not_apply_changes_nothing() {
        let mut s = State::new();
        s.apply_commit(manifest(1, 1, 9), 0, "t").unwrap();
        let before = (
            s.compacted_records()
                .iter()
                .map(|(t, b)| (*t as u8, b.clone()))
                .collect::<Vec<_>>(),
            s.next_segment_id,
            s.segments.len(),
        );
        // Its second chunk names a segment that neither exists nor is created.
        let mut m = manifest(2, 7, 3);
        let mut stray = m.tensors[0].chunks[0].clone();
        stray.segment = 99;
        m.tensors[0].shape = vec![20];
        m.tensors[0].nbytes = 20;
        m.tensors[0].chunks.push(stray);
        assert!(s.apply_commit(m, 0, "t").is_err());
        let after = (
            s.compacted_records()
                .iter()
                .map(|(t, b)| (*t as u8, b.clone()))
                .collect::<Vec<_>>(),
            s.next_segment_id,
            s.segments.len(),
        );
        assert_eq!(after, before);
    }

    /// Deduplication never hands out a chunk in a damaged or freed segment, and moves to a
    /// healthy copy once one is committed.
    #[test]
    fn lookup_skips_damaged_and_freed_segments() {
        let mut s = State::new();
        s.apply_commit(manifest(1, 1, 9), 0, "t").unwrap();
        assert_eq!(s.lookup(&[9; 32]).unwrap().segment, 1);
        s.damaged_segments.insert(1);
        assert!(s.lookup(&[9; 32]).is_none());

        // A healthy copy in segment 2: dedup now points there.
        s.apply_commit(manifest(2, 2, 9), 0, "t").unwrap();
        assert_eq!(s.lookup(&[9; 32]).unwrap().segment, 2);

        // Freeing the healthy copy leaves only the damaged one: nothing to reuse.
        assert_eq!(s.apply_delete(2, |_| 0), vec![2]);
        assert!(s.lookup(&[9; 32]).is_none());

        // A third copy, then the damaged checkpoint goes: segment 1 is freed, never reused.
        s.apply_commit(manifest(3, 3, 9), 0, "t").unwrap();
        assert_eq!(s.apply_delete(1, |_| 0), vec![1]);
        assert_eq!(s.lookup(&[9; 32]).unwrap().segment, 3);
        assert_eq!(s.apply_delete(3, |_| 0), vec![3]);
        assert!(s.lookup(&[9; 32]).is_none());
    }

    /// A quarantined chunk is never handed out; a fresh copy becomes the dedup target and
    /// the heal repoints the old checkpoint (freeing its segment); a quarantined chunk whose
    /// checkpoints are all deleted leaves the quarantine.
    #[test]
    fn quarantine_skips_heals_and_prunes() {
        let mut s = State::new();
        s.apply_commit(manifest(1, 1, 9), 0, "t").unwrap();
        let bad = s.checkpoints[&1].tensors[0].chunks[0].clone();
        let q = pb::QuarantineRecord {
            bad: vec![bad.clone()],
            healed: vec![],
        };
        assert!(s.apply_quarantine(&q, |_| 0, "t").unwrap().is_empty());
        assert!(s.lookup(&[9; 32]).is_none(), "never deduplicated against");
        assert!(s.heals(&[]).is_empty(), "no copy yet");
        s.apply_commit(manifest(2, 2, 9), 0, "t").unwrap();
        assert_eq!(s.lookup(&[9; 32]).unwrap().segment, 2);
        let heals = s.heals(&[]);
        assert_eq!(heals.len(), 1);
        let r = pb::QuarantineRecord {
            bad: vec![],
            healed: heals,
        };
        assert_eq!(s.apply_quarantine(&r, |_| 0, "t").unwrap(), vec![1]);
        assert_eq!(s.checkpoints[&1].tensors[0].chunks[0].segment, 2);
        assert!(
            s.checkpoints[&1].new_segments.is_empty(),
            "freed segment forgotten"
        );
        assert!(s.quarantined.is_empty());
        // Quarantined, then its only checkpoint deleted (segment kept by another chunk).
        let mut s = State::new();
        let mut m = manifest(1, 1, 9);
        let mut other = m.tensors[0].clone();
        other.name = "u".into();
        other.chunks[0].offset = 4096 + 10;
        other.chunks[0].blake3 = vec![8; 32];
        m.tensors.push(other);
        m.new_segments[0].length = 5000;
        s.apply_commit(m, 0, "t").unwrap();
        let mut m2 = manifest(2, 1, 8);
        m2.tensors[0].chunks[0].offset = 4096 + 10;
        m2.new_segments.clear();
        s.apply_commit(m2, 0, "t").unwrap();
        s.apply_quarantine(&q, |_| 0, "t").unwrap();
        assert_eq!(s.quarantined.len(), 1);
        assert!(s.apply_delete(1, |_| 0).is_empty(), "segment 1 still used");
        assert!(s.quarantined.is_empty(), "unreachable: pruned");
        assert!(s
            .compacted_records()
            .iter()
            .all(|r| r.0 != crate::wal::RecordType::Quarantine));
    }

    /// Two stored copies of the same bytes (a sharded commit does not deduplicate; a rebuild
    /// restores both): quarantining the one deduplication used points it at the other, which
    /// heals the first at once — no new save needed.
    #[test]
    fn quarantine_of_one_copy_heals_with_the_other() {
        let mut s = State::new();
        s.apply_commit(manifest(1, 1, 9), 0, "t").unwrap();
        s.apply_commit(manifest(2, 2, 9), 0, "t").unwrap();
        assert_eq!(s.lookup(&[9; 32]).unwrap().segment, 1);
        let bad = s.checkpoints[&1].tensors[0].chunks[0].clone();
        let q = pb::QuarantineRecord {
            bad: vec![bad],
            healed: vec![],
        };
        s.apply_quarantine(&q, |_| 0, "t").unwrap();
        assert_eq!(s.lookup(&[9; 32]).unwrap().segment, 2);
        let heals = s.heals(&[]);
        assert_eq!(heals.len(), 1);
        assert_eq!(heals[0].to.as_ref().unwrap().segment, 2);
    }
}
