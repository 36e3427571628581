//! `replica_keep_last`: the bucket may keep more checkpoints than the local store. The state
//! published is the local one plus, of the checkpoints the bucket's head holds and the local
//! store deleted since, those among the newest `keep_last` of the two together.

use super::object::{CommitObject, SegmentObject};
use crate::error::{Error, Result};
use crate::manifest;
use crate::wal::RecordType;
use ckptstore_proto::v1 as pb;
use prost::Message;
use std::collections::{BTreeMap, BTreeSet};

/// A state's WAL records.
type Records = Vec<(RecordType, Vec<u8>)>;

/// The records and segment table to publish: `records`/`segments` (the local state) merged
/// with the checkpoints of `head` that `keep_last` keeps. Segments that only kept checkpoints
/// reference come with their objects from `head`.
pub(crate) fn merge(
    records: &[(RecordType, Vec<u8>)],
    segments: &BTreeMap<u64, u64>,
    head: &CommitObject,
    keep_last: usize,
) -> Result<(Records, BTreeMap<u64, SegmentObject>)> {
    let bad = |what: &str| Error::BadCommitObject {
        name: super::layout::log_key(head.seq),
        reason: what.to_string(),
    };
    let decode = |recs: &[(RecordType, Vec<u8>)]| -> Result<BTreeMap<u64, pb::Manifest>> {
        let mut out = BTreeMap::new();
        for (ty, p) in recs {
            if *ty == RecordType::Commit {
                let m = pb::CommitRecord::decode(p.as_slice())
                    .ok()
                    .and_then(|r| r.manifest)
                    .ok_or_else(|| bad("undecodable commit record"))?;
                out.insert(m.id, m);
            }
        }
        Ok(out)
    };
    let local = decode(records)?;
    let remote = decode(&head.records)?;
    let all: BTreeSet<u64> = local.keys().chain(remote.keys()).copied().collect();
    let newest: BTreeSet<u64> = all.iter().rev().take(keep_last).copied().collect();
    let mut extra_segments: BTreeMap<u64, SegmentObject> = BTreeMap::new();
    let mut kept: Vec<pb::Manifest> = Vec::new();
    'm: for (id, m) in remote {
        if local.contains_key(&id) || !newest.contains(&id) {
            continue;
        }
        let mut need = BTreeMap::new();
        for c in manifest::all_chunks(&m) {
            if segments.contains_key(&c.segment) {
                continue;
            }
            match head.segments.get(&c.segment) {
                Some(s) => {
                    need.insert(c.segment, s.clone());
                }
                None => continue 'm, // not whole in the bucket: not kept
            }
        }
        extra_segments.extend(need);
        kept.push(m);
    }
    if kept.is_empty() {
        return Ok((records.to_vec(), BTreeMap::new()));
    }
    let live: BTreeSet<u64> = segments
        .keys()
        .chain(extra_segments.keys())
        .copied()
        .collect();
    let mut out = Vec::with_capacity(records.len() + kept.len());
    let mut commits: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for (ty, p) in records {
        match ty {
            RecordType::Snapshot => {
                let mut s = pb::SnapshotRecord::decode(p.as_slice())
                    .map_err(|_| bad("undecodable snapshot record"))?;
                s.segments.extend(
                    extra_segments
                        .iter()
                        .map(|(&id, o)| pb::SegmentInfo { id, length: o.len }),
                );
                s.segments.sort_by_key(|g| g.id);
                out.push((RecordType::Snapshot, s.encode_to_vec()));
            }
            RecordType::Commit => {
                if let Some(m) = pb::CommitRecord::decode(p.as_slice())
                    .ok()
                    .and_then(|r| r.manifest)
                {
                    commits.insert(m.id, p.clone());
                }
            }
            _ => {}
        }
    }
    for mut m in kept {
        m.new_segments.retain(|s| live.contains(&s.id));
        let id = m.id;
        let rec = pb::CommitRecord { manifest: Some(m) };
        commits.insert(id, rec.encode_to_vec());
    }
    out.extend(commits.into_values().map(|p| (RecordType::Commit, p)));
    out.extend(
        records
            .iter()
            .filter(|(ty, _)| !matches!(ty, RecordType::Snapshot | RecordType::Commit))
            .cloned(),
    );
    Ok((out, extra_segments))
}
