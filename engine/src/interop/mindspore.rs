//! MindSpore's `.ckpt` checkpoint format, read and written as `mindspore.save_checkpoint` and
//! `mindspore.load_checkpoint` (mindspore 2.10.0, `mindspore/train/serialization.py`) do:
//!
//! ```text
//! file    = value* [trailer]
//! value   = 0x0A varint(len) Value            one serialized `Checkpoint { repeated Value value = 1 }`
//! Value   = { tag: string = 1, tensor: TensorProto = 2 | maptensor: MapTensorProto = 3 }
//! Tensor  = { dims: repeated int64 = 1, tensor_type: string = 2, tensor_content: bytes = 3 }
//! trailer = "crc_num" + 10-byte big-endian CRC-32 (zlib's) of every byte before the trailer
//! ```
//!
//! (the schema is `proto/proto/mindspore_checkpoint.proto`). MindSpore writes one `Checkpoint`
//! message per value and concatenates them, which protobuf reads as one message with every
//! value in order. A tensor of more than 512 MiB is written as several values under the same
//! tag, each repeating the dims and type and holding the next slice of the row-major,
//! little-endian bytes; the reader joins consecutive values with the same tag. A file written
//! with `crc_check=True` ends in the trailer; MindSpore, and this reader, take the last 17
//! bytes as the trailer whenever they start with `crc_num`.
//!
//! Type strings are MindSpore's (`Float32`, `BFloat16`, `Int64`, `UInt8`, `Bool`, ...). `str`
//! values (MindSpore's `append_info` strings) hold the string as numpy's `U` array bytes:
//! UTF-32LE, dims `[0]`. MindSpore's loader reads dims `[0]` as a scalar; this reader does the
//! same when the content holds exactly one element.
//!
//! The reader streams: [`scan`] walks the framing and records where each value's content lies
//! without reading it (every length is checked against the enclosing message and the file
//! before anything is allocated or skipped; names, type strings and dims are capped), and
//! [`BodyReader`] + [`ContentReader`] then read the contents in file order with bounded
//! memory, computing the CRC on the way. The writer ([`ValueWriter`]) streams the same way.
//! Nothing here touches the file system; the CLI opens the external file.

use crate::manifest::{tensor_nbytes, DType};
use std::io::{Read, Seek, SeekFrom, Write};

/// The 7 bytes that open the CRC trailer.
pub const CRC_MAGIC: &[u8; 7] = b"crc_num";
/// Length of the CRC trailer: the magic and a 10-byte big-endian number.
pub const CRC_TRAILER_LEN: u64 = 17;
/// Longest value tag (parameter name) the reader accepts.
pub const MAX_TAG_LEN: u64 = 65_536;
/// Longest `tensor_type` string the reader accepts.
pub const MAX_TYPE_LEN: u64 = 64;
/// Most dims one tensor may have.
pub const MAX_DIMS: usize = 64;
/// Largest `str` value the reader accepts (its content is read into memory).
pub const MAX_STR_LEN: u64 = 16 << 20;
/// Most values (slices included) one file may hold.
pub const MAX_VALUES: usize = 1 << 20;
/// Most bytes of names, type strings and dims the index of one file may hold (a manifest
/// holding more could not be committed: it is one WAL record of at most 64 MiB).
pub const MAX_INDEX_BYTES: u64 = 64 << 20;
/// MindSpore's slice size: a tensor of more bytes is written as several values.
pub const DEFAULT_SLICE_BYTES: u64 = 512 << 20;
/// Skips at most this long are read and discarded rather than seeked over (a seek discards
/// a `BufReader`'s buffer).
const READ_SKIP_MAX: u64 = 64 << 10;

