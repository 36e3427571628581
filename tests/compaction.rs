//! Segment compaction (GC of mostly-dead segments): a segment whose live chunks fill less than
//! `compact_live_fraction` of it is rewritten — live chunks copied to a new segment, the move
//! committed by a Relocate WAL record, the old file freed (after its readers close). Every
//! live checkpoint reads back bit-exact after it, after a reopen and after a WAL compaction;
//! the space stays within 1.5x the live bytes over a long retention workload.

mod support;

use ckptstore::io::MemIo;
use ckptstore::{Error, GcOptions, Options, RetentionPolicy, Selector, Store};
use std::collections::BTreeMap;
use std::sync::Arc;
use support::{assert_holds, commit, data, opts, segment_files, snapshot_tree, CHUNK};

type Want = BTreeMap<u64, Vec<(String, Vec<u8>)>>;

fn holds_all(s: &Store, want: &Want) {
    assert_eq!(
        s.list().iter().map(|c| c.id).collect::<Vec<_>>(),
        want.keys().copied().collect::<Vec<_>>()
    );
    for (id, ts) in want {
        let ts: Vec<(&str, &[u8])> = ts.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
        assert_holds(s, *id, &ts);
    }
}

/// Checkpoint 1 writes a frozen tensor and a big one-off tensor into one segment; later
/// checkpoints reference the frozen one. Once 1 is deleted its segment is mostly dead.
fn mostly_dead_segment(dir: &std::path::Path) -> (Store, Want) {
    let mut s = Store::open(dir, opts()).unwrap();
    let frozen = data(100, 2 * CHUNK);
    let mut want = Want::new();
    for step in 1..=3u64 {
        let big = data(step, if step == 1 { 12 * CHUNK } else { CHUNK });
        let id = commit(&mut s, step, &[("frozen", &frozen), ("w", &big)])
            .checkpoint
            .id;
        want.insert(
            id,
            vec![("frozen".into(), frozen.clone()), ("w".into(), big)],
        );
    }
    s.delete(1).unwrap();
    want.remove(&1);
    (s, want)
}

#[test]
fn a_mostly_dead_segment_is_compacted_and_everything_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, want) = mostly_dead_segment(dir.path());
    let before = s.space();
    assert!(before.amplification() > 2.0, "{before:?}");
    assert_eq!(segment_files(dir.path()).len(), 3);

    let plan = s.plan_compaction();
    assert_eq!(plan.sources, vec![1]);
    let g = s.gc().unwrap();
    assert_eq!(g.segments_compacted, vec![1]);
    assert_eq!(g.segments_freed, vec![1]);
    assert_eq!(g.segments_written.len(), 1);
    assert_eq!(g.bytes_written, plan.output_bytes);
    assert!(g.bytes_reclaimed() > 10 * CHUNK as u64, "{g:?}");
    assert_eq!(
        g.after.segment_bytes,
        g.before.segment_bytes - g.bytes_freed + g.bytes_written
    );
    assert!(
        g.after.amplification() < before.amplification() / 2.0,
        "{g:?}"
    );
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 3);
    assert!(!files.contains_key("00000001.seg"));
    holds_all(&s, &want);

    // The frozen tensor is still one contiguous range: served zero-copy from the new segment.
    let v = s
        .checkpoint(Selector::Id(2))
        .unwrap()
        .tensor_view("frozen")
        .unwrap();
    assert!(v.is_zero_copy());
    drop(v);

    // Nothing left to do: a second gc is a no-op.
    let g2 = s.gc().unwrap();
    assert!(
        g2.segments_compacted.is_empty() && g2.bytes_written == 0,
        "{g2:?}"
    );

    // New commits deduplicate against the relocated chunk, not the freed one.
    let frozen = want[&2][0].1.clone();
    let c = commit(&mut s, 4, &[("frozen", &frozen)]);
    assert_eq!(c.bytes_written, 0, "{c:?}");

    // Replayed from the WAL (Commit records, then the Relocate record)...
    drop(s);
    let mut s = Store::open(dir.path(), opts()).unwrap();
    assert!(s.recovery_report().orphan_segments.is_empty());
    let mut want = want;
    want.insert(4, vec![("frozen".into(), frozen)]);
    holds_all(&s, &want);
    // ... and from a compacted WAL (the relocated manifests in the snapshot).
    s.compact_wal().unwrap();
    drop(s);
    let s = Store::open(dir.path(), opts()).unwrap();
    assert!(s.recovery_report().orphan_segments.is_empty());
    holds_all(&s, &want);
}

