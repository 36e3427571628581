//! Buffers whose size comes from a manifest: a length read from disk is a claim, and a claim
//! too large to allocate must be a typed error, never an allocation failure that aborts the
//! process (a CRC-valid manifest may claim a petabyte tensor made of compressed chunks).

use crate::error::{Error, Result};

/// A zeroed buffer of `len` bytes for `what` (e.g. `tensor "w" of checkpoint 3`), or
/// [`Error::TooLarge`] if the allocator refuses it.
pub(crate) fn zeroed(len: u64, what: impl FnOnce() -> String) -> Result<Vec<u8>> {
    let too_large = |what: String| Error::TooLarge { what, bytes: len };
    let Ok(n) = usize::try_from(len) else {
        return Err(too_large(what()));
    };
    // Probe with a fallible reservation first; then allocate zeroed pages (calloc: the kernel
    // zeroes them lazily, no memset pass over a multi-GiB tensor). The probe costs one
    // map/unmap of address space, nothing next to reading the bytes.
    let mut probe: Vec<u8> = Vec::new();
    if probe.try_reserve_exact(n).is_err() {
        return Err(too_large(what()));
    }
    drop(probe);
    Ok(vec![0u8; n])
}
