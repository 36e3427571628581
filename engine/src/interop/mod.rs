//! Import and export of checkpoints in other formats: [`safetensors`] (mapped here), and
//! MindSpore's `.ckpt` ([`mindspore`], mapped in [`mindspore_store`]).
//!
//! These functions read and write an *external* file through `Read`/`Write`: the caller (the
//! CLI) opens it with `std::fs`. That file is not store state, so it does not go through the
//! [`crate::io`] seam; the store side goes through [`Store`] as usual (an import is one
//! ordinary transaction, durable when it returns).
//!
//! # How a checkpoint maps onto a safetensors file
//! - Tensors keep their names, dtypes, shapes and bytes; they are written sorted by name.
//! - Blobs become 1-D `U8` tensors named `__blob__/NAME`; import turns such tensors back into
//!   blobs.
//! - `__metadata__` (string → string) holds the checkpoint's `step`, `epoch` and
//!   `ckptstore.id`, and every user metadata value as a string: `Str` as-is, `Int` in decimal,
//!   `Float` in Rust's shortest round-trip form (`0.1`, `1e300`, `NaN`, `inf`), `Bytes` as
//!   `hex:` followed by lower-case hex. The key `ckptstore.types` holds a JSON object naming
//!   the type of every non-`Str` value (`{"lr": "float", "rng": "bytes"}`), so that an import of
//!   a ckptstore export restores the exact values; without it (a file from another tool) every
//!   `__metadata__` entry is imported as `Str`.
//! - Import takes the step from the caller, else from `__metadata__["step"]`, else 0; the epoch
//!   from `__metadata__["epoch"]` when present. `ckptstore.id` is not imported (the store
//!   assigns ids).

mod error;
mod io_failure;
pub mod mindspore;
mod mindspore_store;
pub mod safetensors;

pub use error::Error;
pub use io_failure::IoFailure;

pub use mindspore_store::{export_mindspore, import_mindspore, MindSporeExport};

use crate::dtype::DType;
use crate::error::Result;
use crate::manifest::MetaValue;
use crate::store::{CheckpointReader, Store};
use safetensors::{FormatError, TensorSpec};
use std::collections::BTreeMap;
use std::io::{Read, Seek, Write};
use std::path::Path;

/// Name prefix under which blobs travel as `U8` tensors.
pub const BLOB_PREFIX: &str = "__blob__/";
/// `__metadata__` key of the training step.
pub const STEP_KEY: &str = "step";
/// `__metadata__` key of the epoch.
pub const EPOCH_KEY: &str = "epoch";
/// `__metadata__` key of the exported checkpoint's id.
pub const ID_KEY: &str = "ckptstore.id";
/// `__metadata__` key of the JSON object naming the types of non-string metadata values.
pub const TYPES_KEY: &str = "ckptstore.types";

const RESERVED: [&str; 4] = [STEP_KEY, EPOCH_KEY, ID_KEY, TYPES_KEY];

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    /// Checkpoint id exported.
    pub id: u64,
    /// Its step.
    pub step: u64,
    /// Tensors written (blobs included).
    pub tensors: usize,
    /// Of them, blobs.
    pub blobs: usize,
    /// Bytes of tensor data.
    pub data_bytes: u64,
    /// Bytes of the whole file.
    pub file_bytes: u64,
}

/// What an import committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportSummary {
    /// Id of the new checkpoint.
    pub id: u64,
    /// Its step.
    pub step: u64,
    /// Its epoch.
    pub epoch: u64,
    /// Tensors imported.
    pub tensors: usize,
    /// Blobs imported.
    pub blobs: usize,
    /// Metadata entries imported.
    pub metadata: usize,
    /// Bytes of tensor and blob data.
    pub data_bytes: u64,
}

fn st_err(path: &Path) -> impl FnOnce(FormatError) -> crate::Error + '_ {
    move |error| Error::Safetensors(error).at(path)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// The `__metadata__` an export writes for a checkpoint (see the module docs). A user key that