#[test]
fn dry_run_and_no_compact_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, want) = mostly_dead_segment(dir.path());
    let tree = snapshot_tree(dir.path());
    let dry = s
        .gc_with(
            GcOptions {
                dry_run: true,
                ..Default::default()
            },
            |_, _| {},
        )
        .unwrap();
    assert!(dry.dry_run);
    assert_eq!(dry.segments_compacted, vec![1]);
    assert_eq!(snapshot_tree(dir.path()), tree, "a dry run changes nothing");

    let off = s
        .gc_with(
            GcOptions {
                compact: false,
                ..Default::default()
            },
            |_, _| {},
        )
        .unwrap();
    assert!(off.segments_compacted.is_empty(), "{off:?}");
    assert_eq!(
        snapshot_tree(dir.path()),
        tree,
        "--no-compact compacts nothing"
    );

    // The real run does what the dry run said.
    let real = s.gc().unwrap();
    assert_eq!(real.segments_compacted, dry.segments_compacted);
    assert_eq!(real.bytes_written, dry.bytes_written);
    assert_eq!(real.after.segment_bytes, dry.after.segment_bytes);
    holds_all(&s, &want);

    // A read-only store plans too.
    drop(s);
    let r = Store::open(
        dir.path(),
        Options {
            read_only: true,
            ..opts()
        },
    )
    .unwrap();
    assert!(r.plan_compaction().sources.is_empty());
}

#[test]
fn compaction_defers_freeing_a_source_a_reader_holds() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, want) = mostly_dead_segment(dir.path());
    let r = Store::open(
        dir.path(),
        Options {
            read_only: true,
            ..opts()
        },
    )
    .unwrap();
    let g = s.gc().unwrap();
    assert_eq!(g.segments_compacted, vec![1]);
    assert!(g.segments_freed.is_empty(), "{g:?}");
    assert_eq!(g.segments_pending, vec![1]);
    assert!(segment_files(dir.path()).contains_key("00000001.seg"));
    // The reader still reads through the old locations, bit-exact.
    holds_all(&r, &want);
    drop(r);
    let g = s.gc().unwrap();
    assert_eq!(g.segments_freed, vec![1], "{g:?}");
    assert!(g.segments_compacted.is_empty());
    holds_all(&s, &want);
}

/// A live chunk that fails its BLAKE3 while being copied no longer fails the plan: it is
/// quarantined and left where it is (its segment stays), every other live chunk of the source
/// is moved, and the next save of the same bytes heals the checkpoints and frees the source.
#[test]
fn a_corrupt_source_chunk_is_quarantined_and_left_while_the_rest_compacts() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, want) = mostly_dead_segment(dir.path());
    let seg = dir.path().join("segments").join("00000001.seg");
    let m = s.checkpoint(Selector::Id(2)).unwrap().manifest().clone();
    let (bad, good) = (&m.tensors[0].chunks[0], &m.tensors[0].chunks[1]);
    assert_eq!((bad.segment, good.segment), (1, 1));
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[bad.offset as usize + 7] ^= 1;
    std::fs::write(&seg, bytes).unwrap();
    let g = s.gc().unwrap();
    assert_eq!(g.corrupt_chunks, vec![(1, bad.offset)], "{g:?}");
    assert!(
        g.segments_compacted.is_empty() && g.segments_freed.is_empty(),
        "{g:?}"
    );
    assert_eq!(g.segments_written.len(), 1, "the intact chunk was copied");
    assert!(s.poisoned().is_none());
    assert_eq!(s.quarantined(), vec![(1, bad.offset)]);
    let moved = s.checkpoint(Selector::Id(2)).unwrap().manifest().tensors[0].chunks[1].clone();
    assert_eq!(moved.segment, g.segments_written[0]);
    assert!(s.verify(2).is_err() && s.verify(3).is_err());
    // The next gc plans around the quarantined chunk: nothing to do, no error.
    assert!(s.plan_compaction().sources.is_empty());
    s.gc().unwrap();
    // The trainer saves the frozen tensor again: healed, and segment 1 is freed.
    let frozen = &want[&2][0].1;
    commit(&mut s, 4, &[("frozen", frozen)]);
    assert!(!segment_files(dir.path()).contains_key("00000001.seg"));
    holds_all(
        &s,
        &want
            .clone()
            .into_iter()
            .chain([(4, vec![("frozen".to_string(), frozen.clone())])])
            .collect(),
    );
}

