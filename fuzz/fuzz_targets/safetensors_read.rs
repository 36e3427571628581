//! Arbitrary bytes as a safetensors file, read by `ckptstore::interop::safetensors`.
//!
//! Invariants: no panic, no allocation beyond what the input's lengths allow (the header is
//! capped and checked against the file before it is allocated; a tensor is read only after its
//! offsets are checked). If the header parses: every tensor's byte range lies inside the file
//! and reads back; re-encoding the metadata and tensors (in buffer order) gives a file that
//! parses to the same header and bytes, and encoding that again is byte-identical.
#![no_main]

use ckptstore::interop::safetensors::{self as st, TensorSpec};
use libfuzzer_sys::fuzz_target;
use std::io::Cursor;

fuzz_target!(|data: &[u8]| {
    let mut f = Cursor::new(data);
    let Ok(h) = st::read_header(&mut f) else {
        return;
    };
    let file_len = data.len() as u64;
    assert!(h.data_start >= 8 && h.data_start <= file_len);
    let mut tensors = Vec::with_capacity(h.tensors.len());
    let mut buf = Vec::new();
    for t in &h.tensors {
        let (begin, end) = t.data_offsets;
        assert!(begin <= end, "{t:?}");
        assert!(h.data_start + end <= file_len, "{t:?} beyond {file_len}");
        assert_eq!(
            ckptstore::manifest::tensor_nbytes(t.dtype, &t.shape),
            Some(t.nbytes())
        );
        st::read_tensor_into(&mut f, &h, t, &mut buf).expect("in-range tensor reads");
        assert_eq!(buf.len() as u64, t.nbytes());
        assert_eq!(
            buf[..],
            data[(h.data_start + begin) as usize..(h.data_start + end) as usize]
        );
        let spec = TensorSpec {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        };
        tensors.push((spec, buf.clone()));
    }
    // Re-encode in buffer order: offsets are the same (the buffer is covered exactly).
    let refs: Vec<(TensorSpec, &[u8])> = tensors.iter().map(|(s, b)| (s.clone(), &b[..])).collect();
    let mut out = Vec::new();
    st::write_all(&mut out, &h.metadata, &refs).expect("a parsed file re-encodes");
    let h2 = st::read_header(&mut Cursor::new(&out[..])).expect("a re-encoded file parses");
    assert_eq!(h2.metadata, h.metadata);
    assert_eq!(h2.tensors, h.tensors);
    assert_eq!(
        out[h2.data_start as usize..],
        data[h.data_start as usize..],
        "buffer bytes differ after re-encoding"
    );
    let mut again = Vec::new();
    st::write_all(&mut again, &h2.metadata, &refs).unwrap();
    assert_eq!(again, out, "encoding is not deterministic");
});
