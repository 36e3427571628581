//! Unit tests of `UringIo` against the real file system (a temporary directory).

use super::*;
use std::path::PathBuf;

const MIB: usize = 1 << 20;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

/// `len` bytes at a 4096-aligned address, inside a larger Vec.
fn aligned(src: &[u8]) -> (Vec<u8>, usize) {
    let mut v = vec![0u8; src.len() + 4096];
    let at = v.as_ptr().align_offset(4096);
    v[at..at + src.len()].copy_from_slice(src);
    (v, at)
}

fn new_io() -> UringIo {
    UringIo::new().expect("io_uring available on the test machine")
}

fn disk_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// The file system of the temp dir takes direct I/O (tmpfs before Linux 6.6 does not).
fn direct_ok(io: &UringIo) -> bool {
    io.stats().direct_refused_files == 0
}

#[test]
fn unaligned_write_round_trips_with_direct_body() {
    let dir = tempfile::tempdir().unwrap();
    let io = new_io();
    let path = dir.path().join("f");
    let f = io.create_new(&path).unwrap();
    // Offset 4096 + 64 and a length that is no multiple of anything: buffered head and tail,
    // a direct body; from a deliberately misaligned address (bounce buffers).
    let data = pattern(3 * MIB + 123, 7);
    let (v, at) = aligned(&data);
    let mut shifted = vec![0u8; data.len() + 1];
    shifted[1..].copy_from_slice(&data);
    f.write_at(&v[at..at + data.len()], 4096 + 64).unwrap();
    let second = 4096 + 64 + data.len() as u64;
    f.write_at(&shifted[1..], second).unwrap();
    f.sync_data().unwrap();
    let end = second + data.len() as u64;
    assert_eq!(f.len().unwrap(), end);
    assert_eq!(disk_len(&path), end, "the reserve is cut off at sync");
    let back = std::fs::read(&path).unwrap();
    assert!(back[..4096 + 64].iter().all(|&b| b == 0));
    assert!(back[4096 + 64..second as usize] == data[..]);
    assert!(back[second as usize..] == data[..]);
    let mut tail = vec![0u8; 100];
    f.read_at(&mut tail, end - 100).unwrap();
    assert_eq!(tail[..], data[data.len() - 100..]);
    if direct_ok(&io) {
        let s = io.stats();
        assert!(s.direct_pieces >= 6, "{s:?}");
        assert!(s.buffered_pieces >= 3, "{s:?}");
    }
}

#[test]
fn preallocation_is_invisible_to_len_and_reads_and_cut_at_sync() {
    let dir = tempfile::tempdir().unwrap();
    let io = UringIo::with_config(UringConfig {
        prealloc_bytes: 8 * MIB as u64,
        ..Default::default()
    })
    .unwrap();
    let path = dir.path().join("seg");
    let f = io.create_new(&path).unwrap();
    if !direct_ok(&io) {
        return; // no direct I/O, so no preallocation to see
    }
    let data = pattern(MIB, 1);
    let (v, at) = aligned(&data);
    f.write_at(&v[at..at + MIB], 0).unwrap();
    assert_eq!(f.len().unwrap(), MIB as u64);
    assert_eq!(disk_len(&path), 9 * MIB as u64, "reserved 8 MiB ahead");
    let mut past = [0u8; 16];
    let e = f.read_at(&mut past, MIB as u64).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    f.sync_all().unwrap();
    assert_eq!(disk_len(&path), MIB as u64);
    // Writing on grows the reservation again; set_len is exact.
    f.write_at(&v[at..at + MIB], MIB as u64).unwrap();
    assert_eq!(disk_len(&path), 10 * MIB as u64);
    // A small direct write reserves 16 times its size, not the whole step.
    let g = io.create_new(&dir.path().join("small")).unwrap();
    g.write_at(&v[at..at + 8192], 0).unwrap();
    assert_eq!(disk_len(&dir.path().join("small")), MIB as u64);
    assert_eq!(g.len().unwrap(), 8192);
    f.set_len(3 * MIB as u64).unwrap();
    assert_eq!(f.len().unwrap(), 3 * MIB as u64);
    f.sync_data().unwrap();
    assert_eq!(disk_len(&path), 3 * MIB as u64);
}

