//! Cold reads that bypass the page cache: an O_DIRECT descriptor per segment file, reads of the
//! aligned range that covers the wanted bytes into a reused, aligned, already-touched buffer
//! ([`ReadBuf`]), and the bulk pre-faulting of a load's destination ([`prefault`]).
//!
//! Why (docs/DECISIONS.md, "Cold reads go direct"): on the development VM a buffered cold read
//! pays a slow first touch of every new page-cache page (the kernel's copy out of the cache ran
//! near 1 GB/s, 79% of `verify --all`), while an O_DIRECT read into a buffer that is reused
//! never touches a new page: the disk's DMA lands in memory already mapped. Bytes already in
//! the page cache are still read through it (a copy from the cache is faster than the disk);
//! a file system that refuses O_DIRECT (tmpfs) or an alignment we cannot keep falls back to
//! buffered reads.
//!
//! Like `mmap.rs` and the io_uring module, this module is allowed `unsafe` (`madvise` and
//! `mincore` on memory we hold); each block says why it is sound.

use super::recycle::Kind;
use rustix::fs::{AtFlags, OFlags, StatxFlags};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};

/// Alignment of [`ReadBuf`]'s memory: a page (it is an anonymous map), more than any block
/// device asks of O_DIRECT memory here (`statx` reports 512 or 4 for virtio and NVMe).
const BUF_ALIGN: usize = 4096;

/// The alignment a reader lays direct reads into its own memory out on ([`ViewBuf`]): file
/// offsets and addresses that are multiples of it (a file system that needs more refuses
/// them, and the reader reads those bytes buffered).
pub const DIRECT_ALIGN: u64 = BUF_ALIGN as u64;

/// A buffer aligned for O_DIRECT (an anonymous map, so page-aligned and zeroed by the kernel
/// without a memset pass), grown on demand and reused: its pages are mapped when it is made
/// (huge pages where the kernel has them free, [`super::huge`]), so a direct read into it
/// faults nothing. One per reading thread, kept between reads; dropped, its memory is kept
/// for the next read buffer (`io::recycle`: a store opened after this one's reads maps none).
#[derive(Default)]
pub struct ReadBuf {
    map: Option<memmap2::MmapMut>,
}

impl Drop for ReadBuf {
    fn drop(&mut self) {
        if let Some(map) = self.map.take() {
            super::recycle::give(Kind::Read, map);
        }
    }
}

impl std::fmt::Debug for ReadBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadBuf")
            .field("cap", &self.capacity())
            .finish()
    }
}

impl ReadBuf {
    /// Bytes held.
    pub fn capacity(&self) -> usize {
        self.map.as_ref().map_or(0, |m| m.len())
    }

    /// The first `len` bytes: the contents of the last use when it is long enough, else a
    /// new, longer buffer (contents not kept). Panics if the memory cannot be mapped, as a
    /// failed allocation aborts.
    pub fn get_mut(&mut self, len: usize) -> &mut [u8] {
        if len == 0 {
            return &mut [];
        }
        if self.capacity() < len {
            if let Some(old) = self.map.take() {
                super::recycle::give(Kind::Read, old);
            }
            // Round up to 1 MiB so chunks of slightly different sizes reuse one buffer.
            let cap = len.div_ceil(1 << 20) << 20;
            // A closed store's buffer where one fits: mapped (and advised) already.
            let map = super::recycle::take(Kind::Read, cap).unwrap_or_else(|| {
                #[allow(clippy::expect_used)] // as an allocation failure
                let mut map = memmap2::MmapOptions::new()
                    .len(cap)
                    .map_anon()
                    .expect("mapping a read buffer");
                // In huge pages where free: a direct read into it is then one request, not
                // four (io/huge.rs).
                super::huge::advise(&mut map);
                prefault(&mut map);
                map
            });
            self.map = Some(map);
        }
        match self.map.as_mut() {
            Some(m) => &mut m[..len],
            None => &mut [],
        }
    }
}

/// Whether cold reads may go direct: yes, unless `CKPTSTORE_DIRECT_READ=0` is set (read once
/// per process) — the escape hatch if a file system misbehaves under O_DIRECT, and the way to
/// compare both routes in one build.
pub(crate) fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("CKPTSTORE_DIRECT_READ").map_or(true, |v| v != "0"))
}

/// The O_DIRECT read descriptor of an open file, with the offset alignment its file system
/// needs.
pub(crate) struct DirectReader {
    file: File,
    align: u64,
}

