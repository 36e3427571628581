//! Reader leases: how an open reader keeps the segments it may still map from being freed,
//! in this process or another, without ever pinning space after it dies.
//!
//! A reader (a read-only [`Store`](super::Store)) holds an exclusive `flock` on a file of its
//! own in `readers/` for as long as it is open. The file lists the segments it holds (format in
//! docs/FORMAT.md). The kernel drops the lock when the process dies, however it dies, so the
//! writer tells a live lease from a dead one by trying the lock: a lease it can lock is stale,
//! and the writer removes it *while holding that lock* (so no reader can be in the middle of
//! taking it). Nothing here is made durable: after a power cut no reader is alive.
//!
//! The race between a reader reading the WAL and publishing its lease is closed by order: the
//! reader first publishes a lease that holds *every* segment, then reads the WAL, then narrows
//! the lease to the segments its state names. The writer makes a Delete (or Relocate) record
//! durable before it scans the leases; so either the scan sees the reader's lease (and defers),
//! or the reader's lease came after the scan, hence its WAL read comes after the record, and
//! the reader never names the freed segment. A lease the writer cannot parse (being rewritten,
//! or damaged) counts as holding everything.

use crate::error::{Error, Result};
use crate::io::{Storage, StorageFile};
use crate::le;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Directory of reader lease files.
pub const READERS_DIR: &str = "readers";
/// Version of the lease file format.
pub(crate) const LEASE_VERSION: u16 = 1;
const MAGIC: &[u8; 8] = b"CKPTLSE\0";
const FLAG_ALL: u16 = 1;
const FIXED_LEN: usize = 24;
/// Largest lease file read: 8 million segment ids.
const MAX_LEASE_LEN: u64 = 64 << 20;
/// How many fresh names a reader tries before giving up on a lease.
const TAKE_ATTEMPTS: usize = 16;

/// What a lease holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Held {
    /// Every segment (a reader that has not read the WAL yet, or an unreadable lease).
    All,
    /// These segments.
    Segments(BTreeSet<u64>),
}

/// Encodes a lease file: `magic | version u16 | flags u16 | pid u32 | count u64 |
/// count × segment id u64 | crc32c u32` (little-endian; docs/FORMAT.md).
pub(crate) fn encode(pid: u32, held: &Held) -> Vec<u8> {
    let (flags, ids): (u16, Vec<u64>) = match held {
        Held::All => (FLAG_ALL, Vec::new()),
        Held::Segments(s) => (0, s.iter().copied().collect()),
    };
    let mut b = Vec::with_capacity(FIXED_LEN + 8 * ids.len() + 4);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&LEASE_VERSION.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&pid.to_le_bytes());
    b.extend_from_slice(&(ids.len() as u64).to_le_bytes());
    for id in ids {
        b.extend_from_slice(&id.to_le_bytes());
    }
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes a lease file. `None` for anything that is not a whole, valid lease of a version
/// this build knows (the caller then assumes it holds everything).
pub(crate) fn decode(b: &[u8]) -> Option<Held> {
    if b.len() < FIXED_LEN + 4 || &b[0..8] != MAGIC {
        return None;
    }
    let version = u16::from_le_bytes(b[8..10].try_into().ok()?);
    let flags = u16::from_le_bytes(b[10..12].try_into().ok()?);
    let count = u64::from_le_bytes(b[16..24].try_into().ok()?);
    let body = FIXED_LEN as u64 + count.checked_mul(8)?;
    if version != LEASE_VERSION || flags & !FLAG_ALL != 0 || b.len() as u64 != body + 4 {
        return None;
    }
    let body = body as usize;
    let crc = u32::from_le_bytes(b[body..].try_into().ok()?);
    if crc32c::crc32c(&b[..body]) != crc {
        return None;
    }
    if flags & FLAG_ALL != 0 {
        return Some(Held::All);
    }
    let ids = b[FIXED_LEN..body]
        .chunks_exact(8)
        .map(|c| le::u64_at(c, 0))
        .collect();
    Some(Held::Segments(ids))
}

/// Whether `name` is a lease file name (`<anything>.lease`, no leading dot).
fn is_lease_name(name: &str) -> bool {
    name.len() > ".lease".len() && name.ends_with(".lease") && !name.starts_with('.')
}

fn not_found(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
}

/// A reader's lease, held until dropped (then its file is removed, lock still held).
pub(crate) struct ReaderLease {
    io: Arc<dyn Storage>,
    path: PathBuf,
    file: Option<Box<dyn StorageFile>>,
}

impl std::fmt::Debug for ReaderLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReaderLease")
            .field("path", &self.path)
            .finish()
    }
}

