//! MindSpore `.ckpt` import and export: files written by the real `mindspore` 2.10 package
//! (checked in under tests/fixtures/mindspore/, made by make_mindspore.py there) import
//! bit-exact, slices joined and CRC checked; a rich checkpoint exports and re-imports
//! bit-exact; the export decodes with prost's code for MindSpore's own schema; the import
//! streams (never reads more than a chunk at a time); a power cut at any sync of an import
//! leaves it whole or absent (`SimIo`, every crash mode); malformed files are typed errors that
//! commit nothing; the real package loads our export and its save imports (when the venv
//! named by `CKPT_MINDSPORE_PY` exists); and the CLI end to end.

mod cli_support;
mod support;

use ckptstore::interop::mindspore::{self as ms, FormatError, ValueKind};
use ckptstore::interop::{self, export_mindspore, import_mindspore, MindSporeExport};
use ckptstore::io::{CrashMode, SimIo};
use ckptstore::proto::mindspore as pb;
use ckptstore::proto::Message;
use ckptstore::{DType, Error, MetaValue, Options, Selector, Store};
use cli_support::{fails, ok};
use std::collections::BTreeMap;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use support::{data, opts, CHUNK};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mindspore")
        .join(name)
}

fn export_bytes(store: &Store, sel: Selector, opts: MindSporeExport) -> Vec<u8> {
    let ck = store.checkpoint(sel).unwrap();
    let mut out = Vec::new();
    export_mindspore(&ck, &mut out, Path::new("mem.ckpt"), opts, &mut |_| {}).unwrap();
    out
}

fn import_bytes(store: &mut Store, bytes: Vec<u8>, step: Option<u64>) -> ckptstore::Result<u64> {
    import_mindspore(
        store,
        &mut Cursor::new(bytes),
        Path::new("mem.ckpt"),
        step,
        &mut |_| {},
    )
    .map(|s| s.id)
}

fn le<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

/// bfloat16 bits of `x`, rounded to nearest even (as MindSpore converts).
fn bf16(x: f32) -> [u8; 2] {
    let u = x.to_bits();
    (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) as u16).to_le_bytes()
}

/// The tensors make_mindspore.py's `tensors()` saves (keep the two in step).
fn expected_all_dtypes() -> Vec<(&'static str, DType, Vec<u64>, Vec<u8>)> {
    let f64s: Vec<f64> = (0..4).map(|i| i as f64 / 4.0 - 1.0).collect();
    let f32s: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
    vec![
        ("f64", DType::F64, vec![4], le(&f64s, f64::to_le_bytes)),
        ("f32", DType::F32, vec![2, 3], le(&f32s, f32::to_le_bytes)),
        (
            "f16",
            DType::F16,
            vec![4],
            le(&[0x3C00u16, 0xC100, 0x7BFF, 0x0000], u16::to_le_bytes),
        ),
        (
            "bf16",
            DType::BF16,
            vec![3, 2],
            le(&[1.0f32, -2.5, 0.5, 0.0, 3.0, -0.125], bf16),
        ),
        (
            "i8",
            DType::I8,
            vec![4],
            le(&[-128i8, -1, 0, 127], i8::to_le_bytes),
        ),
        (
            "i16",
            DType::I16,
            vec![4],
            le(&[-32768i16, -1, 0, 32767], i16::to_le_bytes),
        ),
        (
            "i32",
            DType::I32,
            vec![2, 2],
            le(&[i32::MIN, -1, 0, i32::MAX], i32::to_le_bytes),
        ),
        (
            "i64",
            DType::I64,
            vec![4],
            le(&[-(1i64 << 62), -1, 0, 1 << 62], i64::to_le_bytes),
        ),
        ("u8", DType::U8, vec![6], vec![250, 251, 252, 253, 254, 255]),
        ("bool", DType::Bool, vec![3], vec![1, 0, 1]),
        (
            "layer.scalar",
            DType::F32,
            vec![],
            3.25f32.to_le_bytes().to_vec(),
        ),
        // append_info's float: MindSpore saves it as a Float32 scalar tensor.
        ("lr", DType::F32, vec![], 0.1f32.to_le_bytes().to_vec()),
    ]
}