/// Why a `.ckpt` file was rejected (or could not be written).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// Reading or writing the file failed.
    #[error("{op} failed: {source}")]
    Io {
        /// `read`, `seek` or `write`.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A field's length (or a varint) runs past the end of its enclosing message or the file.
    #[error("truncated or corrupt: {what} at offset {at} needs {need} bytes, but only {left} remain in its {scope}")]
    Truncated {
        /// What was being read (`value`, `tensor_content`, `varint`, ...).
        what: &'static str,
        /// Byte offset in the file.
        at: u64,
        /// Bytes it needs.
        need: u64,
        /// Bytes left.
        left: u64,
        /// `file` or the enclosing message.
        scope: &'static str,
    },
    /// A varint longer than 10 bytes.
    #[error("corrupt: varint at offset {at} is longer than 10 bytes")]
    BadVarint {
        /// Byte offset in the file.
        at: u64,
    },
    /// A field key protobuf refuses (field 0, wire type 6 or 7, over 32 bits), or a field of
    /// a wire type the schema does not allow there.
    #[error("corrupt: field {field} of {message} at offset {at} has wire type {wire_type}")]
    BadWireType {
        /// The message being read.
        message: &'static str,
        /// Field number.
        field: u64,
        /// Wire type found.
        wire_type: u64,
        /// Byte offset of its key.
        at: u64,
    },
    /// A name, type string or `str` value longer than this reader's cap.
    #[error("{what} at offset {at} is {len} bytes, more than the {max}-byte cap")]
    TooLong {
        /// `tag`, `tensor_type` or `str value`.
        what: &'static str,
        /// Byte offset.
        at: u64,
        /// Its length.
        len: u64,
        /// The cap.
        max: u64,
    },
    /// A tensor with more than [`MAX_DIMS`] dims.
    #[error("value at offset {at} has more than {MAX_DIMS} dims")]
    TooManyDims {
        /// Byte offset of the tensor.
        at: u64,
    },
    /// More than [`MAX_VALUES`] values.
    #[error("more than {MAX_VALUES} values in one file")]
    TooManyValues,
    /// A required field is absent.
    #[error("value {name:?} at offset {at} has no {field}")]
    Missing {
        /// The value's tag (empty when the tag is what is missing).
        name: String,
        /// Byte offset of the value.
        at: u64,
        /// `tag`, `tensor`, `tensor_type` or `tensor_content`.
        field: &'static str,
    },
    /// A string field is not UTF-8.
    #[error("{what} at offset {at} is not valid UTF-8")]
    NotUtf8 {
        /// `tag`, `tensor_type` or `str value`.
        what: &'static str,
        /// Byte offset.
        at: u64,
    },
    /// A type string MindSpore does not write.
    #[error("tensor {name:?}: unknown tensor_type {dtype:?}")]
    UnknownDtype {
        /// Tensor name.
        name: String,
        /// The type string.
        dtype: String,
    },
    /// A value ckptstore cannot hold (a dtype it has no equivalent for, a MapParameter).
    #[error("value {name:?}: {what} cannot be imported: {why}")]
    Unsupported {
        /// The value's tag.
        name: String,
        /// What it is (`UInt16 tensor`, `MapParameter`).
        what: String,
        /// Why, and what to do.
        why: &'static str,
    },
    /// A negative dim.
    #[error("tensor {name:?}: negative dim in {dims:?}")]
    NegativeDim {
        /// Tensor name.
        name: String,
        /// The dims.
        dims: Vec<i64>,
    },
    /// Slices of one tensor disagree on dims or type.
    #[error("tensor {name:?}: slice at offset {at} has {found}, the first slice {first}")]
    SliceMismatch {
        /// Tensor name.
        name: String,
        /// Byte offset of the disagreeing value.
        at: u64,
        /// What the first slice says.
        first: String,
        /// What this one says.
        found: String,
    },
    /// Dims × dtype size differs from the content's length (summed over slices).
    #[error("tensor {name:?}: {what} needs {expected} bytes, its content holds {found}")]
    LengthMismatch {
        /// Tensor name.
        name: String,
        /// Its type string and dims (`Float32 [2, 3]`).
        what: String,
        /// Bytes the dims need (or `more than 2^64`).
        expected: String,
        /// Bytes of content.
        found: u64,
    },
    /// The same tag twice, not as consecutive slices.
    #[error("duplicate value {0:?} (not a slice of the value before it)")]
    DuplicateName(String),
    /// The trailer's number does not fit a CRC-32.
    #[error("corrupt CRC trailer: {value:#x} is not a CRC-32")]
    BadCrcTrailer {
        /// The number found.
        value: u128,
    },
    /// The CRC-32 of the file differs from its trailer.
    #[error("CRC mismatch: the trailer says {stored:#010x}, the file's bytes give {computed:#010x}; the file is damaged")]
    CrcMismatch {
        /// CRC-32 in the trailer.
        stored: u32,
        /// CRC-32 computed.
        computed: u32,
    },
    /// A `str` value that is not UTF-32LE.
    #[error("str value {name:?}: {len} bytes are not UTF-32LE text")]
    BadStr {
        /// The value's tag.
        name: String,
        /// Its length.
        len: u64,
    },
}

fn io_err(op: &'static str) -> impl FnOnce(std::io::Error) -> FormatError {
    move |source| FormatError::Io { op, source }
}

// ---------------------------------------------------------------- CRC-32 (zlib's, reflected)

const fn crc_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut s = 1;
        while s < 8 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xFF) as usize];
            s += 1;
        }
        i += 1;
    }
    t
}

static CRC_TABLES: [[u32; 256]; 8] = crc_tables();

/// CRC-32 as zlib and Python's `binascii.crc32` compute it, fed incrementally.
#[derive(Debug, Clone, Copy, Default)]
pub struct Crc32(u32);

impl Crc32 {
    /// A fresh CRC (of no bytes: 0).
    pub fn new() -> Self {
        Crc32(0)
    }

