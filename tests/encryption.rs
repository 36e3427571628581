//! Invariant: a store opened with a key seals every chunk it writes (AES-256-GCM, keyed chunk
//! ids): no byte of a known tensor's plaintext, and no plain BLAKE3 of it, is anywhere in the
//! store; it loads bit-exact with the key and is refused by name without it or with another;
//! deduplication works under one key; damaged ciphertext is an error naming the tensor and
//! chunk, and `latest_valid` walks back past it; compaction moves sealed chunks; keys never
//! show in errors or Debug output (docs/FORMAT.md, "Encryption"; docs/DECISIONS.md,
//! "Encryption at rest").

mod support;

use ckptstore::crypt::Key;
use ckptstore::{
    Compression, DType, Error, GcOptions, Options, Pipeline, PipelineOptions, Selector, Store,
};
use std::path::Path;
use support::{assert_holds, chunk_location, commit, data, opts, segment_path, snapshot_tree};

const KEY_HEX: &str = "6b3a1f0e9d8c7b6a5948372615040312f1e2d3c4b5a69788796a5b4c3d2e1f00";
const OTHER_HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fn key() -> Key {
    Key::from_hex(KEY_HEX).unwrap()
}

fn other() -> Key {
    Key::from_hex(OTHER_HEX).unwrap()
}

fn sealed(k: Key) -> Options {
    Options {
        encryption_key: Some(k),
        ..opts()
    }
}

/// Every 32-byte window of `needle` starting at a multiple of 997 bytes (so every chunk is
/// probed at several offsets), searched in every file of the store.
fn assert_no_window_in_store(dir: &Path, needle: &[u8]) {
    let files = snapshot_tree(dir);
    for start in (0..needle.len() - 32).step_by(997) {
        let w = &needle[start..start + 32];
        for (path, bytes) in &files {
            assert!(
                !bytes.windows(32).any(|x| x == w),
                "plaintext bytes {start}..{} found in {}",
                start + 32,
                path.display()
            );
        }
    }
}

#[test]
fn sealed_store_holds_no_plaintext_or_plain_hash_and_loads_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let w = data(7, 50_000);
    let small = data(8, 100);
    {
        let mut s = Store::open(dir.path(), sealed(key())).unwrap();
        let mut t = s.begin(1).unwrap();
        t.put_tensor("w", DType::U8, &[w.len() as u64], &w).unwrap();
        t.put_tensor("small", DType::U8, &[100], &small).unwrap();
        t.put_blob("notes", &w[..9000]).unwrap();
        t.commit().unwrap();
    }
    assert_no_window_in_store(dir.path(), &w);
    // Neither does any file hold the plain BLAKE3 of a chunk (which would confirm a guess).
    let files = snapshot_tree(dir.path());
    for c in w.chunks(support::CHUNK).chain([&small[..]]) {
        let h = blake3::hash(c);
        for (path, bytes) in &files {
            assert!(
                !bytes.windows(32).any(|x| x == h.as_bytes()),
                "plain BLAKE3 in {}",
                path.display()
            );
        }
    }
    let s = Store::open(dir.path(), sealed(key())).unwrap();
    assert_holds(&s, 1, &[("w", &w), ("small", &small)]);
    let ck = s.checkpoint(Selector::Latest).unwrap();
    assert!(ck.is_sealed());
    assert_eq!(ck.blob("notes").unwrap(), &w[..9000]);
    // Sealed bytes are never mapped: the view is decrypted into memory of its own.
    let v = ck.tensor_view("w").unwrap();
    assert!(!v.is_zero_copy());
    assert_eq!(v.data(), &w[..]);
    let key_id = key().id().to_string();
    assert_eq!(hex(&ck.manifest().key_id), key_id);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn missing_key_and_wrong_key_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = Store::open(dir.path(), sealed(key())).unwrap();
        commit(&mut s, 1, &[("w", &data(1, 10_000))]);
    }
    let id = key().id().to_string();
    for read_only in [false, true] {
        let o = Options {
            read_only,
            ..opts()
        };
        match Store::open(dir.path(), o) {
            Err(Error::KeyRequired { key_id, .. }) => assert_eq!(key_id, id),
            other => panic!("no key: {other:?}"),
        }
        let o = Options {
            read_only,
            ..sealed(other())
        };
        match Store::open(dir.path(), o) {
            Err(e @ Error::WrongKey { .. }) => {
                let m = e.to_string();
                assert!(
                    m.contains(&id) && m.contains(&other().id().to_string()),
                    "{m}"
                );
                assert!(m.contains("wrong key"), "{m}");
            }
            other => panic!("wrong key: {other:?}"),
        }
    }
}

