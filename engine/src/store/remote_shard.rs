//! Sharded saves into a bucket store, by processes that share no file system (the ranks of
//! `torch.distributed.checkpoint` on several hosts): each writes its shard with a
//! [`super::ShardWriter`] into a scratch directory of its own ([`shard_scratch`]), uploads its
//! segments as immutable objects under a fresh random token ([`upload_shard`], so two ranks
//! never write one name), and hands the fragment and the object names to the coordinator,
//! whose bucket store commits everything as ONE checkpoint ([`Store::commit_external_remote`]:
//! one commit object, created if absent, the single-writer fence). Objects of a save that
//! never committed are named by no commit object: readers never see them, and a writer's open
//! removes them once older than `orphan_grace` (docs/GUARANTEES.md, "Object storage").
//!
//! The object layout is the bucket layout's: rank segments are ordinary segment objects
//! `segments/<token>/<NNNNNNNN>.seg`, so no format feature is involved.

use super::remote_tier::{bucket_for, cache_dir, remove_marker, seed_state_only, STATE_ONLY_NAME};
use super::scratch::{random_hex, Scratch};
use super::shard::ShardFragment;
use super::{Options, Store, SEGMENTS_DIR};
use crate::error::{Error, Result};
use crate::manifest::{CheckpointInfo, MetaValue};
use crate::remote::{self, segment_key, RemoteUrl, SegmentObject};
use crate::segment;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A new, empty scratch store directory for one shard of the bucket store `url` (with its
/// `segments/`), under the cache directory (`Options::cache_dir`, else
/// `$CKPTSTORE_CACHE_DIR`, ...): `<cache>/shards/<random>`, removed when dropped (after
/// [`upload_shard`]); a killed writer's is removed by a later one ([`Scratch`]).
pub fn shard_scratch(url: &str, opts: &Options) -> Result<Scratch> {
    let rurl: RemoteUrl = url.parse()?;
    let base = match &opts.cache_dir {
        Some(d) => d.clone(),
        None => cache_dir(&rurl)?,
    };
    let scratch = Scratch::create(&opts.io, &base.join("shards"))?;
    super::recovery::create_store_dir(&*opts.io, &scratch.path().join(SEGMENTS_DIR))?;
    Ok(scratch)
}

/// Uploads the segments `fragment` names, from `dir/segments/`, to the bucket store `url`, as
/// objects `segments/<token>/<NNNNNNNN>.seg` under a fresh random token (each exactly the
/// committed bytes). Returns segment id → object, for [`Store::commit_external_remote`].
/// Nothing names these objects until that commit.
pub fn upload_shard(
    url: &str,
    dir: &Path,
    fragment: &ShardFragment,
    opts: &Options,
) -> Result<Vec<(u64, SegmentObject)>> {
    let bucket = bucket_for(&url.parse()?, opts)?;
    let token = random_hex()?;
    let mut out = Vec::new();
    for (id, len) in fragment.segments() {
        let path = dir.join(SEGMENTS_DIR).join(segment::file_name(id));
        let file = opts
            .io
            .open(&path, false)
            .map_err(|e| Error::io("open", &path, e))?;
        let key = segment_key(&token, id);
        bucket.upload_file(&key, &*file, len)?;
        out.push((id, SegmentObject { key, len }));
    }
    Ok(out)
}

/// Opens the bucket store `url` as the writer of sharded saves whose processes upload their
/// own segments (the DCP coordinator): its cache, `<cache>/shard-writer` (or
/// `Options::cache_dir`), holds the newest commit object's state and this writer's own
/// segments, and no segment is downloaded, however large the store. Its reads of other
/// segments fail with `Error::SegmentMissing` (recovery reports them missing): read through an
/// ordinary open of the URL, or a [`super::RemoteView`].
pub fn open_shard_writer(url: &str, mut opts: Options) -> Result<Store> {
    let rurl: RemoteUrl = url.parse()?;
    let cache = match &opts.cache_dir {
        Some(d) => d.clone(),
        None => cache_dir(&rurl)?.join("shard-writer"),
    };
    let bucket = bucket_for(&rurl, &opts)?;
    let head = remote::latest(&bucket)?;
    // (A commit landing before the open below only makes that open restore the cache again,
    // lazily: no segment is fetched until read.)
    seed_state_only(&*opts.io, &cache, head.as_ref())?;
    opts.cache_dir = Some(cache);
    Store::open(url, opts)
}

/// Whether `key` is a segment object name for segment `id` (`segments/<16 hex>/<file>`).
fn is_segment_key(key: &str, id: u64) -> bool {
    let Some(rest) = key
        .strip_prefix(SEGMENTS_DIR)
        .and_then(|r| r.strip_prefix('/'))
    else {
        return false;
    };
    let Some((token, file)) = rest.split_once('/') else {
        return false;
    };
    token.len() == 16
        && token.bytes().all(|c| c.is_ascii_hexdigit())
        && file == segment::file_name(id)
}

impl Store {
    /// Commits, as one checkpoint, fragments of shard writers of which some ran on other
    /// hosts and uploaded their segments ([`upload_shard`]): `uploaded` maps those segment ids
    /// to their objects. A bucket store (`s3://`) only. Each object must exist in the bucket
    /// with the committed length and a segment object's name; the other segments are checked
    /// as by [`Store::commit_external`] (in this store's cache directory, and the one with the
    /// highest id must be among them: it holds the commit trailer). The commit is the one
    /// commit object, created if absent: [`Error::WriterConflict`] if another writer created
    /// it first. The objects are named, not uploaded again.
    ///
    /// An ordinary cache directory then lacks the uploaded segments: it is marked stale, and
    /// the next open of the URL pulls the bucket's state again. Open the writer with
    /// [`open_shard_writer`] to keep a cache of the state only, which nothing pulls.
    pub fn commit_external_remote(
        &mut self,
        step: u64,
        epoch: u64,
        metadata: BTreeMap<String, MetaValue>,
        fragments: &[ShardFragment],
        uploaded: &[(u64, SegmentObject)],
    ) -> Result<CheckpointInfo> {
        self.check_writable()?;
        let Some(bucket) = self
            .remote
            .as_mut()
            .and_then(|r| r.sync_publisher())
            .map(|(p, _)| p.bucket().clone())
        else {
            return Err(Error::invalid(
                "shards uploaded to a bucket commit only into that bucket's store (s3://...)",
            ));
        };
        let written: BTreeMap<u64, u64> = fragments.iter().flat_map(|f| f.segments()).collect();
        let mut objects = BTreeMap::new();
        for (id, o) in uploaded {
            if !is_segment_key(&o.key, *id) {
                return Err(Error::invalid(format!(
                    "{:?} is not the name of an uploaded segment {id}",
                    o.key
                )));
            }
            if written.get(id) != Some(&o.len) {
                return Err(Error::invalid(format!(
                    "object {} ({} bytes) is not a segment a fragment wrote",
                    o.key, o.len
                )));
            }
            if objects.insert(*id, o.clone()).is_some() {
                return Err(Error::invalid(format!("segment {id} uploaded twice")));
            }
        }
        if written
            .keys()
            .next_back()
            .is_some_and(|id| objects.contains_key(id))
        {
            return Err(Error::invalid(
                "the segment with the highest id must be the committing process's own (it \
                 holds the commit trailer): write the coordinator's part last",
            ));
        }
        // Every object is there, whole (one listing per upload token).
        let mut dirs: BTreeMap<&str, Vec<(u64, &SegmentObject)>> = BTreeMap::new();
        for (id, o) in &objects {
            let dir = o.key.rsplit_once('/').map_or("", |(d, _)| d);
            dirs.entry(dir).or_default().push((*id, o));
        }
        for (dir, objs) in dirs {
            let listed: BTreeMap<String, u64> = bucket
                .list(dir)?
                .into_iter()
                .map(|l| (l.key, l.size))
                .collect();
            for (_, o) in objs {
                match listed.get(&o.key) {
                    Some(&size) if size == o.len => {}
                    found => {
                        return Err(Error::SegmentMissing {
                            path: PathBuf::from(format!("{}/{}", bucket.url(), o.key)),
                            problem: found.map_or("missing".into(), |s| format!("{s} bytes")),
                            checkpoint: self.state.next_checkpoint_id,
                            needed: o.len,
                        })
                    }
                }
            }
        }
        let (publisher, marker) = self
            .remote
            .as_mut()
            .and_then(|r| r.sync_publisher())
            .ok_or_else(|| Error::invalid("not a bucket store"))?;
        let marker = marker.to_path_buf();
        for (id, o) in &objects {
            publisher.adopt(*id, o.clone());
        }
        let ids: BTreeSet<u64> = objects.keys().copied().collect();
        let info = self.commit_fragments(step, epoch, metadata, fragments, &ids)?;
        // An ordinary cache lacks the uploaded segments now: its next open pulls instead of
        // trusting it. (Should this removal fail, that open finds them missing, reports them
        // damaged and fails the reads of this checkpoint by name; `rm -rf` of the cache
        // repairs it.) A state-only cache (`open_shard_writer`) lacks them by design.
        let state_only = marker.with_file_name(STATE_ONLY_NAME);
        if !self.opts.io.exists(&state_only).unwrap_or(false) {
            let _ = remove_marker(&*self.opts.io, &marker);
        }
        Ok(info)
    }
}
