//! The commit object: one immutable object `log/<seq>` holding a store's whole live state (the
//! records of a compacted WAL, framed exactly as in a WAL file) and the map from segment ids to
//! segment objects. Byte layout in docs/FORMAT.md ("Commit objects"); all integers little-endian.
//!
//! ```text
//! 0   8  magic "CKPTLOG\0"
//! 8   2  format version (1)
//! 10  2  compatible feature bits      } the store's format features, as a WAL header
//! 12  2  read-only-compatible bits    } declares them (engine/src/features.rs): unknown
//! 14  2  incompatible feature bits    } incompatible ones refuse the object, by name
//! 16 12  reserved, zero
//! 28  8  sequence number (equals the one in the object's name)
//! 36  4  salt of the record checksums
//! 40  4  segment count N
//! 44     N x { id u64, length u64, key length u16, key bytes (relative to the prefix) }
//! ...    WAL records (wal::encode_record with the salt), to 4 bytes before the end
//! end-4  CRC32C of every byte before it
//! ```

use crate::error::{Error, Result};
use crate::features::FeatureSet;
use crate::le;
use crate::wal::{self, RecordType};
use std::collections::BTreeMap;

/// First bytes of every commit object.
pub const COMMIT_MAGIC: &[u8; 8] = b"CKPTLOG\0";
/// The commit object format this build writes and reads.
pub const COMMIT_VERSION: u16 = 1;
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
    /// The store's format features.
    pub features: FeatureSet,
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
        b.extend_from_slice(&self.features.compat.to_le_bytes());
        b.extend_from_slice(&self.features.ro_compat.to_le_bytes());
        b.extend_from_slice(&self.features.incompat.to_le_bytes());
        b.extend_from_slice(&[0u8; 12]);
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
        let u16_at = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        let features = FeatureSet {
            compat: u16_at(10),
            ro_compat: u16_at(12),
            incompat: u16_at(14),
        };
        // Unknown incompatible features refuse the object here; read-only-compatible ones are
        // refused by a writer (`Publisher`) and by the open of a pulled store.
        if let Some(missing) = features.blocking(true) {
            return Err(Error::NewerFormat {
                path: name.into(),
                features: missing.names().join(", "),
                read_only_would_open: false,
            });
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
            features,
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
            features: FeatureSet::EMPTY,
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
        let b = with_header(sample().encode(), 14, &(1u16 << 9).to_le_bytes());
        let e = CommitObject::decode("log/7", &b).unwrap_err();
        assert!(matches!(e, Error::NewerFormat { .. }), "{e}");
        assert!(e.to_string().contains("incompatible feature bit 9"), "{e}");
        // Unknown compatible and read-only-compatible bits decode (a writer refuses the
        // latter); known ones are kept.
        let b = with_header(sample().encode(), 10, &(1u16 << 5 | 1).to_le_bytes());
        let o = CommitObject::decode("log/7", &b).unwrap();
        assert_eq!(o.features.compat, 1 << 5 | 1);
        let b = with_header(sample().encode(), 12, &(1u16 << 3).to_le_bytes());
        assert_eq!(
            CommitObject::decode("log/7", &b)
                .unwrap()
                .features
                .ro_compat,
            1 << 3
        );
    }
}
