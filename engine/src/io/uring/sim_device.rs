//! `UringIo` over the power-loss simulator: the backend's own logic — write planning into
//! pieces, O_DIRECT and bounce routes, the reserve (fallocate) ahead of direct writes and its
//! trim before every sync, the direct → buffered fallback, short-write continuation,
//! completion matching, the fsync that must not lose an EIO — runs unchanged, and only the
//! bottom is simulated: a [`Queue`] that executes the ring's entries against [`SimIo`] files,
//! and a [`Disk`] that is a `SimIo` file.
//!
//! The simulated device, deterministic from [`UringSimConfig::seed`]:
//! * executes the entries of each submission in a random order (an IO_DRAIN fsync only after
//!   every entry before it), so the pieces of one write reach the simulator's pending
//!   operations out of order, and a crash image keeps any subset of them (every `CrashMode`);
//! * completes them in a random order, and holds some completions back to a later call;
//! * answers some `io_uring_enter` calls with EBUSY, as the kernel does when its completion
//!   queue overflowed: the entries queued are executed but all their completions go to the
//!   overflow (held back), and the ones held before come out;
//! * makes some writes short (direct ones by whole 4 KiB blocks);
//! * refuses O_DIRECT with EINVAL on some files, at their first direct write;
//! * fails with EINVAL a direct write that is not aligned (offset, length, address), as the
//!   kernel does.
//!
//! A write or sync that the simulator fails (an injected fault, or every call after its armed
//! crash) completes with its errno (EIO where it has none).

use super::file::{Direct, Disk, UringFile};
use super::plan::Align;
use super::ring::{Queue, Sqe};
use super::Shared;
use crate::io::{SimIo, Storage, StorageFile};
use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

/// How the simulated device under a [`super::UringIo::simulated`] behaves. Each `*_one_in`
/// is a probability (1 in n; 0 = never).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UringSimConfig {
    /// Seed of every choice the device makes.
    pub seed: u64,
    /// Files whose first direct write is refused with EINVAL (and written buffered after).
    pub refuse_direct_one_in: u32,
    /// Writes that complete short.
    pub short_one_in: u32,
    /// `io_uring_enter` calls answered EBUSY.
    pub busy_one_in: u32,
    /// Completions held back to a later call (beyond the ones the caller waits for).
    pub hold_one_in: u32,
}

impl Default for UringSimConfig {
    fn default() -> Self {
        UringSimConfig {
            seed: 1,
            refuse_direct_one_in: 4,
            short_one_in: 8,
            busy_one_in: 8,
            hold_one_in: 3,
        }
    }
}

/// The alignment the simulated device asks of direct writes: a 512-byte-sector device, so
/// that a workload of small chunks gets direct bodies too (and bounces: a `Vec`'s address is
/// rarely 512-aligned). Real files ask at least a page (`file::open_direct`), which keeps a
/// buffered read-modify-write of a page from racing a direct write into it; the simulator has
/// no page cache, so nothing is lost by the smaller unit here.
const ALIGN: Align = Align {
    offset: 512,
    mem: 512,
};

const EINVAL: i32 = 22;
const EIO: i32 = 5;
const EBADF: i32 = 9;
const EBUSY: i32 = 16;

/// SplitMix64, as the simulator's crash images use.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn one_in(&mut self, n: u32) -> bool {
        n != 0 && self.next().is_multiple_of(u64::from(n))
    }
}

/// One simulated file as the device sees it.
struct DevFile {
    file: Arc<dyn StorageFile>,
    /// This descriptor is the O_DIRECT one.
    direct: bool,
    /// Its direct writes are refused with EINVAL.
    refuse: bool,
}

/// The device: the descriptor table and the random choices, shared by the queue and the files.
struct Device {
    cfg: UringSimConfig,
    rng: Rng,
    files: HashMap<RawFd, DevFile>,
    next_fd: RawFd,
}

type Dev = Arc<Mutex<Device>>;

fn lock(dev: &Dev) -> MutexGuard<'_, Device> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

