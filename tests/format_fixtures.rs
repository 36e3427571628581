//! Invariant: a store written by any landed build opens in every later build, bit-exact
//! (docs/FORMAT.md, "Fixture stores"). `tests/fixtures/stores/NAME/` holds small stores
//! written by past builds with the workload below; this test opens a copy of each (open may
//! recover or compact, so never the checked-in files), checks every live checkpoint's
//! tensors, blobs, metadata and pins against values derived here from seeds, and verifies
//! every chunk.
//!
//! A fixture is written once, by `generate_fixture_store` (ignored; see docs/TESTING.md), and
//! never regenerated: a failure here is a broken compatibility promise, not a test to update.
//! The workload functions below are part of that promise too — change them only by adding a
//! new workload number.

mod support;

use ckptstore::proto::v1 as pb;
use ckptstore::store::SEGMENTS_DIR;
use ckptstore::wal::{self, RecordType, WalHeader};
use ckptstore::{
    Compression, DType, MetaValue, Options, Selector, ShardOptions, ShardWriter, Store,
};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const CHUNK: usize = 4096;
/// Name of the file in a fixture directory that says which workload wrote it (a foreign
/// name: the store ignores it).
const FIXTURE_NOTE: &str = "FIXTURE";

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/stores")
}

// ---------------------------------------------------------------- workload 1: deterministic values

/// xorshift bytes of `seed`: incompressible (stored with codec NONE).
fn noise(seed: u64, n: usize) -> Vec<u8> {
    support::data(seed, n)
}

/// `elems` elements of `dtype`, compressible (small repeating values), different per seed.
fn values(dtype: DType, seed: u64, elems: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(elems * dtype.size());
    for i in 0..elems as u64 {
        let v = (i * 7 + seed * 3) % 13;
        match dtype {
            DType::F64 => out.extend_from_slice(&(v as f64 - 6.0).to_le_bytes()),
            DType::F32 => out.extend_from_slice(&(v as f32 * 0.5).to_le_bytes()),
            DType::F16 => out.extend_from_slice(&(0x3c00u16 + v as u16).to_le_bytes()),
            DType::BF16 => out.extend_from_slice(&(0x3f80u16 + v as u16).to_le_bytes()),
            DType::F8E4M3 | DType::F8E5M2 | DType::U8 => out.push(0x30 + v as u8),
            DType::I64 => out.extend_from_slice(&(v as i64 - 6).to_le_bytes()),
            DType::I32 => out.extend_from_slice(&(v as i32 * -1000).to_le_bytes()),
            DType::I16 => out.extend_from_slice(&(v as i16 - 6).to_le_bytes()),
            DType::I8 => out.push((v as i8 - 6) as u8),
            DType::Bool => out.push(u8::from(v.is_multiple_of(3))),
            other => panic!("{other:?} is not a dtype of workload 1"),
        }
    }
    out
}

/// The dtypes of workload 1: the baseline's twelve (a later dtype is a later workload's).
const DTYPES: [DType; 12] = [
    DType::F64,
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::F8E4M3,
    DType::F8E5M2,
    DType::I64,
    DType::I32,
    DType::I16,
    DType::I8,
    DType::U8,
    DType::Bool,
];

/// One tensor of a checkpoint: name, dtype, shape, bytes.
type Tensor = (String, DType, Vec<u64>, Vec<u8>);

/// The tensors of the checkpoint at `step` of workload 1, in put order.
fn tensors(step: u64) -> Vec<Tensor> {
    let mut out = Vec::new();
    // Every dtype; 3 chunks' worth of elements of each (shape [3, n]).
    if step <= 20 {
        for d in DTYPES {
            let n = (3 * CHUNK / d.size() / 3) as u64;
            out.push((
                format!("all/{}", d.name()),
                d,
                vec![3, n],
                values(d, step, 3 * n as usize),
            ));
        }
    }
    // Unchanged across checkpoints: deduplicated, then relocated by the segment compaction.
    out.push((
        "frozen".into(),
        DType::F32,
        vec![2 * CHUNK as u64 / 4],
        values(DType::F32, 1000, 2 * CHUNK / 4),
    ));
    // Changes every step.
    out.push((
        "w".into(),
        DType::BF16,
        vec![CHUNK as u64],
        values(DType::BF16, step + 1, CHUNK),
    ));
    out.push(("noise".into(), DType::U8, vec![3000], noise(step, 3000)));
    if step == 30 {
        // The i8 tensor of step 10, deduplicated into its (compacted) segment.
        let n = CHUNK as u64;
        out.push((
            "again/i8".into(),
            DType::I8,
            vec![3, n],
            values(DType::I8, 10, 3 * n as usize),
        ));
    }
    out
}

/// The blobs of the checkpoint at `step`.
fn blobs(step: u64) -> Vec<(String, Vec<u8>)> {
    vec![
        (
            "config.json".into(),
            format!("{{\"step\": {step}, \"layers\": [64, 64, 64, 64, 64, 64, 64, 64]}}")
                .repeat(40)
                .into_bytes(),
        ),
        ("rng".into(), noise(step + 77, 64)),
        ("empty".into(), Vec::new()),
    ]
}

/// The metadata of the checkpoint at `step`: every value kind.
fn metadata(step: u64) -> BTreeMap<String, MetaValue> {
    BTreeMap::from([
        (
            "bytes".to_string(),
            MetaValue::Bytes(vec![1, 2, 3, step as u8]),
        ),
        (
            "str".to_string(),
            MetaValue::Str(format!("step {step} ünïcode")),
        ),
        (
            "int".to_string(),
            MetaValue::Int(-(step as i64) * 1_000_000_007),
        ),
        ("float".to_string(), MetaValue::Float(1.0 / step as f64)),
    ])
}

/// Workload 1's checkpoints at the end: (id, step), the pinned ids.
const LIVE: [(u64, u64); 4] = [(2, 20), (3, 30), (4, 40), (5, 50)];
const PINNED: [u64; 1] = [2];

