//! WAL header decoder and record scanner on arbitrary bytes (the first input byte is a mode:
//! odd recomputes every CRC first, so the fuzzer reaches the checks behind them).
//!
//! Invariants: no panic, no allocation beyond the input; the scan's records are in order,
//! back to back from the header, inside the buffer, and each re-encodes to exactly the bytes
//! it was read from; the valid prefix scans again to the same records with nothing bad; the
//! payloads decode (or fail to decode) as the protobuf message of their type without panicking.
#![no_main]

use ckptstore::proto::v1 as pb;
use ckptstore::wal::{self, RecordType, WalHeader};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|input: &[u8]| {
    let Some((&mode, data)) = input.split_first() else {
        return;
    };
    let owned;
    let data = if mode & 1 != 0 {
        // Recompute every checksum (header, then each record that parses) so the fuzzer
        // reaches what lies behind them.
        let mut b = data.to_vec();
        fix_crcs(&mut b);
        owned = b;
        &owned[..]
    } else {
        data
    };
    // A real header gives the salt; otherwise take it from the input, so records still validate
    // when the fuzzer writes them.
    let salt = match WalHeader::decode(data) {
        Ok(h) => {
            let mut again = h.encode();
            // Only the fields the decoder keeps are compared: version and reserved bytes may
            // differ (an older version, nonzero reserved bytes covered by the CRC).
            again[8..10].copy_from_slice(&data[8..10]);
            again[10..12].copy_from_slice(&data[10..12]);
            again[24..28].copy_from_slice(&data[24..28]);
            let crc = crc32c::crc32c(&again[..28]);
            again[28..32].copy_from_slice(&crc.to_le_bytes());
            assert_eq!(&again[..], &data[..wal::WAL_HEADER_LEN]);
            h.salt
        }
        Err(_) => data
            .get(12..16)
            .map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap())),
    };
    let scan = wal::scan(data, salt);
    let mut at = wal::WAL_HEADER_LEN.min(data.len()) as u64;
    for r in &scan.records {
        assert_eq!(r.offset, at);
        assert!(r.payload.start == at as usize + wal::RECORD_HEADER_LEN);
        assert!(r.payload.end <= data.len());
        assert!(r.payload.len() <= wal::MAX_RECORD_LEN as usize);
        let mut again = Vec::new();
        wal::encode_record(&mut again, salt, r.ty, &data[r.payload.clone()]);
        assert_eq!(&again[..], &data[r.offset as usize..r.payload.end]);
        at = r.payload.end as u64;
        let p = &data[r.payload.clone()];
        match r.ty {
            RecordType::Commit => {
                if let Ok(c) = pb::CommitRecord::decode(p) {
                    let _ = ckptstore::manifest::validate(&c.manifest.unwrap_or_default(), "fuzz");
                }
            }
            RecordType::Delete => {
                let _ = pb::DeleteRecord::decode(p);
            }
            RecordType::Snapshot => {
                let _ = pb::SnapshotRecord::decode(p);
            }
            RecordType::Pin => {
                let _ = pb::PinRecord::decode(p);
            }
            RecordType::Relocate => {
                let _ = pb::RelocateRecord::decode(p);
            }
            RecordType::Quarantine => {
                let _ = pb::QuarantineRecord::decode(p);
            }
        }
    }
    assert_eq!(scan.valid_end, at);
    match &scan.bad {
        None => assert_eq!(scan.valid_end, data.len() as u64),
        Some(bad) => {
            assert_eq!(bad.offset, scan.valid_end);
            assert!(bad.offset < data.len() as u64);
        }
    }
    let prefix = wal::scan(&data[..scan.valid_end as usize], salt);
    assert_eq!(prefix.records, scan.records);
    assert!(prefix.bad.is_none());
});

fn fix_crcs(b: &mut [u8]) {
    if b.len() < wal::WAL_HEADER_LEN {
        return;
    }
    let c = crc32c::crc32c(&b[..28]);
    b[28..32].copy_from_slice(&c.to_le_bytes());
    let salt = u32::from_le_bytes(b[12..16].try_into().unwrap());
    let mut at = wal::WAL_HEADER_LEN;
    while at + wal::RECORD_HEADER_LEN <= b.len() {
        let len = u32::from_le_bytes(b[at + 4..at + 8].try_into().unwrap()) as usize;
        let Some(end) = (at + 12).checked_add(len).filter(|&e| e <= b.len()) else {
            break;
        };
        let c = crc32c::crc32c(&salt.to_le_bytes());
        let c = crc32c::crc32c_append(c, &b[at + 4..at + 12]);
        let c = crc32c::crc32c_append(c, &b[at + 12..end]);
        b[at..at + 4].copy_from_slice(&c.to_le_bytes());
        at = end;
    }
}
