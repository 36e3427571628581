//! Round trip through a real directory: put, commit, reopen, read back bit-exact; dedup of
//! unchanged tensors across checkpoints; delete frees space; WAL compaction keeps everything.

mod support;

use ckptstore::{DType, MetaValue, Options, Selector, Store};
use support::{data as bytes, opts as small_chunks};

#[test]
fn commit_reopen_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let w = bytes(1, 3 * 4096 + 100);
    let b = bytes(2, 4 * 10);
    {
        let mut s = Store::open(dir.path(), small_chunks()).unwrap();
        assert!(s.recovery_report().created);
        let mut t = s.begin(10).unwrap();
        t.set_epoch(2);
        t.set_metadata("lr", 0.1);
        t.set_metadata("rng", vec![1u8, 2, 3]);
        t.put_tensor(
            "fc.weight",
            DType::BF16,
            &[2, (w.len() / 4) as u64],
            &w[..w.len() / 4 * 4],
        )
        .unwrap();
        t.put_tensor("fc.bias", DType::F32, &[10], &b).unwrap();
        t.put_blob("optimizer.json", b"{\"betas\":[0.9,0.999]}")
            .unwrap();
        let info = t.commit().unwrap();
        assert_eq!(info.checkpoint.id, 1);
        assert_eq!(info.chunks_deduplicated, 0);
    }
    let s = Store::open(dir.path(), small_chunks()).unwrap();
    assert!(!s.recovery_report().created);
    let list = s.list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].step, 10);
    assert_eq!(list[0].epoch, 2);
    assert_eq!(list[0].metadata["lr"], MetaValue::Float(0.1));
    let ck = s.checkpoint(Selector::Step(10)).unwrap();
    let t = ck.tensor("fc.weight").unwrap();
    assert_eq!(t.dtype, DType::BF16);
    assert_eq!(t.data, w[..w.len() / 4 * 4]);
    assert_eq!(ck.tensor("fc.bias").unwrap().data, b);
    assert_eq!(
        ck.blob("optimizer.json").unwrap(),
        b"{\"betas\":[0.9,0.999]}"
    );
    assert_eq!(ck.tensor_names(), vec!["fc.weight", "fc.bias"]);
    s.verify(1).unwrap();
}

#[test]
fn unchanged_tensors_are_not_written_again() {
    let dir = tempfile::tempdir().unwrap();
    let frozen = bytes(7, 64 * 1024);
    let mut s = Store::open(dir.path(), small_chunks()).unwrap();
    let mut written = Vec::new();
    for step in 0..3u64 {
        let trained = bytes(100 + step, 16 * 1024);
        let mut t = s.begin(step).unwrap();
        t.put_tensor("embed", DType::F32, &[16 * 1024], &frozen)
            .unwrap();
        t.put_tensor("head", DType::F32, &[4 * 1024], &trained)
            .unwrap();
        let info = t.commit().unwrap();
        written.push((info.bytes_written, info.bytes_deduplicated));
    }
    assert_eq!(written[0], (80 * 1024, 0));
    assert_eq!(written[1], (16 * 1024, 64 * 1024));
    assert_eq!(written[2], (16 * 1024, 64 * 1024));
    drop(s);
    let s = Store::open(dir.path(), small_chunks()).unwrap();
    for ck in s.list() {
        assert_eq!(
            s.checkpoint(Selector::Id(ck.id))
                .unwrap()
                .tensor("embed")
                .unwrap()
                .data,
            frozen
        );
    }
}

#[test]
fn delete_frees_segments_only_when_unreferenced() {
    let dir = tempfile::tempdir().unwrap();
    let shared = bytes(3, 8192);
    let mut s = Store::open(dir.path(), small_chunks()).unwrap();
    for step in 0..3u64 {
        let mut t = s.begin(step).unwrap();
        t.put_tensor("shared", DType::U8, &[8192], &shared).unwrap();
        t.put_tensor("own", DType::U8, &[4096], &bytes(50 + step, 4096))
            .unwrap();
        t.commit().unwrap();
    }
    // Checkpoint 1's segment holds `shared`, which 2 and 3 reference: it must survive.
    let d = s.delete(1).unwrap();
    assert!(d.segments_freed.is_empty());
    let d = s.delete(2).unwrap();
    assert_eq!(d.segments_freed.len(), 1);
    let s3 = s.checkpoint(Selector::Id(3)).unwrap();
    assert_eq!(s3.tensor("shared").unwrap().data, shared);
    drop(s3);
    drop(s);
    let s = Store::open(dir.path(), small_chunks()).unwrap();
    assert_eq!(s.list().len(), 1);
    assert!(s.recovery_report().orphan_segments.is_empty());
    s.verify(3).unwrap();
}

