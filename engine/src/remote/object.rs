//! The commit object: one immutable object `log/<seq>` holding a store's whole live state (the
//! records of a compacted WAL, framed exactly as in a WAL file) and the map from segment ids to
//! segment objects. Byte layout in docs/FORMAT.md ("Commit objects"); all integers little-endian.
//!
//! ```text
//! 0   8  magic "CKPTLOG\0"
//! 8   2  format version (1)
//! 10  2  reserved, zero
//! 12  8  incompatible feature bits: a reader refuses an object with a bit it does not know
//! 20  8  compatible feature bits: a reader may ignore the ones it does not know
//! 28  8  sequence number (equals the one in the object's name)
//! 36  4  salt of the record checksums
//! 40  4  segment count N
//! 44     N x { id u64, length u64, key length u16, key bytes (relative to the prefix) }
//! ...    WAL records (wal::encode_record with the salt), to 4 bytes before the end
//! end-4  CRC32C of every byte before it
//! ```

use crate::error::{Error, Result};
use crate::le;
use crate::wal::{self, RecordType};
use std::collections::BTreeMap;

/// First bytes of every commit object.
pub const COMMIT_MAGIC: &[u8; 8] = b"CKPTLOG\0";
/// The commit object format this build writes and reads.
pub const COMMIT_VERSION: u16 = 1;
/// Incompatible feature bits this build knows, with their names (none yet: the table a future
/// feature extends, so an older reader refuses a newer object by the feature's name).
const KNOWN_INCOMPAT: &[(u64, &str)] = &[];
/// Names of incompatible features some later build may set, so that this build can name them
/// when it refuses an object (a bit not listed here is named by its number).
const FUTURE_INCOMPAT_NAMES: &[(u64, &str)] = &[(1, "encryption"), (2, "incremental-log")];

const FIXED: usize = 44;

/// A segment as the commit object names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentObject {
    /// Key relative to the store's prefix.
    pub key: String,
    /// Bytes (the segment's committed length).
    pub len: u64,
}

/// A decoded commit object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitObject {
    /// Its sequence number.
    pub seq: u64,
    /// Segment id → object.
    pub segments: BTreeMap<u64, SegmentObject>,
    /// The state: a snapshot record, one commit record per live checkpoint, pin records.
    pub records: Vec<(RecordType, Vec<u8>)>,
}

