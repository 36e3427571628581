//! The safetensors file format, read and written from its specification
//! (<https://github.com/huggingface/safetensors>, "Format"):
//!
//! ```text
//! [8 bytes: N, little-endian u64][N bytes: JSON header][byte buffer]
//! header = {"TENSOR": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...,
//!           "__metadata__": {"key": "value", ...}}            (metadata optional, str → str)
//! ```
//!
//! Offsets are relative to the start of the byte buffer; tensors are row-major, little-endian,
//! and cover the buffer exactly (no gap, no overlap, nothing after the last one). The header may
//! be padded with spaces so that the buffer starts 8-byte aligned; this writer pads that way, as
//! the reference implementation does.
//!
//! Nothing here touches the file system: the reader works on any `Read + Seek` and the writer
//! on any `Write`, so the engine's rule (only `io` touches the *store's* files) holds and the
//! CLI chooses how to open the external file.
//!
//! Every malformed input is a [`FormatError`], never a panic and never an allocation sized by
//! an unchecked length: the header length is checked against the file and [`MAX_HEADER_LEN`]
//! before its buffer is allocated, and every tensor's offsets are checked against the file
//! before any tensor is read.

use super::IoFailure;
use crate::dtype::DType;
use crate::manifest::tensor_nbytes;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Seek, SeekFrom, Write};

/// Largest JSON header this reader accepts (the reference implementation's cap, 100 MB).
pub(crate) const MAX_HEADER_LEN: u64 = 100_000_000;

/// The reserved header key that holds the string → string metadata.
pub(crate) const METADATA_KEY: &str = "__metadata__";

/// Why a safetensors file was rejected (or could not be written).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// Reading or writing the file failed.
    #[error(transparent)]
    Io(#[from] IoFailure),
    /// The file is shorter than the 8-byte length prefix.
    #[error("file is {len} bytes, shorter than the 8-byte header length")]
    TooShort {
        /// File length.
        len: u64,
    },
    /// The header length prefix points past the end of the file.
    #[error("header length {header_len} goes beyond the end of the file ({file_len} bytes)")]
    HeaderBeyondFile {
        /// The declared header length.
        header_len: u64,
        /// File length.
        file_len: u64,
    },
    /// The header length prefix is larger than [`MAX_HEADER_LEN`].
    #[error("header length {header_len} exceeds the {MAX_HEADER_LEN}-byte cap")]
    HeaderTooLarge {
        /// The declared header length.
        header_len: u64,
    },
    /// The header is not valid JSON (or not UTF-8).
    #[error("header is not valid JSON: {0}")]
    InvalidJson(String),
    /// The header is JSON but not of the expected shape.
    #[error("header entry {name:?}: {reason}")]
    BadEntry {
        /// The entry (tensor name, or `__metadata__`).
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor has a dtype this build does not know or ckptstore cannot store.
    #[error("tensor {name:?}: unknown or unsupported dtype {dtype:?}")]
    UnknownDtype {
        /// Tensor name.
        name: String,
        /// The dtype string found.
        dtype: String,
    },
    /// The same name appears twice in the header.
    #[error("duplicate tensor name {0:?} in the header")]
    DuplicateName(String),
    /// A tensor's shape × dtype size differs from the length its offsets give.
    #[error("tensor {name:?}: {dtype} × {shape:?} needs {expected} bytes, its data_offsets give {found}")]
    LengthMismatch {
        /// Tensor name.
        name: String,
        /// Its dtype.
        dtype: DType,
        /// Its shape.
        shape: Vec<u64>,
        /// Bytes the shape needs (`None`: it overflows u64).
        expected: String,
        /// `end - begin`.
        found: u64,
    },
    /// A tensor's offsets are reversed or reach past the end of the buffer.
    #[error("tensor {name:?}: data_offsets [{begin}, {end}] out of range (buffer is {buffer_len} bytes)")]
    OffsetsOutOfRange {
        /// Tensor name.
        name: String,
        /// Start.
        begin: u64,
        /// End.
        end: u64,
        /// Buffer length (file length − 8 − header length).
        buffer_len: u64,
    },
    /// Two tensors' byte ranges overlap.
    #[error("tensors {first:?} and {second:?} overlap (second starts at {at}, first ends at {first_end})")]
    Overlap {
        /// The tensor that starts first.
        first: String,
        /// The tensor that starts inside it.
        second: String,
        /// Where the second one starts.
        at: u64,
        /// Where the first one ends.
        first_end: u64,
    },
    /// Bytes of the buffer that no tensor covers (between tensors or after the last).
    #[error("{len} bytes at buffer offset {at} belong to no tensor")]
    Gap {
        /// Start of the uncovered range.
        at: u64,
        /// Its length.
        len: u64,
    },
}

/// The safetensors dtype string of a ckptstore dtype.
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F64 => "F64",
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::F8E4M3 => "F8_E4M3",
        DType::F8E5M2 => "F8_E5M2",
        DType::I64 => "I64",
        DType::I32 => "I32",
        DType::I16 => "I16",
        DType::I8 => "I8",
        DType::U8 => "U8",
        DType::Bool => "BOOL",
    }
}

