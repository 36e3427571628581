//! The bucket tier end to end: a bucket store (`Store::open(URL)`) and a local store with a
//! replica, on a `file://` bucket (always) and on a real S3 protocol server (moto_server on
//! 127.0.0.1; skipped with a message when it is missing, mandatory in CI). Crash invariants:
//! the writer stopped before any request (the fault injector's stop, as the bucket sees a
//! SIGKILL), two writers racing, transient faults retried then a typed error, leftovers
//! removed at the next open, a newer commit object refused.

mod remote_support;
mod support;

use ckptstore::remote::{self, Bucket, Fault, Faults, Replication, RetryPolicy};
use ckptstore::{Error, Options, Store};
use remote_support::{file_url, s3_url, SECRET};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use support::{assert_holds, commit, data};

fn policy() -> RetryPolicy {
    RetryPolicy {
        attempts: 4,
        backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        request_timeout: Duration::from_secs(20),
        part_size: 5 << 20,
        parts_in_flight: 2,
        orphan_grace: Duration::ZERO,
    }
}

fn opts(cache: &Path) -> Options {
    Options {
        chunk_size: support::CHUNK,
        cache_dir: Some(cache.to_path_buf()),
        remote_policy: policy(),
        ..Default::default()
    }
}

fn faulty(cache: &Path, faults: &Arc<Faults>) -> Options {
    Options {
        remote_faults: Some(faults.clone()),
        ..opts(cache)
    }
}

fn bucket(url: &str) -> Bucket {
    Bucket::open(&url.parse().unwrap())
        .unwrap()
        .with_policy(policy())
}

/// Every object of the store is named by its newest commit object, which is the only one.
fn assert_no_leftovers(url: &str) {
    let b = bucket(url);
    let head = remote::latest(&b).unwrap();
    let mut named: BTreeSet<String> = BTreeSet::new();
    if let Some(h) = &head {
        named.insert(remote::log_key(h.seq));
        named.extend(h.segments.values().map(|s| s.key.clone()));
    }
    let mut all: BTreeSet<String> = BTreeSet::new();
    for dir in [remote::LOG_DIR, remote::SEGMENTS_DIR] {
        all.extend(b.list(dir).unwrap().into_iter().map(|o| o.key));
    }
    assert_eq!(all, named, "{url}: objects no commit names");
}

fn big() -> Vec<u8> {
    data(1, (7 << 20) + 123) // more than 1¼ parts of 5 MiB: a multipart upload
}

fn round_trip(url: &str) {
    let cache = tempfile::tempdir().unwrap();
    let (w, b) = (big(), data(2, 10_000));
    {
        let mut s = Store::open(url, opts(&cache.path().join("a"))).unwrap();
        assert!(s.list().is_empty());
        commit(&mut s, 1, &[("w", &w)]);
        commit(&mut s, 2, &[("w", &w), ("b", &b)]);
        assert!(s
            .replication()
            .iter()
            .all(|(_, r)| *r == Replication::Replicated));
    }
    // Another host: an empty cache pulls the bucket's state.
    {
        let s = Store::open(url, opts(&cache.path().join("b"))).unwrap();
        assert_eq!(s.list().len(), 2);
        assert_holds(&s, 1, &[("w", &w)]);
        assert_holds(&s, 2, &[("w", &w), ("b", &b)]);
    }
    // The first cache is stale now (b opened as writer but wrote nothing: still current).
    let mut s = Store::open(url, opts(&cache.path().join("a"))).unwrap();
    s.delete(1).unwrap();
    let c = data(3, 5000);
    commit(&mut s, 3, &[("c", &c)]);
    drop(s);
    assert_no_leftovers(url);
    let s = Store::open(url, opts(&cache.path().join("c"))).unwrap();
    assert_eq!(s.list().iter().map(|c| c.id).collect::<Vec<_>>(), [2, 3]);
    assert_holds(&s, 2, &[("w", &w), ("b", &b)]);
    assert_holds(&s, 3, &[("c", &c)]);
}

#[test]
fn bucket_store_round_trip_file() {
    let (_d, url) = file_url();
    round_trip(&url);
}

#[test]
fn bucket_store_round_trip_s3() {
    let Some(url) = s3_url("round_trip") else {
        return;
    };
    round_trip(&url);
}

