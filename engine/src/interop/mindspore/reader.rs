//! Reading a `.ckpt` file: [`scan`] builds the index of its entries without reading their
//! contents; [`BodyReader`] and [`ContentReader`] stream the contents in file order.

use super::dtypes::{parse_dtype, ValueKind};
use super::wire::{Crc32, Wire};
use super::{bad_wire_type, io_err, FormatError, CRC_MAGIC, CRC_TRAILER_LEN};
use super::{MAX_DIMS, MAX_INDEX_BYTES, MAX_STR_LEN, MAX_TAG_LEN, MAX_TYPE_LEN, MAX_VALUES};
use crate::interop::IoFailure;
use crate::manifest::tensor_nbytes;
use std::io::{Read, Seek, SeekFrom};

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
            (f @ 1..=3, wt) => return Err(bad_wire_type(SCOPE, f, wt, at)),
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
            (1, wt) => return Err(bad_wire_type(SCOPE, 1, wt, at)),
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
            (f @ 1..=3, wt) => return Err(bad_wire_type(SCOPE, f, wt, at)),
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
            return Err(bad_wire_type("Checkpoint", field, wt, at));
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
                FormatError::Io(IoFailure { source, .. }) => source,
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