fn store_opts(compression: Compression) -> Options {
    Options {
        chunk_size: CHUNK,
        compression,
        ..Default::default()
    }
}

fn commit_step(s: &mut Store, step: u64) {
    let mut t = s.begin(step).unwrap();
    t.set_epoch(step / 20);
    for (k, v) in metadata(step) {
        t.set_metadata(k, v);
    }
    for (name, d, shape, bytes) in tensors(step) {
        t.put_tensor(&name, d, &shape, &bytes).unwrap();
    }
    for (name, b) in blobs(step) {
        t.put_blob(&name, &b).unwrap();
    }
    t.commit().unwrap();
}

/// Step 40 is written by two shard writers and committed as one checkpoint.
fn commit_sharded(s: &mut Store, dir: &Path, step: u64) {
    let ranges = s.reserve_segment_ids(2, 4).unwrap();
    let all = tensors(step);
    let mut fragments = Vec::new();
    for (r, ids) in ranges.into_iter().enumerate() {
        let o = ShardOptions {
            chunk_size: CHUNK,
            segment_max_bytes: 1 << 20,
            io: s.options().io.clone(),
        };
        let mut w = ShardWriter::new(dir, ids, o).unwrap();
        for (name, d, shape, bytes) in all.iter().skip(r).step_by(2) {
            w.put_tensor(name, *d, shape, bytes).unwrap();
        }
        if r == 0 {
            for (name, b) in blobs(step) {
                w.put_blob(&name, &b).unwrap();
            }
        }
        fragments.push(w.finish().unwrap());
    }
    s.commit_external(step, step / 20, metadata(step), &fragments)
        .unwrap();
}

/// Writes workload 1 into `dir` with this build: every WAL record type (a Snapshot first,
/// Commits, Pin and unpin, a Delete, a Relocate from segment compaction), every codec, every
/// dtype, every metadata kind, a multi-process (sharded) commit.
fn write_workload_1(dir: &Path) {
    let mut s = Store::open(dir, store_opts(Compression::zstd())).unwrap();
    commit_step(&mut s, 10);
    commit_step(&mut s, 20);
    s.compact_wal().unwrap();
    drop(s);
    let mut s = Store::open(dir, store_opts(Compression::None)).unwrap();
    commit_step(&mut s, 30);
    assert!(s.pin(2).unwrap());
    assert!(s.pin(3).unwrap());
    assert!(s.unpin(3).unwrap());
    commit_sharded(&mut s, dir, 40);
    s.delete(1).unwrap();
    let gc = s.gc().unwrap();
    assert!(
        !gc.segments_compacted.is_empty(),
        "the workload must relocate: {gc:?}"
    );
    drop(s);
    let mut s = Store::open(dir, store_opts(Compression::zstd())).unwrap();
    commit_step(&mut s, 50);
}

// ---------------------------------------------------------------- checks

/// What a fixture must cover, so it keeps proving what it is there for.
fn assert_coverage(fixture: &Path, s: &Store) {
    let wal_bytes = std::fs::read(support::live_wal(fixture)).unwrap();
    let h = WalHeader::decode(&wal_bytes).unwrap();
    let types: BTreeSet<u8> = wal::scan(&wal_bytes, h.salt)
        .records
        .iter()
        .map(|r| r.ty as u8)
        .collect();
    for t in [
        RecordType::Commit,
        RecordType::Delete,
        RecordType::Snapshot,
        RecordType::Pin,
        RecordType::Relocate,
    ] {
        assert!(
            types.contains(&(t as u8)),
            "{}: no {t:?} record",
            fixture.display()
        );
    }
    let mut codecs = BTreeSet::new();
    let mut dtypes = BTreeSet::new();
    for c in s.list() {
        let ck = s.checkpoint(Selector::Id(c.id)).unwrap();
        let m = ck.manifest();
        for t in &m.tensors {
            dtypes.insert(t.dtype);
        }
        for c in ckptstore::manifest::all_chunks(m) {
            codecs.insert(c.codec);
        }
    }
    let want: BTreeSet<i32> = [
        pb::Codec::None,
        pb::Codec::Zstd,
        pb::Codec::ZstdShuffle2,
        pb::Codec::ZstdShuffle4,
        pb::Codec::ZstdShuffle8,
    ]
    .into_iter()
    .map(|c| c as i32)
    .collect();
    assert_eq!(codecs, want, "{}: codecs", fixture.display());
    assert_eq!(
        dtypes.len(),
        DType::ALL.len(),
        "{}: dtypes",
        fixture.display()
    );
}

/// Every live checkpoint of workload 1 in `s`, bit-exact, and every chunk verifies.
fn assert_workload_1(s: &Store, what: &str) {
    let live: Vec<(u64, u64)> = s.list().iter().map(|c| (c.id, c.step)).collect();
    assert_eq!(live, LIVE, "{what}: checkpoints");
    assert_eq!(s.pinned(), PINNED, "{what}: pins");
    assert_checkpoints(s, &LIVE, what);
}

/// Checkpoints `live` (id, step) of `s` hold what `commit_step(step)` put, bit-exact, and
/// every chunk of the store verifies.
fn assert_checkpoints(s: &Store, live: &[(u64, u64)], what: &str) {
    for &(id, step) in live {
        let ck = s.checkpoint(Selector::Id(id)).unwrap();
        assert_eq!(ck.info().epoch, step / 20, "{what}: epoch of {id}");
        assert_eq!(ck.metadata(), metadata(step), "{what}: metadata of {id}");
        let want = tensors(step);
        let mut names: Vec<&str> = ck.tensor_names();
        names.sort_unstable();
        let mut want_names: Vec<&str> = want.iter().map(|t| t.0.as_str()).collect();
        want_names.sort_unstable();
        assert_eq!(names, want_names, "{what}: tensors of {id}");
        for (name, d, shape, bytes) in &want {
            let t = ck.tensor(name).unwrap();
            assert_eq!((t.dtype, &t.shape), (*d, shape), "{what}: {id}/{name}");
            assert!(
                t.data == *bytes,
                "{what}: checkpoint {id} tensor {name} differs"
            );
        }
        for (name, b) in blobs(step) {
            assert_eq!(ck.blob(&name).unwrap(), b, "{what}: {id} blob {name}");
        }
    }
    for (id, r) in s.verify_all() {
        r.unwrap_or_else(|e| panic!("{what}: checkpoint {id} does not verify: {e}"));
    }
}

