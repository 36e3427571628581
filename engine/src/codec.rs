//! Chunk codecs: byte-shuffling and zstd on the write path, and the one decoder every read
//! path uses.
//!
//! A chunk is stored raw ([`pb::Codec::None`]) or as one zstd frame of its raw bytes, which
//! for floating-point tensors are first *byte-shuffled*: the bytes of each element are
//! transposed so that all first bytes come first, then all second bytes, and so on. In trained
//! weights the sign-and-exponent bytes of neighbouring elements are nearly alike and the low
//! mantissa bytes are noise; shuffled, the alike bytes sit together where zstd finds them.
//!
//! BLAKE3 always covers the **raw** bytes: a chunk is the same chunk whatever its codec, so
//! deduplication works across stores and checkpoints saved with and without compression, and
//! verification checks what the trainer wrote, after decoding.
//!
//! A chunk is stored compressed only when that saves at least 1/8 of its bytes
//! ([`MIN_SAVING_DIVISOR`]); otherwise it is stored raw and reads of it cost nothing extra.

use crate::dtype::DType;
use crate::error::{Error, Result};
use ckptstore_proto::v1 as pb;

/// A chunk is compressed only if its frame is at most `raw - raw / MIN_SAVING_DIVISOR` bytes.
pub(crate) const MIN_SAVING_DIVISOR: usize = 8;

/// Compression of new chunks ([`Options::compression`](crate::Options::compression)).
///
/// Only what is written changes: every build that knows the codecs reads chunks of any codec,
/// and deduplication matches chunks across codecs (BLAKE3 covers the raw bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Store every chunk raw. The default: reads can then be zero-copy, and a save costs no
    /// CPU beyond hashing.
    #[default]
    None,
    /// zstd at `level` (1 is the fast level this was measured with; bounds: zstd's own,
    /// `zstd::compression_level_range()`, -131072..=22 with zstd 1.5, 0 excluded; negative
    /// levels are faster and compress less), float tensors byte-shuffled first. Chunks that do
    /// not shrink by 1/8 are stored raw.
    Zstd {
        /// zstd compression level.
        level: i32,
    },
}

impl Compression {
    /// zstd level 1 with byte-shuffling for float dtypes.
    pub fn zstd() -> Self {
        Compression::Zstd { level: 1 }
    }

    /// Checks the level against what zstd accepts.
    pub fn validate(&self) -> Result<()> {
        if let Compression::Zstd { level } = *self {
            let range = zstd::compression_level_range();
            if !range.contains(&level) || level == 0 {
                return Err(Error::invalid(format!(
                    "zstd level {level} outside {}..={} (0 excluded)",
                    range.start(),
                    range.end()
                )));
            }
        }
        Ok(())
    }

    /// The codec a new chunk of a tensor of `dtype` (`None`: a blob) is tried with;
    /// [`pb::Codec::None`] when compression is off.
    pub fn codec_for(&self, dtype: Option<DType>) -> pb::Codec {
        match self {
            Compression::None => pb::Codec::None,
            Compression::Zstd { .. } => match dtype {
                Some(DType::F16 | DType::BF16) => pb::Codec::ZstdShuffle2,
                Some(DType::F32) => pb::Codec::ZstdShuffle4,
                Some(DType::F64) => pb::Codec::ZstdShuffle8,
                _ => pb::Codec::Zstd,
            },
        }
    }
}

/// Element size a codec shuffles by (1: no shuffling); `None` for no codec or an unknown one.
pub fn shuffle_width(codec: i32) -> Option<usize> {
    match pb::Codec::try_from(codec).ok()? {
        pb::Codec::None => None,
        pb::Codec::Zstd => Some(1),
        pb::Codec::ZstdShuffle2 => Some(2),
        pb::Codec::ZstdShuffle4 => Some(4),
        pb::Codec::ZstdShuffle8 => Some(8),
    }
}

/// Whether this build can decode `codec`.
pub(crate) fn is_known(codec: i32) -> bool {
    codec == pb::Codec::None as i32 || shuffle_width(codec).is_some()
}