#[test]
fn imports_files_written_by_real_mindspore_bit_exact() {
    for file in ["all_dtypes.ckpt", "all_dtypes_crc.ckpt"] {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = Store::open(tmp.path(), opts()).unwrap();
        let bytes = std::fs::read(fixture(file)).unwrap();
        let idx = ms::scan(&mut Cursor::new(&bytes)).unwrap();
        assert_eq!(idx.crc.is_some(), file.contains("crc"), "{file}");
        let id = import_bytes(&mut s, bytes, None).unwrap();
        let ck = s.checkpoint(Selector::Id(id)).unwrap();
        let info = ck.info();
        assert_eq!(
            (info.step, info.epoch),
            (1875, 3),
            "{file}: step_num/epoch_num"
        );
        assert_eq!(
            info.metadata.into_iter().collect::<Vec<_>>(),
            [(
                "note".to_owned(),
                MetaValue::Str("made by mindspore".into())
            )]
        );
        let expected = expected_all_dtypes();
        // mindspore.save_checkpoint leaves the empty tensor the script passes it out.
        assert_eq!(
            ck.tensor_names(),
            expected.iter().map(|e| e.0).collect::<Vec<_>>(),
            "{file}"
        );
        for (name, dtype, shape, bytes) in expected {
            let t = ck.tensor(name).unwrap();
            assert_eq!(
                (t.dtype, &t.shape[..]),
                (dtype, &shape[..]),
                "{file} {name}"
            );
            assert_eq!(t.data, bytes, "{file} {name}");
        }
        // --step overrides step_num.
        let id = import_bytes(&mut s, std::fs::read(fixture(file)).unwrap(), Some(5)).unwrap();
        assert_eq!(s.info(Selector::Id(id)).unwrap().step, 5);
    }
}

#[test]
fn imports_a_file_mindspore_sliced_joining_the_slices() {
    let bytes = std::fs::read(fixture("sliced_crc.ckpt")).unwrap();
    let idx = ms::scan(&mut Cursor::new(&bytes)).unwrap();
    let slices: Vec<(&str, usize)> = idx
        .entries
        .iter()
        .map(|e| (e.name.as_str(), e.slices.len()))
        .collect();
    assert_eq!(
        slices,
        [
            ("big", 5),
            ("bf", 4),
            ("small", 1),
            ("epoch_num", 1),
            ("step_num", 1)
        ]
    );
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Store::open(tmp.path(), opts()).unwrap();
    let id = import_bytes(&mut s, bytes, None).unwrap();
    let ck = s.checkpoint(Selector::Id(id)).unwrap();
    assert_eq!((ck.info().step, ck.info().epoch), (7, 1));
    let big = ck.tensor("big").unwrap();
    assert_eq!((big.dtype, &big.shape[..]), (DType::I32, &[1250u64][..]));
    assert_eq!(
        big.data,
        le(&(0..1250).collect::<Vec<i32>>(), i32::to_le_bytes)
    );
    let bf = ck.tensor("bf").unwrap();
    let want: Vec<f32> = (0..2048).map(|i| i as f32 - 1024.0).collect();
    assert_eq!(bf.data, le(&want, bf16));
    assert_eq!(
        bf.data.len(),
        4096,
        "one chunk of the test store: slices cross into it"
    );
    assert_eq!(
        ck.tensor("small").unwrap().data,
        le(&[0f32, 1.0, 2.0], f32::to_le_bytes)
    );
}