fn fixture_workload(fixture: &Path) -> u32 {
    let note = std::fs::read_to_string(fixture.join(FIXTURE_NOTE))
        .unwrap_or_else(|e| panic!("{}: {FIXTURE_NOTE}: {e}", fixture.display()));
    note.lines()
        .find_map(|l| l.strip_prefix("workload "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{}: no workload line", fixture.display()))
}

/// The fixture stores checked in, by name.
fn fixtures() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    out.sort();
    out
}

/// A private copy of `fixture` (open may recover or compact).
fn copy_of(fixture: &Path) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    support::copy_tree(fixture, tmp.path());
    // Checked-out files carry the checkout's modes; the store wants its own private ones.
    for sub in ["", SEGMENTS_DIR] {
        let d = tmp.path().join(sub);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    tmp
}

// ---------------------------------------------------------------- workload 3: sealed

/// The keys of workload 3 (test keys: the fixture is public).
const KEY_1: &str = "5eed5eed5eed5eed5eed5eed5eed5eed0123456789abcdef0123456789abcdef";
const KEY_2: &str = "c0ffeec0ffeec0ffeec0ffeec0ffeec0fedcba9876543210fedcba9876543210";

fn key(hex: &str) -> ckptstore::crypt::Key {
    ckptstore::crypt::Key::from_hex(hex).unwrap()
}

/// Workload 3's checkpoints at the end: (id, step, sealed); 1 is plain, 2 and 4 sealed under
/// key 1 (3 was deleted and its segments compacted), 5 under key 2.
const LIVE_3: [(u64, u64, bool); 4] = [(1, 10, false), (2, 20, true), (4, 30, true), (5, 40, true)];

/// Both keys, the second current.
fn sealed_opts(compression: Compression) -> Options {
    Options {
        encryption_key: Some(key(KEY_2)),
        old_keys: vec![key(KEY_1)],
        ..store_opts(compression)
    }
}

/// Writes workload 3: a plain checkpoint, then sealed ones under key 1 (compressed, and a
/// segment compaction of sealed chunks), then under key 2 after a rotation.
fn write_workload_3(dir: &Path) {
    let mut s = Store::open(dir, store_opts(Compression::None)).unwrap();
    commit_step(&mut s, 10);
    drop(s);
    let o = Options {
        encryption_key: Some(key(KEY_1)),
        ..store_opts(Compression::zstd())
    };
    let mut s = Store::open(dir, o).unwrap();
    commit_step(&mut s, 20);
    commit_step(&mut s, 25);
    commit_step(&mut s, 30);
    s.delete(3).unwrap();
    s.gc().unwrap();
    drop(s);
    let mut s = Store::open(dir, sealed_opts(Compression::None)).unwrap();
    commit_step(&mut s, 40);
}

/// Workload 3's checks: the feature is declared, sealed checkpoints are sealed, nothing opens
/// without the keys, everything reads bit-exact with them.
fn assert_workload_3(dir: &Path, s: &Store, what: &str) {
    assert!(
        s.features().contains(&ckptstore::features::ENCRYPTION),
        "{what}: features {}",
        s.features()
    );
    let want: Vec<(u64, u64)> = LIVE_3.iter().map(|&(id, step, _)| (id, step)).collect();
    let live: Vec<(u64, u64)> = s.list().iter().map(|c| (c.id, c.step)).collect();
    assert_eq!(live, want, "{what}");
    for (id, _, sealed) in LIVE_3 {
        let ck = s.checkpoint(Selector::Id(id)).unwrap();
        assert_eq!(ck.is_sealed(), sealed, "{what}: checkpoint {id}");
        // Sealed manifests carry their names, shapes and metadata in a sealed body.
        assert_eq!(
            !ck.manifest().sealed_body.is_empty(),
            sealed,
            "{what}: checkpoint {id}"
        );
    }
    assert_checkpoints(s, &want, what);
    let chain = s.verify_chain().unwrap();
    assert_eq!(chain.unauthenticated, [1], "{what}: {chain:?}");
    assert_eq!(chain.verified, [2, 4, 5], "{what}: {chain:?}");
    assert_eq!(chain.breaks, [(2, 4)], "{what}: checkpoint 3 was deleted");
    assert!(matches!(
        Store::open(dir, Options::read_only()),
        Err(ckptstore::Error::KeyRequired { .. })
    ));
}

/// A workload-3 fixture: read-only with both keys, then as the writer (a commit, a WAL
/// compaction, a reopen).
fn check_workload_3_fixture(fixture: &Path, name: &str) {
    let tmp = copy_of(fixture);
    let ro = Options {
        read_only: true,
        ..sealed_opts(Compression::None)
    };
    let s = Store::open(tmp.path(), ro).unwrap();
    assert_workload_3(tmp.path(), &s, &format!("{name} read-only"));
    drop(s);
    let mut s = Store::open(tmp.path(), sealed_opts(Compression::None)).unwrap();
    commit_step(&mut s, 60);
    s.compact_wal().unwrap();
    drop(s);
    let s = Store::open(tmp.path(), sealed_opts(Compression::None)).unwrap();
    s.verify(s.latest().unwrap().id).unwrap();
}

/// A workload-3 fixture rebuilt from its segments: the trailers hold the WAL form (sealed
/// bodies, keyed chunk ids); the rebuild needs no key for the structure, the open after it
/// needs the keys.
fn check_workload_3_rebuild(dir: &Path, name: &str) {
    let (s, report) = Store::rebuild(dir, sealed_opts(Compression::None))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    for (id, step, _) in LIVE_3 {
        assert!(report.restored.contains(&id), "{name}: {report:?}");
        let ck = s.checkpoint(Selector::Id(id)).unwrap();
        assert_eq!(ck.metadata(), metadata(step), "{name}: {id}");
        for (t, _, _, bytes) in tensors(step) {
            assert!(ck.tensor(&t).unwrap().data == bytes, "{name}: {id}/{t}");
        }
    }
    for (id, r) in s.verify_all() {
        r.unwrap_or_else(|e| panic!("{name}: {id}: {e}"));
    }
}

/// Workload 3 written by this build passes its checks.
#[test]
fn workload_3_written_now_passes_the_checks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    write_workload_3(&dir);
    let ro = Options {
        read_only: true,
        ..sealed_opts(Compression::None)
    };
    let s = Store::open(&dir, ro).unwrap();
    assert_workload_3(&dir, &s, "this build");
}

