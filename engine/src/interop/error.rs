//! The error of an import or export: what is wrong with the external file. It reaches the
//! caller inside the engine's [`crate::Error::Interop`], with the file's path.

use super::{mindspore, safetensors};
use std::path::Path;

/// What is wrong with an external file, by format.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A safetensors file is malformed or could not be read or written.
    #[error("safetensors: {0}")]
    Safetensors(#[source] safetensors::FormatError),
    /// A MindSpore `.ckpt` file is malformed or could not be read or written (boxed: it is
    /// large).
    #[error("MindSpore .ckpt: {0}")]
    MindSpore(#[source] Box<mindspore::FormatError>),
}

impl Error {
    /// The engine error for this one about the file at `path`.
    pub(crate) fn at(self, path: &Path) -> crate::Error {
        crate::Error::Interop {
            path: path.to_path_buf(),
            error: Box::new(self),
        }
    }

    /// The interop error an engine error carries, if it is one.
    pub fn of(e: &crate::Error) -> Option<&Error> {
        match e {
            crate::Error::Interop { error, .. } => error.downcast_ref(),
            _ => None,
        }
    }
}
