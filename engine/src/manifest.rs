//! The checkpoint data model (metadata values, tensors, the summary of a checkpoint) and the checks every manifest
//! passes before the store trusts it, whether it was just built or decoded from the WAL.

use crate::dtype::DType;
use crate::error::{Error, Result};
use ckptstore_proto::v1 as pb;
use std::collections::{BTreeMap, HashSet};

pub use pb::Manifest;

/// Largest stored chunk a manifest may name; larger lengths are corruption, never allocations.
pub const MAX_CHUNK_LEN: u64 = 1 << 30;

/// A user metadata value (learning rate, RNG state, data-loader position, ...).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// Raw bytes.
    Bytes(Vec<u8>),
    /// UTF-8 text.
    Str(String),
    /// Integer.
    Int(i64),
    /// Floating point.
    Float(f64),
}

impl MetaValue {
    pub(crate) fn to_pb(&self) -> pb::MetaValue {
        use pb::meta_value::Kind;
        let kind = match self {
            MetaValue::Bytes(b) => Kind::BytesValue(b.clone()),
            MetaValue::Str(s) => Kind::StrValue(s.clone()),
            MetaValue::Int(i) => Kind::IntValue(*i),
            MetaValue::Float(f) => Kind::FloatValue(*f),
        };
        pb::MetaValue { kind: Some(kind) }
    }

    pub(crate) fn from_pb(v: &pb::MetaValue) -> Option<Self> {
        use pb::meta_value::Kind;
        Some(match v.kind.as_ref()? {
            Kind::BytesValue(b) => MetaValue::Bytes(b.clone()),
            Kind::StrValue(s) => MetaValue::Str(s.clone()),
            Kind::IntValue(i) => MetaValue::Int(*i),
            Kind::FloatValue(f) => MetaValue::Float(*f),
        })
    }
}

impl From<f64> for MetaValue {
    fn from(v: f64) -> Self {
        MetaValue::Float(v)
    }
}
impl From<i64> for MetaValue {
    fn from(v: i64) -> Self {
        MetaValue::Int(v)
    }
}
impl From<&str> for MetaValue {
    fn from(v: &str) -> Self {
        MetaValue::Str(v.to_owned())
    }
}
impl From<String> for MetaValue {
    fn from(v: String) -> Self {
        MetaValue::Str(v)
    }
}
impl From<Vec<u8>> for MetaValue {
    fn from(v: Vec<u8>) -> Self {
        MetaValue::Bytes(v)
    }
}

/// Byte length of a tensor of `dtype` and `shape`, or `None` on overflow.
pub fn tensor_nbytes(dtype: DType, shape: &[u64]) -> Option<u64> {
    shape
        .iter()
        .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d))
}

/// The dtype of a tensor of a validated manifest (which only holds known dtypes).
pub(crate) fn tensor_dtype(t: &pb::TensorEntry) -> Result<DType> {
    DType::from_pb(t.dtype).ok_or_else(|| Error::BadManifest {
        context: format!("tensor {:?}", t.name),
        reason: format!("unknown dtype {}", t.dtype),
    })
}

/// Summary of a committed checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointInfo {
    /// Id, increasing with commit order.
    pub id: u64,
    /// Training step.
    pub step: u64,
    /// Epoch.
    pub epoch: u64,
    /// Commit time, nanoseconds since the Unix epoch.
    pub wall_time_unix_ns: i64,
    /// Number of tensors.
    pub tensors: usize,
    /// Number of blobs.
    pub blobs: usize,
    /// Raw bytes of all tensors and blobs (before deduplication).
    pub bytes: u64,
    /// User metadata.
    pub metadata: BTreeMap<String, MetaValue>,
    /// Pinned ([`crate::Store::pin`]): never deleted, by retention or by
    /// [`crate::Store::delete`], until unpinned.
    pub pinned: bool,
}

impl CheckpointInfo {
    /// The summary of committed manifest `m`, `pinned` or not.
    pub(crate) fn of(m: &Manifest, pinned: bool) -> Self {
        CheckpointInfo {
            pinned,
            id: m.id,
            step: m.step,
            epoch: m.epoch,
            wall_time_unix_ns: m.wall_time_unix_ns,
            tensors: m.tensors.len(),
            blobs: m.blobs.len(),
            bytes: logical_bytes(m),
            metadata: m
                .metadata
                .iter()
                .filter_map(|e| Some((e.key.clone(), MetaValue::from_pb(e.value.as_ref()?)?)))
                .collect(),
        }
    }
}