#[test]
fn every_fixture_store_opens_bit_exact() {
    let all = fixtures();
    assert!(
        !all.is_empty(),
        "no fixture stores in {}",
        fixtures_dir().display()
    );
    for fixture in all {
        let name = fixture.file_name().unwrap().to_string_lossy().to_string();
        match fixture_workload(&fixture) {
            1 => {}
            2 => {
                check_workload_2_fixture(&fixture, &name);
                continue;
            }
            3 => {
                check_workload_3_fixture(&fixture, &name);
                continue;
            }
            4 => {
                check_workload_4_fixture(&fixture, &name);
                continue;
            }
            5 => {
                check_workload_5_fixture(&fixture, &name);
                continue;
            }
            n => panic!("{name}: unknown workload {n}"),
        }
        // Read-only first (changes nothing), then as the writer (recovery may repair).
        let tmp = copy_of(&fixture);
        let s = Store::open(tmp.path(), Options::read_only()).unwrap();
        assert_coverage(&fixture, &s);
        assert_workload_1(&s, &format!("{name} read-only"));
        drop(s);
        let mut s = Store::open(tmp.path(), store_opts(Compression::None)).unwrap();
        assert_workload_1(&s, &format!("{name} writer"));
        // And it stays a working store: a commit, a compaction, a reopen.
        commit_step(&mut s, 60);
        // The first commit of this build turns its trailer feature on, in an older store too.
        assert!(
            s.features()
                .contains(&ckptstore::features::SEGMENT_COMMIT_TRAILER),
            "{name}"
        );
        s.compact_wal().unwrap();
        drop(s);
        let s = Store::open(tmp.path(), Options::read_only()).unwrap();
        assert_eq!(s.list().len(), LIVE.len() + 1, "{name}");
        s.verify(s.latest().unwrap().id).unwrap();
    }
}

/// Every fixture whose segments carry commit trailers (its WAL header declares the
/// `segment-commit-trailer` feature) rebuilds from its segments alone — CURRENT and WAL
/// removed — with every live checkpoint bit-exact (pins are not restored); one without them
/// is refused and left as it was.
#[test]
fn every_fixture_store_rebuilds_from_its_segments_or_is_refused() {
    use ckptstore::features::SEGMENT_COMMIT_TRAILER;
    let mut rebuilt = 0;
    for fixture in fixtures() {
        let name = fixture.file_name().unwrap().to_string_lossy().to_string();
        if fixture_workload(&fixture) == 4 {
            // A lazily restored directory: its segments are in its bucket, not in it (its
            // check rebuilds nothing; its bucket's state came from a store with trailers).
            continue;
        }
        let header = std::fs::read(support::live_wal(&fixture)).unwrap();
        let trailers = WalHeader::decode(&header)
            .unwrap()
            .features
            .contains(&SEGMENT_COMMIT_TRAILER);
        let tmp = copy_of(&fixture);
        for e in std::fs::read_dir(tmp.path()).unwrap() {
            let p = e.unwrap().path();
            let n = p.file_name().unwrap().to_string_lossy().to_string();
            if n == "CURRENT" || n.ends_with(".wal") {
                std::fs::remove_file(p).unwrap();
            }
        }
        let before = support::snapshot_tree(tmp.path());
        if fixture_workload(&fixture) == 2 {
            check_workload_2_rebuild(tmp.path(), &name);
            rebuilt += 1;
            continue;
        }
        if fixture_workload(&fixture) == 5 {
            check_workload_5_rebuild(tmp.path(), &name);
            rebuilt += 1;
            continue;
        }
        if fixture_workload(&fixture) == 3 && trailers {
            check_workload_3_rebuild(tmp.path(), &name);
            rebuilt += 1;
            continue;
        }
        match Store::rebuild(tmp.path(), store_opts(Compression::None)) {
            Ok((s, report)) if trailers => {
                let live: Vec<u64> = LIVE.iter().map(|l| l.0).collect();
                assert_eq!(report.restored, live, "{name}: {report:?}");
                assert!(report.repointed_chunks > 0, "{name}: relocated chunks");
                for (id, step) in LIVE {
                    let ck = s.checkpoint(Selector::Id(id)).unwrap();
                    assert_eq!(ck.metadata(), metadata(step), "{name}: {id}");
                    for (t, _, _, bytes) in tensors(step) {
                        assert!(ck.tensor(&t).unwrap().data == bytes, "{name}: {id}/{t}");
                    }
                }
                for (id, r) in s.verify_all() {
                    r.unwrap_or_else(|e| panic!("{name}: {id}: {e}"));
                }
                rebuilt += 1;
            }
            Err(ckptstore::Error::NotFound(msg)) if !trailers => {
                assert!(msg.contains("commit trailer"), "{name}: {msg}");
                let mut after = support::snapshot_tree(tmp.path());
                after.remove(Path::new("LOCK"));
                assert_eq!(after, before, "{name}: changed");
            }
            other => panic!("{name} (trailers: {trailers}): {:?}", other.map(|x| x.1)),
        }
    }
    assert!(rebuilt > 0, "no fixture with commit trailers");
}

