//! The chunk decoder (`codec::decode`) on arbitrary stored bytes, and the encoder's round trip
//! on arbitrary raw bytes.
//!
//! Input: `mode u8 | codec u8 | raw_len u24 LE | bytes`.
//! * `mode & 1 == 0`: `bytes` is a stored chunk of `codec` claiming `raw_len` raw bytes
//!   (bounded to 1 MiB, as a manifest bounds it to 1 GiB). Invariants: no panic, no
//!   allocation beyond `raw_len` (zstd frames that declare another size are refused first);
//!   success fills exactly `raw_len` bytes.
//! * `mode & 1 == 1`: `bytes` is a raw chunk; encoding with `codec` (any zstd variant) and
//!   decoding gives it back, the frame is at most 7/8 of it, and the in-place encoder (the
//!   write pipeline's) yields the same frame or the same refusal and restores the raw bytes.
#![no_main]

use ckptstore::codec::{self, Encoder};
use ckptstore::proto::v1 as pb;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let (mode, codec) = (data[0], data[1] as i32 % 6);
    let raw_len = (u32::from_le_bytes([data[2], data[3], data[4], 0]) as usize) & ((1 << 20) - 1);
    let bytes = &data[5..];
    let mut scratch = Vec::new();
    if mode & 1 == 0 {
        let mut out = vec![0u8; raw_len];
        if codec::decode(codec, bytes, &mut out, &mut scratch).is_ok() && codec == 0 {
            assert_eq!(&out[..], bytes);
        }
        assert!(scratch.len() <= raw_len);
        return;
    }
    let Ok(codec) = pb::Codec::try_from(codec % 4 + 1) else {
        return;
    };
    let level = if mode & 2 == 0 { 1 } else { 3 };
    let mut enc = Encoder::new(level).unwrap();
    let mut frame = Vec::new();
    let used = enc.encode(codec, bytes, &mut frame);
    let mut buf = bytes.to_vec();
    let in_place = enc.encode_in_place(codec, &mut buf);
    if used == pb::Codec::None {
        assert_eq!(in_place, None);
        assert_eq!(buf, bytes, "a refused in-place encode restores the raw bytes");
        return;
    }
    assert_eq!(used, codec);
    assert!(frame.len() <= bytes.len() - bytes.len() / 8);
    assert_eq!(in_place.map(|n| &buf[..n]), Some(&frame[..]));
    let mut out = vec![0u8; bytes.len()];
    codec::decode(used as i32, &frame, &mut out, &mut scratch).unwrap();
    assert_eq!(out, bytes);
});