fn bad(context: &str, reason: impl Into<String>) -> Error {
    Error::BadManifest {
        context: context.to_owned(),
        reason: reason.into(),
    }
}

fn check_chunks(context: &str, name: &str, nbytes: u64, chunks: &[pb::ChunkRef]) -> Result<()> {
    let mut sum = 0u64;
    for (i, c) in chunks.iter().enumerate() {
        if c.blake3.len() != 32 {
            return Err(bad(
                context,
                format!("{name:?} chunk {i}: BLAKE3 is not 32 bytes"),
            ));
        }
        if !crate::codec::is_known(c.codec) {
            return Err(bad(
                context,
                format!("{name:?} chunk {i}: unknown codec {}", c.codec),
            ));
        }
        if c.raw_len == 0 || c.raw_len > MAX_CHUNK_LEN {
            return Err(bad(
                context,
                format!(
                    "{name:?} chunk {i}: length {} outside 1..={MAX_CHUNK_LEN}",
                    c.raw_len
                ),
            ));
        }
        // Raw chunks store their bytes as they are; a compressed one is stored only when it
        // is smaller (docs/FORMAT.md, "Codecs"), so its stored length is below the raw one.
        let stored_ok = if c.codec == pb::Codec::None as i32 {
            c.stored_len == c.raw_len
        } else {
            (1..c.raw_len).contains(&c.stored_len)
        };
        if !stored_ok {
            return Err(bad(
                context,
                format!(
                    "{name:?} chunk {i}: stored length {} does not fit codec {} and raw length {}",
                    c.stored_len, c.codec, c.raw_len
                ),
            ));
        }
        if c.offset.checked_add(c.stored_len).is_none() {
            return Err(bad(
                context,
                format!("{name:?} chunk {i}: offset overflows"),
            ));
        }
        sum = sum
            .checked_add(c.raw_len)
            .ok_or_else(|| bad(context, "chunk lengths overflow"))?;
    }
    if sum != nbytes {
        return Err(bad(
            context,
            format!("{name:?}: chunks hold {sum} bytes, entry says {nbytes}"),
        ));
    }
    Ok(())
}

/// Checks the invariants of a manifest: known dtypes, byte lengths matching dtype × shape and
/// the chunks, bounded chunk lengths, unique names, sorted unique metadata keys.
pub fn validate(m: &Manifest, context: &str) -> Result<()> {
    let mut names = HashSet::new();
    // A sealed manifest as the WAL holds it: names, dtypes, shapes and metadata are in its
    // sealed body (docs/FORMAT.md, "Sealed manifests"); only the chunks are checked here.
    let opaque = |t: &pb::TensorEntry| !m.sealed_body.is_empty() && t.dtype == 0;
    if !m.sealed_body.is_empty() && m.key_id.is_empty() {
        return Err(bad(context, "sealed body without a key id"));
    }
    for (i, t) in m.tensors.iter().enumerate().filter(|(_, t)| opaque(t)) {
        if !t.name.is_empty() || !t.shape.is_empty() {
            return Err(bad(context, format!("sealed tensor #{i} has clear fields")));
        }
        check_chunks(context, &format!("#{i}"), t.nbytes, &t.chunks)?;
    }
    for t in m.tensors.iter().filter(|t| !opaque(t)) {
        let dtype = DType::from_pb(t.dtype).ok_or_else(|| {
            bad(
                context,
                format!("tensor {:?}: unknown dtype {}", t.name, t.dtype),
            )
        })?;
        if !names.insert(t.name.as_str()) {
            return Err(bad(context, format!("duplicate tensor {:?}", t.name)));
        }
        if tensor_nbytes(dtype, &t.shape) != Some(t.nbytes) {
            return Err(bad(
                context,
                format!(
                    "tensor {:?}: {} bytes do not match {dtype} × {:?}",
                    t.name, t.nbytes, t.shape
                ),
            ));
        }
        check_chunks(context, &t.name, t.nbytes, &t.chunks)?;
    }
    names.clear();
    for b in &m.blobs {
        if !m.sealed_body.is_empty() && b.name.is_empty() {
            check_chunks(context, "(sealed blob)", b.nbytes, &b.chunks)?;
            continue;
        }
        if !names.insert(b.name.as_str()) {
            return Err(bad(context, format!("duplicate blob {:?}", b.name)));
        }
        check_chunks(context, &b.name, b.nbytes, &b.chunks)?;
    }
    check_sealing(m, context)?;
    for w in m.metadata.windows(2) {
        if w[0].key >= w[1].key {
            return Err(bad(context, "metadata keys not sorted and unique"));
        }
    }
    if m.metadata
        .iter()
        .any(|e| e.value.as_ref().and_then(MetaValue::from_pb).is_none())
    {
        return Err(bad(context, "metadata value without a kind"));
    }
    Ok(())
}