/// Writes a new fixture store with this build: `CKPTSTORE_FIXTURE=NAME cargo test --test
/// format_fixtures -- --ignored generate_fixture_store` (docs/TESTING.md). Refuses to
/// overwrite one: fixtures are added, never regenerated.
#[test]
#[ignore]
fn generate_fixture_store() {
    let name = std::env::var("CKPTSTORE_FIXTURE").expect("set CKPTSTORE_FIXTURE=NAME");
    let dir = fixtures_dir().join(&name);
    assert!(
        !dir.exists(),
        "{} exists: fixtures are never regenerated",
        dir.display()
    );
    // CKPTSTORE_FIXTURE_WORKLOAD=2: the quarantine workload (feature `quarantine`); 3: the
    // sealed workload (feature `encryption`); 4: a lazy restore and its bucket (feature
    // `lazy-segments`); 5: frame headers padded so payloads start on a page (no feature:
    // every build reads them).
    let workload: u32 =
        std::env::var("CKPTSTORE_FIXTURE_WORKLOAD").map_or(1, |w| w.parse().unwrap());
    match workload {
        1 => write_workload_1(&dir),
        2 => write_workload_2(&dir),
        3 => write_workload_3(&dir),
        4 => write_workload_4(&dir),
        5 => write_workload_5(&dir),
        n => panic!("no workload {n}"),
    }
    let store_dir = match workload {
        4 => dir.join(LAZY_STORE),
        _ => dir.clone(),
    };
    match std::fs::remove_file(store_dir.join(ckptstore::store::LOCK_NAME)) {
        // A pull and a read-only open take no writer lock (workload 4).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && workload == 4 => {}
        r => r.unwrap(),
    }
    std::fs::write(
        dir.join(FIXTURE_NOTE),
        format!(
            "workload {workload}\nwritten by ckptstore {} ({})\n",
            env!("CARGO_PKG_VERSION"),
            std::env::var("CKPTSTORE_FIXTURE_BUILD").unwrap_or_else(|_| "unknown commit".into())
        ),
    )
    .unwrap();
    if workload == 4 {
        let tmp = copy_of_lazy(&dir);
        let s = Store::open(tmp.path().join(LAZY_STORE), Options::read_only()).unwrap();
        assert_workload_4(&s, &name);
        return;
    }
    if workload == 3 {
        let ro = Options {
            read_only: true,
            ..sealed_opts(Compression::None)
        };
        let s = Store::open(&dir, ro).unwrap();
        assert_workload_3(&dir, &s, &name);
        return;
    }
    let s = Store::open(&dir, Options::read_only()).unwrap();
    if workload == 5 {
        assert_workload_5(&s, &name);
        return;
    }
    if workload == 2 {
        assert_workload_2(&dir, &s, &name);
        return;
    }
    assert_coverage(&dir, &s);
    assert_workload_1(&s, &name);
}

/// The workload itself, in memory of this build: it must keep passing the checks (so that a
/// fixture written by this build would).
#[test]
fn workload_1_written_now_passes_the_checks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    write_workload_1(&dir);
    let s = Store::open(&dir, Options::read_only()).unwrap();
    assert_coverage(&dir, &s);
    assert_workload_1(&s, "this build");
}

// ---------------------------------------------------------------- workload 2: quarantine

/// Workload 2's tensors at `step` (1..=4): "frozen" (two chunks, the same at every step), "w"
/// (new every step) and, at steps 1..=3 only, "gone" (one chunk, the same at those steps).
fn tensors_2(step: u64) -> Vec<(&'static str, Vec<u8>)> {
    let mut t = vec![
        ("frozen", noise(900, 2 * CHUNK)),
        ("w", noise(900 + step, 100)),
    ];
    if step <= 3 {
        t.push(("gone", noise(901, CHUNK)));
    }
    t
}

fn commit_2(s: &mut Store, step: u64) {
    let mut t = s.begin(step).unwrap();
    for (name, bytes) in tensors_2(step) {
        t.put_tensor(name, DType::U8, &[bytes.len() as u64], &bytes)
            .unwrap();
    }
    t.commit().unwrap();
}

/// The chunk of `tensor` (index `k`) in checkpoint 1 of workload 2.
fn chunk_2(s: &Store, tensor: &str, k: usize) -> pb::ChunkRef {
    let ck = s.checkpoint(Selector::Id(1)).unwrap();
    let t = ck.manifest().tensors.iter().find(|t| t.name == tensor);
    t.unwrap().chunks[k].clone()
}

/// Writes workload 2 into `dir`: three checkpoints share "frozen" and "gone"; a bit of each
/// rots on disk; a scrub finds both and the writer quarantines them (the feature
/// `quarantine` turned on, a Quarantine record's `bad`); the save of step 4 holds "frozen"
/// again and heals it (a Quarantine record's `healed`); "gone" stays quarantined, unhealed.
fn write_workload_2(dir: &Path) {
    let mut s = Store::open(dir, store_opts(Compression::None)).unwrap();
    for step in 1..=3 {
        commit_2(&mut s, step);
    }
    for (tensor, k) in [("frozen", 1), ("gone", 0)] {
        let c = chunk_2(&s, tensor, k);
        let seg = dir.join(SEGMENTS_DIR).join(format!("{:08}.seg", c.segment));
        let mut b = std::fs::read(&seg).unwrap();
        b[c.offset as usize + 9] ^= 0x01;
        std::fs::write(&seg, b).unwrap();
    }
    assert_eq!(s.scrub().unwrap().heal.quarantined.len(), 2);
    commit_2(&mut s, 4);
}

