//! Segment header and frame decoders on arbitrary bytes, walking frames the way a scrubber
//! or salvage tool would (header, chunk table, payload, padding, next frame).
//!
//! Invariants: no panic (no overflow in the length arithmetic either), no allocation beyond
//! the input (`mode & 2` recomputes the CRCs first, so the checks behind them are reached);
//! a decoded frame re-encodes to a header that decodes to the same frame; a frame
//! that needs more bytes says how many, and that is more than it was given.
#![no_main]

use ckptstore::segment::{self, FrameHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let owned;
    let mut rest = rest;
    if mode & 2 != 0 {
        // Recompute the checksums (segment header, first frame header) so the fuzzer gets past
        // them to the checks behind: counts, lengths, sums.
        let mut v = rest.to_vec();
        fix_crcs(&mut v, mode & 1 == 0);
        owned = v;
        rest = &owned[..];
    }
    if mode & 1 == 0 {
        // A whole segment file: header block, then frames from the data offset.
        if let Ok(id) = segment::decode_header(rest) {
            assert_eq!(segment::decode_header(&segment::encode_header(id)), Ok(id));
        }
        if rest.len() > segment::SEGMENT_DATA_OFFSET as usize {
            walk(&rest[segment::SEGMENT_DATA_OFFSET as usize..]);
        }
    } else {
        // Frames only (so the fuzzer does not have to build a 4 KiB header first).
        walk(rest);
    }
});

fn walk(mut b: &[u8]) {
    for _ in 0..64 {
        let h = match FrameHeader::decode(b) {
            Ok(Ok(h)) => h,
            Ok(Err(need)) => {
                assert!(
                    need > b.len(),
                    "asked for {need} bytes with {} given",
                    b.len()
                );
                return;
            }
            Err(_) => return,
        };
        assert!(!h.chunks.is_empty());
        let again = h.encode();
        assert_eq!(again.len() as u64, h.header_len());
        assert_eq!(FrameHeader::decode(&again), Ok(Ok(h.clone())));
        // The chunk table is what the CRC covers; the re-encoded one is the same bytes.
        let table_end = segment::FRAME_FIXED_LEN + segment::CHUNK_ENTRY_LEN * h.chunks.len();
        assert_eq!(&again[64..table_end], &b[64..table_end]);
        let frame_len = h.frame_len();
        assert!(frame_len >= h.header_len() + h.payload_len());
        assert_eq!(frame_len % segment::FRAME_ALIGN, 0);
        if frame_len > b.len() as u64 {
            return;
        }
        b = &b[frame_len as usize..];
    }
}

fn fix_crcs(b: &mut [u8], with_segment_header: bool) {
    let mut frame_at = 0;
    if with_segment_header {
        if b.len() >= 32 {
            let c = crc32c::crc32c(&b[..28]);
            b[28..32].copy_from_slice(&c.to_le_bytes());
        }
        frame_at = segment::SEGMENT_DATA_OFFSET as usize;
    }
    let Some(f) = b.get_mut(frame_at..) else {
        return;
    };
    if f.len() < 64 {
        return;
    }
    let count = u32::from_le_bytes(f[8..12].try_into().unwrap()) as usize;
    let table_end = 64usize.saturating_add(count.saturating_mul(48));
    if table_end <= f.len() {
        let c = crc32c::crc32c_append(crc32c::crc32c(&f[0..60]), &f[64..table_end]);
        f[60..64].copy_from_slice(&c.to_le_bytes());
    }
}
