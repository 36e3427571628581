//! Invariant (fsyncgate): the first failed fsync/fdatasync during a commit, a delete or a WAL
//! compaction fails that operation and poisons the store, which then refuses every write with
//! `Error::Poisoned`; reopening on a healthy view finds every acknowledged checkpoint bit-exact,
//! and the failed operation either wholly happened or wholly did not.

mod support;

use ckptstore::io::{MemIo, Storage};
use ckptstore::{Error, Options, Selector, Store};
use std::path::Path;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use support::*;

const DIR: &str = "/ckpts";

fn mem_opts(mem: &MemIo) -> Options {
    Options {
        io: Arc::new(mem.clone()),
        ..opts()
    }
}

/// The `n`-th sync from now fails with EIO, and every later one too.
fn fail_sync(mem: &MemIo, n: i64) {
    mem.faults.fail_sync_countdown.store(n, SeqCst);
}

fn heal(mem: &MemIo) {
    mem.faults.fail_sync_countdown.store(0, SeqCst);
}

fn tensors(step: u64) -> Vec<(String, Vec<u8>)> {
    vec![
        ("w".into(), data(step, 2 * CHUNK + 99)),
        ("b".into(), data(1000 + step, 40)),
    ]
}

fn refs(t: &[(String, Vec<u8>)]) -> Vec<(&str, &[u8])> {
    t.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect()
}

/// A MemIo store with checkpoints at steps 1 and 2, acknowledged.
fn healthy_store(mem: &MemIo) -> Store {
    let mut s = Store::open(DIR, mem_opts(mem)).unwrap();
    for step in 1..=2 {
        commit(&mut s, step, &refs(&tensors(step)));
    }
    s
}

/// Every write is refused with `Poisoned`; reads of acknowledged checkpoints still work.
fn assert_poisoned(s: &mut Store) {
    assert!(s.poisoned().is_some());
    assert!(matches!(s.begin(9).err(), Some(Error::Poisoned { .. })));
    assert!(matches!(s.delete(1), Err(Error::Poisoned { .. })));
    assert!(matches!(s.compact_wal(), Err(Error::Poisoned { .. })));
    assert!(s.poisoned().is_some());
    assert_holds(s, 1, &refs(&tensors(1)));
}

/// Reopens on the healed file system: `acked` steps are there bit-exact; `maybe` steps are
/// either absent or bit-exact; nothing else is listed; the store takes a new commit.
fn reopen_and_check(mem: &MemIo, acked: &[u64], maybe: &[u64]) -> Vec<u64> {
    heal(mem);
    let mut s = Store::open(DIR, mem_opts(mem)).unwrap();
    assert!(s.poisoned().is_none());
    let listed: Vec<(u64, u64)> = s.list().iter().map(|c| (c.id, c.step)).collect();
    for step in acked {
        assert!(
            listed.iter().any(|(_, st)| st == step),
            "acknowledged step {step} lost: {listed:?}"
        );
    }
    for (id, step) in &listed {
        assert!(
            acked.contains(step) || maybe.contains(step),
            "unexpected step {step}"
        );
        assert_holds(&s, *id, &refs(&tensors(*step)));
    }
    let info = commit(&mut s, 77, &refs(&tensors(77)));
    drop(s);
    let s = Store::open(DIR, mem_opts(mem)).unwrap();
    assert_holds(&s, info.checkpoint.id, &refs(&tensors(77)));
    assert!(s.recovery_report().orphan_segments.is_empty());
    assert!(s.recovery_report().stale_files.is_empty());
    listed.iter().map(|(_, st)| *st).collect()
}

fn wal_files(mem: &MemIo) -> Vec<String> {
    let mut v: Vec<String> = mem
        .list(Path::new(DIR))
        .unwrap()
        .into_iter()
        .filter(|n| n.ends_with(".wal"))
        .collect();
    v.sort();
    v
}