/// Workload 2 as this build must read it: "frozen" healed in every checkpoint, "gone" still
/// quarantined and failing in checkpoints 1..=3 (naming its chunk), everything else bit-exact.
fn assert_workload_2(dir: &Path, s: &Store, what: &str) {
    assert!(
        s.features().contains(&ckptstore::features::QUARANTINE),
        "{what}: feature"
    );
    let wal_bytes = std::fs::read(support::live_wal(dir)).unwrap();
    let h = WalHeader::decode(&wal_bytes).unwrap();
    let types: BTreeSet<u8> = wal::scan(&wal_bytes, h.salt)
        .records
        .iter()
        .map(|r| r.ty as u8)
        .collect();
    assert!(
        types.contains(&(RecordType::Quarantine as u8)),
        "{what}: {types:?}"
    );
    let gone = chunk_2(s, "gone", 0);
    assert_eq!(s.quarantined(), vec![(gone.segment, gone.offset)], "{what}");
    let ids: Vec<u64> = s.list().iter().map(|c| c.id).collect();
    assert_eq!(ids, [1, 2, 3, 4], "{what}");
    for step in 1..=4u64 {
        let ck = s.checkpoint(Selector::Id(step)).unwrap();
        for (name, bytes) in tensors_2(step) {
            match ck.tensor(name) {
                Ok(t) => assert!(t.data == bytes, "{what}: {step}/{name} differs"),
                Err(ckptstore::Error::ChunkCorrupt {
                    segment, offset, ..
                }) if name == "gone" && (segment, offset) == (gone.segment, gone.offset) => {}
                Err(e) => panic!("{what}: {step}/{name}: {e}"),
            }
        }
    }
    assert_eq!(s.latest_valid().unwrap().map(|c| c.id), Some(4), "{what}");
}

/// A workload-2 fixture: read-only and as the writer as written; then the save that holds
/// "gone" again heals checkpoints 1..=3, and a compaction with nothing quarantined drops the
/// feature.
fn check_workload_2_fixture(fixture: &Path, name: &str) {
    let tmp = copy_of(fixture);
    let s = Store::open(tmp.path(), Options::read_only()).unwrap();
    assert_workload_2(tmp.path(), &s, &format!("{name} read-only"));
    drop(s);
    let mut s = Store::open(tmp.path(), store_opts(Compression::None)).unwrap();
    assert_workload_2(tmp.path(), &s, &format!("{name} writer"));
    commit_2(&mut s, 3);
    assert!(s.quarantined().is_empty(), "{name}: healed");
    s.compact_wal().unwrap();
    assert!(!s.features().contains(&ckptstore::features::QUARANTINE));
    drop(s);
    let s = Store::open(tmp.path(), Options::read_only()).unwrap();
    for (id, r) in s.verify_all() {
        r.unwrap_or_else(|e| panic!("{name}: checkpoint {id}: {e}"));
    }
}

/// Workload 2 written by this build passes its checks (what a fixture of it must).
#[test]
fn workload_2_written_now_passes_the_checks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    write_workload_2(&dir);
    let s = Store::open(&dir, Options::read_only()).unwrap();
    assert_workload_2(&dir, &s, "this build");
}

/// A workload-2 fixture rebuilt from its segments (WAL and CURRENT removed): the rebuild
/// restores checkpoints 1..=4 but not the quarantine (it lived in the WAL), so their rotten
/// chunks are referenced again; the scrub the rebuild runs finds and quarantines them, heals
/// "frozen" with the copy checkpoint 4 holds, and names 1..=3 broken by "gone" until a save
/// holds it again.
fn check_workload_2_rebuild(dir: &Path, name: &str) {
    let (mut s, report) = Store::rebuild(dir, store_opts(Compression::None)).unwrap();
    assert_eq!(report.restored, [1, 2, 3, 4], "{name}: {report:?}");
    let r = &report.scrub;
    assert_eq!(r.heal.quarantined.len(), 2, "{name}: {r:?}");
    assert_eq!(r.heal.healed.len(), 1, "{name}: frozen healed: {r:?}");
    let broken: Vec<u64> = r.broken.iter().map(|b| b.0).collect();
    assert_eq!(broken, [1, 2, 3], "{name}: {r:?}");
    commit_2(&mut s, 3);
    for (id, r) in s.verify_all() {
        r.unwrap_or_else(|e| panic!("{name}: rebuilt and healed, checkpoint {id}: {e}"));
    }
}

// ---------------------------------------------------------------- workload 4: lazy restore

/// Workload 4's directory layout: the lazily restored store, and the `file://` bucket it was
/// restored from (its segment objects; the fixture is self-contained).
const LAZY_STORE: &str = "store";
const LAZY_BUCKET: &str = "bucket";
/// The URL the checked-in `REMOTE_SEGMENTS` names (the generator's bucket path, absolute,
/// replaced): a check points it at its copy of `bucket/` first ([`copy_of_lazy`]).
const LAZY_URL_PLACEHOLDER: &str = "file:///ckptstore-fixture/lazy/bucket";

/// Workload 4's checkpoint at `step` (1..=3): "w" (one chunk, new every step), "frozen" (one
/// chunk, the same at every step: deduplicated). Small: the fixture holds its bucket too.
fn tensors_4(step: u64) -> Vec<(&'static str, Vec<u8>)> {
    vec![("w", noise(400 + step, 1500)), ("frozen", noise(499, 600))]
}

fn commit_4(s: &mut Store, step: u64) {
    let mut t = s.begin(step).unwrap();
    for (k, v) in metadata(step) {
        t.set_metadata(k, v);
    }
    for (name, bytes) in tensors_4(step) {
        t.put_tensor(name, DType::U8, &[bytes.len() as u64], &bytes)
            .unwrap();
    }
    t.commit().unwrap();
}

