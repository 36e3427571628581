//! The framing underneath: CRC-32 as zlib computes it, the position-tracking reader of
//! protobuf framing, and varints for the writer.

use super::{bad_wire_type, io_err, FormatError, CRC_MAGIC, CRC_TRAILER_LEN, READ_SKIP_MAX};
use std::io::{Read, Seek, SeekFrom};

const fn crc_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut s = 1;
        while s < 8 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xFF) as usize];
            s += 1;
        }
        i += 1;
    }
    t
}

static CRC_TABLES: [[u32; 256]; 8] = crc_tables();

/// CRC-32 as zlib and Python's `binascii.crc32` compute it, fed incrementally.
#[derive(Debug, Clone, Copy, Default)]
pub struct Crc32(u32);

impl Crc32 {
    /// A fresh CRC (of no bytes: 0).
    pub fn new() -> Self {
        Crc32(0)
    }

    /// Feeds `data`.
    pub fn update(&mut self, data: &[u8]) {
        let t = &CRC_TABLES;
        let mut c = !self.0;
        let mut chunks = data.chunks_exact(8);
        for b in &mut chunks {
            let lo = c ^ u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            c = t[7][(lo & 0xFF) as usize]
                ^ t[6][((lo >> 8) & 0xFF) as usize]
                ^ t[5][((lo >> 16) & 0xFF) as usize]
                ^ t[4][(lo >> 24) as usize]
                ^ t[3][b[4] as usize]
                ^ t[2][b[5] as usize]
                ^ t[1][b[6] as usize]
                ^ t[0][b[7] as usize];
        }
        for &b in chunks.remainder() {
            c = t[0][((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8);
        }
        self.0 = !c;
    }

    /// The CRC of everything fed so far.
    pub fn value(&self) -> u32 {
        self.0
    }
}

/// The 17-byte trailer MindSpore's `crc_check=True` appends.
pub(crate) fn crc_trailer(crc: u32) -> [u8; CRC_TRAILER_LEN as usize] {
    let mut t = [0u8; CRC_TRAILER_LEN as usize];
    t[..7].copy_from_slice(CRC_MAGIC);
    t[13..].copy_from_slice(&crc.to_be_bytes());
    t
}

/// Reads framing: a position-tracking reader over `[.., end)` windows.
pub(super) struct Wire<'r, R> {
    pub(super) r: &'r mut R,
    pub(super) pos: u64,
}

impl<R: Read + Seek> Wire<'_, R> {
    pub(super) fn need(
        &self,
        what: &'static str,
        need: u64,
        end: u64,
        scope: &'static str,
    ) -> Result<(), FormatError> {
        let left = end.saturating_sub(self.pos);
        if need > left {
            return Err(FormatError::Truncated {
                what,
                at: self.pos,
                need,
                left,
                scope,
            });
        }
        Ok(())
    }

    pub(super) fn byte(&mut self, end: u64, scope: &'static str) -> Result<u8, FormatError> {
        self.need("varint", 1, end, scope)?;
        let mut b = [0u8; 1];
        self.r.read_exact(&mut b).map_err(io_err("read"))?;
        self.pos += 1;
        Ok(b[0])
    }

    pub(super) fn varint(&mut self, end: u64, scope: &'static str) -> Result<u64, FormatError> {
        let at = self.pos;
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.byte(end, scope)?;
            if i == 9 && b > 1 {
                break; // bits past 64
            }
            v |= u64::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(FormatError::BadVarint { at })
    }

    /// A field key: `(field number, wire type)`, refused as protobuf refuses it (a key over
    /// 32 bits, field number 0, wire type 6 or 7).
    pub(super) fn key(
        &mut self,
        message: &'static str,
        end: u64,
        scope: &'static str,
    ) -> Result<(u64, u64), FormatError> {
        let at = self.pos;
        let key = self.varint(end, scope)?;
        let (field, wire_type) = (key >> 3, key & 7);
        if key > u64::from(u32::MAX) || field == 0 || wire_type > 5 {
            return Err(bad_wire_type(message, field, wire_type, at));
        }
        Ok((field, wire_type))
    }

    /// A length-delimited field's length, checked against `end`.
    pub(super) fn len(
        &mut self,
        what: &'static str,
        end: u64,
        scope: &'static str,
    ) -> Result<u64, FormatError> {
        let len = self.varint(end, scope)?;
        self.need(what, len, end, scope)?;
        Ok(len)
    }

    pub(super) fn bytes(&mut self, len: u64) -> Result<Vec<u8>, FormatError> {
        // `len` was checked against the file by `len` (and against a cap by the caller).
        let mut v = vec![0u8; len as usize];
        self.r.read_exact(&mut v).map_err(io_err("read"))?;
        self.pos += len;
        Ok(v)
    }

    pub(super) fn string(
        &mut self,
        what: &'static str,
        len: u64,
        max: u64,
    ) -> Result<String, FormatError> {
        let at = self.pos;
        if len > max {
            return Err(FormatError::TooLong { what, at, len, max });
        }
        String::from_utf8(self.bytes(len)?).map_err(|_| FormatError::NotUtf8 { what, at })
    }

    pub(super) fn skip(&mut self, len: u64) -> Result<(), FormatError> {
        if len <= READ_SKIP_MAX {
            let n = std::io::copy(&mut (&mut *self.r).take(len), &mut std::io::sink())
                .map_err(io_err("read"))?;
            if n != len {
                return Err(io_err("read")(std::io::ErrorKind::UnexpectedEof.into()));
            }
        } else {
            self.r
                .seek(SeekFrom::Start(self.pos + len))
                .map_err(io_err("seek"))?;
        }
        self.pos += len;
        Ok(())
    }

    /// Skips an unknown field of wire type `wt`.
    pub(super) fn skip_field(
        &mut self,
        message: &'static str,
        field: u64,
        wt: u64,
        at: u64,
        end: u64,
        scope: &'static str,
    ) -> Result<(), FormatError> {
        match wt {
            0 => {
                self.varint(end, scope)?;
            }
            1 => {
                self.need("fixed64", 8, end, scope)?;
                self.skip(8)?;
            }
            2 => {
                let len = self.len("field", end, scope)?;
                self.skip(len)?;
            }
            5 => {
                self.need("fixed32", 4, end, scope)?;
                self.skip(4)?;
            }
            _ => return Err(bad_wire_type(message, field, wt, at)),
        }
        Ok(())
    }
}

pub(super) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(super) fn varint_len(v: u64) -> u64 {
    (64 - v.max(1).leading_zeros() as u64).div_ceil(7)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_len_agrees_with_put_varint() {
        for v in [0, 1, 127, 128, 16_383, 16_384, u32::MAX as u64, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(b.len() as u64, varint_len(v), "{v}");
        }
    }
}