impl ReaderLease {
    /// Takes a new lease in `dir/readers/` holding every segment. Call before reading the WAL.
    pub(crate) fn take(io: Arc<dyn Storage>, dir: &Path) -> Result<ReaderLease> {
        let readers = dir.join(READERS_DIR);
        io.create_dir_all(&readers)
            .map_err(|e| Error::io("create dir", &readers, e))?;
        let pid = std::process::id();
        for _ in 0..TAKE_ATTEMPTS {
            let mut nonce = [0u8; 8];
            getrandom::fill(&mut nonce).map_err(|e| {
                Error::io("getrandom", &readers, std::io::Error::other(e.to_string()))
            })?;
            let name = format!("{pid}-{:016x}.lease", u64::from_le_bytes(nonce));
            let path = readers.join(name);
            // Creates and locks. With the real file system these are two steps: a writer may
            // find the file unlocked in between, think it stale and remove it (holding the
            // lock, so it is gone before our lock succeeds). Hence the check below.
            let Some(file) = io
                .try_lock(&path)
                .map_err(|e| Error::io("lock", &path, e))?
            else {
                continue;
            };
            let lease = ReaderLease {
                io: io.clone(),
                path,
                file: Some(file),
            };
            lease.write(&Held::All)?;
            if io
                .exists(&lease.path)
                .map_err(|e| Error::io("stat", &lease.path, e))?
            {
                return Ok(lease);
            }
            // Removed under us: the drop's remove finds nothing; try a new name.
        }
        Err(Error::io(
            "take a reader lease in",
            &readers,
            std::io::Error::other(
                "every attempt was removed as stale; is another tool cleaning readers/?",
            ),
        ))
    }

    /// Narrows (or widens) what the lease holds.
    pub(crate) fn hold(&self, segments: impl IntoIterator<Item = u64>) -> Result<()> {
        self.write(&Held::Segments(segments.into_iter().collect()))
    }

    #[allow(clippy::expect_used)] // the lease file is held until drop
    fn write(&self, held: &Held) -> Result<()> {
        let f = self.file.as_ref().expect("held until drop");
        let b = encode(std::process::id(), held);
        // Written in place: a writer that reads it half-way sees a bad checksum or length and
        // takes it as holding everything, which is safe.
        f.write_at(&b, 0)
            .map_err(|e| Error::io("write", &self.path, e))?;
        f.set_len(b.len() as u64)
            .map_err(|e| Error::io("truncate", &self.path, e))
    }

    /// The lease file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ReaderLease {
    fn drop(&mut self) {
        // Remove first, then unlock: a writer never finds our file unlocked while we live.
        let _ = self.io.remove_file(&self.path);
        self.file.take();
    }
}

/// What the live leases hold, as the writer sees them now.
#[derive(Debug, Clone, Default)]
pub(crate) struct Leases {
    /// Some live lease holds every segment (or could not be read).
    pub all: bool,
    /// Segments named by live leases.
    pub segments: BTreeSet<u64>,
    /// Live leases found.
    pub live: usize,
    /// Stale lease files (their reader died) removed by this scan.
    pub stale_removed: usize,
}

impl Leases {
    /// Whether segment `id` may still be mapped by a live reader.
    pub(crate) fn holds(&self, id: u64) -> bool {
        self.all || self.segments.contains(&id)
    }
}