#[test]
fn wal_compaction_keeps_live_state() {
    let dir = tempfile::tempdir().unwrap();
    let opts = || Options {
        chunk_size: 4096,
        wal_compact_min_bytes: 0,
        ..Default::default()
    };
    let mut s = Store::open(dir.path(), opts()).unwrap();
    for step in 0..20u64 {
        let mut t = s.begin(step).unwrap();
        t.put_tensor("w", DType::U8, &[5000], &bytes(step, 5000))
            .unwrap();
        t.commit().unwrap();
        if step >= 3 {
            s.delete(step - 3 + 1).unwrap();
        }
    }
    s.compact_wal().unwrap();
    let before = s.list();
    drop(s);
    let s = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(s.list(), before);
    let wal_files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".wal"))
        .collect();
    assert_eq!(wal_files.len(), 1, "{wal_files:?}");
    for ck in &before {
        assert_eq!(
            s.checkpoint(Selector::Id(ck.id))
                .unwrap()
                .tensor("w")
                .unwrap()
                .data,
            bytes(ck.step, 5000)
        );
    }
    // Ids keep increasing after compaction.
    let mut s = s;
    let mut t = s.begin(99).unwrap();
    t.put_tensor("w", DType::U8, &[1], &[1]).unwrap();
    assert_eq!(t.commit().unwrap().checkpoint.id, 21);
}

/// Walks the frames of a segment file and returns (payload offset, chunk table) per frame.
/// After the frames, exactly nothing or one commit trailer (docs/FORMAT.md) may follow.
fn frames_of(path: &std::path::Path) -> Vec<(u64, Vec<ckptstore::segment::ChunkEntry>)> {
    frames_and_end(path).0
}

/// [`frames_of`], and the end of the last frame (the segment's committed length).
fn frames_and_end(
    path: &std::path::Path,
) -> (Vec<(u64, Vec<ckptstore::segment::ChunkEntry>)>, u64) {
    use ckptstore::segment::{FrameHeader, SEGMENT_DATA_OFFSET};
    let b = std::fs::read(path).unwrap();
    let mut at = SEGMENT_DATA_OFFSET as usize;
    let mut out = Vec::new();
    while at < b.len() && &b[at..at + 4] == b"CKFR" {
        let h = FrameHeader::decode(&b[at..]).unwrap().unwrap();
        out.push((at as u64 + h.header_len(), h.chunks.clone()));
        at += h.frame_len() as usize;
    }
    if at < b.len() {
        assert_eq!(
            &b[at..at + 8],
            b"CKPTTRL\0",
            "only a trailer follows the frames"
        );
        let n = u32::from_le_bytes(b[at + 12..at + 16].try_into().unwrap()) as usize;
        assert_eq!(b.len(), at + 32 + n, "the trailer ends the file");
    }
    (out, at as u64)
}

/// A raw run of at least 64 KiB has its frame header padded so that its payload starts on a
/// page (O_DIRECT writes it from page-aligned memory with no bounce copy; docs/FORMAT.md,
/// "Frames"); smaller runs and compressed ones are not padded (the space would be wasted).
/// Every padded frame is still listed by the walk, and every chunk reads back.
#[test]
fn large_raw_runs_start_on_a_page_and_small_runs_are_not_padded() {
    use ckptstore::segment::{PAD_MIN_RUN_BYTES, PAYLOAD_ALIGN};
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), small_chunks()).unwrap();
    let small = bytes(1, 3 * 4096 + 5);
    let large = bytes(2, PAD_MIN_RUN_BYTES as usize + 4096 + 9);
    let after = bytes(3, 100);
    let mut t = s.begin(1).unwrap();
    for (name, b) in [("small", &small), ("large", &large), ("after", &after)] {
        t.put_tensor(name, DType::U8, &[b.len() as u64], b).unwrap();
    }
    let id = t.commit().unwrap().checkpoint.id;
    let ck = s.checkpoint(Selector::Id(id)).unwrap();
    let first = |name: &str| {
        ck.manifest()
            .tensors
            .iter()
            .find(|t| t.name == name)
            .unwrap()
            .chunks[0]
            .offset
    };
    // Every chunk of the large run starts on a page (4 KiB chunks, contiguous).
    for c in &ck
        .manifest()
        .tensors
        .iter()
        .find(|t| t.name == "large")
        .unwrap()
        .chunks
    {
        assert!(c.offset.is_multiple_of(PAYLOAD_ALIGN), "{c:?}");
    }
    // Three frames, walked from their headers; only the large run's payload is on a page
    // (padded), the others start where their smallest header ends.
    let seg = ck.manifest().new_segments[0].id;
    let frames = frames_of(&dir.path().join("segments").join(format!("{seg:08}.seg")));
    let starts: Vec<u64> = frames.iter().map(|f| f.0).collect();
    assert_eq!(starts, vec![first("small"), first("large"), first("after")]);
    assert!(!first("small").is_multiple_of(PAYLOAD_ALIGN));
    assert!(!first("after").is_multiple_of(PAYLOAD_ALIGN));
    assert_eq!(ck.tensor("small").unwrap().data, small);
    assert_eq!(ck.tensor("large").unwrap().data, large);
    assert_eq!(ck.tensor("after").unwrap().data, after);
}

