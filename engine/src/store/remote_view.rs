//! [`RemoteView`]: a partial local copy of a bucket store, for a process that reads only some
//! tensors of a checkpoint (a `torch.distributed.checkpoint` rank loading its part): the
//! newest commit object's state (its records, as a WAL) and only the segments fetched so far.
//! Opened read-only as a directory, the view reads what it fetched; a segment not fetched is
//! reported missing (`Error::SegmentMissing`) by name, never read as something else.

use super::files::install_wal;
use super::remote_tier::{bucket_for, cache_dir};
use super::scratch::Scratch;
use super::{Options, SEGMENTS_DIR};
use crate::error::{Error, Result};
use crate::io::Storage;
use crate::manifest;
use crate::remote::{self, Bucket, CommitObject, RemoteUrl};
use crate::wal::RecordType;
use ckptstore_proto::v1 as pb;
use prost::Message;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

/// A local view of a bucket store's newest state, fetching segments on demand.
pub struct RemoteView {
    bucket: Arc<Bucket>,
    dir: Scratch,
    head: Option<CommitObject>,
    io: Arc<dyn Storage>,
}

impl std::fmt::Debug for RemoteView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteView")
            .field("url", &self.bucket.url().to_string())
            .field("dir", &self.dir.path())
            .field("seq", &self.seq())
            .finish()
    }
}

impl RemoteView {
    /// Reads the newest commit object of the bucket store `url` (one LIST and one GET) and
    /// writes its state into a new directory `<cache>/views/<random>` (the cache as for a
    /// bucket store: `Options::cache_dir`, else `$CKPTSTORE_CACHE_DIR`, ...), without any
    /// segment. The directory is removed when the view is dropped (a killed process's, by a
    /// later view: [`Scratch`]).
    pub fn open(url: &str, opts: &Options) -> Result<RemoteView> {
        let rurl: RemoteUrl = url.parse()?;
        let bucket = bucket_for(&rurl, opts)?;
        let base = match &opts.cache_dir {
            Some(d) => d.clone(),
            None => cache_dir(&rurl)?,
        };
        let io = opts.io.clone();
        let scratch = Scratch::create(&io, &base.join("views"))?;
        let dir = scratch.path();
        let head = remote::latest(&bucket)?;
        let (features, records) = match &head {
            Some(h) => (h.features, h.records.clone()),
            None => (crate::features::FeatureSet::EMPTY, Vec::new()),
        };
        install_wal(&*io, dir, features, &records)?;
        Ok(RemoteView {
            bucket,
            dir: scratch,
            head,
            io,
        })
    }

    /// The view's directory (a store: open it read-only).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The sequence number of the commit object it shows (0: an empty store).
    pub fn seq(&self) -> u64 {
        self.head.as_ref().map_or(0, |h| h.seq)
    }

    /// Downloads, whole, the segments holding the chunks of the tensors and blobs `names` of
    /// checkpoint `checkpoint` that the view lacks (every segment of the checkpoint when its
    /// names are sealed). Returns the ids of the segments those names need. Names the
    /// checkpoint lacks are skipped (the read then says what is missing).
    pub fn fetch(&self, checkpoint: u64, names: &[String]) -> Result<Vec<u64>> {
        let Some(head) = &self.head else {
            return Ok(Vec::new());
        };
        let m = head
            .records
            .iter()
            .filter(|(ty, _)| *ty == RecordType::Commit)
            .filter_map(|(_, p)| pb::CommitRecord::decode(p.as_slice()).ok())
            .filter_map(|r| r.manifest)
            .find(|m| m.id == checkpoint)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "checkpoint {checkpoint} is not in {} (commit object {})",
                    self.bucket.url(),
                    head.seq
                ))
            })?;
        let wanted: BTreeSet<&str> = names.iter().map(String::as_str).collect();
        let needed: BTreeSet<u64> = if !m.sealed_body.is_empty() {
            manifest::all_chunks(&m).map(|c| c.segment).collect()
        } else {
            let tensors = m
                .tensors
                .iter()
                .filter(|t| wanted.contains(t.name.as_str()));
            let blobs = m.blobs.iter().filter(|b| wanted.contains(b.name.as_str()));
            tensors
                .flat_map(|t| t.chunks.iter())
                .chain(blobs.flat_map(|b| b.chunks.iter()))
                .map(|c| c.segment)
                .collect()
        };
        let part = CommitObject {
            segments: head
                .segments
                .iter()
                .filter(|(id, _)| needed.contains(id))
                .map(|(&id, o)| (id, o.clone()))
                .collect(),
            ..head.clone()
        };
        let seg_dir = self.dir.path().join(SEGMENTS_DIR);
        remote::download_segments(&self.bucket, &part, &seg_dir, &*self.io)?;
        Ok(needed.into_iter().collect())
    }
}
