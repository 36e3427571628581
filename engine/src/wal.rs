//! Write-ahead log framing: the file header, record frames, and the scanner that tells a torn
//! tail from corruption. (What the records mean is the store's business.)
//!
//! File header (32 bytes): `magic "CKPTWAL\0" | version u16 | compat features u16 | salt u32 |
//! file_number u64 | ro_compat features u16 | incompat features u16 | crc32c(bytes 0..28) u32`.
//! Version 1 when no read-only-compatible or incompatible feature is set (bytes 24..28 zero:
//! a build from before the feature flags reads it, ignoring the compatible bits), version 2
//! otherwise (such a build refuses it as a newer version). See crate::features.
//!
//! Record frame: `crc u32 | len u32 | type u8 | reserved [u8; 3] = 0 | payload[len]`, where
//! `crc = crc32c(salt_le ‖ bytes 4..12 of the frame ‖ payload)`. Type 0 is reserved so zeroed
//! space never validates; the salt (random per file) makes stale bytes of an older file fail.

use crate::features::FeatureSet;
use crate::le;

/// Size of the WAL file header.
pub const WAL_HEADER_LEN: usize = 32;
/// Size of a record frame header.
pub const RECORD_HEADER_LEN: usize = 12;
/// Largest payload a record may carry; a length above it is corruption, never an allocation.
pub const MAX_RECORD_LEN: u32 = 64 << 20;
/// Highest WAL format version this build reads. It writes version 1 unless the header carries a
/// read-only-compatible or incompatible feature bit, which only version 2 has room for.
pub(crate) const WAL_VERSION: u16 = 2;
const MAGIC: &[u8; 8] = b"CKPTWAL\0";

/// Record types. 0 is reserved and never valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordType {
    /// A committed checkpoint (`CommitRecord`).
    Commit = 1,
    /// Deleted checkpoints (`DeleteRecord`).
    Delete = 2,
    /// The whole live state; only ever the first record of a compacted file (`SnapshotRecord`).
    Snapshot = 3,
    /// A checkpoint pinned or unpinned (`PinRecord`). A reader older than this type refuses
    /// a WAL that holds one (a valid frame of an unknown type is corruption, never a tail).
    Pin = 4,
    /// Live chunks moved by segment compaction (`RelocateRecord`). Likewise refused by a
    /// reader older than this type.
    Relocate = 5,
    /// Chunks found bad, and references repointed at fresh copies (`QuarantineRecord`). Only
    /// in a WAL whose header declares `crate::features::QUARANTINE`.
    Quarantine = 6,
}

impl RecordType {
    fn from_u8(t: u8) -> Option<Self> {
        match t {
            1 => Some(Self::Commit),
            2 => Some(Self::Delete),
            3 => Some(Self::Snapshot),
            4 => Some(Self::Pin),
            5 => Some(Self::Relocate),
            6 => Some(Self::Quarantine),
            _ => None,
        }
    }
}

/// A decoded WAL file header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalHeader {
    /// Per-file random salt mixed into every record checksum.
    pub salt: u32,
    /// The number in the file name.
    pub file_number: u64,
    /// The format features the store uses (crate::features).
    pub features: FeatureSet,
}

/// Why a WAL header could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// Too short, bad magic, or bad checksum.
    Corrupt,
    /// Written by a newer version.
    NewerVersion(u16),
}

