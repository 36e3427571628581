//! Protobuf payloads of WAL records (CommitRecord, DeleteRecord, SnapshotRecord, PinRecord,
//! RelocateRecord), decoded,
//! validated, and then replayed by recovery: the input is cut into records that are framed
//! with valid CRCs into a WAL in a `MemIo` store image, so the fuzzer reaches everything behind
//! the checksums (manifest validation, the segment table, ids, deletes, snapshots, pins, and
//! segment-compaction relocations).
//!
//! Invariants: no panic, no allocation beyond what the input's lengths allow (segments are
//! only materialised up to 64 KiB); recovery either refuses with a typed error or opens, and
//! then every listed checkpoint verifies or fails verification with a typed error, and
//! `latest_valid()` returns only a checkpoint that verifies; a writer on the recovered store
//! can commit, and the commit survives a reopen.
#![no_main]

use ckptstore::io::{MemIo, Storage};
use ckptstore::proto::v1 as pb;
use ckptstore::wal::{self, RecordType, WalHeader};
use ckptstore::{DType, Options, Store};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use std::path::Path;
use std::sync::Arc;

const SALT: u32 = 0x5eed_1234;

fuzz_target!(|data: &[u8]| {
    // 1. The whole input as each message type.
    if let Ok(c) = pb::CommitRecord::decode(data) {
        let m = c.manifest.unwrap_or_default();
        if ckptstore::manifest::validate(&m, "fuzz").is_ok() {
            // A valid manifest survives an encode/decode round trip unchanged.
            let again = pb::Manifest::decode(m.encode_to_vec().as_slice()).unwrap();
            assert_eq!(again, m);
            let _ = ckptstore::manifest::logical_bytes(&m);
        }
    }
    let _ = pb::SnapshotRecord::decode(data);
    let _ = pb::DeleteRecord::decode(data);
    let _ = pb::PinRecord::decode(data);
    let _ = pb::RelocateRecord::decode(data);
    let _ = pb::QuarantineRecord::decode(data);

    // 2. The input as a list of records: [type][len u16][payload]..., replayed by recovery.
    let mut records = Vec::new();
    let mut rest = data;
    while rest.len() >= 3 && records.len() < 16 {
        let ty = match rest[0] % 6 {
            0 => RecordType::Commit,
            1 => RecordType::Delete,
            2 => RecordType::Snapshot,
            3 => RecordType::Pin,
            4 => RecordType::Relocate,
            _ => RecordType::Quarantine,
        };
        let len = (u16::from_le_bytes([rest[1], rest[2]]) as usize).min(rest.len() - 3);
        records.push((ty, &rest[3..3 + len]));
        rest = &rest[3 + len..];
    }
    if records.is_empty() {
        return;
    }
    let mem = MemIo::new();
    let dir = Path::new("/s");
    mem.create_dir_all(&dir.join("segments")).unwrap();
    let mut wal_bytes = WalHeader {
        salt: SALT,
        file_number: 1,
        features: Default::default(),
    }
    .encode()
    .to_vec();
    for (ty, payload) in &records {
        wal::encode_record(&mut wal_bytes, SALT, *ty, payload);
        // Segments the records mention, so that verification reads real (wrong) bytes.
        let mut segs = Vec::new();
        match ty {
            RecordType::Commit => {
                if let Ok(c) = pb::CommitRecord::decode(*payload) {
                    segs = c.manifest.unwrap_or_default().new_segments;
                }
            }
            RecordType::Snapshot => {
                if let Ok(s) = pb::SnapshotRecord::decode(*payload) {
                    segs = s.segments;
                }
            }
            RecordType::Relocate => {
                if let Ok(r) = pb::RelocateRecord::decode(*payload) {
                    segs = r.new_segments;
                }
            }
            RecordType::Delete | RecordType::Pin | RecordType::Quarantine => {}
        }
        for s in segs.iter().take(4) {
            if s.length <= 64 << 10 {
                let mut b = ckptstore::segment::encode_header(s.id);
                b.resize((s.length as usize).max(b.len()), 0);
                let name = ckptstore::segment::file_name(s.id);
                mem.write_file(&dir.join("segments").join(name), b);
            }
        }
    }
    mem.write_file(&dir.join("00000001.wal"), wal_bytes);
    mem.write_file(&dir.join("CURRENT"), ckptstore::current::encode(1).to_vec());

    let opts = |read_only| Options {
        read_only,
        chunk_size: 4096,
        segment_max_bytes: 1 << 20,
        io: Arc::new(mem.clone()),
        ..Default::default()
    };
    if let Ok(s) = Store::open(dir, opts(true)) {
        check(&s);
    }
    let Ok(mut s) = Store::open(dir, opts(false)) else {
        return;
    };
    check(&s);
    let before: Vec<u64> = s.list().iter().map(|c| c.id).collect();
    let committed = (|| {
        let mut t = s.begin(7).ok()?;
        t.put_tensor("new", DType::U8, &[3], &[1, 2, 3]).ok()?;
        t.commit().ok().map(|i| i.checkpoint.id)
    })();
    drop(s);
    let s = Store::open(dir, opts(false)).expect("a store that opened reopens");
    let after: Vec<u64> = s.list().iter().map(|c| c.id).collect();
    match committed {
        Some(id) => {
            assert!(after.contains(&id), "acknowledged commit {id} lost");
            assert!(
                before.iter().all(|b| after.contains(b)),
                "{before:?} -> {after:?}"
            );
            let t = s
                .checkpoint(ckptstore::Selector::Id(id))
                .unwrap()
                .tensor("new")
                .unwrap();
            assert_eq!(t.data, vec![1, 2, 3]);
        }
        None => assert_eq!(before, after),
    }
    check(&s);
});

/// Every listed checkpoint verifies or fails with an error; `latest_valid` only returns one
/// that verifies.
fn check(s: &Store) {
    for (_, r) in s.verify_all() {
        let _ = r.map_err(|e| e.to_string());
    }
    if let Ok(Some(c)) = s.latest_valid() {
        s.verify(c.id)
            .expect("latest_valid returned a checkpoint that fails verify");
    }
}