#[test]
fn export_of_an_imported_mindspore_file_is_byte_identical_to_it() {
    // sliced_crc.ckpt holds tensors and then epoch_num, step_num, in the order the export
    // writes them; MindSpore sliced it at 1 KiB byte boundaries and added the CRC trailer.
    let original = std::fs::read(fixture("sliced_crc.ckpt")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Store::open(tmp.path(), opts()).unwrap();
    import_bytes(&mut s, original.clone(), None).unwrap();
    let opts = MindSporeExport {
        crc: true,
        slice_bytes: 1024,
    };
    assert!(
        export_bytes(&s, Selector::Latest, opts) == original,
        "bytes differ from mindspore's"
    );
}

#[test]
fn unsupported_dtypes_are_refused_and_float8_imports_but_does_not_export() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Store::open(tmp.path(), opts()).unwrap();
    let err = import_bytes(&mut s, std::fs::read(fixture("uint16.ckpt")).unwrap(), None);
    match err.map_err(|e| match e {
        Error::Interop { error, .. } => ms_error(error),
        other => panic!("{other:?}"),
    }) {
        Err(FormatError::Unsupported { name, what, .. }) => {
            assert_eq!((name.as_str(), what.as_str()), ("u16", "UInt16 tensor"))
        }
        other => panic!("{other:?}"),
    }
    assert!(s.list().is_empty());

    let id = import_bytes(&mut s, std::fs::read(fixture("float8.ckpt")).unwrap(), None).unwrap();
    let ck = s.checkpoint(Selector::Id(id)).unwrap();
    let e4 = ck.tensor("e4m3").unwrap();
    assert_eq!(
        (e4.dtype, e4.data.as_slice()),
        (DType::F8E4M3, &[0x38, 0xC0][..])
    );
    let e5 = ck.tensor("e5m2").unwrap();
    assert_eq!((e5.dtype, e5.data.as_slice()), (DType::F8E5M2, &[0x38][..]));
    let mut out = Vec::new();
    let err = export_mindspore(
        &ck,
        &mut out,
        Path::new("x.ckpt"),
        Default::default(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("cannot read"), "{err}");
    assert!(
        out.is_empty(),
        "nothing is written before every dtype is checked"
    );
}

/// Every dtype MindSpore reads (a 2-D, a scalar and an empty tensor of each), a tensor of
/// many chunks, blobs, and metadata of every type.
fn rich_store(dir: &Path) -> Store {
    let mut s = Store::open(dir, opts()).unwrap();
    let mut t = s.begin(1875).unwrap();
    t.set_epoch(3);
    t.set_metadata("lr", 0.1);
    t.set_metadata("neg_inf", f64::NEG_INFINITY);
    t.set_metadata("seen", 12_345_678_901_i64);
    t.set_metadata("rng", vec![0u8, 1, 254, 255]);
    t.set_metadata("empty_bytes", Vec::<u8>::new());
    t.set_metadata("name", "lenet ünïcode ✓\n");
    let dtypes = DType::ALL
        .into_iter()
        .filter(|d| ms::dtype_name(*d).is_some());
    for (i, d) in dtypes.enumerate() {
        let mut m = data(i as u64, d.size() * 15);
        if d == DType::Bool {
            m.iter_mut().for_each(|b| *b &= 1);
        }
        t.put_tensor(&format!("{d}.matrix"), d, &[3, 5], &m)
            .unwrap();
        t.put_tensor(
            &format!("{d}.scalar"),
            d,
            &[],
            &data(100 + i as u64, d.size()),
        )
        .unwrap();
        t.put_tensor(&format!("{d}.empty"), d, &[4, 0, 2], &[])
            .unwrap();
    }
    t.put_tensor(
        "big.weight",
        DType::BF16,
        &[3, 4096],
        &data(7, 2 * 3 * 4096),
    )
    .unwrap();
    t.put_blob("optimizer.pkl", &data(8, 5000)).unwrap();
    t.put_blob("empty_blob", &[]).unwrap();
    t.commit().unwrap();
    s
}

fn assert_same_checkpoint(a: &Store, b: &Store, a_sel: Selector, b_sel: Selector) {
    let ca = a.checkpoint(a_sel).unwrap();
    let cb = b.checkpoint(b_sel).unwrap();
    let (ia, ib) = (ca.info(), cb.info());
    assert_eq!(ia.epoch, ib.epoch);
    assert_eq!(ia.metadata, ib.metadata);
    assert_eq!(
        ca.tensor_names(),
        cb.tensor_names(),
        "same tensors, same order"
    );
    for n in ca.tensor_names() {
        assert_eq!(ca.tensor(n).unwrap(), cb.tensor(n).unwrap(), "tensor {n}");
    }
    assert_eq!(ca.blob_names(), cb.blob_names());
    for n in ca.blob_names() {
        assert_eq!(ca.blob(n).unwrap(), cb.blob(n).unwrap(), "blob {n}");
    }
}

#[test]
fn export_then_import_is_bit_exact_with_and_without_crc_and_slices() {
    let tmp = tempfile::tempdir().unwrap();
    let src = rich_store(&tmp.path().join("src"));
    for (crc, slice_bytes) in [(false, ms::DEFAULT_SLICE_BYTES), (true, 1000), (true, 1)] {
        let bytes = export_bytes(&src, Selector::Latest, MindSporeExport { crc, slice_bytes });
        let idx = ms::scan(&mut Cursor::new(&bytes)).unwrap();
        assert_eq!(idx.crc.is_some(), crc);
        let big = idx.entries.iter().find(|e| e.name == "big.weight").unwrap();
        assert_eq!(
            big.slices.len() as u64,
            (2 * 3 * 4096u64).div_ceil(slice_bytes)
        );
        let dst_dir = tmp.path().join(format!("dst-{crc}-{slice_bytes}"));
        let mut dst = Store::open(&dst_dir, opts()).unwrap();
        import_bytes(&mut dst, bytes, None).unwrap();
        assert_eq!(dst.latest().unwrap().step, 1875, "from step_num");
        assert_same_checkpoint(&src, &dst, Selector::Latest, Selector::Latest);
    }
}

#[test]
fn export_decodes_with_prost_from_mindspores_own_schema() {
    let tmp = tempfile::tempdir().unwrap();
    let src = rich_store(tmp.path());
    let bytes = export_bytes(
        &src,
        Selector::Latest,
        MindSporeExport {
            crc: true,
            slice_bytes: 5000,
        },
    );
    let (body, trailer) = bytes.split_at(bytes.len() - 17);
    assert_eq!(&trailer[..7], b"crc_num");
    let ck = pb::Checkpoint::decode(body).unwrap();
    // Join slices as MindSpore's loader does: consecutive values with one tag.
    let mut joined: Vec<(String, Vec<i64>, String, Vec<u8>)> = Vec::new();
    for v in ck.value {
        let Some(pb::checkpoint::value::Value::Tensor(t)) = v.value else {
            panic!("{} is not a tensor", v.tag)
        };
        match joined.last_mut() {
            Some(last) if last.0 == v.tag => last.3.extend(t.tensor_content),
            _ => joined.push((v.tag, t.dims, t.tensor_type, t.tensor_content)),
        }
    }
    let c = src.checkpoint(Selector::Latest).unwrap();
    for name in c.tensor_names() {
        let t = c.tensor(name).unwrap();
        let j = joined.iter().find(|j| j.0 == name).unwrap();
        let dims: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
        assert_eq!(j.1, dims, "{name}");
        assert_eq!(j.2, ms::dtype_name(t.dtype).unwrap(), "{name}");
        assert_eq!(j.3, t.data, "{name}");
    }
    let get = |tag: &str| joined.iter().find(|j| j.0 == tag).unwrap();
    assert_eq!(get("step_num").3, 1875i64.to_le_bytes());
    assert_eq!(get("epoch_num").3, 3i64.to_le_bytes());
    assert_eq!(
        (get("step_num").1.len(), &get("step_num").2[..]),
        (0, "Int64")
    );
    assert_eq!(
        joined.last().unwrap().0,
        "step_num",
        "appended last, as ModelCheckpoint does"
    );
    let name = get("name");
    assert_eq!((&name.1[..], &name.2[..]), (&[0i64][..], "str"));
    let utf32: Vec<u8> = "lenet ünïcode ✓\n"
        .chars()
        .flat_map(|c| (c as u32).to_le_bytes())
        .collect();
    assert_eq!(name.3, utf32);
    assert_eq!(get("__blob__/optimizer.pkl").3, data(8, 5000));
    assert_eq!(get("lr").3, 0.1f64.to_le_bytes());
    let mut crc = ms::Crc32::new();
    crc.update(body);
    assert_eq!(
        &trailer[7..],
        &[&[0u8; 6][..], &crc.value().to_be_bytes()].concat()[..]
    );
}

/// A `Read + Seek` that records the largest single read asked of it.
struct MaxRead {
    inner: Cursor<Vec<u8>>,
    max: usize,
}

impl Read for MaxRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.max = self.max.max(buf.len());
        self.inner.read(buf)
    }
}

