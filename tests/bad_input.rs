//! Invariant: bad input from the caller or the environment (malformed tensors, bad options,
//! a second writer, read-only stores and directories, missing stores) is refused with a typed
//! error before anything is written, and never damages what is already committed.

mod support;

use ckptstore::io::MemIo;
use ckptstore::{DType, Error, Options, Selector, Store};
use std::path::Path;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use support::*;

fn read_only() -> Options {
    Options {
        read_only: true,
        ..opts()
    }
}

fn invalid<T: std::fmt::Debug>(r: Result<T, Error>, needle: &str) {
    match r {
        Err(Error::InvalidArgument(msg)) => assert!(msg.contains(needle), "{msg}"),
        other => panic!("expected InvalidArgument({needle}), got {other:?}"),
    }
}

// ---------------------------------------------------------------- tensors

#[test]
fn duplicate_tensor_name_in_one_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let mut t = s.begin(1).unwrap();
    t.put_tensor("w", DType::U8, &[3], &[1, 2, 3]).unwrap();
    invalid(t.put_tensor("w", DType::U8, &[3], &[4, 5, 6]), "duplicate");
    invalid(t.put_tensor("w", DType::F32, &[1], &[0; 4]), "duplicate");
    // The transaction is still usable and commits the first tensor only.
    t.put_tensor("v", DType::U8, &[1], &[9]).unwrap();
    let id = t.commit().unwrap().checkpoint.id;
    let ck = s.checkpoint(Selector::Id(id)).unwrap();
    assert_eq!(ck.tensor_names(), vec!["w", "v"]);
    assert_eq!(ck.tensor("w").unwrap().data, vec![1, 2, 3]);

    let mut t = s.begin(2).unwrap();
    t.put_blob("b", b"x").unwrap();
    invalid(t.put_blob("b", b"y"), "duplicate");
}

#[test]
fn byte_length_must_match_dtype_times_shape() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let mut t = s.begin(1).unwrap();
    invalid(t.put_tensor("a", DType::F32, &[3], &[0; 11]), "needs 12");
    invalid(t.put_tensor("a", DType::F32, &[3], &[0; 13]), "needs 12");
    invalid(t.put_tensor("a", DType::BF16, &[2, 3], &[0; 6]), "needs 12");
    invalid(t.put_tensor("a", DType::F64, &[], &[0; 4]), "needs 8");
    invalid(t.put_tensor("a", DType::I32, &[0], &[0; 1]), "needs 0");
    // The name was not taken by the failed puts.
    t.put_tensor("a", DType::F32, &[3], &[0; 12]).unwrap();
    t.put_tensor("scalar", DType::F64, &[], &[1; 8]).unwrap();
    t.put_tensor("empty", DType::I32, &[4, 0], &[]).unwrap();
    let id = t.commit().unwrap().checkpoint.id;
    drop(s);
    let s = Store::open(dir.path(), opts()).unwrap();
    let ck = s.checkpoint(Selector::Id(id)).unwrap();
    assert_eq!(ck.tensor("scalar").unwrap().shape, Vec::<u64>::new());
    let e = ck.tensor("empty").unwrap();
    assert_eq!((e.shape, e.data.len()), (vec![4, 0], 0));
}

#[test]
fn shape_overflow_is_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let mut t = s.begin(1).unwrap();
    invalid(
        t.put_tensor("a", DType::F64, &[1 << 62, 4], &[0; 8]),
        "overflows",
    );
    invalid(
        t.put_tensor("a", DType::U8, &[u64::MAX, u64::MAX], &[]),
        "overflows",
    );
    invalid(t.put_tensor("a", DType::F32, &[u64::MAX], &[]), "overflows");
    t.put_tensor("a", DType::U8, &[1], &[1]).unwrap();
    t.commit().unwrap();
}

#[test]
fn failed_puts_leave_the_store_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), opts()).unwrap();
    commit(&mut s, 1, &[("w", &data(1, 5000))]);
    {
        let mut t = s.begin(2).unwrap();
        t.put_tensor("x", DType::U8, &[9000], &data(2, 9000))
            .unwrap();
        assert!(t.put_tensor("y", DType::F32, &[3], &[0; 5]).is_err());
        // Dropped without commit: aborted.
    }
    assert_eq!(s.list().len(), 1);
    drop(s);
    let s = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(s.list().len(), 1);
    assert!(s.recovery_report().orphan_segments.is_empty());
    assert_eq!(segment_files(dir.path()).len(), 1);
    assert_holds(&s, 1, &[("w", &data(1, 5000))]);
}

// ---------------------------------------------------------------- options

