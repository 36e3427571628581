//! Planning one write: which bytes go through O_DIRECT, which through the page cache, in what
//! pieces. Pure arithmetic, no I/O, so every case is unit-tested.
//!
//! A write `[offset, offset + len)` is cut into a buffered head up to the first aligned file
//! offset, an aligned body, and a buffered tail after the last aligned offset. Only the body
//! goes direct, in pieces of at most `piece` bytes. The file alignment is at least the page
//! size, so a page is either written whole by one direct piece or touched only by buffered
//! pieces: a buffered read-modify-write of a page can never race a direct write into the same
//! page and write stale bytes back over it.

/// The alignment direct I/O needs on one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Align {
    /// File offsets and lengths of direct pieces are multiples of this (a power of two, at
    /// least the page size).
    pub offset: u64,
    /// Buffer addresses of direct pieces are multiples of this (a power of two).
    pub mem: usize,
}

/// How one piece reaches the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// Through the page cache (the buffered descriptor).
    Buffered,
    /// O_DIRECT straight from the caller's memory (its address is aligned).
    Direct,
    /// O_DIRECT from an aligned bounce buffer the bytes are copied into first (the caller's
    /// address is not aligned).
    Bounce,
}

/// One piece of a write: `buf[start..start + len]` goes to `offset + start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub start: usize,
    pub len: usize,
    pub route: Route,
}

/// Cuts a write of `len` bytes at buffer address `addr` to file `offset` into pieces of at
/// most `piece` bytes (a multiple of `align.offset` when `align` is given). `align: None`
/// means the file takes no direct I/O: every piece is buffered.
pub(crate) fn plan(
    addr: usize,
    len: usize,
    offset: u64,
    align: Option<Align>,
    piece: usize,
) -> Vec<Piece> {
    debug_assert!(piece > 0);
    let mut out = Vec::with_capacity(len / piece + 3);
    let Some(a) = align else {
        push_buffered(&mut out, 0, len, piece);
        return out;
    };
    debug_assert!(a.offset.is_power_of_two() && a.mem.is_power_of_two());
    debug_assert!((piece as u64).is_multiple_of(a.offset));
    let head = ((a.offset - offset % a.offset) % a.offset).min(len as u64) as usize;
    let body = ((len - head) as u64 / a.offset * a.offset) as usize;
    if body == 0 {
        push_buffered(&mut out, 0, len, piece);
        return out;
    }
    push_buffered(&mut out, 0, head, piece);
    let mut start = head;
    while start < head + body {
        let n = piece.min(head + body - start);
        let route = if addr.wrapping_add(start).is_multiple_of(a.mem) {
            Route::Direct
        } else {
            Route::Bounce
        };
        out.push(Piece {
            start,
            len: n,
            route,
        });
        start += n;
    }
    push_buffered(&mut out, head + body, len - head - body, piece);
    out
}

fn push_buffered(out: &mut Vec<Piece>, start: usize, len: usize, piece: usize) {
    let mut at = start;
    while at < start + len {
        let n = piece.min(start + len - at);
        out.push(Piece {
            start: at,
            len: n,
            route: Route::Buffered,
        });
        at += n;
    }
}

/// Whether the rest of a direct piece, after a short write of `done` bytes, can still go
/// direct: its file offset, length and address must all stay aligned.
pub(crate) fn rest_stays_aligned(addr: usize, file_off: u64, rest: usize, a: Align) -> bool {
    file_off.is_multiple_of(a.offset)
        && (rest as u64).is_multiple_of(a.offset)
        && addr.is_multiple_of(a.mem)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Align = Align {
        offset: 4096,
        mem: 512,
    };
    const MIB: usize = 1 << 20;

    /// Every byte is covered exactly once, in order.
    fn covers(p: &[Piece], len: usize) {
        let mut at = 0;
        for x in p {
            assert_eq!(x.start, at, "{p:?}");
            assert!(x.len > 0);
            at += x.len;
        }
        assert_eq!(at, len);
    }

    #[test]
    fn aligned_write_is_all_direct_in_pieces() {
        let p = plan(0x10_0000, 3 * MIB, 8192, Some(A), MIB);
        covers(&p, 3 * MIB);
        assert_eq!(p.len(), 3);
        assert!(p.iter().all(|x| x.route == Route::Direct && x.len == MIB));
    }

    #[test]
    fn unaligned_offset_gets_buffered_head_and_tail() {
        // offset 4096 + 64: head up to 8192, aligned body, tail of the rest.
        let len = 2 * MIB + 100;
        let off = 4096 + 64;
        let p = plan(0x10_0000 - 64 + 4096, len, off, Some(A), MIB);
        covers(&p, len);
        let head = &p[0];
        assert_eq!((head.route, head.len), (Route::Buffered, 4096 - 64));
        for x in &p[1..p.len() - 1] {
            assert_ne!(x.route, Route::Buffered);
            assert_eq!((off + x.start as u64) % 4096, 0);
            assert_eq!(x.len % 4096, 0);
        }
        let tail = p.last().unwrap();
        assert_eq!(tail.route, Route::Buffered);
        assert_eq!((off + tail.start as u64) % 4096, 0);
        assert!(tail.len < 4096);
    }

    #[test]
    fn misaligned_memory_bounces_but_stays_direct() {
        // The file side is aligned, the buffer is 16-byte aligned only (a malloc'ed Vec).
        let p = plan(0x7f00_0000_0010, 2 * MIB, 0, Some(A), MIB);
        covers(&p, 2 * MIB);
        assert!(p.iter().all(|x| x.route == Route::Bounce));
    }

    #[test]
    fn small_or_unalignable_writes_are_buffered() {
        // Shorter than one aligned block after the head: nothing can go direct.
        let p = plan(0, 5000, 100, Some(A), MIB);
        covers(&p, 5000);
        assert!(p.iter().all(|x| x.route == Route::Buffered));
        let p = plan(0, 10, 0, Some(A), MIB);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].route, Route::Buffered);
        assert!(plan(0, 0, 0, Some(A), MIB).is_empty());
    }

    #[test]
    fn no_direct_means_buffered_pieces() {
        let p = plan(0, 5 * MIB / 2, 0, None, MIB);
        covers(&p, 5 * MIB / 2);
        assert_eq!(p.len(), 3);
        assert!(p.iter().all(|x| x.route == Route::Buffered));
    }

    #[test]
    fn buffered_head_longer_than_a_piece_is_cut() {
        let big = Align {
            offset: 2 * MIB as u64,
            mem: 4096,
        };
        let p = plan(0, 5 * MIB, 4096, Some(big), 2 * MIB);
        covers(&p, 5 * MIB);
        assert!(p.iter().all(|x| x.len <= 2 * MIB));
    }

    #[test]
    fn rest_of_short_direct_write() {
        assert!(rest_stays_aligned(4096, 8192, 4096, A));
        assert!(!rest_stays_aligned(4096, 8192 + 512, 4096, A));
        assert!(!rest_stays_aligned(4096, 8192, 1000, A));
        assert!(!rest_stays_aligned(4097, 8192, 4096, A));
    }
}