impl Seek for MaxRead {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(pos)
    }
}

#[test]
fn import_streams_a_large_tensor_one_chunk_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let big = data(3, 3 << 20);
    let mut file = Vec::new();
    let mut w = ms::ValueWriter::new(&mut file, 1 << 20);
    w.tensor("w", &[3 << 20], "UInt8", &big).unwrap();
    w.finish(true).unwrap();
    let mut s = Store::open(tmp.path(), opts()).unwrap();
    let mut r = MaxRead {
        inner: Cursor::new(file),
        max: 0,
    };
    import_mindspore(&mut s, &mut r, Path::new("big.ckpt"), None, &mut |_| {}).unwrap();
    assert!(
        r.max <= CHUNK.max(64 << 10),
        "the import asked for {} bytes at once; it must stream",
        r.max
    );
    assert_eq!(
        s.checkpoint(Selector::Latest)
            .unwrap()
            .tensor("w")
            .unwrap()
            .data,
        big
    );
}

/// Opts of a store on the power-loss simulator, with small chunks and segments.
fn sim_opts(sim: &SimIo) -> Options {
    Options {
        io: Arc::new(sim.clone()),
        chunk_size: CHUNK,
        segment_max_bytes: 1 << 20, // the smallest allowed
        ..Default::default()
    }
}

/// Imports `file` into a store on `sim` holding one earlier checkpoint; returns whether that
/// commit and then the import were acknowledged.
fn import_on_sim(sim: &SimIo, file: &[u8]) -> (bool, bool) {
    let Ok(mut s) = Store::open("/s", sim_opts(sim)) else {
        return (false, false);
    };
    let base = s
        .begin(1)
        .and_then(|mut t| t.put_tensor("base", DType::U8, &[3], &[1, 2, 3]).map(|_| t))
        .and_then(|t| t.commit())
        .is_ok();
    let imported = base && import_bytes(&mut s, file.to_vec(), None).is_ok();
    (base, imported)
}

#[test]
fn an_import_cut_by_power_loss_at_any_sync_is_whole_or_absent() {
    // Several tensors, one sliced and bigger than a segment, with a CRC trailer.
    let mut file = Vec::new();
    let mut w = ms::ValueWriter::new(&mut file, 10_000);
    w.tensor("w", &[100, 1000], "Float32", &data(1, 400_000))
        .unwrap();
    w.tensor("b", &[1000], "BFloat16", &data(2, 2000)).unwrap();
    w.str_value("note", "cut").unwrap();
    w.tensor("step_num", &[], "Int64", &42i64.to_le_bytes())
        .unwrap();
    w.finish(true).unwrap();

    let clean = SimIo::new();
    assert_eq!(import_on_sim(&clean, &file), (true, true));
    let total = clean.sync_count();
    assert!(total >= 5, "the import has several sync points ({total})");
    let mut states = BTreeMap::new();
    for n in 1..=total {
        let sim = SimIo::new();
        sim.crash_at_sync(n);
        let (base, imported) = import_on_sim(&sim, &file);
        assert!(
            sim.crashed().is_some() && !imported,
            "sync #{n}: did not crash"
        );
        for (i, mode) in CrashMode::ALL.into_iter().enumerate() {
            let img = sim.crash_image(mode, n * 7 + i as u64);
            let s = Store::open("/s", sim_opts(&img))
                .unwrap_or_else(|e| panic!("sync #{n} {mode:?}: does not open: {e}"));
            let steps: Vec<u64> = s.list().iter().map(|c| c.step).collect();
            if base {
                assert_eq!(
                    steps.first(),
                    Some(&1),
                    "sync #{n} {mode:?}: acknowledged commit lost"
                );
            }
            for c in s.list() {
                s.verify(c.id)
                    .unwrap_or_else(|e| panic!("sync #{n} {mode:?}: {e}"));
            }
            if let Some(c) = s.list().into_iter().find(|c| c.step == 42) {
                // The import happened wholly: every tensor, bit-exact, and its metadata.
                let ck = s.checkpoint(Selector::Id(c.id)).unwrap();
                assert_eq!(
                    ck.tensor("w").unwrap().data,
                    data(1, 400_000),
                    "sync #{n} {mode:?}"
                );
                assert_eq!(
                    ck.tensor("b").unwrap().data,
                    data(2, 2000),
                    "sync #{n} {mode:?}"
                );
                assert_eq!(c.metadata["note"], MetaValue::Str("cut".into()));
            }
            *states.entry(steps).or_insert(0) += 1;
        }
    }
    println!(
        "{total} crash points x {} modes: store states {states:?}",
        CrashMode::ALL.len()
    );
}

