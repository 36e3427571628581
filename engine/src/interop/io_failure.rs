//! The one I/O failure of reading or writing an external file, shared by every format's error.

/// Reading, seeking or writing an external file failed.
#[derive(Debug, thiserror::Error)]
#[error("{op} failed: {source}")]
pub struct IoFailure {
    /// `read`, `seek` or `write`.
    pub op: &'static str,
    /// The OS error.
    #[source]
    pub source: std::io::Error,
}

/// Maps an OS error of operation `op` into a format's error.
pub(crate) fn io_err<E: From<IoFailure>>(op: &'static str) -> impl FnOnce(std::io::Error) -> E {
    move |source| IoFailure { op, source }.into()
}
