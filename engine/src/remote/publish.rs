//! [`Publisher`]: makes the bucket's newest commit object describe a local store's state:
//! uploads the segments the bucket lacks, then creates the next commit object (the commit
//! point, create-if-absent), then deletes what no commit object names any more.

use super::bucket::Bucket;
use super::layout::{log_key, parse_log_key, segment_key, LOG_DIR, SEGMENTS_DIR};
use super::object::{CommitObject, SegmentObject};
use super::pull;
use super::stream::Streamer;
use crate::error::{Error, Result};
use crate::io::Storage;
use crate::segment;
use crate::wal::RecordType;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

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
    /// Uploads of segments made while they were written (a bucket store's transactions).
    streamer: Option<Arc<Streamer>>,
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
            streamer: None,
        })
    }

    /// Keeps up to `k` checkpoints in the bucket even when the local store keeps fewer.
    pub fn with_keep_last(mut self, k: Option<usize>) -> Self {
        self.keep_last = k;
        self
    }

    /// Takes the segments `streamer` uploaded while they were written instead of uploading
    /// them again (its token must be this publisher's).
    pub fn with_streamer(mut self, streamer: Arc<Streamer>) -> Self {
        self.streamer = Some(streamer);
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
                // Streamed while it was written, or uploaded now.
                None => match self.streamer.as_ref().and_then(|s| s.take(id, len)) {
                    Some(streamed) => {
                        let o = streamed?;
                        self.uploaded.insert(id, o.clone());
                        o
                    }
                    None => self.upload(img, id, len)?,
                },
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

    /// Uploads segment `id` (`len` committed bytes) from the local store.
    fn upload(&mut self, img: &LocalImage, id: u64, len: u64) -> Result<SegmentObject> {
        let key = segment_key(&self.token, id);
        let path = img.seg_dir.join(segment::file_name(id));
        let file = img
            .io
            .open(&path, false)
            .map_err(|e| Error::io("open", &path, e))?;
        self.bucket.upload_file(&key, &*file, len)?;
        let o = SegmentObject { key, len };
        self.uploaded.insert(id, o.clone());
        Ok(o)
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
        let mine = format!("{SEGMENTS_DIR}/{}/", self.token);
        let mut removed = Vec::new();
        for o in self.unnamed(self.bucket.policy().orphan_grace)? {
            if o.removable && !o.key.starts_with(&mine) {
                self.bucket.delete(&o.key)?;
                removed.push(o.key);
            }
        }
        Ok(removed)
    }

    /// Every object the newest commit object does not name, oldest commit objects first:
    /// commit objects older than the head are always removable, segment objects once `grace`
    /// old (a younger one may be a live writer's upload in flight).
    pub fn unnamed(&self, grace: Duration) -> Result<Vec<Unnamed>> {
        let mut out = Vec::new();
        let head_seq = self.head_seq();
        let now = SystemTime::now();
        for o in self.bucket.list(LOG_DIR)? {
            if parse_log_key(&o.key).is_some_and(|s| s < head_seq) {
                out.push(Unnamed::of(o, now, true));
            }
        }
        let named: std::collections::BTreeSet<&str> = self
            .head
            .iter()
            .flat_map(|h| h.segments.values().map(|s| s.key.as_str()))
            .collect();
        for o in self.bucket.list(SEGMENTS_DIR)? {
            if !named.contains(o.key.as_str()) {
                let old = now
                    .duration_since(o.last_modified)
                    .is_ok_and(|age| age >= grace);
                out.push(Unnamed::of(o, now, old));
            }
        }
        Ok(out)
    }

    /// `ckptstore recover URL`: the newest commit object, and what no commit names — removed
    /// when `apply` and old enough (`grace`), else only reported. Unlike [`Publisher::sweep`]
    /// it spares no writer's token: run it when no writer is running, or keep a grace longer
    /// than any upload.
    pub fn recover(&mut self, grace: Duration, apply: bool) -> Result<BucketRecovery> {
        let mut unnamed = self.unnamed(grace)?;
        if apply {
            for o in unnamed.iter_mut().filter(|o| o.removable) {
                self.bucket.delete(&o.key)?;
                o.removed = true;
            }
        }
        let head = self.head.as_ref();
        Ok(BucketRecovery {
            head_seq: head.map(|h| h.seq),
            checkpoints: head.map_or(0, |h| {
                h.records
                    .iter()
                    .filter(|(ty, _)| *ty == RecordType::Commit)
                    .count()
            }),
            segment_objects: head.map_or(0, |h| h.segments.len()),
            segment_bytes: head.map_or(0, |h| h.segments.values().map(|s| s.len).sum()),
            unnamed,
        })
    }
}

/// An object no commit object names ([`Publisher::unnamed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unnamed {
    /// Key relative to the store's prefix.
    pub key: String,
    /// Bytes.
    pub size: u64,
    /// Since the server last wrote it.
    pub age: Duration,
    /// Old enough to remove (a superseded commit object always is).
    pub removable: bool,
    /// Removed by this run.
    pub removed: bool,
}

impl Unnamed {
    fn of(o: super::bucket::Listed, now: SystemTime, removable: bool) -> Unnamed {
        Unnamed {
            age: now.duration_since(o.last_modified).unwrap_or_default(),
            key: o.key,
            size: o.size,
            removable,
            removed: false,
        }
    }
}

/// What [`Publisher::recover`] found in a bucket store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketRecovery {
    /// The newest commit object's sequence number (`None`: an empty store).
    pub head_seq: Option<u64>,
    /// Live checkpoints it holds.
    pub checkpoints: usize,
    /// Segment objects it names, and their bytes.
    pub segment_objects: usize,
    /// Bytes of those.
    pub segment_bytes: u64,
    /// Objects it does not name.
    pub unnamed: Vec<Unnamed>,
}