impl WalHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; WAL_HEADER_LEN] {
        let mut b = [0u8; WAL_HEADER_LEN];
        let f = self.features;
        let version: u16 = if f.ro_compat == 0 && f.incompat == 0 {
            1
        } else {
            2
        };
        b[0..8].copy_from_slice(MAGIC);
        b[8..10].copy_from_slice(&version.to_le_bytes());
        b[10..12].copy_from_slice(&f.compat.to_le_bytes());
        b[24..26].copy_from_slice(&f.ro_compat.to_le_bytes());
        b[26..28].copy_from_slice(&f.incompat.to_le_bytes());
        b[12..16].copy_from_slice(&self.salt.to_le_bytes());
        b[16..24].copy_from_slice(&self.file_number.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a header from the start of a file.
    pub fn decode(b: &[u8]) -> Result<Self, HeaderError> {
        if b.len() < WAL_HEADER_LEN || &b[0..8] != MAGIC {
            return Err(HeaderError::Corrupt);
        }
        if le32(&b[28..32]) != crc32c::crc32c(&b[0..28]) {
            return Err(HeaderError::Corrupt);
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version > WAL_VERSION {
            return Err(HeaderError::NewerVersion(version));
        }
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        // Version 1's bytes 24..28 were "reserved = 0": read as no feature, as every build
        // before the flags did.
        let (ro_compat, incompat) = match version {
            0 | 1 => (0, 0),
            _ => (u16_at(24), u16_at(26)),
        };
        Ok(WalHeader {
            salt: le32(&b[12..16]),
            file_number: le::u64_at(b, 16),
            features: FeatureSet {
                compat: u16_at(10),
                ro_compat,
                incompat,
            },
        })
    }
}

fn le32(b: &[u8]) -> u32 {
    le::u32_at(b, 0)
}

fn record_crc(salt: u32, frame_fields: &[u8], payload: &[u8]) -> u32 {
    let c = crc32c::crc32c(&salt.to_le_bytes());
    let c = crc32c::crc32c_append(c, frame_fields);
    crc32c::crc32c_append(c, payload)
}

/// Appends one framed record to `out`.
pub fn encode_record(out: &mut Vec<u8>, salt: u32, ty: RecordType, payload: &[u8]) {
    assert!(
        payload.len() <= MAX_RECORD_LEN as usize,
        "WAL record too large"
    );
    let mut fields = [0u8; 8];
    fields[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    fields[4] = ty as u8;
    out.extend_from_slice(&record_crc(salt, &fields, payload).to_le_bytes());
    out.extend_from_slice(&fields);
    out.extend_from_slice(payload);
}

/// A record found by [`scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScannedRecord {
    /// Offset of the frame in the file.
    pub offset: u64,
    /// Its type.
    pub ty: RecordType,
    /// Payload byte range within the scanned buffer.
    pub payload: std::ops::Range<usize>,
}

/// The first record that failed to validate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    /// Offset of the bad frame.
    pub offset: u64,
    /// Why it was rejected.
    pub reason: String,
    /// Whether the damage cannot be a torn tail: a valid frame exists anywhere after it, or it
    /// is itself a valid frame of an unknown type, or another whole frame follows it.
    pub valid_record_after: bool,
}

/// Result of scanning a WAL file's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// Valid records, in order, up to the first bad one.
    pub records: Vec<ScannedRecord>,
    /// End offset of the last valid record (where the next append goes).
    pub valid_end: u64,
    /// The first invalid frame, if the file does not end cleanly after the valid records.
    pub bad: Option<BadRecord>,
    /// Valid frames of a type this build does not know, skipped (offset, type): only when the
    /// scan was told the header declares a feature this build lacks that may write them
    /// ([`scan_with`]); otherwise such a frame is corruption.
    pub skipped_unknown: Vec<(u64, u8)>,
}

/// Why a frame did not validate.
enum FrameError {
    /// Malformed: too short, an invalid type, nonzero reserved bytes, a bad length. A torn
    /// write can look like this.
    Shape(String),
    /// Well-formed and complete, but the checksum does not match: a torn write, damage, or a
    /// record written with another file's salt. Carries the offset just after the frame.
    Checksum(usize),
    /// Well-formed, complete, and the checksum matches, but the type is one this build does not
    /// know: synced data from a newer version, never a torn write.
    UnknownType(u8),
}

/// The payload range of a well-formed frame at `at` (header inside `buf`, reserved bytes zero,
/// length within the cap and inside `buf`); the type byte is not checked.
fn frame_shape(buf: &[u8], at: usize) -> Result<std::ops::Range<usize>, String> {
    let rest = buf.len() - at;
    if rest < RECORD_HEADER_LEN {
        return Err(format!("{rest} bytes, shorter than a record header"));
    }
    let h = &buf[at..at + RECORD_HEADER_LEN];
    let len = le32(&h[4..8]);
    if h[9..12] != [0, 0, 0] {
        return Err("nonzero reserved bytes".into());
    }
    if len > MAX_RECORD_LEN {
        return Err(format!("length {len} above the {MAX_RECORD_LEN}-byte cap"));
    }
    let start = at + RECORD_HEADER_LEN;
    let end = start + len as usize;
    if end > buf.len() {
        return Err(format!("length {len} runs past the end of the file"));
    }
    Ok(start..end)
}

