//! Huge pages for the memory cold reads land in, when the kernel has them free.
//!
//! Why (docs/DECISIONS.md, "Cold reads land in huge pages when they are free"): a block device
//! takes a bounded number of memory segments per request (`max_segments`: 254 for virtio
//! here), and each segment is a run of physically contiguous pages. Into scattered 4 KiB pages
//! an O_DIRECT read of 4 MiB becomes four or more requests of at most 1 MiB; into 2 MiB pages
//! it is one. On the 2-core VM the disk read the same 2 GiB in 0.78–0.86 s into a huge-page
//! buffer against 1.13–1.29 s into 4 KiB pages, and faulting huge pages in costs half the
//! system time of 4 KiB ones.
//!
//! The danger is compaction: with `defrag=madvise` (the usual default) a huge-page fault in a
//! `MADV_HUGEPAGE` range that finds no free 2 MiB block compacts memory synchronously, which
//! measured 22–25 s for 1 GiB next to 13 GiB of page cache. So a range is advised only while
//! `/proc/buddyinfo` shows free 2 MiB blocks for it and [`RESERVE_BLOCKS`] more, checked just
//! before it is faulted in: the fault then takes a free block and never compacts.
//!
//! Only buffers made once and reused are advised (the per-thread read buffers, [`ReadBuf`],
//! and the raw baselines of `ckptstore bench`), never the memory a load hands out: on this
//! VM the free 2 MiB blocks are the ones the balloon's free page reporting has returned to
//! the host, and faulting them in costs the host's first touch of every page — a 2 GiB load
//! into huge pages spent 2–7 s of system time where 4 KiB pages (taken from memory freed
//! recently) cost 0.6–0.8 s. A buffer reused for every read pays that once.
//!
//! [`ReadBuf`]: super::ReadBuf Where the
//! kernel has none free (a node full of page cache), or the file cannot be read, or
//! `CKPTSTORE_HUGE_PAGES=0`, memory stays in 4 KiB pages exactly as before.
//!
//! Like the other I/O modules this one is allowed `unsafe` (`madvise` on memory we hold).

use std::sync::OnceLock;

/// The huge page size this module advises for (x86-64 and arm64 with 4 KiB base pages).
pub const HUGE: usize = 2 << 20;

/// Free 2 MiB blocks left alone: an advised range is faulted in only while this many more
/// blocks than it needs are free, so concurrent readers, other processes and the kernel's
/// watermarks never push a fault into compaction.
pub const RESERVE_BLOCKS: u64 = 256;

/// Whether huge pages may be asked for: the kernel offers transparent huge pages (`enabled`
/// is `always` or `madvise`) and `CKPTSTORE_HUGE_PAGES` is not `0`. Read once per process.
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        if std::env::var("CKPTSTORE_HUGE_PAGES").is_ok_and(|v| v == "0") {
            return false;
        }
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|s| selected(&s).is_some_and(|m| m == "always" || m == "madvise"))
    })
}

/// The bracketed choice of a `/sys/kernel/mm/transparent_hugepage` setting.
fn selected(setting: &str) -> Option<&str> {
    let start = setting.find('[')? + 1;
    let end = start + setting[start..].find(']')?;
    Some(&setting[start..end])
}

/// Free blocks of at least [`HUGE`] bytes, in units of [`HUGE`], summed over every zone of
/// `/proc/buddyinfo` (`None` where it cannot be read or parsed).
pub fn free_blocks() -> Option<u64> {
    parse_buddyinfo(&std::fs::read_to_string("/proc/buddyinfo").ok()?)
}

/// [`free_blocks`] of a `/proc/buddyinfo` text: each line is `Node N, zone NAME` and then the
/// free block count of order 0, 1, 2, …; order 9 is 2 MiB with 4 KiB pages.
fn parse_buddyinfo(text: &str) -> Option<u64> {
    let order = HUGE.trailing_zeros() - 12;
    let mut blocks = 0u64;
    let mut lines = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let counts = line.split_once("zone")?.1.split_whitespace().skip(1);
        for (o, c) in counts.enumerate() {
            let c: u64 = c.parse().ok()?;
            if o as u32 >= order {
                blocks = blocks.saturating_add(c.saturating_mul(1 << (o as u32 - order)));
            }
        }
        lines += 1;
    }
    (lines > 0).then_some(blocks)
}