/// An entry as pushed: the buffer address kept as a number (see [`SimQueue::push`]).
#[derive(Clone, Copy)]
enum Op {
    Write {
        fd: RawFd,
        addr: usize,
        len: usize,
        offset: u64,
    },
    Fsync {
        fd: RawFd,
        data_only: bool,
    },
}

/// The simulated io_uring.
pub(super) struct SimQueue {
    dev: Dev,
    depth: usize,
    /// Pushed, not submitted.
    sq: Vec<(Op, u64)>,
    /// Completed, visible to `reap`.
    cq: Vec<(u64, i32)>,
    /// Completed, held back until a later `submit_and_wait`.
    held: Vec<(u64, i32)>,
}

impl Queue for SimQueue {
    #[allow(unsafe_code)]
    unsafe fn push(&mut self, e: Sqe, user_data: u64) -> bool {
        if self.sq.len() >= self.depth {
            return false;
        }
        let op = match e {
            Sqe::Write {
                fd,
                ptr,
                len,
                offset,
            } => Op::Write {
                fd,
                addr: ptr as usize,
                len: len as usize,
                offset,
            },
            Sqe::Fsync { fd, data_only } => Op::Fsync { fd, data_only },
        };
        self.sq.push((op, user_data));
        true
    }

    fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        let dev = self.dev.clone();
        let mut d = lock(&dev);
        // Held completions come out now, as the kernel flushes its overflow list.
        self.cq.append(&mut self.held);
        let busy_one_in = d.cfg.busy_one_in;
        let busy = d.rng.one_in(busy_one_in);
        let sq = std::mem::take(&mut self.sq);
        // Execute in a random order within each run of entries between IO_DRAIN fsyncs.
        let mut done = Vec::with_capacity(sq.len());
        let mut run: Vec<(Op, u64)> = Vec::new();
        for (op, ud) in sq {
            if matches!(op, Op::Fsync { .. }) {
                shuffle(&mut d.rng, &mut run);
                for (o, u) in run.drain(..) {
                    done.push((u, execute(&mut d, o)));
                }
                done.push((ud, execute(&mut d, op)));
            } else {
                run.push((op, ud));
            }
        }
        shuffle(&mut d.rng, &mut run);
        for (o, u) in run.drain(..) {
            done.push((u, execute(&mut d, o)));
        }
        shuffle(&mut d.rng, &mut done);
        if busy {
            // Completion queue overflow: this round's completions wait in the overflow list.
            self.held = done;
            return Err(io::Error::from_raw_os_error(EBUSY));
        }
        // Hold some back, keeping enough visible for the caller's wait.
        let hold = d.cfg.hold_one_in;
        for c in done {
            if self.cq.len() >= want && d.rng.one_in(hold) {
                self.held.push(c);
            } else {
                self.cq.push(c);
            }
        }
        if self.cq.len() < want {
            // Nothing more will ever complete: the caller waits for what it never submitted.
            return Err(io::Error::other(
                "simulated io_uring: waiting for more completions than entries in flight",
            ));
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        out.append(&mut self.cq);
    }

    fn renew(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn shuffle<T>(rng: &mut Rng, v: &mut [T]) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i + 1);
        v.swap(i, j);
    }
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(EIO)
}

/// Runs one entry against the simulator; the io_uring result (bytes, or -errno).
fn execute(d: &mut Device, op: Op) -> i32 {
    match op {
        Op::Fsync { fd, data_only } => {
            let Some(f) = d.files.get(&fd) else {
                return -EBADF;
            };
            let r = if data_only {
                f.file.sync_data()
            } else {
                f.file.sync_all()
            };
            r.map_or_else(|e| -errno(&e), |()| 0)
        }
        Op::Write {
            fd,
            addr,
            len,
            offset,
        } => {
            let short = d.cfg.short_one_in;
            let short = d.rng.one_in(short);
            let Some(f) = d.files.get_mut(&fd) else {
                return -EBADF;
            };
            if f.direct {
                let aligned = offset.is_multiple_of(ALIGN.offset)
                    && (len as u64).is_multiple_of(ALIGN.offset)
                    && addr.is_multiple_of(ALIGN.mem);
                if f.refuse || !aligned {
                    return -EINVAL;
                }
            }
            let mut n = len;
            if short {
                let half = if f.direct {
                    len / 2 / ALIGN.offset as usize * ALIGN.offset as usize
                } else {
                    len / 2
                };
                if half > 0 {
                    n = half;
                }
            }
            // SAFETY: the ring keeps `addr..addr + len` valid until this entry's completion
            // is reaped (`Queue::push`'s contract), and the completion is made only below.
            #[allow(unsafe_code)]
            let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, n) };
            match f.file.write_at(bytes, offset) {
                Ok(()) => n as i32,
                Err(e) => -errno(&e),
            }
        }
    }
}

