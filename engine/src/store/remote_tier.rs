//! The store's side of the bucket tier (engine/src/remote/): the state image handed to the
//! publisher after every durable write, the replica's restore of an empty directory, and the
//! bucket store (`Store::open("s3://...")`): a local cache published synchronously.

use super::files::install_wal;
use super::{Options, Store};
use crate::error::{Error, Result};
use crate::io::Storage;
use crate::remote::{
    self, Bucket, CommitObject, LocalImage, Publisher, RemoteUrl, ReplicaStatus, Replication,
    Replicator, Streamer,
};
use crate::wal::RecordType;
use ckptstore_proto::v1 as pb;
use prost::Message;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Name of the file (in a replicated store's directory) holding this directory's upload token.
pub const REPLICA_TOKEN_NAME: &str = "REPLICA_TOKEN";

pub(crate) struct RemoteTier {
    kind: Kind,
    /// Generation of the last state handed over (one per durable write).
    generation: u64,
}

enum Kind {
    Replica(Replicator),
    /// A bucket store: publish at commit; `marker` names the sequence number the cache holds
    /// (absent while a publish is in progress or failed: the next open pulls again).
    Sync {
        publisher: Publisher,
        marker: PathBuf,
        /// Uploads the transactions' segments while they are written (the publisher takes them).
        streamer: Arc<Streamer>,
    },
}

pub(crate) fn bucket_for(url: &RemoteUrl, opts: &Options) -> Result<Arc<Bucket>> {
    let b = unchecked_bucket(url, opts)?;
    b.check_access()?;
    Ok(b)
}

/// [`bucket_for`] without the access check (for a caller that lists the commit log at once).
fn unchecked_bucket(url: &RemoteUrl, opts: &Options) -> Result<Arc<Bucket>> {
    let mut b = Bucket::open(url)?.with_policy(opts.remote_policy);
    if let Some(f) = &opts.remote_faults {
        b = b.with_faults(f.clone());
    }
    Ok(Arc::new(b))
}

/// The replica bucket of `opts.replica`, checked readable before anything is written.
pub(crate) fn replica_bucket(url: &str, opts: &Options) -> Result<Arc<Bucket>> {
    bucket_for(&url.parse()?, opts)
}

/// Checkpoint ids held by a commit object.
fn checkpoints_of(obj: &CommitObject) -> BTreeSet<u64> {
    obj.records
        .iter()
        .filter(|(ty, _)| *ty == RecordType::Commit)
        .filter_map(|(_, p)| pb::CommitRecord::decode(p.as_slice()).ok())
        .filter_map(|r| r.manifest.map(|m| m.id))
        .collect()
}

/// Writes `obj`'s state into `dir`, lazily: the list of its segment objects
/// (`REMOTE_SEGMENTS`, store/lazy.rs), then a WAL holding its records whose header declares
/// the `lazy-segments` feature, then `CURRENT` (the restore's commit point: a pull cut short
/// leaves no store, and starts again; no crash leaves a store without the feature and
/// segments in the bucket, so no build without it opens one). No segment is downloaded: each
/// is fetched by the first read that needs it.
fn restore(io: &dyn Storage, dir: &Path, obj: &CommitObject, bucket: &Bucket) -> Result<()> {
    let seg_dir = dir.join(super::SEGMENTS_DIR);
    io.create_dir_all(&seg_dir)
        .map_err(|e| Error::io("create dir", &seg_dir, e))?;
    super::lazy::write(io, dir, bucket.url(), &obj.segments)?;
    install_wal(
        io,
        dir,
        obj.features.with(&crate::features::LAZY_SEGMENTS),
        &obj.records,
    )
}

/// A replica's restore: when `dir` holds no store (no `CURRENT`), fill it from the bucket's
/// newest state. Runs under the writer lock, before recovery.
pub(crate) fn restore_if_empty(io: &dyn Storage, dir: &Path, bucket: &Bucket) -> Result<()> {
    let current = dir.join(crate::current::CURRENT_NAME);
    if io
        .exists(&current)
        .map_err(|e| Error::io("stat", &current, e))?
    {
        return Ok(());
    }
    match remote::latest(bucket)? {
        Some(obj) => restore(io, dir, &obj, bucket),
        None => Ok(()),
    }
}

/// `ckptstore pull URL DIR`: the bucket's newest state into `dir` (which must hold no store).
pub fn pull(url: &str, dir: &Path, opts: &Options) -> Result<Option<u64>> {
    let bucket = bucket_for(&url.parse()?, opts)?;
    let io = &*opts.io;
    if io
        .exists(&dir.join(crate::current::CURRENT_NAME))
        .unwrap_or(false)
    {
        return Err(Error::invalid(format!(
            "{} already holds a store; pull into an empty directory",
            dir.display()
        )));
    }
    super::recovery::create_store_dir(io, dir)?;
    let Some(obj) = remote::latest(&bucket)? else {
        return Ok(None);
    };
    restore(io, dir, &obj, &bucket)?;
    Ok(Some(obj.seq))
}

/// A random upload token (16 hex digits).
fn fresh_token() -> Result<String> {
    let mut raw = [0u8; 8];
    getrandom::fill(&mut raw).map_err(|e| Error::invalid(format!("getrandom: {e}")))?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

/// This directory's upload token: read, or created (random) on first use.
fn token(io: &dyn Storage, path: &Path) -> Result<String> {
    if let Ok(b) = super::files::read_small(io, path, 64) {
        if let Ok(s) = String::from_utf8(b) {
            let s = s.trim();
            if s.len() == 16 && s.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Ok(s.to_string());
            }
        }
    }
    let t = fresh_token()?;
    let _ = io.remove_file(path);
    let f = io
        .create_new(path)
        .map_err(|e| Error::io("create", path, e))?;
    f.write_at(t.as_bytes(), 0)
        .map_err(|e| Error::io("write", path, e))?;
    f.sync_data().map_err(|e| Error::io("fdatasync", path, e))?;
    Ok(t)
}

/// Starts the replicator of a store just opened, and hands it the current state unless the
/// bucket holds it already.
pub(crate) fn start_replica(store: &Store, bucket: Arc<Bucket>) -> Result<RemoteTier> {
    let io = &*store.opts.io;
    let token = token(io, &store.dir.join(REPLICA_TOKEN_NAME))?;
    let mut publisher =
        Publisher::new(bucket, &token)?.with_keep_last(store.opts.replica_keep_last);
    let _ = publisher.sweep();
    let head = publisher.head().cloned();
    // Segments a lazy restore left in another bucket (pulled from one, replicated to another)
    // must be local to be uploaded: fetched now. Those this bucket holds stay where they are.
    for id in store.segments_in_bucket() {
        let len = store.state.segments.get(&id).map(|s| s.len);
        let held = head
            .as_ref()
            .and_then(|h| h.segments.get(&id))
            .is_some_and(|s| Some(s.len) == len);
        if !held {
            store.segment_file(id)?;
        }
    }
    let known = head.as_ref().map(checkpoints_of).unwrap_or_default();
    let rep = Replicator::start(publisher, known)?;
    let mut tier = RemoteTier {
        kind: Kind::Replica(rep),
        generation: 0,
    };
    let img = store.image(1);
    let same = head.is_some_and(|h| {
        h.records == img.records
            && h.segments
                .iter()
                .map(|(&id, s)| (id, s.len))
                .eq(img.segments.iter().map(|(&id, &len)| (id, len)))
    });
    tier.generation = 1;
    if let Kind::Replica(r) = &tier.kind {
        if same {
            r.mark_current(1);
        } else {
            r.submit(img);
        }
    }
    Ok(tier)
}

/// The cache directory of a bucket store: `$CKPTSTORE_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/ckptstore`, else `~/.cache/ckptstore`; then `remote/<hash of the URL>`.
pub(crate) fn cache_dir(url: &RemoteUrl) -> Result<PathBuf> {
    let base = std::env::var_os("CKPTSTORE_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("ckptstore")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/ckptstore")))
        .ok_or_else(|| {
            Error::invalid("no cache directory: set CKPTSTORE_CACHE_DIR, XDG_CACHE_HOME or HOME")
        })?;
    let h = blake3::hash(url.to_string().as_bytes()).to_hex();
    Ok(base.join("remote").join(&h.as_str()[..16]))
}