#[test]
fn bad_options_are_invalid_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("store");
    for (o, needle) in [
        (
            Options {
                chunk_size: 10,
                ..opts()
            },
            "chunk_size",
        ),
        (
            Options {
                chunk_size: 4095,
                ..opts()
            },
            "chunk_size",
        ),
        (
            Options {
                chunk_size: (1 << 30) + 1,
                ..opts()
            },
            "chunk_size",
        ),
        (
            Options {
                segment_max_bytes: 1000,
                ..opts()
            },
            "segment_max_bytes",
        ),
    ] {
        invalid(Store::open(&target, o), needle);
        assert!(!target.exists(), "a refused open created the directory");
    }
}

// ---------------------------------------------------------------- locking and read-only

#[test]
fn second_writer_is_locked_out_naming_the_holder_pid() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Store::open(dir.path(), opts()).unwrap();
    commit(&mut first, 1, &[("w", &data(1, 100))]);
    match Store::open(dir.path(), opts()) {
        Err(Error::Locked { path, pid }) => {
            assert_eq!(path, dir.path().join("LOCK"));
            assert_eq!(pid, std::process::id().to_string());
        }
        other => panic!("{other:?}"),
    }
    // The refused writer did not disturb the holder.
    commit(&mut first, 2, &[("w", &data(2, 100))]);
    assert_eq!(first.list().len(), 2);
}

#[test]
fn lock_is_released_when_the_store_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), opts()).unwrap();
    assert!(matches!(
        Store::open(dir.path(), opts()),
        Err(Error::Locked { .. })
    ));
    drop(s);
    let mut s = Store::open(dir.path(), opts()).unwrap();
    commit(&mut s, 1, &[("w", &data(1, 100))]);
    drop(s);
    Store::open(dir.path(), opts()).unwrap();
}

#[test]
fn lock_is_released_when_the_store_is_dropped_mem_io() {
    let mem = MemIo::new();
    let o = || Options {
        io: Arc::new(mem.clone()),
        ..opts()
    };
    let s = Store::open("/s", o()).unwrap();
    assert!(matches!(Store::open("/s", o()), Err(Error::Locked { .. })));
    drop(s);
    Store::open("/s", o()).unwrap();
}

#[test]
fn read_only_open_coexists_with_a_writer() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = Store::open(dir.path(), opts()).unwrap();
    commit(&mut w, 1, &[("w", &data(1, 6000))]);
    let r = Store::open(dir.path(), read_only()).unwrap();
    assert_eq!(r.list().len(), 1);
    assert_holds(&r, 1, &[("w", &data(1, 6000))]);

    // The writer keeps committing; the reader sees its open-time state until reopened.
    commit(&mut w, 2, &[("w", &data(2, 6000))]);
    assert_eq!(r.list().len(), 1);
    assert_holds(&r, 1, &[("w", &data(1, 6000))]);
    drop(r);
    let r = Store::open(dir.path(), read_only()).unwrap();
    assert_eq!(r.list().len(), 2);
    assert_holds(&r, 2, &[("w", &data(2, 6000))]);
    // Two readers at once, and the writer is still the writer.
    let r2 = Store::open(dir.path(), read_only()).unwrap();
    assert_eq!(r2.list(), r.list());
    commit(&mut w, 3, &[("w", &data(3, 6000))]);
}

#[test]
fn writes_on_a_read_only_store_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = Store::open(dir.path(), opts()).unwrap();
    commit(&mut w, 1, &[("w", &data(1, 100))]);
    drop(w);
    let before = snapshot_tree(dir.path());
    let mut r = Store::open(dir.path(), read_only()).unwrap();
    let ro = |e: Error| match e {
        Error::ReadOnly { path } => assert_eq!(path, dir.path()),
        other => panic!("{other:?}"),
    };
    ro(r.begin(2).err().unwrap());
    ro(r.delete(1).unwrap_err());
    ro(r.compact_wal().unwrap_err());
    assert_eq!(r.stats().wal_bytes, 0);
    assert!(r.poisoned().is_none());
    drop(r);
    assert_eq!(before, snapshot_tree(dir.path()));
}

#[test]
fn read_only_open_modifies_nothing_even_with_orphans() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = Store::open(dir.path(), opts()).unwrap();
    commit(&mut w, 1, &[("w", &data(1, 100))]);
    drop(w);
    // An orphan segment (as left by a transaction that never committed).
    std::fs::write(
        dir.path().join("segments").join("00000077.seg"),
        vec![0u8; 5000],
    )
    .unwrap();
    let before = snapshot_tree(dir.path());
    let r = Store::open(dir.path(), read_only()).unwrap();
    assert_eq!(r.recovery_report().orphan_segments.len(), 1);
    drop(r);
    assert_eq!(before, snapshot_tree(dir.path()));
}

