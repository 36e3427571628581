//! The commit trailer: a copy of a transaction's commit record after the frames of its
//! segment, so that the segments alone can rebuild the store when the WAL and `CURRENT` are
//! lost (docs/FORMAT.md, "Commit trailer"; feature `segment-commit-trailer`, compatible).
//!
//! Written at the segment's committed length (the end of its last frame, a multiple of 64),
//! past what the commit record says the segment holds, so a build that does not know it reads
//! the segment exactly as before:
//! ```text
//! 0  magic "CKPTTRL\0"   8  version u16 = 1   10 kind u16 = 1 (commit)
//! 12 payload_len u32     16 segment_id u64    24 crc32c(payload) u32
//! 28 crc32c(bytes 0..28) u32                  32 payload: a CommitRecord (protobuf)
//! ```
//! And [`walk`] reads a segment file's frames and trailer without reading its payloads.

use super::{align_up, decode_header, ChunkEntry, DecodeError, FrameHeader, FRAME_FIXED_LEN};
use super::{SEGMENT_DATA_OFFSET, SEGMENT_VERSION};
use crate::io::StorageFile;
use crate::le;
use crate::wal::MAX_RECORD_LEN;

const TRAILER_MAGIC: &[u8; 8] = b"CKPTTRL\0";
const TRAILER_VERSION: u16 = 1;
/// Kind of trailer that holds a commit record.
const KIND_COMMIT: u16 = 1;
/// Fixed part of a trailer.
pub const TRAILER_HEADER_LEN: usize = 32;

/// Encodes the trailer of segment `segment_id` holding the encoded commit record `payload`.
pub fn encode(segment_id: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; TRAILER_HEADER_LEN];
    b[0..8].copy_from_slice(TRAILER_MAGIC);
    b[8..10].copy_from_slice(&TRAILER_VERSION.to_le_bytes());
    b[10..12].copy_from_slice(&KIND_COMMIT.to_le_bytes());
    b[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    b[16..24].copy_from_slice(&segment_id.to_le_bytes());
    b[24..28].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let crc = crc32c::crc32c(&b[0..28]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    b.extend_from_slice(payload);
    b
}

/// Decodes a trailer's fixed header: the payload length, if it is a valid commit trailer of
/// segment `segment_id`.
fn decode_header_of(b: &[u8], segment_id: u64) -> Option<(usize, u32)> {
    if b.len() < TRAILER_HEADER_LEN || &b[0..8] != TRAILER_MAGIC {
        return None;
    }
    if le::u32_at(b, 28) != crc32c::crc32c(&b[0..28]) {
        return None;
    }
    let version = u16::from_le_bytes([b[8], b[9]]);
    let kind = u16::from_le_bytes([b[10], b[11]]);
    let len = le::u32_at(b, 12);
    if version != TRAILER_VERSION
        || kind != KIND_COMMIT
        || len > MAX_RECORD_LEN
        || le::u64_at(b, 16) != segment_id
    {
        return None;
    }
    Some((len as usize, le::u32_at(b, 24)))
}

/// A chunk found in a segment's frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundChunk {
    /// Absolute offset of its payload.
    pub offset: u64,
    /// Codec of its frame.
    pub codec: u8,
    /// As listed in the frame's table.
    pub entry: ChunkEntry,
}

/// What a segment file holds, read from its header, frame headers and trailer.
#[derive(Debug, Clone, Default)]
pub struct Walked {
    /// Every chunk of every valid frame.
    pub chunks: Vec<FoundChunk>,
    /// End of the last valid frame: the length a commit made durable.
    pub frames_end: u64,
    /// The commit record of its trailer, if one follows the frames and validates.
    pub trailer: Option<Vec<u8>>,
}

/// Why a segment could not be walked at all.
#[derive(Debug)]
pub enum WalkError {
    /// Its header is damaged, of a newer version, or names another segment.
    Header(String),
    /// A read failed.
    Io(std::io::Error),
}