/// Validates the frame at `at`; returns (type, payload range, next offset) or why not.
fn check_frame(
    buf: &[u8],
    at: usize,
    salt: u32,
) -> Result<(RecordType, std::ops::Range<usize>, usize), FrameError> {
    let rest = buf.len() - at;
    if rest < RECORD_HEADER_LEN {
        return Err(FrameError::Shape(format!(
            "{rest} bytes, shorter than a record header"
        )));
    }
    let h = &buf[at..at + RECORD_HEADER_LEN];
    let shape = frame_shape(buf, at);
    let crc_ok =
        |p: &std::ops::Range<usize>| le32(&h[0..4]) == record_crc(salt, &h[4..12], &buf[p.clone()]);
    match (RecordType::from_u8(h[8]), shape) {
        // Type 0 never validates, whatever its checksum.
        (None, Ok(p)) if h[8] != 0 && crc_ok(&p) => Err(FrameError::UnknownType(h[8])),
        (None, _) => Err(FrameError::Shape(format!("record type {}", h[8]))),
        (Some(_), Err(why)) => Err(FrameError::Shape(why)),
        (Some(_), Ok(p)) if !crc_ok(&p) => Err(FrameError::Checksum(p.end)),
        (Some(ty), Ok(p)) => {
            let end = p.end;
            Ok((ty, p, end))
        }
    }
}

/// What the search for a valid frame after a bad one found.
enum After {
    /// A valid frame at this offset: the damage is not a torn tail.
    Valid(usize),
    /// None: a torn tail.
    None,
    /// The search ran out of its checksum budget (a tail crafted so that every few bytes
    /// claim a long record): not provably a torn tail, so it is treated as damage.
    GaveUp(u64),
}

fn search_after(reason: String, after: After) -> (String, bool) {
    match after {
        After::Valid(_) => (format!("{reason}; a valid record follows it"), true),
        After::None => (reason, false),
        After::GaveUp(hashed) => (
            format!(
                "{reason}; the search for a valid record after it stopped after checksumming \
                 {hashed} bytes (too many candidate frames to prove a torn tail)"
            ),
            true,
        ),
    }
}

/// Whether a valid frame starts at any offset after `bad`. Candidates are checked cheapest
/// first (shape, then checksum), and the checksums are budgeted: a crafted tail can make a
/// quarter of its offsets well-formed frames claiming up to [`MAX_RECORD_LEN`] bytes each, and
/// checking them all would cost O(tail × 64 MiB). The budget (twice the tail plus one largest
/// record) is far above what a torn record can need — a real tail has almost no well-formed
/// candidates — and bounds a hostile one to a few hundred MiB of checksumming.
fn valid_frame_after(buf: &[u8], bad: usize, salt: u32) -> After {
    let tail = (buf.len() - bad) as u64;
    let mut budget = SearchBudget(2 * tail + u64::from(MAX_RECORD_LEN));
    valid_frame_within(buf, bad, salt, &mut budget)
}

/// Bytes the torn-tail search may still checksum. One open searches once, with a budget of
/// its own; a salvage searches after every damaged record it skips, and shares one budget
/// across all of them ([`SearchBudget::for_file`]) — a fresh budget per search would let a
/// crafted WAL of many short damaged stretches cost O(stretches × budget).
#[derive(Debug, Clone, Copy)]
pub struct SearchBudget(u64);

impl SearchBudget {
    /// The budget of every search over a file of `len` bytes together: twice the file plus
    /// one largest record, as one search of the whole file gets.
    pub fn for_file(len: usize) -> Self {
        SearchBudget(2 * len as u64 + u64::from(MAX_RECORD_LEN))
    }
}

