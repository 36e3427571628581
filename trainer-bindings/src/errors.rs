//! Engine errors as Python exceptions. Every engine message (what failed, where, what to do)
//! reaches the user unchanged; the class says which family it belongs to.

use ckptstore_engine::Error;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use std::path::Path;

create_exception!(
    _native,
    StoreError,
    PyException,
    "Base class of the store's errors."
);
create_exception!(
    _native,
    LockedError,
    StoreError,
    "Another process holds the store's writer lock."
);
create_exception!(
    _native,
    ReadOnlyError,
    StoreError,
    "A write on a store opened read-only."
);
create_exception!(
    _native,
    PoisonedError,
    StoreError,
    "An earlier fsync failed; reopen the store."
);
create_exception!(
    _native,
    CorruptionError,
    StoreError,
    "Stored bytes or records fail their checksums."
);
create_exception!(
    _native,
    NotFoundError,
    StoreError,
    "No such checkpoint, tensor or blob."
);
create_exception!(
    _native,
    PinnedError,
    StoreError,
    "The checkpoint is pinned and cannot be deleted."
);

create_exception!(
    _native,
    EncryptionKeyError,
    StoreError,
    "The store (or checkpoint) is encrypted and its key was not supplied, or another key was."
);

/// Which Python class an engine error becomes. Kept apart from `PyErr` so a background save
/// can hold its failure without the GIL and raise it in every `wait()`.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Store,
    Locked,
    ReadOnly,
    Poisoned,
    Corruption,
    NotFound,
    Pinned,
    Key,
    Value,
}

/// An engine failure ready to be raised.
#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: Kind,
    pub message: String,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        if let Error::Locked { path, pid } = &e {
            if pid.trim() == std::process::id().to_string() {
                return Failure {
                    kind: Kind::Locked,
                    message: locked_by_own_pid(path),
                };
            }
        }
        let kind = match &e {
            Error::Locked { .. } | Error::CacheLocked { .. } => Kind::Locked,
            Error::ReadOnly { .. } => Kind::ReadOnly,
            Error::Poisoned { .. } => Kind::Poisoned,
            Error::NotFound(_) => Kind::NotFound,
            Error::Pinned { .. } => Kind::Pinned,
            Error::KeyRequired { .. } | Error::WrongKey { .. } => Kind::Key,
            Error::InvalidArgument(_) | Error::StrictLoad { .. } | Error::TensorMismatch { .. } => {
                Kind::Value
            }
            Error::WalCorrupt { .. }
            | Error::WalTornTail { .. }
            | Error::BadHeader { .. }
            | Error::BadManifest { .. }
            | Error::ChunkCorrupt { .. }
            | Error::SegmentMissing { .. }
            | Error::CurrentMissing { .. }
            | Error::CurrentDangling { .. }
            | Error::MacMismatch { .. }
            | Error::Rollback { .. } => Kind::Corruption,
            _ => Kind::Store,
        };
        Failure {
            kind,
            message: e.to_string(),
        }
    }
}

/// The lock file names this process, yet the lock is taken: either another handle in this
/// process that does not share the store (a `DcpCoordinator`) holds it, or a child forked
/// while the store was open inherited it (the pid written is the parent's). Names the other
/// processes that have the lock file open, never this one as "another writer".
fn locked_by_own_pid(lock: &Path) -> String {
    let me = std::process::id();
    let dir = lock.parent().unwrap_or(lock).display();
    let others = processes_with_open(lock, me);
    if others.is_empty() {
        format!(
            "store {dir} is locked by another writer in this same process (pid {me}): a \
             DcpCoordinator (or the engine's Rust API) and a Store on one directory do not \
             share the lock; close the other one first, or open this one read-only"
        )
    } else {
        let list: Vec<String> = others.iter().map(u32::to_string).collect();
        format!(
            "store {dir} is locked by process {} (it holds this process's lock file, \
             typically a child forked while the store was open); stop it, or open the store \
             read-only",
            list.join(", ")
        )
    }
}

/// Processes other than `me` with `path` among their open files (Linux /proc; empty
/// elsewhere or where /proc cannot be read).
fn processes_with_open(path: &Path, me: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    let want = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == want))
        {
            out.push(pid);
        }
    }
    out
}

impl Failure {
    /// The same failure with what was being done in front.
    pub fn context(self, what: &str) -> Self {
        Failure {
            kind: self.kind,
            message: format!("{what}: {}", self.message),
        }
    }

    pub fn store(message: impl Into<String>) -> Self {
        Failure {
            kind: Kind::Store,
            message: message.into(),
        }
    }
}

impl From<Failure> for PyErr {
    fn from(f: Failure) -> PyErr {
        let m = f.message;
        match f.kind {
            Kind::Store => StoreError::new_err(m),
            Kind::Locked => LockedError::new_err(m),
            Kind::ReadOnly => ReadOnlyError::new_err(m),
            Kind::Poisoned => PoisonedError::new_err(m),
            Kind::Corruption => CorruptionError::new_err(m),
            Kind::NotFound => NotFoundError::new_err(m),
            Kind::Pinned => PinnedError::new_err(m),
            Kind::Key => EncryptionKeyError::new_err(m),
            Kind::Value => PyValueError::new_err(m),
        }
    }
}

/// Engine result → Python result.
pub fn py<T>(r: ckptstore_engine::Result<T>) -> PyResult<T> {
    r.map_err(|e| Failure::from(e).into())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("StoreError", py.get_type::<StoreError>())?;
    m.add("LockedError", py.get_type::<LockedError>())?;
    m.add("ReadOnlyError", py.get_type::<ReadOnlyError>())?;
    m.add("PoisonedError", py.get_type::<PoisonedError>())?;
    m.add("CorruptionError", py.get_type::<CorruptionError>())?;
    m.add("NotFoundError", py.get_type::<NotFoundError>())?;
    m.add("PinnedError", py.get_type::<PinnedError>())?;
    m.add("EncryptionKeyError", py.get_type::<EncryptionKeyError>())?;
    Ok(())
}
