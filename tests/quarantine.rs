//! Quarantine and self-healing (docs/GUARANTEES.md, "Bad chunks: quarantine and healing"): a
//! chunk a verified read finds bad is recorded in the WAL, never deduplicated against again,
//! and the next save holding the same bytes writes a fresh copy that every checkpoint which
//! referenced the bad one is repointed at — durably, across reopens and WAL compaction.

mod support;

use ckptstore::{DType, Error, Options, Selector, Store};
use std::path::Path;
use support::{assert_holds, commit, data, opts, CHUNK};

/// Flips one bit of segment `segment` at `offset` on disk (bit rot).
fn flip(dir: &Path, segment: u64, offset: u64) {
    let path = dir.join("segments").join(format!("{segment:08}.seg"));
    let mut b = std::fs::read(&path).unwrap();
    b[offset as usize] ^= 0x20;
    std::fs::write(&path, b).unwrap();
}

/// The chunks of tensor `name` in checkpoint `id`.
fn chunks(s: &Store, id: u64, name: &str) -> Vec<ckptstore::proto::v1::ChunkRef> {
    let ck = s.checkpoint(Selector::Id(id)).unwrap();
    let t = ck.manifest().tensors.iter().find(|t| t.name == name);
    t.unwrap().chunks.clone()
}

/// Four checkpoints sharing a frozen two-chunk embedding (deduplicated: one copy on disk)
/// with a changing weight; returns the frozen bytes and each step's weights.
fn frozen_store(dir: &Path) -> (Vec<u8>, Vec<Vec<u8>>) {
    let frozen = data(1, 2 * CHUNK);
    let mut s = Store::open(dir, opts()).unwrap();
    let mut weights = Vec::new();
    for step in 1..=4u64 {
        let w = data(100 + step, CHUNK);
        commit(&mut s, step, &[("embed", &frozen), ("w", &w)]);
        weights.push(w);
    }
    let first = chunks(&s, 1, "embed");
    for id in 2..=4 {
        assert_eq!(
            chunks(&s, id, "embed"),
            first,
            "the frozen tensor is deduplicated"
        );
    }
    (frozen, weights)
}

/// The Done-when case of issue 14: a frozen tensor's chunk flipped on disk makes every
/// checkpoint fail verification (`latest_valid` walks back to nothing); the next save of the
/// same tensor heals, and the earlier checkpoints verify bit-exact again — after a reopen too.
#[test]
fn a_flipped_frozen_chunk_is_healed_by_the_next_save_and_earlier_checkpoints_verify_again() {
    let dir = tempfile::tempdir().unwrap();
    let (frozen, weights) = frozen_store(dir.path());
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let bad = chunks(&s, 1, "embed")[1].clone();
    drop(s);
    flip(dir.path(), bad.segment, bad.offset + 3);

    s = Store::open(dir.path(), opts()).unwrap();
    // A verified load fails naming the chunk, and there is no intact checkpoint left.
    let err = s
        .checkpoint(Selector::Latest)
        .unwrap()
        .tensor("embed")
        .unwrap_err();
    assert!(
        matches!(err, Error::ChunkCorrupt { segment, offset, .. } if (segment, offset) == (bad.segment, bad.offset)),
        "{err}"
    );
    assert_eq!(s.latest_valid().unwrap(), None);
    // The trainer's live memory: the next save holds the same frozen bytes.
    let w5 = data(105, CHUNK);
    let info = commit(&mut s, 5, &[("embed", &frozen), ("w", &w5)]);
    assert_eq!(
        info.chunks_written, 2,
        "a fresh copy of the bad chunk, and w"
    );
    let healed = chunks(&s, 5, "embed")[1].clone();
    assert_ne!((healed.segment, healed.offset), (bad.segment, bad.offset));
    for id in 1..=4u64 {
        assert_eq!(
            chunks(&s, id, "embed")[1],
            healed,
            "checkpoint {id} repointed"
        );
        assert_holds(
            &s,
            id,
            &[("embed", &frozen), ("w", &weights[id as usize - 1])],
        );
    }
    assert_holds(&s, 5, &[("embed", &frozen), ("w", &w5)]);
    assert_eq!(s.latest_valid().unwrap().unwrap().id, 5);
    assert!(
        s.quarantined().is_empty(),
        "healed chunks leave the quarantine"
    );
    drop(s);

    // Durable: a reopen replays the heal, and so does a compacted WAL.
    let mut s = Store::open(dir.path(), opts()).unwrap();
    for id in 1..=4u64 {
        assert_holds(
            &s,
            id,
            &[("embed", &frozen), ("w", &weights[id as usize - 1])],
        );
    }
    s.compact_wal().unwrap();
    drop(s);
    let s = Store::open(dir.path(), Options::read_only()).unwrap();
    for (id, r) in s.verify_all() {
        r.unwrap_or_else(|e| panic!("checkpoint {id}: {e}"));
    }
}

