//! `StdIo`: the reference backend on std::fs (pwrite, pread, fdatasync, fsync on directories).

use super::direct_read::{self, DirectReader};
use super::private_fs::{self, Create, DirStatus, DEFAULT_FILE_MODE};
use super::{MappedFile, ReadBuf, Storage, StorageFile};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// The real file system through std and rustix. Always available. Files are opened without
/// following symlinks and must be regular files; new ones are private to the owner (0600,
/// directories 0700) unless created through the `*_mode` calls (see `io::private_fs`).
#[derive(Debug, Default, Clone, Copy)]
pub struct StdIo;

struct StdFile {
    file: File,
    /// The map of the whole file, for zero-copy views and the page-cache residency test.
    map: Mutex<Option<Arc<MappedFile>>>,
    /// The O_DIRECT descriptor for cold reads, opened at the first one; `None` where the file
    /// system refuses it.
    direct: OnceLock<Option<DirectReader>>,
    /// Set when a direct read was refused after the open (EINVAL): buffered from then on.
    direct_refused: AtomicBool,
}

impl StdFile {
    fn boxed(file: File) -> Box<dyn StorageFile> {
        Box::new(StdFile {
            file,
            map: Mutex::new(None),
            direct: OnceLock::new(),
            direct_refused: AtomicBool::new(false),
        })
    }

    /// The direct reader, if this file reads direct.
    fn direct(&self) -> Option<&DirectReader> {
        if self.direct_refused.load(Ordering::Relaxed) {
            return None;
        }
        self.direct
            .get_or_init(|| {
                if !super::direct_read::enabled() {
                    return None;
                }
                DirectReader::open(&self.file).ok()
            })
            .as_ref()
    }

    /// Whether every page of the range is in the page cache (see `direct_read::resident`);
    /// true where the file cannot be mapped (then nothing reads direct either).
    fn resident(&self, offset: u64, len: u64) -> bool {
        match self.map() {
            Ok(Some(m)) => {
                let (Ok(off), Ok(len)) = (usize::try_from(offset), usize::try_from(len)) else {
                    return true;
                };
                direct_read::resident(m.as_slice(), off, len)
            }
            _ => true,
        }
    }
}

impl Storage for StdIo {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.create_dir_all_mode(path, private_fs::dir_mode_for(DEFAULT_FILE_MODE))
    }

    fn create_new(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        self.create_new_mode(path, DEFAULT_FILE_MODE)
    }

    fn open(&self, path: &Path, write: bool) -> io::Result<Box<dyn StorageFile>> {
        let f = private_fs::open_file(path, write, Create::No, 0)?;
        Ok(StdFile::boxed(f))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        private_fs::open_dir(path, false)?.sync_all()
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        path.try_exists()
    }

    fn try_lock(&self, path: &Path) -> io::Result<Option<Box<dyn StorageFile>>> {
        self.try_lock_mode(path, DEFAULT_FILE_MODE)
    }

    fn try_lock_existing(&self, path: &Path) -> io::Result<Option<Box<dyn StorageFile>>> {
        // Read-only is enough for flock(2); it never creates the file.
        lock(private_fs::open_file(path, false, Create::No, 0)?)
    }

    fn create_new_mode(&self, path: &Path, mode: u32) -> io::Result<Box<dyn StorageFile>> {
        let f = private_fs::open_file(path, true, Create::New, mode)?;
        Ok(StdFile::boxed(f))
    }

    fn create_dir_all_mode(&self, path: &Path, mode: u32) -> io::Result<()> {
        private_fs::create_dir_all(path, mode)
    }

    fn try_lock_mode(&self, path: &Path, mode: u32) -> io::Result<Option<Box<dyn StorageFile>>> {
        lock(private_fs::open_file(path, true, Create::IfAbsent, mode)?)
    }

    fn dir_status(&self, path: &Path) -> io::Result<Option<DirStatus>> {
        private_fs::dir_status(path)
    }
}