#[test]
fn read_only_file_system_mem_io() {
    let mem = MemIo::new();
    let o = |read_only: bool| Options {
        read_only,
        io: Arc::new(mem.clone()),
        ..opts()
    };
    let w1 = data(1, 9000);
    {
        let mut s = Store::open("/store", o(false)).unwrap();
        commit(&mut s, 1, &[("w", &w1)]);
    }
    mem.faults.read_only.store(true, SeqCst);

    // A writer needs to write (the lock file's pid, recovery's repairs): a typed I/O error.
    match Store::open("/store", o(false)) {
        Err(Error::Io { path, source, .. }) => {
            assert!(path.starts_with("/store"), "{}", path.display());
            assert_eq!(source.raw_os_error(), Some(30), "{source}"); // EROFS
        }
        other => panic!("{other:?}"),
    }
    // Creating a new store there fails the same way.
    assert!(matches!(
        Store::open("/elsewhere", o(false)),
        Err(Error::Io { .. })
    ));
    // A read-only open works and reads everything back.
    let s = Store::open("/store", o(true)).unwrap();
    assert_eq!(s.list().len(), 1);
    assert_holds(&s, 1, &[("w", &w1)]);
    drop(s);

    // Once writable again, the store is intact and takes commits.
    mem.faults.read_only.store(false, SeqCst);
    let mut s = Store::open("/store", o(false)).unwrap();
    assert_holds(&s, 1, &[("w", &w1)]);
    commit(&mut s, 2, &[("w", &data(2, 10))]);
}

fn running_as_root() -> bool {
    // /proc/self/status: "Uid:\t<real>\t<effective>\t..."
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

#[test]
fn read_only_directory_real_fs() {
    use std::os::unix::fs::PermissionsExt;
    if running_as_root() {
        eprintln!("skipped: running as root, chmod cannot make a directory read-only");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    {
        let mut s = Store::open(&path, opts()).unwrap();
        commit(&mut s, 1, &[("w", &data(1, 100))]);
    }
    let set_mode = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    set_mode(&path.join("segments"), 0o555);
    set_mode(&path, 0o555);
    // The LOCK file itself stays writable, so the writer gets as far as recovery, which must
    // still fail with a typed error rather than damage anything.
    let result = Store::open(&path, opts()).map(|mut s| s.begin(2).map(|_| ()).err());
    let r = Store::open(&path, read_only());
    set_mode(&path, 0o755);
    set_mode(&path.join("segments"), 0o755);
    match result {
        Ok(None) | Err(Error::Io { .. }) | Ok(Some(Error::Io { .. })) => {}
        other => panic!("{other:?}"),
    }
    assert_holds(&r.unwrap(), 1, &[("w", &data(1, 100))]);
}

// ---------------------------------------------------------------- missing stores

#[test]
fn read_only_open_of_a_missing_directory_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope");
    assert!(matches!(
        Store::open(&path, read_only()),
        Err(Error::NotFound(_))
    ));
    assert!(!path.exists());
    // An existing but empty directory is not a store either.
    std::fs::create_dir(&path).unwrap();
    assert!(matches!(
        Store::open(&path, read_only()),
        Err(Error::NotFound(_))
    ));
    assert_eq!(std::fs::read_dir(&path).unwrap().count(), 0);
    // MemIo behaves the same.
    let mem = MemIo::new();
    let o = Options {
        read_only: true,
        io: Arc::new(mem.clone()),
        ..opts()
    };
    assert!(matches!(Store::open("/nope", o), Err(Error::NotFound(_))));
}

#[test]
fn unknown_checkpoints_and_tensors_are_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), opts()).unwrap();
    assert!(matches!(
        s.checkpoint(Selector::Latest),
        Err(Error::NotFound(_))
    ));
    assert!(s.latest_valid().unwrap().is_none());
    commit(&mut s, 5, &[("w", &data(1, 10))]);
    assert!(matches!(s.info(Selector::Id(9)), Err(Error::NotFound(_))));
    assert!(matches!(s.info(Selector::Step(6)), Err(Error::NotFound(_))));
    assert!(matches!(s.verify(9), Err(Error::NotFound(_))));
    assert!(matches!(s.delete(9), Err(Error::NotFound(_))));
    let ck = s.checkpoint(Selector::Step(5)).unwrap();
    assert!(matches!(ck.tensor("nope"), Err(Error::NotFound(_))));
    assert!(matches!(ck.blob("nope"), Err(Error::NotFound(_))));
    assert!(matches!(ck.tensor_meta("nope"), Err(Error::NotFound(_))));
}
