//! `UringFile`: one writable file, with its buffered descriptor, its O_DIRECT descriptor
//! while the file system takes direct I/O, and the length bookkeeping preallocation needs.

use super::plan::{plan, Align, Route};
use super::ring::{Fds, Job, WriteNotes};
use super::Shared;
use crate::io::private_fs::{self, Create};
use crate::io::StorageFile;
use rustix::fs::{AtFlags, FallocateFlags, OFlags, StatxFlags};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

/// The file under a `UringFile`, for everything but the ring's writes and syncs: a real file,
/// or a file of the power-loss simulator (`super::sim_device`).
pub(super) trait Disk: Send + Sync {
    /// The descriptor buffered writes and syncs go to.
    fn fd(&self) -> RawFd;
    /// fallocate(mode 0) of `[from, from + len)`: reserves the space, grows the length.
    fn fallocate(&self, from: u64, len: u64) -> io::Result<()>;
    /// ftruncate.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// The length on disk.
    fn len(&self) -> io::Result<u64>;
    /// pread of all of `buf`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// posix_fadvise: DONTNEED, or WILLNEED when `will_need`.
    fn advise(&self, offset: u64, len: std::num::NonZeroU64, will_need: bool) -> io::Result<()>;
}

impl Disk for File {
    fn fd(&self) -> RawFd {
        self.as_raw_fd()
    }

    fn fallocate(&self, from: u64, len: u64) -> io::Result<()> {
        Ok(rustix::fs::fallocate(
            self,
            FallocateFlags::empty(),
            from,
            len,
        )?)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    fn advise(&self, offset: u64, len: std::num::NonZeroU64, will_need: bool) -> io::Result<()> {
        let advice = if will_need {
            rustix::fs::Advice::WillNeed
        } else {
            rustix::fs::Advice::DontNeed
        };
        Ok(rustix::fs::fadvise(self, offset, Some(len), advice)?)
    }
}

/// The O_DIRECT side of a file: its descriptor (owned by `_file` for a real file) and the
/// alignment direct pieces keep.
pub(super) struct Direct {
    pub(super) _file: Option<File>,
    pub(super) fd: RawFd,
    pub(super) align: Align,
}

pub(super) struct UringFile {
    path: PathBuf,
    buffered: Box<dyn Disk>,
    state: Mutex<State>,
    shared: Arc<Shared>,
}

struct State {
    /// The O_DIRECT descriptor and its alignment; `None` once the file is buffered only.
    direct: Option<Direct>,
    /// The length the store sees: the end of the furthest write (or `set_len`/`allocate`).
    logical: u64,
    /// The file's real length, past `logical` by the preallocated reserve.
    allocated: u64,
}

impl UringFile {
    /// Opens `path` for writing (creating it with `mode` when `create_new`): without following
    /// a symlink, a regular file only (`private_fs::open_file`).
    pub(super) fn open(
        path: &Path,
        create_new: bool,
        mode: u32,
        shared: Arc<Shared>,
    ) -> io::Result<Self> {
        let create = if create_new { Create::New } else { Create::No };
        let buffered = private_fs::open_file(path, true, create, mode)?;
        let direct = if shared.cfg.direct {
            match open_direct(&buffered, shared.cfg.piece_bytes) {
                Ok((f, align)) => Some(Direct {
                    fd: f.as_raw_fd(),
                    _file: Some(f),
                    align,
                }),
                Err(why) => {
                    shared.note_refusal(path, &why);
                    None
                }
            }
        } else {
            None
        };
        Self::over(path, Box::new(buffered), direct, shared)
    }

