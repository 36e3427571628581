//! [`Publisher`]: makes the bucket's newest commit object describe a local store's state:
//! uploads the segments the bucket lacks, then creates the next commit object (the commit
//! point, create-if-absent), then deletes what no commit object names any more.

use super::bucket::Bucket;
use super::layout::{log_key, parse_log_key, segment_key, LOG_DIR, SEGMENTS_DIR};
use super::object::{CommitObject, SegmentObject};
use super::pull;
use crate::error::{Error, Result};
use crate::io::Storage;
use crate::segment;
use crate::wal::RecordType;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

/// A local store's live state, as the publisher needs it.
#[derive(Debug, Clone)]
pub struct LocalImage {
    /// The store's format features (what its WAL header declares).
    pub features: crate::features::FeatureSet,
    /// Increases with every durable write of the local store (what `wait_replicated` waits for).
    pub generation: u64,
    /// The records of a compacted WAL of the state.
    pub records: Vec<(RecordType, Vec<u8>)>,
    /// Live segments: id → committed length.
    pub segments: BTreeMap<u64, u64>,
    /// Live checkpoint ids.
    pub checkpoints: Vec<u64>,
    /// The directory of its segment files (`segments/` of the store).
    pub seg_dir: PathBuf,
    /// Its file system.
    pub io: Arc<dyn Storage>,
}

/// Publishes local states to one bucket prefix, as the single writer there.
#[derive(Debug)]
pub struct Publisher {
    bucket: Arc<Bucket>,
    token: String,
    head: Option<CommitObject>,
    /// Segment objects of this token that exist and no commit names yet (resumed uploads).
    uploaded: BTreeMap<u64, SegmentObject>,
    /// `Some(k)`: the bucket also keeps, of the checkpoints the local store deleted, those
    /// among the newest `k` (`replica_keep_last`). `None`: it mirrors the local store.
    keep_last: Option<usize>,
}

impl Publisher {
    /// Reads the bucket's newest commit object and this token's uploads (to resume without
    /// uploading again what is there), and removes old leftovers.
    pub fn new(bucket: Arc<Bucket>, token: &str) -> Result<Publisher> {
        let head = pull::latest(&bucket)?;
        Self::with_head(bucket, token, head)
    }

    /// [`Publisher::new`] with the newest commit object already read.
    pub fn with_head(
        bucket: Arc<Bucket>,
        token: &str,
        head: Option<CommitObject>,
    ) -> Result<Publisher> {
        if let Some(missing) = head.as_ref().and_then(|h| h.features.blocking(false)) {
            return Err(Error::NewerFormat {
                path: super::layout::log_key(head.as_ref().map_or(0, |h| h.seq)).into(),
                features: missing.names().join(", "),
                read_only_would_open: true,
            });
        }
        let mut uploaded = BTreeMap::new();
        for o in bucket.list(&format!("{SEGMENTS_DIR}/{token}"))? {
            let id = o.key.rsplit('/').next().and_then(segment::parse_file_name);
            if let Some(id) = id {
                uploaded.insert(
                    id,
                    SegmentObject {
                        key: o.key,
                        len: o.size,
                    },
                );
            }
        }
        if let Some(h) = &head {
            uploaded.retain(|id, _| !h.segments.contains_key(id));
        }
        Ok(Publisher {
            bucket,
            token: token.to_string(),
            head,
            uploaded,
            keep_last: None,
        })
    }

    /// Keeps up to `k` checkpoints in the bucket even when the local store keeps fewer.
    pub fn with_keep_last(mut self, k: Option<usize>) -> Self {
        self.keep_last = k;
        self
    }

    /// The newest commit object this publisher knows.
    pub fn head(&self) -> Option<&CommitObject> {
        self.head.as_ref()
    }

    /// Its sequence number (0: none yet).
    pub fn head_seq(&self) -> u64 {
        self.head.as_ref().map_or(0, |h| h.seq)
    }

    /// Takes segment `id` as uploaded already, as `obj` (a shard another process uploaded):
    /// the next [`Publisher::publish`] names it without uploading it.
    pub fn adopt(&mut self, id: u64, obj: SegmentObject) {
        self.uploaded.insert(id, obj);
    }

    /// The bucket.
    pub fn bucket(&self) -> &Arc<Bucket> {
        &self.bucket
    }