/// A sealed (encrypted) checkpoint has a 16-byte key id and every chunk a 12-byte nonce and a
/// 16-byte tag; a plain one has none of them (docs/FORMAT.md, "Encryption").
fn check_sealing(m: &Manifest, context: &str) -> Result<()> {
    let sealed = match m.key_id.len() {
        0 => false,
        crate::crypt::KEY_ID_LEN => true,
        n => return Err(bad(context, format!("key id of {n} bytes (want 16)"))),
    };
    let ok = |c: &pb::ChunkRef| match sealed {
        true => c.nonce.len() == crate::crypt::NONCE_LEN && c.tag.len() == crate::crypt::TAG_LEN,
        false => c.nonce.is_empty() && c.tag.is_empty(),
    };
    let mac_ok = |b: &[u8]| b.is_empty() || (sealed && b.len() == crate::crypt::MAC_LEN);
    if !mac_ok(&m.mac) || !mac_ok(&m.prev_mac) || (m.mac.is_empty() && !m.prev_mac.is_empty()) {
        return Err(bad(
            context,
            "commit MAC fields: 32 bytes each, only in a sealed checkpoint",
        ));
    }
    if let Some((name, i, _)) = named_chunks(m).find(|(_, _, c)| !ok(c)) {
        return Err(bad(
            context,
            format!(
                "{name:?} chunk {i}: nonce/tag do not match a {} checkpoint",
                if sealed { "sealed" } else { "plain" }
            ),
        ));
    }
    Ok(())
}

/// Every chunk of a manifest with its tensor's or blob's name and its index there.
fn named_chunks(m: &Manifest) -> impl Iterator<Item = (&str, usize, &pb::ChunkRef)> {
    let t = m.tensors.iter().map(|t| (t.name.as_str(), &t.chunks));
    let b = m.blobs.iter().map(|b| (b.name.as_str(), &b.chunks));
    t.chain(b)
        .flat_map(|(n, cs)| cs.iter().enumerate().map(move |(i, c)| (n, i, c)))
}

/// Sum of the raw bytes of all tensors and blobs.
pub fn logical_bytes(m: &Manifest) -> u64 {
    m.tensors.iter().map(|t| t.nbytes).sum::<u64>() + m.blobs.iter().map(|b| b.nbytes).sum::<u64>()
}

/// Every chunk of a manifest, tensors first, then blobs.
pub fn all_chunks(m: &Manifest) -> impl Iterator<Item = &pb::ChunkRef> {
    m.tensors
        .iter()
        .flat_map(|t| t.chunks.iter())
        .chain(m.blobs.iter().flat_map(|b| b.chunks.iter()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbytes_overflow_is_none() {
        assert_eq!(tensor_nbytes(DType::F32, &[2, 3]), Some(24));
        assert_eq!(tensor_nbytes(DType::F32, &[]), Some(4));
        assert_eq!(tensor_nbytes(DType::F64, &[1 << 62, 4]), None);
    }

    #[test]
    fn validate_rejects_huge_chunk_length() {
        let m = Manifest {
            blobs: vec![pb::BlobEntry {
                name: "b".into(),
                nbytes: 1 << 60,
                chunks: vec![pb::ChunkRef {
                    segment: 1,
                    offset: 4096,
                    stored_len: 1 << 60,
                    raw_len: 1 << 60,
                    codec: 0,
                    blake3: vec![0; 32],
                    nonce: vec![],
                    tag: vec![],
                }],
            }],
            ..Default::default()
        };
        let e = validate(&m, "test").unwrap_err().to_string();
        assert!(e.contains("outside"), "{e}");
    }
}