    /// A `UringFile` over an open `disk` and its direct side (the simulator's files too).
    pub(super) fn over(
        path: &Path,
        buffered: Box<dyn Disk>,
        direct: Option<Direct>,
        shared: Arc<Shared>,
    ) -> io::Result<Self> {
        let len = buffered.len()?;
        Ok(UringFile {
            path: path.to_path_buf(),
            buffered,
            state: Mutex::new(State {
                direct,
                logical: len,
                allocated: len,
            }),
            shared,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves space past `end` when the file is written direct, so direct writes land inside
    /// the file's length: 16 times this write's size ahead, at most `prealloc_bytes`, so a
    /// small file (a WAL taking a large record) reserves little. Best effort: a refusal (no
    /// space for the whole reserve, no fallocate here) leaves the write to grow the file.
    fn reserve(&self, st: &mut State, end: u64, written: u64) {
        let step = self.shared.cfg.prealloc_bytes;
        if step == 0 || st.direct.is_none() || end <= st.allocated {
            return;
        }
        let ahead = step.min(written.saturating_mul(16));
        let target = end.saturating_add(ahead).div_ceil(1 << 20) << 20;
        let from = st.allocated;
        if self.buffered.fallocate(from, target - from).is_ok() {
            st.allocated = target;
        }
    }

    /// Cuts the preallocated reserve off before a sync, so the synced length is the written
    /// one (recovery and readers never see the reserve as data).
    fn trim(&self, st: &mut State) -> io::Result<()> {
        if st.allocated > st.logical {
            self.buffered.set_len(st.logical)?;
            st.allocated = st.logical;
        }
        Ok(())
    }

    fn sync(&self, data_only: bool) -> io::Result<()> {
        let mut st = self.state();
        self.trim(&mut st)?;
        let mut ring = self.shared.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.for_this_process()?.sync(self.buffered.fd(), data_only)
    }
}

/// Opens the O_DIRECT descriptor of the file `buffered` is open on and finds its alignment;
/// `Err(why)` when the file system does not take direct I/O (or needs an alignment the pieces
/// cannot keep). It reopens the descriptor, not the name (`/proc/self/fd/N` leads to the open
/// inode), so a name swapped after the first open cannot give the direct writes another file;
/// the inode is compared to be sure. Without /proc the file is written buffered.
fn open_direct(buffered: &File, piece: usize) -> Result<(File, Align), String> {
    let by_fd = format!("/proc/self/fd/{}", buffered.as_raw_fd());
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(OFlags::DIRECT.bits() as i32)
        .open(&by_fd)
        .map_err(|e| format!("open with O_DIRECT through {by_fd}: {e}"))?;
    let (a, b) = (
        f.metadata().map_err(|e| e.to_string())?,
        buffered.metadata().map_err(|e| e.to_string())?,
    );
    if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
        return Err(format!("{by_fd} led to another file than the one opened"));
    }
    let page = rustix::param::page_size() as u64;
    let mut align = Align {
        offset: page.max(4096),
        mem: 4096,
    };
    // Linux 6.1+ says what this file needs; older kernels get the conservative default.
    if let Ok(sx) = rustix::fs::statx(&f, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN) {
        if sx.stx_mask & StatxFlags::DIOALIGN.bits() != 0 {
            if sx.stx_dio_offset_align == 0 {
                return Err("statx reports no direct I/O support".into());
            }
            align.offset = align.offset.max(u64::from(sx.stx_dio_offset_align));
            align.mem = (sx.stx_dio_mem_align as usize).max(1);
        }
    }
    if !align.offset.is_power_of_two()
        || !align.mem.is_power_of_two()
        || !(piece as u64).is_multiple_of(align.offset)
    {
        return Err(format!(
            "direct I/O alignment {}/{} does not divide the {piece}-byte pieces",
            align.offset, align.mem
        ));
    }
    Ok((f, align))
}

impl StorageFile for UringFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_many(&[(offset, buf)])
    }