// ---- malformed input ----

fn import_err(bytes: Vec<u8>) -> FormatError {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Store::open(tmp.path(), opts()).unwrap();
    let err = import_bytes(&mut s, bytes, None).unwrap_err();
    assert!(s.list().is_empty(), "a rejected file committed something");
    support::commit(&mut s, 1, &[("x", &[1])]);
    match err {
        Error::Interop { path, error } => {
            assert_eq!(path, Path::new("mem.ckpt"));
            ms_error(error)
        }
        other => panic!("not a MindSpore error: {other:?}"),
    }
}

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
    out
}

fn field(num: u64, payload: &[u8]) -> Vec<u8> {
    [
        &varint(num << 3 | 2)[..],
        &varint(payload.len() as u64),
        payload,
    ]
    .concat()
}

/// One serialized value, built field by field (so that tests can break any part).
fn value(tag: &str, dims: &[i64], ty: &str, content: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    for &d in dims {
        t.push(0x08);
        t.extend(varint(d as u64));
    }
    t.extend(field(2, ty.as_bytes()));
    t.extend(field(3, content));
    field(1, &[field(1, tag.as_bytes()), field(2, &t)].concat())
}

#[test]
fn malformed_files_are_typed_errors_that_commit_nothing() {
    let good = [
        value("a", &[2], "Float32", &[0; 8]),
        value("b", &[1], "UInt8", &[7]),
    ]
    .concat();
    assert_eq!(ms::scan(&mut Cursor::new(&good)).unwrap().entries.len(), 2);

    // Truncated anywhere but at a value boundary (the format has no end marker: a cut there
    // is a valid, shorter file, for MindSpore too).
    let boundary = value("a", &[2], "Float32", &[0; 8]).len();
    for cut in 1..good.len() {
        if cut == boundary {
            continue;
        }
        match import_err(good[..cut].to_vec()) {
            FormatError::Truncated { .. } => {}
            other => panic!("cut at {cut}: {other:?}"),
        }
    }

    // A CRC that does not match: a flipped content byte, or a flipped trailer byte.
    let mut crc_file = Vec::new();
    let mut w = ms::ValueWriter::new(&mut crc_file, 4);
    w.tensor("t", &[3], "Int32", &data(1, 12)).unwrap();
    w.finish(true).unwrap();
    for at in [crc_file.len() - 20, crc_file.len() - 1] {
        let mut bad = crc_file.clone();
        bad[at] ^= 0x01;
        assert!(
            matches!(import_err(bad), FormatError::CrcMismatch { .. }),
            "flip at {at}"
        );
    }
    let mut bad = crc_file.clone();
    let n = bad.len();
    bad[n - 10] = 1; // a number over 32 bits
    assert!(matches!(import_err(bad), FormatError::BadCrcTrailer { .. }));

    // Huge lengths: refused before anything is allocated.
    let huge = [&[0x0A][..], &varint(1 << 62)].concat();
    assert!(matches!(
        import_err(huge),
        FormatError::Truncated { what: "value", .. }
    ));
    let mut huge_content = field(
        1,
        &[
            field(1, b"x"),
            vec![0x12],
            varint(40),
            field(2, b"UInt8"),
            vec![0x1A],
            varint(u64::MAX >> 1),
        ]
        .concat(),
    );
    huge_content.extend([0; 40]);
    assert!(matches!(
        import_err(huge_content),
        FormatError::Truncated { .. }
    ));
    let long_tag = "n".repeat(ms::MAX_TAG_LEN as usize + 1);
    assert!(matches!(
        import_err(value(&long_tag, &[1], "UInt8", &[0])),
        FormatError::TooLong { what: "tag", .. }
    ));
    assert!(matches!(
        import_err(value("x", &[1; 65], "UInt8", &[0])),
        FormatError::TooManyDims { .. }
    ));
    // Names within their cap, but more of them than any manifest could hold.
    let many: Vec<u8> = (0..600)
        .flat_map(|i| value(&format!("{i:060000}"), &[1], "UInt8", &[0]))
        .collect();
    assert!(matches!(
        ms::scan(&mut Cursor::new(&many)),
        Err(FormatError::TooLong {
            what: "the index (names, types, dims)",
            ..
        })
    ));
    assert!(matches!(
        import_err(vec![
            0x0A, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01
        ]),
        FormatError::BadVarint { .. }
    ));

    // Unknown dtype, dims × dtype ≠ content length, negative dims.
    match import_err(value("x", &[1], "Float128", &[0; 16])) {
        FormatError::UnknownDtype { name, dtype } => {
            assert_eq!((&name[..], &dtype[..]), ("x", "Float128"))
        }
        other => panic!("{other:?}"),
    }
    match import_err(value("x", &[2, 3], "Float32", &[0; 20])) {
        FormatError::LengthMismatch {
            name,
            expected,
            found,
            ..
        } => {
            assert_eq!((&name[..], &expected[..], found), ("x", "24", 20))
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        import_err(value("x", &[i64::MAX, i64::MAX], "Float32", &[0; 4])),
        FormatError::LengthMismatch { .. }
    ));
    assert!(matches!(
        import_err(value("x", &[-1], "UInt8", &[])),
        FormatError::NegativeDim { .. }
    ));

    // Slices that disagree, a name twice, required fields missing, a MapParameter.
    let two = [
        value("x", &[4], "UInt8", &[1, 2]),
        value("x", &[5], "UInt8", &[3, 4]),
    ]
    .concat();
    assert!(matches!(import_err(two), FormatError::SliceMismatch { .. }));
    let dup = [
        value("x", &[1], "UInt8", &[1]),
        value("y", &[1], "UInt8", &[1]),
        value("x", &[1], "UInt8", &[1]),
    ]
    .concat();
    assert!(matches!(import_err(dup), FormatError::DuplicateName(n) if n == "x"));
    let no_type = field(1, &[field(1, b"x"), field(2, &field(3, &[1]))].concat());
    assert!(matches!(
        import_err(no_type),
        FormatError::Missing {
            field: "tensor_type",
            ..
        }
    ));
    let no_tag = field(1, &field(2, &[field(2, b"UInt8"), field(3, &[1])].concat()));
    assert!(matches!(
        import_err(no_tag),
        FormatError::Missing { field: "tag", .. }
    ));
    let map = field(1, &[field(1, b"m"), field(3, &[])].concat());
    assert!(matches!(import_err(map), FormatError::Unsupported { .. }));
    // `tensor` and `maptensor` are a oneof: a later tensor replaces a maptensor, but the
    // maptensor must still be valid protobuf (found by the mindspore_read fuzz target).
    let tensor = field(2, &[field(2, b"UInt8"), field(3, &[9])].concat());
    let then_tensor = field(
        1,
        &[field(1, b"m"), field(3, &field(1, &[])), tensor.clone()].concat(),
    );
    assert_eq!(
        ms::scan(&mut Cursor::new(&then_tensor)).unwrap().entries[0].nbytes,
        1
    );
    let bad_map = field(
        1,
        &[field(1, b"m"), field(3, &[0x00, 0x01]), tensor].concat(),
    );
    assert!(matches!(
        import_err(bad_map),
        FormatError::BadWireType { field: 0, .. }
    ));
    let wrong_wire = field(1, &[field(1, b"x"), vec![0x10, 0x01]].concat());
    assert!(matches!(
        import_err(wrong_wire),
        FormatError::BadWireType { field: 2, .. }
    ));
    assert!(matches!(
        import_err(value("x", &[0], "str", &[0xFF; 4])),
        FormatError::BadStr { .. }
    ));

    // What a bad file says: the file, the value, the problem.
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Store::open(tmp.path(), opts()).unwrap();
    let e = import_bytes(
        &mut s,
        value("conv1.weight", &[2, 3], "Float32", &[0; 20]),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("mem.ckpt")
            && e.contains("conv1.weight")
            && e.contains("24")
            && e.contains("20"),
        "{e}"
    );
}

