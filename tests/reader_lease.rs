//! Reader leases (a checkpoint deleted while a reader holds it): a segment an open
//! reader — a read-only `Store` in this process or in another — may still read is not freed by
//! a deletion; the reader keeps reading bit-exact; the space is freed by the first delete, gc
//! or open after it closes; a reader killed with SIGKILL does not pin the space.

mod support;

use ckptstore::{Options, Selector, Store};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use support::{assert_holds, commit, data, opts, segment_files, CHUNK};

fn ro() -> Options {
    Options {
        read_only: true,
        ..opts()
    }
}

/// Checkpoint 1 holds `old` (its own segment), checkpoint 2 holds `new`.
fn two_checkpoints(dir: &Path) -> (Store, Vec<u8>, Vec<u8>) {
    let mut w = Store::open(dir, opts()).unwrap();
    let (old, new) = (data(1, 5 * CHUNK + 17), data(2, 3 * CHUNK));
    commit(&mut w, 1, &[("w", &old)]);
    commit(&mut w, 2, &[("w", &new)]);
    (w, old, new)
}

#[test]
fn same_process_reader_keeps_reading_and_space_is_freed_after_it_closes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, old, new) = two_checkpoints(dir.path());
    let before = segment_files(dir.path());
    assert_eq!(before.len(), 2);
    // What freeing checkpoint 1's segment reports: its committed length (space accounting
    // counts committed bytes, not the commit trailer past them: docs/FORMAT.md).
    let committed_1 = w
        .checkpoint(Selector::Id(1))
        .unwrap()
        .manifest()
        .new_segments[0]
        .length;

    // The reader opens (takes its lease) but has not touched a segment yet.
    let r = Store::open(dir.path(), ro()).unwrap();
    let lease = r
        .reader_lease()
        .expect("a reader holds a lease")
        .to_path_buf();
    assert!(lease.starts_with(dir.path().join("readers")), "{lease:?}");

    let info = w.delete(1).unwrap();
    assert!(info.segments_freed.is_empty(), "{info:?}");
    assert_eq!(info.segments_pending.len(), 1, "{info:?}");
    assert_eq!(w.pending_segments().len(), 1);
    assert_eq!(segment_files(dir.path()), before, "nothing unlinked");

    // The reader opens the segment only now, after the delete: bit-exact, verified, and
    // through the zero-copy map too.
    assert_holds(&r, 1, &[("w", &old)]);
    let view = r
        .checkpoint(Selector::Id(1))
        .unwrap()
        .tensor_view("w")
        .unwrap();
    assert!(view.data() == old.as_slice());

    // Still held: gc frees nothing.
    let g = w.gc().unwrap();
    assert!(
        g.segments_freed.is_empty() && g.segments_pending.len() == 1,
        "{g:?}"
    );

    // A reader opened after the delete does not hold the dead segment.
    let late = Store::open(dir.path(), ro()).unwrap();
    assert_eq!(late.list().len(), 1);
    drop(r);
    assert!(!lease.exists(), "the lease file goes with its reader");
    // The view outlives its store: its map keeps the bytes (unlink does not touch them).
    let g = w.gc().unwrap();
    assert_eq!(g.segments_freed.len(), 1, "{g:?}");
    assert_eq!(g.bytes_freed, committed_1);
    assert!(before.values().next().copied().unwrap() > committed_1);
    assert!(w.pending_segments().is_empty());
    assert_eq!(segment_files(dir.path()).len(), 1);
    assert!(view.data() == old.as_slice());
    assert_holds(&late, 2, &[("w", &new)]);
    assert_holds(&w, 2, &[("w", &new)]);
}

#[test]
fn writer_reopened_while_a_reader_holds_a_deleted_segment_keeps_it_until_the_reader_goes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, old, _) = two_checkpoints(dir.path());
    let r = Store::open(dir.path(), ro()).unwrap();
    w.delete(1).unwrap();
    drop(w); // the in-memory pending list is gone; the file is an orphan on disk

    let mut w = Store::open(dir.path(), opts()).unwrap();
    let rep = w.recovery_report();
    assert_eq!(rep.orphans_leased.len(), 1, "{rep:?}");
    assert_eq!(segment_files(dir.path()).len(), 2);
    assert_holds(&r, 1, &[("w", &old)]);
    drop(r);
    let g = w
        .gc_with(ckptstore::GcOptions::default(), |_, _| {})
        .unwrap();
    assert_eq!(g.segments_freed.len(), 1, "{g:?}");
    assert_eq!(segment_files(dir.path()).len(), 1);
}

/// Readers in threads open, read the newest checkpoint and verify it, again and again, while
/// the writer commits and deletes: every read succeeds (a reader never finds a segment gone
/// between reading the WAL and reading the data — the lease is taken before the WAL is read).
#[test]
fn readers_racing_deletions_always_read_what_they_opened() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = Store::open(dir.path(), opts()).unwrap();
    commit(&mut w, 0, &[("w", &data(0, 2 * CHUNK))]);
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let readers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let mut reads = 0;
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        let r = Store::open(dir.path(), ro()).unwrap();
                        let ck = r.checkpoint(Selector::Latest).unwrap();
                        let step = ck.info().step;
                        let t = ck.tensor("w").unwrap();
                        assert!(t.data == data(step, 2 * CHUNK), "step {step}");
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        for step in 1..=60 {
            commit(&mut w, step, &[("w", &data(step, 2 * CHUNK))]);
            let oldest = w.list()[0].id;
            w.delete(oldest).unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for r in readers {
            assert!(r.join().unwrap() > 0);
        }
    });
    // Every reader is gone: one more gc leaves exactly the live segment.
    w.gc().unwrap();
    assert!(w.pending_segments().is_empty());
    assert_eq!(segment_files(dir.path()).len(), 1);
}

