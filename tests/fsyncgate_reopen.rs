//! Bug (found by the power-loss sweep): reopening after a failed fsync trusted the page cache.
//! Invariant: a checkpoint acknowledged after a reopen survives a later power cut, even when
//! the previous writer's fdatasync of a WAL record or fsync of the store directory failed.
//!
//! After a failed writeback Linux marks the pages clean, so recovery's fdatasync of the WAL it
//! replayed reported success without writing the record it had read from the page cache, and a
//! directory entry (`CURRENT`) read from the page cache was never fsync'ed again. The next
//! commit was then built on bytes that a power cut took away: the store refused to open
//! (a hole before valid records reads as corruption, or `CURRENT` missing). Recovery now
//! rewrites the last WAL record before its fdatasync and always fsyncs the store directory.

mod support;

use ckptstore::io::{CrashMode, Fault, OpKind, SimIo};
use ckptstore::{Options, Store};
use std::sync::Arc;
use support::*;

const DIR: &str = "/ckpts";

fn sim_opts(sim: &SimIo) -> Options {
    Options {
        io: Arc::new(sim.clone()),
        ..opts()
    }
}

/// Reopens on the same page cache, commits step 3, and checks every acknowledged step after
/// a power cut in every mode.
fn reopen_commit_and_cut(sim: &SimIo, acked: &[u64]) {
    sim.clear_faults();
    let mut s = Store::open(DIR, sim_opts(sim)).unwrap();
    let id = commit(&mut s, 3, &[("t", &data(3, 5000))]).checkpoint.id;
    drop(s);
    for mode in CrashMode::ALL {
        for seed in 0..8 {
            let img = sim.crash_image(mode, seed);
            let s = Store::open(DIR, sim_opts(&img))
                .unwrap_or_else(|e| panic!("{mode} seed {seed}: {e}"));
            let steps: Vec<u64> = s.list().iter().map(|c| c.step).collect();
            for step in acked {
                assert!(steps.contains(step), "{mode} seed {seed}: step {step} lost");
            }
            assert_holds(&s, id, &[("t", &data(3, 5000))]);
        }
    }
}

#[test]
fn failed_wal_fdatasync_then_reopen_then_commit() {
    let sim = SimIo::new();
    let mut s = Store::open(DIR, sim_opts(&sim)).unwrap();
    commit(&mut s, 1, &[("t", &data(1, 5000))]);
    // The commit of step 2 syncs its segment, the segments directory, then the WAL: fail that.
    sim.inject(Fault::Eio {
        kind: OpKind::Sync,
        nth: 3,
    });
    let mut t = s.begin(2).unwrap();
    t.put_tensor("t", ckptstore::DType::U8, &[5000], &data(2, 5000))
        .unwrap();
    assert!(t.commit().is_err());
    assert!(s.poisoned().is_some());
    drop(s);
    reopen_commit_and_cut(&sim, &[1]);
}

#[test]
fn failed_directory_fsync_of_current_then_reopen_then_commit() {
    let sim = SimIo::new();
    // Creating the store syncs `/`, the first WAL, the directory, `CURRENT.tmp`, then the
    // directory after the rename to `CURRENT`: fail that last one.
    sim.inject(Fault::Eio {
        kind: OpKind::Sync,
        nth: 5,
    });
    assert!(Store::open(DIR, sim_opts(&sim)).is_err());
    reopen_commit_and_cut(&sim, &[]);
}

/// Bug (found putting the three segment writers side by side): a transaction created its
/// segment file, wrote the header, and only then registered the file for removal on abort,
/// so a failed header write left the file behind until the next recovery. The one segment
/// writer registers a file before writing anything to it.
#[test]
fn regression_failed_segment_header_write_left_the_file_behind() {
    let sim = SimIo::new();
    let mut s = Store::open(DIR, sim_opts(&sim)).unwrap();
    // The first write after the open is the header of the transaction's first segment.
    sim.inject(Fault::Eio {
        kind: OpKind::Write,
        nth: 1,
    });
    let mut t = s.begin(1).unwrap();
    let e = t
        .put_tensor("t", ckptstore::DType::U8, &[5000], &data(1, 5000))
        .unwrap_err();
    assert!(e.to_string().starts_with("write "), "{e}");
    drop(t);
    let left = sim
        .list_dir(&std::path::Path::new(DIR).join("segments"))
        .unwrap_or_default();
    assert!(left.is_empty(), "segment files left behind: {left:?}");
    // A failed write is not a failed sync: the store keeps working.
    assert!(s.poisoned().is_none());
    commit(&mut s, 2, &[("t", &data(2, 5000))]);
    assert_eq!(s.list().len(), 1);
}
