//! safetensors import and export: a bit-exact round trip for every dtype, golden bytes of a
//! tiny export, malformed files (each a typed error, nothing committed), files written by the
//! real Python `safetensors` package (checked in under tests/fixtures/, made by
//! tests/fixtures/make_safetensors.py), a load of our export by that package when it is
//! installed, and the CLI end to end.

mod cli_support;
mod support;

use ckptstore::interop::safetensors::{self as st, FormatError, TensorSpec};
use ckptstore::interop::{self, export_safetensors, import_safetensors};
use ckptstore::{DType, Error, MetaValue, Options, Selector, Store};
use cli_support::{fails, ok};
use std::collections::BTreeMap;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use support::{data, opts};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn export_bytes(store: &Store, sel: Selector) -> Vec<u8> {
    let ck = store.checkpoint(sel).unwrap();
    let mut out = Vec::new();
    export_safetensors(&ck, &mut out, Path::new("mem.safetensors"), &mut |_| {}).unwrap();
    out
}

fn import_bytes(store: &mut Store, bytes: Vec<u8>, step: Option<u64>) -> ckptstore::Result<u64> {
    import_safetensors(
        store,
        &mut Cursor::new(bytes),
        Path::new("mem.safetensors"),
        step,
        &mut |_| {},
    )
    .map(|s| s.id)
}

/// A checkpoint holding every dtype (a 2-D, a scalar and a zero-sized tensor of each), a blob,
/// and metadata of every type.
fn rich_store(dir: &Path) -> Store {
    let mut s = Store::open(dir, opts()).unwrap();
    let mut t = s.begin(1875).unwrap();
    t.set_epoch(3);
    t.set_metadata("lr", 0.1);
    t.set_metadata("big", 1e300);
    t.set_metadata("neg_inf", f64::NEG_INFINITY);
    t.set_metadata("seen", 12_345_678_901_i64);
    t.set_metadata("rng", vec![0u8, 1, 254, 255]);
    t.set_metadata("empty_bytes", Vec::<u8>::new());
    t.set_metadata("name", "lenet \"quoted\" ünïcode\n");
    for (i, d) in DType::ALL.into_iter().enumerate() {
        let n = d.size() * 3 * 5;
        t.put_tensor(&format!("{d}.matrix"), d, &[3, 5], &data(i as u64, n))
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
    // Larger than one chunk, so export reassembles several.
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
    assert_eq!((ia.step, ia.epoch), (ib.step, ib.epoch));
    assert_eq!(ia.metadata, ib.metadata);
    let mut na = ca.tensor_names();
    let mut nb = cb.tensor_names();
    na.sort_unstable();
    nb.sort_unstable();
    assert_eq!(na, nb);
    for n in na {
        assert_eq!(ca.tensor(n).unwrap(), cb.tensor(n).unwrap(), "tensor {n}");
    }
    let mut ba = ca.blob_names();
    let mut bb = cb.blob_names();
    ba.sort_unstable();
    bb.sort_unstable();
    assert_eq!(ba, bb);
    for n in ba {
        assert_eq!(ca.blob(n).unwrap(), cb.blob(n).unwrap(), "blob {n}");
    }
}

#[test]
fn round_trip_every_dtype_is_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let src = rich_store(&tmp.path().join("src"));
    let bytes = export_bytes(&src, Selector::Latest);

    // The file is well-formed by our own reader: sorted by name, aligned header.
    let header = st::read_header(&mut Cursor::new(&bytes)).unwrap();
    let names: Vec<&str> = header.tensors.iter().map(|t| t.name.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted, "tensors are laid out sorted by name");
    assert_eq!(header.data_start % 8, 0);
    assert_eq!(header.metadata["step"], "1875");
    assert_eq!(header.metadata["epoch"], "3");
    assert_eq!(header.metadata["ckptstore.id"], "1");
    assert_eq!(header.metadata["rng"], "hex:0001feff");
    assert_eq!(header.metadata["lr"], "0.1");
    assert!(names.contains(&"__blob__/optimizer.pkl"));

    // The same checkpoint exports to the same bytes.
    assert_eq!(bytes, export_bytes(&src, Selector::Step(1875)));

    let mut dst = Store::open(tmp.path().join("dst"), opts()).unwrap();
    let id = import_bytes(&mut dst, bytes, None).unwrap();
    assert_same_checkpoint(&src, &dst, Selector::Latest, Selector::Id(id));
    dst.verify(id).unwrap();

    // --step overrides the file's step; the rest is unchanged.
    let bytes = export_bytes(&src, Selector::Latest);
    let id2 = import_bytes(&mut dst, bytes, Some(42)).unwrap();
    assert_eq!(dst.info(Selector::Id(id2)).unwrap().step, 42);
    // Reopened, both are there.
    drop(dst);
    let dst = Store::open(tmp.path().join("dst"), Options::read_only()).unwrap();
    assert_eq!(dst.list().len(), 2);
}

