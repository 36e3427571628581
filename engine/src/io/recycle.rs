//! Memory kept for reuse: the buffers of dropped tensor views, for the next view of a similar
//! size, and the read buffers of closed stores, for the next store's reads.
//!
//! Why (docs/DECISIONS.md, "A dropped view's memory serves the next view"): a load that takes
//! one tensor view at a time and lets it go (copy it to the GPU, into an optimizer, to another
//! host) used to map new memory for every view and unmap it after. Faulting that memory in
//! cost more than reading and hashing the bytes on the 2-core VM — the kernel zeroes and
//! charges every page, and memory the balloon has handed back to the host costs the host's
//! first touch too. A view's buffer that is dropped is therefore kept here (a few, bounded in
//! bytes) and handed to the next view that fits it (at most an eighth larger): its pages are
//! already mapped, so the bytes land in memory that faults nothing. Read buffers
//! ([`super::ReadBuf`], huge pages where free) are kept the same way when a store closes: a
//! process that opens a store per load (`ckptstore bench`, a job that reopens to resume) maps
//! and faults them once. The two kinds are never mixed: a read buffer is advised huge pages,
//! a view's memory not (io/huge.rs says why).
//!
//! Kept memory is given back soon: a buffer unused for [`IDLE`] is unmapped by a small thread
//! that runs only while something is kept, so a process that loaded its state and moved on
//! holds none of it. (`MADV_FREE` would let the kernel take the pages back by itself, but a
//! write into such pages ran at half the speed of a write into plain ones here — 3.3–3.7
//! against 5.4–6.2 GB/s for a 64 MiB `memcpy` — which is most of what reuse saves.) Whoever
//! takes a buffer overwrites every byte it hands out, so what it held before is never seen.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Buffers kept at most (of both kinds together).
const KEEP: usize = 16;

/// What a kept buffer was: memory of a tensor view, or a read buffer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Kind {
    View,
    Read,
}

/// How long a kept buffer waits for a taker before it is unmapped.
pub const IDLE: Duration = Duration::from_secs(2);

/// Bytes kept at most: an eighth of the machine's memory, and never more than 1 GiB.
fn limit() -> usize {
    static LIMIT: OnceLock<usize> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        let total = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| mem_total(&s))
            .unwrap_or(0);
        usize::try_from(total / 8)
            .unwrap_or(usize::MAX)
            .min(1 << 30)
    })
}

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The capacity a new buffer of `len` bytes is made with: whole pages.
pub(super) fn capacity_for(len: usize) -> usize {
    let page = rustix::param::page_size();
    len.max(1).div_ceil(page) * page
}

/// Whether a kept buffer of `cap` bytes may serve a view of `len` bytes: large enough, and at
/// most an eighth larger (whole pages). A view may be held for as long as its caller likes (a
/// loaded tensor's storage), so it must not pin much more memory than its bytes.
fn fits(cap: usize, len: usize) -> bool {
    cap >= len && cap <= capacity_for(len + len / 8)
}

#[derive(Default)]
struct Pool {
    /// Oldest first, each with its kind and when it was given.
    kept: Vec<(Kind, memmap2::MmapMut, Instant)>,
    bytes: usize,
    /// Whether the thread that unmaps idle buffers runs.
    reaping: bool,
}

fn pool() -> &'static Mutex<Pool> {
    static POOL: OnceLock<Mutex<Pool>> = OnceLock::new();
    POOL.get_or_init(Mutex::default)
}

/// A kept buffer of `kind` for `len` bytes (the smallest that fits), or `None`. Its contents
/// are whatever it held: the taker overwrites what it hands out.
pub(super) fn take(kind: Kind, len: usize) -> Option<memmap2::MmapMut> {
    pool()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take(kind, len)
}

/// Keeps `map` for a later [`take`] if there is room (else it is unmapped here), and makes sure
/// the thread that unmaps idle buffers runs.
pub(super) fn give(kind: Kind, map: memmap2::MmapMut) {
    let mut p = pool().lock().unwrap_or_else(|e| e.into_inner());
    let unkept = p.give(kind, map, limit(), Instant::now());
    if !p.kept.is_empty() && !p.reaping {
        // Without a thread (a process at its thread limit) the buffer is simply not kept.
        let spawned = std::thread::Builder::new()
            .name("ckptstore-recycle".into())
            .spawn(reap);
        if spawned.is_ok() {
            p.reaping = true;
        } else {
            p.kept.clear();
            p.bytes = 0;
        }
    }
    drop(p);
    // Unmapped after the lock is let go: other views' take and give do not wait for it.
    drop(unkept);
}

/// The reaping thread: every [`IDLE`], unmaps what waited that long; ends when nothing is kept
/// (deciding so under the lock, so a [`give`] after it starts a new one).
fn reap() {
    loop {
        std::thread::sleep(IDLE);
        let mut p = pool().lock().unwrap_or_else(|e| e.into_inner());
        let idle = p.drop_idle(Instant::now());
        let done = p.kept.is_empty();
        if done {
            p.reaping = false;
        }
        drop(p);
        drop(idle);
        if done {
            return;
        }
    }
}

impl Pool {
    fn take(&mut self, kind: Kind, len: usize) -> Option<memmap2::MmapMut> {
        let best = self
            .kept
            .iter()
            .enumerate()
            .filter(|(_, (k, m, _))| *k == kind && fits(m.len(), len))
            .min_by_key(|(_, (_, m, _))| m.len())
            .map(|(i, _)| i)?;
        let (_, map, _) = self.kept.remove(best);
        self.bytes -= map.len();
        Some(map)
    }