    fn write_many(&self, writes: &[(u64, &[u8])]) -> io::Result<()> {
        let mut st = self.state();
        let align = st.direct.as_ref().map(|d| d.align);
        let piece = self.shared.cfg.piece_bytes;
        let mut end = 0u64;
        let jobs: Vec<Job<'_>> = writes
            .iter()
            .map(|&(offset, buf)| {
                end = end.max(offset + buf.len() as u64);
                Job {
                    buf,
                    offset,
                    pieces: plan(buf.as_ptr() as usize, buf.len(), offset, align, piece),
                }
            })
            .collect();
        let any_direct = jobs
            .iter()
            .any(|j| j.pieces.iter().any(|p| p.route != Route::Buffered));
        if any_direct {
            let written = writes.iter().map(|(_, b)| b.len() as u64).sum();
            self.reserve(&mut st, end, written);
        }
        let fds = Fds {
            buffered: self.buffered.fd(),
            direct: st.direct.as_ref().map(|d| (d.fd, d.align)),
        };
        let mut notes = WriteNotes::default();
        let res = {
            let mut ring = self.shared.ring.lock().unwrap_or_else(|e| e.into_inner());
            ring.for_this_process()
                .and_then(|r| r.write(&jobs, fds, &mut notes))
        };
        let pieces: usize = jobs.iter().map(|j| j.pieces.len()).sum();
        let s = &self.shared;
        s.direct_pieces
            .fetch_add(notes.direct_pieces as u64, Ordering::Relaxed);
        s.buffered_pieces.fetch_add(
            pieces.saturating_sub(notes.direct_pieces) as u64,
            Ordering::Relaxed,
        );
        if notes.direct_refused {
            st.direct = None;
            s.note_refusal(&self.path, "EINVAL on an aligned direct write");
        }
        res?;
        st.logical = st.logical.max(end);
        st.allocated = st.allocated.max(end);
        Ok(())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // The reserve past the written end reads as zeros; it is not part of the file.
        if offset.saturating_add(buf.len() as u64) > self.state().logical {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the file",
            ));
        }
        self.buffered.read_exact_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.sync(true)
    }

    fn sync_all(&self) -> io::Result<()> {
        self.sync(false)
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        let mut st = self.state();
        match self.buffered.fallocate(0, len) {
            Ok(()) => {}
            // As StdIo: keep the length contract where space cannot be reserved.
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::OPNOTSUPP.raw_os_error()) => {
                if self.buffered.len()? < len {
                    self.buffered.set_len(len)?;
                }
            }
            Err(e) => return Err(e),
        }
        st.logical = st.logical.max(len);
        st.allocated = st.allocated.max(len);
        Ok(())
    }

    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        // Direct pieces are already on their way; this helps the buffered head and tail.
        let Some(len) = std::num::NonZeroU64::new(len) else {
            return Ok(());
        };
        self.buffered.advise(offset, len, false)
    }

    fn will_need(&self, offset: u64, len: u64) {
        if let Some(len) = std::num::NonZeroU64::new(len) {
            // Only a hint: a file system that refuses it reads on demand.
            let _ = self.buffered.advise(offset, len, true);
        }
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.state().logical)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.state();
        self.buffered.set_len(len)?;
        st.logical = len;
        st.allocated = len;
        Ok(())
    }
}

#[cfg(test)]
mod direct_by_descriptor_tests {
    use super::*;

    /// The O_DIRECT descriptor is the buffered one's file, whatever its name leads to now: a
    /// name swapped (or removed) after the first open cannot give direct writes another file.
    #[test]
    fn o_direct_descriptor_is_reopened_from_the_fd_not_the_name() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("00000001.seg");
        let buffered = private_fs::open_file(&path, true, Create::New, 0o600).unwrap();
        // The name now leads to another file, then to nothing.
        std::fs::rename(&path, d.path().join("moved")).unwrap();
        std::fs::write(&path, b"attacker's file").unwrap();
        let check = |direct: Result<(File, Align), String>| match direct {
            Ok((f, _)) => {
                let (a, b) = (f.metadata().unwrap(), buffered.metadata().unwrap());
                assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()));
            }
            // A file system without O_DIRECT (tmpfs) refuses it; never another file.
            Err(why) => assert!(!why.contains("another file"), "{why}"),
        };
        check(open_direct(&buffered, 1 << 20));
        std::fs::remove_file(&path).unwrap();
        check(open_direct(&buffered, 1 << 20));
        assert_eq!(std::fs::read(d.path().join("moved")).unwrap(), b"");
    }
}
