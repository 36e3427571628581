//! Import of MindSpore `.ckpt` files into a store, and export of a checkpoint as one.
//!
//! # How a checkpoint maps onto a `.ckpt` file
//! - Tensors keep their names, dtypes, shapes and bytes, in the checkpoint's order; MindSpore
//!   type strings are in [`mindspore::dtype_name`]. `UInt16`/`UInt32`/`UInt64`, `Int4` and
//!   MapParameter values have no ckptstore equivalent: the import refuses the file, naming
//!   the value. The float8 dtypes import, but do not export (MindSpore 2.10's
//!   `load_checkpoint` cannot read them).
//! - The Int64 scalars `epoch_num` and `step_num` (what MindSpore's `ModelCheckpoint` appends)
//!   are the checkpoint's epoch and step: the import takes them (`--step` overrides the step;
//!   0 when absent) and does not store them as tensors; the export always writes both, last,
//!   as `ModelCheckpoint` does.
//! - `str` values (MindSpore `append_info` strings) are `Str` metadata both ways.
//! - Other metadata exports as MindSpore would save it through `append_info`, but exactly:
//!   `Int` as an Int64 scalar, `Float` as a Float64 scalar, `Bytes` as a 1-D UInt8 tensor; the
//!   `str` value `ckptstore.types` (a JSON object, name → `int`/`float`/`bytes`) says which
//!   values are metadata, so the import of an export restores them as metadata. Without it (a
//!   file from MindSpore) every non-`str` value imports as a tensor.
//! - Blobs travel as 1-D UInt8 tensors `__blob__/NAME`, as in the safetensors export.
//!
//! The import reads the file twice: [`mindspore::scan`] checks all its framing first (nothing
//! is committed from a malformed file), then the contents stream into the transaction one
//! chunk in memory at a time; a CRC mismatch, found at the end of that pass, aborts the
//! transaction.

use super::mindspore::{self as ms, Entry, FormatError, ValueKind};
use super::{ExportSummary, ImportSummary, BLOB_PREFIX, TYPES_KEY};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::le;
use crate::manifest::MetaValue;
use crate::store::{CheckpointReader, Store};
use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Seek, Write};
use std::path::Path;

/// Tag of the value holding the step.
pub const STEP_NUM: &str = "step_num";
/// Tag of the value holding the epoch.
pub const EPOCH_NUM: &str = "epoch_num";
/// Most bytes of metadata one import reads into memory (a manifest cannot hold more: it is
/// one WAL record).
const MAX_METADATA_BYTES: u64 = crate::wal::MAX_RECORD_LEN as u64;

fn ms_err(path: &Path) -> impl Fn(FormatError) -> Error + '_ {
    move |error| super::Error::MindSpore(Box::new(error)).at(path)
}

/// What the import does with one entry.
enum Role {
    Tensor(DType),
    Blob(String),
    Skip,
}

fn le_int(dtype: DType, b: &[u8]) -> Option<i64> {
    match dtype {
        DType::I64 => Some(i64::from_le_bytes(b.try_into().ok()?)),
        DType::I32 => Some(i32::from_le_bytes(b.try_into().ok()?).into()),
        _ => None,
    }
}