/// The exact bytes of a tiny export: a change to them breaks files others have written.
#[test]
fn golden_bytes_of_a_tiny_export() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Store::open(tmp.path(), opts()).unwrap();
    let mut t = s.begin(7).unwrap();
    t.set_epoch(1);
    t.set_metadata("lr", 0.5);
    t.set_metadata("tag", "a");
    t.put_tensor("w", DType::U8, &[2], &[1, 2]).unwrap();
    t.put_tensor("b", DType::F32, &[], &1.5f32.to_le_bytes())
        .unwrap();
    t.commit().unwrap();
    let got = export_bytes(&s, Selector::Latest);

    let json = r#"{"__metadata__":{"ckptstore.id":"1","ckptstore.types":"{\"lr\":\"float\"}","epoch":"1","lr":"0.5","step":"7","tag":"a"},"b":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"w":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}}"#;
    let mut padded = json.to_owned();
    while !padded.len().is_multiple_of(8) {
        padded.push(' ');
    }
    let mut want = (padded.len() as u64).to_le_bytes().to_vec();
    want.extend_from_slice(padded.as_bytes());
    want.extend_from_slice(&[0x00, 0x00, 0xc0, 0x3f, 1, 2]);
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&want)
    );
    assert_eq!(got, want);
}

fn raw_file(json: &str, buffer: &[u8]) -> Vec<u8> {
    let mut v = (json.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(json.as_bytes());
    v.extend_from_slice(buffer);
    v
}

fn import_err(bytes: Vec<u8>) -> FormatError {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Store::open(tmp.path(), opts()).unwrap();
    let err = import_bytes(&mut s, bytes, None).unwrap_err();
    assert!(s.list().is_empty(), "a rejected file committed something");
    // Store still usable.
    support::commit(&mut s, 1, &[("x", &[1])]);
    match err {
        Error::Interop { path, error } => {
            assert_eq!(path, Path::new("mem.safetensors"));
            match *error
                .downcast::<interop::Error>()
                .expect("an interop error")
            {
                interop::Error::Safetensors(e) => e,
                other => panic!("not a safetensors error: {other:?}"),
            }
        }
        other => panic!("not a safetensors error: {other:?}"),
    }
}

#[test]
fn malformed_files_are_typed_errors() {
    let t = |name: &str, dtype: &str, shape: &str, b: u64, e: u64| {
        format!(r#""{name}":{{"dtype":"{dtype}","shape":{shape},"data_offsets":[{b},{e}]}}"#)
    };
    // Header length beyond the file.
    let mut f = raw_file("{}", &[]);
    f[..8].copy_from_slice(&1000u64.to_le_bytes());
    assert!(matches!(
        import_err(f),
        FormatError::HeaderBeyondFile {
            header_len: 1000,
            file_len: 10
        }
    ));
    // A length prefix of u64::MAX must not allocate.
    let mut f = raw_file("{}", &[]);
    f[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        import_err(f),
        FormatError::HeaderBeyondFile { .. }
    ));
    // Shorter than the length prefix.
    assert!(matches!(
        import_err(vec![1, 2, 3]),
        FormatError::TooShort { len: 3 }
    ));
    // Overlapping offsets.
    let json = format!(
        "{{{},{}}}",
        t("a", "U8", "[4]", 0, 4),
        t("b", "U8", "[2]", 2, 4)
    );
    match import_err(raw_file(&json, &[0; 4])) {
        FormatError::Overlap { first, second, .. } => {
            assert_eq!((first.as_str(), second.as_str()), ("a", "b"))
        }
        e => panic!("{e:?}"),
    }
    // Unknown dtype, and one safetensors knows but ckptstore cannot store.
    for dtype in ["F128", "U32"] {
        let json = format!("{{{}}}", t("a", dtype, "[1]", 0, 4));
        match import_err(raw_file(&json, &[0; 4])) {
            FormatError::UnknownDtype { name, dtype: d } => {
                assert_eq!((name.as_str(), d.as_str()), ("a", dtype))
            }
            e => panic!("{e:?}"),
        }
    }
    // Bad JSON.
    assert!(matches!(
        import_err(raw_file("{\"a\": [", &[])),
        FormatError::InvalidJson(_)
    ));
    assert!(matches!(
        import_err(raw_file("[1, 2]", &[])),
        FormatError::InvalidJson(_)
    ));
    assert!(matches!(
        import_err(raw_file("{\"a\":1}\u{0}", &[])),
        FormatError::InvalidJson(_)
    ));
    let mut not_utf8 = raw_file("{\"a\":1}", &[]);
    not_utf8[9] = 0xff;
    assert!(matches!(import_err(not_utf8), FormatError::InvalidJson(_)));
    // Shape × dtype size ≠ offsets length.
    let json = format!("{{{}}}", t("a", "F32", "[2]", 0, 4));
    match import_err(raw_file(&json, &[0; 4])) {
        FormatError::LengthMismatch { name, found: 4, .. } => assert_eq!(name, "a"),
        e => panic!("{e:?}"),
    }
    // A shape whose byte count overflows u64.
    let json = format!("{{{}}}", t("a", "F64", "[4294967296,4294967296]", 0, 4));
    assert!(matches!(
        import_err(raw_file(&json, &[0; 4])),
        FormatError::LengthMismatch { .. }
    ));
    // Offsets past the buffer, and reversed.
    let json = format!("{{{}}}", t("a", "U8", "[8]", 0, 8));
    assert!(matches!(
        import_err(raw_file(&json, &[0; 4])),
        FormatError::OffsetsOutOfRange {
            end: 8,
            buffer_len: 4,
            ..
        }
    ));
    let json = format!("{{{}}}", t("a", "U8", "[0]", 3, 1));
    assert!(matches!(
        import_err(raw_file(&json, &[0; 4])),
        FormatError::OffsetsOutOfRange { .. }
    ));
    // A gap between tensors, and bytes after the last.
    let json = format!(
        "{{{},{}}}",
        t("a", "U8", "[1]", 0, 1),
        t("b", "U8", "[1]", 2, 3)
    );
    assert!(matches!(
        import_err(raw_file(&json, &[0; 3])),
        FormatError::Gap { at: 1, len: 1 }
    ));
    let json = format!("{{{}}}", t("a", "U8", "[1]", 0, 1));
    assert!(matches!(
        import_err(raw_file(&json, &[0; 3])),
        FormatError::Gap { at: 1, len: 2 }
    ));
    // Duplicate names.
    let json = format!(
        "{{{},{}}}",
        t("a", "U8", "[1]", 0, 1),
        t("a", "U8", "[1]", 1, 2)
    );
    assert!(matches!(
        import_err(raw_file(&json, &[0; 2])),
        FormatError::DuplicateName(n) if n == "a"
    ));
    // Entries of the wrong shape.
    for bad in [
        r#"{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]}}"#,
        r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[0]}}"#,
        r#"{"a":{"dtype":"U8","shape":[0]}}"#,
        r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0],"extra":1}}"#,
        r#"{"a":7}"#,
        r#"{"__metadata__":{"k":1}}"#,
        r#"{"__metadata__":[]}"#,
    ] {
        assert!(
            matches!(import_err(raw_file(bad, &[])), FormatError::BadEntry { .. }),
            "{bad}"
        );
    }
}

