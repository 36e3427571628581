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

mod dtypes;
mod reader;
mod wire;
mod writer;

pub use dtypes::{dtype_name, ValueKind};
pub use reader::{decode_str, read_entry, scan, BodyReader, ContentReader, Entry, Index};
pub use wire::Crc32;
pub use writer::ValueWriter;

use crate::interop::IoFailure;

/// The 7 bytes that open the CRC trailer.
pub(crate) const CRC_MAGIC: &[u8; 7] = b"crc_num";
/// Length of the CRC trailer: the magic and a 10-byte big-endian number.
pub(crate) const CRC_TRAILER_LEN: u64 = 17;
/// Longest value tag (parameter name) the reader accepts.
pub const MAX_TAG_LEN: u64 = 65_536;
/// Longest `tensor_type` string the reader accepts.
pub(crate) const MAX_TYPE_LEN: u64 = 64;
/// Most dims one tensor may have.
pub(crate) const MAX_DIMS: usize = 64;
/// Largest `str` value the reader accepts (its content is read into memory).
pub(crate) const MAX_STR_LEN: u64 = 16 << 20;
/// Most values (slices included) one file may hold.
pub(crate) const MAX_VALUES: usize = 1 << 20;
/// Most bytes of names, type strings and dims the index of one file may hold (a manifest
/// holding more could not be committed: it is one WAL record of at most 64 MiB).
pub(crate) const MAX_INDEX_BYTES: u64 = 64 << 20;
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
    #[error(transparent)]
    Io(#[from] IoFailure),
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

/// A field of wire type `wire_type` where `message` allows no such field (or no such key).
fn bad_wire_type(message: &'static str, field: u64, wire_type: u64, at: u64) -> FormatError {
    FormatError::BadWireType {
        message,
        field,
        wire_type,
        at,
    }
}

/// `op`'s OS error as this format's error.
fn io_err(op: &'static str) -> impl FnOnce(std::io::Error) -> FormatError {
    crate::interop::io_failure::io_err(op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use std::io::{Cursor, Read};

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
}