/// collides with a reserved key is an error unless it holds the same value.
pub(crate) fn export_metadata(
    id: u64,
    step: u64,
    epoch: u64,
    user: &BTreeMap<String, MetaValue>,
) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut types = serde_json::Map::new();
    for (k, v) in user {
        let (s, ty) = match v {
            MetaValue::Str(s) => (s.clone(), None),
            MetaValue::Int(i) => (i.to_string(), Some("int")),
            MetaValue::Float(f) => (format!("{f:?}"), Some("float")),
            MetaValue::Bytes(b) => (format!("hex:{}", hex(b)), Some("bytes")),
        };
        if let Some(ty) = ty {
            types.insert(k.clone(), ty.into());
        }
        out.insert(k.clone(), s);
    }
    let reserved = [
        (STEP_KEY, step.to_string()),
        (EPOCH_KEY, epoch.to_string()),
        (ID_KEY, id.to_string()),
    ];
    for (k, v) in reserved {
        match user.get(k) {
            None => {}
            Some(MetaValue::Int(i)) if i.to_string() == v => {
                types.remove(k);
            }
            Some(MetaValue::Str(s)) if *s == v => {}
            Some(other) => {
                return Err(crate::Error::invalid(format!(
                    "metadata key {k:?} ({other:?}) collides with the checkpoint's {k} ({v}) in \
                     the safetensors __metadata__; rename the key"
                )))
            }
        }
        out.insert(k.to_owned(), v);
    }
    if user.contains_key(TYPES_KEY) {
        return Err(crate::Error::invalid(format!(
            "metadata key {TYPES_KEY:?} is reserved for the safetensors export"
        )));
    }
    if !types.is_empty() {
        out.insert(
            TYPES_KEY.to_owned(),
            serde_json::Value::Object(types).to_string(),
        );
    }
    Ok(out)
}

/// The step, epoch and user metadata an import takes from `__metadata__` (see the module docs).
pub(crate) fn import_metadata(
    meta: &BTreeMap<String, String>,
    step: Option<u64>,
) -> Result<(u64, u64, BTreeMap<String, MetaValue>)> {
    let num = |k: &str| -> Result<Option<u64>> {
        meta.get(k)
            .map(|s| {
                s.trim().parse::<u64>().map_err(|_| {
                    crate::Error::invalid(format!(
                        "safetensors __metadata__[{k:?}] = {s:?} is not a non-negative integer"
                    ))
                })
            })
            .transpose()
    };
    let step = match step {
        Some(s) => s,
        None => num(STEP_KEY)?.unwrap_or(0),
    };
    let epoch = num(EPOCH_KEY)?.unwrap_or(0);
    let types: BTreeMap<String, String> = match meta.get(TYPES_KEY) {
        None => BTreeMap::new(),
        Some(s) => {
            let v: serde_json::Value = serde_json::from_str(s).map_err(|e| {
                crate::Error::invalid(format!("safetensors __metadata__[{TYPES_KEY:?}]: {e}"))
            })?;
            v.as_object()
                .ok_or_else(|| {
                    crate::Error::invalid(format!(
                        "safetensors __metadata__[{TYPES_KEY:?}] is not a JSON object"
                    ))
                })?
                .iter()
                .map(|(k, t)| (k.clone(), t.as_str().unwrap_or("").to_owned()))
                .collect()
        }
    };
    let mut user = BTreeMap::new();
    for (k, s) in meta {
        if RESERVED.contains(&k.as_str()) {
            continue;
        }
        let bad = |ty: &str| {
            crate::Error::invalid(format!(
                "safetensors __metadata__[{k:?}] = {s:?} is not a valid {ty}"
            ))
        };
        let v = match types.get(k).map(String::as_str) {
            None | Some("str") => MetaValue::Str(s.clone()),
            Some("int") => MetaValue::Int(s.parse().map_err(|_| bad("int"))?),
            Some("float") => MetaValue::Float(s.parse().map_err(|_| bad("float"))?),
            Some("bytes") => MetaValue::Bytes(
                s.strip_prefix("hex:")
                    .and_then(unhex)
                    .ok_or_else(|| bad("hex: bytes value"))?,
            ),
            Some(other) => {
                return Err(crate::Error::invalid(format!(
                    "safetensors __metadata__[{TYPES_KEY:?}] names unknown type {other:?} for {k:?}"
                )))
            }
        };
        user.insert(k.clone(), v);
    }
    Ok((step, epoch, user))
}

