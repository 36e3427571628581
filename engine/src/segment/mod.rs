//! Segment files: append-only containers of chunk frames, never rewritten once referenced.
//!
//! A segment starts with a 4096-byte header block (so data starts aligned for O_DIRECT):
//! `magic "CKPTSEG\0" | version u16 | flags u16 = 0 | data_offset u32 = 4096 | segment_id u64 |
//! reserved u32 = 0 | crc32c(bytes 0..28) u32 | zeros to 4096`.
//!
//! Frames follow at 64-byte aligned offsets. A frame holds a run of chunks whose payloads are
//! contiguous, so a tensor written in one run can be read as one contiguous byte range:
//! ```text
//! 0  magic "CKFR"        4  version u8 = 1   5  codec u8   6  reserved u16 = 0
//! 8  chunk_count u32     12 header_len u32 (≥ 64 + 48 × count rounded up to 64; padded so
//!                           that the payload starts on a page for raw runs of ≥ 64 KiB)
//! 16 payload_len u64     24 segment_id u64   32 reserved [u8; 28] = 0
//! 60 crc32c(bytes 0..60 ‖ chunk table) u32
//! 64 chunk table: count × { blake3 [u8; 32] | stored_len u64 | raw_len u64 }
//! .. zero padding to header_len, then payload_len bytes of payload, then zeros to 64-alignment
//! ```
//! The manifest, not the frame, is what a reader trusts: it names each chunk's segment, offset,
//! length and BLAKE3. Frames make a segment self-describing for scrubbing, salvage and fuzzing.

use crate::le;

pub mod trailer;
mod writer;

pub use writer::SegmentTap;
pub(crate) use writer::{Run, SegmentWriter};

/// Bytes reserved for the segment header; the first frame starts here.
pub const SEGMENT_DATA_OFFSET: u64 = 4096;
/// Alignment of every frame start (and so of every first payload byte).
pub const FRAME_ALIGN: u64 = 64;
/// Fixed part of a frame header.
pub const FRAME_FIXED_LEN: usize = 64;
/// One chunk-table entry.
pub const CHUNK_ENTRY_LEN: usize = 48;
/// Highest segment format version this build reads and the one it writes.
pub(crate) const SEGMENT_VERSION: u16 = 1;
const SEG_MAGIC: &[u8; 8] = b"CKPTSEG\0";
const FRAME_MAGIC: &[u8; 4] = b"CKFR";
const FRAME_VERSION: u8 = 1;

/// Rounds `x` up to a multiple of [`FRAME_ALIGN`].
pub(crate) fn align_up(x: u64) -> u64 {
    x.div_ceil(FRAME_ALIGN) * FRAME_ALIGN
}

/// File name of segment `id`: `NNNNNNNN.seg` (8+ decimal digits).
pub fn file_name(id: u64) -> String {
    format!("{id:08}.seg")
}

/// Parses a segment file name back to its id; foreign names give `None`.
pub fn parse_file_name(name: &str) -> Option<u64> {
    parse_numbered(name, ".seg")
}

/// The number of a `NNNNNNNN<suffix>` file name (8+ decimal digits), the naming of segment
/// and WAL files; foreign names give `None`.
pub(crate) fn parse_numbered(name: &str, suffix: &str) -> Option<u64> {
    let digits = name.strip_suffix(suffix)?;
    if digits.len() < 8 || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Encodes the header block of segment `id`.
pub fn encode_header(id: u64) -> Vec<u8> {
    let mut b = vec![0u8; SEGMENT_DATA_OFFSET as usize];
    b[0..8].copy_from_slice(SEG_MAGIC);
    b[8..10].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&(SEGMENT_DATA_OFFSET as u32).to_le_bytes());
    b[16..24].copy_from_slice(&id.to_le_bytes());
    let crc = crc32c::crc32c(&b[0..28]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Why a segment header or frame did not decode.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Bad magic, checksum, or an impossible field.
    Corrupt(&'static str),
    /// Written by a newer version.
    NewerVersion(u16),
}

/// Decodes a segment header, returning the segment id.
pub fn decode_header(b: &[u8]) -> Result<u64, DecodeError> {
    if b.len() < 32 || &b[0..8] != SEG_MAGIC {
        return Err(DecodeError::Corrupt("bad segment magic"));
    }
    if le::u32_at(b, 28) != crc32c::crc32c(&b[0..28]) {
        return Err(DecodeError::Corrupt("segment header checksum"));
    }
    let version = u16::from_le_bytes([b[8], b[9]]);
    if version > SEGMENT_VERSION {
        return Err(DecodeError::NewerVersion(version));
    }
    if le::u32_at(b, 12) as u64 != SEGMENT_DATA_OFFSET {
        return Err(DecodeError::Corrupt("unexpected data offset"));
    }
    Ok(le::u64_at(b, 16))
}

/// One chunk as listed in a frame's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    /// BLAKE3 of the raw bytes.
    pub blake3: [u8; 32],
    /// Bytes on disk.
    pub stored_len: u64,
    /// Bytes after decoding.
    pub raw_len: u64,
}

/// A decoded frame header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameHeader {
    /// Codec of every chunk in the frame (0 = none).
    pub codec: u8,
    /// Segment the frame was written to.
    pub segment_id: u64,
    /// The chunks, in payload order.
    pub chunks: Vec<ChunkEntry>,
    /// Bytes from the frame start to the first payload byte: at least
    /// [`FrameHeader::min_header_len`]; more when the writer reserved table space for chunks
    /// it then did not put in this frame (it writes payloads before it knows the run's length).
    pub header_len: u64,
}