/// Whether `need` huge pages may be faulted in without compaction: that many free blocks and
/// [`RESERVE_BLOCKS`] more (no answer from the kernel: no).
fn room_for(need: u64, free: Option<u64>) -> bool {
    free.is_some_and(|free| free >= need.saturating_add(RESERVE_BLOCKS))
}

/// The `align`-aligned range inside `dst` (a page, a huge page), if it holds a whole one.
pub(super) fn aligned_inside(
    dst: &mut [u8],
    align: usize,
) -> Option<(*mut std::ffi::c_void, usize)> {
    let addr = dst.as_mut_ptr() as usize;
    let start = addr.div_ceil(align) * align;
    let end = (addr + dst.len()) / align * align;
    (end > start).then(|| (start as *mut std::ffi::c_void, end - start))
}

/// Asks for huge pages for the aligned inside of `dst` (memory not yet faulted in, about to
/// be) when they are free (see the module comment); otherwise does nothing. `true` when
/// advised. Pages already mapped are not changed.
pub fn advise(dst: &mut [u8]) -> bool {
    aligned_inside(dst, HUGE).is_some_and(|(p, n)| advise_span(p as usize, n))
}

/// [`advise`] of the aligned span `start..start + n`.
fn advise_span(start: usize, n: usize) -> bool {
    if !enabled() {
        return false;
    }
    if !room_for((n / HUGE) as u64, free_blocks()) {
        return false;
    }
    #[allow(unsafe_code)]
    // SAFETY: MADV_HUGEPAGE changes how pages not yet mapped in the range will be allocated,
    // never a byte of memory, and fails (ENOMEM) on addresses not mapped; the callers pass
    // ranges of buffers they hold.
    let r = unsafe {
        rustix::mm::madvise(
            start as *mut std::ffi::c_void,
            n,
            rustix::mm::Advice::LinuxHugepage,
        )
    };
    r.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buddyinfo_counts_blocks_of_two_mib_and_larger() {
        let text = "Node 0, zone      DMA      0      0      0      0      0      0      0      0      1      1      3 \n\
                    Node 0, zone    DMA32     90     88     80     73     48     45     27     25     24     22    729 \n\
                    Node 0, zone   Normal    991   2267   1344   3328   2906   2609   1977   1472    684    900   4118 \n";
        // order 9: 1 + 22 + 900; order 10 (two blocks each): 3 + 729 + 4118.
        assert_eq!(parse_buddyinfo(text), Some(923 + 2 * 4850));
        assert_eq!(parse_buddyinfo(""), None);
        assert_eq!(parse_buddyinfo("Node 0, zone Normal 1 x 3"), None);
    }

    #[test]
    fn huge_pages_are_asked_for_only_with_the_reserve_left_free() {
        assert!(room_for(2, Some(2 + RESERVE_BLOCKS)));
        assert!(!room_for(2, Some(1 + RESERVE_BLOCKS)));
        assert!(!room_for(0, Some(RESERVE_BLOCKS - 1)));
        assert!(!room_for(1, None));
        assert!(!room_for(u64::MAX - 1, Some(u64::MAX - 1)));
    }

    #[test]
    fn the_selected_setting_is_the_bracketed_one() {
        assert_eq!(selected("always [madvise] never\n"), Some("madvise"));
        assert_eq!(selected("[always] madvise never"), Some("always"));
        assert_eq!(selected("always madvise never"), None);
    }

    #[test]
    fn only_whole_aligned_huge_pages_are_advised() {
        let mut m = memmap2::MmapOptions::new()
            .len(3 * HUGE)
            .map_anon()
            .expect("map");
        let (p, n) =
            aligned_inside(&mut m[..], HUGE).expect("a 6 MiB map holds an aligned 2 MiB page");
        assert_eq!(p as usize % HUGE, 0);
        assert!((HUGE..=3 * HUGE).contains(&n));
        assert!(aligned_inside(&mut m[..HUGE - 4096], HUGE).is_none());
        // Advised or not (that depends on the machine), the bytes read the same.
        m[7] = 9;
        advise(&mut m[..]);
        assert_eq!(m[7], 9);
        assert!(m[8..].iter().all(|&b| b == 0));
    }
}