/// Transposes the bytes of `src` by element size `width` into `dst` (same length): byte `j`
/// of element `i` goes to `j × n + i`, `n` whole elements; a tail of `len % width` bytes is
/// copied as is to the end.
pub fn shuffle(src: &[u8], width: usize, dst: &mut [u8]) {
    assert_eq!(src.len(), dst.len(), "shuffle needs equal lengths");
    let n = src.len() / width;
    let body = n * width;
    match width {
        2 => transpose::<2>(&src[..body], &mut dst[..body], n, true),
        4 => transpose::<4>(&src[..body], &mut dst[..body], n, true),
        8 => transpose::<8>(&src[..body], &mut dst[..body], n, true),
        _ => dst[..body].copy_from_slice(&src[..body]),
    }
    dst[body..].copy_from_slice(&src[body..]);
}

/// The inverse of [`shuffle`].
pub(crate) fn unshuffle(src: &[u8], width: usize, dst: &mut [u8]) {
    assert_eq!(src.len(), dst.len(), "unshuffle needs equal lengths");
    let n = src.len() / width;
    let body = n * width;
    match width {
        2 => transpose::<2>(&src[..body], &mut dst[..body], n, false),
        4 => transpose::<4>(&src[..body], &mut dst[..body], n, false),
        8 => transpose::<8>(&src[..body], &mut dst[..body], n, false),
        _ => dst[..body].copy_from_slice(&src[..body]),
    }
    dst[body..].copy_from_slice(&src[body..]);
}

/// Elements moved per tile: a tile's `W` lanes of 16 bytes each are gathered in registers and
/// stored whole (LLVM turns the fixed-size gathers into byte shuffles).
const TILE: usize = 16;

/// Element-major `[n][W]` to lane-major `[W][n]` (`forward`), or back.
fn transpose<const W: usize>(src: &[u8], dst: &mut [u8], n: usize, forward: bool) {
    debug_assert!(src.len() == n * W && dst.len() == n * W);
    let tiles = n / TILE;
    if forward {
        for t in 0..tiles {
            let s = &src[t * TILE * W..(t + 1) * TILE * W];
            for j in 0..W {
                let mut lane = [0u8; TILE];
                for (k, b) in lane.iter_mut().enumerate() {
                    *b = s[k * W + j];
                }
                dst[j * n + t * TILE..j * n + (t + 1) * TILE].copy_from_slice(&lane);
            }
        }
        for i in tiles * TILE..n {
            for j in 0..W {
                dst[j * n + i] = src[i * W + j];
            }
        }
    } else {
        for t in 0..tiles {
            let mut tile = [[0u8; W]; TILE];
            for j in 0..W {
                let lane = &src[j * n + t * TILE..j * n + (t + 1) * TILE];
                for (k, &b) in lane.iter().enumerate() {
                    tile[k][j] = b;
                }
            }
            dst[t * TILE * W..(t + 1) * TILE * W].copy_from_slice(tile.as_flattened());
        }
        for i in tiles * TILE..n {
            for j in 0..W {
                dst[i * W + j] = src[j * n + i];
            }
        }
    }
}

/// Per-thread encoding state: a zstd context and a scratch buffer for shuffling, both reused
/// across chunks (a chunk-sized scratch, allocated once per thread).
pub struct Encoder {
    zstd: zstd::bulk::Compressor<'static>,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").finish_non_exhaustive()
    }
}

/// Largest frame worth storing for a raw chunk of `raw_len` bytes.
fn frame_limit(raw_len: usize) -> usize {
    raw_len - raw_len / MIN_SAVING_DIVISOR
}