fn two_writers(url: &str) {
    let cache = tempfile::tempdir().unwrap();
    // Concurrent writers: an open's sweep must not take the other's upload in flight for a
    // leftover (the grace this test's other stores set to zero).
    let opts = |dir: &Path| {
        let mut o = opts(dir);
        o.remote_policy.orphan_grace = Duration::from_secs(3600);
        o
    };
    let mut a = Store::open(url, opts(&cache.path().join("a"))).unwrap();
    let mut b = Store::open(url, opts(&cache.path().join("b"))).unwrap();
    let x = data(4, 3000);
    commit(&mut a, 1, &[("x", &x)]);
    let mut t = b.begin(1).unwrap();
    t.put_tensor("y", ckptstore::DType::U8, &[10], &[7; 10])
        .unwrap();
    let e = t.commit().unwrap_err();
    assert!(matches!(e, Error::WriterConflict { seq: 1, .. }), "{e}");
    assert!(b.poisoned().is_some());
    drop((a, b));
    // Exactly one of two concurrent commits wins.
    let handles: Vec<_> = ["p", "q"]
        .into_iter()
        .map(|name| {
            let (url, dir) = (url.to_string(), cache.path().join(name));
            std::thread::spawn(move || {
                let mut s = Store::open(&url, opts(&dir)).unwrap();
                let mut t = s.begin(2).unwrap();
                t.put_tensor(name, ckptstore::DType::U8, &[4], &[1, 2, 3, 4])
                    .unwrap();
                t.commit().map(|_| ())
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let won = results.iter().filter(|r| r.is_ok()).count();
    // Both may open after each other's commit; then both win in turn. Never both at one seq.
    for r in &results {
        if let Err(e) = r {
            assert!(matches!(e, Error::WriterConflict { .. }), "{e}");
        }
    }
    assert!(won >= 1);
    let s = Store::open(url, opts(&cache.path().join("check"))).unwrap();
    assert_eq!(s.list().len(), 1 + won);
    for c in s.list() {
        s.verify(c.id).unwrap();
    }
    assert_holds(&s, 1, &[("x", &x)]);
}

#[test]
fn two_writers_one_wins_file() {
    let (_d, url) = file_url();
    two_writers(&url);
}

#[test]
fn two_writers_one_wins_s3() {
    let Some(url) = s3_url("two_writers") else {
        return;
    };
    two_writers(&url);
}

fn faults_retry_then_fail(url: &str) {
    let cache = tempfile::tempdir().unwrap();
    let faults = Arc::new(Faults::new());
    let x = big();
    {
        let mut s = Store::open(url, faulty(&cache.path().join("a"), &faults)).unwrap();
        // Transient errors and a request slower than the timeout: retried, the commit lands.
        let n = faults.requests();
        faults.at(n + 1, Fault::Error);
        faults.at(n + 2, Fault::Error);
        faults.at(n + 4, Fault::Error);
        commit(&mut s, 1, &[("x", &x)]);
        // Every request failing: bounded retries, then a typed error and no commit.
        faults.every(Some(Fault::Error));
        let mut t = s.begin(2).unwrap();
        t.put_tensor("y", ckptstore::DType::U8, &[8 << 20], &data(5, 8 << 20))
            .unwrap();
        let e = t.commit().unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, Error::Remote { .. }) && msg.contains("gave up after 4 attempts"),
            "{msg}"
        );
        assert!(!msg.contains(SECRET));
        assert!(s.poisoned().is_some());
        faults.every(None);
    }
    // The next open: the bucket holds checkpoint 1 only, and nothing leaked.
    let s = Store::open(url, opts(&cache.path().join("a"))).unwrap();
    assert_eq!(s.list().len(), 1);
    assert_holds(&s, 1, &[("x", &x)]);
    drop(s);
    assert_no_leftovers(url);
}

#[test]
fn faults_are_retried_then_a_typed_error_file() {
    let (_d, url) = file_url();
    faults_retry_then_fail(&url);
}

#[test]
fn faults_are_retried_then_a_typed_error_s3() {
    let Some(url) = s3_url("faults") else {
        return;
    };
    faults_retry_then_fail(&url);
}

#[test]
fn a_slow_request_times_out_and_is_retried() {
    let (_d, url) = file_url();
    let cache = tempfile::tempdir().unwrap();
    let faults = Arc::new(Faults::new());
    let mut o = faulty(cache.path(), &faults);
    o.remote_policy.request_timeout = Duration::from_millis(200);
    let mut s = Store::open(&url, o).unwrap();
    let n = faults.requests();
    // Far slower than the timeout, so that the commit finishing before the slow request
    // would have proves it was abandoned, however slowly this machine runs the rest (with
    // 5 s, a commit that took 5 s on a loaded machine would have failed the test).
    let slow = Duration::from_secs(60);
    faults.at(n + 1, Fault::Slow(slow));
    let t0 = std::time::Instant::now();
    commit(&mut s, 1, &[("x", &[1, 2, 3])]);
    assert!(t0.elapsed() < slow, "the slow request was not abandoned");
    assert!(faults.requests() > n + 1);
}

/// A bucket store uploads a checkpoint's segment while the checkpoint is being written (its
/// parts go out before `commit` is called), and a writer that dies mid-stream commits
/// nothing: the next open sees the previous checkpoint, whole, and no leftover.
fn stopped_mid_stream(url: &str) {
    let cache = tempfile::tempdir().unwrap();
    let faults = Arc::new(Faults::new());
    let (x, y) = (data(11, 10_000), data(12, 16 << 20)); // y: four 5 MiB parts
    {
        let mut s = Store::open(url, faulty(&cache.path().join("a"), &faults)).unwrap();
        commit(&mut s, 1, &[("x", &x)]);
        let before = faults.requests();
        // The second part is slow: the writer is surely stopped while it is in flight.
        faults.at(before + 3, Fault::Slow(Duration::from_millis(300)));
        let mut t = s.begin(2).unwrap();
        t.put_tensor("y", ckptstore::DType::U8, &[y.len() as u64], &y)
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while faults.requests() < before + 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "no part uploaded before the commit (the segment is not streamed)"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        faults.stop_after(faults.requests());
        let e = t.commit().unwrap_err();
        assert!(matches!(e, Error::Remote { .. }), "{e}");
    }
    let s = Store::open(url, opts(&cache.path().join("b"))).unwrap();
    assert_eq!(s.list().iter().map(|c| c.id).collect::<Vec<_>>(), [1]);
    assert_holds(&s, 1, &[("x", &x)]);
    drop(s);
    assert_no_leftovers(url);
}

#[test]
fn a_writer_stopped_mid_stream_commits_nothing_file() {
    let (_d, url) = file_url();
    stopped_mid_stream(&url);
}

#[test]
fn a_writer_stopped_mid_stream_commits_nothing_s3() {
    let Some(url) = s3_url("mid_stream") else {
        return;
    };
    stopped_mid_stream(&url);
}

/// The writer's operations of the crash sweep, each a state of the store after it.
type States = Vec<BTreeMap<u64, Vec<(&'static str, Vec<u8>)>>>;

fn run_ops(s: &mut Store, w: &[u8], b: &[u8]) -> Result<(), Error> {
    let mut t = s.begin(1)?;
    t.put_tensor("w", ckptstore::DType::U8, &[w.len() as u64], w)?;
    t.commit()?;
    let mut t = s.begin(2)?;
    t.put_tensor("w", ckptstore::DType::U8, &[w.len() as u64], w)?;
    t.put_tensor("b", ckptstore::DType::U8, &[b.len() as u64], b)?;
    t.commit()?;
    s.delete(1)?;
    Ok(())
}

fn states(w: &[u8], b: &[u8]) -> States {
    let one = || (1, vec![("w", w.to_vec())]);
    let two = || (2, vec![("w", w.to_vec()), ("b", b.to_vec())]);
    vec![
        BTreeMap::new(),
        [one()].into(),
        [one(), two()].into(),
        [two()].into(),
    ]
}

/// Stops the writer before its n-th request for every n until a run completes; after each,
/// a new open (another host) sees one of the states the writer went through, every
/// checkpoint bit-exact, and leaves nothing no commit names.
fn crash_sweep(base: &str, mkdir: impl Fn(u64)) {
    let (w, b) = (big(), data(7, 20_000));
    let expected = states(&w, &b);
    for n in 0.. {
        mkdir(n);
        let url = format!("{base}/{n}");
        let cache = tempfile::tempdir().unwrap();
        let faults = Arc::new(Faults::new());
        faults.stop_after(n);
        let finished = match Store::open(&url, faulty(&cache.path().join("w"), &faults)) {
            Ok(mut s) => run_ops(&mut s, &w, &b).is_ok(),
            Err(_) => false,
        };
        let s = Store::open(&url, opts(&cache.path().join("r"))).unwrap();
        let got: BTreeMap<u64, Vec<(&str, Vec<u8>)>> = s
            .list()
            .iter()
            .map(|c| {
                let st = expected
                    .iter()
                    .find_map(|st| st.get(&c.id))
                    .unwrap_or_else(|| panic!("n={n}: unknown checkpoint {}", c.id));
                (c.id, st.clone())
            })
            .collect();
        assert!(
            expected.contains(&got),
            "n={n}: checkpoints {:?} are not a state the writer went through",
            got.keys()
        );
        for (id, tensors) in &got {
            let t: Vec<(&str, &[u8])> = tensors.iter().map(|(n, d)| (*n, &d[..])).collect();
            assert_holds(&s, *id, &t);
        }
        drop(s);
        assert_no_leftovers(&url);
        if finished {
            assert_eq!(&got, expected.last().unwrap());
            assert!(n > 5, "the sweep stopped too early ({n})");
            break;
        }
        assert!(n < 200, "the writer never finished");
    }
}

#[test]
fn crash_sweep_file() {
    let (d, url) = file_url();
    let root = d.path().to_path_buf();
    crash_sweep(&url, |n| {
        std::fs::create_dir_all(root.join(n.to_string())).unwrap()
    });
}

#[test]
fn crash_sweep_s3() {
    let Some(url) = s3_url("crash_sweep") else {
        return;
    };
    crash_sweep(&url, |_| {});
}

fn replica_restore(url: &str) {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("local");
    let ropts = || Options {
        replica: Some(url.to_string()),
        ..opts(&root.path().join("cache"))
    };
    let (w, b) = (big(), data(8, 7000));
    {
        let mut s = Store::open(&dir, ropts()).unwrap();
        commit(&mut s, 1, &[("w", &w)]);
        commit(&mut s, 2, &[("w", &w), ("b", &b)]);
        s.wait_replicated(Some(Duration::from_secs(60))).unwrap();
        assert_eq!(
            s.replication(),
            [(1, Replication::Replicated), (2, Replication::Replicated)]
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
    {
        let mut s = Store::open(&dir, ropts()).unwrap();
        assert_eq!(s.list().len(), 2);
        assert_holds(&s, 1, &[("w", &w)]);
        assert_holds(&s, 2, &[("w", &w), ("b", &b)]);
        let info = commit(&mut s, 3, &[("b", &b)]);
        assert_eq!(info.checkpoint.id, 3);
        assert_eq!(info.chunks_deduplicated, 2); // b's chunks are in the restored segments
        s.delete(1).unwrap();
        s.wait_replicated(Some(Duration::from_secs(60))).unwrap();
    }
    let pulled = root.path().join("pulled");
    let seq = ckptstore::store::pull(url, &pulled, &opts(root.path())).unwrap();
    assert!(seq.is_some());
    let s = Store::open(&pulled, Options::read_only()).unwrap();
    assert_eq!(s.list().iter().map(|c| c.id).collect::<Vec<_>>(), [2, 3]);
    assert_holds(&s, 3, &[("b", &b)]);
    assert_no_leftovers(url);
}

#[test]
fn replica_restores_a_lost_directory_file() {
    let (_d, url) = file_url();
    replica_restore(&url);
}

#[test]
fn replica_restores_a_lost_directory_s3() {
    let Some(url) = s3_url("replica_restore") else {
        return;
    };
    replica_restore(&url);
}

/// The replicator stopped before its n-th request: the commits stay local and durable, the
/// bucket holds a state the local store went through (a prefix of its commits), every
/// replicated checkpoint verifies, and a reopen resumes and catches up.
fn replicator_stopped(base: &str, mkdir: impl Fn(u64)) {
    let (w, b) = (big(), data(9, 9000));
    let expected = states(&w, &b);
    for n in [0, 3, 5, 6, 7, 8, 9, 10, 12, 14, 17, 20] {
        mkdir(n);
        let url = format!("{base}/{n}");
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("local");
        let faults = Arc::new(Faults::new());
        faults.stop_after(n);
        let o = |f: Option<&Arc<Faults>>| Options {
            replica: Some(url.clone()),
            remote_faults: f.cloned(),
            ..opts(root.path())
        };
        match Store::open(&dir, o(Some(&faults))) {
            Ok(mut s) => {
                run_ops(&mut s, &w, &b).unwrap();
                // Let the replicator get where it gets before the "kill".
                let _ = s.wait_replicated(Some(Duration::from_secs(10)));
            }
            Err(e) => assert!(matches!(e, Error::Remote { .. }), "{e}"),
        }
        let pulled = root.path().join(format!("pulled{n}"));
        if ckptstore::store::pull(&url, &pulled, &opts(root.path()))
            .unwrap()
            .is_some()
        {
            let s = Store::open(&pulled, Options::read_only()).unwrap();
            let ids: BTreeSet<u64> = s.list().iter().map(|c| c.id).collect();
            assert!(
                expected
                    .iter()
                    .any(|st| st.keys().copied().collect::<BTreeSet<_>>() == ids),
                "n={n}: replica holds {ids:?}"
            );
            for c in s.list() {
                s.verify(c.id).unwrap();
            }
        }
        let s = Store::open(&dir, o(None)).unwrap();
        s.wait_replicated(Some(Duration::from_secs(60))).unwrap();
        assert!(s
            .replication()
            .iter()
            .all(|(_, r)| *r == Replication::Replicated));
        drop(s);
        assert_no_leftovers(&url);
    }
}

#[test]
fn replicator_stopped_anywhere_file() {
    let (d, url) = file_url();
    let root = d.path().to_path_buf();
    replicator_stopped(&url, |n| {
        std::fs::create_dir_all(root.join(n.to_string())).unwrap()
    });
}

#[test]
fn replicator_stopped_anywhere_s3() {
    let Some(url) = s3_url("replicator_stopped") else {
        return;
    };
    replicator_stopped(&url, |_| {});
}

#[test]
fn missing_bucket_is_a_clear_error_before_anything_is_written() {
    let root = tempfile::tempdir().unwrap();
    let missing = format!("file://{}/nope", root.path().display());
    let e = Store::open(&missing, opts(&root.path().join("cache"))).unwrap_err();
    assert!(matches!(e, Error::Remote { .. }), "{e}");
    let dir = root.path().join("local");
    let o = Options {
        replica: Some(missing),
        ..opts(root.path())
    };
    assert!(Store::open(&dir, o).is_err());
    assert!(
        !dir.exists(),
        "the local store was created before the check"
    );
    let Some(_) = remote_support::moto() else {
        return;
    };
    let e = Store::open("s3://no-such-bucket-here/p", opts(&root.path().join("c")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("does the bucket exist"), "{e}");
    assert!(!e.contains(SECRET), "{e}");
}

#[test]
fn credentials_never_in_debug_or_errors() {
    let Some(url) = s3_url("credentials") else {
        return;
    };
    let cache = tempfile::tempdir().unwrap();
    let faults = Arc::new(Faults::new());
    let mut s = Store::open(&url, faulty(cache.path(), &faults)).unwrap();
    faults.every(Some(Fault::Error));
    let mut t = s.begin(1).unwrap();
    t.put_tensor("x", ckptstore::DType::U8, &[3], &[1, 2, 3])
        .unwrap();
    let e = t.commit().unwrap_err();
    for text in [
        format!("{e}"),
        format!("{e:?}"),
        format!("{s:?}"),
        format!("{:?}", s.options()),
        format!("{:?}", bucket(&url)),
    ] {
        assert!(!text.contains(SECRET), "{text}");
        assert!(!text.contains("testing-key-id"), "{text}");
    }
}

#[test]
fn a_newer_commit_object_is_refused_by_name() {
    let (_d, url) = file_url();
    let cache = tempfile::tempdir().unwrap();
    let mut s = Store::open(&url, opts(&cache.path().join("a"))).unwrap();
    commit(&mut s, 1, &[("x", &[1, 2, 3])]);
    drop(s);
    let b = bucket(&url);
    let head = remote::latest(&b).unwrap().unwrap();
    let mut bytes = remote::CommitObject {
        seq: head.seq + 1,
        ..head
    }
    .encode();
    bytes.truncate(bytes.len() - 4);
    bytes[14] = 1 << 7; // an incompatible feature this build does not know
    let crc = crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    assert!(b.put_create(&remote::log_key(2), bytes).unwrap());
    let e = Store::open(&url, opts(&cache.path().join("b"))).unwrap_err();
    assert!(matches!(e, Error::NewerFormat { .. }), "{e}");
    assert!(e.to_string().contains("incompatible feature bit 7"), "{e}");
}

/// CRC32C (Castagnoli), bitwise: the commit object's checksum, computed independently.
fn crc32c(b: &[u8]) -> u32 {
    let mut c = !0u32;
    for &x in b {
        c ^= x as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
        }
    }
    !c
}

#[test]
fn cli_commands_take_a_url() {
    let (_d, url) = file_url();
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("cache");
    let x = data(11, 9000);
    {
        let mut s = Store::open(&url, opts(&cache.join("w"))).unwrap();
        commit(&mut s, 5, &[("x", &x)]);
    }
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ckptstore"))
            .args(args)
            .env("CKPTSTORE_CACHE_DIR", &cache)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {text}");
        text
    };
    let ls = run(&["ls", &url, "--json"]);
    assert!(
        ls.contains("\"step\": 5") || ls.contains("\"step\":5"),
        "{ls}"
    );
    run(&["verify", &url]);
    run(&["inspect", &url, "5"]);
    let st = root.path().join("x.safetensors");
    run(&["export", &url, st.to_str().unwrap()]);
    run(&["import", st.to_str().unwrap(), &url, "--step", "6"]);
    run(&["gc", &url, "--keep-last", "1"]);
    let ls = run(&["ls", &url, "--json"]);
    assert!(
        !ls.contains("\"step\": 5") && ls.contains("\"step\": 6"),
        "{ls}"
    );
    let dir = root.path().join("pulled");
    run(&["pull", &url, dir.to_str().unwrap()]);
    let s = Store::open(&dir, Options::read_only()).unwrap();
    assert_eq!(s.list().len(), 1);
    assert_eq!(s.list()[0].step, 6);
    assert!(!s.segments_in_bucket().is_empty(), "pull is lazy");

    // A directory is not a URL to pull from, and a store is not pulled over.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ckptstore"))
        .args(["pull", &url, dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    // --all: every segment now; the directory no longer needs the bucket.
    let all = root.path().join("pulled-all");
    run(&["pull", &url, all.to_str().unwrap(), "--all"]);
    let s = Store::open(&all, Options::read_only()).unwrap();
    assert!(s.segments_in_bucket().is_empty());
    drop(s);
    std::fs::remove_dir_all(_d.path()).unwrap();
    let s = Store::open(&all, Options::read_only()).unwrap();
    assert_holds(&s, s.list()[0].id, &[("x", &x)]);
}

/// Runs the CLI with `args`; its stdout, or a panic with its output when it fails.
fn cli(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ckptstore"))
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// `ckptstore bench --dir URL`: save and load GB/s and requests per checkpoint, and the
/// bench leaves nothing in the bucket.
fn bench_on_a_url(url: &str) {
    let out = cli(&[
        "bench", "--dir", url, "--size", "6MiB", "--rounds", "1", "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["save_gb_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["load_gb_s"].as_f64().unwrap() > 0.0, "{v}");
    // At least a segment upload and the commit object; the load lists, gets and downloads.
    assert!(v["save_requests"].as_u64().unwrap() >= 2, "{v}");
    assert!(v["load_requests"].as_u64().unwrap() >= 3, "{v}");
    let b = bucket(url);
    for dir in [remote::LOG_DIR, remote::SEGMENTS_DIR] {
        assert!(b.list(dir).unwrap().is_empty(), "the bench left {dir}/");
    }
    let text = cli(&["bench", "--dir", url, "--size", "1MiB", "--rounds", "1"]);
    assert!(text.contains("GB/s") && text.contains("requests"), "{text}");
}

#[test]
fn cli_bench_takes_a_url_file() {
    let (_d, url) = file_url();
    bench_on_a_url(&url);
}

#[test]
fn cli_bench_takes_a_url_s3() {
    let Some(url) = s3_url("cli_bench") else {
        return;
    };
    bench_on_a_url(&url);
}

/// `ckptstore recover URL`: reports the newest commit object; objects no commit names are
/// removed once older than the grace (a superseded commit object at once), or only reported
/// with --dry-run.
fn recover_a_url(url: &str) {
    let cache = tempfile::tempdir().unwrap();
    let x = data(21, 9000);
    {
        let mut s = Store::open(url, opts(cache.path())).unwrap();
        commit(&mut s, 1, &[("x", &x)]);
        commit(&mut s, 2, &[("x", &x)]);
    }
    let b = bucket(url);
    let head = remote::latest(&b).unwrap().unwrap().seq;
    let stale_log = remote::log_key(head - 1);
    let orphan = remote::segment_key("0123456789abcdef", 42);
    assert!(b.put_create(&stale_log, b"old".to_vec()).unwrap());
    assert!(b.put_create(&orphan, vec![7; 5000]).unwrap());
    let json = |args: &[&str]| -> serde_json::Value {
        serde_json::from_str(&cli(&[&["recover", url, "--json"], args].concat())).unwrap()
    };
    let unnamed = |v: &serde_json::Value| -> BTreeMap<String, (bool, bool)> {
        v["unnamed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                let flag = |k: &str| o[k].as_bool().unwrap();
                (
                    o["key"].as_str().unwrap().to_string(),
                    (flag("removable"), flag("removed")),
                )
            })
            .collect()
    };
    let v = json(&["--dry-run", "--grace-secs", "0"]);
    assert_eq!(v["seq"].as_u64(), Some(head), "{v}");
    assert_eq!(v["checkpoints"].as_u64(), Some(2), "{v}");
    assert_eq!(
        unnamed(&v),
        [
            (stale_log.clone(), (true, false)),
            (orphan.clone(), (true, false))
        ]
        .into()
    );
    assert!(b.get(&orphan).unwrap().is_some() && b.get(&stale_log).unwrap().is_some());
    // The default grace (an hour) keeps the young orphan: it may be an upload in flight.
    let v = json(&[]);
    assert_eq!(
        unnamed(&v),
        [(stale_log, (true, true)), (orphan.clone(), (false, false))].into()
    );
    let text = cli(&["recover", url, "--grace-secs", "0"]);
    assert!(
        text.contains(&remote::log_key(head)) && text.contains(&orphan) && text.contains("removed"),
        "{text}"
    );
    assert_no_leftovers(url);
    let s = Store::open(url, opts(&cache.path().join("again"))).unwrap();
    assert_holds(&s, 2, &[("x", &x)]);
    // Directory-only flags are refused on a URL, URL-only flags on a directory.
    for args in [
        vec!["recover", url, "--salvage"],
        vec!["recover", cache.path().to_str().unwrap(), "--dry-run"],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ckptstore"))
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
    }
}

#[test]
fn cli_recover_takes_a_url_file() {
    let (_d, url) = file_url();
    recover_a_url(&url);
}

#[test]
fn cli_recover_takes_a_url_s3() {
    let Some(url) = s3_url("cli_recover") else {
        return;
    };
    recover_a_url(&url);
}

#[test]
fn the_replica_keeps_more_with_replica_keep_last() {
    let (_d, url) = file_url();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("local");
    let o = || Options {
        replica: Some(url.clone()),
        replica_keep_last: Some(3),
        ..opts(root.path())
    };
    let xs: Vec<Vec<u8>> = (0..5).map(|i| data(20 + i, 6000)).collect();
    {
        let mut s = Store::open(&dir, o()).unwrap();
        for (i, x) in xs.iter().enumerate() {
            commit(&mut s, i as u64, &[("x", x)]);
            // The local store keeps one checkpoint; the bucket the newest three.
            let older: Vec<u64> = s.list().iter().rev().skip(1).map(|c| c.id).collect();
            for id in older {
                s.delete(id).unwrap();
            }
            s.wait_replicated(Some(Duration::from_secs(60))).unwrap();
        }
        assert_eq!(s.list().len(), 1);
    }
    let pulled = root.path().join("pulled");
    ckptstore::store::pull(&url, &pulled, &opts(root.path())).unwrap();
    let s = Store::open(&pulled, Options::read_only()).unwrap();
    assert_eq!(s.list().iter().map(|c| c.id).collect::<Vec<_>>(), [3, 4, 5]);
    for id in 3..=5u64 {
        assert_holds(&s, id, &[("x", &xs[id as usize - 1])]);
    }
    drop(s);
    assert_no_leftovers(&url);
    assert!(Store::open(
        root.path().join("z"),
        Options {
            replica_keep_last: Some(0),
            ..o()
        }
    )
    .is_err());
}

/// A real SIGKILL of `ckptstore import URL` at several points of its publish: a new open from
/// an empty cache sees only whole checkpoints that verify, and after it the bucket holds only
/// what its newest commit object names.
#[test]
fn sigkill_of_the_cli_mid_publish() {
    let (_d, url) = file_url();
    let root = tempfile::tempdir().unwrap();
    let local = root.path().join("local");
    let w = data(30, 24 << 20);
    {
        let mut s = Store::open(&local, opts(root.path())).unwrap();
        commit(&mut s, 1, &[("w", &w)]);
    }
    let st = root.path().join("w.safetensors");
    let bin = env!("CARGO_BIN_EXE_ckptstore");
    let out = std::process::Command::new(bin)
        .args(["export", local.to_str().unwrap(), st.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut last = 0;
    for (i, delay_ms) in [0u64, 40, 100, 200, 400, 800, 1600].into_iter().enumerate() {
        let mut child = std::process::Command::new(bin)
            .args([
                "import",
                st.to_str().unwrap(),
                &url,
                "--step",
                &i.to_string(),
            ])
            .env("CKPTSTORE_CACHE_DIR", root.path().join("cache-w"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        child.wait().unwrap();
        let s = Store::open(&url, opts(&root.path().join(format!("r{i}")))).unwrap();
        let ids: Vec<u64> = s.list().iter().map(|c| c.id).collect();
        assert!(ids.len() <= i + 1 && ids.len() >= last, "{i}: {ids:?}");
        last = ids.len();
        for c in s.list() {
            s.verify(c.id).unwrap();
            assert_eq!(
                s.checkpoint(ckptstore::Selector::Id(c.id))
                    .unwrap()
                    .tensor("w")
                    .unwrap()
                    .data,
                w
            );
        }
        drop(s);
        assert_no_leftovers(&url);
    }
}

/// One rank of a sharded save on a host of its own: its shard written into a scratch
/// directory of its own cache, uploaded, the directory removed (on drop).
fn rank_upload(
    url: &str,
    cache: &Path,
    ids: std::ops::Range<u64>,
    name: &str,
    bytes: &[u8],
) -> (ckptstore::ShardFragment, Vec<(u64, remote::SegmentObject)>) {
    let o = opts(cache);
    let scratch = ckptstore::store::shard_scratch(url, &o).unwrap();
    let mut w = ckptstore::ShardWriter::new(
        scratch.path(),
        ids,
        ckptstore::ShardOptions {
            chunk_size: support::CHUNK,
            segment_max_bytes: 1 << 20,
            io: o.io.clone(),
        },
    )
    .unwrap();
    w.put_tensor(name, ckptstore::DType::U8, &[bytes.len() as u64], bytes)
        .unwrap();
    let frag = w.finish().unwrap();
    let objs = ckptstore::store::upload_shard(url, scratch.path(), &frag, &o).unwrap();
    let dir = scratch.path().to_path_buf();
    drop(scratch);
    assert!(!dir.exists(), "the scratch directory is removed");
    (frag, objs)
}

/// The coordinator's own part (DCP's metadata): written into its cache, last reserved.
fn coordinator_part(s: &mut Store, blob: &[u8]) -> ckptstore::ShardFragment {
    let ids = s.reserve_segment_ids(1, 16).unwrap().remove(0);
    let o = s.options();
    let mut w = ckptstore::ShardWriter::new(
        s.dir(),
        ids,
        ckptstore::ShardOptions {
            chunk_size: o.chunk_size,
            segment_max_bytes: o.segment_max_bytes,
            io: o.io.clone(),
        },
    )
    .unwrap();
    w.put_blob("meta", blob).unwrap();
    w.finish().unwrap()
}

/// A sharded save into a bucket store by "hosts" that share nothing: two ranks upload their
/// shards, the coordinator commits once; a fresh cache reads every part bit-exact, and a
/// rank-partial view fetches only the segments of the tensors it asks for; a writer opened
/// with `open_shard_writer` (a cache of the state only) downloads no segment. Then the crash
/// invariant: ranks upload and the coordinator dies before its commit — no new checkpoint is
/// visible, the previous one loads, and the next writer's open removes the unnamed uploads.
/// Last, a second writer commits between the coordinator's open and its commit: the
/// coordinator gets `WriterConflict` and nothing is overwritten.
fn sharded_save(url: &str) {
    let cache = tempfile::tempdir().unwrap();
    let c = |n: &str| cache.path().join(n);
    let (x, y, z) = (data(11, 300_000), data(12, 200_000), data(13, 5000));
    let mut s = Store::open(url, opts(&c("coord"))).unwrap();
    commit(&mut s, 1, &[("z", &z)]);
    let r = s.reserve_segment_ids(2, 64).unwrap();
    let (f0, o0) = rank_upload(url, &c("rank0"), r[0].clone(), "x", &x);
    let (f1, o1) = rank_upload(url, &c("rank1"), r[1].clone(), "y", &y);
    assert!(o0
        .iter()
        .chain(&o1)
        .all(|(_, o)| o.key.starts_with("segments/")));
    let mine = coordinator_part(&mut s, b"dcp-metadata");
    let uploaded: Vec<_> = o0.iter().chain(&o1).cloned().collect();
    // The coordinator's own segment must be the last one (it holds the commit trailer).
    let e = s
        .commit_external_remote(2, 0, BTreeMap::new(), std::slice::from_ref(&f0), &o0)
        .unwrap_err();
    assert!(e.to_string().contains("highest id"), "{e}");
    // Names that are not an uploaded segment, or one that is not there: refused, no commit.
    let (id, len) = (o0[0].0, o0[0].1.len);
    let frags = [f0.clone(), mine.clone()];
    for (key, why) in [
        (remote::log_key(1), "not the name of an uploaded segment"),
        (remote::segment_key("0123456789abcdef", id), "missing"),
    ] {
        let bad = [(id, remote::SegmentObject { key, len })];
        let e = s
            .commit_external_remote(2, 0, BTreeMap::new(), &frags, &bad)
            .unwrap_err();
        assert!(e.to_string().contains(why), "{e}");
    }
    assert_eq!(s.list().len(), 1);
    let info = s
        .commit_external_remote(2, 0, BTreeMap::new(), &[f0, f1, mine], &uploaded)
        .unwrap();
    assert_eq!(info.step, 2);
    drop(s);
    assert_no_leftovers(url);
    {
        let other = Store::open(url, opts(&c("reader"))).unwrap();
        assert_holds(&other, 1, &[("z", &z)]);
        assert_holds(&other, 2, &[("x", &x), ("y", &y)]);
        assert_eq!(
            other
                .checkpoint(ckptstore::Selector::Id(2))
                .unwrap()
                .blob("meta")
                .unwrap(),
            b"dcp-metadata"
        );
    }
    // A rank's view: only the segments of "y".
    let view = ckptstore::RemoteView::open(url, &opts(&c("view"))).unwrap();
    let need = view.fetch(2, &["y".to_string()]).unwrap();
    let have: Vec<u64> = std::fs::read_dir(view.dir().join("segments"))
        .unwrap()
        .filter_map(|e| ckptstore::segment::parse_file_name(e.unwrap().file_name().to_str()?))
        .collect();
    assert_eq!(
        have.iter().copied().collect::<BTreeSet<_>>(),
        need.iter().copied().collect()
    );
    assert!(!need.is_empty() && need.iter().all(|id| r[1].contains(id)));
    {
        let v = Store::open(
            view.dir(),
            Options {
                read_only: true,
                ..opts(&c("view"))
            },
        )
        .unwrap();
        let ck = v.checkpoint(ckptstore::Selector::Id(2)).unwrap();
        assert_eq!(ck.tensor("y").unwrap().data, y);
        assert!(matches!(
            ck.tensor("x").unwrap_err(),
            Error::SegmentMissing { .. }
        ));
    }

    // The writer of sharded saves with a cache of the state only: it downloads no segment,
    // at its first open or after its commit.
    let own_segments = |cache: &Path| -> BTreeSet<u64> {
        std::fs::read_dir(cache.join("store").join("segments"))
            .unwrap()
            .filter_map(|e| ckptstore::segment::parse_file_name(e.unwrap().file_name().to_str()?))
            .collect()
    };
    let (u, v) = (data(41, 150_000), data(42, 150_000));
    let mut s = ckptstore::store::open_shard_writer(url, opts(&c("sw"))).unwrap();
    assert!(own_segments(&c("sw")).is_empty());
    let r = s.reserve_segment_ids(2, 64).unwrap();
    let (f0, o0) = rank_upload(url, &c("rank0"), r[0].clone(), "u", &u);
    let (f1, o1) = rank_upload(url, &c("rank1"), r[1].clone(), "v", &v);
    let mine = coordinator_part(&mut s, b"m3");
    let uploaded: Vec<_> = o0.iter().chain(&o1).cloned().collect();
    s.commit_external_remote(3, 0, BTreeMap::new(), &[f0, f1, mine.clone()], &uploaded)
        .unwrap();
    drop(s);
    let mine_ids: BTreeSet<u64> = mine.segments().map(|(id, _)| id).collect();
    assert_eq!(own_segments(&c("sw")), mine_ids);
    drop(ckptstore::store::open_shard_writer(url, opts(&c("sw"))).unwrap());
    assert_eq!(
        own_segments(&c("sw")),
        mine_ids,
        "the reopen pulled nothing"
    );
    assert_no_leftovers(url);
    {
        let s = Store::open(url, opts(&c("reader3"))).unwrap();
        assert_holds(&s, 3, &[("u", &u), ("v", &v)]);
    }

    // Crash: the ranks uploaded, the coordinator died before its commit.
    let mut s = ckptstore::store::open_shard_writer(url, opts(&c("sw"))).unwrap();
    let r = s.reserve_segment_ids(2, 64).unwrap();
    let (_, o0) = rank_upload(url, &c("rank0"), r[0].clone(), "x", &data(21, 100_000));
    let (_, o1) = rank_upload(url, &c("rank1"), r[1].clone(), "y", &data(22, 100_000));
    std::mem::forget(s); // killed: no abort, no cleanup
    let b = bucket(url);
    let listed: BTreeSet<String> = b
        .list(remote::SEGMENTS_DIR)
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert!(o0.iter().chain(&o1).all(|(_, o)| listed.contains(&o.key)));
    {
        let ro = Options {
            read_only: true,
            ..opts(&c("after-crash"))
        };
        let s = Store::open(url, ro).unwrap();
        assert_eq!(
            s.list().iter().map(|c| c.step).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_holds(&s, 2, &[("x", &x), ("y", &y)]);
        assert_holds(&s, 3, &[("u", &u), ("v", &v)]);
    }
    // The next writer's open sweeps what no commit names (the grace is zero here).
    drop(Store::open(url, opts(&c("next-writer"))).unwrap());
    assert_no_leftovers(url);

    // Another writer commits between the coordinator's open and its commit.
    let mut s = ckptstore::store::open_shard_writer(url, opts(&c("coord2"))).unwrap();
    let r = s.reserve_segment_ids(1, 64).unwrap();
    let (f0, o0) = rank_upload(url, &c("rank0"), r[0].clone(), "x", &data(31, 100_000));
    let mine = coordinator_part(&mut s, b"m");
    // (with the default grace: a zero one would sweep the rank's upload in flight)
    let mut o = opts(&c("other"));
    o.remote_policy.orphan_grace = Duration::from_secs(3600);
    let mut other = Store::open(url, o).unwrap();
    commit(&mut other, 9, &[("w", &z)]);
    let e = s
        .commit_external_remote(4, 0, BTreeMap::new(), &[f0, mine], &o0)
        .unwrap_err();
    assert!(matches!(e, Error::WriterConflict { .. }), "{e}");
    drop((s, other));
    let s = Store::open(url, opts(&c("final"))).unwrap();
    assert_eq!(
        s.list().iter().map(|c| c.step).collect::<Vec<_>>(),
        [1, 2, 3, 9]
    );
    for ck in s.list() {
        s.verify(ck.id).unwrap();
    }
}

#[test]
fn sharded_save_by_hosts_without_a_shared_dir_file() {
    let (_d, url) = file_url();
    sharded_save(&url);
}

#[test]
fn sharded_save_by_hosts_without_a_shared_dir_s3() {
    let Some(url) = s3_url("sharded_save") else {
        return;
    };
    sharded_save(&url);
}

/// A sealed checkpoint's manifest hides its names from the commit object: a `RemoteView`
/// then fetches every segment of that checkpoint (and no other's), and reads it with the key.
#[test]
fn a_view_of_a_sealed_checkpoint_fetches_all_its_segments() {
    let (_d, url) = file_url();
    let cache = tempfile::tempdir().unwrap();
    let key = || {
        ckptstore::crypt::Key::from_hex(
            "6b3a1f0e9d8c7b6a5948372615040312f1e2d3c4b5a69788796a5b4c3d2e1f00",
        )
        .unwrap()
    };
    let sealed = |dir: &Path| Options {
        encryption_key: Some(key()),
        ..opts(dir)
    };
    let (a, b) = (data(51, 50_000), data(52, 60_000));
    {
        let mut s = Store::open(&url, sealed(&cache.path().join("w"))).unwrap();
        commit(&mut s, 1, &[("a", &a)]);
        commit(&mut s, 2, &[("b", &b)]);
    }
    let view = ckptstore::RemoteView::open(&url, &opts(&cache.path().join("v"))).unwrap();
    let need = view.fetch(2, &["b".to_string()]).unwrap();
    assert!(!need.is_empty());
    // The names cannot be matched: the same segments whatever is asked for.
    assert_eq!(view.fetch(2, &[]).unwrap(), need);
    let have: BTreeSet<u64> = std::fs::read_dir(view.dir().join("segments"))
        .unwrap()
        .filter_map(|e| ckptstore::segment::parse_file_name(e.unwrap().file_name().to_str()?))
        .collect();
    assert_eq!(have, need.iter().copied().collect());
    let s = Store::open(
        view.dir(),
        Options {
            read_only: true,
            ..sealed(&cache.path().join("v"))
        },
    )
    .unwrap();
    assert_holds(&s, 2, &[("b", &b)]);
    let e = s
        .checkpoint(ckptstore::Selector::Id(1))
        .and_then(|ck| ck.tensor("a"))
        .unwrap_err();
    assert!(matches!(e, Error::SegmentMissing { .. }), "{e}");
}

/// `segments/` entries that are not segment files (a fetch's temporary files).
fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir.join("segments"))
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with(".seg"))
                .collect()
        })
        .unwrap_or_default()
}

/// A lazy restore: `pull` and a replica's restore of a lost directory send only the commit
/// log's requests (no segment is downloaded before a read); the first read fetches what it
/// needs and loads bit-exact; a new commit deduplicates against chunks still in the bucket
/// (fetching nothing), gc does not download a segment to compact it, and a delete frees a
/// segment that was never fetched.
fn lazy_restore(url: &str) {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("local");
    let ropts = || Options {
        replica: Some(url.to_string()),
        ..opts(&root.path().join("cache"))
    };
    let (w, b) = (big(), data(40, 9000));
    {
        let mut s = Store::open(&dir, ropts()).unwrap();
        commit(&mut s, 1, &[("w", &w), ("b", &b)]);
        // Wholly deduplicated: its segment holds only its commit trailer.
        commit(&mut s, 2, &[("b", &b)]);
        s.wait_replicated(Some(Duration::from_secs(60))).unwrap();
    }
    assert_eq!(support::segment_files(&dir).len(), 2);

    // `pull`: one list to check access, then the newest commit object (a list and a get).
    let faults = Arc::new(Faults::new());
    let pulled = root.path().join("pulled");
    ckptstore::store::pull(url, &pulled, &faulty(root.path(), &faults)).unwrap();
    assert_eq!(
        faults.requests(),
        3,
        "pull sent more than the commit log's requests"
    );
    assert!(support::segment_files(&pulled).is_empty());
    let ro = Options {
        remote_faults: Some(faults.clone()),
        remote_policy: policy(),
        ..Options::read_only()
    };
    let mut s = Store::open(&pulled, ro).unwrap();
    assert_eq!(
        faults.requests(),
        3,
        "the open of a pulled store fetched something"
    );
    assert_eq!(s.segments_in_bucket().len(), 2);
    assert_holds(&s, 2, &[("b", &b)]);
    assert!(faults.requests() > 3);
    assert_eq!(
        support::segment_files(&pulled).len(),
        1,
        "fetched b's segment only"
    );
    assert_holds(&s, 1, &[("w", &w), ("b", &b)]);
    assert_eq!(
        s.segments_in_bucket().len(),
        1,
        "the trailer-only one is never read"
    );
    s.fetch_all().unwrap();
    assert!(s.segments_in_bucket().is_empty());
    assert_eq!(support::segment_files(&pulled).len(), 2);
    drop(s);

    // The replica restores a lost directory without downloading a segment.
    std::fs::remove_dir_all(&dir).unwrap();
    let mut s = Store::open(&dir, ropts()).unwrap();
    assert_eq!(s.list().len(), 2);
    assert!(support::segment_files(&dir).is_empty());
    assert!(s.leftovers().is_empty(), "{:?}", s.leftovers());
    // b's chunks are in a segment still in the bucket: deduplicated, nothing fetched.
    let info = commit(&mut s, 3, &[("b", &b)]);
    assert_eq!(
        info.chunks_deduplicated,
        b.len().div_ceil(support::CHUNK) as u64
    );
    assert_eq!(s.segments_in_bucket().len(), 2);
    // w is dead, b lives on: segment 1 is mostly dead, but gc does not download it.
    s.delete(1).unwrap();
    s.gc().unwrap();
    assert_eq!(s.segments_in_bucket().len(), 2);
    // Checkpoint 2's trailer-only segment was never fetched: freed all the same.
    s.delete(2).unwrap();
    assert_eq!(s.segments_in_bucket().len(), 1);
    s.wait_replicated(Some(Duration::from_secs(60))).unwrap();
    assert_holds(&s, 3, &[("b", &b)]);
    assert!(s.segments_in_bucket().is_empty());
    assert!(s.leftovers().is_empty(), "{:?}", s.leftovers());
    drop(s);
    let s = Store::open(&dir, ropts()).unwrap();
    assert_eq!(s.list().iter().map(|c| c.id).collect::<Vec<_>>(), [3]);
    for c in s.list() {
        s.verify(c.id).unwrap();
    }
    drop(s);
    assert_no_leftovers(url);
}

#[test]
fn lazy_restore_fetches_segments_when_read_file() {
    let (_d, url) = file_url();
    lazy_restore(&url);
}

#[test]
fn lazy_restore_fetches_segments_when_read_s3() {
    let Some(url) = s3_url("lazy_restore") else {
        return;
    };
    lazy_restore(&url);
}

/// A fetch that fails (faults past the retries, the bucket gone mid-download: a crash as the
/// bucket sees it) is a typed error, never a wrong byte, and leaves no file with the segment's
/// name; a temporary file a killed fetch left is removed by the next writer open, which then
/// reads bit-exact. A damaged cache file is never trusted, even by a read that skips
/// verification.
fn lazy_fetch_faults(url: &str) {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("local");
    let w = big();
    {
        let mut s = Store::open(&dir, opts(root.path())).unwrap();
        commit(&mut s, 1, &[("w", &w)]);
    }
    let rep = Options {
        replica: Some(url.to_string()),
        ..opts(root.path())
    };
    Store::open(&dir, rep)
        .unwrap()
        .wait_replicated(Some(Duration::from_secs(60)))
        .unwrap();
    let pulled = root.path().join("pulled");
    ckptstore::store::pull(url, &pulled, &opts(root.path())).unwrap();
    let with = |faults: &Arc<Faults>| Options {
        remote_faults: Some(faults.clone()),
        ..opts(root.path())
    };
    // Every request fails: retried, then Error::Remote.
    let faults = Arc::new(Faults::new());
    faults.every(Some(Fault::Error));
    let s = Store::open(&pulled, with(&faults)).unwrap();
    let e = s
        .checkpoint(ckptstore::Selector::Latest)
        .unwrap()
        .tensor("w")
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(e, Error::Remote { .. }), "{e}");
    assert!(support::segment_files(&pulled).is_empty());
    assert!(temp_files(&pulled).is_empty(), "{:?}", temp_files(&pulled));
    drop(s);
    // The bucket stops answering after the first ranged GET (6 MiB in 5 MiB parts).
    let faults = Arc::new(Faults::new());
    faults.stop_after(1);
    let s = Store::open(&pulled, with(&faults)).unwrap();
    let e = s
        .checkpoint(ckptstore::Selector::Latest)
        .unwrap()
        .tensor_with("w", false)
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(e, Error::Remote { .. }), "{e}");
    assert!(support::segment_files(&pulled).is_empty());
    drop(s);
    // What a SIGKILL mid-fetch leaves: a temporary file.
    let seg = ckptstore::segment::file_name(1);
    let stale = pulled.join("segments").join(format!("{seg}.fetch-1-0"));
    std::fs::write(&stale, &w[..4096]).unwrap();
    let s = Store::open(&pulled, opts(root.path())).unwrap();
    assert!(temp_files(&pulled).is_empty(), "{:?}", temp_files(&pulled));
    assert_holds(&s, 1, &[("w", &w)]);
    assert!(s.leftovers().is_empty(), "{:?}", s.leftovers());
    drop(s);
    // A cache file damaged after its fetch: caught by every read, verifying or not; the
    // cache file is dropped (not quarantined: the bucket's copy is the store's) and the next
    // read fetches it again.
    let (name, _) = support::segment_files(&pulled).into_iter().next().unwrap();
    let path = pulled.join("segments").join(name);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2; // in the payload (the frame's chunk table is at its start)
    bytes[mid] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    for read_only in [true, false] {
        if !read_only {
            std::fs::write(&path, &bytes).unwrap();
        }
        let mut s = Store::open(
            &pulled,
            Options {
                read_only,
                ..opts(root.path())
            },
        )
        .unwrap();
        let e = s
            .checkpoint(ckptstore::Selector::Latest)
            .unwrap()
            .tensor_with("w", false)
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(e, Error::ChunkCorrupt { .. }), "{e}");
        assert_eq!(
            s.segments_in_bucket(),
            [1],
            "the damaged cache file is dropped"
        );
        assert_holds(&s, 1, &[("w", &w)]);
        if !read_only {
            s.heal().unwrap();
            assert!(s.quarantined().is_empty());
        }
    }
}

#[test]
fn lazy_fetch_faults_are_typed_errors_file() {
    let (_d, url) = file_url();
    lazy_fetch_faults(&url);
}

#[test]
fn lazy_fetch_faults_are_typed_errors_s3() {
    let Some(url) = s3_url("lazy_fetch_faults") else {
        return;
    };
    lazy_fetch_faults(&url);
}

/// A real SIGKILL of `ckptstore verify` while it fetches a pulled store's segments: the next
/// open (a writer) reads every checkpoint bit-exact and leaves nothing behind.
#[test]
fn sigkill_of_the_cli_mid_lazy_fetch() {
    let (_d, url) = file_url();
    let root = tempfile::tempdir().unwrap();
    let local = root.path().join("local");
    let w = data(31, 24 << 20);
    {
        let o = Options {
            replica: Some(url.clone()),
            ..opts(root.path())
        };
        let mut s = Store::open(&local, o).unwrap();
        commit(&mut s, 1, &[("w", &w)]);
        s.wait_replicated(Some(Duration::from_secs(60))).unwrap();
    }
    let bin = env!("CARGO_BIN_EXE_ckptstore");
    for (i, delay_ms) in [0u64, 30, 100, 300].into_iter().enumerate() {
        let pulled = root.path().join(format!("pulled{i}"));
        ckptstore::store::pull(&url, &pulled, &opts(root.path())).unwrap();
        let mut child = std::process::Command::new(bin)
            .args(["verify", pulled.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        child.wait().unwrap();
        let s = Store::open(&pulled, opts(root.path())).unwrap();
        assert_holds(&s, 1, &[("w", &w)]);
        assert!(s.leftovers().is_empty(), "{i}: {:?}", s.leftovers());
    }
}

/// One process per bucket-store cache, enforced: a second opener of the same cache (writer or
/// reader) gets `Error::CacheLocked` naming the holder, and opens once the first has closed.
#[test]
fn a_second_opener_of_a_cache_is_refused() {
    let (_d, url) = file_url();
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("cache");
    let mut s = Store::open(&url, opts(&cache)).unwrap();
    commit(&mut s, 1, &[("x", &[1, 2, 3])]);
    for o in [
        opts(&cache),
        Options {
            read_only: true,
            ..opts(&cache)
        },
    ] {
        match Store::open(&url, o) {
            Err(Error::CacheLocked { path, pid, .. }) => {
                assert_eq!(path, cache);
                assert_eq!(pid, std::process::id().to_string());
            }
            other => panic!("second opener: {:?}", other.map(|_| ())),
        }
    }
    // Another cache of the same bucket is another process's: fine.
    drop(Store::open(&url, opts(&root.path().join("other"))).unwrap());
    drop(s);
    let s = Store::open(&url, opts(&cache)).unwrap();
    assert_holds(&s, 1, &[("x", &[1, 2, 3])]);
}

/// A directory pulled lazily from one bucket and replicated to another: the segments still
/// only in the first are fetched before the replicator needs them, and the second bucket ends
/// up holding a store that reads bit-exact without the first.
#[test]
fn a_lazily_pulled_store_replicates_to_another_bucket() {
    let (a, url_a) = file_url();
    let (_b, url_b) = file_url();
    let root = tempfile::tempdir().unwrap();
    let w = big();
    {
        let mut s = Store::open(&url_a, opts(&root.path().join("ca"))).unwrap();
        commit(&mut s, 1, &[("w", &w)]);
    }
    let dir = root.path().join("pulled");
    ckptstore::store::pull(&url_a, &dir, &opts(root.path())).unwrap();
    let o = Options {
        replica: Some(url_b.clone()),
        ..opts(root.path())
    };
    let s = Store::open(&dir, o).unwrap();
    s.wait_replicated(Some(Duration::from_secs(60))).unwrap();
    drop(s);
    std::fs::remove_dir_all(a.path()).unwrap();
    let s = Store::open(&url_b, opts(&root.path().join("cb"))).unwrap();
    assert_holds(&s, 1, &[("w", &w)]);
}

// ---------------------------------------------------------------- lazy-segments feature

/// A source store replicated to a fresh `file://` bucket with two checkpoints, `a` (several
/// chunks) and `b`; returns the bucket's guard, its URL and the two tensors.
fn lazy_source(root: &Path) -> (tempfile::TempDir, String, Vec<u8>, Vec<u8>) {
    let (d, url) = file_url();
    let (a, b) = (data(71, 3 * support::CHUNK + 5), data(72, 9000));
    let mut s = Store::open(
        root.join("source"),
        Options {
            replica: Some(url.clone()),
            ..opts(&root.join("cache"))
        },
    )
    .unwrap();
    commit(&mut s, 1, &[("a", &a)]);
    commit(&mut s, 2, &[("b", &b)]);
    s.wait_replicated(Some(Duration::from_secs(60))).unwrap();
    (d, url, a, b)
}

fn wal_features(dir: &Path) -> ckptstore::features::FeatureSet {
    let header = std::fs::read(support::live_wal(dir)).unwrap();
    ckptstore::wal::WalHeader::decode(&header).unwrap().features
}

/// A lazily restored directory declares the incompatible feature `lazy-segments` in its WAL
/// header (a build without it refuses the store instead of taking segments still in the
/// bucket for missing ones and resuming from an older checkpoint); the bucket's state never
/// declares it; a reader and a writer with a segment still in the bucket keep it;
/// `fetch_all` clears it and removes `REMOTE_SEGMENTS`: an ordinary store, that opens and
/// reads bit-exact with the bucket gone.
#[test]
fn lazy_restore_declares_lazy_segments_until_every_segment_is_local() {
    use ckptstore::features::{FeatureSet, KNOWN, LAZY_SEGMENTS};
    let root = tempfile::tempdir().unwrap();
    let (bucket_dir, url, a, b) = lazy_source(root.path());
    let head = remote::latest(&bucket(&url)).unwrap().unwrap();
    assert!(!head.features.contains(&LAZY_SEGMENTS), "{}", head.features);

    let p = root.path().join("pulled");
    let list = p.join(ckptstore::store::REMOTE_SEGMENTS_NAME);
    ckptstore::store::pull(&url, &p, &opts(&root.path().join("cache"))).unwrap();
    let features = wal_features(&p);
    assert!(features.contains(&LAZY_SEGMENTS), "{features}");
    assert!(list.exists());
    // What a build with every feature but this one does with the directory: refuse it.
    let older: Vec<_> = KNOWN
        .iter()
        .copied()
        .filter(|f| *f != LAZY_SEGMENTS)
        .collect();
    assert_eq!(
        features.blocking_in(&older, true),
        Some(FeatureSet::EMPTY.with(&LAZY_SEGMENTS))
    );

    let s = Store::open(&p, Options::read_only()).unwrap();
    assert!(s.features().contains(&LAZY_SEGMENTS));
    assert_holds(&s, 2, &[("b", &b)]);
    drop(s);
    // The cache file of b's segment (fetched by that read) rots: `fetch_all` verifies every
    // fetched chunk before the directory stops being a cache of the bucket, and fetches it
    // again.
    let (name, _) = support::segment_files(&p).into_iter().next().unwrap();
    let seg = p.join("segments").join(name);
    let mut bytes = std::fs::read(&seg).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&seg, &bytes).unwrap();
    let mut s = Store::open(&p, opts(&root.path().join("cache"))).unwrap();
    assert!(!s.segments_in_bucket().is_empty());
    assert!(
        s.features().contains(&LAZY_SEGMENTS),
        "a segment is still remote"
    );
    s.fetch_all().unwrap();
    assert_ne!(
        std::fs::read(&seg).unwrap(),
        bytes,
        "the rotten cache file stayed"
    );
    assert!(!s.features().contains(&LAZY_SEGMENTS));
    assert!(!wal_features(&p).contains(&LAZY_SEGMENTS));
    assert!(!list.exists(), "REMOTE_SEGMENTS outlived the feature");
    assert_eq!(wal_features(&p).blocking_in(&older, false), None);
    drop(s);
    drop(bucket_dir);
    let s = Store::open(&p, Options::read_only()).unwrap();
    assert_holds(&s, 1, &[("a", &a)]);
    assert_holds(&s, 2, &[("b", &b)]);
    for (id, r) in s.verify_all() {
        r.unwrap_or_else(|e| panic!("{id}: {e}"));
    }
}

/// A directory the build before the feature restored lazily (`REMOTE_SEGMENTS`, segments in
/// the bucket, no feature bit): it opens, and its first writer open declares the feature; a
/// replica of it to another bucket publishes a state without the feature.
#[test]
fn lazy_restore_of_a_build_before_the_feature_gets_it_at_a_writer_open() {
    use ckptstore::features::LAZY_SEGMENTS;
    let root = tempfile::tempdir().unwrap();
    let (_bucket, url, _a, b) = lazy_source(root.path());
    let p = root.path().join("pulled");
    ckptstore::store::pull(&url, &p, &opts(&root.path().join("cache"))).unwrap();
    let wal = support::live_wal(&p);
    let mut bytes = std::fs::read(&wal).unwrap();
    let h = ckptstore::wal::WalHeader::decode(&bytes).unwrap();
    let h = ckptstore::wal::WalHeader {
        features: h.features.without(&LAZY_SEGMENTS),
        ..h
    };
    bytes[..ckptstore::wal::WAL_HEADER_LEN].copy_from_slice(&h.encode());
    std::fs::write(&wal, bytes).unwrap();

    let s = Store::open(&p, Options::read_only()).unwrap();
    assert!(!s.features().contains(&LAZY_SEGMENTS));
    assert_holds(&s, 2, &[("b", &b)]);
    drop(s);
    let s = Store::open(&p, opts(&root.path().join("cache"))).unwrap();
    assert!(!s.segments_in_bucket().is_empty());
    assert!(s.features().contains(&LAZY_SEGMENTS));
    drop(s);
    assert!(wal_features(&p).contains(&LAZY_SEGMENTS));
    // Replicated to another bucket: the feature is the directory's, never a bucket's.
    let (_other, other) = file_url();
    let s = Store::open(
        &p,
        Options {
            replica: Some(other.clone()),
            ..opts(&root.path().join("cache"))
        },
    )
    .unwrap();
    s.wait_replicated(Some(Duration::from_secs(60))).unwrap();
    assert!(s.features().contains(&LAZY_SEGMENTS));
    let head = remote::latest(&bucket(&other)).unwrap().unwrap();
    assert!(!head.features.contains(&LAZY_SEGMENTS), "{}", head.features);
}

/// The clear of `lazy-segments` (`fetch_all` of a writer: each fetch, the WAL rewritten
/// without the feature, `CURRENT` switched, `REMOTE_SEGMENTS` removed) cut by a power loss at
/// every sync, in every crash mode: the directory is the lazy store (feature and list) or
/// the ordinary one (no feature, nothing in the bucket), never a store without the feature
/// whose segments are in the bucket; it opens and reads bit-exact, and the next writer's
/// `fetch_all` finishes the clear.
#[test]
fn lazy_segments_clear_survives_a_crash_at_every_sync() {
    use ckptstore::features::LAZY_SEGMENTS;
    use ckptstore::io::{CrashMode, SimIo, Storage};
    const P: &str = "/pulled";
    let root = tempfile::tempdir().unwrap();
    let (_bucket, url, a, b) = lazy_source(root.path());
    let sim_opts = |sim: &SimIo, read_only: bool| Options {
        io: Arc::new(sim.clone()),
        read_only,
        ..opts(&root.path().join("cache"))
    };
    let base = SimIo::new();
    ckptstore::store::pull(&url, Path::new(P), &sim_opts(&base, false)).unwrap();
    let clear = |sim: &SimIo| -> ckptstore::Result<()> {
        Store::open(P, sim_opts(sim, false))?.fetch_all()
    };
    let probe = base.fork();
    clear(&probe).unwrap();
    let syncs = probe.sync_count();
    assert!(
        syncs >= 5,
        "fetches, WAL rewrite, CURRENT, list removal: {syncs}"
    );
    let list = Path::new(P).join(ckptstore::store::REMOTE_SEGMENTS_NAME);
    let mut states = BTreeSet::new();
    for n in 1..=syncs {
        for (mi, mode) in CrashMode::ALL.into_iter().enumerate() {
            let case = format!("crash at sync #{n}, mode {mode}");
            let f = base.fork();
            f.crash_at_sync(n);
            assert!(clear(&f).is_err(), "{case}: did not stop at the crash");
            let img = f.crash_image(mode, n * 31 + mi as u64);
            let s = Store::open(P, sim_opts(&img.fork(), true)).unwrap();
            let lazy = s.features().contains(&LAZY_SEGMENTS);
            let listed = img.exists(&list).unwrap();
            assert!(listed || !lazy, "{case}: the feature without its list");
            assert!(
                lazy || s.segments_in_bucket().is_empty(),
                "{case}: segments in the bucket, no feature"
            );
            states.insert((lazy, listed));
            assert_eq!(s.list().len(), 2, "{case}");
            assert_holds(&s, 1, &[("a", &a)]);
            assert_holds(&s, 2, &[("b", &b)]);
            drop(s);
            let mut s = Store::open(P, sim_opts(&img, false)).unwrap();
            s.fetch_all().unwrap();
            assert!(!s.features().contains(&LAZY_SEGMENTS), "{case}");
            drop(s);
            assert!(!img.exists(&list).unwrap(), "{case}");
            let s = Store::open(P, sim_opts(&img, true)).unwrap();
            assert!(s.segments_in_bucket().is_empty(), "{case}");
            assert_holds(&s, 1, &[("a", &a)]);
            assert_holds(&s, 2, &[("b", &b)]);
        }
    }
    assert!(states.contains(&(true, true)), "{states:?}");
    assert!(
        states.contains(&(false, true)),
        "no crash between the rewrite and the removal"
    );
}