/// A simulated file as a `UringFile`'s [`Disk`]; unregisters its descriptors when dropped.
struct SimDisk {
    dev: Dev,
    file: Arc<dyn StorageFile>,
    fd: RawFd,
    direct_fd: Option<RawFd>,
}

impl Drop for SimDisk {
    fn drop(&mut self) {
        let mut d = lock(&self.dev);
        d.files.remove(&self.fd);
        if let Some(fd) = self.direct_fd {
            d.files.remove(&fd);
        }
    }
}

impl Disk for SimDisk {
    fn fd(&self) -> RawFd {
        self.fd
    }

    fn fallocate(&self, from: u64, len: u64) -> io::Result<()> {
        // fallocate mode 0 past the end grows the file as `allocate` does.
        self.file.allocate(from.saturating_add(len))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_at(buf, offset)
    }

    fn advise(&self, _offset: u64, _len: std::num::NonZeroU64, _will_need: bool) -> io::Result<()> {
        Ok(())
    }
}

/// The simulator and the device a simulated `UringIo` writes through.
#[derive(Clone)]
pub(super) struct SimBase {
    pub(super) sim: SimIo,
    dev: Dev,
}

impl std::fmt::Debug for SimBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimBase").field("sim", &self.sim).finish()
    }
}

/// A device over `sim` and the simulated queue of `depth` entries that writes to it.
pub(super) fn device(sim: &SimIo, cfg: UringSimConfig, depth: u32) -> (SimBase, SimQueue) {
    let dev = Arc::new(Mutex::new(Device {
        cfg,
        rng: Rng(cfg.seed ^ 0x5d0e_a1b2_c3d4_e5f6),
        files: HashMap::new(),
        next_fd: 1 << 20,
    }));
    let q = SimQueue {
        dev: dev.clone(),
        depth: depth as usize,
        sq: Vec::new(),
        cq: Vec::new(),
        held: Vec::new(),
    };
    (
        SimBase {
            sim: sim.clone(),
            dev,
        },
        q,
    )
}

impl SimBase {
    /// Opens (or creates) a simulator file for writing as a `UringFile`, with an O_DIRECT
    /// descriptor when the config asks for direct I/O.
    pub(super) fn open(
        &self,
        path: &Path,
        create_new: bool,
        shared: Arc<Shared>,
    ) -> io::Result<UringFile> {
        let file: Arc<dyn StorageFile> = Arc::from(if create_new {
            self.sim.create_new(path)?
        } else {
            self.sim.open(path, true)?
        });
        let mut d = lock(&self.dev);
        let refuse_one_in = d.cfg.refuse_direct_one_in;
        let refuse = d.rng.one_in(refuse_one_in);
        let fd = d.next_fd;
        d.next_fd += 2;
        d.files.insert(
            fd,
            DevFile {
                file: file.clone(),
                direct: false,
                refuse: false,
            },
        );
        let direct = shared.cfg.direct.then(|| {
            d.files.insert(
                fd + 1,
                DevFile {
                    file: file.clone(),
                    direct: true,
                    refuse,
                },
            );
            Direct {
                _file: None,
                fd: fd + 1,
                align: ALIGN,
            }
        });
        drop(d);
        let disk = SimDisk {
            dev: self.dev.clone(),
            file,
            fd,
            direct_fd: direct.as_ref().map(|x| x.fd),
        };
        UringFile::over(path, Box::new(disk), direct, shared)
    }
}