/// The amplification bound over a long retention workload: tensors that never change, change
/// every 13, 7 or 3 steps, or every step; keep the last 4 and every 50th step; gc after each
/// save. With compaction the segment files never take more than 1.5x the live bytes; without
/// it the same workload goes well past that (so the bound is not met by accident).
#[test]
fn space_amplification_stays_within_one_and_a_half_over_a_long_retention_run() {
    let run = |compact: bool| -> (f64, Want, Store) {
        let mem = MemIo::new();
        let mut s = Store::open(
            "/store",
            Options {
                io: Arc::new(mem.clone()),
                ..opts()
            },
        )
        .unwrap();
        let policy = RetentionPolicy::new().keep_last(4).keep_every_steps(50);
        let tensors = [
            ("frozen", 0u64, 16),
            ("slow", 13, 16),
            ("mid", 7, 16),
            ("fast3", 3, 8),
            ("fast", 1, 32),
        ];
        let mut want = Want::new();
        let mut worst: f64 = 1.0;
        for step in 1..=240u64 {
            let ts: Vec<(String, Vec<u8>)> = tensors
                .iter()
                .map(|&(name, period, chunks)| {
                    let version = step.checked_div(period).unwrap_or(0);
                    (
                        name.to_string(),
                        data(version * 31 + chunks, chunks as usize * CHUNK),
                    )
                })
                .collect();
            let refs: Vec<(&str, &[u8])> =
                ts.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
            let id = commit(&mut s, step, &refs).checkpoint.id;
            want.insert(id, ts);
            for d in s.apply_retention(&policy).unwrap() {
                want.remove(&d.id);
            }
            let g = s
                .gc_with(
                    GcOptions {
                        compact,
                        ..Default::default()
                    },
                    |_, _| {},
                )
                .unwrap();
            worst = worst.max(g.after.amplification());
            if step % 60 == 0 {
                holds_all(&s, &want);
            }
        }
        (worst, want, s)
    };
    let (with, want, s) = run(true);
    let (without, _, _) = run(false);
    eprintln!(
        "worst space amplification over 240 steps: {with:.3} with compaction, {without:.3} without"
    );
    assert!(with <= 1.5, "{with}");
    assert!(
        without > 1.5,
        "the workload must stress the bound: {without}"
    );
    holds_all(&s, &want);
}