fn read_marker(io: &dyn Storage, path: &Path) -> Option<u64> {
    let b = super::files::read_small(io, path, 32).ok()?;
    std::str::from_utf8(&b).ok()?.trim().parse().ok()
}

fn write_marker(io: &dyn Storage, path: &Path, seq: u64) -> Result<()> {
    remove_marker(io, path)?;
    let f = io
        .create_new(path)
        .map_err(|e| Error::io("create", path, e))?;
    f.write_at(seq.to_string().as_bytes(), 0)
        .map_err(|e| Error::io("write", path, e))?;
    f.sync_data().map_err(|e| Error::io("fdatasync", path, e))
}

pub(crate) fn remove_marker(io: &dyn Storage, path: &Path) -> Result<()> {
    super::files::remove_if_present(io, path).map(drop)
}

/// `Store::open` of a bucket URL: the cache is brought to the bucket's newest commit object
/// (pulled again whenever it is not known to hold exactly that), then opened as a local store
/// whose every durable write is published before it returns.
pub(crate) fn open_url(url: &str, opts: Options) -> Result<Store> {
    if opts.replica.is_some() {
        return Err(Error::invalid(
            "a bucket store (URL) takes no replica; give the replica to a local directory",
        ));
    }
    let rurl: RemoteUrl = url.parse()?;
    let bucket = unchecked_bucket(&rurl, &opts)?;
    // Its listing is the access check: a clear error before anything is written.
    let head = remote::latest(&bucket).map_err(Bucket::access_error)?;
    let io = opts.io.clone();
    let cache = match &opts.cache_dir {
        Some(d) => d.clone(),
        None => cache_dir(&rurl)?,
    };
    super::recovery::create_store_dir(&*io, &cache)?;
    // One process per cache, reader or writer (either may replace a stale cache): the writer
    // lock's mechanism on the cache directory itself, held as long as the store is open.
    let cache_lock = super::writer_lock::take(&*io, &cache).map_err(|e| match e {
        Error::Locked { pid, .. } => Error::CacheLocked {
            url: rurl.to_string(),
            path: cache.clone(),
            pid,
        },
        other => other,
    })?;
    let store_dir = cache.join("store");
    let marker = cache.join("SEQ");
    let head_seq = head.as_ref().map_or(0, |h| h.seq);
    let cached = read_marker(&*io, &marker) == Some(head_seq)
        && io
            .exists(&store_dir.join(crate::current::CURRENT_NAME))
            .unwrap_or(false);
    if !cached {
        remove_marker(&*io, &marker)?;
        // The cache is a copy of the bucket, never the only one: a stale one is dropped whole.
        match std::fs::remove_dir_all(&store_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove dir", &store_dir, e)),
        }
        super::recovery::create_store_dir(&*io, &store_dir)?;
        if let Some(h) = &head {
            restore(&*io, &store_dir, h, &bucket)?;
        }
        write_marker(&*io, &marker, head_seq)?;
    }
    let read_only = opts.read_only;
    let mut store = Store::open_dir(&store_dir, opts, None)?;
    store._cache_lock = Some(cache_lock);
    if !read_only {
        // A token of this open's own: the uploads of a writer that died before its local
        // commit are never taken for segments written after the recovery (same ids).
        let token = fresh_token()?;
        let streamer = Arc::new(Streamer::new(bucket.clone(), &token, io.clone()));
        let mut publisher =
            Publisher::with_head(bucket, &token, head)?.with_streamer(streamer.clone());
        // Leftovers of a writer that died are removed (best effort: a failure leaves them for
        // the next open, and the store works regardless).
        let _ = publisher.sweep();
        store.remote = Some(RemoteTier {
            kind: Kind::Sync {
                publisher,
                marker,
                streamer,
            },
            generation: 0,
        });
    }
    Ok(store)
}