/// Writes workload 4 into `dir`: a store (in a temporary directory) replicated to the bucket
/// `dir/bucket` with checkpoints of steps 1..=3; `ckptstore pull` of it into `dir/store` (the
/// WAL and `REMOTE_SEGMENTS`, no segment); a read of step 2's "w", which fetches one segment,
/// so that the fixture holds a fetched segment and segments still in the bucket. The list's
/// absolute bucket URL is then replaced by [`LAZY_URL_PLACEHOLDER`].
fn write_workload_4(dir: &Path) {
    let src = tempfile::tempdir().unwrap();
    let bucket = dir.join(LAZY_BUCKET);
    std::fs::create_dir_all(&bucket).unwrap();
    let url = format!("file://{}", bucket.display());
    let opts = Options {
        replica: Some(url.clone()),
        cache_dir: Some(src.path().join("cache")),
        ..store_opts(Compression::None)
    };
    let mut s = Store::open(src.path().join("source"), opts).unwrap();
    for step in 1..=3 {
        commit_4(&mut s, step);
    }
    s.wait_replicated(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    drop(s);
    let store = dir.join(LAZY_STORE);
    ckptstore::store::pull(&url, &store, &store_opts(Compression::None)).unwrap();
    let s = Store::open(&store, Options::read_only()).unwrap();
    let ck = s.checkpoint(Selector::Step(2)).unwrap();
    assert!(ck.tensor("w").unwrap().data == tensors_4(2)[0].1);
    drop(s);
    set_lazy_url(&store, LAZY_URL_PLACEHOLDER);
}

/// Points the `REMOTE_SEGMENTS` of the lazily restored `store` at `url`.
fn set_lazy_url(store: &Path, url: &str) {
    let path = store.join(ckptstore::store::REMOTE_SEGMENTS_NAME);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    v["url"] = serde_json::Value::String(url.to_string());
    std::fs::write(&path, v.to_string()).unwrap();
}

/// A private copy of a workload-4 fixture, its list pointed at the copy of its bucket.
fn copy_of_lazy(fixture: &Path) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    support::copy_tree(fixture, tmp.path());
    let store = tmp.path().join(LAZY_STORE);
    for d in [store.clone(), store.join(SEGMENTS_DIR)] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let bucket = tmp.path().join(LAZY_BUCKET);
    set_lazy_url(&store, &format!("file://{}", bucket.display()));
    tmp
}

/// Workload 4's checkpoints, (id, step): all three live.
const LIVE_4: [(u64, u64); 3] = [(1, 1), (2, 2), (3, 3)];

fn assert_workload_4(s: &Store, what: &str) {
    let ids: Vec<(u64, u64)> = s.list().iter().map(|c| (c.id, c.step)).collect();
    assert_eq!(ids, LIVE_4, "{what}");
    for (id, step) in LIVE_4 {
        let ck = s.checkpoint(Selector::Id(id)).unwrap();
        assert_eq!(ck.metadata(), metadata(step), "{what}: {id}");
        for (t, bytes) in tensors_4(step) {
            assert!(ck.tensor(t).unwrap().data == bytes, "{what}: {id}/{t}");
        }
    }
    for (id, r) in s.verify_all() {
        r.unwrap_or_else(|e| panic!("{what}: checkpoint {id} does not verify: {e}"));
    }
}

/// A lazily restored fixture: its header declares `lazy-segments` and its list names
/// segments that are not in the directory; a reader fetches them from the fixture's bucket
/// and reads every checkpoint bit-exact; a writer commits (deduplicating against a chunk
/// still in the bucket), `fetch_all` makes it an ordinary store (feature cleared, list
/// removed), which reads bit-exact with the bucket gone.
fn check_workload_4_fixture(fixture: &Path, name: &str) {
    use ckptstore::features::LAZY_SEGMENTS;
    let store = fixture.join(LAZY_STORE);
    let header = std::fs::read(support::live_wal(&store)).unwrap();
    let features = WalHeader::decode(&header).unwrap().features;
    assert!(features.contains(&LAZY_SEGMENTS), "{name}: {features}");
    let listed = std::fs::read_to_string(store.join(ckptstore::store::REMOTE_SEGMENTS_NAME))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(listed.contains(LAZY_URL_PLACEHOLDER), "{name}: {listed}");
    let local = support::segment_files(&store).len();
    assert!(local >= 1, "{name}: a fetched segment");

    let tmp = copy_of_lazy(fixture);
    let dir = tmp.path().join(LAZY_STORE);
    let s = Store::open(&dir, Options::read_only()).unwrap();
    assert!(
        s.segments_in_bucket().len() >= 2,
        "{name}: segments still in the bucket: {:?}",
        s.segments_in_bucket()
    );
    assert!(s.features().contains(&LAZY_SEGMENTS), "{name}");
    assert_workload_4(&s, &format!("{name} read-only"));
    drop(s);
    // A fresh copy, as the writer: a commit before anything is fetched.
    let tmp = copy_of_lazy(fixture);
    let dir = tmp.path().join(LAZY_STORE);
    let mut s = Store::open(&dir, store_opts(Compression::None)).unwrap();
    assert!(s.features().contains(&LAZY_SEGMENTS), "{name}");
    let info = {
        let mut t = s.begin(4).unwrap();
        let frozen = &tensors_4(1)[1].1;
        t.put_tensor("frozen", DType::U8, &[frozen.len() as u64], frozen)
            .unwrap();
        t.commit().unwrap()
    };
    assert_eq!(info.chunks_deduplicated, 1, "{name}: {info:?}");
    s.fetch_all().unwrap();
    assert!(!s.features().contains(&LAZY_SEGMENTS), "{name}");
    drop(s);
    assert!(!dir.join(ckptstore::store::REMOTE_SEGMENTS_NAME).exists());
    std::fs::remove_dir_all(tmp.path().join(LAZY_BUCKET)).unwrap();
    let s = Store::open(&dir, Options::read_only()).unwrap();
    assert!(s.segments_in_bucket().is_empty(), "{name}");
    assert_eq!(s.list().len(), LIVE_4.len() + 1, "{name}");
    let last = s.checkpoint(Selector::Step(4)).unwrap();
    assert!(last.tensor("frozen").unwrap().data == tensors_4(4)[1].1);
    for (id, step) in LIVE_4 {
        let ck = s.checkpoint(Selector::Id(id)).unwrap();
        for (t, bytes) in tensors_4(step) {
            assert!(ck.tensor(t).unwrap().data == bytes, "{name}: {id}/{t}");
        }
    }
    for (id, r) in s.verify_all() {
        r.unwrap_or_else(|e| panic!("{name}: checkpoint {id} does not verify: {e}"));
    }
}

