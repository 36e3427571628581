//! The store: open (with recovery), write transactions, listing, reading, deletion,
//! verification and WAL compaction. See docs/GUARANTEES.md for the contract.

mod chain;
mod commit;
mod compact;
mod direct_run;
mod external;
mod files;
mod free;
mod gc;
mod lazy;
mod lease;
mod leftovers;
mod lost_found;
mod owned_load;
mod perms;
mod prefetch;
mod quarantine;
mod reader;
mod rebuild;
mod recovery;
mod rekey;
mod remote_shard;
mod remote_tier;
mod remote_view;
mod scratch;
mod select;
mod shard;
mod state;
mod suggest;
mod txn;
mod view;
mod writer_lock;

pub use chain::ChainReport;
pub use compact::CompactionPlan;
#[doc(hidden)]
pub use files::{parse_wal_file_name, wal_file_name, LOCK_NAME, SEGMENTS_DIR};
pub use gc::{GcOptions, GcReport, SpaceStats};
pub use lazy::REMOTE_SEGMENTS_NAME;
#[doc(hidden)]
pub use lease::READERS_DIR;
pub use lost_found::{PurgeReport, LOST_FOUND_DIR};
pub use owned_load::DIRECT_LOAD_MIN_BYTES;
pub use quarantine::{ChunkLocation, HealReport, ScrubReport};
pub use reader::{CheckpointReader, Tensor, VerifiedChunks};
pub use rebuild::RebuildReport;
pub use recovery::RecoveryReport;
pub use rekey::RekeyReport;
pub use remote_shard::{open_shard_writer, shard_scratch, upload_shard};
pub use remote_tier::{pull, REPLICA_TOKEN_NAME};
pub use remote_view::RemoteView;
pub use scratch::Scratch;
pub use select::{LoadReport, LoadSpec, NamePredicate};
pub use shard::{ShardFragment, ShardOptions, ShardWriter};
pub use txn::{CommitInfo, Transaction};
pub(crate) use txn::{StagedChunk, StagedEntry};
pub use view::TensorView;

use crate::retention::{self, RetentionPlan, RetentionPolicy};

use crate::codec::Compression;
use crate::error::{Error, Result};
use crate::features::{self, Feature, FeatureSet};
use crate::io::{Storage, StorageFile};
use crate::manifest::{CheckpointInfo, Manifest};
use crate::segment;
use crate::wal::{self, RecordType};
use ckptstore_proto::v1 as pb;
use files::WalWriter;
use prost::Message;
use state::{referenced_segments, State};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// How recovery treats a damaged WAL or missing segments (names as in RocksDB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecoveryMode {
    /// Refuse to open on any damage, even a torn tail left by a crash mid-commit, and on a
    /// missing or truncated segment.
    AbsoluteConsistency,
    /// Default. Cut a torn tail (the one record being written when the writer died, never
    /// acknowledged); refuse to open on corruption before it. Checkpoints whose segments are
    /// missing or short stay listed, fail verification and are skipped by `latest_valid`.
    #[default]
    TolerateTailCorruption,
    /// Salvage: keep every record before the first corrupt one, skip it, and keep every valid
    /// record after it that applies to the state (stopping at a record of a newer version).
    /// What is skipped leaves the store; the WAL as it was and the segments only skipped
    /// records referenced are moved to `lost+found/`.
    PointInTime,
}

