//! Segments left in the bucket by a lazy restore (docs/DECISIONS.md, "Lazy restore"): a
//! restore from a bucket (`Options::replica` on an empty directory, `ckptstore pull`, a bucket
//! store's cache) writes the WAL and this list, not the segments; the first read that needs a
//! segment fetches it whole into `segments/` and every chunk read from such a segment is
//! verified against its BLAKE3, whatever the caller asked; a chunk found bad drops the cache
//! file (the next read fetches it again) instead of quarantining the chunk.
//!
//! `REMOTE_SEGMENTS` (JSON, written durably before the restore's `CURRENT`, never rewritten)
//! names the bucket and, per segment id, its object key and length. While a segment it lists
//! is only in the bucket, the WAL header declares the incompatible feature `lazy-segments`
//! (features.rs), so that no build without it opens the directory; a writer that finds every
//! listed segment the live state needs local clears the feature (the WAL rewritten, `CURRENT`
//! switched) and only then removes the list ([`super::Store::settle_lazy`]). A segment it lists that is
//! missing locally is not damaged: recovery skips it, dedup may reference its chunks, deletes
//! and retention free it like any other (unlinking nothing), and gc leaves it alone until read.
//! A fetch writes `<segment>.fetch-<pid>-<n>`, fdatasyncs it, checks its header, renames it to
//! the segment's name and fsyncs the directory: a file with a segment's name is always whole,
//! and a fetch cut by a crash leaves only a temporary file the next writer open removes.

use crate::error::{Error, Result};
use crate::io::Storage;
use crate::remote::{Bucket, RemoteUrl, SegmentObject};
use crate::segment;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// The list's file name, in the store directory.
pub const REMOTE_SEGMENTS_NAME: &str = "REMOTE_SEGMENTS";
const VERSION: u64 = 1;
const MAX_LEN: u64 = 256 << 20;
const FETCH_SUFFIX: &str = ".fetch-";

/// The list as written: the bucket's URL and its segment objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RemoteList {
    pub url: String,
    pub segments: BTreeMap<u64, SegmentObject>,
}

fn corrupt(path: &Path, why: &str) -> Error {
    Error::invalid(format!(
        "{}: {why} (a lazy restore's list of bucket segments; remove the directory and restore \
         again)",
        path.display()
    ))
}

/// Writes the list durably (a temporary file, fdatasync'ed, renamed, the directory fsync'ed).
pub(crate) fn write(
    io: &dyn Storage,
    dir: &Path,
    url: &RemoteUrl,
    segs: &BTreeMap<u64, SegmentObject>,
) -> Result<()> {
    let list: Vec<serde_json::Value> = segs
        .iter()
        .map(|(id, s)| serde_json::json!({"id": id, "len": s.len, "key": s.key}))
        .collect();
    let doc = serde_json::json!({"version": VERSION, "url": url.to_string(), "segments": list});
    let bytes = doc.to_string().into_bytes();
    super::files::replace_file_atomically(
        io,
        dir,
        REMOTE_SEGMENTS_NAME,
        &format!("{REMOTE_SEGMENTS_NAME}.tmp"),
        &bytes,
    )
}

/// The list in `dir`; `None` when there is none (a store never restored lazily).
pub(crate) fn read(io: &dyn Storage, dir: &Path) -> Result<Option<RemoteList>> {
    let path = dir.join(REMOTE_SEGMENTS_NAME);
    let bytes = match super::files::read_small(io, &path, MAX_LEN) {
        Ok(b) => b,
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| corrupt(&path, &e.to_string()))?;
    if v["version"].as_u64() != Some(VERSION) {
        return Err(corrupt(&path, "unknown version"));
    }
    let url = v["url"]
        .as_str()
        .ok_or_else(|| corrupt(&path, "no url"))?
        .to_string();
    let mut segments = BTreeMap::new();
    for s in v["segments"]
        .as_array()
        .ok_or_else(|| corrupt(&path, "no segments"))?
    {
        let (Some(id), Some(len), Some(key)) =
            (s["id"].as_u64(), s["len"].as_u64(), s["key"].as_str())
        else {
            return Err(corrupt(&path, "bad segment entry"));
        };
        segments.insert(
            id,
            SegmentObject {
                key: key.to_string(),
                len,
            },
        );
    }
    Ok(Some(RemoteList { url, segments }))
}

/// Segment id → length of every segment the list names (recovery: those missing locally are
/// in the bucket, not damaged). Empty without a list; an unreadable list is an error.
pub(crate) fn listed_lengths(io: &dyn Storage, dir: &Path) -> Result<BTreeMap<u64, u64>> {
    Ok(read(io, dir)?
        .map(|l| l.segments.into_iter().map(|(id, s)| (id, s.len)).collect())
        .unwrap_or_default())
}