#[test]
fn refused_direct_write_falls_back_to_buffered_for_that_file() {
    let dir = tempfile::tempdir().unwrap();
    let io = new_io();
    let path = dir.path().join("f");
    let f = io.create_new(&path).unwrap();
    if !direct_ok(&io) {
        return;
    }
    // The first direct piece comes back EINVAL, as from a file system that refuses O_DIRECT.
    io.inject_direct_errno(1, rustix::io::Errno::INVAL.raw_os_error());
    let data = pattern(4 * MIB, 3);
    let (v, at) = aligned(&data);
    f.write_at(&v[at..at + data.len()], 0).unwrap();
    assert_eq!(io.stats().direct_refused_files, 1);
    let before = io.stats().direct_pieces;
    f.write_at(&v[at..at + data.len()], 4 * MIB as u64).unwrap();
    assert_eq!(io.stats().direct_pieces, before, "the file stays buffered");
    f.sync_data().unwrap();
    let back = std::fs::read(&path).unwrap();
    assert!(back[..4 * MIB] == data[..] && back[4 * MIB..] == data[..]);
    // Another file still goes direct.
    let g = io.create_new(&dir.path().join("g")).unwrap();
    g.write_at(&v[at..at + data.len()], 0).unwrap();
    assert!(io.stats().direct_pieces > before);
}

#[test]
fn interrupted_and_short_writes_are_continued() {
    let dir = tempfile::tempdir().unwrap();
    let io = new_io();
    let path = dir.path().join("f");
    let f = io.create_new(&path).unwrap();
    let data = pattern(5 * MIB + 4000, 9);
    let (v, at) = aligned(&data);
    io.inject_direct_errno(3, rustix::io::Errno::AGAIN.raw_os_error());
    io.shared.ring.lock().unwrap().inject_short_writes = 4;
    f.write_at(&v[at..at + data.len()], 512).unwrap();
    io.inject_direct_errno(2, rustix::io::Errno::INTR.raw_os_error());
    f.write_at(&data, 512 + data.len() as u64).unwrap();
    assert_eq!(io.stats().direct_refused_files, 0);
    assert_eq!(io.shared.ring.lock().unwrap().inject_short_writes, 0);
    f.sync_data().unwrap();
    let back = std::fs::read(&path).unwrap();
    let n = data.len();
    assert!(back[512..512 + n] == data[..] && back[512 + n..] == data[..]);
}

#[test]
fn a_failing_piece_fails_the_write_after_the_rest_completed() {
    let dir = tempfile::tempdir().unwrap();
    let io = new_io();
    let f = io.create_new(&dir.path().join("f")).unwrap();
    if !direct_ok(&io) {
        return;
    }
    io.inject_direct_errno(1, rustix::io::Errno::IO.raw_os_error());
    let data = pattern(8 * MIB, 2);
    let (v, at) = aligned(&data);
    let e = f.write_at(&v[at..at + data.len()], 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(rustix::io::Errno::IO.raw_os_error()));
    // The ring is idle and usable afterwards.
    f.write_at(&v[at..at + data.len()], 0).unwrap();
    f.sync_data().unwrap();
}

#[test]
fn write_many_keeps_several_writes_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let io = new_io();
    let path = dir.path().join("f");
    let f = io.create_new(&path).unwrap();
    let a = pattern(2 * MIB, 1);
    let b = pattern(MIB + 77, 2);
    let c = pattern(300, 3);
    let (va, at) = aligned(&a);
    let ob = 2 * MIB as u64;
    let oc = ob + b.len() as u64;
    f.write_many(&[(0, &va[at..at + a.len()]), (ob, &b), (oc, &c)])
        .unwrap();
    f.sync_data().unwrap();
    let back = std::fs::read(&path).unwrap();
    assert_eq!(back.len() as u64, oc + 300);
    assert!(back[..a.len()] == a[..]);
    assert!(back[ob as usize..oc as usize] == b[..]);
    assert!(back[oc as usize..] == c[..]);
}