/// Largest header a frame may declare (a table of 65 536 chunks); larger is corruption.
pub(crate) const MAX_FRAME_HEADER_LEN: u64 =
    FRAME_FIXED_LEN as u64 + CHUNK_ENTRY_LEN as u64 * 65_536;

/// Header length of a frame whose table has room for `n` chunks.
pub(crate) fn header_len_for(n: usize) -> u64 {
    align_up((FRAME_FIXED_LEN + CHUNK_ENTRY_LEN * n) as u64)
}

/// Most chunks one frame's table lists (the format's cap on a frame header).
pub(crate) const MAX_FRAME_CHUNKS: usize = 65_536;

/// File-offset alignment of a padded frame's payload: the page, what O_DIRECT needs.
pub const PAYLOAD_ALIGN: u64 = 4096;
/// Smallest run (payload bytes it may hold) whose frame header is padded to [`PAYLOAD_ALIGN`].
/// A smaller run would waste up to 4032 bytes of padding on a payload that is mostly written
/// through the page cache anyway (less than a few pages); from here on the padding is at most
/// 6 % of the run, and at a 4 MiB chunk under 0.1 %.
pub const PAD_MIN_RUN_BYTES: u64 = 64 << 10;

/// Whether the writer pads the header of a run of `codec` that may hold `run_bytes` payload
/// bytes, so that its payload starts on a [`PAYLOAD_ALIGN`] file offset: raw runs of at least
/// [`PAD_MIN_RUN_BYTES`]. Compressed runs are not padded: their stored lengths are not page
/// multiples and their bytes come from the compressor's buffer, so O_DIRECT would copy them
/// through an aligned buffer however the frame is laid out.
pub(crate) fn pads(codec: u8, run_bytes: u64) -> bool {
    codec == 0 && run_bytes >= PAD_MIN_RUN_BYTES
}

/// Where a frame starts, and whether its header is padded so that its payload starts on a
/// [`PAYLOAD_ALIGN`] file offset ([`pads`]). The padding is part of the header (zeros up to
/// the header length, as docs/FORMAT.md allows), so every reader finds the payload where the
/// header length says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameAt {
    /// File offset of the frame (a multiple of [`FRAME_ALIGN`]).
    pub start: u64,
    /// Pad the header up to the next [`PAYLOAD_ALIGN`] file offset.
    pub pad: bool,
}

impl FrameAt {
    /// Header length of a frame here whose table has room for `n` chunks: the minimum, or
    /// padded up to where the payload starts on a page (unless that would pass the format's
    /// largest header, a table of 65 536 chunks: then unpadded).
    pub(crate) fn header_len(self, n: usize) -> u64 {
        let h = header_len_for(n);
        if !self.pad {
            return h;
        }
        let padded = (self.start + h).next_multiple_of(PAYLOAD_ALIGN) - self.start;
        if padded <= MAX_FRAME_HEADER_LEN {
            padded
        } else {
            h
        }
    }

    /// Where a frame here ends (the next frame starts) with room for `n` chunks and `payload`
    /// bytes of payload.
    pub(crate) fn end(self, n: usize, payload: u64) -> u64 {
        align_up(self.start + self.header_len(n) + payload)
    }
}

/// The most bytes a frame of `n` chunks and `payload` bytes takes wherever it starts, padded
/// or not (padding adds less than [`PAYLOAD_ALIGN`]).
pub(crate) fn frame_len_at_most(pad: bool, n: usize, payload: u64) -> u64 {
    let padding = if pad { PAYLOAD_ALIGN - FRAME_ALIGN } else { 0 };
    align_up(header_len_for(n) + payload) + padding
}