fn valid_frame_within(buf: &[u8], bad: usize, salt: u32, left: &mut SearchBudget) -> After {
    let budget = left.0;
    let mut hashed = 0u64;
    let mut p = bad + 1;
    while p + RECORD_HEADER_LEN <= buf.len() {
        if buf[p + 8] == 0 {
            // Type 0 never validates: jump to the next nonzero type byte (a zeroed tail — a
            // preallocated reserve a power cut kept — is crossed a word at a time).
            p = next_nonzero(buf, p + 8) - 8;
            continue;
        }
        let at = p;
        p += 1;
        let Some(range) = candidate(buf, at) else {
            continue;
        };
        hashed += range.len() as u64;
        if hashed > budget {
            left.0 = 0;
            return After::GaveUp(hashed - range.len() as u64);
        }
        left.0 = budget - hashed;
        let h = &buf[at..at + RECORD_HEADER_LEN];
        if le32(&h[0..4]) == record_crc(salt, &h[4..12], &buf[range]) {
            return After::Valid(at);
        }
    }
    After::None
}

/// The index of the first nonzero byte of `buf` at or after `from` (`buf.len()` if none),
/// eight bytes at a time where it can.
fn next_nonzero(buf: &[u8], from: usize) -> usize {
    let mut i = from;
    while i < buf.len() && !i.is_multiple_of(8) {
        if buf[i] != 0 {
            return i;
        }
        i += 1;
    }
    for w in buf[i.min(buf.len())..].chunks_exact(8) {
        if w != [0u8; 8] {
            break;
        }
        i += 8;
    }
    while i < buf.len() && buf[i] == 0 {
        i += 1;
    }
    i
}

/// The payload range of a frame at `at` worth checksumming in the search: a known type,
/// zero reserved bytes, a length within the cap and inside `buf`. [`frame_shape`] without the
/// reason: the search calls it at every offset of the tail, so it checks the type byte first
/// (a zeroed or filler stretch fails there at once) and allocates nothing.
fn candidate(buf: &[u8], at: usize) -> Option<std::ops::Range<usize>> {
    let h = buf.get(at..at.checked_add(RECORD_HEADER_LEN)?)?;
    if RecordType::from_u8(h[8]).is_none() || h[9..12] != [0, 0, 0] {
        return None;
    }
    let len = le32(&h[4..8]);
    if len > MAX_RECORD_LEN {
        return None;
    }
    let start = at + RECORD_HEADER_LEN;
    let end = start + len as usize;
    (end <= buf.len()).then_some(start..end)
}

/// The offset of the first valid frame of a known type after offset `bad`, within the same
/// checksum budget as the torn-tail search; `None` if there is none (or the budget ran out).
/// What a salvage resumes from.
pub fn resync(buf: &[u8], bad: u64, salt: u32) -> Option<u64> {
    match valid_frame_after(buf, bad as usize, salt) {
        After::Valid(p) => Some(p as u64),
        _ => None,
    }
}

/// [`resync`] drawing on a budget shared with the other searches of a salvage.
pub fn resync_within(buf: &[u8], bad: u64, salt: u32, budget: &mut SearchBudget) -> Option<u64> {
    match valid_frame_within(buf, bad as usize, salt, budget) {
        After::Valid(p) => Some(p as u64),
        _ => None,
    }
}

/// Whether the frame at `at` is whole and checksummed but of a type this build does not know:
/// a newer version's record, whose meaning later records may depend on (a salvage stops there
/// rather than skip it).
pub fn newer_record_at(buf: &[u8], at: u64, salt: u32) -> bool {
    matches!(
        check_frame(buf, at as usize, salt),
        Err(FrameError::UnknownType(_))
    )
}

/// Scans the records of a whole WAL file (`buf` starts with the file header).
///
/// Stops at the first frame that does not validate. Then it looks for any valid frame at any
/// later byte offset: each commit appends one record and syncs, so a crash can only damage the
/// one unsynced record at the end; a valid frame after a bad one means synced data was damaged.
/// Two more signs of damage rather than a torn write: a frame whose checksum is valid but whose
/// type is unknown (a record of a newer version), and a whole frame with a bad checksum followed
/// by another whole frame (more than one record would have been in flight, e.g. records copied
/// from a WAL with another salt).
pub fn scan(buf: &[u8], salt: u32) -> Scan {
    scan_from(buf, WAL_HEADER_LEN as u64, salt)
}

