//! Writes the checked-in seed corpus: a few valid inputs per fuzz target, taken from a real
//! store built in memory. Run from `fuzz/`: `cargo run --example gen_corpus` (it replaces the
//! `seed-*` files in `corpus/<target>/` and leaves any other file, e.g. `regress-*`, alone).

#[path = "../../tests/support/mod.rs"]
mod support;

use ckptstore::io::{MemIo, Storage};
use ckptstore::wal::{self, RecordType};
use ckptstore::{DType, Options, Store};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use support::data as bytes;

/// A small store: three commits (one sharing a chunk), a delete, and optionally a compaction.
fn store(compact: bool) -> (MemIo, PathBuf) {
    let mem = MemIo::new();
    let dir = PathBuf::from("/s");
    let opts = Options {
        chunk_size: 4096,
        segment_max_bytes: 1 << 20,
        io: Arc::new(mem.clone()),
        ..Default::default()
    };
    let mut s = Store::open(&dir, opts).unwrap();
    for step in 1..=3u64 {
        let mut t = s.begin(step).unwrap();
        t.set_metadata("lr", 0.1);
        t.put_tensor("a", DType::U8, &[5000], &bytes(1, 5000))
            .unwrap();
        t.put_tensor("b", DType::F32, &[4], &bytes(step, 16))
            .unwrap();
        t.put_blob("opt", &bytes(step + 10, 20)).unwrap();
        t.commit().unwrap();
    }
    s.delete(2).unwrap();
    if compact {
        s.compact_wal().unwrap();
    }
    (mem, dir)
}

fn live_wal(mem: &MemIo, dir: &Path) -> Vec<u8> {
    let n = ckptstore::current::decode(&mem.read_file(&dir.join("CURRENT")).unwrap()).unwrap();
    mem.read_file(&dir.join(format!("{n:08}.wal"))).unwrap()
}

fn write(target: &str, name: &str, data: &[u8]) {
    let d = Path::new("corpus").join(target);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(format!("seed-{name}")), data).unwrap();
}

fn with_mode(mode: u8, b: &[u8]) -> Vec<u8> {
    let mut v = vec![mode];
    v.extend_from_slice(b);
    v
}

fn main() {
    let (plain, dir) = store(false);
    let (compacted, _) = store(true);
    let wal_plain = live_wal(&plain, &dir);
    let wal_compacted = live_wal(&compacted, &dir);

    // wal_scan: [mode][WAL file]; mode 1 recomputes CRCs.
    write("wal_scan", "plain", &with_mode(0, &wal_plain));
    write("wal_scan", "compacted", &with_mode(0, &wal_compacted));
    write(
        "wal_scan",
        "torn-tail",
        &with_mode(0, &wal_plain[..wal_plain.len() - 7]),
    );
    write(
        "wal_scan",
        "header-only",
        &with_mode(0, &wal_plain[..wal::WAL_HEADER_LEN]),
    );
    write("wal_scan", "recrc", &with_mode(1, &wal_compacted));

    // segment_frame: [mode][segment file] (mode even) or [mode][frames] (mode odd).
    let seg_dir = dir.join("segments");
    let mut segs = plain.list(&seg_dir).unwrap();
    segs.sort();
    let seg = plain.read_file(&seg_dir.join(&segs[0])).unwrap();
    let frames = &seg[ckptstore::segment::SEGMENT_DATA_OFFSET as usize..];
    write(
        "segment_frame",
        "segment",
        &with_mode(0, &seg[..seg.len().min(8192)]),
    );
    write(
        "segment_frame",
        "frames",
        &with_mode(1, &frames[..frames.len().min(2048)]),
    );
    write(
        "segment_frame",
        "frames-recrc",
        &with_mode(3, &frames[..frames.len().min(512)]),
    );
    write("segment_frame", "header", &with_mode(2, &seg[..64]));

    // manifest_decode: [type % 6: 0 commit, 1 delete, 2 snapshot, 3 pin, 4 relocate, 5 quarantine][len u16][payload]...
    let records = |w: &[u8]| {
        let salt = wal::WalHeader::decode(w).unwrap().salt;
        let mut out = Vec::new();
        for r in wal::scan(w, salt).records {
            let ty = match r.ty {
                RecordType::Commit => 0u8,
                RecordType::Delete => 1,
                RecordType::Snapshot => 2,
                RecordType::Pin => 3,
                RecordType::Relocate => 4,
                RecordType::Quarantine => 5,
            };
            let p = &w[r.payload];
            out.push(ty);
            out.extend_from_slice(&(p.len() as u16).to_le_bytes());
            out.extend_from_slice(p);
        }
        out
    };
    write("manifest_decode", "plain", &records(&wal_plain));
    write("manifest_decode", "compacted", &records(&wal_compacted));
    let all = records(&wal_plain);
    let first_len = u16::from_le_bytes([all[1], all[2]]) as usize;
    write("manifest_decode", "one-commit", &all[..3 + first_len]);

    // recover_image: [flags: bit 0 image, bits 1.. recovery mode][damage ops...].
    write("recover_image", "intact", &[0]);
    write("recover_image", "intact-compacted", &[1]);
    write("recover_image", "flip", &[0, 0, 0, 0x40, 0, 0, 0, 0x01]);
    write("recover_image", "truncate", &[1, 1, 0, 0x30, 0, 0, 0]);
    write(
        "recover_image",
        "recrc-write",
        &[0, 4, 0, 50, 0, 0, 0, 3, 7, 7, 7, 8, 0],
    );
    write("recover_image", "delete-segment", &[2, 3, 5]);

    // store_ops: arbitrary's encoding of a Vec<FuzzOp>; any bytes are valid.
    write("store_ops", "zeros", &[0; 64]);
    write("store_ops", "mixed", &bytes(7, 128));
    write("store_ops", "ramp", &(0..=255u8).collect::<Vec<_>>());
    // mindspore_read: the .ckpt files the real mindspore package wrote (tests/fixtures/).
    let fixtures = Path::new("../tests/fixtures/mindspore");
    for f in ["all_dtypes", "all_dtypes_crc", "sliced_crc", "float8"] {
        let b = std::fs::read(fixtures.join(format!("{f}.ckpt"))).unwrap();
        write("mindspore_read", f, &b);
    }
    println!("seed corpus written under corpus/");
}