/// The file marking a bucket store's cache that holds its state but not its segments (the
/// writer of sharded saves: `remote_shard::open_shard_writer`).
pub(crate) const STATE_ONLY_NAME: &str = "STATE_ONLY";

/// Makes `cache` (a bucket store's cache directory) hold `head`'s state, its records as WAL
/// file 1, without downloading any segment, unless it holds exactly that already; marks it
/// state-only. `open_url` then takes it as current.
pub(crate) fn seed_state_only(
    io: &dyn Storage,
    cache: &Path,
    head: Option<&CommitObject>,
) -> Result<()> {
    super::recovery::create_store_dir(io, cache)?;
    let (store_dir, marker) = (cache.join("store"), cache.join("SEQ"));
    let flag = cache.join(STATE_ONLY_NAME);
    let seq = head.map_or(0, |h| h.seq);
    if read_marker(io, &marker) == Some(seq)
        && io.exists(&flag).unwrap_or(false)
        && io
            .exists(&store_dir.join(crate::current::CURRENT_NAME))
            .unwrap_or(false)
    {
        return Ok(());
    }
    remove_marker(io, &marker)?;
    match std::fs::remove_dir_all(&store_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("remove dir", &store_dir, e)),
    }
    super::recovery::create_store_dir(io, &store_dir)?;
    if let Some(h) = head {
        install_wal(io, &store_dir, h.features, &h.records)?;
    }
    if !io.exists(&flag).unwrap_or(false) {
        let f = io
            .create_new(&flag)
            .map_err(|e| Error::io("create", &flag, e))?;
        f.sync_data()
            .map_err(|e| Error::io("fdatasync", &flag, e))?;
    }
    write_marker(io, &marker, seq)
}