    /// Feeds `data`.
    pub fn update(&mut self, data: &[u8]) {
        let t = &CRC_TABLES;
        let mut c = !self.0;
        let mut chunks = data.chunks_exact(8);
        for b in &mut chunks {
            let lo = c ^ u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            c = t[7][(lo & 0xFF) as usize]
                ^ t[6][((lo >> 8) & 0xFF) as usize]
                ^ t[5][((lo >> 16) & 0xFF) as usize]
                ^ t[4][(lo >> 24) as usize]
                ^ t[3][b[4] as usize]
                ^ t[2][b[5] as usize]
                ^ t[1][b[6] as usize]
                ^ t[0][b[7] as usize];
        }
        for &b in chunks.remainder() {
            c = t[0][((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8);
        }
        self.0 = !c;
    }

    /// The CRC of everything fed so far.
    pub fn value(&self) -> u32 {
        self.0
    }
}

/// The 17-byte trailer MindSpore's `crc_check=True` appends.
pub fn crc_trailer(crc: u32) -> [u8; CRC_TRAILER_LEN as usize] {
    let mut t = [0u8; CRC_TRAILER_LEN as usize];
    t[..7].copy_from_slice(CRC_MAGIC);
    t[13..].copy_from_slice(&crc.to_be_bytes());
    t
}

// ---------------------------------------------------------------- dtypes

/// MindSpore's type string of a ckptstore dtype, or `None` for the float8 types: MindSpore
/// 2.10 writes `Float8E4M3FN`/`Float8E5M2` but its `load_checkpoint` cannot read them, so the
/// export refuses them rather than write a file MindSpore fails on.
pub fn dtype_name(d: DType) -> Option<&'static str> {
    Some(match d {
        DType::F64 => "Float64",
        DType::F32 => "Float32",
        DType::F16 => "Float16",
        DType::BF16 => "BFloat16",
        DType::I64 => "Int64",
        DType::I32 => "Int32",
        DType::I16 => "Int16",
        DType::I8 => "Int8",
        DType::U8 => "UInt8",
        DType::Bool => "Bool",
        DType::F8E4M3 | DType::F8E5M2 => return None,
    })
}

/// What a `tensor_type` string means here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// A tensor of this dtype.
    Tensor(DType),
    /// An `append_info` string (`str`).
    Str,
}

/// Parses a `tensor_type`. `Err(Some(why))`: a MindSpore type ckptstore cannot hold;
/// `Err(None)`: a string MindSpore does not write.
pub fn parse_dtype(s: &str) -> Result<ValueKind, Option<&'static str>> {
    Ok(ValueKind::Tensor(match s {
        "Float64" => DType::F64,
        "Float32" => DType::F32,
        "Float16" => DType::F16,
        "BFloat16" => DType::BF16,
        "Float8E4M3FN" => DType::F8E4M3,
        "Float8E5M2" => DType::F8E5M2,
        "Int64" => DType::I64,
        "Int32" => DType::I32,
        "Int16" => DType::I16,
        "Int8" => DType::I8,
        "UInt8" => DType::U8,
        "Bool" => DType::Bool,
        "str" => return Ok(ValueKind::Str),
        "UInt16" | "UInt32" | "UInt64" => {
            return Err(Some(
                "ckptstore has no unsigned integer dtype wider than 8 bits; convert it \
                 (e.g. to Int32/Int64) in MindSpore before saving",
            ))
        }
        "Int4" => {
            return Err(Some(
                "ckptstore has no packed 4-bit dtype (MindSpore's qint4x2)",
            ))
        }
        "HiFloat8" | "Complex64" | "Complex128" => {
            return Err(Some("ckptstore has no equivalent dtype"))
        }
        _ => return Err(None),
    }))
}

// ---------------------------------------------------------------- reading: the index

/// One parameter of a `.ckpt` file: a tag and its content, joined over its slices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The tag (parameter name).
    pub name: String,
    /// Its `tensor_type` string.
    pub type_name: String,
    /// What it is.
    pub kind: ValueKind,
    /// Dims as written.
    pub dims: Vec<i64>,
    /// The shape it is imported with (dims `[0]` holding one element is a scalar, as
    /// MindSpore's loader reads it; empty for a `str`).
    pub shape: Vec<u64>,
    /// `(file offset, length)` of each slice's content, in file order.
    pub slices: Vec<(u64, u64)>,
    /// Total content bytes.
    pub nbytes: u64,
    /// File offset of its first value.
    pub at: u64,
}

/// What [`scan`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    /// Every parameter in file order.
    pub entries: Vec<Entry>,
    /// File length.
    pub file_len: u64,
    /// Bytes before the CRC trailer (the whole file when there is none).
    pub body_len: u64,
    /// The CRC-32 the trailer holds.
    pub crc: Option<u32>,
}

/// Reads framing: a position-tracking reader over `[.., end)` windows.
struct Wire<'r, R> {
    r: &'r mut R,
    pos: u64,
}