/// Reads a `.ckpt` file from `input` and commits it to `store` as one new checkpoint (see the
/// module docs). `step` overrides the file's `step_num`. `path` names the input in errors;
/// `progress` is called with the bytes of each tensor imported. Returns after the commit is
/// durable.
#[allow(clippy::expect_used)] // scan checked the scalar's 8 bytes
pub fn import_mindspore<R: Read + Seek>(
    store: &mut Store,
    input: &mut R,
    path: &Path,
    step: Option<u64>,
    progress: &mut dyn FnMut(u64),
) -> Result<ImportSummary> {
    let err = ms_err(path);
    let index = ms::scan(input).map_err(&err)?;
    let bad = |e: &Entry, why: String| {
        Error::invalid(format!(
            "{}: MindSpore .ckpt value {:?}: {why}",
            path.display(),
            e.name
        ))
    };
    let mut meta_bytes = 0u64;
    let mut read_small = |input: &mut R, e: &Entry| -> Result<Vec<u8>> {
        meta_bytes += e.nbytes;
        if meta_bytes > MAX_METADATA_BYTES {
            return Err(bad(
                e,
                format!("metadata of the file passes {MAX_METADATA_BYTES} bytes, more than a manifest holds"),
            ));
        }
        ms::read_entry(input, e).map_err(&err)
    };
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    if let Some(e) = index
        .entries
        .iter()
        .find(|e| e.name == TYPES_KEY && e.kind == ValueKind::Str)
    {
        let s = ms::decode_str(&e.name, &read_small(input, e)?).map_err(&err)?;
        let v: serde_json::Value =
            serde_json::from_str(&s).map_err(|x| bad(e, format!("not a JSON object: {x}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad(e, "not a JSON object".into()))?;
        for (k, t) in obj {
            types.insert(k.clone(), t.as_str().unwrap_or("").to_owned());
        }
    }
    let (mut file_step, mut file_epoch) = (None, None);
    let mut user = BTreeMap::new();
    let mut roles = Vec::with_capacity(index.entries.len());
    for e in &index.entries {
        let role = match (e.kind, types.get(&e.name).map(String::as_str)) {
            (ValueKind::Str, _) if e.name == TYPES_KEY => Role::Skip,
            (ValueKind::Str, None | Some("str")) => {
                let s = ms::decode_str(&e.name, &read_small(input, e)?).map_err(&err)?;
                user.insert(e.name.clone(), MetaValue::Str(s));
                Role::Skip
            }
            (ValueKind::Tensor(d), None)
                if (e.name == STEP_NUM || e.name == EPOCH_NUM) && e.shape.is_empty() =>
            {
                match le_int(d, &read_small(input, e)?).and_then(|v| u64::try_from(v).ok()) {
                    Some(v) if e.name == STEP_NUM => {
                        file_step = Some(v);
                        Role::Skip
                    }
                    Some(v) => {
                        file_epoch = Some(v);
                        Role::Skip
                    }
                    // Not a non-negative integer: an ordinary tensor that happens to be named so.
                    None => Role::Tensor(d),
                }
            }
            (ValueKind::Tensor(d), None) => match e.name.strip_prefix(BLOB_PREFIX) {
                Some(blob) if d == DType::U8 && e.shape.len() == 1 => Role::Blob(blob.to_owned()),
                _ => Role::Tensor(d),
            },
            (kind, Some(ty)) => {
                let b = read_small(input, e)?;
                let v = match (ty, kind) {
                    ("int", ValueKind::Tensor(DType::I64)) if e.shape.is_empty() => {
                        MetaValue::Int(le_int(DType::I64, &b).expect("8 bytes, checked by scan"))
                    }
                    ("float", ValueKind::Tensor(DType::F64)) if e.shape.is_empty() => {
                        MetaValue::Float(f64::from_le_bytes(le::array(&b, 0)))
                    }
                    ("bytes", ValueKind::Tensor(DType::U8)) if e.shape.len() == 1 => {
                        MetaValue::Bytes(b)
                    }
                    _ => {
                        return Err(bad(
                            e,
                            format!(
                                "{TYPES_KEY} calls it {ty:?} metadata, but it is a {} {:?} value",
                                e.type_name, e.dims
                            ),
                        ))
                    }
                };
                user.insert(e.name.clone(), v);
                Role::Skip
            }
        };
        roles.push(role);
    }
    let step = step.or(file_step).unwrap_or(0);
    let epoch = file_epoch.unwrap_or(0);
    let mut tx = store.begin(step)?;
    tx.set_epoch(epoch);
    let metadata = user.len();
    for (k, v) in user {
        tx.set_metadata(k, v);
    }
    let (mut tensors, mut blobs, mut data_bytes) = (0, 0, 0u64);
    let mut body = ms::BodyReader::new(input, &index).map_err(&err)?;
    for (e, role) in index.entries.iter().zip(&roles) {
        match role {
            Role::Skip => continue,
            Role::Tensor(d) => {
                tx.put_tensor_from(&e.name, *d, &e.shape, &mut body.content(e), path)?;
                tensors += 1;
            }
            Role::Blob(name) => {
                tx.put_blob_from(name, e.nbytes, &mut body.content(e), path)?;
                blobs += 1;
            }
        }
        data_bytes += e.nbytes;
        progress(e.nbytes);
    }
    // The CRC covers every byte: check it before the commit makes anything durable.
    body.finish().map_err(&err)?;
    let c = tx.commit()?;
    Ok(ImportSummary {
        id: c.checkpoint.id,
        step,
        epoch,
        tensors,
        blobs,
        metadata,
        data_bytes,
    })
}

/// Options of [`export_mindspore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MindSporeExport {
    /// Append the `crc_num` trailer (MindSpore's `crc_check=True`). Default: no.
    pub crc: bool,
    /// Largest slice a tensor is written in. Default: [`ms::DEFAULT_SLICE_BYTES`], as
    /// MindSpore.
    pub slice_bytes: u64,
}

impl Default for MindSporeExport {
    fn default() -> Self {
        MindSporeExport {
            crc: false,
            slice_bytes: ms::DEFAULT_SLICE_BYTES,
        }
    }
}

fn dims_of(name: &str, shape: &[u64]) -> Result<Vec<i64>> {
    shape
        .iter()
        .map(|&d| {
            i64::try_from(d).map_err(|_| {
                Error::invalid(format!(
                    "tensor {name:?}: dim {d} does not fit MindSpore's int64 dims"
                ))
            })
        })
        .collect()
}

/// Writes checkpoint `ck` to `out` as a MindSpore `.ckpt` file (see the module docs), one
/// tensor in memory at a time (none when the tensor is a zero-copy view of a segment).
/// Every name and dtype is checked before the first byte is written. `path` names the output
/// in errors; `progress` is called with the bytes of each tensor written. The caller makes
/// the file durable (fsync, rename).
pub fn export_mindspore<W: Write>(
    ck: &CheckpointReader<'_>,
    out: &mut W,
    path: &Path,
    opts: MindSporeExport,
    progress: &mut dyn FnMut(u64),
) -> Result<ExportSummary> {
    let info = ck.info();
    let err = ms_err(path);
    let step = i64::try_from(info.step).map_err(|_| {
        Error::invalid(format!(
            "step {} does not fit MindSpore's Int64 step_num",
            info.step
        ))
    })?;
    let epoch = i64::try_from(info.epoch).map_err(|_| {
        Error::invalid(format!(
            "epoch {} does not fit MindSpore's Int64 epoch_num",
            info.epoch
        ))
    })?;
    // Every tag the file will hold, checked for collisions before anything is written.
    let mut tags: HashSet<String> = [STEP_NUM, EPOCH_NUM, TYPES_KEY].map(String::from).into();
    let mut claim = |tag: &str, what: &str| -> Result<()> {
        if tags.insert(tag.to_owned()) {
            return Ok(());
        }
        Err(Error::invalid(format!(
            "{what} {tag:?} collides with another value of the MindSpore file ({STEP_NUM}, \
             {EPOCH_NUM} and {TYPES_KEY} are reserved; blobs are named {BLOB_PREFIX}NAME); rename it"
        )))
    };
    let mut tensors = Vec::new();
    for name in ck.tensor_names() {
        let (dtype, shape) = ck.tensor_meta(name)?;
        let type_name = ms::dtype_name(dtype).ok_or_else(|| {
            Error::invalid(format!(
                "tensor {name:?} is {dtype}, which MindSpore 2.10's load_checkpoint cannot read; \
                 the MindSpore export refuses it (export to safetensors instead)"
            ))
        })?;
        claim(name, "tensor")?;
        tensors.push((name, type_name, dims_of(name, &shape)?));
    }
    let blob_names = ck.blob_names();
    for name in &blob_names {
        claim(&format!("{BLOB_PREFIX}{name}"), "blob")?;
    }
    let metadata = ck.metadata();
    let mut types = serde_json::Map::new();
    for (k, v) in &metadata {
        claim(k, "metadata key")?;
        let ty = match v {
            MetaValue::Str(_) => continue,
            MetaValue::Int(_) => "int",
            MetaValue::Float(_) => "float",
            MetaValue::Bytes(_) => "bytes",
        };
        types.insert(k.clone(), ty.into());
    }

    let mut w = ms::ValueWriter::new(out, opts.slice_bytes);
    let mut data_bytes = 0u64;
    for (name, type_name, dims) in &tensors {
        let view = ck.tensor_view(name)?;
        w.tensor(name, dims, type_name, view.data()).map_err(&err)?;
        data_bytes += view.data().len() as u64;
        progress(view.data().len() as u64);
    }
    for name in &blob_names {
        let data = ck.blob(name)?;
        w.tensor(
            &format!("{BLOB_PREFIX}{name}"),
            &[data.len() as i64],
            "UInt8",
            &data,
        )
        .map_err(&err)?;
        data_bytes += data.len() as u64;
        progress(data.len() as u64);
    }
    for (k, v) in &metadata {
        match v {
            MetaValue::Str(s) => w.str_value(k, s),
            MetaValue::Int(i) => w.tensor(k, &[], "Int64", &i.to_le_bytes()),
            MetaValue::Float(f) => w.tensor(k, &[], "Float64", &f.to_le_bytes()),
            MetaValue::Bytes(b) => w.tensor(k, &[b.len() as i64], "UInt8", b),
        }
        .map_err(&err)?;
    }
    if !types.is_empty() {
        w.str_value(TYPES_KEY, &serde_json::Value::Object(types).to_string())
            .map_err(&err)?;
    }
    w.tensor(EPOCH_NUM, &[], "Int64", &epoch.to_le_bytes())
        .map_err(&err)?;
    w.tensor(STEP_NUM, &[], "Int64", &step.to_le_bytes())
        .map_err(&err)?;
    let file_bytes = w.finish(opts.crc).map_err(&err)?;
    Ok(ExportSummary {
        id: info.id,
        step: info.step,
        tensors: tensors.len() + blob_names.len(),
        blobs: blob_names.len(),
        data_bytes,
        file_bytes,
    })
}