/// Reads segment `id`'s frames (headers and tables only) from 4096 up to the first offset
/// that is no valid frame, then the trailer there, if any. A damaged frame ends the walk: what
/// follows it is not read (its chunks are not found; rebuild says which checkpoints that
/// leaves without their chunks).
pub fn walk(file: &dyn StorageFile, id: u64) -> Result<Walked, WalkError> {
    let len = file.len().map_err(WalkError::Io)?;
    let mut head = [0u8; 32];
    if len < SEGMENT_DATA_OFFSET {
        return Err(WalkError::Header(format!(
            "{len} bytes, shorter than a header"
        )));
    }
    file.read_at(&mut head, 0).map_err(WalkError::Io)?;
    match decode_header(&head) {
        Ok(found) if found == id => {}
        Ok(found) => return Err(WalkError::Header(format!("header names segment {found}"))),
        Err(DecodeError::Corrupt(why)) => return Err(WalkError::Header(why.to_string())),
        Err(DecodeError::NewerVersion(v)) => {
            return Err(WalkError::Header(format!(
                "segment version {v}, newer than {SEGMENT_VERSION}"
            )))
        }
    }
    let mut out = Walked {
        frames_end: SEGMENT_DATA_OFFSET,
        ..Default::default()
    };
    let mut at = SEGMENT_DATA_OFFSET;
    while let Some(h) = read_frame_header(file, at, len).map_err(WalkError::Io)? {
        if h.segment_id != id {
            break;
        }
        let next = at + h.frame_len();
        if next > len {
            break;
        }
        let mut off = at + h.header_len();
        for e in &h.chunks {
            out.chunks.push(FoundChunk {
                offset: off,
                codec: h.codec,
                entry: *e,
            });
            off += e.stored_len;
        }
        at = next;
        out.frames_end = at;
    }
    out.trailer = read_trailer(file, at, len, id).map_err(WalkError::Io)?;
    Ok(out)
}

fn read_frame_header(
    file: &dyn StorageFile,
    at: u64,
    len: u64,
) -> std::io::Result<Option<FrameHeader>> {
    if len - at < FRAME_FIXED_LEN as u64 {
        return Ok(None);
    }
    let mut b = vec![0u8; FRAME_FIXED_LEN];
    file.read_at(&mut b, at)?;
    let need = match FrameHeader::decode(&b) {
        Ok(Ok(h)) => return Ok(Some(h)),
        Ok(Err(need)) => need,
        Err(_) => return Ok(None),
    };
    if need as u64 > len - at {
        return Ok(None);
    }
    b.resize(need, 0);
    file.read_at(&mut b, at)?;
    Ok(FrameHeader::decode(&b).ok().and_then(Result::ok))
}

fn read_trailer(
    file: &dyn StorageFile,
    at: u64,
    len: u64,
    id: u64,
) -> std::io::Result<Option<Vec<u8>>> {
    if at != align_up(at) || len - at < TRAILER_HEADER_LEN as u64 {
        return Ok(None);
    }
    let mut h = [0u8; TRAILER_HEADER_LEN];
    file.read_at(&mut h, at)?;
    let Some((n, crc)) = decode_header_of(&h, id) else {
        return Ok(None);
    };
    if (n as u64) > len - at - TRAILER_HEADER_LEN as u64 {
        return Ok(None);
    }
    let mut payload = vec![0u8; n];
    file.read_at(&mut payload, at + TRAILER_HEADER_LEN as u64)?;
    Ok((crc32c::crc32c(&payload) == crc).then_some(payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins the trailer layout to docs/FORMAT.md.
    #[test]
    fn golden_bytes() {
        let b = encode(7, b"\x0a\x00");
        let mut want = b"CKPTTRL\0".to_vec();
        want.extend_from_slice(&[1, 0, 1, 0]); // version 1, kind 1 (commit)
        want.extend_from_slice(&[2, 0, 0, 0]); // payload length
        want.extend_from_slice(&7u64.to_le_bytes());
        want.extend_from_slice(&crc32c::crc32c(b"\x0a\x00").to_le_bytes());
        let crc = crc32c::crc32c(&want);
        want.extend_from_slice(&crc.to_le_bytes());
        want.extend_from_slice(b"\x0a\x00");
        assert_eq!(b, want);
        assert_eq!(decode_header_of(&b, 7).map(|x| x.0), Some(2));
        assert_eq!(decode_header_of(&b, 8), None, "another segment's trailer");
        let mut bad = b.clone();
        bad[13] ^= 1;
        assert_eq!(decode_header_of(&bad, 7), None);
    }
}