/// Options of [`Store::open`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Open without the writer lock; never modifies the directory. Default `false`.
    pub read_only: bool,
    /// See [`RecoveryMode`]. Default `TolerateTailCorruption`.
    pub recovery_mode: RecoveryMode,
    /// Tensors are cut into chunks of this many bytes (the unit of hashing and
    /// deduplication). Default 4 MiB; bounds 4 KiB ..= 1 GiB.
    pub chunk_size: usize,
    /// A transaction starts a new segment file once the current one reaches this size.
    /// Default 1 GiB; at least 1 MiB.
    pub segment_max_bytes: u64,
    /// The WAL is rewritten (compacted) when it is larger than this and more than twice the
    /// size of the live records. Default 8 MiB.
    pub wal_compact_min_bytes: u64,
    /// Compression of the chunks this store writes (synchronous transactions and the
    /// write pipeline alike). Default [`Compression::None`]. Reading never depends on it:
    /// chunks of every codec are read back whatever this says.
    pub compression: Compression,
    /// [`Store::gc`] compacts a segment when the bytes its live chunks would take, rewritten,
    /// are below this fraction of its data bytes. Default 0.5; bounds 0.0 ..= 1.0 (0 never
    /// compacts on this rule alone).
    pub compact_live_fraction: f64,
    /// [`Store::gc`] also compacts the emptiest segments (live fraction below 0.9) while the
    /// segment files would otherwise take more than this many times the live chunk bytes.
    /// Default 1.5; at least 1.0 (`f64::INFINITY` turns the rule off).
    pub max_space_amplification: f64,
    /// The file system. Default [`crate::io::default_storage`]: `UringIo` where io_uring
    /// can be set up (shared by the process), else [`crate::io::StdIo`]; `CKPTSTORE_IO=std|uring`
    /// forces one.
    pub io: Arc<dyn Storage>,
    /// Permission bits of the files this store creates (less the umask); its directories get
    /// the matching search bits (0600 -> 0700, 0640 -> 0750, 0660 -> 0770). Default 0600: the
    /// owner only. 0640 shares read access with the group. Existing files keep their modes.
    pub file_mode: u32,
    /// Open a store directory that is world-writable, or (for a writer) owned by another user,
    /// instead of refusing it (`Error::UnsafeDir`). Default `false`. Symlinked `segments/` or
    /// `readers/` are refused regardless.
    pub allow_unsafe_dir: bool,
    /// Seal (encrypt and authenticate) the chunks of every checkpoint this store writes with
    /// this key (docs/FORMAT.md, "Encryption"). Also the key reads use. Default `None`: new
    /// checkpoints are plain. A store holding sealed checkpoints refuses to open without a key
    /// for them ([`Error::KeyRequired`], [`Error::WrongKey`]). The key is never stored.
    pub encryption_key: Option<crate::crypt::Key>,
    /// Keys of checkpoints sealed before a rotation: read with these, never written with.
    pub old_keys: Vec<crate::crypt::Key>,
    /// A replica bucket (`s3://bucket/prefix` or `file:///dir`): commits stay local and durable
    /// on return, and a background replicator copies each committed state to the bucket (see
    /// [`Store::replication`], [`Store::wait_replicated`]). Opening a directory without a store
    /// in it pulls the bucket's newest state first. Default `None`.
    pub replica: Option<String>,
    /// With a replica: the bucket keeps, of the checkpoints this store deletes, those among
    /// the newest `N` (the bucket may keep more than the local disk). Default `None`: the
    /// bucket mirrors the local store. At least 1.
    pub replica_keep_last: Option<usize>,
    /// Where a bucket store (`Store::open("s3://...")`) keeps its local cache. Default `None`:
    /// `$CKPTSTORE_CACHE_DIR`, else `$XDG_CACHE_HOME/ckptstore`, else `~/.cache/ckptstore`,
    /// then `remote/<hash of the URL>`. One process at a time per cache: a second opener, reader
    /// or writer, gets [`Error::CacheLocked`].
    pub cache_dir: Option<PathBuf>,
    /// Retries, timeouts, part size and parts in flight of the bucket tier's requests.
    pub remote_policy: crate::remote::RetryPolicy,
    /// A fault injector for the bucket tier's requests (tests).
    #[doc(hidden)]
    pub remote_faults: Option<Arc<crate::remote::Faults>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            read_only: false,
            recovery_mode: RecoveryMode::default(),
            chunk_size: 4 << 20,
            segment_max_bytes: 1 << 30,
            wal_compact_min_bytes: 8 << 20,
            compact_live_fraction: 0.5,
            max_space_amplification: 1.5,
            compression: Compression::None,
            io: crate::io::default_storage(),
            file_mode: crate::io::DEFAULT_FILE_MODE,
            allow_unsafe_dir: false,
            encryption_key: None,
            old_keys: Vec::new(),
            replica: None,
            replica_keep_last: None,
            cache_dir: None,
            remote_policy: crate::remote::RetryPolicy::default(),
            remote_faults: None,
        }
    }
}

impl Options {
    /// Read-only options with defaults otherwise.
    pub fn read_only() -> Self {
        Options {
            read_only: true,
            ..Default::default()
        }
    }

    fn validate(&self) -> Result<()> {
        if !(4096..=1 << 30).contains(&self.chunk_size) {
            return Err(Error::invalid(format!(
                "chunk_size {} outside 4096..=1073741824",
                self.chunk_size
            )));
        }
        if self.segment_max_bytes < 1 << 20 {
            return Err(Error::invalid(format!(
                "segment_max_bytes {} below 1 MiB",
                self.segment_max_bytes
            )));
        }
        if !(0.0..=1.0).contains(&self.compact_live_fraction) {
            return Err(Error::invalid(format!(
                "compact_live_fraction {} outside 0.0..=1.0",
                self.compact_live_fraction
            )));
        }
        if self.max_space_amplification.is_nan() || self.max_space_amplification < 1.0 {
            return Err(Error::invalid(format!(
                "max_space_amplification {} below 1.0",
                self.max_space_amplification
            )));
        }
        if self.file_mode & !0o777 != 0 || self.file_mode & 0o600 != 0o600 {
            return Err(Error::invalid(format!(
                "file_mode {:o}: permission bits (at most 0777) that let the owner read and \
                 write (e.g. 0600, 0640)",
                self.file_mode
            )));
        }
        if self.replica_keep_last == Some(0) {
            return Err(Error::invalid("replica_keep_last 0: keep at least 1"));
        }
        self.compression.validate()
    }
}

/// How to pick a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selector {
    /// The newest committed checkpoint.
    Latest,
    /// By id (assigned at commit, increasing).
    Id(u64),
    /// The newest checkpoint with this training step.
    Step(u64),
}

/// What a deletion did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteInfo {
    /// The checkpoint deleted.
    pub id: u64,
    /// Segment files freed (no live checkpoint referenced them any more; also segments an
    /// earlier deletion left to a reader that has closed since).
    pub segments_freed: Vec<u64>,
    /// Their bytes.
    pub bytes_freed: u64,
    /// Segments no live checkpoint references but an open reader's lease still holds: kept
    /// until it closes, then freed by the next delete, [`Store::gc`] or open.
    pub segments_pending: Vec<u64>,
}