#[test]
fn keys_never_appear_in_errors_or_debug_output() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = Store::open(dir.path(), sealed(key())).unwrap();
        commit(&mut s, 1, &[("w", &data(1, 10_000))]);
    }
    let o = Options {
        old_keys: vec![key()],
        ..sealed(other())
    };
    let shown = [
        format!("{o:?}"),
        format!("{:?}", key()),
        format!(
            "{:?}",
            Store::open(dir.path(), sealed(other())).unwrap_err()
        ),
        Store::open(dir.path(), sealed(other()))
            .unwrap_err()
            .to_string(),
        format!("{:?}", Store::open(dir.path(), sealed(key())).unwrap()),
    ];
    let decimal = format!(
        "{:?}",
        &Key::from_hex(KEY_HEX).unwrap().to_hex().as_bytes()[..4]
    );
    for s in &shown {
        for secret in [
            KEY_HEX,
            OTHER_HEX,
            &KEY_HEX[..16],
            &OTHER_HEX[..16],
            &decimal,
        ] {
            assert!(!s.contains(secret), "{s}");
        }
    }
}

#[test]
fn dedup_works_under_one_key_and_rotation_reads_old_checkpoints_with_the_old_key() {
    let dir = tempfile::tempdir().unwrap();
    let w = data(3, 40_000);
    let mut s = Store::open(dir.path(), sealed(key())).unwrap();
    commit(&mut s, 1, &[("w", &w)]);
    let again = commit(&mut s, 2, &[("w", &w)]);
    assert_eq!(again.bytes_deduplicated, w.len() as u64);
    assert_eq!(again.bytes_written, 0);
    drop(s);
    // Compressed, still under the same key: the same chunk ids, so still deduplicated.
    let o = Options {
        compression: Compression::Zstd { level: 1 },
        ..sealed(key())
    };
    let mut s = Store::open(dir.path(), o).unwrap();
    assert_eq!(commit(&mut s, 3, &[("w", &w)]).bytes_written, 0);
    drop(s);
    // Rotation: new checkpoints under the new key (chunk ids differ: nothing deduplicated),
    // old ones read with the old key supplied.
    let rotated = Options {
        old_keys: vec![key()],
        ..sealed(other())
    };
    let mut s = Store::open(dir.path(), rotated.clone()).unwrap();
    let c4 = commit(&mut s, 4, &[("w", &w)]);
    assert_eq!(c4.bytes_deduplicated, 0);
    drop(s);
    let s = Store::open(dir.path(), rotated).unwrap();
    for id in 1..=4 {
        assert_holds(&s, id, &[("w", &w)]);
    }
    drop(s);
    // The new key alone opens the store and reads the new checkpoint; an old one names the
    // key it needs.
    let s = Store::open(dir.path(), sealed(other())).unwrap();
    assert_holds(&s, 4, &[("w", &w)]);
    match s.checkpoint(Selector::Id(1)) {
        Err(Error::WrongKey { key_id, .. }) => assert_eq!(key_id, key().id().to_string()),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("old checkpoint read without its key"),
    }
    drop(s);
    // The old key alone no longer opens it (its newest checkpoint is under the new key).
    assert!(matches!(
        Store::open(dir.path(), sealed(key())),
        Err(Error::WrongKey { .. })
    ));
}