/// The ckptstore dtype of a safetensors dtype string (`None`: unknown, or one ckptstore has no
/// equivalent for, such as `U16`, `U32`, `U64`, `F8_E8M0`).
pub(crate) fn parse_dtype(s: &str) -> Option<DType> {
    Some(match s {
        "F64" => DType::F64,
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F8_E4M3" => DType::F8E4M3,
        "F8_E5M2" => DType::F8E5M2,
        "I64" => DType::I64,
        "I32" => DType::I32,
        "I16" => DType::I16,
        "I8" => DType::I8,
        "U8" => DType::U8,
        "BOOL" => DType::Bool,
        _ => return None,
    })
}

/// One tensor of a safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape (empty: a scalar).
    pub shape: Vec<u64>,
    /// `[begin, end)` relative to the start of the byte buffer.
    pub data_offsets: (u64, u64),
}

impl TensorInfo {
    /// Byte length.
    pub fn nbytes(&self) -> u64 {
        self.data_offsets.1 - self.data_offsets.0
    }
}

/// A parsed and validated safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// `__metadata__` (empty when absent).
    pub metadata: BTreeMap<String, String>,
    /// The tensors, in buffer order (by offset).
    pub tensors: Vec<TensorInfo>,
    /// Absolute file offset of the byte buffer (8 + header length).
    pub data_start: u64,
}

/// The top-level JSON object as an ordered list of entries, so that duplicate keys (which
/// `serde_json::Map` would silently collapse) are seen.
struct Entries(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some((k, val)) = m.next_entry::<String, Value>()? {
                    v.push((k, val));
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

fn bad(name: &str, reason: impl Into<String>) -> FormatError {
    FormatError::BadEntry {
        name: name.to_owned(),
        reason: reason.into(),
    }
}

fn u64_list(name: &str, field: &str, v: Option<&Value>) -> Result<Vec<u64>, FormatError> {
    let arr = v
        .and_then(Value::as_array)
        .ok_or_else(|| bad(name, format!("{field:?} is missing or not an array")))?;
    arr.iter()
        .map(|x| {
            x.as_u64().ok_or_else(|| {
                bad(
                    name,
                    format!("{field:?} holds {x}, not a non-negative integer"),
                )
            })
        })
        .collect()
}

fn parse_tensor(name: &str, v: &Value) -> Result<TensorInfo, FormatError> {
    let obj = v
        .as_object()
        .ok_or_else(|| bad(name, "not a JSON object"))?;
    if let Some(k) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "dtype" | "shape" | "data_offsets"))
    {
        return Err(bad(name, format!("unexpected field {k:?}")));
    }
    let dtype_str = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(name, "\"dtype\" is missing or not a string"))?;
    let dtype = parse_dtype(dtype_str).ok_or_else(|| FormatError::UnknownDtype {
        name: name.to_owned(),
        dtype: dtype_str.to_owned(),
    })?;
    let shape = u64_list(name, "shape", obj.get("shape"))?;
    let offs = u64_list(name, "data_offsets", obj.get("data_offsets"))?;
    let [begin, end] = offs[..] else {
        return Err(bad(name, "\"data_offsets\" must hold exactly two integers"));
    };
    Ok(TensorInfo {
        name: name.to_owned(),
        dtype,
        shape,
        data_offsets: (begin, end),
    })
}