/// Sizes of the store's files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Live checkpoints.
    pub checkpoints: usize,
    /// Live segment files.
    pub segments: usize,
    /// Their committed bytes.
    pub segment_bytes: u64,
    /// Bytes of the live WAL file.
    pub wal_bytes: u64,
}

/// A checkpoint store in one directory. One writer at a time (a lock file); read-only opens
/// may coexist with it.
pub struct Store {
    dir: PathBuf,
    opts: Options,
    _lock: Option<writer_lock::WriterLock>,
    wal: Option<WalWriter>,
    /// The format features the live WAL's header declares.
    features: FeatureSet,
    state: State,
    poisoned: Option<String>,
    report: RecoveryReport,
    open_segments: Mutex<HashMap<u64, Arc<dyn StorageFile>>>,
    /// Reading threads' buffers, kept between reads so that their pages are mapped once.
    read_scratch: reader::ScratchPool,
    /// A read-only store's lease on the segments it may read (None for the writer, or when
    /// the lease could not be taken: see [`Store::reader_lease`]).
    lease: Option<lease::ReaderLease>,
    /// Segments no live checkpoint references, kept for a reader's lease (id → bytes).
    pending_free: BTreeMap<u64, u64>,
    /// Segment ids handed to shard writers ([`Store::reserve_segment_ids`]).
    reservations: external::Reservations,
    /// The keys supplied ([`Options::encryption_key`], [`Options::old_keys`]).
    keys: crate::crypt::Keyring,
    /// The bucket tier: a replicator, or a bucket store's synchronous publisher.
    remote: Option<remote_tier::RemoteTier>,
    /// Chunks verified reads found bad, not yet quarantined (see `quarantine.rs`).
    suspects: quarantine::Suspects,
    /// Segments a lazy restore left in the bucket, fetched when first read (`lazy.rs`).
    lazy: Option<lazy::LazySegments>,
    /// A bucket store's hold on its local cache (one process per cache).
    _cache_lock: Option<writer_lock::WriterLock>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("read_only", &self.opts.read_only)
            .field("checkpoints", &self.state.checkpoints.len())
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

/// Refuses to open a store holding sealed checkpoints when no key supplied opens the newest
/// of them: without a key, [`Error::KeyRequired`]; with other keys, [`Error::WrongKey`]. Older
/// checkpoints sealed under a key not supplied fail when read (a rotation's old key may be
/// left out to read only the new ones).
fn check_keys(dir: &Path, state: &State, keys: &crate::crypt::Keyring) -> Result<()> {
    let newest_sealed = state
        .checkpoints
        .values()
        .rev()
        .find_map(|m| crate::crypt::KeyId::from_slice(&m.key_id));
    let Some(id) = newest_sealed else {
        return Ok(());
    };
    let what = || format!("store {}", dir.display());
    if keys.is_empty() {
        return Err(Error::KeyRequired {
            what: what(),
            key_id: id.to_string(),
        });
    }
    if keys.find(&id).is_none() {
        return Err(Error::WrongKey {
            what: what(),
            key_id: id.to_string(),
            supplied: keys.ids().join(", "),
        });
    }
    Ok(())
}

/// Fills the names, dtypes, shapes and metadata of every sealed manifest whose key was
/// supplied from its sealed body (recovery replays the WAL without keys; what it built only
/// needs the chunks). A body that does not authenticate under its key was altered or moved
/// (a CRC-valid record a crash cannot make): `MacMismatch`.
fn open_sealed_bodies(dir: &Path, state: &mut State, keys: &crate::crypt::Keyring) -> Result<()> {
    for m in state.checkpoints.values_mut() {
        if m.sealed_body.is_empty() {
            continue;
        }
        let Some(s) = crate::crypt::KeyId::from_slice(&m.key_id).and_then(|id| keys.find(&id))
        else {
            continue;
        };
        let context = format!("checkpoint {}", m.id);
        let mut full = (**m).clone();
        s.open_body(&mut full)
            .map_err(|reason| Error::MacMismatch {
                what: format!("{context} in {}", dir.display()),
                reason,
            })?;
        let mut check = full.clone();
        check.sealed_body.clear();
        crate::manifest::validate(&check, &context)?;
        *m = Arc::new(full);
    }
    Ok(())
}

/// Encoded size of the WAL record that commits `m`.
pub(crate) fn commit_record_len(m: &Manifest) -> u64 {
    let rec = pb::CommitRecord {
        manifest: Some(crate::crypt::wal_form(m).into_owned()),
    };
    (wal::RECORD_HEADER_LEN + rec.encoded_len()) as u64
}

impl Store {
    /// Opens the store in `dir`, creating it if absent (unless read-only), and runs recovery.
    ///
    /// `dir` may be a bucket URL (`s3://bucket/prefix`, `file:///dir`): the store then lives in
    /// the bucket, with a local cache, and a commit is durable once its commit object is
    /// created there (docs/GUARANTEES.md, "Object storage").
    pub fn open(dir: impl AsRef<Path>, opts: Options) -> Result<Store> {
        if let Some(url) = dir.as_ref().to_str().filter(|s| crate::remote::is_url(s)) {
            return remote_tier::open_url(url, opts);
        }
        let replica = match (&opts.replica, opts.read_only) {
            (Some(url), false) => Some(remote_tier::replica_bucket(url, &opts)?),
            _ => None,
        };
        let mut store = Store::open_dir(dir.as_ref(), opts, replica.as_ref())?;
        if let Some(bucket) = replica {
            store.remote = Some(remote_tier::start_replica(&store, bucket)?);
        }
        Ok(store)
    }