#[test]
fn flipped_ciphertext_names_tensor_and_chunk_and_latest_valid_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let a = data(1, 20_000);
    let b = data(2, 20_000);
    let mut s = Store::open(dir.path(), sealed(key())).unwrap();
    commit(&mut s, 1, &[("a", &a)]);
    commit(&mut s, 2, &[("a", &a), ("b", &b)]);
    let (seg, off) = chunk_location(&s, 2, "b", 2);
    drop(s);
    let p = segment_path(dir.path(), seg);
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[off as usize + 100] ^= 0x01;
    std::fs::write(&p, bytes).unwrap();
    let s = Store::open(dir.path(), sealed(key())).unwrap();
    let ck = s.checkpoint(Selector::Id(2)).unwrap();
    match ck.tensor("b") {
        Err(Error::ChunkCorrupt {
            name,
            chunk,
            reason,
            ..
        }) => {
            assert_eq!((name.as_str(), chunk), ("b", 2));
            assert!(reason.contains("authentication failed"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // Also with verification off: the tag is always checked.
    assert!(matches!(
        ck.tensor_with("b", false),
        Err(Error::ChunkCorrupt { .. })
    ));
    assert!(matches!(s.verify(2), Err(Error::ChunkCorrupt { .. })));
    assert_eq!(s.latest_valid().unwrap().unwrap().id, 1);
}

#[test]
fn truncated_ciphertext_is_reported_and_latest_valid_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let a = data(1, 20_000);
    let b = data(2, 20_000);
    let mut s = Store::open(dir.path(), sealed(key())).unwrap();
    commit(&mut s, 1, &[("a", &a)]);
    commit(&mut s, 2, &[("b", &b)]);
    let (seg, off) = chunk_location(&s, 2, "b", 4);
    drop(s);
    let p = segment_path(dir.path(), seg);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(off + 10).unwrap();
    drop(f);
    let s = Store::open(dir.path(), sealed(key())).unwrap();
    let e = s.verify(2).unwrap_err();
    assert!(
        matches!(e, Error::SegmentMissing { .. } | Error::ChunkCorrupt { .. }),
        "{e}"
    );
    assert_eq!(s.latest_valid().unwrap().unwrap().id, 1);
}

#[test]
fn compaction_moves_sealed_chunks_and_they_still_open() {
    let dir = tempfile::tempdir().unwrap();
    let a = data(1, 30_000);
    let b = data(2, 30_000);
    let o = Options {
        compact_live_fraction: 1.0,
        ..sealed(key())
    };
    let mut s = Store::open(dir.path(), o.clone()).unwrap();
    commit(&mut s, 1, &[("a", &a), ("b", &b)]);
    commit(&mut s, 2, &[("b", &b)]);
    s.delete(1).unwrap();
    let report = s.gc_with(GcOptions::default(), |_, _| {}).unwrap();
    assert!(!report.segments_compacted.is_empty(), "{report:?}");
    drop(s);
    let s = Store::open(dir.path(), o).unwrap();
    assert_holds(&s, 2, &[("b", &b)]);
    assert_no_window_in_store(dir.path(), &b);
}

#[test]
fn pipeline_saves_are_sealed_too() {
    let dir = tempfile::tempdir().unwrap();
    let w = data(5, 30_000);
    let s = Store::open(dir.path(), sealed(key())).unwrap();
    let pool = PipelineOptions {
        budget_bytes: 8 * support::CHUNK,
        hash_workers: 2,
    };
    let mut p = Pipeline::new(s, pool).unwrap();
    let mut save = p.begin(1).unwrap();
    save.put_tensor("w", DType::U8, &[w.len() as u64], &w)
        .unwrap();
    save.submit().unwrap().wait().unwrap();
    let s = p.close();
    assert_holds(&s, 1, &[("w", &w)]);
    drop(s);
    assert_no_window_in_store(dir.path(), &w);
}

#[test]
fn a_plain_store_turns_sealed_and_keeps_its_plain_checkpoints_readable() {
    let dir = tempfile::tempdir().unwrap();
    let w = data(9, 12_000);
    let mut s = Store::open(dir.path(), opts()).unwrap();
    commit(&mut s, 1, &[("w", &w)]);
    drop(s);
    let mut s = Store::open(dir.path(), sealed(key())).unwrap();
    // A plain chunk id never matches a keyed one: the bytes are written again, sealed.
    assert_eq!(
        commit(&mut s, 2, &[("w", &w)]).bytes_written,
        w.len() as u64
    );
    assert_holds(&s, 1, &[("w", &w)]);
    assert_holds(&s, 2, &[("w", &w)]);
    assert!(!s.checkpoint(Selector::Id(1)).unwrap().is_sealed());
}

mod cli_support;

#[test]
fn cli_reads_a_sealed_store_with_key_file_or_env_and_names_a_missing_or_wrong_key() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("s");
    let w = data(4, 10_000);
    {
        let mut s = Store::open(&dir, sealed(key())).unwrap();
        commit(&mut s, 1, &[("w", &w)]);
    }
    let kf = d.path().join("key");
    std::fs::write(&kf, format!("{KEY_HEX}\n")).unwrap();
    let wrong = d.path().join("wrong");
    std::fs::write(&wrong, Key::from_hex(OTHER_HEX).unwrap().to_hex().as_str()).unwrap();
    let (dir_s, kf_s, wrong_s) = (
        dir.to_str().unwrap(),
        kf.to_str().unwrap(),
        wrong.to_str().unwrap(),
    );
    let id = key().id().to_string();
    let e = cli_support::fails(&["ls", dir_s]);
    assert!(
        e.contains("encrypted") && e.contains(&id) && e.contains("--key-file"),
        "{e}"
    );
    let e = cli_support::fails(&["verify", "--key-file", wrong_s, dir_s]);
    assert!(e.contains("wrong key") && !e.contains(OTHER_HEX), "{e}");
    assert!(cli_support::ok(&["ls", "--key-file", kf_s, dir_s]).contains('1'));
    cli_support::ok(&["verify", dir_s, "--key-file", kf_s]);
    for (var, val) in [("CKPTSTORE_KEY_FILE", kf_s), ("CKPTSTORE_KEY", KEY_HEX)] {
        let o = std::process::Command::new(cli_support::BIN)
            .args(["verify", dir_s])
            .env(var, val)
            .output()
            .unwrap();
        assert!(o.status.success(), "{var}: {}", cli_support::stderr(&o));
    }
    // Rotation from the command line: rekey under a new key, then the old one is not needed.
    let newer = d.path().join("newer");
    std::fs::write(&newer, [7u8; 32]).unwrap();
    let newer_s = newer.to_str().unwrap();
    let out = cli_support::ok(&[
        "rekey",
        dir_s,
        "--key-file",
        newer_s,
        "--old-key-file",
        kf_s,
    ]);
    assert!(out.contains("resealed 1 checkpoint"), "{out}");
    cli_support::ok(&["verify", "--key-file", newer_s, dir_s]);
    let e = cli_support::fails(&["verify", "--key-file", kf_s, dir_s]);
    assert!(e.contains("wrong key"), "{e}");
    // A bad key file is named, its content never shown.
    std::fs::write(&wrong, "not-a-key-secret").unwrap();
    let e = cli_support::fails(&["ls", "--key-file", wrong_s, dir_s]);
    assert!(e.contains("key file") && !e.contains("secret"), "{e}");
}

/// A sealed store declares the incompatible feature `encryption` in a version-2 WAL header
/// before its first sealed commit: a build with feature flags but without encryption refuses
/// it naming the bit, a build from before the flags refuses the header version; neither takes
/// the sealed chunks for corruption.
#[test]
fn a_sealed_store_declares_the_incompatible_encryption_feature() {
    use ckptstore::features::{FeatureSet, ENCRYPTION};
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), sealed(key())).unwrap();
    assert!(s.features().contains(&ENCRYPTION));
    commit(&mut s, 1, &[("w", &data(1, 5000))]);
    drop(s);
    let wal = std::fs::read(support::live_wal(dir.path())).unwrap();
    assert_eq!(
        u16::from_le_bytes([wal[8], wal[9]]),
        2,
        "WAL header version"
    );
    let h = ckptstore::wal::WalHeader::decode(&wal).unwrap();
    assert!(h.features.contains(&ENCRYPTION));
    // A build that lacks the feature finds an unknown incompatible bit: it refuses every open.
    let unknown = h
        .features
        .unknown_in(&[ckptstore::features::SEGMENT_COMMIT_TRAILER]);
    assert_eq!(unknown, FeatureSet::EMPTY.with(&ENCRYPTION));
    assert_eq!(
        ENCRYPTION.kind,
        ckptstore::features::FeatureKind::Incompatible
    );
    // A plain store stays without it (and version 1, readable by landed builds).
    let plain = tempfile::tempdir().unwrap();
    let mut s = Store::open(plain.path(), opts()).unwrap();
    commit(&mut s, 1, &[("w", &data(1, 5000))]);
    assert!(!s.features().contains(&ENCRYPTION));
}