impl<R: Read + Seek> Wire<'_, R> {
    fn need(
        &self,
        what: &'static str,
        need: u64,
        end: u64,
        scope: &'static str,
    ) -> Result<(), FormatError> {
        let left = end.saturating_sub(self.pos);
        if need > left {
            return Err(FormatError::Truncated {
                what,
                at: self.pos,
                need,
                left,
                scope,
            });
        }
        Ok(())
    }

    fn byte(&mut self, end: u64, scope: &'static str) -> Result<u8, FormatError> {
        self.need("varint", 1, end, scope)?;
        let mut b = [0u8; 1];
        self.r.read_exact(&mut b).map_err(io_err("read"))?;
        self.pos += 1;
        Ok(b[0])
    }

    fn varint(&mut self, end: u64, scope: &'static str) -> Result<u64, FormatError> {
        let at = self.pos;
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.byte(end, scope)?;
            if i == 9 && b > 1 {
                break; // bits past 64
            }
            v |= u64::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(FormatError::BadVarint { at })
    }

    /// A field key: `(field number, wire type)`, refused as protobuf refuses it (a key over
    /// 32 bits, field number 0, wire type 6 or 7).
    fn key(
        &mut self,
        message: &'static str,
        end: u64,
        scope: &'static str,
    ) -> Result<(u64, u64), FormatError> {
        let at = self.pos;
        let key = self.varint(end, scope)?;
        let (field, wire_type) = (key >> 3, key & 7);
        if key > u64::from(u32::MAX) || field == 0 || wire_type > 5 {
            return Err(FormatError::BadWireType {
                message,
                field,
                wire_type,
                at,
            });
        }
        Ok((field, wire_type))
    }

    /// A length-delimited field's length, checked against `end`.
    fn len(
        &mut self,
        what: &'static str,
        end: u64,
        scope: &'static str,
    ) -> Result<u64, FormatError> {
        let len = self.varint(end, scope)?;
        self.need(what, len, end, scope)?;
        Ok(len)
    }

    fn bytes(&mut self, len: u64) -> Result<Vec<u8>, FormatError> {
        // `len` was checked against the file by `len` (and against a cap by the caller).
        let mut v = vec![0u8; len as usize];
        self.r.read_exact(&mut v).map_err(io_err("read"))?;
        self.pos += len;
        Ok(v)
    }

    fn string(&mut self, what: &'static str, len: u64, max: u64) -> Result<String, FormatError> {
        let at = self.pos;
        if len > max {
            return Err(FormatError::TooLong { what, at, len, max });
        }
        String::from_utf8(self.bytes(len)?).map_err(|_| FormatError::NotUtf8 { what, at })
    }

    fn skip(&mut self, len: u64) -> Result<(), FormatError> {
        if len <= READ_SKIP_MAX {
            let n = std::io::copy(&mut (&mut *self.r).take(len), &mut std::io::sink())
                .map_err(io_err("read"))?;
            if n != len {
                return Err(io_err("read")(std::io::ErrorKind::UnexpectedEof.into()));
            }
        } else {
            self.r
                .seek(SeekFrom::Start(self.pos + len))
                .map_err(io_err("seek"))?;
        }
        self.pos += len;
        Ok(())
    }

    /// Skips an unknown field of wire type `wt`.
    fn skip_field(
        &mut self,
        message: &'static str,
        field: u64,
        wt: u64,
        at: u64,
        end: u64,
        scope: &'static str,
    ) -> Result<(), FormatError> {
        match wt {
            0 => {
                self.varint(end, scope)?;
            }
            1 => {
                self.need("fixed64", 8, end, scope)?;
                self.skip(8)?;
            }
            2 => {
                let len = self.len("field", end, scope)?;
                self.skip(len)?;
            }
            5 => {
                self.need("fixed32", 4, end, scope)?;
                self.skip(4)?;
            }
            _ => {
                return Err(FormatError::BadWireType {
                    message,
                    field,
                    wire_type: wt,
                    at,
                })
            }
        }
        Ok(())
    }
}

/// A `TensorProto` as read, fields merged as protobuf merges repeated occurrences.
#[derive(Default)]
struct RawTensor {
    dims: Vec<i64>,
    tensor_type: Option<String>,
    content: Option<(u64, u64)>,
}

enum RawValue {
    Tensor(RawTensor),
    Map,
}

fn read_tensor<R: Read + Seek>(
    w: &mut Wire<'_, R>,
    t: &mut RawTensor,
    end: u64,
) -> Result<(), FormatError> {
    const SCOPE: &str = "TensorProto";
    let start = w.pos;
    let dim = |t: &mut RawTensor, v: u64| {
        if t.dims.len() == MAX_DIMS {
            return Err(FormatError::TooManyDims { at: start });
        }
        t.dims.push(v as i64);
        Ok(())
    };
    while w.pos < end {
        let at = w.pos;
        match w.key(SCOPE, end, SCOPE)? {
            (1, 0) => {
                let v = w.varint(end, SCOPE)?;
                dim(t, v)?;
            }
            (1, 2) => {
                let len = w.len("packed dims", end, SCOPE)?;
                let packed_end = w.pos + len;
                while w.pos < packed_end {
                    let v = w.varint(packed_end, "packed dims")?;
                    dim(t, v)?;
                }
            }
            (2, 2) => {
                let len = w.len("tensor_type", end, SCOPE)?;
                t.tensor_type = Some(w.string("tensor_type", len, MAX_TYPE_LEN)?);
            }
            (3, 2) => {
                let len = w.len("tensor_content", end, SCOPE)?;
                t.content = Some((w.pos, len));
                w.skip(len)?;
            }
            (f @ 1..=3, wt) => {
                return Err(FormatError::BadWireType {
                    message: SCOPE,
                    field: f,
                    wire_type: wt,
                    at,
                })
            }
            (f, wt) => w.skip_field(SCOPE, f, wt, at, end, SCOPE)?,
        }
    }
    Ok(())
}