/// Writes checkpoint `ck` to `out` as a safetensors file, one tensor in memory at a time.
/// `path` names the output in errors; `progress` is called with the bytes of each tensor
/// written. The caller makes the file durable (fsync, rename).
pub fn export_safetensors<W: Write>(
    ck: &CheckpointReader<'_>,
    out: &mut W,
    path: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<ExportSummary> {
    let info = ck.info();
    let metadata = export_metadata(info.id, info.step, info.epoch, &info.metadata)?;
    // (name in the file, source: Some(tensor name) or None for a blob)
    let mut items: Vec<(String, TensorSpec, bool)> = Vec::new();
    for name in ck.tensor_names() {
        let (dtype, shape) = ck.tensor_meta(name)?;
        items.push((
            name.to_owned(),
            TensorSpec {
                name: name.to_owned(),
                dtype,
                shape,
            },
            false,
        ));
    }
    let blob_sizes: BTreeMap<&str, u64> = ck
        .manifest()
        .blobs
        .iter()
        .map(|b| (b.name.as_str(), b.nbytes))
        .collect();
    for name in ck.blob_names() {
        let file_name = format!("{BLOB_PREFIX}{name}");
        items.push((
            name.to_owned(),
            TensorSpec {
                name: file_name,
                dtype: DType::U8,
                shape: vec![blob_sizes.get(name).copied().unwrap_or(0)],
            },
            true,
        ));
    }
    items.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    let specs: Vec<TensorSpec> = items.iter().map(|(_, s, _)| s.clone()).collect();
    let (prefix, infos) = safetensors::encode_header(&metadata, &specs).map_err(st_err(path))?;
    let werr = |e| crate::Error::io("write", path, e);
    out.write_all(&prefix).map_err(werr)?;
    let mut data_bytes = 0u64;
    for ((src, spec, is_blob), info) in items.iter().zip(&infos) {
        let data = if *is_blob {
            ck.blob(src)?
        } else {
            ck.tensor(src)?.data
        };
        if data.len() as u64 != info.nbytes() {
            return Err(crate::Error::BadManifest {
                context: format!("checkpoint {}", info_id(ck)),
                reason: format!(
                    "{} {:?} read back {} bytes, its manifest says {}",
                    if *is_blob { "blob" } else { "tensor" },
                    spec.name,
                    data.len(),
                    info.nbytes()
                ),
            });
        }
        out.write_all(&data).map_err(werr)?;
        data_bytes += data.len() as u64;
        progress(data.len() as u64);
    }
    out.flush().map_err(werr)?;
    Ok(ExportSummary {
        id: info.id,
        step: info.step,
        tensors: items.len(),
        blobs: items.iter().filter(|i| i.2).count(),
        data_bytes,
        file_bytes: prefix.len() as u64 + data_bytes,
    })
}

fn info_id(ck: &CheckpointReader<'_>) -> u64 {
    ck.manifest().id
}

/// Reads a safetensors file from `input` and commits it to `store` as one new checkpoint,
/// one tensor in memory at a time. `step` overrides `__metadata__["step"]`. `path` names the
/// input in errors; `progress` is called with the bytes of each tensor imported. Returns after
/// the commit is durable.
pub fn import_safetensors<R: Read + Seek>(
    store: &mut Store,
    input: &mut R,
    path: &Path,
    step: Option<u64>,
    progress: &mut dyn FnMut(u64),
) -> Result<ImportSummary> {
    let header = safetensors::read_header(input).map_err(st_err(path))?;
    let (step, epoch, user) = import_metadata(&header.metadata, step)?;
    // Import in name order, so the manifest (and thus `tensor_names`) is deterministic.
    let mut order: Vec<&safetensors::TensorInfo> = header.tensors.iter().collect();
    order.sort_by(|a, b| a.name.cmp(&b.name));
    let mut tx = store.begin(step)?;
    tx.set_epoch(epoch);
    let metadata = user.len();
    for (k, v) in user {
        tx.set_metadata(k, v);
    }
    let mut buf = Vec::new();
    let (mut tensors, mut blobs, mut data_bytes) = (0, 0, 0u64);
    for t in order {
        safetensors::read_tensor_into(input, &header, t, &mut buf).map_err(st_err(path))?;
        match t.name.strip_prefix(BLOB_PREFIX) {
            Some(blob) if t.dtype == DType::U8 && t.shape.len() == 1 => {
                tx.put_blob(blob, &buf)?;
                blobs += 1;
            }
            _ => {
                tx.put_tensor(&t.name, t.dtype, &t.shape, &buf)?;
                tensors += 1;
            }
        }
        data_bytes += buf.len() as u64;
        progress(buf.len() as u64);
    }
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