/// A sealed checkpoint's names, dtypes, shapes and metadata are sealed too: none of them is in
/// the clear anywhere in the store. Recovery needs no key: a keyless writer open checks the
/// WAL's framing and CRCs and cuts a torn tail before it refuses for want of the key.
#[test]
fn sealed_manifests_hide_names_and_metadata_and_recovery_runs_keyless() {
    let dir = tempfile::tempdir().unwrap();
    let w = data(11, 9000);
    {
        let mut s = Store::open(dir.path(), sealed(key())).unwrap();
        let mut t = s.begin(1).unwrap();
        t.set_metadata("secret_meta_key", "secret_meta_value");
        t.put_tensor("layers.secret_tensor_name", DType::U8, &[9000], &w)
            .unwrap();
        t.put_blob("secret_blob_name", b"blob").unwrap();
        t.commit().unwrap();
        s.compact_wal().unwrap(); // the compacted WAL seals them too
        commit(&mut s, 2, &[("other_secret_tensor", &data(12, 100))]);
    }
    for (path, bytes) in snapshot_tree(dir.path()) {
        for needle in [
            "secret_meta",
            "secret_tensor",
            "secret_blob",
            "other_secret",
        ] {
            assert!(
                !bytes.windows(needle.len()).any(|x| x == needle.as_bytes()),
                "{needle} in the clear in {}",
                path.display()
            );
        }
    }
    // A torn tail: cut by a keyless writer open, which then refuses for want of the key.
    let wal = support::live_wal(dir.path());
    let good = support::file_len(&wal);
    let mut b = std::fs::read(&wal).unwrap();
    b.extend_from_slice(&[0x55; 40]);
    std::fs::write(&wal, b).unwrap();
    assert!(matches!(
        Store::open(dir.path(), opts()),
        Err(Error::KeyRequired { .. })
    ));
    assert_eq!(support::file_len(&wal), good);
    let s = Store::open(dir.path(), sealed(key())).unwrap();
    let ck = s.checkpoint(Selector::Id(1)).unwrap();
    assert_eq!(ck.tensor_names(), ["layers.secret_tensor_name"]);
    assert_eq!(ck.blob_names(), ["secret_blob_name"]);
    assert_eq!(ck.tensor("layers.secret_tensor_name").unwrap().data, w);
    assert_eq!(
        ck.metadata().get("secret_meta_key"),
        Some(&ckptstore::MetaValue::Str("secret_meta_value".into()))
    );
    assert_eq!(s.verify_chain().unwrap().verified, [1, 2]);
}