/// A CRC-valid Relocate record that does not fit the state (from a segment that does not
/// exist, into one it does not create, of a location no live chunk uses, past the new
/// segment's end, into an existing segment) refuses the open with a typed error, read-only
/// or not, and changes nothing.
#[test]
fn a_bad_relocate_record_refuses_the_open() {
    use ckptstore::proto::v1 as pb;
    use ckptstore::proto::Message;
    use ckptstore::wal::{self, RecordType, WalHeader};
    let mem = MemIo::new();
    let o = |read_only| Options {
        read_only,
        io: Arc::new(mem.clone()),
        ..opts()
    };
    let mut s = Store::open("/s", o(false)).unwrap();
    commit(&mut s, 1, &[("w", &data(1, 2 * CHUNK))]);
    let chunk = s.checkpoint(Selector::Id(1)).unwrap().manifest().tensors[0].chunks[0].clone();
    drop(s);
    let wal_path = std::path::Path::new("/s/00000001.wal");
    let clean = mem.read_file(wal_path).unwrap();
    let salt = WalHeader::decode(&clean).unwrap().salt;
    let new = |id, length| pb::SegmentInfo { id, length };
    let mv = |from_segment, from_offset, to_segment, to_offset| pb::ChunkMove {
        from_segment,
        from_offset,
        to_segment,
        to_offset,
    };
    let cases = [
        (
            vec![new(9, 1 << 20)],
            vec![mv(5, chunk.offset, 9, 4096)],
            "unknown segment 5",
        ),
        (
            vec![new(9, 1 << 20)],
            vec![mv(1, chunk.offset, 8, 4096)],
            "does not create",
        ),
        (
            vec![new(9, 1 << 20)],
            vec![mv(1, 3, 9, 4096)],
            "no live checkpoint references",
        ),
        (
            vec![new(9, 5000)],
            vec![mv(1, chunk.offset, 9, 4096)],
            "past the end",
        ),
        (vec![new(1, 1 << 20)], vec![], "which exists"),
    ];
    for (new_segments, moves, why) in cases {
        let rec = pb::RelocateRecord {
            new_segments,
            moves,
        };
        let mut img = clean.clone();
        wal::encode_record(&mut img, salt, RecordType::Relocate, &rec.encode_to_vec());
        mem.write_file(wal_path, img.clone());
        for read_only in [true, false] {
            match Store::open("/s", o(read_only)) {
                Err(e @ Error::BadManifest { .. }) => assert!(e.to_string().contains(why), "{e}"),
                other => panic!("{why}: {other:?}"),
            }
        }
        assert_eq!(
            mem.read_file(wal_path).unwrap(),
            img,
            "{why}: the WAL was modified"
        );
    }
}

/// The compaction options are checked at open: a typed error naming the option, no store made.
#[test]
fn bad_compaction_options_are_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let bad = [
        Options {
            compact_live_fraction: 1.5,
            ..opts()
        },
        Options {
            compact_live_fraction: f64::NAN,
            ..opts()
        },
        Options {
            max_space_amplification: 0.99,
            ..opts()
        },
        Options {
            max_space_amplification: f64::NAN,
            ..opts()
        },
    ];
    for o in bad {
        match Store::open(&path, o) {
            Err(Error::InvalidArgument(msg)) => assert!(
                msg.contains("compact_live_fraction") || msg.contains("max_space_amplification"),
                "{msg}"
            ),
            other => panic!("{other:?}"),
        }
        assert!(!path.exists());
    }
    // The extremes are valid: never compact on the fraction rule, no amplification rule.
    let mut s = Store::open(
        &path,
        Options {
            compact_live_fraction: 0.0,
            max_space_amplification: f64::INFINITY,
            ..opts()
        },
    )
    .unwrap();
    commit(&mut s, 1, &[("w", &data(1, 8 * CHUNK))]);
    assert!(s.gc().unwrap().segments_compacted.is_empty());
}

#[test]
fn compressed_chunks_are_compacted_verified_against_their_raw_bytes() {
    // Compressible float-like data (a smooth ramp), so chunks are stored as zstd frames whose
    // BLAKE3 (of the raw bytes) differs from a hash of the stored bytes.
    let ramp = |seed: u64, n: usize| -> Vec<u8> {
        (0..n / 4)
            .flat_map(|i| ((i as f32 + seed as f32) * 0.001).to_le_bytes())
            .collect()
    };
    let dir = tempfile::tempdir().unwrap();
    let o = Options {
        compression: ckptstore::Compression::zstd(),
        ..opts()
    };
    let mut s = Store::open(dir.path(), o.clone()).unwrap();
    let frozen = ramp(7, 2 * CHUNK);
    let mut want = Want::new();
    for step in 1..=3u64 {
        let big = ramp(step * 1000, if step == 1 { 12 * CHUNK } else { CHUNK });
        let c = commit(&mut s, step, &[("frozen", &frozen), ("w", &big)]);
        assert!(
            c.bytes_written < c.raw_bytes_written,
            "the data must compress for this test: {c:?}"
        );
        want.insert(
            c.checkpoint.id,
            vec![("frozen".into(), frozen.clone()), ("w".into(), big)],
        );
    }
    s.delete(1).unwrap();
    want.remove(&1);
    let g = s.gc().unwrap();
    assert_eq!(g.segments_compacted, vec![1], "{g:?}");
    holds_all(&s, &want);
    drop(s);
    let s = Store::open(dir.path(), o).unwrap();
    holds_all(&s, &want);
}
