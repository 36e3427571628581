//! The `CURRENT` pointer: names the live WAL file. Replaced only atomically (temp file, fsync,
//! rename, directory fsync), so a reader sees either the old or the new pointer, never a mix.
//!
//! Layout (24 bytes, little-endian; docs/FORMAT.md §CURRENT):
//! `magic "CKPTCUR\0" | version u16 | reserved u16 = 0 | wal_number u64 | crc32c(bytes 0..20) u32`

use crate::le;

/// File name of the pointer in the store directory.
pub const CURRENT_NAME: &str = "CURRENT";
/// Temporary name used while switching the pointer.
pub const CURRENT_TMP_NAME: &str = "CURRENT.tmp";
/// Size of the pointer file.
pub const CURRENT_LEN: usize = 24;
/// Highest CURRENT format version this build reads and the one it writes.
pub(crate) const CURRENT_VERSION: u16 = 1;
const MAGIC: &[u8; 8] = b"CKPTCUR\0";

/// Why a `CURRENT` file could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum CurrentDecodeError {
    /// Wrong length, magic or checksum.
    Corrupt,
    /// Written by a newer version.
    NewerVersion(u16),
}

/// Encodes a pointer to WAL file number `wal_number`.
pub fn encode(wal_number: u64) -> [u8; CURRENT_LEN] {
    let mut b = [0u8; CURRENT_LEN];
    b[0..8].copy_from_slice(MAGIC);
    b[8..10].copy_from_slice(&CURRENT_VERSION.to_le_bytes());
    b[12..20].copy_from_slice(&wal_number.to_le_bytes());
    let crc = crc32c::crc32c(&b[0..20]);
    b[20..24].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes a pointer, returning the WAL file number.
pub fn decode(b: &[u8]) -> Result<u64, CurrentDecodeError> {
    if b.len() != CURRENT_LEN || &b[0..8] != MAGIC {
        return Err(CurrentDecodeError::Corrupt);
    }
    let crc = le::u32_at(b, 20);
    if crc != crc32c::crc32c(&b[0..20]) {
        return Err(CurrentDecodeError::Corrupt);
    }
    let version = u16::from_le_bytes([b[8], b[9]]);
    if version > CURRENT_VERSION {
        return Err(CurrentDecodeError::NewerVersion(version));
    }
    Ok(le::u64_at(b, 12))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC-32C (Castagnoli) check value: pins the checksum algorithm every format uses.
    #[test]
    fn crc32c_is_castagnoli() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    /// Pins the byte layout documented in docs/FORMAT.md.
    #[test]
    fn golden_bytes() {
        let expected: [u8; 24] = [
            b'C', b'K', b'P', b'T', b'C', b'U', b'R', 0, // magic
            1, 0, // version
            0, 0, // reserved
            7, 0, 0, 0, 0, 0, 0, 0, // wal number 7
            0x1f, 0x74, 0x44, 0xef, // crc32c of the 20 bytes before
        ];
        assert_eq!(encode(7), expected);
        assert_eq!(decode(&expected), Ok(7));
    }

    #[test]
    fn rejects_flips_and_newer_versions() {
        let good = encode(3);
        for i in 0..CURRENT_LEN {
            let mut b = good;
            b[i] ^= 0x10;
            assert!(decode(&b).is_err(), "flip at byte {i} accepted");
        }
        let mut newer = good;
        newer[8] = 2;
        let crc = crc32c::crc32c(&newer[0..20]);
        newer[20..24].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&newer), Err(CurrentDecodeError::NewerVersion(2)));
        assert_eq!(decode(&good[..23]), Err(CurrentDecodeError::Corrupt));
    }
}