#[test]
fn rekey_reseals_every_checkpoint_under_the_new_key_and_frees_the_old_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (data(21, 20_000), data(22, 20_000), data(23, 9_000));
    let mut s = Store::open(dir.path(), opts()).unwrap();
    commit(&mut s, 1, &[("a", &a)]);
    drop(s);
    let k1 = Options {
        compression: Compression::Zstd { level: 1 },
        ..sealed(key())
    };
    let mut s = Store::open(dir.path(), k1).unwrap();
    commit(&mut s, 2, &[("a", &a), ("b", &b)]);
    assert!(s.pin(2).unwrap());
    drop(s);
    let rotated = Options {
        old_keys: vec![key()],
        ..sealed(other())
    };
    let mut s = Store::open(dir.path(), rotated).unwrap();
    commit(&mut s, 3, &[("c", &c)]);
    let r = s.rekey(|_, _| {}).unwrap();
    assert_eq!(r.checkpoints, [1, 2]);
    assert!(
        r.chunks_written > 0 && !r.segments_freed.is_empty(),
        "{r:?}"
    );
    drop(s);
    // The new key alone now reads everything; the plain bytes of checkpoint 1 are gone.
    let s = Store::open(dir.path(), sealed(other())).unwrap();
    assert_holds(&s, 1, &[("a", &a)]);
    assert_holds(&s, 2, &[("a", &a), ("b", &b)]);
    assert_holds(&s, 3, &[("c", &c)]);
    assert_eq!(s.pinned(), [2]);
    let chain = s.verify_chain().unwrap();
    assert_eq!(chain.verified, [1, 2, 3]);
    assert!(
        chain.breaks.is_empty() && chain.unauthenticated.is_empty(),
        "{chain:?}"
    );
    drop(s);
    assert_no_window_in_store(dir.path(), &a);
    // Nothing left to do: a second rekey writes nothing.
    let mut s = Store::open(dir.path(), sealed(other())).unwrap();
    assert_eq!(s.rekey(|_, _| {}).unwrap(), Default::default());
}