/// Deduplication never references a quarantined chunk: the save after the quarantine writes
/// fresh bytes for it, even though the index knew the hash — and the quarantine itself is
/// durable (a reopen in between forgets nothing).
#[test]
fn dedup_never_references_a_quarantined_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let (frozen, _) = frozen_store(dir.path());
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let bad = chunks(&s, 4, "embed")[0].clone();
    drop(s);
    flip(dir.path(), bad.segment, bad.offset);
    s = Store::open(dir.path(), opts()).unwrap();
    assert!(s.verify(4).is_err());
    // Recorded durably by the writer (a verified read cannot write the WAL itself).
    let r = s.heal().unwrap();
    assert_eq!(r.quarantined, vec![(bad.segment, bad.offset)]);
    assert_eq!(r.broken_checkpoints(), vec![1, 2, 3, 4]);
    drop(s);
    let mut s = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(s.quarantined(), vec![(bad.segment, bad.offset)]);
    let info = commit(&mut s, 5, &[("embed", &frozen)]);
    assert_eq!(
        (info.chunks_written, info.chunks_deduplicated),
        (1, 1),
        "the quarantined chunk is written again, the intact one referenced"
    );
    let c = chunks(&s, 5, "embed");
    assert_ne!((c[0].segment, c[0].offset), (bad.segment, bad.offset));
    assert_eq!(c[1], chunks(&s, 1, "embed")[1]);
    assert!(s.heal().unwrap().unhealed.is_empty());
}

/// A read-only reader finds the bad chunk and reports it, but writes nothing; the writer's
/// `heal` records only what its own verified reads found, so the writer must read it too
/// (or `scrub`). A chunk that reads back intact is never quarantined.
#[test]
fn a_read_only_reader_reports_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    frozen_store(dir.path());
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let bad = chunks(&s, 2, "embed")[0].clone();
    flip(dir.path(), bad.segment, bad.offset);
    let wal = support::live_wal(dir.path());
    let before = std::fs::read(&wal).unwrap();
    let mut r = Store::open(dir.path(), Options::read_only()).unwrap();
    assert!(r.verify(2).is_err());
    assert!(r.heal().unwrap().quarantined.is_empty());
    assert_eq!(
        std::fs::read(&wal).unwrap(),
        before,
        "a reader wrote the WAL"
    );
    // The writer has read nothing bad: nothing to record.
    assert!(s.heal().unwrap().quarantined.is_empty());
    assert!(s.verify(3).is_err());
    assert_eq!(
        s.heal().unwrap().quarantined,
        vec![(bad.segment, bad.offset)]
    );
}

/// Bit rot in a compressed chunk (a frame that no longer decodes) is quarantined and healed
/// like a raw one; the fresh copy may use another codec than the bad one.
#[test]
fn a_corrupt_compressed_chunk_is_healed_by_a_raw_save() {
    let dir = tempfile::tempdir().unwrap();
    let zstd = || Options {
        compression: ckptstore::Compression::zstd(),
        ..opts()
    };
    let frozen: Vec<u8> = data(3, 2 * CHUNK).iter().map(|b| b & 3).collect();
    let mut s = Store::open(dir.path(), zstd()).unwrap();
    for step in 1..=3 {
        let mut t = s.begin(step).unwrap();
        t.put_tensor("embed", DType::F32, &[2 * CHUNK as u64 / 4], &frozen)
            .unwrap();
        t.commit().unwrap();
    }
    let bad = chunks(&s, 1, "embed")[0].clone();
    assert_ne!(bad.codec, 0, "compressed");
    drop(s);
    flip(dir.path(), bad.segment, bad.offset + 5);
    let mut s = Store::open(dir.path(), opts()).unwrap();
    assert!(s.latest_valid().unwrap().is_none());
    let mut t = s.begin(4).unwrap();
    t.put_tensor("embed", DType::F32, &[2 * CHUNK as u64 / 4], &frozen)
        .unwrap();
    t.commit().unwrap();
    for id in 1..=4 {
        let got = s.checkpoint(Selector::Id(id)).unwrap().tensor("embed");
        assert_eq!(got.unwrap().data, frozen, "checkpoint {id}");
    }
    assert_eq!(
        chunks(&s, 1, "embed")[0].codec,
        0,
        "repointed at the raw copy"
    );
}