/// Workload 4 written by this build passes its checks.
#[test]
fn workload_4_written_now_passes_the_checks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lazy");
    write_workload_4(&dir);
    std::fs::write(dir.join(FIXTURE_NOTE), "workload 4\n").unwrap();
    check_workload_4_fixture(&dir, "this build");
}

// ---------------------------------------------------------------- workload 5: padded frames

/// Workload 5's checkpoints at the end: (id, step).
const LIVE_5: [(u64, u64); 2] = [(1, 1), (2, 2)];

/// The tensors of workload 5's checkpoint `step`: raw runs of at least 64 KiB, whose frame
/// headers are padded so that their payload starts on a page (segment::PAD_MIN_RUN_BYTES,
/// issue 13), next to a small raw run and a compressed one, which are not padded. "frozen"
/// is deduplicated by step 2; "paged" changes.
fn tensors_5(step: u64) -> Vec<Tensor> {
    let paged = 16 * CHUNK + 100;
    vec![
        (
            "paged".into(),
            DType::U8,
            vec![paged as u64],
            noise(50 + step, paged),
        ),
        (
            "frozen".into(),
            DType::U8,
            vec![16 * CHUNK as u64],
            noise(60, 16 * CHUNK),
        ),
        (
            "small".into(),
            DType::U8,
            vec![3000],
            noise(70 + step, 3000),
        ),
        (
            "z".into(),
            DType::F32,
            vec![CHUNK as u64],
            values(DType::F32, step, CHUNK),
        ),
    ]
}

fn commit_5(s: &mut Store, step: u64) {
    let mut t = s.begin(step).unwrap();
    t.set_metadata("step", step as i64);
    for (name, d, shape, bytes) in tensors_5(step) {
        t.put_tensor(&name, d, &shape, &bytes).unwrap();
    }
    t.commit().unwrap();
}

/// Writes workload 5: two checkpoints with padded frames, compressing where it pays.
fn write_workload_5(dir: &Path) {
    let mut s = Store::open(dir, store_opts(Compression::zstd())).unwrap();
    for (_, step) in LIVE_5 {
        commit_5(&mut s, step);
    }
}

/// Workload 5's checks: every checkpoint bit-exact and verified, and the fixture still has
/// what it is there for — payloads of the large raw runs on a page, the others not.
fn assert_workload_5(s: &Store, what: &str) {
    let live: Vec<(u64, u64)> = s.list().iter().map(|c| (c.id, c.step)).collect();
    assert_eq!(live, LIVE_5, "{what}: checkpoints");
    for (id, step) in LIVE_5 {
        let ck = s.checkpoint(Selector::Id(id)).unwrap();
        for (name, d, shape, bytes) in tensors_5(step) {
            let t = ck.tensor(&name).unwrap();
            assert_eq!((t.dtype, &t.shape), (d, &shape), "{what}: {id}/{name}");
            assert!(
                t.data == bytes,
                "{what}: checkpoint {id} tensor {name} differs"
            );
            let first = &ck.manifest().tensors.iter().find(|t| t.name == name);
            let c = &first.unwrap().chunks[0];
            let padded = matches!(name.as_str(), "paged" | "frozen");
            assert_eq!(c.offset % 4096 == 0, padded, "{what}: {id}/{name} at {c:?}");
        }
    }
    for (id, r) in s.verify_all() {
        r.unwrap_or_else(|e| panic!("{what}: checkpoint {id} does not verify: {e}"));
    }
}

/// A workload-5 fixture: read-only, then as the writer (a commit, a WAL compaction, a
/// reopen).
fn check_workload_5_fixture(fixture: &Path, name: &str) {
    let tmp = copy_of(fixture);
    let s = Store::open(tmp.path(), Options::read_only()).unwrap();
    assert_workload_5(&s, &format!("{name} read-only"));
    drop(s);
    let mut s = Store::open(tmp.path(), store_opts(Compression::None)).unwrap();
    assert_workload_5(&s, &format!("{name} writer"));
    commit_5(&mut s, 3);
    s.compact_wal().unwrap();
    drop(s);
    let s = Store::open(tmp.path(), Options::read_only()).unwrap();
    assert_eq!(s.list().len(), LIVE_5.len() + 1, "{name}");
    s.verify(s.latest().unwrap().id).unwrap();
}

/// A workload-5 fixture rebuilt from its segments: every checkpoint, bit-exact.
fn check_workload_5_rebuild(dir: &Path, name: &str) {
    let (s, report) = Store::rebuild(dir, store_opts(Compression::None))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let ids: Vec<u64> = LIVE_5.iter().map(|l| l.0).collect();
    assert_eq!(report.restored, ids, "{name}: {report:?}");
    assert_workload_5(&s, &format!("{name} rebuilt"));
}

/// Workload 5 written by this build passes its checks.
#[test]
fn workload_5_written_now_passes_the_checks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    write_workload_5(&dir);
    let s = Store::open(&dir, Options::read_only()).unwrap();
    assert_workload_5(&s, "this build");
}