/// A reader that claims to be a 1 GiB file whose header length is 200 MB: rejected by the cap
/// before anything that size is allocated or read.
struct HugeHeader {
    pos: u64,
}

impl Read for HugeHeader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let prefix = 200_000_000u64.to_le_bytes();
        let n = if self.pos < 8 {
            let k = buf.len().min(8 - self.pos as usize);
            buf[..k].copy_from_slice(&prefix[self.pos as usize..self.pos as usize + k]);
            k
        } else {
            panic!("read past the length prefix")
        };
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for HugeHeader {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        self.pos = match to {
            SeekFrom::Start(p) => p,
            SeekFrom::End(d) => (1u64 << 30).saturating_add_signed(d),
            SeekFrom::Current(d) => self.pos.saturating_add_signed(d),
        };
        Ok(self.pos)
    }
}

#[test]
fn header_above_the_cap_is_refused_before_allocating() {
    assert!(matches!(
        st::read_header(&mut HugeHeader { pos: 0 }),
        Err(FormatError::HeaderTooLarge {
            header_len: 200_000_000
        })
    ));
}

#[test]
fn reserved_names_and_colliding_metadata_are_refused_on_export() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Store::open(tmp.path(), opts()).unwrap();
    let mut t = s.begin(5).unwrap();
    t.set_metadata("step", "not five");
    t.put_tensor("a", DType::U8, &[1], &[1]).unwrap();
    t.commit().unwrap();
    let ck = s.checkpoint(Selector::Latest).unwrap();
    let err = export_safetensors(&ck, &mut Vec::new(), Path::new("x"), &mut |_| {}).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(m) if m.contains("\"step\"")));
    drop(ck);
    // The same value is no collision.
    let mut t = s.begin(6).unwrap();
    t.set_metadata("step", 6i64);
    t.put_tensor("a", DType::U8, &[1], &[1]).unwrap();
    t.commit().unwrap();
    let bytes = export_bytes(&s, Selector::Latest);
    let h = st::read_header(&mut Cursor::new(bytes)).unwrap();
    assert_eq!(h.metadata["step"], "6");
    // The writer itself refuses `__metadata__` as a tensor name and duplicates.
    let spec = |n: &str| TensorSpec {
        name: n.into(),
        dtype: DType::U8,
        shape: vec![0],
    };
    assert!(st::encode_header(&BTreeMap::new(), &[spec("__metadata__")]).is_err());
    assert!(matches!(
        st::encode_header(&BTreeMap::new(), &[spec("a"), spec("a")]),
        Err(FormatError::DuplicateName(_))
    ));
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Files written by the real `safetensors` Python package (0.8.0, numpy 2.4), checked in.
#[test]
fn imports_files_written_by_python_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Store::open(tmp.path(), opts()).unwrap();
    let path = fixture("numpy_mixed.safetensors");
    let mut f = std::fs::File::open(&path).unwrap();
    let sum = import_safetensors(&mut s, &mut f, &path, None, &mut |_| {}).unwrap();
    assert_eq!(
        (sum.step, sum.epoch, sum.tensors, sum.blobs),
        (1875, 3, 7, 0)
    );
    let ck = s.checkpoint(Selector::Id(sum.id)).unwrap();
    let md = ck.metadata();
    assert_eq!(md["lr"], MetaValue::Str("0.1".into()));
    assert_eq!(
        md["note"],
        MetaValue::Str("made by safetensors.numpy".into())
    );
    assert!(!md.contains_key("step") && !md.contains_key("epoch"));

    let t = ck.tensor("f32").unwrap();
    assert_eq!((t.dtype, t.shape.clone()), (DType::F32, vec![2, 3]));
    assert_eq!(f32s(&t.data), [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5]);
    let t = ck.tensor("f16").unwrap();
    assert_eq!((t.dtype, t.shape.clone()), (DType::F16, vec![4]));
    // 1.0, -2.5, 65504 (f16 max), 0.0 as IEEE binary16 bit patterns.
    let bits: Vec<u16> = t
        .data
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    assert_eq!(bits, [0x3c00, 0xc100, 0x7bff, 0x0000]);
    let t = ck.tensor("i64").unwrap();
    assert_eq!((t.dtype, t.shape.clone()), (DType::I64, vec![2, 2]));
    let ints: Vec<i64> = t
        .data
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(ints, [-(1 << 62), -1, 0, 1 << 62]);
    let t = ck.tensor("u8").unwrap();
    assert_eq!(
        (t.dtype, t.data.clone()),
        (DType::U8, vec![250, 251, 252, 253, 254, 255])
    );
    let t = ck.tensor("bool").unwrap();
    assert_eq!((t.dtype, t.data.clone()), (DType::Bool, vec![1, 0, 1]));
    let t = ck.tensor("scalar").unwrap();
    assert_eq!((t.shape.clone(), f32s(&t.data)), (vec![], vec![3.25]));
    let t = ck.tensor("empty").unwrap();
    assert_eq!((t.shape.clone(), t.data.len()), (vec![0, 4], 0));
    drop(ck);

    let path = fixture("numpy_no_metadata.safetensors");
    let mut f = std::fs::File::open(&path).unwrap();
    let sum = import_safetensors(&mut s, &mut f, &path, None, &mut |_| {}).unwrap();
    assert_eq!((sum.step, sum.epoch, sum.metadata), (0, 0, 0));
    let t = s
        .checkpoint(Selector::Id(sum.id))
        .unwrap()
        .tensor("w")
        .unwrap();
    assert_eq!(t.dtype, DType::I32);
    assert_eq!(t.data, [0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0]);
}