/// Walks a `MapTensorProto` spanning `[w.pos, end)` (its tensors' framing checked, contents
/// skipped).
fn read_map_tensor<R: Read + Seek>(w: &mut Wire<'_, R>, end: u64) -> Result<(), FormatError> {
    const SCOPE: &str = "MapTensorProto";
    while w.pos < end {
        let at = w.pos;
        match w.key(SCOPE, end, SCOPE)? {
            (1, 2) => {
                let len = w.len("tensor", end, SCOPE)?;
                let tensor_end = w.pos + len;
                read_tensor(w, &mut RawTensor::default(), tensor_end)?;
            }
            (1, wt) => {
                return Err(FormatError::BadWireType {
                    message: SCOPE,
                    field: 1,
                    wire_type: wt,
                    at,
                })
            }
            (f, wt) => w.skip_field(SCOPE, f, wt, at, end, SCOPE)?,
        }
    }
    Ok(())
}

/// Reads one `Checkpoint.Value` spanning `[w.pos, end)`: its tag and tensor.
fn read_value<R: Read + Seek>(
    w: &mut Wire<'_, R>,
    end: u64,
) -> Result<(Option<String>, Option<RawValue>), FormatError> {
    const SCOPE: &str = "Value";
    let mut tag = None;
    let mut value = None;
    while w.pos < end {
        let at = w.pos;
        match w.key(SCOPE, end, SCOPE)? {
            (1, 2) => {
                let len = w.len("tag", end, SCOPE)?;
                tag = Some(w.string("tag", len, MAX_TAG_LEN)?);
            }
            (2, 2) => {
                let len = w.len("tensor", end, SCOPE)?;
                if !matches!(value, Some(RawValue::Tensor(_))) {
                    value = Some(RawValue::Tensor(RawTensor::default()));
                }
                let Some(RawValue::Tensor(t)) = &mut value else {
                    unreachable!("just set")
                };
                let tensor_end = w.pos + len;
                read_tensor(w, t, tensor_end)?;
            }
            (3, 2) => {
                let len = w.len("maptensor", end, SCOPE)?;
                // Refused at the end unless a later tensor field replaces it (a oneof);
                // parsed anyway, so that a file read here is one protobuf reads.
                let map_end = w.pos + len;
                read_map_tensor(w, map_end)?;
                value = Some(RawValue::Map);
            }
            (f @ 1..=3, wt) => {
                return Err(FormatError::BadWireType {
                    message: SCOPE,
                    field: f,
                    wire_type: wt,
                    at,
                })
            }
            (f, wt) => w.skip_field(SCOPE, f, wt, at, end, SCOPE)?,
        }
    }
    Ok((tag, value))
}

/// The shape an entry is imported with, and the bytes it needs (`None`: more than 2^64).
fn shape_of(
    name: &str,
    kind: ValueKind,
    dims: &[i64],
    nbytes: u64,
) -> Result<(Vec<u64>, Option<u64>), FormatError> {
    let ValueKind::Tensor(dtype) = kind else {
        return Ok((Vec::new(), Some(nbytes)));
    };
    if dims.iter().any(|&d| d < 0) {
        return Err(FormatError::NegativeDim {
            name: name.to_owned(),
            dims: dims.to_vec(),
        });
    }
    let mut shape: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
    if shape == [0] && nbytes == dtype.size() as u64 {
        shape.clear(); // MindSpore's loader: dims [0] is a scalar
    }
    let need = tensor_nbytes(dtype, &shape);
    Ok((shape, need))
}

