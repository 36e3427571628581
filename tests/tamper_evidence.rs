//! Invariant: with a key, every commit carries a keyed MAC over what the checkpoint is and the
//! MAC before it, so someone who can write the store but lacks the key cannot change, swap or
//! replay a commit record without the open refusing it (`Error::MacMismatch`); a commit dropped
//! from the middle shows as a break in `verify_chain`, and newest commits dropped (a rollback)
//! fail `check_head` for a caller who remembered the head (docs/FORMAT.md, "Commit MACs").

mod support;

use ckptstore::crypt::Key;
use ckptstore::proto::v1 as pb;
use ckptstore::proto::Message;
use ckptstore::wal::{self, RecordType, WalHeader};
use ckptstore::{Error, Options, Store};
use std::path::Path;
use support::{commit, data, live_wal, opts};

fn sealed() -> Options {
    Options {
        encryption_key: Some(Key::from_bytes(&[42u8; 32]).unwrap()),
        ..opts()
    }
}

/// A sealed store with checkpoints 1, 2, 3.
fn three(dir: &Path) {
    let mut s = Store::open(dir, sealed()).unwrap();
    for step in 1..=3 {
        commit(&mut s, step, &[("w", &data(step, 5000))]);
    }
}

/// Rewrites the live WAL's records through `edit` (type, payload), keeping its header and
/// salt, every record CRC'd again: what an attacker who can write the store can do.
fn rewrite_wal(dir: &Path, edit: impl FnOnce(&mut Vec<(RecordType, Vec<u8>)>)) {
    let path = live_wal(dir);
    let bytes = std::fs::read(&path).unwrap();
    let salt = WalHeader::decode(&bytes).unwrap().salt;
    let scan = wal::scan(&bytes, salt);
    assert!(scan.bad.is_none());
    let mut records: Vec<(RecordType, Vec<u8>)> = scan
        .records
        .iter()
        .map(|r| (r.ty, bytes[r.payload.clone()].to_vec()))
        .collect();
    edit(&mut records);
    let mut out = bytes[..wal::WAL_HEADER_LEN].to_vec();
    for (ty, p) in records {
        wal::encode_record(&mut out, salt, ty, &p);
    }
    std::fs::write(&path, out).unwrap();
}

fn manifest(p: &[u8]) -> pb::Manifest {
    pb::CommitRecord::decode(p).unwrap().manifest.unwrap()
}

fn commit_payload(m: pb::Manifest) -> Vec<u8> {
    pb::CommitRecord { manifest: Some(m) }.encode_to_vec()
}

/// Index of the commit record of checkpoint `id`.
fn commit_of(records: &[(RecordType, Vec<u8>)], id: u64) -> usize {
    records
        .iter()
        .position(|(t, p)| *t == RecordType::Commit && manifest(p).id == id)
        .unwrap()
}

fn assert_mac_mismatch(dir: &Path) {
    match Store::open(dir, sealed()) {
        Err(e @ Error::MacMismatch { .. }) => {
            assert!(e.to_string().contains("tampering"), "{e}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a tampered store opened"),
    }
}

#[test]
fn untouched_chain_verifies_and_links() {
    let d = tempfile::tempdir().unwrap();
    three(d.path());
    let s = Store::open(d.path(), sealed()).unwrap();
    let r = s.verify_chain().unwrap();
    assert_eq!(r.verified, [1, 2, 3]);
    assert!(r.breaks.is_empty() && r.unauthenticated.is_empty(), "{r:?}");
    assert_eq!(r.head.as_ref().unwrap().0, 3);
    // Survives a WAL compaction and a segment compaction (locations are not MAC'd).
    drop(s);
    let mut s = Store::open(
        d.path(),
        Options {
            compact_live_fraction: 1.0,
            ..sealed()
        },
    )
    .unwrap();
    s.delete(1).unwrap();
    s.gc().unwrap();
    s.compact_wal().unwrap();
    drop(s);
    let s = Store::open(d.path(), sealed()).unwrap();
    let r = s.verify_chain().unwrap();
    assert_eq!(r.verified, [2, 3]);
    assert!(r.breaks.is_empty(), "{r:?}");
}

#[test]
fn a_changed_commit_record_is_refused_on_open() {
    let d = tempfile::tempdir().unwrap();
    three(d.path());
    rewrite_wal(d.path(), |recs| {
        let i = commit_of(recs, 2);
        let mut m = manifest(&recs[i].1);
        m.step = 99;
        recs[i].1 = commit_payload(m);
    });
    assert_mac_mismatch(d.path());
}

#[test]
fn swapped_commit_records_are_refused_on_open() {
    let d = tempfile::tempdir().unwrap();
    three(d.path());
    rewrite_wal(d.path(), |recs| {
        let (i, j) = (commit_of(recs, 2), commit_of(recs, 3));
        let (mut a, mut b) = (manifest(&recs[i].1), manifest(&recs[j].1));
        std::mem::swap(&mut a.id, &mut b.id);
        recs[i].1 = commit_payload(b);
        recs[j].1 = commit_payload(a);
    });
    assert_mac_mismatch(d.path());
}

#[test]
fn a_replayed_commit_record_is_refused_on_open() {
    let d = tempfile::tempdir().unwrap();
    three(d.path());
    rewrite_wal(d.path(), |recs| {
        let mut m = manifest(&recs[commit_of(recs, 1)].1);
        m.id = 4;
        m.new_segments.clear();
        recs.push((RecordType::Commit, commit_payload(m)));
    });
    assert_mac_mismatch(d.path());
}

#[test]
fn a_dropped_commit_shows_as_a_break_and_a_rollback_fails_check_head() {
    let d = tempfile::tempdir().unwrap();
    three(d.path());
    let head = Store::open(d.path(), sealed())
        .unwrap()
        .verify_chain()
        .unwrap()
        .head
        .unwrap();
    let backup = support::snapshot_tree(d.path());
    // Middle commit dropped.
    rewrite_wal(d.path(), |recs| {
        let i = commit_of(recs, 2);
        recs.remove(i);
    });
    let s = Store::open(d.path(), sealed()).unwrap();
    assert_eq!(s.verify_chain().unwrap().breaks, [(1, 3)]);
    s.check_head(head.0, &head.1).unwrap(); // the head is still there
    drop(s);
    // Restore, then drop the newest commit: the store opens, the head a caller kept fails.
    for (rel, bytes) in &backup {
        std::fs::write(d.path().join(rel), bytes).unwrap();
    }
    rewrite_wal(d.path(), |recs| {
        let i = commit_of(recs, 3);
        recs.remove(i);
    });
    let s = Store::open(d.path(), sealed()).unwrap();
    match s.check_head(head.0, &head.1) {
        Err(e @ Error::Rollback { .. }) => assert!(e.to_string().contains("rolled back"), "{e}"),
        other => panic!("{other:?}"),
    }
    // A different MAC for the same id (another history) fails too.
    let other = "00".repeat(32);
    assert!(matches!(
        s.check_head(2, &other),
        Err(Error::Rollback { .. })
    ));
}

#[test]
fn plain_checkpoints_are_reported_unauthenticated() {
    let d = tempfile::tempdir().unwrap();
    let mut s = Store::open(d.path(), opts()).unwrap();
    commit(&mut s, 1, &[("w", &data(1, 100))]);
    drop(s);
    let mut s = Store::open(d.path(), sealed()).unwrap();
    commit(&mut s, 2, &[("w", &data(2, 100))]);
    let r = s.verify_chain().unwrap();
    assert_eq!((r.unauthenticated, r.verified), (vec![1], vec![2]));
}