#[test]
fn reopened_file_keeps_its_length_and_buffered_config_writes_everything_buffered() {
    let dir = tempfile::tempdir().unwrap();
    let io = UringIo::with_config(UringConfig {
        direct: false,
        queue_depth: 4,
        piece_bytes: 64 << 10,
        ..Default::default()
    })
    .unwrap();
    let path = dir.path().join("f");
    let data = pattern(MIB, 4);
    {
        let f = io.create_new(&path).unwrap();
        f.write_at(&data, 0).unwrap();
        f.sync_data().unwrap();
    }
    let f = io.open(&path, true).unwrap();
    assert_eq!(f.len().unwrap(), MIB as u64);
    f.write_at(&data, MIB as u64).unwrap();
    f.sync_all().unwrap();
    assert_eq!(io.stats().direct_pieces, 0);
    assert_eq!(io.stats().buffered_pieces, 32);
    let back = std::fs::read(&path).unwrap();
    assert!(back[..MIB] == data[..] && back[MIB..] == data[..]);
    assert!(
        io.create_new(&path).is_err(),
        "create_new refuses an existing file"
    );
}

#[test]
fn bad_config_is_a_typed_error() {
    for cfg in [
        UringConfig {
            queue_depth: 0,
            ..Default::default()
        },
        UringConfig {
            piece_bytes: 1000,
            ..Default::default()
        },
    ] {
        assert!(matches!(
            UringIo::with_config(cfg),
            Err(UringUnavailable::BadConfig(_))
        ));
    }
}

#[test]
fn a_failed_fdatasync_poisons_the_store() {
    use crate::{DType, Error, Options, Store};
    let dir = tempfile::tempdir().unwrap();
    let io = new_io();
    let opts = || Options {
        io: std::sync::Arc::new(io.clone()),
        ..Default::default()
    };
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let w = pattern(5 * MIB + 3, 5);
    let mut t = s.begin(1).unwrap();
    t.put_tensor("w", DType::U8, &[w.len() as u64], &w).unwrap();
    t.commit().unwrap();
    // Every fdatasync through the ring now fails, as after a writeback error.
    io.shared.ring.lock().unwrap().inject_sync_errno = Some(rustix::io::Errno::IO.raw_os_error());
    let mut t = s.begin(2).unwrap();
    t.put_tensor("w", DType::U8, &[MIB as u64], &pattern(MIB, 6))
        .unwrap();
    let e = t.commit().unwrap_err();
    assert!(e.to_string().contains("fdatasync"), "{e}");
    assert!(s.poisoned().is_some());
    assert!(matches!(s.begin(3).err(), Some(Error::Poisoned { .. })));
    drop(s);
    io.shared.ring.lock().unwrap().inject_sync_errno = None;
    let s = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(s.list().len(), 1, "the failed commit never happened");
    let ck = s.checkpoint(crate::Selector::Latest).unwrap();
    assert_eq!(ck.tensor("w").unwrap().data, w);
}

#[test]
fn a_forked_child_sets_up_its_own_ring() {
    let dir = tempfile::tempdir().unwrap();
    let io = new_io();
    let f = io.create_new(&dir.path().join("f")).unwrap();
    // As seen from a child after fork: the ring was set up by another process (pid 1 is
    // never this test).
    let me = rustix::process::getpid();
    io.shared.ring.lock().unwrap().pid = rustix::process::Pid::INIT;
    let data = pattern(2 * MIB + 5, 8);
    f.write_at(&data, 0).unwrap();
    f.sync_data().unwrap();
    assert_eq!(io.shared.ring.lock().unwrap().pid, me);
    assert!(std::fs::read(dir.path().join("f")).unwrap() == data);
}

#[test]
fn bounce_slots_are_all_free_again_after_a_failed_write() {
    let dir = tempfile::tempdir().unwrap();
    let io = new_io();
    let path = dir.path().join("f");
    let f = io.create_new(&path).unwrap();
    if !direct_ok(&io) {
        return;
    }
    let data = pattern(32 * MIB, 4);
    let mut shifted = vec![0u8; data.len() + 1];
    shifted[1..].copy_from_slice(&data);
    // A failure while bounce pieces are in flight and queued, then a write that needs every
    // slot many times over: it must neither hang nor report no progress.
    io.inject_direct_errno(1, rustix::io::Errno::IO.raw_os_error());
    assert!(f.write_at(&shifted[1..], 0).is_err());
    io.shared.ring.lock().unwrap().inject_short_writes = 5;
    f.write_at(&shifted[1..], 0).unwrap();
    f.sync_data().unwrap();
    assert!(std::fs::read(&path).unwrap() == data);
}