/// Parses and validates the JSON header bytes for a buffer of `buffer_len` bytes.
#[allow(clippy::expect_used)] // `pos` only moves past 0 after a tensor, which sets `prev`
pub(crate) fn parse_header(
    json: &[u8],
    buffer_len: u64,
    data_start: u64,
) -> Result<Header, FormatError> {
    let text = std::str::from_utf8(json)
        .map_err(|e| FormatError::InvalidJson(format!("not UTF-8: {e}")))?;
    let entries: Entries =
        serde_json::from_str(text).map_err(|e| FormatError::InvalidJson(e.to_string()))?;
    let mut seen = HashSet::new();
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::new();
    for (name, v) in &entries.0 {
        if !seen.insert(name.as_str()) {
            return Err(FormatError::DuplicateName(name.clone()));
        }
        if name == METADATA_KEY {
            let obj = v
                .as_object()
                .ok_or_else(|| bad(name, "not a JSON object"))?;
            for (k, val) in obj {
                let s = val
                    .as_str()
                    .ok_or_else(|| bad(name, format!("value of {k:?} is {val}, not a string")))?;
                metadata.insert(k.clone(), s.to_owned());
            }
            continue;
        }
        tensors.push(parse_tensor(name, v)?);
    }
    for t in &tensors {
        let (begin, end) = t.data_offsets;
        if begin > end || end > buffer_len {
            return Err(FormatError::OffsetsOutOfRange {
                name: t.name.clone(),
                begin,
                end,
                buffer_len,
            });
        }
        let expected = tensor_nbytes(t.dtype, &t.shape);
        if expected != Some(end - begin) {
            return Err(FormatError::LengthMismatch {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                expected: expected.map_or_else(|| "more than 2^64".into(), |n| n.to_string()),
                found: end - begin,
            });
        }
    }
    // Cover the buffer exactly: sorted by offset, each starts where the previous ended.
    tensors.sort_by_key(|t| t.data_offsets);
    let mut pos = 0u64;
    let mut prev: Option<&TensorInfo> = None;
    for t in &tensors {
        let (begin, end) = t.data_offsets;
        if begin < pos {
            let p = prev.expect("pos > 0 only after a tensor");
            return Err(FormatError::Overlap {
                first: p.name.clone(),
                second: t.name.clone(),
                at: begin,
                first_end: pos,
            });
        }
        if begin > pos {
            return Err(FormatError::Gap {
                at: pos,
                len: begin - pos,
            });
        }
        pos = end;
        prev = Some(t);
    }
    if pos != buffer_len {
        return Err(FormatError::Gap {
            at: pos,
            len: buffer_len - pos,
        });
    }
    Ok(Header {
        metadata,
        tensors,
        data_start,
    })
}

/// Reads and validates the header of a safetensors file. Leaves `r` positioned anywhere.
pub fn read_header<R: Read + Seek>(r: &mut R) -> Result<Header, FormatError> {
    let file_len = r.seek(SeekFrom::End(0)).map_err(io_err("seek"))?;
    if file_len < 8 {
        return Err(FormatError::TooShort { len: file_len });
    }
    r.seek(SeekFrom::Start(0)).map_err(io_err("seek"))?;
    let mut len_bytes = [0u8; 8];
    r.read_exact(&mut len_bytes).map_err(io_err("read"))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > file_len - 8 {
        return Err(FormatError::HeaderBeyondFile {
            header_len,
            file_len,
        });
    }
    if header_len > MAX_HEADER_LEN {
        return Err(FormatError::HeaderTooLarge { header_len });
    }
    let mut json = vec![0u8; header_len as usize];
    r.read_exact(&mut json).map_err(io_err("read"))?;
    let data_start = 8 + header_len;
    parse_header(&json, file_len - data_start, data_start)
}

/// Reads one tensor's bytes into `buf` (resized to fit; reuse it across tensors so that only
/// one tensor is in memory at a time).
pub fn read_tensor_into<R: Read + Seek>(
    r: &mut R,
    header: &Header,
    t: &TensorInfo,
    buf: &mut Vec<u8>,
) -> Result<(), FormatError> {
    r.seek(SeekFrom::Start(header.data_start + t.data_offsets.0))
        .map_err(io_err("seek"))?;
    buf.clear();
    buf.resize(t.nbytes() as usize, 0);
    r.read_exact(buf).map_err(io_err("read"))
}

/// What the writer needs to know of a tensor before its bytes: name, dtype, shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Name (must not be `__metadata__`, must be unique).
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
}