/// A store's segments still in the bucket, and how to fetch them.
pub(crate) struct LazySegments {
    url: String,
    policy: crate::remote::RetryPolicy,
    faults: Option<Arc<crate::remote::Faults>>,
    bucket: OnceLock<Arc<Bucket>>,
    /// Not yet local: id → object.
    pending: Mutex<BTreeMap<u64, SegmentObject>>,
    /// Every segment that came from the bucket (fetched now or by an earlier process), with
    /// its object: each chunk read from one is verified, and one found bad is fetched again.
    origin: BTreeMap<u64, SegmentObject>,
    /// One fetch at a time (reading threads asking for one segment fetch it once).
    fetching: Mutex<()>,
}

static FETCH_SEQ: AtomicU64 = AtomicU64::new(0);

impl LazySegments {
    /// After recovery: the listed segments the live state holds with the listed length
    /// (`None` when there are none). A writer removes fetches a crash cut short.
    pub(crate) fn open(
        io: &dyn Storage,
        dir: &Path,
        live: &BTreeMap<u64, u64>,
        opts: &super::Options,
    ) -> Result<Option<LazySegments>> {
        let Some(list) = read(io, dir)? else {
            return Ok(None);
        };
        let seg_dir = dir.join(super::SEGMENTS_DIR);
        let names = io.list(&seg_dir).unwrap_or_default();
        if !opts.read_only {
            for n in names.iter().filter(|n| n.contains(FETCH_SUFFIX)) {
                let _ = io.remove_file(&seg_dir.join(n));
            }
        }
        let local: BTreeSet<u64> = names
            .iter()
            .filter_map(|n| segment::parse_file_name(n))
            .collect();
        let origin: BTreeMap<u64, SegmentObject> = list
            .segments
            .into_iter()
            .filter(|(id, s)| live.get(id) == Some(&s.len))
            .collect();
        let pending: BTreeMap<u64, SegmentObject> = origin
            .iter()
            .filter(|(id, _)| !local.contains(id))
            .map(|(&id, s)| (id, s.clone()))
            .collect();
        if origin.is_empty() {
            return Ok(None);
        }
        Ok(Some(LazySegments {
            url: list.url,
            policy: opts.remote_policy,
            faults: opts.remote_faults.clone(),
            bucket: OnceLock::new(),
            pending: Mutex::new(pending),
            origin,
            fetching: Mutex::new(()),
        }))
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, SegmentObject>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether segment `id` came from the bucket (its chunks are verified on every read).
    pub(crate) fn came_from_bucket(&self, id: u64) -> bool {
        self.origin.contains_key(&id)
    }

    /// Drops the local copy of segment `id` (a read found a chunk in it bad: the cache file is
    /// damaged): the next read fetches it again. The bucket's copy is the store's; a damaged
    /// cache file is no damage to the store, so nothing is quarantined.
    pub(crate) fn evict(&self, io: &dyn Storage, seg_dir: &Path, id: u64) {
        let Some(obj) = self.origin.get(&id) else {
            return;
        };
        let _one = self
            .fetching
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = io.remove_file(&seg_dir.join(segment::file_name(id)));
        self.pending().insert(id, obj.clone());
    }

    /// Whether segment `id` is still only in the bucket.
    pub(crate) fn is_pending(&self, id: u64) -> bool {
        self.pending().contains_key(&id)
    }

    /// Segments still only in the bucket.
    pub(crate) fn pending_ids(&self) -> Vec<u64> {
        self.pending().keys().copied().collect()
    }

    /// Forgets segment `id` (freed: no live checkpoint needs it).
    pub(crate) fn forget(&self, id: u64) {
        self.pending().remove(&id);
    }

    fn bucket(&self) -> Result<Arc<Bucket>> {
        if let Some(b) = self.bucket.get() {
            return Ok(b.clone());
        }
        let url: RemoteUrl = self.url.parse()?;
        let mut b = Bucket::open(&url)?.with_policy(self.policy);
        if let Some(f) = &self.faults {
            b = b.with_faults(f.clone());
        }
        Ok(self.bucket.get_or_init(|| Arc::new(b)).clone())
    }

    /// Fetches segment `id` into `seg_dir` unless it is there (or not pending): a temporary
    /// file, downloaded, fdatasync'ed, its header checked, renamed, the directory fsync'ed.
    /// An error ([`Error::Remote`] after the bounded retries) leaves no file with the
    /// segment's name.
    pub(crate) fn fetch(&self, io: &dyn Storage, seg_dir: &Path, id: u64) -> Result<()> {
        let _one = self
            .fetching
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(obj) = self.pending().get(&id).cloned() else {
            return Ok(());
        };
        let path = seg_dir.join(segment::file_name(id));
        if io.exists(&path).unwrap_or(false) {
            self.pending().remove(&id);
            return Ok(());
        }
        io.create_dir_all(seg_dir)
            .map_err(|e| Error::io("create dir", seg_dir, e))?;
        let tmp: PathBuf = seg_dir.join(format!(
            "{}{FETCH_SUFFIX}{}-{}",
            segment::file_name(id),
            std::process::id(),
            FETCH_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let r = self.fetch_into(io, &tmp, &path, id, &obj);
        if r.is_err() {
            let _ = io.remove_file(&tmp);
        } else {
            self.pending().remove(&id);
        }
        r
    }

    fn fetch_into(
        &self,
        io: &dyn Storage,
        tmp: &Path,
        path: &Path,
        id: u64,
        obj: &SegmentObject,
    ) -> Result<()> {
        let bucket = self.bucket()?;
        let f = io
            .create_new(tmp)
            .map_err(|e| Error::io("create", tmp, e))?;
        bucket.download_file(&obj.key, obj.len, &*f)?;
        let got = f.len().map_err(|e| Error::io("stat", tmp, e))?;
        let mut h = [0u8; 32];
        let header_ok = got == obj.len
            && f.read_at(&mut h, 0).is_ok()
            && segment::decode_header(&h).is_ok_and(|found| found == id);
        if !header_ok {
            return Err(Error::Remote {
                url: self.url.clone(),
                op: "fetch",
                key: obj.key.clone(),
                message: format!(
                    "the object is not segment {id} of {} bytes (got {got} bytes); nothing \
                     kept",
                    obj.len
                ),
            });
        }
        f.sync_data().map_err(|e| Error::io("fdatasync", tmp, e))?;
        drop(f);
        io.rename(tmp, path)
            .map_err(|e| Error::io("rename", path, e))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        io.sync_dir(dir).map_err(|e| Error::io("fsync dir", dir, e))
    }
}

impl super::Store {
    /// A writer open's step: while a segment is only in the bucket, the WAL header must declare
    /// `lazy-segments`; a store a build before the feature restored lazily gets it now.
    pub(crate) fn declare_lazy(&mut self) -> Result<()> {
        use crate::features::LAZY_SEGMENTS;
        let in_bucket = self
            .lazy
            .as_ref()
            .is_some_and(|l| !l.pending_ids().is_empty());
        if in_bucket && !self.features.contains(&LAZY_SEGMENTS) {
            self.rewrite_wal(self.features.with(&LAZY_SEGMENTS))?;
        }
        Ok(())
    }

    /// Whether the directory still has any of a lazy restore's state: the feature, the list.
    pub(crate) fn has_lazy_state(&self) -> Result<bool> {
        let list = self.dir.join(REMOTE_SEGMENTS_NAME);
        Ok(self.lazy.is_some()
            || self.features.contains(&crate::features::LAZY_SEGMENTS)
            || self
                .opts
                .io
                .exists(&list)
                .map_err(|e| Error::io("stat", &list, e))?)
    }

    /// Makes a lazily restored directory an ordinary store, once nothing is left in the
    /// bucket (`fetch_all` of a writer, after every fetched chunk verified): the header is
    /// rewritten without `lazy-segments` (a new WAL, `CURRENT` switched, both durable), and
    /// only then is `REMOTE_SEGMENTS` removed and the directory fsync'ed. A crash before the
    /// rewrite leaves the lazy store, whole; a crash between the two an ordinary store with a
    /// stale list (nothing in it pending: its segments are only always verified), removed by
    /// the next `fetch_all`.
    pub(crate) fn clear_lazy(&mut self) -> Result<()> {
        use crate::features::LAZY_SEGMENTS;
        self.check_writable()?;
        if self
            .lazy
            .as_ref()
            .is_some_and(|l| !l.pending_ids().is_empty())
        {
            return Err(Error::invalid(
                "a segment is still in the bucket: the lazy-segments feature stays",
            ));
        }
        if self.features.contains(&LAZY_SEGMENTS) {
            self.rewrite_wal(self.features.without(&LAZY_SEGMENTS))?;
        }
        let io = self.opts.io.clone();
        let list = self.dir.join(REMOTE_SEGMENTS_NAME);
        if super::files::remove_if_present(&*io, &list)? {
            io.sync_dir(&self.dir)
                .map_err(|e| Error::io("fsync dir", &self.dir, e))?;
        }
        self.lazy = None;
        Ok(())
    }
}