/// Scans `dir/readers/`: probes each lease's lock, removes stale ones (only if `remove_stale`,
/// i.e. the writer), and collects what the live ones hold. Errors make it conservative (a
/// lease it cannot probe or read holds everything), never fail the caller.
pub(crate) fn scan(io: &dyn Storage, dir: &Path, remove_stale: bool) -> Leases {
    let readers = dir.join(READERS_DIR);
    let mut out = Leases::default();
    let names = match io.list(&readers) {
        Ok(n) => n,
        Err(e) if not_found(&e) => return out,
        Err(_) => {
            out.all = true;
            return out;
        }
    };
    for name in names.into_iter().filter(|n| is_lease_name(n)) {
        let path = readers.join(&name);
        match io.try_lock_existing(&path) {
            Err(e) if not_found(&e) => {}
            // A directory, FIFO, socket or symlink with a lease's name is foreign (the backend
            // refuses to open it as a file: io::private_fs): ignored, neither followed, nor
            // removed, nor taken as a lease pinning everything.
            Err(e) if crate::io::private_fs::is_refused_kind(&e) => {}
            Err(_) => {
                out.all = true;
                out.live += 1;
            }
            Ok(Some(lock)) => {
                // Nobody holds it: its reader is gone. Removed while we hold the lock.
                if remove_stale && io.remove_file(&path).is_ok() {
                    out.stale_removed += 1;
                }
                drop(lock);
            }
            Ok(None) => {
                out.live += 1;
                // Capped: a larger file is no lease this build wrote, so it holds everything.
                let held = super::files::read_small(io, &path, MAX_LEASE_LEN);
                match held.map(|b| decode(&b)) {
                    Ok(Some(Held::Segments(s))) => out.segments.extend(s),
                    // Closed since the probe: holds nothing any more.
                    Err(Error::Io { source, .. }) if not_found(&source) => out.live -= 1,
                    _ => out.all = true,
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemIo;

    /// The lease file format, byte for byte (docs/FORMAT.md).
    #[test]
    fn golden_bytes() {
        let b = encode(0x0102_0304, &Held::Segments([7, 9].into()));
        let mut want = b"CKPTLSE\0".to_vec();
        want.extend_from_slice(&[1, 0, 0, 0, 4, 3, 2, 1]);
        want.extend_from_slice(&2u64.to_le_bytes());
        want.extend_from_slice(&7u64.to_le_bytes());
        want.extend_from_slice(&9u64.to_le_bytes());
        let crc = crc32c::crc32c(&want);
        want.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(b, want);
        assert_eq!(decode(&b), Some(Held::Segments([7, 9].into())));

        let all = encode(5, &Held::All);
        assert_eq!(&all[10..12], &[1, 0]);
        assert_eq!(all.len(), 28);
        assert_eq!(decode(&all), Some(Held::All));
    }

    /// Anything but a whole valid lease decodes to `None` (held as everything by the writer).
    #[test]
    fn damaged_leases_do_not_decode() {
        let b = encode(1, &Held::Segments([3].into()));
        for cut in 0..b.len() {
            assert_eq!(decode(&b[..cut]), None, "cut at {cut}");
        }
        for i in 0..b.len() {
            let mut d = b.clone();
            d[i] ^= 0x40;
            assert_eq!(decode(&d), None, "flip at {i}");
        }
        let mut longer = b.clone();
        longer.extend_from_slice(&[0; 8]);
        assert_eq!(decode(&longer), None);
        // A count that would overflow is refused, not allocated.
        let mut huge = b.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(decode(&huge), None);
    }

    /// Regression (issue 14 item 5, "`read_all` has no cap on lease files"): a live reader's
    /// lease file far larger than any lease this build writes — a 1 TiB sparse file — is taken
    /// as holding everything, without reading it: reading it whole would allocate 1 TiB,
    /// which the kernel refuses (more than memory and swap), aborting the test process, or
    /// hang reading it. Checked on a real file system (a sparse file, flock).
    #[test]
    fn an_oversized_live_lease_holds_everything_and_is_not_read() {
        let tmp = tempfile::tempdir().unwrap();
        let io: Arc<dyn Storage> = Arc::new(crate::io::StdIo);
        let readers = tmp.path().join(READERS_DIR);
        std::fs::create_dir_all(&readers).unwrap();
        let path = readers.join("77-huge.lease");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(1 << 40).unwrap();
        drop(f);
        // A live reader: someone holds its lock.
        let held = io.try_lock_existing(&path).unwrap().expect("lock");
        let s = scan(&*io, tmp.path(), true);
        assert!(s.all && s.live == 1, "{s:?}");
        assert!(path.exists(), "a live lease is never removed");
        drop(held);
        // Its reader gone: stale, removed by the writer's scan (still without reading it).
        let s = scan(&*io, tmp.path(), true);
        assert!(!s.all && s.stale_removed == 1, "{s:?}");
        assert!(!path.exists());
    }

    /// A live lease is seen with what it holds; a dropped one is gone; a stale one (no lock,
    /// as a dead reader leaves it) is removed by the writer's scan and holds nothing.
    #[test]
    fn scan_sees_live_leases_and_removes_stale_ones() {
        let mem = MemIo::new();
        let io: Arc<dyn Storage> = Arc::new(mem.clone());
        let dir = Path::new("/s");
        io.create_dir_all(dir).unwrap();
        assert!(!scan(&*io, dir, true).holds(1));

        let a = ReaderLease::take(io.clone(), dir).unwrap();
        let s = scan(&*io, dir, true);
        assert!(s.all && s.live == 1, "{s:?}");
        a.hold([1, 2]).unwrap();
        let s = scan(&*io, dir, true);
        assert!(!s.all && s.holds(2) && !s.holds(3), "{s:?}");

        // A lease file nobody has locked: its reader died.
        let stale = dir.join(READERS_DIR).join("99-dead.lease");
        mem.write_file(&stale, encode(99, &Held::All));
        let s = scan(&*io, dir, false);
        assert!(!s.all && s.stale_removed == 0);
        assert!(
            io.exists(&stale).unwrap(),
            "a reader's scan removes nothing"
        );
        let s = scan(&*io, dir, true);
        assert_eq!(s.stale_removed, 1);
        assert!(!io.exists(&stale).unwrap());

        // Garbage in a live lease holds everything.
        let b = ReaderLease::take(io.clone(), dir).unwrap();
        mem.write_file(b.path(), b"junk".to_vec());
        assert!(scan(&*io, dir, true).all);
        drop(b);
        let path = a.path().to_path_buf();
        drop(a);
        assert!(!io.exists(&path).unwrap());
        let s = scan(&*io, dir, true);
        assert_eq!((s.live, s.all, s.segments.len()), (0, false, 0));
    }
}