/// A tensor written in one run is one contiguous byte range (the zero-copy read path relies
/// on it), and the frames on disk describe exactly the chunks the manifest references.
#[test]
fn runs_are_contiguous_and_frames_describe_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), small_chunks()).unwrap();
    let first = bytes(11, 10 * 4096 + 7);
    let mut t = s.begin(1).unwrap();
    t.put_tensor("w", DType::U8, &[first.len() as u64], &first)
        .unwrap();
    t.commit().unwrap();
    // Same tensor with chunk 4 changed: chunks 0..4 and 5..11 dedup, chunk 4 is a run of one.
    let mut second = first.clone();
    second[4 * 4096 + 1] ^= 0xff;
    let mut t = s.begin(2).unwrap();
    t.put_tensor("w", DType::U8, &[second.len() as u64], &second)
        .unwrap();
    // A fresh tensor with a repeated chunk inside: the repeat is referenced, not rewritten.
    let mut rep = bytes(12, 3 * 4096);
    rep.copy_within(0..4096, 2 * 4096);
    t.put_tensor("rep", DType::U8, &[rep.len() as u64], &rep)
        .unwrap();
    let info = t.commit().unwrap();
    assert_eq!(info.chunks_written, 1 + 2);
    assert_eq!(info.chunks_deduplicated, 10 + 1);

    let ck1 = s.checkpoint(Selector::Id(1)).unwrap();
    let chunks = &ck1.manifest().tensors[0].chunks;
    assert_eq!(chunks.len(), 11);
    for w in chunks.windows(2) {
        assert_eq!(
            w[1].offset,
            w[0].offset + w[0].stored_len,
            "payloads contiguous"
        );
        assert_eq!(w[1].segment, w[0].segment);
    }
    for id in [1u64, 2] {
        let ck = s.checkpoint(Selector::Id(id)).unwrap();
        let m = ck.manifest();
        let seg = m.new_segments[0].id;
        let frames = frames_of(&dir.path().join("segments").join(format!("{seg:08}.seg")));
        // Every chunk this checkpoint wrote is listed, at its offset, by exactly one frame.
        let mut listed = Vec::new();
        for (payload_at, table) in &frames {
            let mut off = *payload_at;
            for e in table {
                listed.push((off, e.blake3.to_vec(), e.stored_len));
                off += e.stored_len;
            }
        }
        let written: Vec<_> = m
            .tensors
            .iter()
            .flat_map(|t| t.chunks.iter())
            .filter(|c| c.segment == seg)
            .map(|c| (c.offset, c.blake3.clone(), c.stored_len))
            .collect();
        // (A chunk repeated inside the checkpoint is referenced twice but listed once.)
        let mut written_unique = written.clone();
        written_unique.sort();
        written_unique.dedup();
        listed.sort();
        assert_eq!(listed, written_unique, "checkpoint {id}");
    }
    let ck2 = s.checkpoint(Selector::Id(2)).unwrap();
    assert_eq!(ck2.tensor("w").unwrap().data, second);
    assert_eq!(ck2.tensor("rep").unwrap().data, rep);
}

/// A tensor larger than a segment spills into new segments; everything reads back.
#[test]
fn tensors_span_segments() {
    let dir = tempfile::tempdir().unwrap();
    let opts = || Options {
        chunk_size: 256 << 10,
        segment_max_bytes: 1 << 20,
        ..Default::default()
    };
    let big = bytes(21, (3 << 20) + 12345);
    let small = bytes(22, 1000);
    {
        let mut s = Store::open(dir.path(), opts()).unwrap();
        let mut t = s.begin(1).unwrap();
        t.put_tensor("small", DType::U8, &[1000], &small).unwrap();
        t.put_tensor("big", DType::U8, &[big.len() as u64], &big)
            .unwrap();
        let info = t.commit().unwrap();
        assert_eq!(info.bytes_written, big.len() as u64 + 1000);
    }
    let s = Store::open(dir.path(), opts()).unwrap();
    let ck = s.checkpoint(Selector::Latest).unwrap();
    assert!(
        ck.manifest().new_segments.len() >= 4,
        "{:?}",
        ck.manifest().new_segments
    );
    for seg in &ck.manifest().new_segments {
        assert!(seg.length <= (1 << 20), "segment {} over the limit", seg.id);
        let path = dir
            .path()
            .join("segments")
            .join(format!("{:08}.seg", seg.id));
        assert_eq!(frames_and_end(&path).1, seg.length);
    }
    assert_eq!(ck.tensor("big").unwrap().data, big);
    assert_eq!(ck.tensor("small").unwrap().data, small);
}