#[test]
fn sync_failure_at_each_sync_of_a_commit() {
    let mut failed_ops = Vec::new();
    for n in 1.. {
        let mem = MemIo::new();
        let mut s = healthy_store(&mem);
        fail_sync(&mem, n);
        let mut t = s.begin(3).unwrap();
        for (name, bytes) in tensors(3) {
            t.put_tensor(&name, ckptstore::DType::U8, &[bytes.len() as u64], &bytes)
                .unwrap();
        }
        match t.commit() {
            Ok(_) => {
                assert_eq!(n, 5, "a commit makes four syncs");
                assert!(s.poisoned().is_none());
                break;
            }
            Err(Error::Io { op, path, source }) => {
                assert!(source.to_string().contains("injected EIO"), "{source}");
                failed_ops.push((op, path));
            }
            Err(other) => panic!("sync {n}: {other:?}"),
        }
        assert_poisoned(&mut s);
        drop(s);
        let present = reopen_and_check(&mem, &[1, 2], &[3]);
        if n < 4 {
            // The WAL record was never written: the checkpoint cannot be there.
            assert_eq!(present, vec![1, 2], "sync {n}");
        }
    }
    let ops: Vec<&str> = failed_ops.iter().map(|(op, _)| *op).collect();
    // The segment, its directory entry, the commit trailer (docs/FORMAT.md), the WAL record.
    assert_eq!(
        ops,
        vec!["fdatasync", "fsync dir", "fdatasync", "fdatasync"]
    );
    assert_eq!(failed_ops[0].1.extension().unwrap(), "seg");
    assert!(failed_ops[1].1.ends_with("segments"));
    assert_eq!(
        failed_ops[2].1, failed_ops[0].1,
        "the trailer is in that segment"
    );
    assert_eq!(failed_ops[3].1.extension().unwrap(), "wal");
}

/// A fully deduplicated commit writes no chunk, but a segment holding only its commit trailer
/// (docs/FORMAT.md, "Commit trailer"): the same four syncs as any commit, each of which
/// poisons on failure; before the WAL record, nothing is committed and nothing is left.
#[test]
fn sync_failure_of_a_fully_deduplicated_commit() {
    let mut failed_ops = Vec::new();
    for n in 1.. {
        let mem = MemIo::new();
        let mut s = healthy_store(&mem);
        fail_sync(&mem, n);
        let mut t = s.begin(2).unwrap();
        for (name, bytes) in tensors(2) {
            t.put_tensor(&name, ckptstore::DType::U8, &[bytes.len() as u64], &bytes)
                .unwrap();
        }
        match t.commit() {
            Ok(info) => {
                assert_eq!(n, 5, "a deduplicated commit makes four syncs");
                assert_eq!(info.chunks_written, 0);
                assert!(s.poisoned().is_none());
                break;
            }
            Err(Error::Io { op, path, source }) => {
                assert!(source.to_string().contains("injected EIO"), "{source}");
                failed_ops.push((op, path));
            }
            Err(other) => panic!("sync {n}: {other:?}"),
        }
        assert_poisoned(&mut s);
        drop(s);
        let present = reopen_and_check(&mem, &[1, 2], &[]);
        if n < 4 {
            assert_eq!(present, vec![1, 2], "sync {n}");
        }
    }
    let ops: Vec<&str> = failed_ops.iter().map(|(op, _)| *op).collect();
    // The trailer-only segment, its directory entry, its trailer, the WAL record.
    assert_eq!(
        ops,
        vec!["fdatasync", "fsync dir", "fdatasync", "fdatasync"]
    );
    assert_eq!(failed_ops[0].1.extension().unwrap(), "seg");
    assert_eq!(failed_ops[2].1, failed_ops[0].1);
    assert_eq!(failed_ops[3].1.extension().unwrap(), "wal");
}

#[test]
fn poisoned_store_refuses_a_transaction_begun_before_the_failure() {
    let mem = MemIo::new();
    let mut s = healthy_store(&mem);
    fail_sync(&mem, 1);
    {
        let mut t = s.begin(3).unwrap();
        t.put_tensor("w", ckptstore::DType::U8, &[10], &[1; 10])
            .unwrap();
        assert!(t.commit().is_err());
    }
    heal(&mem);
    // Healing the disk does not un-poison the store: only a reopen does.
    assert_poisoned(&mut s);
    drop(s);
    reopen_and_check(&mem, &[1, 2], &[]);
}

#[test]
fn sync_failure_during_delete() {
    let mem = MemIo::new();
    let mut s = healthy_store(&mem);
    fail_sync(&mem, 1);
    match s.delete(1) {
        Err(Error::Io { op, path, .. }) => {
            assert_eq!(op, "fdatasync");
            assert_eq!(path.extension().unwrap(), "wal");
        }
        other => panic!("{other:?}"),
    }
    // Nothing was freed before the delete record was durable.
    assert_eq!(s.list().len(), 2);
    assert_poisoned(&mut s);
    drop(s);
    reopen_and_check(&mem, &[2], &[1]);
}

