//! Invariant: a torn WAL tail (the last record cut at any byte, or garbage after the last
//! record) loses only that unacknowledged record: the store opens, every earlier checkpoint reads
//! back bit-exact, the WAL is cut back to the last good record, and new commits keep working;
//! `RecoveryMode::AbsoluteConsistency` refuses with `Error::WalTornTail` instead.

mod support;

use ckptstore::{Error, Options, RecoveryMode, Selector, Store};
use std::path::Path;
use support::*;

/// A store with three checkpoints, and the WAL length after the second and third commits.
struct Template {
    dir: tempfile::TempDir,
    tensors: Vec<Vec<(String, Vec<u8>)>>,
    end_second: u64,
    end_third: u64,
}

fn tensors_of(step: u64) -> Vec<(String, Vec<u8>)> {
    vec![
        ("w".to_string(), data(step, 2 * CHUNK + 300)),
        ("b".to_string(), data(100 + step, 64)),
    ]
}

fn as_refs(t: &[(String, Vec<u8>)]) -> Vec<(&str, &[u8])> {
    t.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect()
}

fn template() -> Template {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let mut tensors = Vec::new();
    let mut ends = Vec::new();
    for step in 1..=3u64 {
        let t = tensors_of(step);
        commit(&mut s, step, &as_refs(&t));
        tensors.push(t);
        ends.push(file_len(&live_wal(dir.path())));
    }
    drop(s);
    Template {
        dir,
        tensors,
        end_second: ends[1],
        end_third: ends[2],
    }
}

fn fresh_copy(t: &Template) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    copy_tree(t.dir.path(), d.path());
    d
}

fn set_wal_len(dir: &Path, len: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(live_wal(dir))
        .unwrap();
    f.set_len(len).unwrap();
}

fn absolute() -> Options {
    Options {
        recovery_mode: RecoveryMode::AbsoluteConsistency,
        ..opts()
    }
}

/// Opens `dir` whose WAL has a good prefix of `good_end` bytes followed by `bad_bytes` of
/// damage, and checks everything the invariant promises. `expect` are the checkpoints before.
fn check_recovers(dir: &Path, good_end: u64, bad_bytes: u64, expect: &[Vec<(String, Vec<u8>)>]) {
    let wal = live_wal(dir);
    assert_eq!(file_len(&wal), good_end + bad_bytes);

    if bad_bytes > 0 {
        let before = snapshot_tree(dir);
        match Store::open(dir, absolute()) {
            Err(Error::WalTornTail { path, offset, .. }) => {
                assert_eq!(path, wal);
                assert_eq!(offset, good_end);
            }
            other => panic!("AbsoluteConsistency with a torn tail: {other:?}"),
        }
        let mut after = snapshot_tree(dir);
        after.remove(Path::new("LOCK"));
        let mut before = before;
        before.remove(Path::new("LOCK"));
        assert_eq!(before, after, "a refused open modified the store");
    }

    let mut s = Store::open(dir, opts()).unwrap();
    assert_eq!(file_len(&wal), good_end, "torn tail not cut off");
    assert_eq!(s.recovery_report().truncated_tail_bytes, bad_bytes);
    assert_eq!(
        s.recovery_report().truncated_tail_reason.is_some(),
        bad_bytes > 0
    );
    let listed: Vec<u64> = s.list().iter().map(|c| c.step).collect();
    let want: Vec<u64> = (1..=expect.len() as u64).collect();
    assert_eq!(listed, want);
    for (i, t) in expect.iter().enumerate() {
        assert_holds(&s, s.list()[i].id, &as_refs(t));
    }
    if expect.len() == 2 {
        assert!(matches!(
            s.checkpoint(Selector::Step(3)),
            Err(Error::NotFound(_))
        ));
    }

    // A new commit appends right after the last good record and survives a reopen.
    let new = tensors_of(40);
    let info = commit(&mut s, 40, &as_refs(&new));
    assert!(file_len(&wal) > good_end);
    drop(s);
    let s = Store::open(dir, opts()).unwrap();
    assert_eq!(s.recovery_report().truncated_tail_bytes, 0);
    assert_eq!(s.list().len(), expect.len() + 1);
    for (i, t) in expect.iter().enumerate() {
        assert_holds(&s, s.list()[i].id, &as_refs(t));
    }
    assert_holds(&s, info.checkpoint.id, &as_refs(&new));
    assert!(s.recovery_report().orphan_segments.is_empty());
}

#[test]
fn last_record_torn_at_every_byte() {
    let t = template();
    assert!(t.end_third > t.end_second);
    for cut in t.end_second..t.end_third {
        let d = fresh_copy(&t);
        set_wal_len(d.path(), cut);
        check_recovers(d.path(), t.end_second, cut - t.end_second, &t.tensors[..2]);
    }
}

#[test]
fn torn_tail_segment_of_the_lost_checkpoint_is_removed() {
    let t = template();
    let d = fresh_copy(&t);
    let segs_before = segment_files(d.path());
    set_wal_len(d.path(), t.end_third - 1);
    let s = Store::open(d.path(), opts()).unwrap();
    assert_eq!(s.recovery_report().orphan_segments.len(), 1);
    let segs_after = segment_files(d.path());
    assert_eq!(segs_after.len(), segs_before.len() - 1);
}

#[test]
fn read_only_open_of_a_torn_tail_reads_but_does_not_cut() {
    let t = template();
    let d = fresh_copy(&t);
    set_wal_len(d.path(), t.end_third - 5);
    let ro = Options {
        read_only: true,
        ..opts()
    };
    let s = Store::open(d.path(), ro).unwrap();
    assert_eq!(s.list().len(), 2);
    assert_holds(&s, 1, &as_refs(&t.tensors[0]));
    assert_eq!(file_len(&live_wal(d.path())), t.end_third - 5);
}

#[test]
fn garbage_after_the_last_record_is_cut() {
    let t = template();
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for n in [1usize, 7, 11, 12, 13, 100, 4096] {
        cases.push((format!("{n} random bytes"), data(7000 + n as u64, n)));
        cases.push((format!("{n} zeros"), vec![0u8; n]));
        cases.push((format!("{n} 0xff bytes"), vec![0xffu8; n]));
    }
    for (what, garbage) in cases {
        let d = fresh_copy(&t);
        let wal = live_wal(d.path());
        let mut bytes = std::fs::read(&wal).unwrap();
        assert_eq!(bytes.len() as u64, t.end_third);
        bytes.extend_from_slice(&garbage);
        std::fs::write(&wal, &bytes).unwrap();
        eprintln!("case: {what}");
        check_recovers(d.path(), t.end_third, garbage.len() as u64, &t.tensors);
    }
}

#[test]
fn garbage_after_a_torn_record_is_still_a_tail() {
    let t = template();
    let d = fresh_copy(&t);
    let wal = live_wal(d.path());
    let mut bytes = std::fs::read(&wal).unwrap();
    bytes.truncate((t.end_second + 20) as usize);
    bytes.extend_from_slice(&data(9, 333));
    std::fs::write(&wal, &bytes).unwrap();
    check_recovers(
        d.path(),
        t.end_second,
        bytes.len() as u64 - t.end_second,
        &t.tensors[..2],
    );
}
