//! Commits of checkpoints that shard writers (other processes) wrote: reserving segment ids
//! for them, committing their fragments as one checkpoint through the ordinary commit record,
//! and removing what an abandoned save left. See `shard.rs` for the writer side and
//! docs/DECISIONS.md, "Multi-process checkpoints".

use super::shard::ShardFragment;
use super::{Store, SEGMENTS_DIR};
use crate::error::{Error, Result};
use crate::manifest::{self, CheckpointInfo, MetaValue};
use crate::segment;
use ckptstore_proto::v1 as pb;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::PathBuf;

/// Segment ids handed to shard writers and not yet committed or aborted.
#[derive(Debug, Default)]
pub(crate) struct Reservations {
    ranges: Vec<Range<u64>>,
}

impl Reservations {
    fn contains(&self, id: u64) -> bool {
        self.ranges.iter().any(|r| r.contains(&id))
    }
}

impl Store {
    /// Reserves `count` disjoint ranges of `per_range` segment ids each, one per shard writer.
    /// This store never hands them to its own transactions; they end with
    /// [`Store::commit_external`] or [`Store::abort_external`] (or when the store is closed,
    /// after which recovery removes whatever was written and not committed).
    pub fn reserve_segment_ids(&mut self, count: usize, per_range: u64) -> Result<Vec<Range<u64>>> {
        self.check_writable()?;
        if count == 0 || per_range == 0 {
            return Err(Error::invalid(
                "reserve at least one id in at least one range",
            ));
        }
        let total = per_range
            .checked_mul(count as u64)
            .and_then(|n| self.state.next_segment_id.checked_add(n))
            .filter(|&end| end < u64::MAX)
            .ok_or_else(|| Error::invalid("segment ids are exhausted"))?;
        let start = self.state.next_segment_id;
        self.state.next_segment_id = total;
        let out: Vec<Range<u64>> = (0..count as u64)
            .map(|i| start + i * per_range..start + (i + 1) * per_range)
            .collect();
        self.reservations.ranges.extend(out.iter().cloned());
        Ok(out)
    }

    /// Removes the segment files in the reserved ranges that no commit took (a shard failed,
    /// or the save was abandoned), then fsyncs `segments/`, and ends the reservations.
    /// Returns the files removed. A poisoned store removes nothing (a commit record whose
    /// fdatasync failed may still be on disk): the next open's recovery removes the orphans.
    pub fn abort_external(&mut self) -> Result<Vec<PathBuf>> {
        let ranges = std::mem::take(&mut self.reservations.ranges);
        // A poisoned store does not know what reached the disk: recovery decides.
        if ranges.is_empty() || self.wal.is_none() || self.poisoned.is_some() {
            return Ok(Vec::new());
        }
        let seg_dir = self.dir.join(SEGMENTS_DIR);
        let io = self.opts.io.clone();
        let names = io
            .list(&seg_dir)
            .map_err(|e| Error::io("list", &seg_dir, e))?;
        let mut removed = Vec::new();
        for name in names {
            let Some(id) = segment::parse_file_name(&name) else {
                continue;
            };
            if ranges.iter().any(|r| r.contains(&id)) && !self.state.segments.contains_key(&id) {
                let path = seg_dir.join(name);
                if super::files::remove_if_present(&*io, &path)? {
                    removed.push(path);
                }
            }
        }
        if !removed.is_empty() {
            io.sync_dir(&seg_dir)
                .map_err(|e| Error::io("fsync dir", &seg_dir, e))?;
        }
        Ok(removed)
    }

    /// Commits the fragments of shard writers as one checkpoint at `step`, through the
    /// ordinary commit path: every segment a fragment names must lie in a range this store
    /// reserved, not be part of the store yet, exist with at least the stated length and
    /// carry its own id in a valid header; then `segments/` is fsync'ed and the commit record
    /// appended to the WAL and fdatasync'ed. Names must be unique across fragments. On
    /// success the reservations end (call [`Store::abort_external`] after a failure).
    pub fn commit_external(
        &mut self,
        step: u64,
        epoch: u64,
        metadata: BTreeMap<String, MetaValue>,
        fragments: &[ShardFragment],
    ) -> Result<CheckpointInfo> {
        self.commit_fragments(step, epoch, metadata, fragments, &BTreeSet::new())
    }