    /// Makes `img` the bucket's state: segments first, then commit object `head + 1`.
    /// Returns its sequence number. [`Error::WriterConflict`] if another writer created that
    /// number first (nothing overwritten). Any other error: nothing committed; what was
    /// uploaded is reused by the next call.
    pub fn publish(&mut self, img: &LocalImage) -> Result<u64> {
        let seq = self.head_seq() + 1;
        let (records, mut segments) = match (&self.head, self.keep_last) {
            (Some(h), Some(k)) => super::retain::merge(&img.records, &img.segments, h, k)?,
            _ => (img.records.clone(), BTreeMap::new()),
        };
        for (&id, &len) in &img.segments {
            let have = self
                .head
                .as_ref()
                .and_then(|h| h.segments.get(&id))
                .or_else(|| self.uploaded.get(&id))
                .filter(|s| s.len == len)
                .cloned();
            let obj = match have {
                Some(o) => o,
                None => {
                    let key = segment_key(&self.token, id);
                    let path = img.seg_dir.join(segment::file_name(id));
                    let file = img
                        .io
                        .open(&path, false)
                        .map_err(|e| Error::io("open", &path, e))?;
                    self.bucket.upload_file(&key, &*file, len)?;
                    let o = SegmentObject { key, len };
                    self.uploaded.insert(id, o.clone());
                    o
                }
            };
            segments.insert(id, obj);
        }
        // Segment objects hold committed bytes only, not the commit trailer past them: a store
        // pulled from the bucket has none, so it must not claim them. And the bucket holds
        // every segment of its state: a lazy restore's feature is the directory's, never the
        // bucket's (a pull sets it again).
        let features = img
            .features
            .without(&crate::features::SEGMENT_COMMIT_TRAILER)
            .without(&crate::features::LAZY_SEGMENTS);
        let obj = CommitObject {
            seq,
            features,
            segments,
            records,
        };
        if !self.bucket.put_create(&log_key(seq), obj.encode())? {
            return Err(Error::WriterConflict {
                url: self.bucket.url().to_string(),
                seq,
            });
        }
        self.uploaded.retain(|id, _| !obj.segments.contains_key(id));
        // This token's uploads of segments the local store has freed since: never needed.
        let dead: Vec<u64> = self
            .uploaded
            .keys()
            .filter(|id| !obj.segments.contains_key(id))
            .copied()
            .collect();
        for id in dead {
            if let Some(o) = self.uploaded.remove(&id) {
                let _ = self.bucket.delete(&o.key);
            }
        }
        let old = self.head.replace(obj);
        // Deletes come after the commit that dropped the references; a failure here leaves
        // leftovers that no commit names, removed by a later sweep.
        if let Some(old) = old {
            let _ = self.drop_superseded(&old);
        }
        Ok(seq)
    }

    /// Deletes commit object `old` and its segment objects the head no longer names.
    fn drop_superseded(&self, old: &CommitObject) -> Result<()> {
        let Some(head) = &self.head else {
            return Ok(());
        };
        self.bucket.delete(&log_key(old.seq))?;
        for (id, s) in &old.segments {
            if head.segments.get(id).map(|h| &h.key) != Some(&s.key) {
                self.bucket.delete(&s.key)?;
            }
        }
        Ok(())
    }

    /// Removes what no commit object names: older commit objects, and segment objects older
    /// than the policy's `orphan_grace` (leftovers of uploads cut short or of deletes cut short; a younger
    /// one may be another writer's upload in flight, and this token's own are kept for reuse).
    /// Returns the keys removed.
    pub fn sweep(&mut self) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        let head_seq = self.head_seq();
        for o in self.bucket.list(LOG_DIR)? {
            if parse_log_key(&o.key).is_some_and(|s| s < head_seq) {
                self.bucket.delete(&o.key)?;
                removed.push(o.key);
            }
        }
        let named: std::collections::BTreeSet<&str> = self
            .head
            .iter()
            .flat_map(|h| h.segments.values().map(|s| s.key.as_str()))
            .collect();
        let mine = format!("{SEGMENTS_DIR}/{}/", self.token);
        let now = SystemTime::now();
        for o in self.bucket.list(SEGMENTS_DIR)? {
            let old = now
                .duration_since(o.last_modified)
                .is_ok_and(|age| age >= self.bucket.policy().orphan_grace);
            if !named.contains(o.key.as_str()) && !o.key.starts_with(&mine) && old {
                self.bucket.delete(&o.key)?;
                removed.push(o.key);
            }
        }
        Ok(removed)
    }
}
