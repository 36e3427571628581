//! Typed errors. Every variant says what failed, where (path, offset), and what to do.

use std::path::PathBuf;

/// Result alias of the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure the engine reports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// The operation (`create`, `fdatasync`, ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// An earlier fsync/fdatasync (or write) failed; the kernel may have dropped dirty pages,
    /// so nothing written since the last good sync can be trusted. Reopen the store.
    #[error("store is poisoned by an earlier I/O failure ({cause}); reopen it to recover")]
    Poisoned {
        /// The failure that poisoned the store.
        cause: String,
    },

    /// Another process holds the writer lock.
    #[error("store {path} is locked by another writer (pid {pid}); open it read-only or stop that process")]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// The pid written by the holder, if readable.
        pid: String,
    },

    /// The store directory (or its `segments/`, `readers/`) is one this process must not trust:
    /// world-writable, owned by another user, a symlink, or not a directory. Whoever controls it
    /// could plant files or links the store would act on.
    #[error("refusing store directory {path}: {reason}")]
    UnsafeDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong and how to proceed.
        reason: String,
    },

    /// The store was opened read-only and a write was attempted.
    #[error("store {path} is open read-only")]
    ReadOnly {
        /// The store directory.
        path: PathBuf,
    },

    /// A file was written by a newer version of ckptstore.
    #[error("{path}: format version {found} is newer than this build supports ({supported}); upgrade ckptstore")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// Version found on disk.
        found: u32,
        /// Highest version this build reads.
        supported: u32,
    },

    /// The store uses format features this build does not have (docs/FORMAT.md, "Feature
    /// flags"): incompatible ones, or, for a read-write open, read-only-compatible ones.
    /// Nothing was changed. Not damage: open it with a newer ckptstore.
    #[error(
        "{path}: written by a newer ckptstore: needs {features}; nothing was changed. Open it \
         with a ckptstore that has these features{}",
        if *.read_only_would_open { " (or open it read-only: this build can read it)" } else { "" }
    )]
    NewerFormat {
        /// The WAL file whose header declares them.
        path: PathBuf,
        /// The features this build lacks, by name or as `incompatible feature bit N`.
        features: String,
        /// Whether a read-only open of this build would succeed (only read-only-compatible
        /// features are missing).
        read_only_would_open: bool,
    },

    /// A file does not start with the expected magic bytes.
    #[error("{path}: not a ckptstore {what} file (bad magic or header checksum)")]
    BadHeader {
        /// The file.
        path: PathBuf,
        /// What kind of file was expected.
        what: &'static str,
    },

    /// A WAL record before the tail is corrupt: committed data may be lost.
    #[error("{path}: corrupt WAL record at offset {offset} ({reason}), not a torn tail; \
             refusing to open (use RecoveryMode::PointInTime / `ckptstore recover --salvage` to keep \
             only what precedes it; the WAL as it was is kept in lost+found/)")]
    WalCorrupt {
        /// The WAL file.
        path: PathBuf,
        /// Byte offset of the bad record.
        offset: u64,
        /// Why the record was rejected.
        reason: String,
    },

    /// The WAL ends in a torn record and the recovery mode forbids truncating it.
    #[error("{path}: torn WAL tail at offset {offset} ({reason}); RecoveryMode::AbsoluteConsistency refuses to truncate it")]
    WalTornTail {
        /// The WAL file.
        path: PathBuf,
        /// Byte offset of the torn record.
        offset: u64,
        /// Why the record was rejected.
        reason: String,
    },

    /// `CURRENT` is missing although the directory holds a store's files (a WAL longer than
    /// its header, whatever its state; segment files; files in `lost+found/`). Nothing was
    /// changed: a store is created only in an empty or new directory.
    #[error("{path}: CURRENT is missing but the directory holds a store: {found}. Refusing to open or re-create it; nothing was changed. Next: copy the directory aside (`cp -a`), then `ckptstore recover --rebuild {path}` rebuilds the WAL from the segments (it deletes nothing); do not reuse this directory for a new store")]
    CurrentMissing {
        /// The store directory.
        path: PathBuf,
        /// What was found, one item per `;`.
        found: String,
    },

    /// A tensor or blob claims more bytes than this process can allocate (a manifest may
    /// claim a tensor far larger than memory, e.g. a damaged or crafted one).
    #[error("{what} claims {bytes} bytes, more than this process can allocate; nothing was read")]
    TooLarge {
        /// The tensor or blob, and its checkpoint.
        what: String,
        /// The bytes it claims.
        bytes: u64,
    },

    /// An asynchronous save was not committed because an earlier one failed and the caller
    /// had not seen that failure when it began this one (saves commit as a prefix), or, from
    /// `Pipeline::begin`, the failure of a save whose handle was dropped unread.
    #[error("not committed: the earlier save at step {step} failed: {cause}")]
    EarlierSaveFailed {
        /// The step of the save that failed.
        step: u64,
        /// Its error.
        cause: String,
    },

    /// `CURRENT` names a WAL file that does not exist.
    #[error("{path}: CURRENT points to {target}, which does not exist")]
    CurrentDangling {
        /// The CURRENT file.
        path: PathBuf,
        /// The missing WAL file.
        target: String,
    },

    /// A committed checkpoint references a segment that is missing or too short.
    #[error("segment {path} is {problem} (checkpoint {checkpoint} needs {needed} bytes)")]
    SegmentMissing {
        /// The segment file.
        path: PathBuf,
        /// `missing` or `truncated to N bytes`.
        problem: String,
        /// A checkpoint that references it.
        checkpoint: u64,
        /// Bytes the committed records say it holds.
        needed: u64,
    },

    /// Segment compaction read a live chunk whose bytes do not match its BLAKE3. No longer
    /// returned: compaction quarantines such a chunk and leaves it in place
    /// (`GcReport::corrupt_chunks`); kept so that code matching on it still compiles.
    #[error(
        "{path}: live chunk at offset {offset} does not match its BLAKE3; compaction changed \
             nothing (run `ckptstore verify --all`; `ckptstore gc --no-compact` still frees space)"
    )]
    CompactionSourceCorrupt {
        /// The segment file.
        path: PathBuf,
        /// Offset of the chunk's payload.
        offset: u64,
    },

    /// A decoded manifest or record breaks an invariant.
    #[error("{context}: invalid manifest: {reason}")]
    BadManifest {
        /// Where it was read from.
        context: String,
        /// What is wrong.
        reason: String,
    },

    /// A chunk's bytes do not hash to the BLAKE3 recorded for them.
    #[error("checkpoint {checkpoint} {kind} {name:?} chunk {chunk} (segment {segment}, offset {offset}): {reason}")]
    ChunkCorrupt {
        /// Checkpoint id.
        checkpoint: u64,
        /// `tensor` or `blob`.
        kind: &'static str,
        /// Tensor or blob name.
        name: String,
        /// Chunk index within it.
        chunk: usize,
        /// Segment id.
        segment: u64,
        /// Payload offset.
        offset: u64,
        /// `BLAKE3 mismatch` or the read error.
        reason: String,
    },

    /// Bad input from the caller.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A GPU source failed: no CUDA driver, a device pointer CUDA does not know (freed, or
    /// on another device), a failed copy.
    #[error("CUDA: {0}")]
    Device(String),

    /// A file in another format (safetensors, MindSpore `.ckpt`) is malformed or could not be
    /// read or written. `error` is the interop module's error (`interop::Error::of` gets it
    /// back typed); it is boxed so that this module does not depend on the interop code.
    #[error("{path}: {error}")]
    Interop {
        /// The external file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        error: Box<dyn std::error::Error + Send + Sync + 'static>,
    },

    /// No checkpoint (or no tensor or blob in it) matches the request. A missing tensor or
    /// blob name comes with up to three close matches (`did you mean [...]?`).
    #[error("no checkpoint {0}")]
    NotFound(String),

    /// A strict load ([`crate::CheckpointReader::load_into`] with `strict`) found expected
    /// names the checkpoint lacks or checkpoint tensors the caller did not expect. Nothing was
    /// read; load non-strict to get both lists and the tensors that match.
    #[error("checkpoint {checkpoint}: strict load failed: {} missing {missing:?}, {} unexpected {unexpected:?}; \
             load non-strict to load the rest", .missing.len(), .unexpected.len())]
    StrictLoad {
        /// Checkpoint id.
        checkpoint: u64,
        /// Expected names the checkpoint lacks, in the caller's order.
        missing: Vec<String>,
        /// Checkpoint tensors not expected, in checkpoint order.
        unexpected: Vec<String>,
    },

    /// A tensor's dtype or shape differs from the caller's expectation
    /// ([`crate::CheckpointReader::load_into`]). Nothing was read.
    #[error(
        "checkpoint {checkpoint} tensor {name:?}: expected {expected_dtype} {expected_shape:?}, \
             found {found_dtype} {found_shape:?}"
    )]
    TensorMismatch {
        /// Checkpoint id.
        checkpoint: u64,
        /// Tensor name.
        name: String,
        /// Dtype the caller expects.
        expected_dtype: crate::dtype::DType,
        /// Shape the caller expects.
        expected_shape: Vec<u64>,
        /// Dtype in the checkpoint.
        found_dtype: crate::dtype::DType,
        /// Shape in the checkpoint.
        found_shape: Vec<u64>,
    },

    /// The checkpoint is pinned: it is never deleted until it is unpinned.
    #[error(
        "checkpoint {id} is pinned; unpin it first (`ckptstore unpin DIR {id}`, Store::unpin)"
    )]
    Pinned {
        /// The checkpoint id.
        id: u64,
    },

    /// The store (or this checkpoint) is encrypted and no key was supplied.
    #[error(
        "{what} is encrypted (key id {key_id}); supply its key (`--key-file`, \
             CKPTSTORE_KEY_FILE or CKPTSTORE_KEY, Options::encryption_key, \
             Store(..., encryption_key=...))"
    )]
    KeyRequired {
        /// The store directory or the checkpoint.
        what: String,
        /// The id of the key it needs (never the key).
        key_id: String,
    },

    /// A sealed checkpoint's commit MAC does not match its manifest: its WAL record was changed,
    /// swapped or replayed by someone who can write the store but does not hold the key.
    #[error(
        "{what}: {reason}: its record was altered, swapped or replayed \
             (tampering, not a crash); restore the store from a trusted copy"
    )]
    MacMismatch {
        /// The checkpoint and store.
        what: String,
        /// What does not authenticate: the commit MAC, or the sealed manifest body.
        reason: String,
    },

    /// The store no longer holds the MAC chain head a caller saw before (`Store::check_head`).
    #[error("{what} was rolled back: {reason}")]
    Rollback {
        /// The store.
        what: String,
        /// How the head differs.
        reason: String,
    },

    /// The keys supplied are not the one this store or checkpoint was sealed with.
    #[error(
        "{what} is sealed with key id {key_id}; the key(s) supplied have id(s) {supplied}: \
             wrong key (pass the old key too after a rotation)"
    )]
    WrongKey {
        /// The store directory or the checkpoint.
        what: String,
        /// The id of the key it needs.
        key_id: String,
        /// Ids of the keys supplied, comma-separated.
        supplied: String,
    },

    /// Another writer created the bucket's next commit object first (the conditional create
    /// of `log/<seq>` lost the race): this process is not the store's writer any more.
    /// Nothing was overwritten; reopen the store to see the other writer's commits.
    #[error("{url}: another writer committed sequence number {seq} first; reopen the store (one writer at a time)")]
    WriterConflict {
        /// The store's URL (no credentials: they never appear in a URL this crate prints).
        url: String,
        /// The commit sequence number both tried to create.
        seq: u64,
    },

    /// A commit object in the bucket is damaged or from a newer build (named by the feature
    /// this build lacks).
    #[error("commit object {name}: {reason}")]
    BadCommitObject {
        /// Its key.
        name: String,
        /// What is wrong.
        reason: String,
    },

    /// Another process has a bucket store's local cache open (one process per cache).
    #[error(
        "the local cache {path} of {url} is in use by another process (pid {pid}): one process \
         per cache; give this one its own (Options::cache_dir, CKPTSTORE_CACHE_DIR)"
    )]
    CacheLocked {
        /// The store's URL.
        url: String,
        /// The cache directory.
        path: PathBuf,
        /// The pid written by the holder, if readable.
        pid: String,
    },

    /// A request to the object store failed (after the bounded retries, for a transient
    /// failure). Nothing is committed by a failed publish; the next open cleans up.
    #[error("{url}: {op} {key}: {message}")]
    Remote {
        /// The store's URL.
        url: String,
        /// The request (`put`, `get`, `list`, `delete`, `upload part`...).
        op: &'static str,
        /// The object key, relative to the bucket.
        key: String,
        /// What the server or the client said (never credentials).
        message: String,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
}