    /// [`Store::commit_external`], where the segments in `uploaded` are not in this store's
    /// directory but objects in its bucket (checked there by the caller, `remote_shard.rs`).
    pub(super) fn commit_fragments(
        &mut self,
        step: u64,
        epoch: u64,
        metadata: BTreeMap<String, MetaValue>,
        fragments: &[ShardFragment],
        uploaded: &BTreeSet<u64>,
    ) -> Result<CheckpointInfo> {
        self.check_writable()?;
        if self.keys.current().is_some() {
            // Shard writers run without the store and write plain segments: committing them
            // into a store opened with a key would leave a plain checkpoint among sealed ones.
            return Err(Error::invalid(
                "sharded saves are not encrypted yet: open the store without a key to commit \
                 shards, or save through one writer",
            ));
        }
        let mut m = pb::Manifest {
            step,
            epoch,
            ..Default::default()
        };
        let mut seen = BTreeSet::new();
        for f in fragments {
            m.tensors.extend(f.manifest.tensors.iter().cloned());
            m.blobs.extend(f.manifest.blobs.iter().cloned());
            for s in &f.manifest.new_segments {
                if !seen.insert(s.id) {
                    return Err(Error::invalid(format!(
                        "segment {} named by two fragments",
                        s.id
                    )));
                }
                self.check_external_segment(s, uploaded.contains(&s.id))?;
                m.new_segments.push(*s);
            }
        }
        // A fragment may only reference the segments the fragments created: shard writers
        // never see the store's chunks (no deduplication across checkpoints for them).
        if let Some(c) = manifest::all_chunks(&m).find(|c| !seen.contains(&c.segment)) {
            return Err(Error::invalid(format!(
                "a fragment references segment {}, which no fragment created",
                c.segment
            )));
        }
        let context = format!("multi-process checkpoint at step {step}");
        // Once the record may be on disk, no abort may remove the segments (recovery decides,
        // after a reopen, if the append failed).
        self.commit_manifest(m, metadata, &context, |store| {
            store.reservations.ranges.clear()
        })
    }

    fn check_external_segment(&self, s: &pb::SegmentInfo, uploaded: bool) -> Result<()> {
        let path = self.segment_path(s.id);
        if !self.reservations.contains(s.id) {
            return Err(Error::invalid(format!(
                "segment {} ({}) is not in a range this store reserved",
                s.id,
                path.display()
            )));
        }
        if self.state.segments.contains_key(&s.id) {
            return Err(Error::invalid(format!(
                "segment {} is already part of the store",
                s.id
            )));
        }
        if uploaded {
            return Ok(());
        }
        let missing = |problem: String| Error::SegmentMissing {
            path: path.clone(),
            problem,
            checkpoint: self.state.next_checkpoint_id,
            needed: s.length,
        };
        let f = match self.opts.io.open(&path, false) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(missing("missing".into()))
            }
            Err(e) => return Err(Error::io("open", &path, e)),
        };
        let len = f.len().map_err(|e| Error::io("stat", &path, e))?;
        if len < s.length || s.length < segment::SEGMENT_DATA_OFFSET {
            return Err(missing(format!(
                "{len} bytes, the shard wrote {}",
                s.length
            )));
        }
        let mut head = vec![0u8; segment::SEGMENT_DATA_OFFSET as usize];
        f.read_at(&mut head, 0)
            .map_err(|e| Error::io("read", &path, e))?;
        match segment::decode_header(&head) {
            Ok(id) if id == s.id => Ok(()),
            _ => Err(Error::BadHeader {
                path,
                what: "segment",
            }),
        }
    }
}