/// flock(2) without blocking: `Ok(None)` when another holder has it.
fn lock(f: File) -> io::Result<Option<Box<dyn StorageFile>>> {
    match f.try_lock() {
        Ok(()) => Ok(Some(StdFile::boxed(f))),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

impl StorageFile for StdFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn read_cold<'b>(
        &self,
        offset: u64,
        len: usize,
        scratch: &'b mut ReadBuf,
    ) -> io::Result<&'b mut [u8]> {
        if let Some(d) = self.direct().filter(|_| !self.resident(offset, len as u64)) {
            match d.read(offset, len, scratch) {
                // Refused after all (an alignment statx did not tell): buffered from now on.
                Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                    self.direct_refused.store(true, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
                Ok(_) => {
                    // Borrowed again here: the borrow checker cannot yet return the first.
                    let start = offset - offset % d.align();
                    let from = (offset - start) as usize;
                    return Ok(&mut scratch.get_mut(from + len)[from..]);
                }
            }
        }
        let buf = scratch.get_mut(len);
        self.file.read_exact_at(buf, offset)?;
        Ok(buf)
    }

    fn read_direct(&self, offset: u64, dst: &mut [u8]) -> io::Result<Option<usize>> {
        let Some(d) = self.direct() else {
            return Ok(None);
        };
        match d.read_into(offset, dst) {
            // Refused after all (an alignment statx did not tell): buffered from now on.
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                self.direct_refused.store(true, Ordering::Relaxed);
                Ok(None)
            }
            r => r,
        }
    }

    fn cached(&self, offset: u64, len: u64) -> bool {
        self.direct().is_none() || self.resident(offset, len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.file.sync_all()
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        match rustix::fs::fallocate(&self.file, rustix::fs::FallocateFlags::empty(), 0, len) {
            Ok(()) => Ok(()),
            // Some file systems (tmpfs on old kernels, some FUSE) cannot reserve space; growing
            // the file keeps the length contract, only the reservation is lost.
            Err(rustix::io::Errno::OPNOTSUPP) => {
                if self.file.metadata()?.len() < len {
                    self.file.set_len(len)?;
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        // POSIX_FADV_DONTNEED starts asynchronous writeback of the dirty pages in the range
        // (Linux: filemap_fdatawrite_range with WB_SYNC_NONE) and drops the clean ones, so a
        // checkpoint does not evict the trainer's page cache. It never waits for the disk.
        let Some(len) = std::num::NonZeroU64::new(len) else {
            return Ok(());
        };
        rustix::fs::fadvise(&self.file, offset, Some(len), rustix::fs::Advice::DontNeed)?;
        Ok(())
    }

    fn will_need(&self, offset: u64, len: u64) {
        if let Some(len) = std::num::NonZeroU64::new(len) {
            // Only a hint: a file system that refuses it reads on demand.
            let _ =
                rustix::fs::fadvise(&self.file, offset, Some(len), rustix::fs::Advice::WillNeed);
        }
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn map(&self) -> io::Result<Option<Arc<MappedFile>>> {
        // One map per open file, reused while it covers the whole file; a file that grew since
        // (the segment being appended to) gets a new, longer map. Views of the old one keep it
        // alive through their Arc.
        let len = self.len()?;
        let mut cached = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = cached.as_ref().filter(|m| m.len() as u64 >= len) {
            return Ok(Some(m.clone()));
        }
        let m = MappedFile::map(&self.file)?.map(Arc::new);
        cached.clone_from(&m);
        Ok(m)
    }
}

#[cfg(test)]
mod cold_read_tests {
    use super::*;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 131 + i / 4099) as u8).collect()
    }

    /// A file of `n` pattern bytes, written and synced, its pages then dropped from the cache.
    fn cold_file(dir: &Path, n: usize) -> (std::path::PathBuf, Vec<u8>) {
        let path = dir.join("f");
        let want = pattern(n);
        std::fs::write(&path, &want).unwrap();
        drop_cache(&path);
        (path, want)
    }

    fn drop_cache(path: &Path) {
        let f = File::open(path).unwrap();
        f.sync_all().unwrap();
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    }

    /// Ranges a segment's chunks take: 64-byte aligned frames (never 4 KiB aligned), one page
    /// or less, across pages, and ending at the file's end (the covering aligned range then
    /// reaches past it).
    fn ranges(n: usize) -> Vec<(u64, usize)> {
        vec![
            (0, 4096),
            (64, 100),
            (4096 + 64, 3 << 20),
            (8191, 2),
            (12345, 70000),
            (n as u64 - 777, 777),
            (n as u64 - (1 << 20) - 64, (1 << 20) + 64),
        ]
    }

    fn check_reads(f: &dyn StorageFile, path: &Path, want: &[u8]) {
        let mut scratch = ReadBuf::default();
        for (off, len) in ranges(want.len()) {
            drop_cache(path);
            let got = f.read_cold(off, len, &mut scratch).unwrap();
            assert!(
                got == &want[off as usize..off as usize + len],
                "bytes at {off}+{len}"
            );
        }
        let past = f.read_cold(want.len() as u64 - 10, 11, &mut scratch);
        assert_eq!(past.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    /// Cold bytes at unaligned offsets come back exact through the O_DIRECT route, and that
    /// route leaves the page cache as it was (where the file system takes O_DIRECT; elsewhere
    /// the same reads go buffered and must be exact too).
    #[test]
    fn direct_reads_return_the_bytes_at_unaligned_offsets() {
        let d = tempfile::tempdir().unwrap();
        let n = (5 << 20) + 4321;
        let (path, want) = cold_file(d.path(), n);
        let f = StdIo.open(&path, false).unwrap();
        let direct = !f.cached(64, 1 << 20);
        check_reads(&*f, &path, &want);
        if direct {
            drop_cache(&path);
            let mut scratch = ReadBuf::default();
            f.read_cold(4096 + 64, 3 << 20, &mut scratch).unwrap();
            assert!(
                !f.cached(8192, 1 << 20),
                "a direct read filled the page cache"
            );
        } else {
            eprintln!("no O_DIRECT here: the buffered route was checked");
        }
    }

    /// Bytes in the page cache are read through it (and are exact), direct reader or not.
    #[test]
    fn cached_bytes_are_read_through_the_cache() {
        let d = tempfile::tempdir().unwrap();
        let (path, want) = cold_file(d.path(), 1 << 20);
        std::fs::read(&path).unwrap(); // now cached
        let f = StdIo.open(&path, false).unwrap();
        assert!(f.cached(64, 1000));
        let mut scratch = ReadBuf::default();
        assert!(f.read_cold(64, 1000, &mut scratch).unwrap() == &want[64..1064]);
    }

    /// Where O_DIRECT is refused at the open (tmpfs, say) or on a read (an alignment the
    /// file system did not report), reads fall back to buffered ones with the same bytes.
    #[test]
    fn refused_direct_reads_fall_back_to_buffered() {
        let d = tempfile::tempdir().unwrap();
        let n = (5 << 20) + 4321;
        let (path, want) = cold_file(d.path(), n);
        let open = || File::open(&path).unwrap();
        let no_direct = StdFile {
            file: open(),
            map: Mutex::new(None),
            direct: OnceLock::from(None),
            direct_refused: AtomicBool::new(false),
        };
        assert!(
            no_direct.cached(64, 1 << 20),
            "no direct reader: read through the cache"
        );
        check_reads(&no_direct, &path, &want);

        // A direct reader that believes offsets need no alignment: its unaligned reads are
        // refused with EINVAL (where O_DIRECT is taken at all), and the file goes buffered.
        let file = open();
        let Ok(bogus) = DirectReader::with_align(&file, 1) else {
            eprintln!("no O_DIRECT here: the open-time fallback was checked");
            return;
        };
        let refused = StdFile {
            file,
            map: Mutex::new(None),
            direct: OnceLock::from(Some(bogus)),
            direct_refused: AtomicBool::new(false),
        };
        check_reads(&refused, &path, &want);
        assert!(refused.direct_refused.load(Ordering::Relaxed));
        assert!(refused.cached(64, 1 << 20));
    }
}
