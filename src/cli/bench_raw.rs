//! The machine's own limits for `ckptstore bench`: sequential raw writes and reads of the same
//! byte count, each both ways (O_DIRECT and through the page cache), and the page-cache drop
//! that makes a read cold. The bench's limit is the faster of the two ways, measured in the
//! same run, so a store figure is never compared with a handicapped baseline.

use super::{fail, CliResult};
use rustix::fs::{Advice, Mode, OFlags};
use std::path::Path;
use std::time::Instant;

/// Block of the raw reads and writes (and the bench's data generation).
pub const BLOCK: usize = 4 << 20;

/// How cold reads are made cold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Cold {
    /// `sync; echo 3 > /proc/sys/vm/drop_caches` when this process may (root), else `file`.
    Auto,
    /// Only the measured files' clean pages (POSIX_FADV_DONTNEED); no root needed, and other
    /// processes' cache is left alone.
    File,
}

/// Makes `files` cold. `Ok(true)` when the whole page cache was dropped (root), `Ok(false)`
/// when only the files' pages were.
pub fn drop_cache(files: &[&Path], how: Cold) -> CliResult<bool> {
    for f in files {
        let f = std::fs::File::open(f)?;
        // Dirty pages are not dropped: write them back first.
        rustix::fs::fdatasync(&f)?;
        rustix::fs::fadvise(&f, 0, None, Advice::DontNeed)?;
    }
    if how == Cold::Auto {
        rustix::fs::sync();
        if std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A page-aligned, pre-faulted buffer of one block (O_DIRECT needs aligned memory). `huge`:
/// in huge pages where the kernel has them free, as the store's own read buffers are
/// (`ckptstore::io::huge`): a read into them is one request per block, not four, so the read
/// limit is the disk's best. Writes keep 4 KiB pages: the store writes from the caller's
/// memory, which is in 4 KiB pages.
fn aligned_block(huge: bool) -> CliResult<memmap2::MmapMut> {
    let mut map = memmap2::MmapOptions::new().len(BLOCK).map_anon()?;
    if huge {
        ckptstore::io::huge::advise(&mut map);
    }
    ckptstore::io::prefault(&mut map);
    Ok(map)
}

/// O_DIRECT open; `None` where the file system refuses O_DIRECT (tmpfs).
fn open_direct(path: &Path, flags: OFlags) -> CliResult<Option<std::os::fd::OwnedFd>> {
    match rustix::fs::open(
        path,
        flags | OFlags::DIRECT | OFlags::CLOEXEC,
        Mode::from(0o644),
    ) {
        Ok(fd) => Ok(Some(fd)),
        Err(rustix::io::Errno::INVAL) => Ok(None),
        Err(e) => Err(super::Failure(format!("open {}: {e}", path.display()))),
    }
}

fn open_buffered(path: &Path, flags: OFlags) -> CliResult<std::os::fd::OwnedFd> {
    rustix::fs::open(path, flags | OFlags::CLOEXEC, Mode::from(0o644))
        .map_err(|e| super::Failure(format!("open {}: {e}", path.display())))
}

/// Sequential writes of `data` in blocks from a reused aligned buffer, then fdatasync:
/// seconds. `direct`: O_DIRECT (`None` if the file system refuses it), else through the page
/// cache.
pub fn write(path: &Path, data: &[u8], direct: bool) -> CliResult<Option<f64>> {
    let mut block = aligned_block(false)?;
    let _ = std::fs::remove_file(path);
    let t = Instant::now();
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC;
    let fd = if direct {
        match open_direct(path, flags)? {
            Some(fd) => fd,
            None => return Ok(None),
        }
    } else {
        open_buffered(path, flags)?
    };
    let mut off = 0u64;
    for chunk in data.chunks(BLOCK) {
        block[..chunk.len()].copy_from_slice(chunk);
        let mut done = 0;
        while done < BLOCK {
            let n = rustix::io::pwrite(&fd, &block[done..], off + done as u64)?;
            if n == 0 {
                return fail("raw write: the disk accepted no bytes");
            }
            done += n;
        }
        off += BLOCK as u64;
    }
    rustix::fs::fdatasync(&fd)?;
    Ok(Some(t.elapsed().as_secs_f64()))
}

/// Reads the file (made cold by the caller) sequentially in blocks into a reused buffer:
/// seconds. `direct`: O_DIRECT (`None` if refused), else through the page cache (kernel
/// readahead). `huge`: the buffer in huge pages where free ([`aligned_block`]).
pub fn read(path: &Path, size: u64, direct: bool, huge: bool) -> CliResult<Option<f64>> {
    let mut block = aligned_block(huge)?;
    let t = Instant::now();
    let fd = if direct {
        match open_direct(path, OFlags::RDONLY)? {
            Some(fd) => fd,
            None => return Ok(None),
        }
    } else {
        open_buffered(path, OFlags::RDONLY)?
    };
    let mut off = 0u64;
    while off < size {
        let n = rustix::io::pread(&fd, &mut block[..], off)?;
        if n == 0 {
            return fail(format!("raw read: {} ended early", path.display()));
        }
        off += n as u64;
    }
    std::hint::black_box(&block[..]);
    Ok(Some(t.elapsed().as_secs_f64()))
}