/// A power cut at every sync call of a rekey, in every crash mode: the store reopens (with
/// both keys) holding every checkpoint bit-exact, sealed under the old keys or the new one.
#[test]
fn rekey_survives_a_power_cut_at_every_sync() {
    use ckptstore::io::{CrashMode, SimIo};
    use std::sync::Arc;
    const DIR: &str = "/ckpts";
    let (a, b) = (data(31, 12_000), data(32, 12_000));
    let on = |sim: &SimIo, o: Options| Options {
        io: Arc::new(sim.clone()),
        ..o
    };
    let both = || Options {
        old_keys: vec![key()],
        ..sealed(other())
    };
    let sim = SimIo::new();
    let mut s = Store::open(DIR, on(&sim, opts())).unwrap();
    commit(&mut s, 1, &[("a", &a)]);
    drop(s);
    let mut s = Store::open(DIR, on(&sim, sealed(key()))).unwrap();
    commit(&mut s, 2, &[("b", &b)]);
    drop(s);
    // Opened once with the new key (the feature is set, nothing else changes on later opens).
    drop(Store::open(DIR, on(&sim, both())).unwrap());
    let prepared = sim.crash_image(CrashMode::DropUnsynced, 0);
    let mut crashes = 0;
    for n in 1.. {
        let f = prepared.fork();
        let mut s = Store::open(DIR, on(&f, both())).unwrap();
        f.crash_at_sync(f.sync_count() + n);
        let done = s.rekey(|_, _| {}).is_ok() && f.crashed().is_none();
        drop(s);
        for mode in [
            CrashMode::DropUnsynced,
            CrashMode::TornPrefix,
            CrashMode::Garbage,
            CrashMode::LoseDirEntries,
            CrashMode::Reorder,
        ] {
            let img = f.crash_image(mode, n);
            let s = Store::open(DIR, on(&img, both()))
                .unwrap_or_else(|e| panic!("sync {n}, {mode:?}: {e}"));
            assert_holds(&s, 1, &[("a", &a)]);
            assert_holds(&s, 2, &[("b", &b)]);
        }
        if done {
            break;
        }
        crashes += 1;
    }
    assert!(crashes > 3, "the rekey made {crashes} syncs");
}