    /// [`Store::open`] of a directory; with `restore_from`, an empty one is filled from that
    /// bucket's newest state first.
    fn open_dir(
        dir: &Path,
        mut opts: Options,
        restore_from: Option<&Arc<crate::remote::Bucket>>,
    ) -> Result<Store> {
        opts.validate()?;
        let dir = dir.to_path_buf();
        perms::check_store_dir(&*opts.io, &dir, &opts)?;
        opts.io = crate::io::WithMode::wrap(opts.io.clone(), opts.file_mode);
        let io = opts.io.clone();
        let lock = if opts.read_only {
            None
        } else {
            recovery::create_store_dir(&*io, &dir)?;
            Some(writer_lock::take(&*io, &dir)?)
        };
        if let Some(bucket) = restore_from {
            remote_tier::restore_if_empty(&*io, &dir, bucket)?;
        }
        // A reader takes its lease (holding everything) before it reads the WAL, and narrows
        // it after: see store/lease.rs for why that order closes the race with a deletion.
        // Only in an existing store (a read-only open never creates one); a reader that cannot
        // write its lease (a read-only file system, no permission) reads without one.
        let lease = match opts.read_only {
            true if io
                .exists(&dir.join(crate::current::CURRENT_NAME))
                .unwrap_or(false) =>
            {
                lease::ReaderLease::take(io.clone(), &dir).ok()
            }
            _ => None,
        };
        let rec = recovery::recover(&*io, &dir, &opts)?;
        let keys = crate::crypt::Keyring::new(opts.encryption_key.as_ref(), &opts.old_keys);
        let mut rec = rec;
        check_keys(&dir, &rec.state, &keys)?;
        open_sealed_bodies(&dir, &mut rec.state, &keys)?;
        chain::check_macs(&dir, &rec.state, &keys)?;
        if let Some(l) = &lease {
            // A failed narrowing leaves the file holding everything (its old content, or
            // bytes a writer cannot decode, which it takes as everything): the reader stays
            // protected, it only holds more space until it closes. Never dropped for it.
            let _ = l.hold(rec.state.segments.keys().copied());
        }
        let live: BTreeMap<u64, u64> = rec
            .state
            .segments
            .iter()
            .map(|(&id, s)| (id, s.len))
            .collect();
        let lazy = lazy::LazySegments::open(&*io, &dir, &live, &opts)?;
        let mut store = Store {
            dir,
            opts,
            _lock: lock,
            wal: rec.wal,
            features: rec.features,
            state: rec.state,
            poisoned: None,
            report: rec.report,
            open_segments: Mutex::new(HashMap::new()),
            read_scratch: reader::ScratchPool::default(),
            lease,
            pending_free: rec.pending_free,
            reservations: external::Reservations::default(),
            keys,
            remote: None,
            suspects: quarantine::Suspects::default(),
            lazy,
            _cache_lock: None,
        };
        // A writer with a key seals what it commits: the WAL declares the feature first, so
        // that a build without it refuses the store by name instead of calling it corrupt.
        if store.wal.is_some() && store.keys.current().is_some() {
            store.enable_feature(&features::ENCRYPTION)?;
        }
        // A lazy restore's feature: declared while a segment is in the bucket (also in a
        // store a build before the feature restored lazily).
        if store.wal.is_some() {
            store.declare_lazy()?;
        }
        // A crash between a commit and the heal it allowed leaves the heal to this open
        // (not to a strict one, which repairs nothing).
        if store.wal.is_some()
            && !store.state.quarantined.is_empty()
            && store.opts.recovery_mode != RecoveryMode::AbsoluteConsistency
        {
            store.heal()?;
        }
        Ok(store)
    }

    /// The key that opens checkpoint `m`'s chunks: `None` for a plain checkpoint; an error
    /// naming the key id when it is sealed and its key was not supplied.
    pub(crate) fn sealer_for(&self, m: &Manifest) -> Result<Option<Arc<crate::crypt::Sealer>>> {
        let Some(id) = crate::crypt::KeyId::from_slice(&m.key_id) else {
            return Ok(None);
        };
        self.sealer_by_id(&id, || {
            format!("checkpoint {} in {}", m.id, self.dir.display())
        })
        .map(Some)
    }

    /// The supplied key with id `id`; else `KeyRequired` or `WrongKey` for `what`.
    pub(crate) fn sealer_by_id(
        &self,
        id: &crate::crypt::KeyId,
        what: impl FnOnce() -> String,
    ) -> Result<Arc<crate::crypt::Sealer>> {
        match self.keys.find(id) {
            Some(s) => Ok(s.clone()),
            None if self.keys.is_empty() => Err(Error::KeyRequired {
                what: what(),
                key_id: id.to_string(),
            }),
            None => Err(Error::WrongKey {
                what: what(),
                key_id: id.to_string(),
                supplied: self.keys.ids().join(", "),
            }),
        }
    }