#[test]
fn a_crc_mismatch_aborts_after_streaming_and_leaves_no_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let mut file = Vec::new();
    let mut w = ms::ValueWriter::new(&mut file, 1 << 20);
    w.tensor("w", &[100_000], "UInt8", &data(5, 100_000))
        .unwrap();
    w.finish(true).unwrap();
    file[5000] ^= 0x80; // inside the content: only the CRC can tell
    let mut s = Store::open(tmp.path(), opts()).unwrap();
    let err = import_bytes(&mut s, file, None).unwrap_err();
    assert!(
        matches!(interop::Error::of(&err), Some(interop::Error::MindSpore(e)) if matches!(**e, FormatError::CrcMismatch { .. })),
        "{err:?}"
    );
    assert!(s.list().is_empty());
    assert!(
        support::segment_files(tmp.path()).is_empty(),
        "the aborted import's segments are removed"
    );
    support::commit(&mut s, 1, &[("x", &[1])]);
}

#[test]
fn export_refuses_names_that_collide_with_mindspore_values() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Store::open(tmp.path(), opts()).unwrap();
    for (tensor, meta) in [
        ("step_num", None),
        ("w", Some("epoch_num")),
        ("w", Some("w")),
        ("__blob__/b", None),
    ] {
        let mut t = s.begin(1).unwrap();
        t.put_tensor(tensor, DType::U8, &[1], &[1]).unwrap();
        if let Some(k) = meta {
            t.set_metadata(k, 1i64);
        }
        t.put_blob("b", &[2]).unwrap();
        t.commit().unwrap();
        let ck = s.checkpoint(Selector::Latest).unwrap();
        let mut out = Vec::new();
        let err = export_mindspore(
            &ck,
            &mut out,
            Path::new("x.ckpt"),
            Default::default(),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("collides"),
            "{tensor} {meta:?}: {err}"
        );
        assert!(out.is_empty());
    }
}

