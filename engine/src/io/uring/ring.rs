//! The submission side: one io_uring, the bounce buffers, and the loop that keeps up to
//! `depth` pieces in flight, reaps them, and resubmits short or interrupted ones.
//!
//! # Buffer lifetimes (why the `unsafe` here is sound)
//! The kernel reads a write's buffer at some time between the SQE's submission and its
//! completion, without Rust's knowledge. Every entry pushed here points either into the
//! caller's `&[u8]`, borrowed for the whole [`Ring::write`] call, or into the ring's own bounce
//! memory, which lives as long as the `Ring` and whose slot is not reused until the entry
//! completed. [`Ring::write`] returns only when every entry it pushed has completed — on
//! success, on error, and on unwind (the [`Drain`] guard waits for the rest in its `Drop`). So
//! no buffer is freed or reused while the kernel may still read it. A bounce slot is filled
//! only while free (no entry in flight points into it); the copy into it touches no other
//! slot, so bytes the kernel is reading never change under it.
//!
//! # Completions are matched by `user_data`
//! Every entry carries a tag: the call's sequence number in the high 32 bits, the piece's
//! index (or [`SYNC_INDEX`]) in the low ones. A completion is credited to the entry its tag
//! names, whatever order the kernel completes them in; one whose tag belongs to no entry of
//! this call in flight is ignored, never credited to another. An fsync waits for *its own*
//! completion — through EBUSY (a full completion queue) and through completions of other
//! entries — so its result, an EIO above all, is never dropped or replaced by a retry's.
//!
//! The ring talks to the kernel through [`Queue`]; [`KernelQueue`] is io_uring itself, and
//! `super::sim_device` a simulated device (power-loss sweeps, fault injection).

use super::plan::{rest_stays_aligned, Align, Piece, Route};
use io_uring::{opcode, squeue, types, IoUring};
use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

/// One submission entry, as the ring's logic builds it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Sqe {
    /// pwrite of `len` bytes at `ptr` to `fd` at `offset`.
    Write {
        fd: RawFd,
        ptr: *const u8,
        len: u32,
        offset: u64,
    },
    /// fdatasync (`data_only`) or fsync of `fd`, after every entry submitted before it
    /// (IO_DRAIN).
    Fsync { fd: RawFd, data_only: bool },
}

/// What the ring needs from an io_uring: the kernel's ([`KernelQueue`]) or a simulated one.
pub(crate) trait Queue: Send {
    /// Queues `e` tagged `user_data`; `false` when the submission queue is full.
    ///
    /// # Safety
    /// A `Write`'s buffer must stay valid until the entry's completion has been reaped.
    #[allow(unsafe_code)]
    unsafe fn push(&mut self, e: Sqe, user_data: u64) -> bool;
    /// Submits what is queued and waits for at least `want` completions (io_uring_enter):
    /// EINTR, and EBUSY when completions must be reaped first, come back as errors.
    fn submit_and_wait(&mut self, want: usize) -> io::Result<()>;
    /// Appends the completions ready now, as (user_data, result), to `out`.
    fn reap(&mut self, out: &mut Vec<(u64, i32)>);
    /// Replaces the queue with a fresh one (after `fork`, in the child).
    fn renew(&mut self) -> io::Result<()>;
}

/// The kernel's io_uring.
pub(crate) struct KernelQueue {
    ring: IoUring,
    depth: u32,
}

impl KernelQueue {
    pub(crate) fn new(depth: u32) -> io::Result<KernelQueue> {
        Ok(KernelQueue {
            ring: IoUring::new(depth)?,
            depth,
        })
    }
}

impl Queue for KernelQueue {
    #[allow(unsafe_code)]
    unsafe fn push(&mut self, e: Sqe, user_data: u64) -> bool {
        let entry = match e {
            Sqe::Write {
                fd,
                ptr,
                len,
                offset,
            } => opcode::Write::new(types::Fd(fd), ptr, len)
                .offset(offset)
                .build(),
            Sqe::Fsync { fd, data_only } => {
                let flags = if data_only {
                    types::FsyncFlags::DATASYNC
                } else {
                    types::FsyncFlags::empty()
                };
                opcode::Fsync::new(types::Fd(fd))
                    .flags(flags)
                    .build()
                    .flags(squeue::Flags::IO_DRAIN)
            }
        };
        // SAFETY: the caller keeps a write's buffer valid until its completion is reaped
        // (this function's contract); an fsync carries no buffer.
        #[allow(unsafe_code)]
        let pushed = unsafe { self.ring.submission().push(&entry.user_data(user_data)) };
        pushed.is_ok()
    }

    fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        self.ring.submit_and_wait(want).map(|_| ())
    }

    fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        out.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
    }

    fn renew(&mut self) -> io::Result<()> {
        self.ring = IoUring::new(self.depth)?;
        Ok(())
    }
}

/// The low half of an fsync entry's tag.
const SYNC_INDEX: u32 = u32::MAX;

fn tag(seq: u32, index: u32) -> u64 {
    (u64::from(seq) << 32) | u64::from(index)
}

/// The two descriptors of one file: the buffered one, and the O_DIRECT one with its
/// alignment when the file takes direct I/O.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fds {
    pub buffered: RawFd,
    pub direct: Option<(RawFd, Align)>,
}

/// What a write found out beyond its result.
#[derive(Debug, Default)]
pub(crate) struct WriteNotes {
    /// The kernel refused a direct piece (EINVAL/EOPNOTSUPP): the file must stop using
    /// O_DIRECT. The refused pieces were rewritten buffered.
    pub direct_refused: bool,
    /// Pieces that went direct (from the caller's memory or a bounce buffer).
    pub direct_pieces: usize,
}

/// An io_uring with `depth` entries and `depth` bounce slots of `piece` bytes.
pub(crate) struct Ring {
    pub(super) queue: Box<dyn Queue>,
    /// Sequence number of the current call, the high half of its entries' tags.
    seq: u32,
    /// The process that set the ring up: a forked child must not submit to its parent's
    /// queues (they are shared memory), so it sets up its own ([`Ring::for_this_process`]).
    pub(super) pid: rustix::process::Pid,
    depth: usize,
    piece: usize,
    bounce: Option<Bounce>,
    /// Test hook: the next this-many direct submissions complete with this errno instead of
    /// reaching the kernel.
    #[cfg(test)]
    pub inject_direct_errno: Option<(usize, i32)>,
    /// Test hook: the next this-many submissions ask for only about half of their bytes
    /// (kept aligned for direct pieces), as a short write would.
    #[cfg(test)]
    pub inject_short_writes: usize,
    /// Test hook: every sync fails with this errno (without reaching the kernel) while set.
    #[cfg(test)]
    pub inject_sync_errno: Option<i32>,
}

/// Aligned memory for `depth` pieces, allocated on first need and kept.
struct Bounce {
    mem: Vec<u8>,
    /// Index in `mem` of slot 0 (aligned).
    base: usize,
    free: Vec<usize>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("depth", &self.depth)
            .field("piece", &self.piece)
            .finish()
    }
}

/// One write of a batch: `buf` goes to `offset`, cut into `pieces`.
pub(crate) struct Job<'a> {
    pub buf: &'a [u8],
    pub offset: u64,
    pub pieces: Vec<Piece>,
}

/// One piece's progress.
struct Op {
    job: usize,
    piece: Piece,
    done: usize,
    slot: Option<usize>,
    /// Submitted and not completed: only then is a completion tagged with this op credited.
    in_flight: bool,
}

impl Ring {
    /// Sets up a ring of `depth` entries (the kernel may round up).
    pub(crate) fn new(depth: u32, piece: usize) -> io::Result<Ring> {
        Ok(Self::over(Box::new(KernelQueue::new(depth)?), depth, piece))
    }

    /// A ring over `queue` (the kernel's, or a simulated device).
    pub(crate) fn over(queue: Box<dyn Queue>, depth: u32, piece: usize) -> Ring {
        Ring {
            queue,
            seq: 0,
            pid: rustix::process::getpid(),
            depth: depth as usize,
            piece,
            bounce: None,
            #[cfg(test)]
            inject_direct_errno: None,
            #[cfg(test)]
            inject_short_writes: 0,
            #[cfg(test)]
            inject_sync_errno: None,
        }
    }

    /// Replaces the ring with a new one when this is a forked child of the process that set
    /// it up (a process-wide default ring outlives a `fork`).
    pub(crate) fn for_this_process(&mut self) -> io::Result<&mut Ring> {
        if self.pid != rustix::process::getpid() {
            self.queue.renew()?;
            self.pid = rustix::process::getpid();
            self.bounce = None;
        }
        Ok(self)
    }