/// The format feature is declared only from the store's first quarantine on (a store that
/// never had a bad chunk keeps a header every older build reads), and a WAL compaction once
/// everything is healed drops it again.
#[test]
fn the_quarantine_feature_is_set_at_the_first_quarantine_and_dropped_once_healed() {
    use ckptstore::features::QUARANTINE;
    let dir = tempfile::tempdir().unwrap();
    let (frozen, _) = frozen_store(dir.path());
    let header = |dir: &Path| {
        let wal = std::fs::read(support::live_wal(dir)).unwrap();
        ckptstore::wal::WalHeader::decode(&wal).unwrap().features
    };
    let mut s = Store::open(dir.path(), opts()).unwrap();
    s.compact_wal().unwrap();
    assert!(!s.features().contains(&QUARANTINE) && !header(dir.path()).contains(&QUARANTINE));
    let baseline = header(dir.path());
    let bad = chunks(&s, 1, "embed")[0].clone();
    flip(dir.path(), bad.segment, bad.offset);
    assert!(s.verify(1).is_err());
    s.heal().unwrap();
    assert!(s.features().contains(&QUARANTINE));
    assert!(
        header(dir.path()).contains(&QUARANTINE),
        "durable in the header"
    );
    drop(s);
    let mut s = Store::open(dir.path(), opts()).unwrap();
    assert!(s.features().contains(&QUARANTINE));
    // A compaction while something is still quarantined keeps the feature (and the record).
    s.compact_wal().unwrap();
    drop(s);
    let mut s = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(s.quarantined(), vec![(bad.segment, bad.offset)]);
    commit(&mut s, 9, &[("embed", &frozen)]);
    assert!(s.quarantined().is_empty());
    s.compact_wal().unwrap();
    assert_eq!(
        header(dir.path()),
        baseline,
        "healed: the feature is gone again"
    );
    drop(s);
    let s = Store::open(dir.path(), opts()).unwrap();
    for (id, r) in s.verify_all() {
        r.unwrap_or_else(|e| panic!("checkpoint {id}: {e}"));
    }
}

/// Regression, issue 14 item 2 ("one rotten chunk spreads"): a chunk failing its BLAKE3 stayed
/// a dedup target — every later save of the same bytes referenced it, `latest_valid()` walked
/// back to nothing, and every `gc` failed with `CompactionSourceCorrupt` on its segment. Now
/// the save after the rot writes a fresh copy and is intact, `latest_valid()` finds it, and gc
/// keeps working (leaving only the rotten chunk in place until the heal frees it).
#[test]
fn regression_one_rotten_chunk_no_longer_spreads() {
    let dir = tempfile::tempdir().unwrap();
    let frozen = data(40, 2 * CHUNK);
    let mut s = Store::open(dir.path(), opts()).unwrap();
    // Segment 1: the frozen tensor and a big one-off tensor, dead once checkpoint 1 goes.
    commit(
        &mut s,
        1,
        &[("frozen", &frozen), ("big", &data(41, 16 * CHUNK))],
    );
    commit(&mut s, 2, &[("frozen", &frozen)]);
    s.delete(1).unwrap();
    let bad = chunks(&s, 2, "frozen")[0].clone();
    flip(dir.path(), bad.segment, bad.offset + 1);
    // gc no longer fails on the rotten source: it quarantines and moves the rest.
    let g = s.gc().unwrap();
    assert_eq!(g.corrupt_chunks, vec![(bad.segment, bad.offset)]);
    assert_eq!(s.quarantined(), vec![(bad.segment, bad.offset)]);
    assert!(s.gc().is_ok(), "and again");
    assert_eq!(s.latest_valid().unwrap(), None, "checkpoint 2 is rotten");
    // The next save does not reference the rotten chunk: it is intact, and heals 2.
    commit(&mut s, 3, &[("frozen", &frozen)]);
    assert_eq!(s.latest_valid().unwrap().unwrap().step, 3);
    assert_holds(&s, 2, &[("frozen", &frozen)]);
    assert!(s.gc().unwrap().corrupt_chunks.is_empty());
    let seg1 = dir.path().join("segments").join("00000001.seg");
    assert!(!seg1.exists(), "the rotten segment is freed once healed");
}