/// How many chunks of a run fit in a frame at `at` of a segment of at most `max` bytes: the
/// run covers chunks `k..` of `total` bytes cut in chunks of `cs`, and a frame lists at most
/// `MAX_FRAME_CHUNKS` of them (its header grows with each, and counts its padding).
pub(crate) fn frame_capacity(at: FrameAt, max: u64, total: usize, cs: usize, k: usize) -> usize {
    let limit = (total.div_ceil(cs) - k).min(MAX_FRAME_CHUNKS);
    let mut payload = 0u64;
    let mut n = 0;
    while n < limit {
        payload += (total - (k + n) * cs).min(cs) as u64;
        if at.end(n + 1, payload) > max {
            break;
        }
        n += 1;
    }
    n
}

/// The payload bytes a run starting at chunk `k` of `total` bytes (chunks of `cs`) may hold:
/// the rest of the tensor. What [`pads`] decides by.
pub(crate) fn run_bytes(total: usize, cs: usize, k: usize) -> u64 {
    total.saturating_sub(k * cs) as u64
}

impl FrameHeader {
    /// A frame header with no reserved table space.
    pub fn new(codec: u8, segment_id: u64, chunks: Vec<ChunkEntry>) -> Self {
        let header_len = header_len_for(chunks.len());
        FrameHeader {
            codec,
            segment_id,
            chunks,
            header_len,
        }
    }

    /// The smallest header that holds this frame's chunk table.
    pub fn min_header_len(&self) -> u64 {
        header_len_for(self.chunks.len())
    }

    /// Bytes from the frame start to the first payload byte.
    pub fn header_len(&self) -> u64 {
        self.header_len
    }

    /// Sum of the stored chunk lengths.
    pub fn payload_len(&self) -> u64 {
        self.chunks.iter().map(|c| c.stored_len).sum()
    }

    /// Bytes the whole frame occupies, padding included.
    pub fn frame_len(&self) -> u64 {
        align_up(self.header_len() + self.payload_len())
    }