/// Builds the file prefix (8-byte length, JSON header padded with spaces to a multiple of 8)
/// for tensors laid out in the given order. Returns the prefix and each tensor's offsets; the
/// caller then writes the tensors' bytes in the same order. Keys are written `__metadata__`
/// first (omitted when empty), then the tensors in the order given.
#[allow(clippy::expect_used)] // a string always serializes to JSON
pub fn encode_header(
    metadata: &BTreeMap<String, String>,
    tensors: &[TensorSpec],
) -> Result<(Vec<u8>, Vec<TensorInfo>), FormatError> {
    let mut seen = HashSet::new();
    let mut infos = Vec::with_capacity(tensors.len());
    let mut pos = 0u64;
    let mut json = String::from("{");
    let q = |s: &str| serde_json::to_string(s).expect("a string serializes");
    if !metadata.is_empty() {
        json.push_str(&q(METADATA_KEY));
        json.push_str(":{");
        for (i, (k, v)) in metadata.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            json.push_str(&q(k));
            json.push(':');
            json.push_str(&q(v));
        }
        json.push('}');
    }
    for t in tensors {
        if t.name == METADATA_KEY {
            return Err(bad(&t.name, "a tensor may not use the reserved name"));
        }
        if !seen.insert(t.name.as_str()) {
            return Err(FormatError::DuplicateName(t.name.clone()));
        }
        let n = tensor_nbytes(t.dtype, &t.shape)
            .ok_or_else(|| bad(&t.name, format!("shape {:?} overflows", t.shape)))?;
        let end = pos
            .checked_add(n)
            .ok_or_else(|| bad(&t.name, "buffer exceeds 2^64 bytes"))?;
        if json.len() > 1 {
            json.push(',');
        }
        let shape: Vec<String> = t.shape.iter().map(u64::to_string).collect();
        json.push_str(&format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{pos},{end}]}}",
            q(&t.name),
            dtype_name(t.dtype),
            shape.join(",")
        ));
        infos.push(TensorInfo {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            data_offsets: (pos, end),
        });
        pos = end;
    }
    json.push('}');
    while !json.len().is_multiple_of(8) {
        json.push(' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    Ok((out, infos))
}

/// Writes a whole safetensors file from in-memory tensors, in the order given (tests and small
/// files; the export path streams tensor by tensor with [`encode_header`]).
pub fn write_all<W: Write>(
    w: &mut W,
    metadata: &BTreeMap<String, String>,
    tensors: &[(TensorSpec, &[u8])],
) -> Result<(), FormatError> {
    let specs: Vec<TensorSpec> = tensors.iter().map(|(s, _)| s.clone()).collect();
    let (prefix, infos) = encode_header(metadata, &specs)?;
    w.write_all(&prefix).map_err(io_err("write"))?;
    for ((_, data), info) in tensors.iter().zip(&infos) {
        if data.len() as u64 != info.nbytes() {
            return Err(bad(
                &info.name,
                format!(
                    "{} bytes given, the shape needs {}",
                    data.len(),
                    info.nbytes()
                ),
            ));
        }
        w.write_all(data).map_err(io_err("write"))?;
    }
    Ok(())
}

/// `op`'s OS error as this format's error.
fn io_err(op: &'static str) -> impl FnOnce(std::io::Error) -> FormatError {
    super::io_failure::io_err(op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn file(json: &str, buffer: &[u8]) -> Cursor<Vec<u8>> {
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v.extend_from_slice(buffer);
        Cursor::new(v)
    }

    #[test]
    fn reads_a_minimal_file() {
        let mut f = file(
            r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"__metadata__":{"k":"v"}}"#,
            &[7, 9],
        );
        let h = read_header(&mut f).unwrap();
        assert_eq!(h.metadata["k"], "v");
        assert_eq!(h.tensors.len(), 1);
        let mut buf = Vec::new();
        read_tensor_into(&mut f, &h, &h.tensors[0], &mut buf).unwrap();
        assert_eq!(buf, [7, 9]);
    }

    #[test]
    fn rejects_duplicates_and_gaps() {
        let dup = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        assert!(matches!(
            read_header(&mut file(dup, &[0, 0])),
            Err(FormatError::DuplicateName(n)) if n == "a"
        ));
        let gap = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        assert!(matches!(
            read_header(&mut file(gap, &[0, 0])),
            Err(FormatError::Gap { at: 0, len: 1 })
        ));
        let trailing = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        assert!(matches!(
            read_header(&mut file(trailing, &[0, 0])),
            Err(FormatError::Gap { at: 1, len: 1 })
        ));
    }

    #[test]
    fn header_is_padded_to_eight() {
        let (prefix, _) = encode_header(
            &BTreeMap::new(),
            &[TensorSpec {
                name: "x".into(),
                dtype: DType::F32,
                shape: vec![],
            }],
        )
        .unwrap();
        assert_eq!(prefix.len() % 8, 0);
    }
}