/// Walks the framing of a `.ckpt` file from its start and returns every parameter, without
/// reading tensor contents. Checks every length against its enclosing message and the file,
/// the required fields, dtypes, that slices of one tag agree, that dims × dtype size equals
/// the content length, and the CRC trailer's form (not its value: that needs every byte, see
/// [`BodyReader`]).
pub fn scan<R: Read + Seek>(r: &mut R) -> Result<Index, FormatError> {
    let file_len = r.seek(SeekFrom::End(0)).map_err(io_err("seek"))?;
    let (mut body_len, mut crc) = (file_len, None);
    if file_len >= CRC_TRAILER_LEN {
        r.seek(SeekFrom::Start(file_len - CRC_TRAILER_LEN))
            .map_err(io_err("seek"))?;
        let mut t = [0u8; CRC_TRAILER_LEN as usize];
        r.read_exact(&mut t).map_err(io_err("read"))?;
        if &t[..7] == CRC_MAGIC {
            let mut v = [0u8; 16];
            v[6..].copy_from_slice(&t[7..]);
            let value = u128::from_be_bytes(v);
            crc = Some(u32::try_from(value).map_err(|_| FormatError::BadCrcTrailer { value })?);
            body_len = file_len - CRC_TRAILER_LEN;
        }
    }
    r.seek(SeekFrom::Start(0)).map_err(io_err("seek"))?;
    let mut w = Wire { r, pos: 0 };
    let mut entries: Vec<Entry> = Vec::new();
    let mut values = 0usize;
    let mut seen = std::collections::HashSet::new();
    let mut index_bytes = 0u64;
    while w.pos < body_len {
        let at = w.pos;
        let (field, wt) = w.key("Checkpoint", body_len, "file")?;
        if field != 1 {
            w.skip_field("Checkpoint", field, wt, at, body_len, "file")?;
            continue;
        }
        if wt != 2 {
            return Err(FormatError::BadWireType {
                message: "Checkpoint",
                field,
                wire_type: wt,
                at,
            });
        }
        let len = w.len("value", body_len, "file")?;
        values += 1;
        if values > MAX_VALUES {
            return Err(FormatError::TooManyValues);
        }
        let end = w.pos + len;
        let (tag, value) = read_value(&mut w, end)?;
        let missing = |name: &str, field| FormatError::Missing {
            name: name.to_owned(),
            at,
            field,
        };
        let name = tag.ok_or_else(|| missing("", "tag"))?;
        let t = match value {
            None => return Err(missing(&name, "tensor")),
            Some(RawValue::Map) => {
                return Err(FormatError::Unsupported {
                    name,
                    what: "MapParameter (maptensor)".into(),
                    why: "ckptstore stores dense tensors only",
                })
            }
            Some(RawValue::Tensor(t)) => t,
        };
        let type_name = t.tensor_type.ok_or_else(|| missing(&name, "tensor_type"))?;
        let (off, clen) = t.content.ok_or_else(|| missing(&name, "tensor_content"))?;
        if let Some(last) = entries.last_mut().filter(|e| e.name == name) {
            if last.type_name != type_name || last.dims != t.dims {
                return Err(FormatError::SliceMismatch {
                    name,
                    at,
                    first: format!("{} {:?}", last.type_name, last.dims),
                    found: format!("{type_name} {:?}", t.dims),
                });
            }
            last.slices.push((off, clen));
            last.nbytes += clen; // sum ≤ file length
            continue;
        }
        if !seen.insert(name.clone()) {
            return Err(FormatError::DuplicateName(name));
        }
        index_bytes += (2 * name.len() + type_name.len() + 8 * t.dims.len()) as u64;
        if index_bytes > MAX_INDEX_BYTES {
            return Err(FormatError::TooLong {
                what: "the index (names, types, dims)",
                at,
                len: index_bytes,
                max: MAX_INDEX_BYTES,
            });
        }
        let kind = parse_dtype(&type_name).map_err(|why| match why {
            Some(why) => FormatError::Unsupported {
                name: name.clone(),
                what: format!("{type_name} tensor"),
                why,
            },
            None => FormatError::UnknownDtype {
                name: name.clone(),
                dtype: type_name.clone(),
            },
        })?;
        entries.push(Entry {
            name,
            type_name,
            kind,
            dims: t.dims,
            shape: Vec::new(),
            slices: vec![(off, clen)],
            nbytes: clen,
            at,
        });
    }
    for e in &mut entries {
        let (shape, need) = shape_of(&e.name, e.kind, &e.dims, e.nbytes)?;
        match e.kind {
            ValueKind::Str if e.nbytes > MAX_STR_LEN => {
                return Err(FormatError::TooLong {
                    what: "str value",
                    at: e.at,
                    len: e.nbytes,
                    max: MAX_STR_LEN,
                })
            }
            ValueKind::Str if !e.nbytes.is_multiple_of(4) => {
                return Err(FormatError::BadStr {
                    name: e.name.clone(),
                    len: e.nbytes,
                })
            }
            _ => {}
        }
        if need != Some(e.nbytes) {
            return Err(FormatError::LengthMismatch {
                name: e.name.clone(),
                what: format!("{} {:?}", e.type_name, e.dims),
                expected: need.map_or_else(|| "more than 2^64".to_owned(), |n| n.to_string()),
                found: e.nbytes,
            });
        }
        e.shape = shape;
    }
    Ok(Index {
        entries,
        file_len,
        body_len,
        crc,
    })
}