/// [`scan`] from offset `start` (a frame boundary, e.g. from [`resync`]).
pub fn scan_from(buf: &[u8], start: u64, salt: u32) -> Scan {
    scan_impl(buf, start, salt, false, None)
}

/// [`scan_from`]; with `skip_unknown` (the header declares a compatible or read-only-compatible
/// feature this build lacks: `FeatureSet::may_hold_unknown_records`), a valid frame of an
/// unknown type is that feature's record and is skipped, not corruption.
pub fn scan_with(buf: &[u8], start: u64, salt: u32, skip_unknown: bool) -> Scan {
    scan_impl(buf, start, salt, skip_unknown, None)
}

/// [`scan_with`] whose torn-tail search draws on a budget shared with the other searches of a
/// salvage (see [`SearchBudget`]).
pub fn scan_from_within(
    buf: &[u8],
    start: u64,
    salt: u32,
    skip_unknown: bool,
    budget: &mut SearchBudget,
) -> Scan {
    scan_impl(buf, start, salt, skip_unknown, Some(budget))
}

/// The scan; the search after a bad frame has a budget of its own unless one is given.
fn scan_impl(
    buf: &[u8],
    start: u64,
    salt: u32,
    skip_unknown: bool,
    budget: Option<&mut SearchBudget>,
) -> Scan {
    let mut records = Vec::new();
    let mut skipped_unknown = Vec::new();
    let mut at = (start as usize).min(buf.len());
    loop {
        if at == buf.len() {
            return Scan {
                records,
                valid_end: at as u64,
                bad: None,
                skipped_unknown,
            };
        }
        if skip_unknown {
            if let (Err(FrameError::UnknownType(t)), Ok(p)) =
                (check_frame(buf, at, salt), frame_shape(buf, at))
            {
                skipped_unknown.push((at as u64, t));
                at = p.end;
                continue;
            }
        }
        match check_frame(buf, at, salt) {
            Ok((ty, payload, next)) => {
                records.push(ScannedRecord {
                    offset: at as u64,
                    ty,
                    payload,
                });
                at = next;
            }
            Err(e) => {
                let any_valid_after = || match budget {
                    Some(b) => valid_frame_within(buf, at, salt, b),
                    None => valid_frame_after(buf, at, salt),
                };
                let (reason, valid_record_after) = match e {
                    FrameError::UnknownType(t) => (
                        format!(
                            "record type {t} with a valid checksum, of no feature the WAL \
                             header declares (a build that adds a record type declares a \
                             feature for it: docs/FORMAT.md)"
                        ),
                        true,
                    ),
                    FrameError::Checksum(next)
                        if next < buf.len()
                            && frame_shape(buf, next).is_ok()
                            && RecordType::from_u8(buf[next + 8]).is_some() =>
                    {
                        (
                            "checksum mismatch, and another whole record follows it (damaged \
                             synced data, or records written with another WAL file's salt)"
                                .to_string(),
                            true,
                        )
                    }
                    FrameError::Checksum(_) => {
                        search_after("checksum mismatch".into(), any_valid_after())
                    }
                    FrameError::Shape(why) => search_after(why, any_valid_after()),
                };
                return Scan {
                    records,
                    valid_end: at as u64,
                    bad: Some(BadRecord {
                        offset: at as u64,
                        reason,
                        valid_record_after,
                    }),
                    skipped_unknown,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(salt: u32, recs: &[(RecordType, &[u8])]) -> Vec<u8> {
        let mut b = WalHeader {
            salt,
            file_number: 1,
            features: FeatureSet::EMPTY,
        }
        .encode()
        .to_vec();
        for (t, p) in recs {
            encode_record(&mut b, salt, *t, p);
        }
        b
    }

    /// Pins header and frame layout to docs/FORMAT.md.
    #[test]
    fn golden_bytes() {
        let h = WalHeader {
            salt: 0x0403_0201,
            file_number: 2,
            features: FeatureSet::EMPTY,
        };
        let mut expected = Vec::new();
        expected.extend_from_slice(b"CKPTWAL\0");
        expected.extend_from_slice(&[1, 0, 0, 0]); // version 1, flags 0
        expected.extend_from_slice(&[1, 2, 3, 4]); // salt
        expected.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0]); // file number
        expected.extend_from_slice(&[0, 0, 0, 0]); // reserved
        let crc = crc32c::crc32c(&expected);
        expected.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(h.encode().to_vec(), expected);

        let mut rec = Vec::new();
        encode_record(&mut rec, 0x0403_0201, RecordType::Delete, b"\x0a\x01\x05");
        let fields = [3u8, 0, 0, 0, 2, 0, 0, 0];
        let mut crc_input = vec![1u8, 2, 3, 4];
        crc_input.extend_from_slice(&fields);
        crc_input.extend_from_slice(b"\x0a\x01\x05");
        let mut want = crc32c::crc32c(&crc_input).to_le_bytes().to_vec();
        want.extend_from_slice(&fields);
        want.extend_from_slice(b"\x0a\x01\x05");
        assert_eq!(rec, want);
        // And the value itself, so a change of CRC polynomial or seed is caught too.
        assert_eq!(&rec[0..4], &0x352a_4c73u32.to_le_bytes());
    }

    #[test]
    fn scan_clean_file() {
        let b = file_with(
            9,
            &[(RecordType::Commit, b"abc"), (RecordType::Delete, b"")],
        );
        let s = scan(&b, 9);
        assert_eq!(s.records.len(), 2);
        assert_eq!(s.bad, None);
        assert_eq!(s.valid_end, b.len() as u64);
        assert_eq!(&b[s.records[0].payload.clone()], b"abc");
    }

    #[test]
    fn torn_tail_at_every_offset_is_a_tail() {
        let full = file_with(
            5,
            &[
                (RecordType::Commit, b"first"),
                (RecordType::Commit, b"second record"),
            ],
        );
        let first_end = WAL_HEADER_LEN + RECORD_HEADER_LEN + 5;
        for cut in first_end + 1..full.len() {
            let s = scan(&full[..cut], 5);
            assert_eq!(s.records.len(), 1, "cut {cut}");
            let bad = s.bad.expect("torn record reported");
            assert_eq!(bad.offset, first_end as u64);
            assert!(!bad.valid_record_after, "cut {cut}");
        }
    }

    #[test]
    fn flipped_bit_before_tail_is_corruption() {
        let full = file_with(
            5,
            &[
                (RecordType::Commit, b"first"),
                (RecordType::Commit, b"second"),
            ],
        );
        for byte in WAL_HEADER_LEN..WAL_HEADER_LEN + RECORD_HEADER_LEN + 5 {
            let mut b = full.clone();
            b[byte] ^= 0x01;
            let s = scan(&b, 5);
            let bad = s.bad.expect("flip detected");
            assert_eq!(bad.offset, WAL_HEADER_LEN as u64);
            assert!(bad.valid_record_after, "flip at {byte}");
        }
    }

    #[test]
    fn zeroes_and_other_salts_never_validate() {
        let mut b = file_with(5, &[(RecordType::Commit, b"x")]);
        let end = b.len();
        b.extend_from_slice(&[0u8; 100]);
        let s = scan(&b, 5);
        assert_eq!(s.valid_end, end as u64);
        assert!(!s.bad.unwrap().valid_record_after);
        // Records of a file with another salt do not validate under this one.
        let other = file_with(6, &[(RecordType::Commit, b"x")]);
        assert_eq!(scan(&other, 5).records.len(), 0);
    }

    #[test]
    fn unknown_type_with_valid_crc_is_not_a_tail() {
        let mut b = file_with(5, &[(RecordType::Commit, b"x")]);
        let at = b.len();
        encode_record(&mut b, 5, RecordType::Commit, b"future");
        b[at + 8] = 9;
        let crc = record_crc(5, &b[at + 4..at + 12], b"future");
        b[at..at + 4].copy_from_slice(&crc.to_le_bytes());
        let s = scan(&b, 5);
        assert_eq!(s.records.len(), 1);
        let bad = s.bad.unwrap();
        assert!(
            bad.valid_record_after && bad.reason.contains("record type 9"),
            "{bad:?}"
        );
        // With a wrong checksum it is garbage like any other: a tail.
        b[at] ^= 1;
        assert!(!scan(&b, 5).bad.unwrap().valid_record_after);
    }

    #[test]
    fn records_of_another_salt_are_not_a_tail() {
        let two = [
            (RecordType::Commit, &b"a"[..]),
            (RecordType::Delete, &b"b"[..]),
        ];
        let mut b = file_with(5, &[]);
        b.extend_from_slice(&file_with(6, &two)[WAL_HEADER_LEN..]);
        let bad = scan(&b, 5).bad.unwrap();
        assert_eq!(bad.offset, WAL_HEADER_LEN as u64);
        assert!(bad.valid_record_after, "{bad:?}");
        // One whole record with a bad checksum at the end may be a torn write.
        let mut b = file_with(5, &[]);
        b.extend_from_slice(&file_with(6, &two[..1])[WAL_HEADER_LEN..]);
        assert!(!scan(&b, 5).bad.unwrap().valid_record_after);
    }

    #[test]
    fn huge_length_is_rejected_without_allocating() {
        let mut b = file_with(5, &[(RecordType::Commit, b"x")]);
        b[WAL_HEADER_LEN + 4..WAL_HEADER_LEN + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        let bad = scan(&b, 5).bad.unwrap();
        assert!(bad.reason.contains("cap"), "{}", bad.reason);
    }

    #[test]
    fn header_rejects_newer_version() {
        let mut h = WalHeader {
            salt: 1,
            file_number: 1,
            features: FeatureSet::EMPTY,
        }
        .encode();
        h[8] = 9;
        let crc = crc32c::crc32c(&h[0..28]);
        h[28..32].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(WalHeader::decode(&h), Err(HeaderError::NewerVersion(9)));
        assert_eq!(WalHeader::decode(&h[..10]), Err(HeaderError::Corrupt));
    }

    /// Pins the feature-flag layout to docs/FORMAT.md: compatible bits alone keep version 1
    /// (bytes 10..12, which builds before the flags ignore); a read-only-compatible or
    /// incompatible bit makes version 2, with those bits at 24..26 and 26..28.
    #[test]
    fn golden_bytes_feature_flags() {
        let compat_only = WalHeader {
            salt: 0x0403_0201,
            file_number: 2,
            features: FeatureSet {
                compat: 0x0005,
                ..FeatureSet::EMPTY
            },
        };
        let b = compat_only.encode();
        assert_eq!(&b[8..12], &[1, 0, 5, 0]);
        assert_eq!(&b[24..28], &[0, 0, 0, 0]);
        assert_eq!(WalHeader::decode(&b), Ok(compat_only));

        let all = WalHeader {
            features: FeatureSet {
                compat: 0x0001,
                ro_compat: 0x0102,
                incompat: 0x8004,
            },
            ..compat_only
        };
        let b = all.encode();
        assert_eq!(&b[8..12], &[2, 0, 1, 0]);
        assert_eq!(&b[24..28], &[2, 1, 4, 0x80]);
        assert_eq!(&b[28..32], &crc32c::crc32c(&b[0..28]).to_le_bytes());
        assert_eq!(WalHeader::decode(&b), Ok(all));

        // Version 1 bytes 24..28 (reserved, written 0) never read as features.
        let mut v1 = compat_only.encode();
        v1[26] = 1;
        let crc = crc32c::crc32c(&v1[0..28]);
        v1[28..32].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            WalHeader::decode(&v1).unwrap().features,
            compat_only.features
        );
    }

    #[test]
    fn unknown_records_are_skipped_only_when_asked() {
        let mut b = file_with(5, &[(RecordType::Commit, b"x")]);
        let at = b.len();
        encode_record(&mut b, 5, RecordType::Commit, b"future");
        b[at + 8] = 200;
        let crc = record_crc(5, &b[at + 4..at + 12], b"future");
        b[at..at + 4].copy_from_slice(&crc.to_le_bytes());
        encode_record(&mut b, 5, RecordType::Delete, b"y");
        let strict = scan(&b, 5);
        assert!(strict.bad.unwrap().valid_record_after);
        let lax = scan_with(&b, WAL_HEADER_LEN as u64, 5, true);
        assert_eq!(lax.bad, None);
        assert_eq!(lax.records.len(), 2);
        assert_eq!(lax.skipped_unknown, vec![(at as u64, 200)]);
        assert_eq!(lax.valid_end, b.len() as u64);
    }
}