    /// Keeps `map`; the oldest kept buffers make room for it (at most [`KEEP`] of them and
    /// `limit` bytes in all). A buffer over `limit` is not kept. Returns what is not kept, for
    /// the caller to unmap once it has let the lock go.
    fn give(
        &mut self,
        kind: Kind,
        map: memmap2::MmapMut,
        limit: usize,
        now: Instant,
    ) -> Vec<memmap2::MmapMut> {
        if map.len() > limit {
            return vec![map];
        }
        let mut unkept = Vec::new();
        while !self.kept.is_empty() && (self.kept.len() >= KEEP || self.bytes + map.len() > limit) {
            let (_, old, _) = self.kept.remove(0);
            self.bytes -= old.len();
            unkept.push(old);
        }
        self.bytes += map.len();
        self.kept.push((kind, map, now));
        unkept
    }

    /// Takes out the buffers kept for [`IDLE`] or longer at `now` (for the caller to unmap).
    fn drop_idle(&mut self, now: Instant) -> Vec<memmap2::MmapMut> {
        let (idle, kept) = std::mem::take(&mut self.kept)
            .into_iter()
            .partition(|(_, _, at)| now.duration_since(*at) >= IDLE);
        self.kept = kept;
        self.bytes = self.kept.iter().map(|(_, m, _)| m.len()).sum();
        idle.into_iter().map(|(_, m, _)| m).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_is_read_in_bytes() {
        let text = "MemTotal:       24588648 kB\nMemFree:        20000000 kB\n";
        assert_eq!(mem_total(text), Some(24588648 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(mem_total("MemTotal: x kB\n"), None);
    }

    #[test]
    fn capacities_are_whole_pages() {
        let page = rustix::param::page_size();
        assert_eq!(capacity_for(0), page);
        assert_eq!(capacity_for(page + 1), 2 * page);
        assert_eq!(capacity_for(64 << 20), 64 << 20);
    }

    #[test]
    fn a_buffer_serves_views_at_most_an_eighth_smaller() {
        let mib = 1 << 20;
        assert!(fits(64 * mib, 64 * mib));
        assert!(fits(64 * mib, 57 * mib), "57 MiB + 1/8 = 64.1 MiB");
        assert!(!fits(64 * mib, 56 * mib), "56 MiB + 1/8 = 63 MiB");
        assert!(!fits(64 * mib, 64 * mib + 1));
    }

    fn map(pages: usize) -> memmap2::MmapMut {
        let len = pages * rustix::param::page_size();
        memmap2::MmapOptions::new().len(len).map_anon().unwrap()
    }

    #[test]
    fn the_smallest_kept_buffer_that_fits_is_taken() {
        let page = rustix::param::page_size();
        let mut p = Pool::default();
        let (big, small) = (map(8), map(5));
        let small_at = small.as_ptr();
        p.give(Kind::View, big, usize::MAX, Instant::now());
        p.give(Kind::View, small, usize::MAX, Instant::now());
        let read = map(5);
        let read_at = read.as_ptr();
        p.give(Kind::Read, read, usize::MAX, Instant::now());
        let got = p.take(Kind::Read, 5 * page).expect("the read buffer");
        assert_eq!(got.as_ptr(), read_at, "kinds are not mixed");
        assert_eq!(p.bytes, 13 * page);
        let got = p
            .take(Kind::View, 4 * page + 1)
            .expect("a kept buffer fits");
        assert_eq!(got.as_ptr(), small_at);
        assert_eq!(p.bytes, 8 * page);
        assert!(
            p.take(Kind::View, 9 * page).is_none(),
            "none is large enough"
        );
        assert!(
            p.take(Kind::View, page).is_none(),
            "8 pages are too many for one"
        );
        assert!(
            p.take(Kind::Read, 8 * page).is_none(),
            "no read buffer is kept"
        );
        assert!(p.take(Kind::View, 8 * page).is_some());
        assert_eq!((p.kept.len(), p.bytes), (0, 0));
    }

    #[test]
    fn the_oldest_buffers_make_room_within_the_limits() {
        let page = rustix::param::page_size();
        let mut p = Pool::default();
        let first = map(4);
        let first_at = first.as_ptr();
        let now = Instant::now();
        p.give(Kind::View, first, 10 * page, now);
        p.give(Kind::View, map(4), 10 * page, now);
        p.give(Kind::View, map(4), 10 * page, now);
        assert_eq!(
            (p.kept.len(), p.bytes),
            (2, 8 * page),
            "the byte limit holds"
        );
        assert!(
            p.kept.iter().all(|(_, m, _)| m.as_ptr() != first_at),
            "the oldest went"
        );
        p.give(Kind::View, map(11), 10 * page, now);
        assert_eq!(p.kept.len(), 2, "a buffer over the limit is not kept");
        let mut q = Pool::default();
        for _ in 0..KEEP + 3 {
            q.give(Kind::Read, map(1), usize::MAX, now);
        }
        assert_eq!(q.kept.len(), KEEP);
    }

    #[test]
    fn buffers_idle_for_two_seconds_are_unmapped() {
        let page = rustix::param::page_size();
        let mut p = Pool::default();
        let t0 = Instant::now();
        p.give(Kind::View, map(3), usize::MAX, t0);
        p.give(Kind::Read, map(2), usize::MAX, t0 + Duration::from_secs(1));
        p.drop_idle(t0 + IDLE - Duration::from_millis(1));
        assert_eq!((p.kept.len(), p.bytes), (2, 5 * page));
        p.drop_idle(t0 + IDLE);
        assert_eq!((p.kept.len(), p.bytes), (1, 2 * page), "the older one went");
        p.drop_idle(t0 + IDLE + Duration::from_secs(1));
        assert_eq!((p.kept.len(), p.bytes), (0, 0));
    }
}
