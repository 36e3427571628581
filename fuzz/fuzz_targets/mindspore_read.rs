//! Arbitrary bytes as a MindSpore `.ckpt` file, read by `ckptstore::interop::mindspore`.
//!
//! Invariants: no panic, no allocation beyond what the input's lengths allow (every length is
//! checked against its enclosing message and the file before anything is allocated; names,
//! type strings and dims are capped). If `scan` accepts the file: prost's code for MindSpore's
//! own schema decodes the body too, to the same values (slices joined as MindSpore's loader
//! joins them); every slice lies inside the body; the streamed contents equal those bytes;
//! the CRC check passes exactly when the trailer holds the body's CRC-32; and writing the
//! entries again (in other slice sizes, with a trailer) gives a file that scans to the same
//! entries and contents and passes its CRC check.
#![no_main]

use ckptstore::interop::mindspore::{self as ms, ValueKind};
use ckptstore::proto::mindspore as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use std::io::{Cursor, Read};

/// `(tag, dims, type, joined content)` of every entry.
type Joined = Vec<(String, Vec<i64>, String, Vec<u8>)>;

fn streamed(file: &[u8], idx: &ms::Index) -> (Joined, Result<(), ms::FormatError>) {
    let mut c = Cursor::new(file);
    let mut body = ms::BodyReader::new(&mut c, idx).expect("seek to 0");
    let mut out = Vec::new();
    for e in &idx.entries {
        let mut buf = Vec::new();
        body.content(e)
            .read_to_end(&mut buf)
            .expect("in-range content streams");
        assert_eq!(buf.len() as u64, e.nbytes, "{}", e.name);
        out.push((e.name.clone(), e.dims.clone(), e.type_name.clone(), buf));
    }
    (out, body.finish())
}

fuzz_target!(|data: &[u8]| {
    let Ok(idx) = ms::scan(&mut Cursor::new(data)) else {
        return;
    };
    assert_eq!(idx.file_len, data.len() as u64);
    let body = &data[..idx.body_len as usize];
    for e in &idx.entries {
        for &(off, len) in &e.slices {
            assert!(off + len <= idx.body_len, "{e:?}");
        }
        if let ValueKind::Tensor(d) = e.kind {
            assert_eq!(
                ckptstore::manifest::tensor_nbytes(d, &e.shape),
                Some(e.nbytes),
                "{e:?}"
            );
        } else {
            let _ = ms::decode_str(&e.name, &ms::read_entry(&mut Cursor::new(data), e).unwrap());
        }
    }

    // The oracle: prost, from MindSpore's checkpoint.proto.
    let ck = pb::Checkpoint::decode(body).expect("prost decodes what scan accepts");
    let mut oracle: Joined = Vec::new();
    for v in ck.value {
        let Some(pb::checkpoint::value::Value::Tensor(t)) = v.value else {
            panic!("scan accepted a value without a tensor: {}", v.tag)
        };
        match oracle.last_mut() {
            Some(last) if last.0 == v.tag => last.3.extend(t.tensor_content),
            _ => oracle.push((v.tag, t.dims, t.tensor_type, t.tensor_content)),
        }
    }
    let (got, crc_ok) = streamed(data, &idx);
    assert_eq!(got, oracle, "streamed contents differ from prost's decode");
    let mut crc = ms::Crc32::new();
    crc.update(body);
    assert_eq!(crc_ok.is_ok(), idx.crc.is_none_or(|c| c == crc.value()));

    // Re-encode: same entries, a valid trailer.
    let slice = 1 + (data.len() as u64 % 7);
    let mut out = Vec::new();
    let mut w = ms::ValueWriter::new(&mut out, slice);
    for (tag, dims, ty, content) in &got {
        w.tensor(tag, dims, ty, content).expect("writes to a Vec");
    }
    w.finish(true).unwrap();
    let idx2 = ms::scan(&mut Cursor::new(&out[..])).expect("a re-encoded file scans");
    let (got2, crc2) = streamed(&out, &idx2);
    crc2.expect("the writer's CRC trailer checks");
    assert_eq!(got2, got);
    for (a, b) in idx.entries.iter().zip(&idx2.entries) {
        assert_eq!((&a.kind, &a.shape), (&b.kind, &b.shape));
    }
});