// ---- another process ---------------------------------------------------------------------

const CHILD_ENV: &str = "CKPT_LEASE_CHILD_DIR";

/// The bytes as hex: what the child prints, compared whole (bit-exact).
fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Not a test: the reader process of the tests below (this binary, run again). Opens the store
/// read-only, says `ready`, and for each line `read ID` on stdin prints `ID <tensor w as
/// hex>`; exits at end of input.
#[test]
#[ignore = "child process of the cross-process lease tests"]
fn child_reader() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let r = Store::open(&dir, ro()).unwrap();
    println!("ready {}", r.reader_lease().unwrap().display());
    std::io::stdout().flush().unwrap();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let id: u64 = line.strip_prefix("read ").unwrap().parse().unwrap();
        let t = r.checkpoint(Selector::Id(id)).unwrap().tensor("w").unwrap();
        println!("{id} {}", hex(&t.data));
        std::io::stdout().flush().unwrap();
    }
}

struct Reader {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Reader {
    fn spawn(dir: &Path) -> Reader {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_reader", "--ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .env(CHILD_ENV, dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut r = Reader { child, out };
        r.expect("ready ");
        r
    }

    /// Reads stdout lines until one holds `prefix` (the first may follow libtest's "test
    /// child_reader ... " on the same line); returns it from `prefix` on.
    fn expect(&mut self, prefix: &str) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.out.read_line(&mut line).unwrap();
            assert!(n > 0, "child ended before {prefix:?}");
            if let Some(at) = line.find(prefix) {
                return line[at..].trim_end().to_string();
            }
        }
    }

    fn read(&mut self, id: u64) -> String {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "read {id}").unwrap();
        stdin.flush().unwrap();
        let line = self.expect(&format!("{id} "));
        line.split_once(' ').unwrap().1.to_string()
    }
}

#[test]
fn another_process_keeps_reading_a_deleted_checkpoint_and_space_is_freed_after_it_exits() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, old, new) = two_checkpoints(dir.path());
    let mut reader = Reader::spawn(dir.path());

    let info = w.delete(1).unwrap();
    assert_eq!(info.segments_pending.len(), 1, "{info:?}");
    assert_eq!(segment_files(dir.path()).len(), 2);
    // The child opens the deleted checkpoint's segment only now.
    let want = hex(&old);
    assert_eq!(reader.read(1), want);
    assert_eq!(reader.read(2), hex(&new));
    assert!(w.gc().unwrap().segments_freed.is_empty());
    assert_eq!(reader.read(1), want, "still readable after a gc");

    drop(reader.child.stdin.take()); // end of input: the child exits normally
    assert!(reader.child.wait().unwrap().success());
    let g = w.gc().unwrap();
    assert_eq!(g.segments_freed.len(), 1, "{g:?}");
    assert_eq!(segment_files(dir.path()).len(), 1);
    assert!(std::fs::read_dir(dir.path().join("readers"))
        .unwrap()
        .next()
        .is_none());
}

#[test]
fn a_reader_killed_with_sigkill_does_not_pin_space() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, old, _) = two_checkpoints(dir.path());
    let mut reader = Reader::spawn(dir.path());
    assert_eq!(reader.read(1), hex(&old));
    assert_eq!(w.delete(1).unwrap().segments_pending.len(), 1);

    reader.child.kill().unwrap(); // SIGKILL: no destructor runs, the lease file stays
    reader.child.wait().unwrap();
    let leases: Vec<_> = std::fs::read_dir(dir.path().join("readers"))
        .unwrap()
        .collect();
    assert_eq!(
        leases.len(),
        1,
        "the dead reader's lease file is left behind"
    );

    // The kernel dropped its lock: the next gc sees a stale lease, removes it, frees the space.
    let g = w.gc().unwrap();
    assert_eq!(g.segments_freed.len(), 1, "{g:?}");
    assert_eq!(segment_files(dir.path()).len(), 1);
    assert!(std::fs::read_dir(dir.path().join("readers"))
        .unwrap()
        .next()
        .is_none());

    // The same through an open: a writer that crashed with the segment pending, a reader
    // killed, and the next open frees it.
    let mut reader = Reader::spawn(dir.path());
    commit(&mut w, 3, &[("w", &data(3, CHUNK))]);
    assert_eq!(w.delete(2).unwrap().segments_pending.len(), 1);
    drop(w);
    reader.child.kill().unwrap();
    reader.child.wait().unwrap();
    let w = Store::open(dir.path(), opts()).unwrap();
    assert!(w.recovery_report().orphans_leased.is_empty());
    assert_eq!(w.recovery_report().orphan_segments.len(), 1);
    assert_eq!(segment_files(dir.path()).len(), 1);
    assert!(w.pending_segments().is_empty());
}