fn python_has_safetensors() -> bool {
    Command::new("python3")
        .args(["-c", "import safetensors, numpy"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The real Python package loads our export (every dtype numpy has) with the same values.
#[test]
fn python_safetensors_loads_our_export() {
    if !python_has_safetensors() {
        println!("SKIPPED: python3 with the safetensors and numpy packages is not available");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Store::open(tmp.path().join("store"), opts()).unwrap();
    let mut t = s.begin(9).unwrap();
    t.set_metadata("lr", 0.25);
    let numpy_dtypes = [
        DType::F64,
        DType::F32,
        DType::F16,
        DType::I64,
        DType::I32,
        DType::I16,
        DType::I8,
        DType::U8,
        DType::Bool,
    ];
    for (i, d) in numpy_dtypes.into_iter().enumerate() {
        let mut bytes = data(i as u64, d.size() * 6);
        if d == DType::Bool {
            bytes.iter_mut().for_each(|b| *b &= 1);
        }
        t.put_tensor(&format!("t_{d}"), d, &[2, 3], &bytes).unwrap();
    }
    t.put_tensor("zero", DType::F32, &[0], &[]).unwrap();
    t.commit().unwrap();
    let out = tmp.path().join("out.safetensors");
    std::fs::write(&out, export_bytes(&s, Selector::Latest)).unwrap();

    // Python prints each tensor as name, dtype, shape, hex of its little-endian bytes.
    let script = r#"
import sys, json
from safetensors import safe_open
from safetensors.numpy import load_file
d = load_file(sys.argv[1])
with safe_open(sys.argv[1], framework="np") as f:
    meta = f.metadata()
out = {k: [str(v.dtype), list(v.shape), v.astype(v.dtype.newbyteorder("<")).tobytes().hex()] for k, v in d.items()}
print(json.dumps({"tensors": out, "metadata": meta}))
"#;
    let o = Command::new("python3")
        .args(["-c", script, out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["metadata"]["step"], "9");
    assert_eq!(v["metadata"]["lr"], "0.25");
    let ck = s.checkpoint(Selector::Latest).unwrap();
    let tensors = v["tensors"].as_object().unwrap();
    assert_eq!(tensors.len(), numpy_dtypes.len() + 1);
    let np_name = |d: DType| match d {
        DType::Bool => "bool".to_owned(),
        DType::F64 => "float64".into(),
        DType::F32 => "float32".into(),
        DType::F16 => "float16".into(),
        DType::U8 => "uint8".into(),
        other => format!("int{}", other.size() * 8),
    };
    for d in numpy_dtypes {
        let name = format!("t_{d}");
        let t = ck.tensor(&name).unwrap();
        let p = &tensors[&name];
        assert_eq!(p[0], np_name(d), "{name}");
        assert_eq!(p[1], serde_json::json!([2, 3]), "{name}");
        let hex: String = t.data.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(p[2], hex, "{name}");
    }
    assert_eq!(tensors["zero"][1], serde_json::json!([0]));
}

// ---- CLI ----

#[test]
fn cli_export_import_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let src_dir = tmp.path().join("src");
    let dst_dir = tmp.path().join("dst");
    let src = rich_store(&src_dir);
    // A second checkpoint, so that STEP selects.
    drop(src);
    let mut src = Store::open(&src_dir, opts()).unwrap();
    support::commit(&mut src, 2000, &[("only", &[9, 9])]);
    drop(src);
    let (s, d) = (src_dir.to_str().unwrap(), dst_dir.to_str().unwrap());
    let out = tmp.path().join("ck.safetensors");
    let o = out.to_str().unwrap();

    let v: serde_json::Value = serde_json::from_str(&ok(&[
        "export",
        s,
        "1875",
        "--format",
        "safetensors",
        o,
        "--json",
    ]))
    .unwrap();
    assert_eq!(v["step"], 1875);
    assert_eq!(v["blobs"], 2);
    assert_eq!(v["file_bytes"], std::fs::metadata(&out).unwrap().len());
    assert!(!tmp.path().join("ck.safetensors.tmp").exists());

    let v: serde_json::Value =
        serde_json::from_str(&ok(&["import", o, d, "--json", "--io", "uring"])).unwrap();
    assert_eq!(
        (v["step"].as_u64(), v["epoch"].as_u64()),
        (Some(1875), Some(3))
    );
    assert_eq!(v["blobs"], 2);
    let src = Store::open(&src_dir, Options::read_only()).unwrap();
    let dst = Store::open(&dst_dir, Options::read_only()).unwrap();
    assert_same_checkpoint(&src, &dst, Selector::Step(1875), Selector::Latest);

    // Default: the newest checkpoint; human output; overwrite the old file atomically.
    let text = ok(&["export", s, o]);
    assert!(text.contains("step 2000"), "{text}");
    let text = ok(&["import", o, d, "--step", "5", "--io", "std"]);
    assert!(text.contains("step 5"), "{text}");
    let dst = Store::open(&dst_dir, Options::read_only()).unwrap();
    assert_eq!(
        dst.checkpoint(Selector::Step(5))
            .unwrap()
            .tensor("only")
            .unwrap()
            .data,
        [9, 9]
    );

    // A store held by another writer: the typed Locked error, one line.
    let held = Store::open(&dst_dir, opts()).unwrap();
    let line = fails(&["import", o, d]);
    assert!(line.contains("locked by another writer"), "{line}");
    drop(held);

    // A malformed file: one line naming the file and the problem; nothing committed.
    let bad = tmp.path().join("bad.safetensors");
    let mut f = raw_file("{}", &[]);
    f[..8].copy_from_slice(&1000u64.to_le_bytes());
    std::fs::write(&bad, f).unwrap();
    let line = fails(&["import", bad.to_str().unwrap(), d]);
    assert!(
        line.contains("bad.safetensors") && line.contains("beyond the end"),
        "{line}"
    );
    assert_eq!(
        Store::open(&dst_dir, Options::read_only())
            .unwrap()
            .list()
            .len(),
        2
    );

    // Usage errors.
    let line = fails(&["import", tmp.path().join("x.bin").to_str().unwrap(), d]);
    assert!(line.contains("--format"), "{line}");
    let line = fails(&["export", s]);
    assert!(line.contains("expected DIR"), "{line}");
    let line = fails(&["export", s, "notastep", o]);
    assert!(line.contains("STEP"), "{line}");
    let line = fails(&["export", s, "99999", o]);
    assert!(line.contains("no checkpoint"), "{line}");
    let line = fails(&["export", s, tmp.path().to_str().unwrap()]);
    assert!(line.contains("is a directory"), "{line}");
    assert!(ok(&["export", "--help"]).contains("safetensors"));
    assert!(ok(&["import", "--help"]).contains("--step"));
}