// ---- the real mindspore package ----

/// The python of a venv with mindspore (`CKPT_MINDSPORE_PY`), if there is one.
fn mindspore_python() -> Option<PathBuf> {
    let p = PathBuf::from(std::env::var_os("CKPT_MINDSPORE_PY")?);
    p.exists().then_some(p)
}

fn python(py: &Path, script: &str, args: &[&str]) -> serde_json::Value {
    let o = Command::new(py)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(out.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn hex_le(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn real_mindspore_loads_our_export_and_its_sliced_save_imports() {
    let Some(py) = mindspore_python() else {
        println!(
            "SKIPPED: set CKPT_MINDSPORE_PY to the python of a venv with mindspore (see .ci/run)"
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let src = rich_store(&tmp.path().join("src"));
    let out = tmp.path().join("out.ckpt");
    std::fs::write(
        &out,
        export_bytes(
            &src,
            Selector::Latest,
            MindSporeExport {
                crc: true,
                slice_bytes: 1000,
            },
        ),
    )
    .unwrap();
    // load_checkpoint with crc_check: each value as [dtype, shape, hex of its bytes] (or the
    // str), bfloat16 viewed as its bits.
    let load = r#"
import sys, json, numpy as np, mindspore as ms
d = ms.load_checkpoint(sys.argv[1], crc_check=True)
out = {}
for k, v in d.items():
    if isinstance(v, str):
        out[k] = v
        continue
    a = v.asnumpy()
    if str(v.dtype) == "BFloat16":
        a = a.view(np.uint16)
    out[k] = [str(v.dtype), list(a.shape), a.tobytes().hex()]
print(json.dumps(out))
"#;
    let v = python(&py, load, &[out.to_str().unwrap()]);
    let ck = src.checkpoint(Selector::Latest).unwrap();
    for name in ck.tensor_names() {
        let t = ck.tensor(name).unwrap();
        let p = &v[name];
        assert_eq!(p[0], ms::dtype_name(t.dtype).unwrap(), "{name}");
        assert_eq!(p[1], serde_json::json!(t.shape), "{name}");
        assert_eq!(p[2], hex_le(&t.data), "{name}");
    }
    assert_eq!(v["step_num"][2], "5307000000000000"); // 1875
    assert_eq!(v["seen"][2], hex_le(&12_345_678_901_i64.to_le_bytes()));
    assert_eq!(
        v["lr"],
        serde_json::json!(["Float64", [], hex_le(&0.1f64.to_le_bytes())])
    );
    assert_eq!(v["rng"], serde_json::json!(["UInt8", [4], "0001feff"]));
    assert_eq!(v["epoch_num"][2], "0300000000000000");
    assert_eq!(v["name"], "lenet ünïcode ✓\n");

    // MindSpore's own writer, with its slice size lowered so that it slices.
    let save = r#"
import sys, json, numpy as np, mindspore as ms
import mindspore.train.serialization as ser
ser.SLICE_SIZE = 2  # KiB
w = np.arange(3000, dtype=np.float32) * 0.25
ms.save_checkpoint([{"name": "w", "data": ms.Tensor(w)}, {"name": "b", "data": ms.Tensor(w[:7], ms.bfloat16)}],
                   sys.argv[1], append_dict={"epoch_num": 4, "step_num": 321, "tag": "run-7"}, crc_check=True)
print(json.dumps({}))
"#;
    let saved = tmp.path().join("saved.ckpt");
    python(&py, save, &[saved.to_str().unwrap()]);
    let bytes = std::fs::read(&saved).unwrap();
    let idx = ms::scan(&mut Cursor::new(&bytes)).unwrap();
    assert_eq!(
        idx.entries[0].slices.len(),
        6,
        "12000 bytes in 2 KiB slices"
    );
    assert!(idx.crc.is_some());
    let mut s = Store::open(tmp.path().join("dst"), opts()).unwrap();
    import_bytes(&mut s, bytes, None).unwrap();
    let ck = s.checkpoint(Selector::Latest).unwrap();
    assert_eq!((ck.info().step, ck.info().epoch), (321, 4));
    assert_eq!(ck.info().metadata["tag"], MetaValue::Str("run-7".into()));
    let w: Vec<f32> = (0..3000).map(|i| i as f32 * 0.25).collect();
    assert_eq!(ck.tensor("w").unwrap().data, le(&w, f32::to_le_bytes));
    assert_eq!(ck.tensor("b").unwrap().data, le(&w[..7], bf16));
    assert_eq!(ck.tensor("b").unwrap().dtype, DType::BF16);
}

// ---- CLI ----

#[test]
fn cli_import_export_mindspore_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let d1 = tmp.path().join("one");
    let (f, d) = (fixture("all_dtypes_crc.ckpt"), d1.to_str().unwrap());
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["import", f.to_str().unwrap(), d, "--json"])).unwrap();
    assert_eq!(v["format"], "mindspore");
    assert_eq!(
        (v["step"].as_u64(), v["epoch"].as_u64()),
        (Some(1875), Some(3))
    );
    assert_eq!(
        (v["tensors"].as_u64(), v["metadata"].as_u64()),
        (Some(12), Some(1))
    );

    let out = tmp.path().join("out.ckpt");
    let o = out.to_str().unwrap();
    let v: serde_json::Value = serde_json::from_str(&ok(&[
        "export",
        d,
        "1875",
        "--format",
        "mindspore",
        "--crc",
        o,
        "--json",
    ]))
    .unwrap();
    assert_eq!(v["format"], "mindspore");
    assert_eq!(v["file_bytes"], std::fs::metadata(&out).unwrap().len());
    assert!(!tmp.path().join("out.ckpt.tmp").exists());
    assert!(ms::scan(&mut std::fs::File::open(&out).unwrap())
        .unwrap()
        .crc
        .is_some());

    // Back in, from a name without the extension: --format says what it is.
    let renamed = tmp.path().join("out.bin");
    std::fs::rename(&out, &renamed).unwrap();
    let r = renamed.to_str().unwrap();
    let line = fails(&["import", r, d]);
    assert!(line.contains("--format mindspore"), "{line}");
    let text = ok(&["import", r, d, "--format", "mindspore", "--step", "9"]);
    assert!(text.contains("step 9, epoch 3"), "{text}");
    let s = Store::open(&d1, Options::read_only()).unwrap();
    assert_same_checkpoint(&s, &s, Selector::Step(1875), Selector::Step(9));
    assert_eq!(
        ms::scan(&mut Cursor::new(
            std::fs::read(fixture("all_dtypes.ckpt")).unwrap()
        ))
        .unwrap()
        .entries
        .iter()
        .find(|e| e.name == "lr")
        .unwrap()
        .kind,
        ValueKind::Tensor(DType::F32)
    );
    drop(s);

    // A damaged file: one line naming the file and the problem; nothing committed.
    let bad = tmp.path().join("bad.ckpt");
    let mut b = std::fs::read(fixture("all_dtypes_crc.ckpt")).unwrap();
    b[40] ^= 0x04;
    std::fs::write(&bad, b).unwrap();
    let line = fails(&["import", bad.to_str().unwrap(), d]);
    assert!(
        line.contains("bad.ckpt") && line.contains("CRC mismatch"),
        "{line}"
    );
    assert_eq!(
        Store::open(&d1, Options::read_only()).unwrap().list().len(),
        2
    );

    // A store held by another writer: the typed Locked error, one line.
    let held = Store::open(&d1, opts()).unwrap();
    let line = fails(&["import", f.to_str().unwrap(), d]);
    assert!(line.contains("locked by another writer"), "{line}");
    drop(held);

    let st = tmp.path().join("out.safetensors");
    let line = fails(&["export", d, "--crc", st.to_str().unwrap()]);
    assert!(line.contains("--crc"), "{line}");
    // OUT ending in .ckpt means MindSpore unless --format says otherwise.
    let v: serde_json::Value = serde_json::from_str(&ok(&["export", d, o, "--json"])).unwrap();
    assert_eq!(v["format"], "mindspore");
    assert_eq!(
        ms::scan(&mut std::fs::File::open(&out).unwrap())
            .unwrap()
            .crc,
        None
    );
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["export", d, "--format", "safetensors", o, "--json"])).unwrap();
    assert_eq!(v["format"], "safetensors");
    assert!(ok(&["export", "--help"]).contains("mindspore"));
    assert!(ok(&["import", "--help"]).contains(".ckpt"));
}

/// The MindSpore format error inside an engine error's interop error.
fn ms_error(error: Box<dyn std::error::Error + Send + Sync>) -> FormatError {
    match *error
        .downcast::<interop::Error>()
        .expect("an interop error")
    {
        interop::Error::MindSpore(e) => *e,
        other => panic!("not a MindSpore error: {other:?}"),
    }
}
