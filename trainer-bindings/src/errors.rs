//! Engine errors as Python exceptions. Every engine message (what failed, where, what to do)
//! reaches the user unchanged; the class says which family it belongs to.

use ckptstore_engine::Error;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;

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
        let kind = match &e {
            Error::Locked { .. } => Kind::Locked,
            Error::ReadOnly { .. } => Kind::ReadOnly,
            Error::Poisoned { .. } => Kind::Poisoned,
            Error::NotFound(_) => Kind::NotFound,
            Error::Pinned { .. } => Kind::Pinned,
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
            | Error::CurrentDangling { .. } => Kind::Corruption,
            _ => Kind::Store,
        };
        Failure {
            kind,
            message: e.to_string(),
        }
    }
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
    Ok(())
}