#[test]
fn sync_failure_at_each_sync_of_a_wal_compaction() {
    let mut failures = 0;
    for n in 1.. {
        let mem = MemIo::new();
        let mut s = healthy_store(&mem);
        let id = commit(&mut s, 3, &refs(&tensors(3))).checkpoint.id;
        s.delete(id).unwrap();
        fail_sync(&mem, n);
        match s.compact_wal() {
            Ok(()) => {
                assert!(
                    failures >= 3,
                    "compaction syncs the new WAL, its dir, CURRENT"
                );
                assert!(s.poisoned().is_none());
                break;
            }
            Err(Error::Io { source, .. }) => {
                assert!(source.to_string().contains("injected EIO"), "{source}");
                failures += 1;
            }
            Err(other) => panic!("sync {n}: {other:?}"),
        }
        assert_poisoned(&mut s);
        drop(s);
        reopen_and_check(&mem, &[1, 2], &[]);
        assert_eq!(wal_files(&mem).len(), 1, "sync {n}: {:?}", wal_files(&mem));
    }
}

/// A store whose WAL is mostly dead records, reopened so that its next write compacts.
fn store_due_for_compaction(mem: &MemIo) -> Store {
    let no_compaction = Options {
        wal_compact_min_bytes: u64::MAX,
        ..mem_opts(mem)
    };
    let mut s = Store::open(DIR, no_compaction).unwrap();
    for step in 1..=2 {
        commit(&mut s, step, &refs(&tensors(step)));
    }
    for step in 100..200 {
        let id = commit(&mut s, step, &[("x", &data(step, 10))])
            .checkpoint
            .id;
        s.delete(id).unwrap();
    }
    drop(s);
    let compact_eagerly = Options {
        wal_compact_min_bytes: 0,
        ..mem_opts(mem)
    };
    Store::open(DIR, compact_eagerly).unwrap()
}

#[test]
fn failed_automatic_compaction_does_not_fail_a_durable_commit() {
    let mem = MemIo::new();
    let mut s = store_due_for_compaction(&mem);
    assert_eq!(wal_files(&mem), vec!["00000001.wal"]);
    // The commit's own four syncs (segment, directory, commit trailer, WAL) succeed; the
    // compaction after it fails.
    fail_sync(&mem, 5);
    let mut t = s.begin(3).unwrap();
    for (name, bytes) in tensors(3) {
        t.put_tensor(&name, ckptstore::DType::U8, &[bytes.len() as u64], &bytes)
            .unwrap();
    }
    let info = t.commit().expect("the commit record is durable");
    assert_eq!(info.checkpoint.step, 3);
    assert_poisoned(&mut s);
    assert_holds(&s, info.checkpoint.id, &refs(&tensors(3)));
    drop(s);
    let present = reopen_and_check(&mem, &[1, 2, 3], &[]);
    assert_eq!(present, vec![1, 2, 3]);
}

#[test]
fn failed_automatic_compaction_does_not_fail_a_durable_delete() {
    let mem = MemIo::new();
    let mut s = store_due_for_compaction(&mem);
    // The delete record's sync succeeds; the compaction after it fails.
    fail_sync(&mem, 2);
    s.delete(1).expect("the delete record is durable");
    assert!(matches!(s.info(Selector::Id(1)), Err(Error::NotFound(_))));
    assert_poisoned_without_1(&mut s);
    drop(s);
    let present = reopen_and_check(&mem, &[2], &[]);
    assert_eq!(present, vec![2]);
}

fn assert_poisoned_without_1(s: &mut Store) {
    assert!(s.poisoned().is_some());
    assert!(matches!(s.begin(9).err(), Some(Error::Poisoned { .. })));
    assert!(matches!(s.delete(2), Err(Error::Poisoned { .. })));
    assert_holds(s, 2, &refs(&tensors(2)));
}

#[test]
fn automatic_compaction_keeps_everything_when_healthy() {
    let mem = MemIo::new();
    let mut s = store_due_for_compaction(&mem);
    let info = commit(&mut s, 3, &refs(&tensors(3)));
    assert_eq!(wal_files(&mem), vec!["00000002.wal"]);
    assert!(s.poisoned().is_none());
    assert_holds(&s, info.checkpoint.id, &refs(&tensors(3)));
    drop(s);
    reopen_and_check(&mem, &[1, 2, 3], &[]);
}