// ------------------------------------------------ completion matching and fsync results

use super::ring::{Queue, Sqe};
use crate::io::{CrashMode, Fault, OpKind, SimIo};

/// A queue in front of another that meddles with what `reap` returns: completions in reverse
/// order, each batch led by completions no entry in flight asked for (a stale tag of an earlier
/// call, a bare fsync tag, a write's byte count).
struct Meddler {
    inner: Box<dyn Queue>,
    last_tag: u64,
}

impl Queue for Meddler {
    #[allow(unsafe_code)]
    unsafe fn push(&mut self, e: Sqe, user_data: u64) -> bool {
        self.last_tag = user_data;
        // SAFETY: forwarded with the caller's guarantee.
        unsafe { self.inner.push(e, user_data) }
    }
    fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        self.inner.submit_and_wait(want)
    }
    fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        let mut real = Vec::new();
        self.inner.reap(&mut real);
        if real.is_empty() {
            return;
        }
        let stale_call = self.last_tag.wrapping_sub(1 << 32);
        out.push((stale_call, 4096));
        out.push((stale_call | u64::from(u32::MAX), 0));
        out.push((u64::MAX, 0));
        real.reverse();
        out.extend(real);
    }
    fn renew(&mut self) -> io::Result<()> {
        self.inner.renew()
    }
}

fn meddle(io: &UringIo) {
    let mut ring = io.shared.ring.lock().unwrap();
    let inner = std::mem::replace(&mut ring.queue, Box::new(NoQueue));
    ring.queue = Box::new(Meddler { inner, last_tag: 0 });
}

/// A placeholder while the real queue is moved into the meddler.
struct NoQueue;