impl DirectReader {
    /// Opens the O_DIRECT descriptor of the file `buffered` is open on (through
    /// `/proc/self/fd/N`, so a name swapped since cannot lead elsewhere; the inode is compared).
    /// `Err(why)` where the file system refuses direct I/O or wants an alignment
    /// [`ReadBuf`] does not give.
    pub(crate) fn open(buffered: &File) -> Result<Self, String> {
        let by_fd = format!("/proc/self/fd/{}", buffered.as_raw_fd());
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(OFlags::DIRECT.bits() as i32)
            .open(&by_fd)
            .map_err(|e| format!("open with O_DIRECT through {by_fd}: {e}"))?;
        let (a, b) = (
            file.metadata().map_err(|e| e.to_string())?,
            buffered.metadata().map_err(|e| e.to_string())?,
        );
        if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
            return Err(format!("{by_fd} led to another file than the one opened"));
        }
        let mut align = (rustix::param::page_size() as u64).max(4096);
        // Linux 6.1+ says what this file needs; older kernels get a page, which every block
        // device accepts.
        if let Ok(sx) = rustix::fs::statx(&file, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN) {
            if sx.stx_mask & StatxFlags::DIOALIGN.bits() != 0 {
                if sx.stx_dio_offset_align == 0 {
                    return Err("statx reports no direct I/O support".into());
                }
                let (off, mem) = (
                    u64::from(sx.stx_dio_offset_align),
                    sx.stx_dio_mem_align as usize,
                );
                if !off.is_power_of_two() || mem > BUF_ALIGN {
                    return Err(format!("direct I/O alignment {off}/{mem} not supported"));
                }
                align = align.max(off);
            }
        }
        Ok(DirectReader { file, align })
    }

    /// [`DirectReader::open`] believing the file system needs offsets aligned to `align`
    /// (for tests of the refusal of a wrong one).
    #[cfg(test)]
    pub(crate) fn with_align(buffered: &File, align: u64) -> Result<Self, String> {
        Ok(DirectReader {
            align,
            ..Self::open(buffered)?
        })
    }

    /// The offset alignment of this file's direct reads.
    pub(crate) fn align(&self) -> u64 {
        self.align
    }

    /// Reads the `len` bytes at `offset`: the aligned range covering them, directly into
    /// `buf`, returning the wanted bytes inside it. `UnexpectedEof` when the file ends first;
    /// `InvalidInput` (EINVAL) when the file system refuses this direct read after all — the
    /// caller reads buffered instead.
    pub(crate) fn read<'b>(
        &self,
        offset: u64,
        len: usize,
        buf: &'b mut ReadBuf,
    ) -> io::Result<&'b [u8]> {
        let start = offset - offset % self.align;
        let end = (offset + len as u64).div_ceil(self.align) * self.align;
        let span = (end - start) as usize;
        let need = (offset - start) as usize + len;
        let b = buf.get_mut(span);
        let mut done = 0usize;
        while done < need {
            match self.file.read_at(&mut b[done..], start + done as u64) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "read past the end of the file",
                    ))
                }
                // A short read ends at the file's end (or a signal): only the last one may
                // leave `done` unaligned, and then the loop is over or the next read is EOF.
                Ok(n) if !(done + n).is_multiple_of(self.align as usize) && done + n < need => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "read past the end of the file",
                    ))
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let from = (offset - start) as usize;
        Ok(&b[from..from + len])
    }
}

impl DirectReader {
    /// Reads directly into `dst` the bytes of the file from `offset` (no bounce buffer: the
    /// disk's DMA lands in `dst`). `Ok(None)` when `offset`, `dst`'s address or its length is
    /// not aligned as this file's direct reads need (the caller reads another way); else
    /// `Ok(Some(n))`, the bytes read — fewer than `dst.len()` only where the file ends first.
    /// `InvalidInput` (EINVAL) when the file system refuses this direct read after all.
    pub(crate) fn read_into(&self, offset: u64, dst: &mut [u8]) -> io::Result<Option<usize>> {
        let a = self.align as usize;
        if !offset.is_multiple_of(self.align)
            || !(dst.as_ptr() as usize).is_multiple_of(BUF_ALIGN)
            || !dst.len().is_multiple_of(a)
        {
            return Ok(None);
        }
        let mut done = 0usize;
        while done < dst.len() {
            match self.file.read_at(&mut dst[done..], offset + done as u64) {
                Ok(0) => break,
                // A short read ends at the file's end: the next read would be unaligned.
                Ok(n) if !(done + n).is_multiple_of(a) => {
                    done += n;
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Some(done))
    }
}

/// The memory of a tensor view read from the disk rather than mapped: one anonymous map
/// (page-aligned, so direct reads can land in it), filled once by the reading threads and
/// read-only from then on. Its pages are faulted in by the thread that reads each part
/// ([`prefault`]), so the faulting overlaps the other threads' reads. Dropped, its memory is
/// kept for the next view of a similar size (`io::recycle`), whose pages are then mapped
/// already.
pub struct ViewBuf {
    map: Option<memmap2::MmapMut>,
}

impl std::fmt::Debug for ViewBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewBuf")
            .field("len", &self.as_slice().len())
            .finish()
    }
}