impl CommitObject {
    /// The object's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let salt = u32::from_le_bytes(
            blake3::hash(&self.seq.to_le_bytes()).as_bytes()[..4]
                .try_into()
                .unwrap_or([0; 4]),
        );
        let mut b = Vec::with_capacity(FIXED + 64 * self.segments.len());
        b.extend_from_slice(COMMIT_MAGIC);
        b.extend_from_slice(&COMMIT_VERSION.to_le_bytes());
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&self.seq.to_le_bytes());
        b.extend_from_slice(&salt.to_le_bytes());
        b.extend_from_slice(&(self.segments.len() as u32).to_le_bytes());
        for (id, s) in &self.segments {
            b.extend_from_slice(&id.to_le_bytes());
            b.extend_from_slice(&s.len.to_le_bytes());
            b.extend_from_slice(&(s.key.len() as u16).to_le_bytes());
            b.extend_from_slice(s.key.as_bytes());
        }
        for (ty, payload) in &self.records {
            wal::encode_record(&mut b, salt, *ty, payload);
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes object `name` (for errors); refuses a newer version or unknown incompatible
    /// features by name, and any damage.
    pub fn decode(name: &str, b: &[u8]) -> Result<CommitObject> {
        let bad = |reason: String| Error::BadCommitObject {
            name: name.into(),
            reason,
        };
        if b.len() < FIXED + 4 || &b[..8] != COMMIT_MAGIC {
            return Err(bad(
                "not a ckptstore commit object (bad magic or too short)".into(),
            ));
        }
        let (body, tail) = b.split_at(b.len() - 4);
        if le::u32_at(tail, 0) != crc32c::crc32c(body) {
            return Err(bad("checksum mismatch: the commit object is damaged".into()));
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version > COMMIT_VERSION {
            return Err(Error::UnsupportedVersion {
                path: name.into(),
                found: version as u32,
                supported: COMMIT_VERSION as u32,
            });
        }
        let incompat = le::u64_at(b, 12);
        let known: u64 = KNOWN_INCOMPAT
            .iter()
            .map(|(bit, _)| bit)
            .fold(0, |a, b| a | b);
        let unknown = incompat & !known;
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .map(|i| 1u64 << i)
                .filter(|bit| unknown & bit != 0)
                .map(|bit| {
                    FUTURE_INCOMPAT_NAMES
                        .iter()
                        .find(|(b, _)| *b == bit)
                        .map_or_else(
                            || format!("bit {}", bit.trailing_zeros()),
                            |(_, n)| n.to_string(),
                        )
                })
                .collect();
            return Err(bad(format!(
                "written with feature(s) this build does not support: {}; upgrade ckptstore",
                names.join(", ")
            )));
        }
        let seq = le::u64_at(b, 28);
        let salt = le::u32_at(b, 36);
        let count = le::u32_at(b, 40) as usize;
        let mut at = FIXED;
        let mut segments = BTreeMap::new();
        for _ in 0..count {
            if at + 18 > body.len() {
                return Err(bad("segment table runs past the end".into()));
            }
            let id = le::u64_at(body, at);
            let len = le::u64_at(body, at + 8);
            let klen = u16::from_le_bytes([body[at + 16], body[at + 17]]) as usize;
            at += 18;
            let key = body
                .get(at..at + klen)
                .and_then(|k| std::str::from_utf8(k).ok())
                .ok_or_else(|| bad("bad segment key".into()))?;
            at += klen;
            segments.insert(
                id,
                SegmentObject {
                    key: key.to_string(),
                    len,
                },
            );
        }
        let frames = &body[at..];
        let scan = wal::scan_from(frames, 0, salt);
        if let Some(badrec) = scan.bad {
            return Err(bad(format!(
                "record at offset {} of the log: {}",
                badrec.offset, badrec.reason
            )));
        }
        let records = scan
            .records
            .into_iter()
            .map(|r| (r.ty, frames[r.payload].to_vec()))
            .collect();
        Ok(CommitObject {
            seq,
            segments,
            records,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CommitObject {
        CommitObject {
            seq: 7,
            segments: [(
                3,
                SegmentObject {
                    key: "segments/t/00000003.seg".into(),
                    len: 4242,
                },
            )]
            .into(),
            records: vec![
                (RecordType::Snapshot, vec![1, 2, 3]),
                (RecordType::Commit, vec![9; 100]),
            ],
        }
    }

    #[test]
    fn round_trips() {
        let o = sample();
        assert_eq!(CommitObject::decode("log/7", &o.encode()).unwrap(), o);
    }

    #[test]
    fn any_flipped_byte_is_refused() {
        let b = sample().encode();
        for i in 0..b.len() {
            let mut d = b.clone();
            d[i] ^= 0x40;
            assert!(CommitObject::decode("log/7", &d).is_err(), "byte {i}");
        }
        assert!(CommitObject::decode("log/7", &b[..b.len() - 1]).is_err());
    }

    fn with_header(mut b: Vec<u8>, at: usize, bytes: &[u8]) -> Vec<u8> {
        b.truncate(b.len() - 4);
        b[at..at + bytes.len()].copy_from_slice(bytes);
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn newer_version_and_unknown_features_are_refused_by_name() {
        let b = with_header(sample().encode(), 8, &2u16.to_le_bytes());
        let e = CommitObject::decode("log/7", &b).unwrap_err();
        assert!(
            matches!(e, Error::UnsupportedVersion { found: 2, .. }),
            "{e}"
        );
        let b = with_header(sample().encode(), 12, &1u64.to_le_bytes());
        let e = CommitObject::decode("log/7", &b).unwrap_err().to_string();
        assert!(e.contains("encryption") && e.contains("upgrade"), "{e}");
        let b = with_header(sample().encode(), 12, &(1u64 << 40).to_le_bytes());
        let e = CommitObject::decode("log/7", &b).unwrap_err().to_string();
        assert!(e.contains("bit 40"), "{e}");
        // Compatible bits are ignored.
        let b = with_header(sample().encode(), 20, &(1u64 << 5).to_le_bytes());
        assert_eq!(CommitObject::decode("log/7", &b).unwrap(), sample());
    }
}