    /// The keys this store was opened with.
    pub(crate) fn keys(&self) -> &crate::crypt::Keyring {
        &self.keys
    }

    /// The lease file of a read-only store (`readers/*.lease`), which keeps the writer from
    /// freeing the segments this store may read. `None` for the writer, and for a reader that
    /// could not write one (a read-only file system or directory): such a reader reads
    /// unprotected, and a concurrent deletion may make its reads fail with an I/O error.
    pub fn reader_lease(&self) -> Option<&Path> {
        self.lease.as_ref().map(|l| l.path())
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The options it was opened with.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// What recovery found and did when this store was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.report
    }

    /// Why the store refuses writes, if an earlier I/O failure poisoned it.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    /// All live checkpoints, oldest first.
    pub fn list(&self) -> Vec<CheckpointInfo> {
        self.state
            .checkpoints
            .values()
            .map(|m| self.state.info(m))
            .collect()
    }

    /// The newest checkpoint (not verified; see [`Store::latest_valid`]).
    pub fn latest(&self) -> Option<CheckpointInfo> {
        self.state
            .checkpoints
            .values()
            .next_back()
            .map(|m| self.state.info(m))
    }

    /// The newest checkpoint whose every chunk verifies, walking back past damaged ones.
    pub fn latest_valid(&self) -> Result<Option<CheckpointInfo>> {
        for m in self.state.checkpoints.values().rev() {
            match self.verify(m.id) {
                Ok(()) => return Ok(Some(self.state.info(m))),
                Err(Error::ChunkCorrupt { .. } | Error::SegmentMissing { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    fn find(&self, sel: Selector) -> Result<&Arc<Manifest>> {
        let found = match sel {
            Selector::Latest => self.state.checkpoints.values().next_back(),
            Selector::Id(id) => self.state.checkpoints.get(&id),
            Selector::Step(step) => self
                .state
                .checkpoints
                .values()
                .rev()
                .find(|m| m.step == step),
        };
        found.ok_or_else(|| {
            Error::NotFound(match sel {
                Selector::Latest => format!("in {} (the store is empty)", self.dir.display()),
                Selector::Id(id) => format!("with id {id} in {}", self.dir.display()),
                Selector::Step(s) => format!("at step {s} in {}", self.dir.display()),
            })
        })
    }

    /// Summary of one checkpoint.
    pub fn info(&self, sel: Selector) -> Result<CheckpointInfo> {
        self.find(sel).map(|m| self.state.info(m))
    }

    /// Opens a checkpoint for reading.
    pub fn checkpoint(&self, sel: Selector) -> Result<CheckpointReader<'_>> {
        CheckpointReader::new(self, self.find(sel)?.clone())
    }

    /// Reads and hashes every chunk of checkpoint `id`. The error names the first bad
    /// tensor/blob and chunk.
    pub fn verify(&self, id: u64) -> Result<()> {
        self.checkpoint(Selector::Id(id))?.verify()
    }

    /// [`Store::verify`] within a pass over several checkpoints: chunks `seen` holds as
    /// intact are not read again (see [`VerifiedChunks`]).
    pub fn verify_with(&self, id: u64, seen: &mut VerifiedChunks) -> Result<()> {
        self.checkpoint(Selector::Id(id))?.verify_with(seen)
    }

    /// Verifies every live checkpoint, each shared chunk once; one result per checkpoint,
    /// oldest first.
    pub fn verify_all(&self) -> Vec<(u64, Result<()>)> {
        let mut seen = VerifiedChunks::default();
        self.state
            .checkpoints
            .keys()
            .map(|&id| (id, self.verify_with(id, &mut seen)))
            .collect()
    }

    /// Sizes of the store's files.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            checkpoints: self.state.checkpoints.len(),
            segments: self.state.segments.len(),
            segment_bytes: self.state.segments.values().map(|s| s.len).sum(),
            wal_bytes: self.wal.as_ref().map_or(0, |w| w.end),
        }
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        if let Some(cause) = &self.poisoned {
            return Err(Error::Poisoned {
                cause: cause.clone(),
            });
        }
        if self.wal.is_none() {
            return Err(Error::ReadOnly {
                path: self.dir.clone(),
            });
        }
        Ok(())
    }

    /// The live WAL; a read-only store has none.
    fn wal_mut(&mut self) -> Result<&mut WalWriter> {
        let dir = &self.dir;
        self.wal
            .as_mut()
            .ok_or_else(|| Error::ReadOnly { path: dir.clone() })
    }

    /// Marks the store unusable for writes after `e`, returning `e`.
    fn poison(&mut self, e: Error) -> Error {
        if self.poisoned.is_none() {
            self.poisoned = Some(e.to_string());
        }
        e
    }

    /// Starts a write transaction for a checkpoint at training step `step`. Nothing is
    /// visible until [`Transaction::commit`] returns; dropping the transaction aborts it.
    pub fn begin(&mut self, step: u64) -> Result<Transaction<'_>> {
        self.check_writable()?;
        // What verified reads found bad is quarantined first, so this save never references
        // it (it writes a fresh copy, which heals the checkpoints that do).
        self.heal()?;
        Ok(Transaction::new(self, step))
    }

    /// Deletes checkpoint `id`: the delete record is made durable first, then segment files
    /// no live checkpoint references are removed — except those an open reader's lease holds,
    /// which are freed once it closes (see [`DeleteInfo::segments_pending`]).
    ///
    /// A pinned checkpoint is refused with [`Error::Pinned`]; unpin it first.
    pub fn delete(&mut self, id: u64) -> Result<DeleteInfo> {
        self.check_writable()?;
        self.find(Selector::Id(id))?;
        if self.state.pinned.contains(&id) {
            return Err(Error::Pinned { id });
        }
        let payload = pb::DeleteRecord { ids: vec![id] }.encode_to_vec();
        let wal = self.wal_mut()?;
        if let Err(e) = wal.append_durable(RecordType::Delete, &payload) {
            return Err(self.poison(e));
        }
        let lens: BTreeMap<u64, u64> = self
            .state
            .segments
            .iter()
            .map(|(&k, s)| (k, s.len))
            .collect();
        let dead = self.state.apply_delete(id, commit_record_len);
        let dead = dead
            .into_iter()
            .map(|s| (s, lens.get(&s).copied().unwrap_or(0)));
        let freed = self.free_segments(dead);
        let info = DeleteInfo {
            id,
            segments_freed: freed.freed,
            bytes_freed: freed.bytes_freed,
            segments_pending: freed.pending,
        };
        self.compact_after_durable_write();
        self.publish_after_durable_write()?;
        Ok(info)
    }

    /// Pins checkpoint `id`: until [`Store::unpin`], [`Store::delete`] refuses it and
    /// retention always keeps it. Durable when this returns (a `Pin` WAL record, fdatasync'ed).
    /// Returns whether anything changed (`false`: it was pinned already, nothing written).
    pub fn pin(&mut self, id: u64) -> Result<bool> {
        self.set_pinned(id, true)
    }

    /// Unpins checkpoint `id` (durable when this returns). Returns whether anything changed
    /// (`false`: it was not pinned, nothing written).
    pub fn unpin(&mut self, id: u64) -> Result<bool> {
        self.set_pinned(id, false)
    }

    fn set_pinned(&mut self, id: u64, pinned: bool) -> Result<bool> {
        self.check_writable()?;
        self.find(Selector::Id(id))?;
        if self.state.pinned.contains(&id) == pinned {
            return Ok(false);
        }
        let payload = pb::PinRecord { id, pinned }.encode_to_vec();
        let wal = self.wal_mut()?;
        if let Err(e) = wal.append_durable(RecordType::Pin, &payload) {
            return Err(self.poison(e));
        }
        if let Err(e) = self.state.apply_pin(id, pinned, "pin") {
            // Unreachable: the checkpoint was found live above. Should it happen, the durable
            // record and the memory disagree: refuse further writes.
            return Err(self.poison(e));
        }
        self.compact_after_durable_write();
        self.publish_after_durable_write()?;
        Ok(true)
    }

    /// Ids of the pinned checkpoints, oldest first.
    pub fn pinned(&self) -> Vec<u64> {
        self.state.pinned.iter().copied().collect()
    }

    /// What `policy` would keep (and why) and delete, and the space that would be freed.
    /// Changes nothing (a read-only store plans too): the `--dry-run` of [`Store::apply_retention`].
    pub fn plan_retention(&self, policy: &RetentionPolicy) -> Result<RetentionPlan> {
        let mut plan = self.retention_plan(policy)?;
        let kept: BTreeSet<u64> = plan
            .keep
            .iter()
            .flat_map(|k| referenced_segments(&self.state.checkpoints[&k.info.id]))
            .collect();
        let mut freed = BTreeSet::new();
        for d in &plan.delete {
            let m = &self.state.checkpoints[&d.id];
            let created = m.new_segments.iter().map(|s| s.id);
            freed.extend(
                referenced_segments(m)
                    .into_iter()
                    .chain(created)
                    .filter(|s| !kept.contains(s) && self.state.segments.contains_key(s)),
            );
        }
        plan.bytes_freed = freed.iter().map(|s| self.state.segments[s].len).sum();
        plan.segments_freed = freed.into_iter().collect();
        Ok(plan)
    }

    /// The retention plan of `policy`, keeping the newest checkpoint that verifies as well
    /// as the newest: when the plan deletes anything, checkpoints are verified newest first
    /// until one does (usually the newest, so one checkpoint is read), and that one is kept.
    fn retention_plan(&self, policy: &RetentionPolicy) -> Result<RetentionPlan> {
        let list = self.list();
        let plan = retention::plan(policy, &list)?;
        if plan.delete.is_empty() {
            return Ok(plan);
        }
        let mut seen = VerifiedChunks::default();
        let mut newest_intact = None;
        for c in list.iter().rev() {
            match self.verify_with(c.id, &mut seen) {
                Ok(()) => {
                    newest_intact = Some(c.id);
                    break;
                }
                Err(Error::ChunkCorrupt { .. } | Error::SegmentMissing { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        if newest_intact == list.last().map(|c| c.id) {
            return Ok(plan);
        }
        retention::plan_keeping(policy, &list, newest_intact)
    }

    /// Applies `policy`: deletes what [`Store::plan_retention`] says, oldest first, each through
    /// [`Store::delete`] (a durable Delete record, then the space freed). The newest, the newest
    /// that verifies, and every pinned checkpoint are always kept, so every deletion comes
    /// after a newer committed one.
    /// A crash part-way leaves the oldest of them deleted and the rest live; run it again.
    pub fn apply_retention(&mut self, policy: &RetentionPolicy) -> Result<Vec<DeleteInfo>> {
        self.apply_retention_with(policy, |_, _| {})
    }

    /// [`Store::apply_retention`], calling `progress(deleted so far, to delete)` after each
    /// deletion (for a progress bar).
    pub fn apply_retention_with(
        &mut self,
        policy: &RetentionPolicy,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Vec<DeleteInfo>> {
        let plan = self.retention_plan(policy)?;
        let total = plan.delete.len();
        let mut out = Vec::with_capacity(total);
        for d in &plan.delete {
            out.push(self.delete(d.id)?);
            progress(out.len(), total);
        }
        Ok(out)
    }

    /// Compacts the WAL if it is due, after a commit or delete record is already durable. A
    /// failure poisons the store (the next write reports its cause) but does not fail the
    /// operation that triggered it: that one has happened and survives a reopen, and reporting
    /// it as failed would invite a retry of something already done.
    pub(crate) fn compact_after_durable_write(&mut self) {
        if let Err(e) = self.maybe_compact_wal() {
            self.poison(e);
        }
    }

    fn maybe_compact_wal(&mut self) -> Result<()> {
        let end = self.wal.as_ref().map_or(0, |w| w.end);
        if end > self.opts.wal_compact_min_bytes && end > 2 * self.state.live_record_bytes + 4096 {
            self.compact_wal()?;
        }
        Ok(())
    }

    /// Rewrites the WAL as a snapshot of the live state: a new WAL file (durable, with its
    /// directory entry), then an atomic switch of `CURRENT`, then removal of the old file.
    pub fn compact_wal(&mut self) -> Result<()> {
        let mut features = self.features;
        if self.state.quarantined.is_empty() {
            // The compacted WAL holds no Quarantine record (healed references are in its
            // Commit records): it no longer needs the feature, and older builds open it again.
            features.incompat &= !(1 << features::QUARANTINE.bit);
        }
        self.rewrite_wal(features)
    }

    /// The format features this store's WAL header declares (docs/FORMAT.md, "Feature
    /// flags"); those this build does not know are named by kind and bit.
    pub fn features(&self) -> FeatureSet {
        self.features
    }

    /// Turns format feature `f` on for this store, durably, before the first write that uses
    /// it: the WAL is rewritten with `f` in its header (the mechanism of [`Store::compact_wal`]:
    /// a new WAL file made durable, then an atomic switch of `CURRENT`), so a crash leaves the
    /// store either without the feature and without its data, or with it. From then on a
    /// build that lacks `f` treats the store as its kind says (refuse, read-only, or open).
    /// Returns whether anything changed (`false`: it was on already).
    pub fn enable_feature(&mut self, f: &Feature) -> Result<bool> {
        self.check_writable()?;
        if !features::KNOWN.contains(f) {
            return Err(Error::invalid(format!(
                "feature {:?} is not in this build's registry (features::KNOWN)",
                f.name
            )));
        }
        if self.features.contains(f) {
            return Ok(false);
        }
        self.rewrite_wal(self.features.with(f))?;
        Ok(true)
    }

    /// Rewrites the WAL as [`Store::compact_wal`] does, its header declaring `features`.
    pub(crate) fn rewrite_wal(&mut self, features: FeatureSet) -> Result<()> {
        self.check_writable()?;
        let old = self.wal_mut()?;
        let (old_path, number) = (old.path.clone(), old.number + 1);
        let records = self.state.compacted_records();
        let io = self.opts.io.clone();
        let new = match WalWriter::create_durable(&*io, &self.dir, number, features, &records) {
            Ok(w) => w,
            Err(e) => return Err(self.poison(e)),
        };
        if let Err(e) = files::switch_current_atomically(&*io, &self.dir, number) {
            return Err(self.poison(e));
        }
        self.wal = Some(new);
        self.features = features;
        // CURRENT no longer names it; a failed unlink leaves a stale file recovery removes.
        let _ = io.remove_file(&old_path);
        Ok(())
    }

    pub(crate) fn segment_file(&self, id: u64) -> Result<Arc<dyn StorageFile>> {
        if let Some(f) = self.open_segments().get(&id) {
            return Ok(f.clone());
        }
        let path = self.segment_path(id);
        let io = &*self.opts.io;
        let f = match (io.open(&path, false), &self.lazy) {
            (Err(e), Some(lazy))
                if e.kind() == std::io::ErrorKind::NotFound && lazy.is_pending(id) =>
            {
                // Still in the bucket (a lazy restore): fetched whole, then opened.
                lazy.fetch(io, &self.dir.join(SEGMENTS_DIR), id)?;
                io.open(&path, false)
            }
            (r, _) => r,
        };
        let f: Arc<dyn StorageFile> = Arc::from(f.map_err(|e| Error::io("open", &path, e))?);
        self.open_segments().insert(id, f.clone());
        Ok(f)
    }

    /// Whether chunks of segment `id` are verified on every read whatever the caller asked:
    /// those of a segment fetched from the bucket by a lazy restore (a cache file is never
    /// trusted without its checksum).
    pub(crate) fn always_verify(&self, id: u64) -> bool {
        self.lazy.as_ref().is_some_and(|l| l.came_from_bucket(id))
    }

    /// Segments a lazy restore left in the bucket that no read has fetched yet, by id.
    pub fn segments_in_bucket(&self) -> Vec<u64> {
        self.lazy
            .as_ref()
            .map_or_else(Vec::new, |l| l.pending_ids())
    }

    /// Fetches every segment a lazy restore left in the bucket (what a read would fetch when
    /// it needs it): afterwards the directory holds the whole store. A writer then makes it an
    /// ordinary store that no longer needs the bucket: every live checkpoint verified (a
    /// fetched cache file found bad is fetched again, once), the `lazy-segments` feature
    /// cleared, `REMOTE_SEGMENTS` removed (docs/DECISIONS.md, "Lazy restore"). A read-only
    /// store only fetches.
    pub fn fetch_all(&mut self) -> Result<()> {
        let mut again = true;
        loop {
            for id in self.segments_in_bucket() {
                self.segment_file(id)?;
            }
            if self.wal.is_none() || !self.has_lazy_state()? {
                return Ok(());
            }
            match self.verify_all().into_iter().find_map(|(_, r)| r.err()) {
                None => return self.clear_lazy(),
                // A damaged cache file is dropped by the read that found it: fetched again.
                Some(_) if again && !self.segments_in_bucket().is_empty() => again = false,
                Some(e) => return Err(e),
            }
        }
    }

    /// The cache of open segment files. A panic while it was held cannot leave it half
    /// changed (each use is one insert, lookup or removal), so a poisoned lock is taken as is.
    fn open_segments(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<dyn StorageFile>>> {
        self.open_segments
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn segment_path(&self, id: u64) -> PathBuf {
        self.dir.join(SEGMENTS_DIR).join(segment::file_name(id))
    }

    /// `SegmentMissing` for `checkpoint` if recovery found segment `id` missing or short.
    pub(crate) fn segment_damage(&self, id: u64, checkpoint: u64) -> Option<Error> {
        if !self.state.damaged_segments.contains(&id) {
            return None;
        }
        let problem = self
            .report
            .damaged_segments
            .iter()
            .find(|(s, _)| *s == id)
            .map_or_else(|| "damaged".to_string(), |(_, p)| p.clone());
        Some(Error::SegmentMissing {
            path: self.segment_path(id),
            problem,
            checkpoint,
            needed: self.state.segments.get(&id).map_or(0, |s| s.len),
        })
    }
}

#[cfg(test)]
mod feature_tests {
    use super::*;
    use crate::features::FeatureKind;
    use crate::io::MemIo;

    fn mem_opts(mem: &MemIo, read_only: bool) -> Options {
        Options {
            io: Arc::new(mem.clone()),
            read_only,
            ..Options::default()
        }
    }

    /// The writer's call that turns features on rewrites the WAL (new file, CURRENT switched)
    /// with the bits in its header, keeps every checkpoint, and the bits survive compaction.
    #[test]
    fn rewrite_wal_declares_features_durably_and_compaction_keeps_them() {
        let mem = MemIo::new();
        let mut s = Store::open("/s", mem_opts(&mem, false)).unwrap();
        let mut t = s.begin(1).unwrap();
        t.put_blob("b", b"hello").unwrap();
        t.commit().unwrap();
        let f = FeatureSet {
            compat: 1,
            ro_compat: 0,
            incompat: 0,
        };
        s.rewrite_wal(f).unwrap();
        assert_eq!(s.features(), f);
        s.compact_wal().unwrap();
        drop(s);
        let s = Store::open("/s", mem_opts(&mem, false)).unwrap();
        assert_eq!(s.features(), f);
        assert_eq!(s.list().len(), 1);
        let wal = mem.read_file(&s.report.wal_file).unwrap();
        assert_eq!(wal::WalHeader::decode(&wal).unwrap().features, f);
    }

    /// A feature outside this build's registry cannot be turned on.
    #[test]
    fn enable_feature_refuses_an_unregistered_feature() {
        let mem = MemIo::new();
        let mut s = Store::open("/s", mem_opts(&mem, false)).unwrap();
        let stranger = Feature {
            name: "not-registered",
            kind: FeatureKind::Incompatible,
            bit: 15,
        };
        assert!(matches!(
            s.enable_feature(&stranger),
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(s.features(), features::NEW_STORE);
        // A store from before the features: none set; each known one turns on once.
        s.rewrite_wal(FeatureSet::EMPTY).unwrap();
        for f in features::KNOWN {
            assert!(s.enable_feature(f).unwrap());
            assert!(!s.enable_feature(f).unwrap(), "already on");
            assert!(s.features().contains(f));
        }
        let mut ro = Store::open("/s", mem_opts(&mem, true)).unwrap();
        if let Some(f) = features::KNOWN.first() {
            assert!(matches!(ro.enable_feature(f), Err(Error::ReadOnly { .. })));
        }
    }
}