impl ViewBuf {
    /// At least `len` bytes, page-aligned: the memory of a dropped view that fits, else new
    /// anonymous memory (not yet faulted in). Its contents are unspecified (zeros or an
    /// earlier view's bytes): the caller overwrites every byte it hands out. Like any
    /// allocation that fails, a refused map is an error the caller reports (`TooLarge`).
    pub fn new(len: usize) -> io::Result<Self> {
        if let Some(map) = super::recycle::take(Kind::View, len) {
            return Ok(ViewBuf { map: Some(map) });
        }
        let cap = super::recycle::capacity_for(len);
        let map = memmap2::MmapOptions::new().len(cap).map_anon()?;
        Ok(ViewBuf { map: Some(map) })
    }

    /// The bytes (at least the length asked for).
    pub fn as_slice(&self) -> &[u8] {
        self.map.as_deref().unwrap_or_default()
    }

    /// The bytes, writable (while the buffer is being filled).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.map.as_deref_mut().unwrap_or_default()
    }
}

impl Drop for ViewBuf {
    fn drop(&mut self) {
        if let Some(map) = self.map.take() {
            super::recycle::give(Kind::View, map);
        }
    }
}

/// Whether every page of `len` bytes from `offset` of the file behind `map` is in the page
/// cache (mincore(2) on the file's map). Where the kernel will not say (a file this process
/// may not write reports every page resident, by design) the answer is "yes", so such files
/// are read through the cache, as before.
pub(crate) fn resident(map: &[u8], offset: usize, len: usize) -> bool {
    let page = rustix::param::page_size();
    let end = (offset + len).min(map.len());
    if offset >= end {
        return true;
    }
    let start = offset - offset % page;
    let pages = (end - start).div_ceil(page);
    let mut vec = vec![0u8; pages];
    #[allow(unsafe_code)]
    // SAFETY: `start` is page-aligned and `start..end` lies inside the live map `map`
    // borrows; `vec` holds one byte per page of that range, as mincore(2) writes.
    let rc = unsafe {
        libc::mincore(
            map.as_ptr().add(start) as *mut libc::c_void,
            end - start,
            vec.as_mut_ptr(),
        )
    };
    rc != 0 || vec.iter().all(|v| v & 1 == 1)
}

/// Faults in the page-aligned inside of `dst` in one call (MADV_POPULATE_WRITE, Linux 5.14+),
/// before the bytes are copied into it: one kernel entry instead of one fault per page. Pages
/// already there are untouched (their contents stay). Refused (an older kernel), the copy
/// faults them in as before.
pub fn prefault(dst: &mut [u8]) {
    if let Some((p, n)) = super::huge::aligned_inside(dst, rustix::param::page_size()) {
        #[allow(unsafe_code)]
        // SAFETY: `p..p+n` lies inside `dst`, memory we hold exclusively and writably;
        // MADV_POPULATE_WRITE maps its pages as a write would, without changing a byte of a
        // page already mapped (new anonymous pages read as zeros, as before).
        let _ = unsafe { rustix::mm::madvise(p, n, rustix::mm::Advice::LinuxPopulateWrite) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_buf_is_aligned_and_reused() {
        let mut b = ReadBuf::default();
        assert!(b.get_mut(0).is_empty());
        let p = b.get_mut(5000).as_ptr() as usize;
        assert_eq!(p % BUF_ALIGN, 0);
        b.get_mut(5000)[4999] = 7;
        assert_eq!(
            b.get_mut(100).as_ptr() as usize,
            p,
            "a shorter use reuses it"
        );
        assert_eq!(b.get_mut(3 << 20).len(), 3 << 20);
    }

    #[test]
    fn prefault_keeps_contents() {
        let mut v = vec![0u8; 3 << 20];
        v[12345] = 9;
        prefault(&mut v);
        assert_eq!(v[12345], 9);
        assert_eq!(v.iter().map(|&b| b as u64).sum::<u64>(), 9);
    }

    #[test]
    fn a_dropped_view_buffer_serves_the_next_one_of_a_similar_size() {
        // An odd size no other test here asks for, so the kept buffer is this test's.
        let page = rustix::param::page_size();
        let mut a = ViewBuf::new(37 * page + 11).unwrap();
        assert_eq!(a.as_slice().len(), 38 * page);
        a.as_mut_slice()[5] = 7;
        let at = a.as_slice().as_ptr();
        drop(a);
        let b = ViewBuf::new(35 * page).unwrap();
        assert_eq!(
            b.as_slice().as_ptr(),
            at,
            "the dropped buffer was not reused"
        );
        assert!(b.as_slice().len() >= 35 * page);
    }
}
