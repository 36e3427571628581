//! The commit protocol, in one function: a checkpoint exists once its commit record is
//! durable in the WAL, and not before (docs/GUARANTEES.md).
//!
//! [`Store::commit_manifest`] takes a manifest whose new segments are already fdatasync'ed
//! (by a transaction's or a shard's segment writer) and:
//! 1. fsyncs `segments/`, so the segment files' directory entries are durable;
//! 2. assigns the checkpoint id and wall time, attaches the metadata, validates the manifest
//!    and bounds the record's size; for a sealed checkpoint links it into the MAC chain
//!    (crate::store::chain) and seals its body (the record holds the WAL form,
//!    `crypt::wal_form`);
//! 3. writes a copy of the commit record after the frames of the commit's last new segment
//!    (the commit trailer, docs/FORMAT.md) and fdatasyncs it, so the segments alone can
//!    rebuild the store (`Store::rebuild`);
//! 4. appends the commit record to the WAL and fdatasyncs it — the commit point;
//! 5. applies the manifest to the in-memory state and runs the WAL compaction a durable
//!    write may call for.
//!
//! A failed fsync or append poisons the store: the kernel may have dropped dirty pages, so
//! nothing written since the last good sync can be trusted until a reopen's recovery.

use super::{Store, SEGMENTS_DIR};
use crate::error::{Error, Result};
use crate::features::SEGMENT_COMMIT_TRAILER;
use crate::manifest::{self, CheckpointInfo, MetaValue};
use crate::segment::{trailer, SegmentWriter};
use crate::wal::{self, RecordType};
use ckptstore_proto::v1 as pb;
use prost::Message;
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

impl Store {
    /// Commits `m` (step, epoch, tensors, blobs and the new segments it references, already
    /// fdatasync'ed) with `metadata` as the next checkpoint: the protocol of the module
    /// documentation. `context` names the checkpoint in errors. Returns only when the
    /// checkpoint is durable.
    ///
    /// `hand_over` runs once the commit record may be on disk — after the append, whether
    /// it succeeded or not: from then on the new segments belong to the store (or, after a
    /// failed append, to the next recovery), and the caller must not remove them. Before
    /// that, on an error, they are still the caller's to clean up.
    pub(crate) fn commit_manifest(
        &mut self,
        mut m: pb::Manifest,
        metadata: BTreeMap<String, MetaValue>,
        context: &str,
        hand_over: impl FnOnce(&mut Store),
    ) -> Result<CheckpointInfo> {
        self.check_writable()?;
        // A commit that wrote no chunk still gets a segment, holding only its trailer, so
        // that every acknowledged checkpoint can be rebuilt (docs/FORMAT.md, "Commit
        // trailer"). Removed if the commit fails before its commit point.
        let mut trailer_only =
            SegmentWriter::new(self.opts.io.clone(), self.dir.join(SEGMENTS_DIR));
        if m.new_segments.is_empty() {
            let created = self
                .state
                .allocate_segment_id()
                .and_then(|id| trailer_only.create_empty(id))
                .and_then(|()| trailer_only.sync());
            match created {
                Ok(segs) => m.new_segments = segs,
                Err(e) if trailer_only.sync_failed() => return Err(self.poison(e)),
                Err(e) => return Err(e),
            }
        }
        if !m.new_segments.is_empty() {
            let seg_dir = self.dir.join(SEGMENTS_DIR);
            if let Err(e) = self.opts.io.sync_dir(&seg_dir) {
                return Err(self.poison(Error::io("fsync dir", &seg_dir, e)));
            }
        }
        m.id = self.state.next_checkpoint_id;
        if m.id == u64::MAX || self.state.checkpoints.contains_key(&m.id) {
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
        m.metadata = metadata
            .into_iter()
            .map(|(key, v)| pb::MetaEntry {
                key,
                value: Some(v.to_pb()),
            })
            .collect();
        manifest::validate(&m, context)?;
        if let Some(sealer) = self.keys().current().filter(|_| !m.key_id.is_empty()) {
            m.prev_mac = self.state.head_mac().unwrap_or_default();
            m.mac = sealer.commit_mac(&m).to_vec();
            sealer.seal_body(&mut m)?;
        }
        let payload = pb::CommitRecord {
            manifest: Some(crate::crypt::wal_form(&m).into_owned()),
        }
        .encode_to_vec();
        if payload.len() > wal::MAX_RECORD_LEN as usize {
            return Err(Error::invalid(format!(
                "manifest of {} bytes exceeds the {}-byte WAL record limit (too many tensors)",
                payload.len(),
                wal::MAX_RECORD_LEN
            )));
        }
        if let Err(e) = self.write_commit_trailer(&m, &payload) {
            return Err(self.poison(e));
        }
        let appended = self.wal_mut()?.append_durable(RecordType::Commit, &payload);
        trailer_only.release();
        hand_over(self);
        // The record may have reached the disk even if the append failed: the segments stay
        // (if it did, they are needed; if it did not, recovery removes them).
        let record_len = appended.map_err(|e| self.poison(e))?;
        let id = m.id;
        if let Err(e) = self.state.apply_commit(m, record_len, context) {
            // Unreachable: the manifest was validated and its id is fresh. Should it happen,
            // the durable record and the memory disagree: refuse further writes.
            return Err(self.poison(e));
        }
        let info = match self.state.checkpoints.get(&id) {
            Some(m) => self.state.info(m),
            None => {
                return Err(self.poison(Error::invalid(format!(
                    "{context}: committed checkpoint {id} missing from the state"
                ))))
            }
        };
        // A fresh copy of a quarantined chunk heals the checkpoints that reference it.
        self.heal_after_durable_write();
        self.compact_after_durable_write();
        // The bucket tier: a replica is queued (nothing waits on the network); a bucket store
        // (`s3://`) publishes here, and the commit is durable only once that returns.
        self.publish_after_durable_write()?;
        Ok(info)
    }

    /// Step 3: the commit trailer, in the new segment with the highest id (for a shard
    /// commit, a shard's segment: the committing process writes it). Before the WAL record,
    /// so every acknowledged commit has its trailer durable (a commit that wrote no chunk —
    /// every chunk deduplicated, or no chunk — got a segment of its own for it). The first
    /// commit of a store from before the trailers turns the feature on (a WAL rewrite).
    /// A failed trailer write fails the commit before its commit point (nothing committed)
    /// and, like every failed write or sync, poisons the store.
    fn write_commit_trailer(&mut self, m: &pb::Manifest, payload: &[u8]) -> Result<()> {
        let Some(seg) = m.new_segments.iter().max_by_key(|s| s.id) else {
            return Err(Error::invalid("a commit without a segment for its trailer"));
        };
        if !self.features.contains(&SEGMENT_COMMIT_TRAILER) {
            self.enable_feature(&SEGMENT_COMMIT_TRAILER)?;
        }
        let path = self.segment_path(seg.id);
        let f = self
            .opts
            .io
            .open(&path, true)
            .map_err(|e| Error::io("open", &path, e))?;
        f.write_at(&trailer::encode(seg.id, payload), seg.length)
            .map_err(|e| Error::io("write", &path, e))?;
        f.sync_data().map_err(|e| Error::io("fdatasync", &path, e))
    }
}