    /// Writes every job's planned pieces, up to `depth` in flight across all jobs, and waits
    /// for all of them. Short writes are continued, EINTR/EAGAIN resubmitted; a direct piece
    /// the kernel refuses is rewritten buffered (and noted). The first other error is returned
    /// after every piece in flight completed.
    #[allow(clippy::expect_used)] // bounce memory is allocated before a bounce op is queued
    pub(crate) fn write(
        &mut self,
        jobs: &[Job<'_>],
        fds: Fds,
        notes: &mut WriteNotes,
    ) -> io::Result<()> {
        let bounces = jobs
            .iter()
            .any(|j| j.pieces.iter().any(|p| p.route == Route::Bounce));
        match self.bounce.as_mut() {
            // Nothing is in flight between calls: every slot is free, whatever an earlier
            // call that failed midway left in the list.
            Some(b) => b.free = (0..self.depth).rev().collect(),
            None if bounces => self.bounce = Some(Bounce::new(self.depth, self.piece, fds.direct)),
            None => {}
        }
        let mut ops: Vec<Op> = jobs
            .iter()
            .enumerate()
            .flat_map(|(job, j)| {
                j.pieces.iter().map(move |&piece| Op {
                    job,
                    piece,
                    done: 0,
                    slot: None,
                    in_flight: false,
                })
            })
            .collect();
        let mut pending: VecDeque<usize> = (0..ops.len()).collect();
        let mut first_err: Option<io::Error> = None;
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut drain = Drain::new(&mut *self.queue, seq);
        let mut done: Vec<(u64, i32)> = Vec::new();
        loop {
            let before = pending.len();
            // Fill the queue.
            while drain.in_flight < self.depth {
                let Some(&i) = pending.front() else { break };
                let op = &mut ops[i];
                if op.piece.route == Route::Bounce && op.slot.is_none() {
                    let bounce = self.bounce.as_mut().expect("allocated above");
                    let Some(slot) = bounce.free.pop() else { break };
                    let src = &jobs[op.job].buf[op.piece.start..op.piece.start + op.piece.len];
                    bounce.fill(slot, self.piece, src);
                    op.slot = Some(slot);
                }
                pending.pop_front();
                #[cfg(test)]
                if op.piece.route != Route::Buffered {
                    if let Some((n, errno)) = self.inject_direct_errno.as_mut() {
                        if *n > 0 {
                            *n -= 1;
                            let errno = *errno;
                            handle(
                                i,
                                -errno,
                                &mut ops,
                                &mut pending,
                                &mut self.bounce,
                                &mut first_err,
                                fds,
                                jobs,
                                notes,
                            );
                            continue;
                        }
                    }
                }
                let (ptr, fd) = source(op, jobs, &self.bounce, self.piece, fds);
                #[allow(unused_mut)]
                let mut len = (op.piece.len - op.done) as u32;
                #[cfg(test)]
                if self.inject_short_writes > 0 {
                    let half = if op.piece.route == Route::Buffered {
                        len / 2
                    } else {
                        len / 2 / 4096 * 4096
                    };
                    if half > 0 {
                        self.inject_short_writes -= 1;
                        len = half;
                    }
                }
                let at = jobs[op.job].offset + (op.piece.start + op.done) as u64;
                let entry = Sqe::Write {
                    fd,
                    ptr,
                    len,
                    offset: at,
                };
                // SAFETY: `ptr..ptr + len` lies in a job's `buf` (borrowed until this call returns)
                // or in a bounce slot owned by this op until it completes; `drain` waits for
                // every pushed entry before `write` returns or unwinds (module comment).
                #[allow(unsafe_code)]
                let pushed = unsafe { drain.queue.push(entry, tag(seq, i as u32)) };
                if !pushed {
                    // The queue is full of entries not yet submitted: submit, then retry.
                    pending.push_front(i);
                    drain.submit(0)?;
                    continue;
                }
                drain.in_flight += 1;
                op.in_flight = true;
                if notes_direct(op) {
                    notes.direct_pieces += 1;
                }
            }
            if drain.in_flight == 0 {
                if pending.is_empty() {
                    break;
                }
                if first_err.is_none() && pending.len() == before {
                    // Nothing in flight and nothing could be submitted: no completion will
                    // ever free a slot. Unreachable while slots are only held in flight.
                    return Err(io::Error::other("io_uring write made no progress"));
                }
                continue;
            }
            drain.submit(1)?;
            done.clear();
            drain.queue.reap(&mut done);
            for &(user_data, res) in &done {
                // Credited only to the op of this call its tag names, and only while that op
                // is in flight: never by arrival order, never twice.
                let Some(i) =
                    ours(user_data, seq).filter(|&i| ops.get(i).is_some_and(|o| o.in_flight))
                else {
                    continue;
                };
                ops[i].in_flight = false;
                drain.in_flight -= 1;
                handle(
                    i,
                    res,
                    &mut ops,
                    &mut pending,
                    &mut self.bounce,
                    &mut first_err,
                    fds,
                    jobs,
                    notes,
                );
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// fdatasync (or fsync) of `fd` through the ring, with IO_DRAIN: it starts only after
    /// every entry submitted before it completed. Waits for this entry's own completion
    /// (matched by tag) through EBUSY and through other completions; only EINTR/EAGAIN *as
    /// its result* submit it again. Any other result — EIO — is returned, never retried: after
    /// a writeback error the kernel marks the pages clean, and a second fsync would report
    /// success for data that never reached the disk.
    pub(crate) fn sync(&mut self, fd: RawFd, data_only: bool) -> io::Result<()> {
        #[cfg(test)]
        if let Some(errno) = self.inject_sync_errno {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let mut done: Vec<(u64, i32)> = Vec::new();
        loop {
            self.seq = self.seq.wrapping_add(1);
            let seq = self.seq;
            let me = tag(seq, SYNC_INDEX);
            let mut drain = Drain::new(&mut *self.queue, seq);
            loop {
                // SAFETY: an fsync entry carries no buffer.
                #[allow(unsafe_code)]
                let pushed = unsafe { drain.queue.push(Sqe::Fsync { fd, data_only }, me) };
                if pushed {
                    break;
                }
                drain.submit(0)?;
            }
            drain.in_flight = 1;
            let res = loop {
                drain.submit(1)?;
                done.clear();
                drain.queue.reap(&mut done);
                if let Some(&(_, r)) = done.iter().find(|(u, _)| *u == me) {
                    break r;
                }
            };
            drain.in_flight = 0;
            match res {
                r if r >= 0 => return Ok(()),
                r if is_retry(-r) => continue,
                r => return Err(io::Error::from_raw_os_error(-r)),
            }
        }
    }
}

/// The index of the op a completion's `user_data` names, if it is an entry of call `seq`.
fn ours(user_data: u64, seq: u32) -> Option<usize> {
    let (s, i) = ((user_data >> 32) as u32, user_data as u32);
    (s == seq && i != SYNC_INDEX).then_some(i as usize)
}

fn notes_direct(op: &Op) -> bool {
    op.done == 0 && op.piece.route != Route::Buffered
}

fn is_retry(errno: i32) -> bool {
    errno == rustix::io::Errno::INTR.raw_os_error()
        || errno == rustix::io::Errno::AGAIN.raw_os_error()
}

fn is_direct_refusal(errno: i32) -> bool {
    errno == rustix::io::Errno::INVAL.raw_os_error()
        || errno == rustix::io::Errno::OPNOTSUPP.raw_os_error()
}

/// Where the rest of an op's bytes are, and which descriptor writes them.
#[allow(clippy::expect_used)] // a bounce op is only submitted with its memory and slot
fn source(
    op: &Op,
    jobs: &[Job<'_>],
    bounce: &Option<Bounce>,
    piece: usize,
    fds: Fds,
) -> (*const u8, RawFd) {
    let buf = jobs[op.job].buf;
    match (op.piece.route, fds.direct) {
        (Route::Buffered, _) | (_, None) => {
            (buf[op.piece.start + op.done..].as_ptr(), fds.buffered)
        }
        (Route::Direct, Some((fd, _))) => (buf[op.piece.start + op.done..].as_ptr(), fd),
        (Route::Bounce, Some((fd, _))) => {
            let b = bounce.as_ref().expect("bounce op without bounce memory");
            let slot = op.slot.expect("bounce op without a slot");
            (b.mem[b.base + slot * piece + op.done..].as_ptr(), fd)
        }
    }
}

/// Handles one completion of op `i` with result `res`.
#[allow(clippy::too_many_arguments)]
fn handle(
    i: usize,
    res: i32,
    ops: &mut [Op],
    pending: &mut VecDeque<usize>,
    bounce: &mut Option<Bounce>,
    first_err: &mut Option<io::Error>,
    fds: Fds,
    jobs: &[Job<'_>],
    notes: &mut WriteNotes,
) {
    let op = &mut ops[i];
    let (buf, offset) = (jobs[op.job].buf, jobs[op.job].offset);
    let mut release = |op: &mut Op| {
        if let (Some(slot), Some(b)) = (op.slot.take(), bounce.as_mut()) {
            b.free.push(slot);
        }
    };
    if res > 0 {
        op.done += res as usize;
        if op.done >= op.piece.len {
            release(op);
            return;
        }
        // Short write: continue where it stopped; direct only while the rest stays aligned.
        if op.piece.route != Route::Buffered {
            let at = offset + (op.piece.start + op.done) as u64;
            let addr = buf[op.piece.start + op.done..].as_ptr() as usize;
            let stays = fds.direct.is_some_and(|(_, a)| {
                // A bounce slot starts aligned, so only the offset into it counts.
                let addr = if op.piece.route == Route::Bounce {
                    op.done
                } else {
                    addr
                };
                rest_stays_aligned(addr, at, op.piece.len - op.done, a)
            });
            if !stays {
                op.piece.route = Route::Buffered;
                release(op);
            }
        }
        if first_err.is_none() {
            pending.push_front(i);
        } else {
            release(op);
        }
        return;
    }
    if res == 0 {
        release(op);
        first_err.get_or_insert_with(|| {
            io::Error::new(io::ErrorKind::WriteZero, "io_uring write wrote 0 bytes")
        });
        pending.clear();
        return;
    }
    let errno = -res;
    if is_retry(errno) {
        if first_err.is_none() {
            pending.push_front(i);
        } else {
            release(op);
        }
        return;
    }
    if op.piece.route != Route::Buffered && is_direct_refusal(errno) {
        // The file system refuses O_DIRECT here: this piece and every later one of the file
        // go through the page cache. Nothing was written by the refused entry.
        notes.direct_refused = true;
        op.piece.route = Route::Buffered;
        release(op);
        for &j in pending.iter() {
            ops[j].piece.route = Route::Buffered;
            if let (Some(slot), Some(b)) = (ops[j].slot.take(), bounce.as_mut()) {
                b.free.push(slot);
            }
        }
        if first_err.is_none() {
            pending.push_front(i);
        }
        return;
    }
    release(op);
    first_err.get_or_insert_with(|| io::Error::from_raw_os_error(errno));
    pending.clear();
}

impl Bounce {
    fn new(depth: usize, piece: usize, direct: Option<(RawFd, Align)>) -> Bounce {
        let align = direct.map_or(4096, |(_, a)| a.mem.max(4096));
        let mem = vec![0u8; depth * piece + align];
        let base = mem.as_ptr().align_offset(align);
        Bounce {
            mem,
            base,
            free: (0..depth).rev().collect(),
        }
    }

    /// Copies `src` into free slot `slot`.
    fn fill(&mut self, slot: usize, piece: usize, src: &[u8]) {
        let at = self.base + slot * piece;
        self.mem[at..at + src.len()].copy_from_slice(src);
    }
}

/// Counts this call's entries in flight; waits for them all on drop, so that an early return
/// or an unwind never leaves the kernel reading a buffer that is about to be freed.
struct Drain<'r> {
    queue: &'r mut dyn Queue,
    /// The call whose entries are counted (the high half of their tags).
    seq: u32,
    in_flight: usize,
}

impl<'r> Drain<'r> {
    fn new(queue: &'r mut dyn Queue, seq: u32) -> Self {
        Drain {
            queue,
            seq,
            in_flight: 0,
        }
    }

    /// Submits what is queued and waits for at least `want` completions; EINTR retried,
    /// EBUSY (completion queue full) returns so the caller reaps first.
    fn submit(&mut self, want: usize) -> io::Result<()> {
        loop {
            match self.queue.submit_and_wait(want) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INTR.raw_os_error()) => {}
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) => {
                    return Ok(())
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for Drain<'_> {
    fn drop(&mut self) {
        let mut done = Vec::new();
        while self.in_flight > 0 {
            if self.queue.submit_and_wait(1).is_err() {
                // Without the kernel's completions nothing can be known; spinning is the only
                // way to keep the buffers alive until they come.
                std::thread::yield_now();
            }
            done.clear();
            self.queue.reap(&mut done);
            let n = done
                .iter()
                .filter(|(u, _)| (u >> 32) as u32 == self.seq)
                .count();
            self.in_flight = self.in_flight.saturating_sub(n);
        }
    }
}