impl Encoder {
    /// An encoder at zstd `level`. The frames it writes carry their content size (checked by
    /// the decoder before it allocates) and zstd's own checksum of the content (so a damaged
    /// frame fails to decode even when a trusted read skips BLAKE3).
    pub fn new(level: i32) -> Result<Encoder> {
        let zerr = |e: std::io::Error| Error::invalid(format!("zstd level {level}: {e}"));
        let mut zstd = zstd::bulk::Compressor::new(level).map_err(zerr)?;
        zstd.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
            .map_err(zerr)?;
        zstd.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(true))
            .map_err(zerr)?;
        Ok(Encoder {
            zstd,
            scratch: Vec::new(),
        })
    }

    /// An encoder for `compression`, or `None` when it is off.
    pub fn for_compression(compression: Compression) -> Result<Option<Encoder>> {
        match compression {
            Compression::None => Ok(None),
            Compression::Zstd { level } => Encoder::new(level).map(Some),
        }
    }

    fn shuffled(&mut self, raw: &[u8], width: usize) {
        self.scratch.resize(raw.len(), 0);
        shuffle(raw, width, &mut self.scratch);
    }

    /// Encodes `raw` with `codec` into `out` (replacing its contents). Returns the codec the
    /// chunk is to be stored with: `codec` when the frame saves at least 1/8, else
    /// [`pb::Codec::None`] (then `out` is meaningless and the raw bytes are stored).
    pub fn encode(&mut self, codec: pb::Codec, raw: &[u8], out: &mut Vec<u8>) -> pb::Codec {
        let Some(width) = shuffle_width(codec as i32) else {
            return pb::Codec::None;
        };
        if raw.is_empty() {
            return pb::Codec::None;
        }
        out.resize(frame_limit(raw.len()), 0);
        let n = if width > 1 {
            self.shuffled(raw, width);
            self.zstd.compress_to_buffer(&self.scratch, &mut out[..])
        } else {
            self.zstd.compress_to_buffer(raw, &mut out[..])
        };
        match n {
            Ok(n) => {
                out.truncate(n);
                codec
            }
            // The frame would not fit in the limit: not worth storing compressed.
            Err(_) => pb::Codec::None,
        }
    }

    /// Encodes the chunk in `buf` in place (a staging buffer of the write pipeline): on
    /// success `buf[..n]` holds the frame and `Some(n)` is returned; on `None` `buf` holds the
    /// raw bytes again and is stored raw.
    pub fn encode_in_place(&mut self, codec: pb::Codec, buf: &mut [u8]) -> Option<usize> {
        let width = shuffle_width(codec as i32)?;
        if buf.is_empty() {
            return None;
        }
        // The scratch holds the (shuffled) raw bytes while the frame overwrites `buf`.
        self.shuffled(buf, width);
        let limit = frame_limit(buf.len());
        match self
            .zstd
            .compress_to_buffer(&self.scratch, &mut buf[..limit])
        {
            Ok(n) => Some(n),
            Err(_) => {
                unshuffle(&self.scratch, width, buf);
                None
            }
        }
    }
}