impl Queue for NoQueue {
    #[allow(unsafe_code)]
    unsafe fn push(&mut self, _: Sqe, _: u64) -> bool {
        false
    }
    fn submit_and_wait(&mut self, _: usize) -> io::Result<()> {
        Err(io::Error::other("no queue"))
    }
    fn reap(&mut self, _: &mut Vec<(u64, i32)>) {}
    fn renew(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Issue 14, item 5: completions were credited by arrival, not by `user_data` — a completion
/// of another call (or a bare fsync's `u64::MAX`) was indexed into this call's pieces (a panic,
/// or a piece counted done that was not) and counted against the entries in flight. Now each
/// completion goes to the piece its tag names, in any order, and foreign ones are ignored.
#[test]
fn regression_uring_completions_are_matched_by_user_data_not_by_order() {
    let dir = tempfile::tempdir().unwrap();
    let io = UringIo::with_config(UringConfig {
        queue_depth: 8,
        piece_bytes: 64 << 10,
        ..Default::default()
    })
    .expect("io_uring available on the test machine");
    meddle(&io);
    let path = dir.path().join("f");
    let f = io.create_new(&path).unwrap();
    let data = pattern(3 * MIB + 777, 5);
    let (v, at) = aligned(&data);
    f.write_at(&v[at..at + data.len()], 0).unwrap();
    f.write_at(&data, data.len() as u64).unwrap();
    f.sync_data().unwrap();
    let back = std::fs::read(&path).unwrap();
    assert!(back[..data.len()] == data[..] && back[data.len()..] == data[..]);
}

/// A small store-sized config for the simulated device.
fn sim_cfg() -> UringConfig {
    UringConfig {
        queue_depth: 4,
        piece_bytes: 4096,
        direct: true,
        prealloc_bytes: 64 << 10,
    }
}

/// Issue 14, item 5: an fsync whose `io_uring_enter` came back EBUSY (completion queue
/// overflow) was pushed again, and the first one's completion — EIO — was reaped and dropped
/// by the drain guard; the second fsync then reported success for data the failed writeback
/// had dropped (Linux marks the pages clean). Now the fsync waits for its own completion.
#[test]
fn regression_fsync_eio_on_the_ebusy_path_is_not_lost() {
    let sim = SimIo::new();
    let io = UringIo::simulated(
        &sim,
        sim_cfg(),
        UringSimConfig {
            busy_one_in: 1,
            hold_one_in: 0,
            short_one_in: 0,
            refuse_direct_one_in: 0,
            seed: 7,
        },
    )
    .unwrap();
    let path = Path::new("/f");
    let f = io.create_new(path).unwrap();
    io.sync_dir(Path::new("/")).unwrap();
    let data = pattern(40_000, 3);
    f.write_at(&data, 0).unwrap();
    sim.inject(Fault::Eio {
        kind: OpKind::Sync,
        nth: 1,
    });
    let e = f.sync_data().unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(rustix::io::Errno::IO.raw_os_error()),
        "{e}"
    );
    // The error was the truth: a power cut now loses the data the failed sync was to persist.
    let img = sim.crash_image(CrashMode::DropUnsynced, 1);
    assert_eq!(img.read_file(path).unwrap().len(), 0);
    // A later sync of new data works again (and is the caller's decision, not a retry).
    f.write_at(&data, 0).unwrap();
    f.sync_data().unwrap();
    let img = sim.crash_image(CrashMode::DropUnsynced, 2);
    assert!(img.read_file(path).unwrap() == data);
}

/// Issue 14, item 5: the fsync took the first completion in the queue as its own result, so a
/// write's byte count (or anything else left there) answered for an fsync that failed.
#[test]
fn regression_fsync_result_is_its_own_completion_not_the_first_in_the_queue() {
    let sim = SimIo::new();
    let io = UringIo::simulated(
        &sim,
        sim_cfg(),
        UringSimConfig {
            seed: 3,
            ..Default::default()
        },
    )
    .unwrap();
    meddle(&io);
    let f = io.create_new(Path::new("/f")).unwrap();
    f.write_at(&pattern(100_000, 1), 10).unwrap();
    sim.inject(Fault::Eio {
        kind: OpKind::Sync,
        nth: 1,
    });
    assert!(
        f.sync_data().is_err(),
        "the fsync's EIO was answered by another completion"
    );
    f.write_at(&pattern(100_000, 1), 10).unwrap();
    f.sync_data().unwrap();
}

/// The simulated device does exercise the backend's paths: direct and bounce pieces, files
/// falling back to buffered, short writes continued, EBUSY, out-of-order completions — and the
/// bytes and lengths come out right through all of it.
#[test]
fn simulated_device_round_trips_through_every_path() {
    let sim = SimIo::new();
    let io = UringIo::simulated(&sim, sim_cfg(), UringSimConfig::default()).unwrap();
    let mut expect = Vec::new();
    for i in 0..12u8 {
        let path = PathBuf::from(format!("/f{i}"));
        let f = io.create_new(&path).unwrap();
        let data = pattern(50_000 + 4096 * i as usize, i);
        let (v, at) = aligned(&data);
        f.write_at(&v[at..at + data.len()], 0).unwrap();
        let mut shifted = vec![0u8; data.len() + 1];
        shifted[1..].copy_from_slice(&data);
        f.write_at(&shifted[1..], 8192 + data.len() as u64).unwrap();
        f.sync_data().unwrap();
        let mut whole = data.clone();
        whole.resize(8192 + data.len(), 0);
        whole.extend_from_slice(&data);
        assert_eq!(f.len().unwrap(), whole.len() as u64);
        expect.push((path, whole));
    }
    let s = io.stats();
    assert!(s.direct_pieces > 50 && s.buffered_pieces > 0, "{s:?}");
    assert!(s.direct_refused_files > 0, "{s:?}");
    io.sync_dir(Path::new("/")).unwrap();
    // After a power cut, every synced file is exact: the reserve was cut before each sync.
    let img = sim.crash_image(CrashMode::Reorder, 9);
    for (path, whole) in expect {
        assert!(img.read_file(&path).unwrap() == whole, "{}", path.display());
    }
}