    /// Encodes the header, chunk table and padding (everything before the payload).
    pub fn encode(&self) -> Vec<u8> {
        debug_assert!(
            self.header_len >= self.min_header_len() && self.header_len.is_multiple_of(FRAME_ALIGN)
        );
        let mut b = vec![0u8; self.header_len() as usize];
        b[0..4].copy_from_slice(FRAME_MAGIC);
        b[4] = FRAME_VERSION;
        b[5] = self.codec;
        b[8..12].copy_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        b[12..16].copy_from_slice(&(self.header_len() as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.payload_len().to_le_bytes());
        b[24..32].copy_from_slice(&self.segment_id.to_le_bytes());
        for (i, c) in self.chunks.iter().enumerate() {
            let e = &mut b[FRAME_FIXED_LEN + i * CHUNK_ENTRY_LEN..][..CHUNK_ENTRY_LEN];
            e[0..32].copy_from_slice(&c.blake3);
            e[32..40].copy_from_slice(&c.stored_len.to_le_bytes());
            e[40..48].copy_from_slice(&c.raw_len.to_le_bytes());
        }
        let table_end = FRAME_FIXED_LEN + CHUNK_ENTRY_LEN * self.chunks.len();
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[0..60]), &b[64..table_end]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a frame header from `b` (which starts at the frame). `b` must hold at least
    /// the fixed header; `Ok(None)` asks for `n` bytes in total when the table is longer.
    pub fn decode(b: &[u8]) -> Result<Result<Self, usize>, DecodeError> {
        if b.len() < FRAME_FIXED_LEN || &b[0..4] != FRAME_MAGIC {
            return Err(DecodeError::Corrupt("bad frame magic"));
        }
        if b[4] > FRAME_VERSION {
            return Err(DecodeError::NewerVersion(b[4] as u16));
        }
        let count = le::u32_at(b, 8) as u64;
        let header_len = le::u32_at(b, 12) as u64;
        if count == 0
            || header_len < align_up(FRAME_FIXED_LEN as u64 + CHUNK_ENTRY_LEN as u64 * count)
            || header_len > MAX_FRAME_HEADER_LEN
            || !header_len.is_multiple_of(FRAME_ALIGN)
        {
            return Err(DecodeError::Corrupt("frame chunk count / header length"));
        }
        let table_end = FRAME_FIXED_LEN + CHUNK_ENTRY_LEN * count as usize;
        if b.len() < table_end {
            return Ok(Err(table_end));
        }
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[0..60]), &b[64..table_end]);
        if le::u32_at(b, 60) != crc {
            return Err(DecodeError::Corrupt("frame header checksum"));
        }
        let chunks: Vec<ChunkEntry> = b[FRAME_FIXED_LEN..table_end]
            .chunks_exact(CHUNK_ENTRY_LEN)
            .map(|e| ChunkEntry {
                blake3: le::array(e, 0),
                stored_len: le::u64_at(e, 32),
                raw_len: le::u64_at(e, 40),
            })
            .collect();
        let sum = chunks
            .iter()
            .try_fold(0u64, |acc, c| acc.checked_add(c.stored_len));
        if sum != Some(le::u64_at(b, 16)) {
            return Err(DecodeError::Corrupt("frame payload length"));
        }
        // frame_len() = align_up(header_len + payload_len) must not overflow.
        if sum
            .and_then(|s| s.checked_add(header_len + FRAME_ALIGN - 1))
            .is_none()
        {
            return Err(DecodeError::Corrupt("frame payload length overflows"));
        }
        Ok(Ok(FrameHeader {
            codec: b[5],
            segment_id: le::u64_at(b, 24),
            chunks,
            header_len,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        assert_eq!(file_name(42), "00000042.seg");
        assert_eq!(parse_file_name("00000042.seg"), Some(42));
        assert_eq!(parse_file_name("123456789.seg"), Some(123456789));
        assert_eq!(parse_file_name("42.seg"), None);
        assert_eq!(parse_file_name("0000004x.seg"), None);
        assert_eq!(parse_file_name("notes.txt"), None);
        // The same rules for every numbered file of a store (WAL files too).
        assert_eq!(parse_numbered("00000001.wal", ".wal"), Some(1));
        assert_eq!(parse_numbered("1.wal", ".wal"), None);
        assert_eq!(parse_numbered("00000001.wal.bak", ".wal"), None);
    }

    /// Pins the segment header and frame layout to docs/FORMAT.md.
    #[test]
    fn golden_bytes() {
        let h = encode_header(3);
        assert_eq!(h.len(), 4096);
        let mut want = b"CKPTSEG\0".to_vec();
        want.extend_from_slice(&[1, 0, 0, 0]); // version 1, flags 0
        want.extend_from_slice(&[0x00, 0x10, 0, 0]); // data offset 4096
        want.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 0]); // id
        want.extend_from_slice(&[0, 0, 0, 0]);
        let crc = crc32c::crc32c(&want);
        want.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(&h[..32], &want[..]);
        assert!(h[32..].iter().all(|&x| x == 0));
        assert_eq!(decode_header(&h), Ok(3));

        let f = FrameHeader::new(
            0,
            3,
            vec![ChunkEntry {
                blake3: [0xab; 32],
                stored_len: 5,
                raw_len: 5,
            }],
        );
        let b = f.encode();
        assert_eq!(b.len(), 128); // 64 + 48 rounded up to 64
        let mut want = b"CKFR".to_vec();
        want.extend_from_slice(&[1, 0, 0, 0]); // version, codec, reserved
        want.extend_from_slice(&[1, 0, 0, 0]); // chunk count
        want.extend_from_slice(&[128, 0, 0, 0]); // header len
        want.extend_from_slice(&[5, 0, 0, 0, 0, 0, 0, 0]); // payload len
        want.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 0]); // segment id
        want.extend_from_slice(&[0u8; 28]);
        let mut table = vec![0xab; 32];
        table.extend_from_slice(&[5, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0]);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&want), &table);
        want.extend_from_slice(&crc.to_le_bytes());
        want.extend_from_slice(&table);
        want.resize(128, 0);
        assert_eq!(b, want);
        assert_eq!(FrameHeader::decode(&b), Ok(Ok(f.clone())));
        assert_eq!(f.frame_len(), 192);
    }

    #[test]
    fn frame_decode_rejects_damage() {
        let f = FrameHeader::new(
            0,
            1,
            vec![
                ChunkEntry {
                    blake3: [1; 32],
                    stored_len: 10,
                    raw_len: 10,
                };
                3
            ],
        );
        let b = f.encode();
        for i in 0..(64 + 48 * 3) {
            let mut c = b.clone();
            c[i] ^= 0x40;
            assert!(
                !matches!(FrameHeader::decode(&c), Ok(Ok(ref g)) if *g == f),
                "flip at {i} accepted"
            );
        }
        assert_eq!(FrameHeader::decode(&b[..64]), Ok(Err(64 + 48 * 3)));
    }

    /// Padded frames (issue 13): the payload starts on a page wherever the frame starts, the
    /// header stays a valid one (a multiple of 64, at least the table), a frame's capacity
    /// counts the padding, and near the format's cap on a header it is left unpadded.
    #[test]
    fn padded_headers_start_payloads_on_a_page_and_decode() {
        for start in [4096u64, 4096 + 64, 4096 + 4032, 1 << 20, (1 << 20) + 3136] {
            for n in [1usize, 2, 64, 85, 1000] {
                let at = FrameAt { start, pad: true };
                let h = at.header_len(n);
                assert!((start + h).is_multiple_of(PAYLOAD_ALIGN), "{start} {n} {h}");
                assert!(h >= header_len_for(n) && h.is_multiple_of(FRAME_ALIGN));
                assert!(h < header_len_for(n) + PAYLOAD_ALIGN);
                assert!(at.end(n, 5) - start <= frame_len_at_most(true, n, 5));
                let unpadded = FrameAt { start, pad: false };
                assert_eq!(unpadded.header_len(n), header_len_for(n));
                let entry = ChunkEntry {
                    blake3: [7; 32],
                    stored_len: 9,
                    raw_len: 9,
                };
                let mut f = FrameHeader::new(0, 1, vec![entry; n]);
                f.header_len = h;
                assert_eq!(FrameHeader::decode(&f.encode()), Ok(Ok(f.clone())));
            }
        }
        let at = FrameAt {
            start: 4096 + 64,
            pad: true,
        };
        assert_eq!(
            at.header_len(MAX_FRAME_CHUNKS),
            header_len_for(MAX_FRAME_CHUNKS)
        );
        // Three 4 KiB chunks fit in 12 544 bytes behind an unpadded header, two behind a
        // padded one.
        let max = at.start + 12_544;
        assert_eq!(frame_capacity(at, max, 1 << 20, 4096, 0), 2);
        assert_eq!(
            frame_capacity(FrameAt { pad: false, ..at }, max, 1 << 20, 4096, 0),
            3
        );
        // Raw runs of 64 KiB and more are padded; smaller or compressed ones are not.
        assert!(pads(0, PAD_MIN_RUN_BYTES));
        assert!(!pads(0, PAD_MIN_RUN_BYTES - 1));
        assert!(!pads(1, 1 << 30));
    }

    /// A writer may reserve table space it then does not use; the header length says where
    /// the payload starts, and decoding keeps it.
    #[test]
    fn reserved_table_space_round_trips() {
        let mut f = FrameHeader::new(
            0,
            2,
            vec![ChunkEntry {
                blake3: [7; 32],
                stored_len: 9,
                raw_len: 9,
            }],
        );
        f.header_len = header_len_for(10);
        let b = f.encode();
        assert_eq!(b.len() as u64, header_len_for(10));
        assert!(b[112..].iter().all(|&x| x == 0));
        assert_eq!(FrameHeader::decode(&b), Ok(Ok(f.clone())));
        assert_eq!(f.frame_len(), align_up(header_len_for(10) + 9));
        // Not a multiple of 64, or shorter than the table: corrupt.
        for bad in [f.min_header_len() - 64, header_len_for(10) + 8] {
            let mut c = b.clone();
            c[12..16].copy_from_slice(&(bad as u32).to_le_bytes());
            let crc = crc32c::crc32c_append(crc32c::crc32c(&c[0..60]), &c[64..112]);
            c[60..64].copy_from_slice(&crc.to_le_bytes());
            assert!(
                FrameHeader::decode(&c).is_err(),
                "header_len {bad} accepted"
            );
        }
    }

    /// Regression (fuzz target segment_frame, seed corpus/segment_frame/regress-frame-len-overflow):
    /// a CRC-valid frame whose payload length was near u64::MAX decoded, and `frame_len()` then
    /// overflowed (a panic in debug builds, a wrong, small length in release ones).
    #[test]
    fn regression_payload_length_near_u64_max_overflowed_frame_len() {
        let f = FrameHeader::new(
            0,
            1,
            vec![ChunkEntry {
                blake3: [0; 32],
                stored_len: u64::MAX - 100,
                raw_len: u64::MAX - 100,
            }],
        );
        let mut b = vec![0u8; 128];
        b[0..4].copy_from_slice(FRAME_MAGIC);
        b[4] = FRAME_VERSION;
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        b[12..16].copy_from_slice(&128u32.to_le_bytes());
        b[16..24].copy_from_slice(&(u64::MAX - 100).to_le_bytes());
        b[24..32].copy_from_slice(&1u64.to_le_bytes());
        b[96..104].copy_from_slice(&f.chunks[0].stored_len.to_le_bytes());
        b[104..112].copy_from_slice(&f.chunks[0].raw_len.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[0..60]), &b[64..112]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            FrameHeader::decode(&b),
            Err(DecodeError::Corrupt(_))
        ));
    }
}