/// Reads an entry's whole content into memory (`str` values, step/epoch scalars: small, as
/// their callers check). Seeks; use before or after a [`BodyReader`] pass, not during one.
pub fn read_entry<R: Read + Seek>(r: &mut R, e: &Entry) -> Result<Vec<u8>, FormatError> {
    let mut out = Vec::with_capacity(e.nbytes as usize);
    for &(off, len) in &e.slices {
        r.seek(SeekFrom::Start(off)).map_err(io_err("seek"))?;
        let n = (&mut *r)
            .take(len)
            .read_to_end(&mut out)
            .map_err(io_err("read"))?;
        if n as u64 != len {
            return Err(io_err("read")(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
    Ok(out)
}

/// Decodes a `str` value: numpy `U` bytes (UTF-32LE), trailing NULs dropped as numpy does.
pub fn decode_str(name: &str, bytes: &[u8]) -> Result<String, FormatError> {
    let bad = || FormatError::BadStr {
        name: name.to_owned(),
        len: bytes.len() as u64,
    };
    if !bytes.len().is_multiple_of(4) {
        return Err(bad());
    }
    let s: String = bytes
        .chunks_exact(4)
        .map(|c| char::from_u32(u32::from_le_bytes([c[0], c[1], c[2], c[3]])).ok_or_else(bad))
        .collect::<Result<_, _>>()?;
    Ok(s.trim_end_matches('\0').to_owned())
}

// ---------------------------------------------------------------- reading: contents, streamed

/// Reads the file's body (everything before the trailer) once, front to back, computing its
/// CRC-32 when the file has a trailer; [`ContentReader`]s borrow it to stream one entry each.
pub struct BodyReader<'r, R> {
    r: &'r mut R,
    pos: u64,
    body_len: u64,
    stored: Option<u32>,
    crc: Crc32,
}

impl<'r, R: Read + Seek> BodyReader<'r, R> {
    /// Starts at the file's first byte.
    pub fn new(r: &'r mut R, index: &Index) -> Result<Self, FormatError> {
        r.seek(SeekFrom::Start(0)).map_err(io_err("seek"))?;
        Ok(BodyReader {
            r,
            pos: 0,
            body_len: index.body_len,
            stored: index.crc,
            crc: Crc32::new(),
        })
    }

    fn read_some(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.r.read(buf)?;
        if n == 0 && !buf.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "file ended at offset {} (it changed while being read?)",
                    self.pos
                ),
            ));
        }
        if self.stored.is_some() {
            self.crc.update(&buf[..n]);
        }
        self.pos += n as u64;
        Ok(n)
    }

    /// Reads and discards up to offset `to` (framing between contents, skipped entries).
    pub fn skip_to(&mut self, to: u64) -> Result<(), FormatError> {
        let mut buf = [0u8; 8192];
        while self.pos < to {
            let n = ((to - self.pos) as usize).min(buf.len());
            self.read_some(&mut buf[..n]).map_err(io_err("read"))?;
        }
        Ok(())
    }

    /// A reader of `e`'s content, slices joined.
    pub fn content<'b>(&'b mut self, e: &'b Entry) -> ContentReader<'b, 'r, R> {
        ContentReader {
            body: self,
            slices: &e.slices,
            next: 0,
            left: 0,
        }
    }

    /// Reads the rest of the body and checks the CRC when the file has one.
    pub fn finish(mut self) -> Result<(), FormatError> {
        self.skip_to(self.body_len)?;
        match self.stored {
            Some(stored) if stored != self.crc.value() => Err(FormatError::CrcMismatch {
                stored,
                computed: self.crc.value(),
            }),
            _ => Ok(()),
        }
    }
}

/// One entry's content, read through its [`BodyReader`]: `Read` yields exactly the entry's
/// bytes, slice after slice.
pub struct ContentReader<'b, 'r, R> {
    body: &'b mut BodyReader<'r, R>,
    slices: &'b [(u64, u64)],
    next: usize,
    left: u64,
}

impl<R: Read + Seek> Read for ContentReader<'_, '_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.left == 0 {
            let Some(&(off, len)) = self.slices.get(self.next) else {
                return Ok(0);
            };
            self.next += 1;
            self.body.skip_to(off).map_err(|e| match e {
                FormatError::Io { source, .. } => source,
                other => std::io::Error::other(other.to_string()),
            })?;
            self.left = len;
        }
        let n = (buf.len() as u64).min(self.left) as usize;
        let n = self.body.read_some(&mut buf[..n])?;
        self.left -= n as u64;
        Ok(n)
    }
}

// ---------------------------------------------------------------- writing

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u64) -> u64 {
    (64 - v.max(1).leading_zeros() as u64).div_ceil(7)
}

/// Writes a `.ckpt` file value by value, as MindSpore's `save_checkpoint` does (dims as
/// unpacked varints, one `Checkpoint` message per value, a tensor over `slice_bytes` as
/// several values), computing the CRC-32 for the optional trailer.
pub struct ValueWriter<'w, W> {
    out: &'w mut W,
    crc: Crc32,
    written: u64,
    slice_bytes: u64,
}

impl<'w, W: Write> ValueWriter<'w, W> {
    /// A writer cutting tensors into slices of at most `slice_bytes` (MindSpore:
    /// [`DEFAULT_SLICE_BYTES`]).
    pub fn new(out: &'w mut W, slice_bytes: u64) -> Self {
        ValueWriter {
            out,
            crc: Crc32::new(),
            written: 0,
            slice_bytes: slice_bytes.max(1),
        }
    }

    fn raw(&mut self, b: &[u8]) -> Result<(), FormatError> {
        self.out.write_all(b).map_err(io_err("write"))?;
        self.crc.update(b);
        self.written += b.len() as u64;
        Ok(())
    }

