//! Read-only memory maps of segment files, for zero-copy loads.
//!
//! This module and the `cuda`/io_uring modules are the only places in the engine allowed
//! `unsafe` (the engine denies it everywhere else); each block says which invariant makes it
//! sound.
//!
//! # Why mapping a segment is sound here
//! A map is only taken of a *segment* file, opened read-only, and only read through `&[u8]`.
//! The store never writes a byte of a segment that a committed manifest references (segments
//! are append-only: new frames go past the committed end, and a committed frame is never
//! rewritten), and it never truncates a segment: a segment leaves the store only by unlink
//! (GC, segment compaction), which keeps the inode and our mapping alive until the map is
//! dropped — and not even that while a reader's lease (store/lease.rs) names the segment, so
//! a read-only store can still open and map segments of checkpoints deleted since its open.
//! So the bytes a reader sees through the map cannot change under it because of this store.
//!
//! What the store cannot prevent is another process (or a person) truncating or overwriting a
//! segment file by hand. An overwrite changes bytes a caller may already hold as `&[u8]`; a
//! truncation makes touching the pages past the new end raise **SIGBUS**, which kills the
//! process. That is the price of zero-copy, the same as for any mmap-based loader; BLAKE3
//! verification (on by default in `CheckpointReader::tensor_view`) catches a changed payload
//! at load time, not later, and the pread path (`tensor`) is unaffected.

use std::fs::File;
use std::io;

/// A read-only memory map of a whole file, taken at one moment: it covers the file's length
/// at that moment (a segment may grow later; a longer map is taken then).
pub struct MappedFile {
    map: memmap2::Mmap,
}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedFile")
            .field("len", &self.map.len())
            .finish()
    }
}

impl MappedFile {
    /// Maps `file` (opened for reading) read-only and shared. `Ok(None)` for an empty file,
    /// which has nothing to map.
    pub(crate) fn map(file: &File) -> io::Result<Option<MappedFile>> {
        if file.metadata()?.len() == 0 {
            return Ok(None);
        }
        #[allow(unsafe_code)]
        // SAFETY: `Mmap::map` is unsafe because the mapped file may change or shrink while the
        // map exists. The store only maps segment files, which it never writes again where a
        // committed manifest points and never truncates (it only unlinks them, which keeps the
        // pages valid until this map is dropped); see the module docs. A truncation by another
        // process raises SIGBUS on access, documented there; a modification is caught by
        // BLAKE3 verification, which is on by default.
        let map = unsafe { memmap2::Mmap::map(file) }?;
        Ok(Some(MappedFile { map }))
    }

    /// The mapped bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.map
    }

    /// Length of the map in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the map is empty (never, for a map this module made).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Hints that `len` bytes from `offset` (clipped to the map) will be read soon
    /// (MADV_WILLNEED): the kernel starts reading them in, so a cold load is not one page
    /// fault at a time. Errors are ignored (it is only a hint).
    pub fn will_need(&self, offset: usize, len: usize) {
        let len = len.min(self.map.len().saturating_sub(offset));
        if len > 0 {
            let _ = self
                .map
                .advise_range(memmap2::Advice::WillNeed, offset, len);
        }
    }
}