/// Decodes a stored chunk of codec `codec` into `out`, which has the chunk's raw length (from
/// the validated manifest, so at most 1 GiB). Checks the frame's declared content size
/// against `out.len()` before decompressing anything, so a damaged or hostile frame never
/// causes an allocation beyond the raw length the manifest promised. `scratch` is reused
/// across calls (shuffled codecs decompress into it).
///
/// The error is the reason, for [`Error::ChunkCorrupt`].
pub fn decode(
    codec: i32,
    stored: &[u8],
    out: &mut [u8],
    scratch: &mut Vec<u8>,
) -> std::result::Result<(), String> {
    if codec == pb::Codec::None as i32 {
        if stored.len() != out.len() {
            return Err(format!(
                "raw chunk of {} bytes, expected {}",
                stored.len(),
                out.len()
            ));
        }
        out.copy_from_slice(stored);
        return Ok(());
    }
    let width = shuffle_width(codec).ok_or_else(|| format!("unknown codec {codec}"))?;
    match zstd::zstd_safe::get_frame_content_size(stored) {
        Ok(Some(n)) if n == out.len() as u64 => {}
        Ok(Some(n)) => {
            return Err(format!(
                "zstd frame declares {n} bytes, the chunk has {}",
                out.len()
            ))
        }
        Ok(None) => return Err("zstd frame without a content size".into()),
        Err(_) => return Err("not a zstd frame".into()),
    }
    let mut dctx = zstd::bulk::Decompressor::new().map_err(|e| format!("zstd: {e}"))?;
    let dst: &mut [u8] = if width > 1 {
        scratch.resize(out.len(), 0);
        &mut scratch[..]
    } else {
        &mut *out
    };
    let n = dctx
        .decompress_to_buffer(stored, dst)
        .map_err(|e| format!("bad zstd frame: {e}"))?;
    if n != dst.len() {
        return Err(format!(
            "zstd frame decoded to {n} bytes, expected {}",
            dst.len()
        ));
    }
    if width > 1 {
        unshuffle(scratch, width, out);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floats(n: usize) -> Vec<u8> {
        // Smooth values, like weights: exponents repeat, mantissas vary.
        (0..n)
            .flat_map(|i| (1.0f32 + (i as f32 * 0.001).sin() * 0.01).to_le_bytes())
            .collect()
    }

    #[test]
    fn shuffle_round_trips_every_width_and_tail() {
        let src: Vec<u8> = (0..1003u32).map(|i| (i * 7 + i / 13) as u8).collect();
        for width in [1, 2, 4, 8] {
            for len in [0, 1, 7, 8, 9, 17, 1003] {
                let mut s = vec![0; len];
                shuffle(&src[..len], width, &mut s);
                let mut back = vec![0; len];
                unshuffle(&s, width, &mut back);
                assert_eq!(back, &src[..len], "width {width} len {len}");
            }
        }
        // Pinned layout: byte j of element i at j × n + i, tail last.
        let mut s = [0; 9];
        shuffle(&[1, 2, 3, 4, 5, 6, 7, 8, 9], 4, &mut s);
        assert_eq!(s, [1, 5, 2, 6, 3, 7, 4, 8, 9]);
        // Whole tiles and a partial one, against the definition.
        let big: Vec<u8> = (0..(TILE * 8 * 3 + 5 * 8 + 3))
            .map(|i| (i % 251) as u8)
            .collect();
        for width in [2, 4, 8] {
            let mut s = vec![0; big.len()];
            shuffle(&big, width, &mut s);
            let n = big.len() / width;
            for i in 0..n {
                for j in 0..width {
                    assert_eq!(s[j * n + i], big[i * width + j], "width {width} {i} {j}");
                }
            }
            let mut back = vec![0; big.len()];
            unshuffle(&s, width, &mut back);
            assert_eq!(back, big);
        }
    }

    /// Pins docs/FORMAT.md "Codecs": a ZSTD_SHUFFLE4 chunk is one zstd frame (any conformant
    /// encoder's: this one is from the `zstd` command line, `-1 --content-size --check FILE`)
    /// of the raw bytes shuffled by 4, tail last, declaring its content size.
    #[test]
    fn golden_frame_from_another_encoder_decodes() {
        let raw: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 0.5, -1.5]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .chain([7, 8, 9])
            .collect();
        let mut shuffled = vec![0; raw.len()];
        shuffle(&raw, 4, &mut shuffled);
        assert_eq!(
            shuffled,
            [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x80, 0, 0x40, 0x80, 0, 0xc0, 0x3f, 0x40, 0x40,
                0x40, 0x3f, 0xbf, 7, 8, 9
            ]
        );
        let frame = [
            0x28, 0xb5, 0x2f, 0xfd, 0x24, 0x1b, 0xbd, 0x00, 0x00, 0x88, 0x00, 0x00, 0x80, 0x00,
            0x40, 0x80, 0x00, 0xc0, 0x3f, 0x40, 0x40, 0x40, 0x3f, 0xbf, 0x07, 0x08, 0x09, 0x01,
            0x00, 0x1b, 0xc0, 0x02, 0x66, 0xe9, 0x5f, 0xe8,
        ];
        let mut out = vec![0; raw.len()];
        decode(
            pb::Codec::ZstdShuffle4 as i32,
            &frame,
            &mut out,
            &mut Vec::new(),
        )
        .unwrap();
        assert_eq!(out, raw);
        // The same frame read as unshuffled ZSTD gives the shuffled bytes.
        decode(pb::Codec::Zstd as i32, &frame, &mut out, &mut Vec::new()).unwrap();
        assert_eq!(out, shuffled);
        // The same content streamed from stdin: a frame without its content size (header
        // byte 0x04, a window descriptor instead of the size) is refused before decoding.
        let mut streamed = frame.to_vec();
        streamed[4..6].copy_from_slice(&[0x04, 0x48]);
        let e = decode(pb::Codec::Zstd as i32, &streamed, &mut out, &mut Vec::new()).unwrap_err();
        assert!(e.contains("without a content size"), "{e}");
    }

    #[test]
    fn encode_decode_round_trip() {
        let raw = floats(50_000);
        let mut enc = Encoder::new(1).unwrap();
        let mut scratch = Vec::new();
        for codec in [
            pb::Codec::Zstd,
            pb::Codec::ZstdShuffle2,
            pb::Codec::ZstdShuffle4,
            pb::Codec::ZstdShuffle8,
        ] {
            let mut frame = Vec::new();
            assert_eq!(enc.encode(codec, &raw, &mut frame), codec);
            assert!(frame.len() <= raw.len() - raw.len() / 8);
            let mut out = vec![0; raw.len()];
            decode(codec as i32, &frame, &mut out, &mut scratch).unwrap();
            assert_eq!(out, raw, "{codec:?}");

            let mut buf = raw.clone();
            let n = enc.encode_in_place(codec, &mut buf).expect("compressible");
            assert_eq!(&buf[..n], &frame[..], "in place gives the same frame");
        }
    }

    #[test]
    fn incompressible_is_stored_raw() {
        // Pseudo-random bytes do not shrink by 1/8.
        let mut x = 0x9e3779b97f4a7c15u64;
        let raw: Vec<u8> = (0..100_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut enc = Encoder::new(1).unwrap();
        let mut frame = Vec::new();
        assert_eq!(
            enc.encode(pb::Codec::ZstdShuffle4, &raw, &mut frame),
            pb::Codec::None
        );
        let mut buf = raw.clone();
        assert_eq!(enc.encode_in_place(pb::Codec::ZstdShuffle4, &mut buf), None);
        assert_eq!(buf, raw, "a refused in-place encode restores the raw bytes");
        let mut buf = raw.clone();
        assert_eq!(enc.encode_in_place(pb::Codec::Zstd, &mut buf), None);
        assert_eq!(buf, raw);
        assert_eq!(
            enc.encode(pb::Codec::Zstd, &[], &mut frame),
            pb::Codec::None
        );
    }

    #[test]
    fn decode_rejects_damage_without_panicking() {
        let raw = floats(10_000);
        let mut enc = Encoder::new(1).unwrap();
        let mut frame = Vec::new();
        let codec = enc.encode(pb::Codec::ZstdShuffle4, &raw, &mut frame);
        assert_eq!(codec, pb::Codec::ZstdShuffle4);
        let mut scratch = Vec::new();
        let mut out = vec![0; raw.len()];
        // Wrong raw length: refused from the header, before decompressing.
        let mut short = vec![0; raw.len() - 1];
        let e = decode(codec as i32, &frame, &mut short, &mut scratch).unwrap_err();
        assert!(e.contains("declares"), "{e}");
        // Every single-byte flip is an error or (never) the same bytes.
        for i in 0..frame.len() {
            let mut bad = frame.clone();
            bad[i] ^= 0x40;
            if decode(codec as i32, &bad, &mut out, &mut scratch).is_ok() {
                assert_eq!(out, raw, "flip at {i} decoded to other bytes");
            }
        }
        // Truncated, empty, garbage, unknown codec.
        assert!(decode(
            codec as i32,
            &frame[..frame.len() / 2],
            &mut out,
            &mut scratch
        )
        .is_err());
        assert!(decode(codec as i32, &[], &mut out, &mut scratch).is_err());
        assert!(decode(codec as i32, &[0xff; 64], &mut out, &mut scratch).is_err());
        assert!(decode(99, &frame, &mut out, &mut scratch).is_err());
    }

    #[test]
    fn codec_choice_by_dtype() {
        let z = Compression::zstd();
        assert_eq!(z.codec_for(Some(DType::BF16)), pb::Codec::ZstdShuffle2);
        assert_eq!(z.codec_for(Some(DType::F16)), pb::Codec::ZstdShuffle2);
        assert_eq!(z.codec_for(Some(DType::F32)), pb::Codec::ZstdShuffle4);
        assert_eq!(z.codec_for(Some(DType::F64)), pb::Codec::ZstdShuffle8);
        assert_eq!(z.codec_for(Some(DType::I32)), pb::Codec::Zstd);
        assert_eq!(z.codec_for(None), pb::Codec::Zstd);
        assert_eq!(
            Compression::None.codec_for(Some(DType::F32)),
            pb::Codec::None
        );
        assert!(Compression::Zstd { level: 99 }.validate().is_err());
        assert!(Compression::Zstd { level: 0 }.validate().is_err());
        assert!(Compression::zstd().validate().is_ok());
    }
}