    /// Writes one value: tag, dims, type and `content` (one slice).
    fn value(
        &mut self,
        tag: &str,
        dims: &[i64],
        type_name: &str,
        content: &[u8],
    ) -> Result<(), FormatError> {
        let mut tensor_head = Vec::with_capacity(32 + type_name.len());
        for &d in dims {
            tensor_head.push(0x08);
            put_varint(&mut tensor_head, d as u64);
        }
        tensor_head.push(0x12);
        put_varint(&mut tensor_head, type_name.len() as u64);
        tensor_head.extend_from_slice(type_name.as_bytes());
        tensor_head.push(0x1A);
        put_varint(&mut tensor_head, content.len() as u64);
        let tensor_len = tensor_head.len() as u64 + content.len() as u64;
        let value_len = 1
            + varint_len(tag.len() as u64)
            + tag.len() as u64
            + 1
            + varint_len(tensor_len)
            + tensor_len;
        let mut head = Vec::with_capacity(tensor_head.len() + tag.len() + 24);
        head.push(0x0A);
        put_varint(&mut head, value_len);
        head.push(0x0A);
        put_varint(&mut head, tag.len() as u64);
        head.extend_from_slice(tag.as_bytes());
        head.push(0x12);
        put_varint(&mut head, tensor_len);
        head.extend_from_slice(&tensor_head);
        self.raw(&head)?;
        self.raw(content)
    }

    /// Writes a tensor (one value per slice; one empty value for an empty tensor).
    pub fn tensor(
        &mut self,
        tag: &str,
        dims: &[i64],
        type_name: &str,
        data: &[u8],
    ) -> Result<(), FormatError> {
        if data.is_empty() {
            return self.value(tag, dims, type_name, data);
        }
        for slice in data.chunks(self.slice_bytes.min(usize::MAX as u64) as usize) {
            self.value(tag, dims, type_name, slice)?;
        }
        Ok(())
    }

    /// Writes a `str` value as MindSpore does (dims `[0]`, UTF-32LE).
    pub fn str_value(&mut self, tag: &str, s: &str) -> Result<(), FormatError> {
        let bytes: Vec<u8> = s.chars().flat_map(|c| (c as u32).to_le_bytes()).collect();
        self.value(tag, &[0], "str", &bytes)
    }

    /// Ends the file: appends the CRC trailer when `crc` is set, flushes. Returns the bytes
    /// written.
    pub fn finish(self, crc: bool) -> Result<u64, FormatError> {
        let mut written = self.written;
        if crc {
            let t = crc_trailer(self.crc.value());
            self.out.write_all(&t).map_err(io_err("write"))?;
            written += t.len() as u64;
        }
        self.out.flush().map_err(io_err("write"))?;
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn crc32_matches_zlib() {
        // zlib.crc32(b"123456789") == 0xCBF43926, the CRC-32 check value.
        let mut c = Crc32::new();
        c.update(b"1234");
        c.update(b"56789");
        assert_eq!(c.value(), 0xCBF4_3926);
        let mut c = Crc32::new();
        c.update(&[0u8; 1000]);
        assert_eq!(c.value(), 0x060B_1780); // zlib.crc32(bytes(1000))
    }

    #[test]
    fn golden_bytes_of_a_value() {
        // What mindspore 2.10 writes for save_checkpoint([{"name": "bf", "data":
        // Tensor([1.0, -2.5], bfloat16)}], crc_check=True).
        let golden = b"\n\x18\n\x02bf\x12\x12\x08\x02\x12\x08BFloat16\x1a\x04\x80? \xc0crc_num\x00\x00\x00\x00\x00\x00}\r&\x10";
        let mut out = Vec::new();
        let mut w = ValueWriter::new(&mut out, DEFAULT_SLICE_BYTES);
        w.tensor("bf", &[2], "BFloat16", &[0x80, 0x3F, 0x20, 0xC0])
            .unwrap();
        assert_eq!(w.finish(true).unwrap(), golden.len() as u64);
        assert_eq!(&out[..], &golden[..]);
        let idx = scan(&mut Cursor::new(&out)).unwrap();
        assert_eq!(idx.crc, Some(0x7D0D_2610));
        assert_eq!(idx.entries[0].kind, ValueKind::Tensor(DType::BF16));
        assert_eq!(idx.entries[0].slices, vec![(22, 4)]);
    }

    #[test]
    fn str_values_round_trip() {
        let mut out = Vec::new();
        let mut w = ValueWriter::new(&mut out, 3);
        w.str_value("note", "héllo ✓").unwrap();
        w.tensor("t", &[5], "UInt8", &[1, 2, 3, 4, 5]).unwrap();
        w.finish(false).unwrap();
        let mut c = Cursor::new(out);
        let idx = scan(&mut c).unwrap();
        assert_eq!(idx.entries.len(), 2);
        assert_eq!(idx.entries[1].slices.len(), 2, "5 bytes in slices of 3");
        let s = read_entry(&mut c, &idx.entries[0]).unwrap();
        assert_eq!(decode_str("note", &s).unwrap(), "héllo ✓");
        let mut body = BodyReader::new(&mut c, &idx).unwrap();
        let mut got = Vec::new();
        body.content(&idx.entries[1]).read_to_end(&mut got).unwrap();
        assert_eq!(got, [1, 2, 3, 4, 5]);
        body.finish().unwrap();
    }

    #[test]
    fn varint_len_agrees_with_put_varint() {
        for v in [0, 1, 127, 128, 16_383, 16_384, u32::MAX as u64, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(b.len() as u64, varint_len(v), "{v}");
        }
    }
}