impl RemoteTier {
    /// A bucket store's publisher and the marker file of its cache (`None` for a replica).
    pub(crate) fn sync_publisher(&mut self) -> Option<(&mut Publisher, &Path)> {
        match &mut self.kind {
            Kind::Sync {
                publisher, marker, ..
            } => Some((publisher, marker.as_path())),
            Kind::Replica(_) => None,
        }
    }
}

impl Store {
    /// What a transaction's segment writer tells as it writes: a bucket store's streamer.
    pub(crate) fn segment_tap(&self) -> Option<Arc<dyn crate::segment::SegmentTap>> {
        match self.remote.as_ref().map(|r| &r.kind) {
            Some(Kind::Sync { streamer, .. }) => {
                Some(streamer.clone() as Arc<dyn crate::segment::SegmentTap>)
            }
            _ => None,
        }
    }

    /// The live state as the publisher takes it, as generation `generation`.
    fn image(&self, generation: u64) -> LocalImage {
        LocalImage {
            features: self.features,
            generation,
            records: self.state.compacted_records(),
            segments: self
                .state
                .segments
                .iter()
                .map(|(&id, s)| (id, s.len))
                .collect(),
            checkpoints: self.state.checkpoints.keys().copied().collect(),
            seg_dir: self.dir.join(super::SEGMENTS_DIR),
            io: self.opts.io.clone(),
        }
    }

    /// After a durable write: queue the state for the replica, or publish it to the bucket
    /// store (an error then poisons the store: the cache holds a write the bucket does not,
    /// and the next open pulls the bucket's state again).
    pub(crate) fn publish_after_durable_write(&mut self) -> Result<()> {
        let Some(generation) = self.remote.as_ref().map(|r| r.generation + 1) else {
            return Ok(());
        };
        let img = self.image(generation);
        let io = self.opts.io.clone();
        let Some(tier) = self.remote.as_mut() else {
            return Ok(());
        };
        tier.generation = generation;
        let r = match &mut tier.kind {
            Kind::Replica(rep) => {
                rep.submit(img);
                return Ok(());
            }
            Kind::Sync {
                publisher, marker, ..
            } => remove_marker(&*io, marker)
                .and_then(|()| publisher.publish(&img))
                .and_then(|seq| write_marker(&*io, marker, seq)),
        };
        r.map_err(|e| self.poison(e))
    }

    /// Where each live checkpoint is, oldest first: `Replicated` once the bucket's newest
    /// commit object holds it. Without a bucket tier, all `LocalOnly`; in a bucket store
    /// (`s3://`), all `Replicated` (a commit returns only then).
    pub fn replication(&self) -> Vec<(u64, Replication)> {
        let held: Option<BTreeSet<u64>> = match self.remote.as_ref().map(|r| &r.kind) {
            Some(Kind::Replica(rep)) => Some(rep.status().checkpoints),
            Some(Kind::Sync { .. }) => None,
            None => Some(BTreeSet::new()),
        };
        self.state
            .checkpoints
            .keys()
            .map(|&id| {
                let r = match &held {
                    Some(h) if !h.contains(&id) => Replication::LocalOnly,
                    _ => Replication::Replicated,
                };
                (id, r)
            })
            .collect()
    }

    /// The replicator's status (`None` without a replica).
    pub fn replica_status(&self) -> Option<ReplicaStatus> {
        match self.remote.as_ref().map(|r| &r.kind) {
            Some(Kind::Replica(rep)) => Some(rep.status()),
            _ => None,
        }
    }

    /// Blocks until the replica holds this store's current state (every checkpoint committed
    /// so far, and every deletion), or `timeout` passes: then [`Error::Remote`] with the
    /// replicator's last failure. Returns at once without a replica, and in a bucket store.
    pub fn wait_replicated(&self, timeout: Option<Duration>) -> Result<()> {
        let Some(tier) = &self.remote else {
            return Ok(());
        };
        let Kind::Replica(rep) = &tier.kind else {
            return Ok(());
        };
        rep.wait(tier.generation, timeout)
            .map_err(|st| Error::Remote {
                url: self.opts.replica.clone().unwrap_or_default(),
                op: "replicate",
                key: String::new(),
                message: match (st.stopped, st.last_error) {
                    (true, Some(e)) => format!("the replicator stopped: {e}"),
                    (_, Some(e)) => format!("not replicated within {timeout:?}; last failure: {e}"),
                    (_, None) => format!("not replicated within {timeout:?}"),
                },
            })
    }
}
