//! `ckptstore inspect`: one checkpoint in detail: info, metadata, tensors and blobs with
//! their chunks and the segments that hold them.

use super::{age, emit, emit_json, hex, human_bytes, info_json, iso_time, meta_text};
use super::{open_read_only, selector, table, CliResult};
use ckptstore::proto::v1::ChunkRef;
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;

/// Arguments of `ckptstore inspect`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The store directory.
    pub dir: PathBuf,
    /// Training step of the checkpoint (the newest one with that step). Default: the latest
    /// checkpoint.
    pub step: Option<u64>,
    /// Checkpoint id instead of a step.
    #[arg(long, conflicts_with = "step")]
    pub id: Option<u64>,
    /// Also list every chunk (segment, offset, length, BLAKE3).
    #[arg(long)]
    pub chunks: bool,
    /// Print JSON: the `ls --json` fields plus `tensors` and `blobs` arrays (name, dtype,
    /// shape, bytes, chunks, new_bytes, segments) and `new_segments`.
    #[arg(long)]
    pub json: bool,
}

/// One tensor or blob, as printed.
struct Item {
    name: String,
    dtype: Option<String>,
    shape: Option<Vec<u64>>,
    bytes: u64,
    chunks: Vec<ChunkRef>,
    /// Bytes of its chunks stored in segments this checkpoint created (not deduplicated).
    new_bytes: u64,
    segments: BTreeSet<u64>,
}

fn item(
    name: &str,
    dtype: Option<String>,
    shape: Option<Vec<u64>>,
    bytes: u64,
    chunks: &[ChunkRef],
    new_segments: &HashSet<u64>,
) -> Item {
    let mut seen = HashSet::new();
    let new_bytes = chunks
        .iter()
        .filter(|c| new_segments.contains(&c.segment) && seen.insert((c.segment, c.offset)))
        .map(|c| c.stored_len)
        .sum();
    Item {
        name: name.to_owned(),
        dtype,
        shape,
        bytes,
        chunks: chunks.to_vec(),
        new_bytes,
        segments: chunks.iter().map(|c| c.segment).collect(),
    }
}

/// The codec's name as in the .proto (`NONE`, `ZSTD`, `ZSTD_SHUFFLE4`, ...).
fn codec_name(codec: i32) -> String {
    ckptstore::proto::v1::Codec::try_from(codec).map_or_else(
        |_| format!("UNKNOWN_{codec}"),
        |c| c.as_str_name().to_owned(),
    )
}

fn chunk_json(c: &ChunkRef) -> Value {
    json!({
        "segment": c.segment,
        "offset": c.offset,
        "stored_len": c.stored_len,
        "raw_len": c.raw_len,
        "codec": codec_name(c.codec),
        "blake3": hex(&c.blake3),
    })
}

fn item_json(i: &Item, with_chunks: bool) -> Value {
    let mut v = json!({
        "name": i.name,
        "bytes": i.bytes,
        "chunks": i.chunks.len(),
        "new_bytes": i.new_bytes,
        "segments": i.segments.iter().collect::<Vec<_>>(),
    });
    if let (Some(d), Some(s)) = (&i.dtype, &i.shape) {
        v["dtype"] = json!(d);
        v["shape"] = json!(s);
    }
    if with_chunks {
        v["chunk_refs"] = Value::Array(i.chunks.iter().map(chunk_json).collect());
    }
    v
}

fn segments_text(s: &BTreeSet<u64>) -> String {
    s.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

/// Prints one checkpoint.
pub fn run(a: Args) -> CliResult {
    let store = open_read_only(&a.dir)?;
    let ck = store.checkpoint(selector(a.step, a.id))?;
    let info = ck.info();
    let m = ck.manifest();
    let new_segments: HashSet<u64> = m.new_segments.iter().map(|s| s.id).collect();
    let mut tensors = Vec::new();
    for t in &m.tensors {
        let (dtype, shape) = ck.tensor_meta(&t.name)?;
        tensors.push(item(
            &t.name,
            Some(dtype.name().to_owned()),
            Some(shape),
            t.nbytes,
            &t.chunks,
            &new_segments,
        ));
    }
    let blobs: Vec<Item> = m
        .blobs
        .iter()
        .map(|b| item(&b.name, None, None, b.nbytes, &b.chunks, &new_segments))
        .collect();
    let all_chunks: Vec<&ChunkRef> = m
        .tensors
        .iter()
        .flat_map(|t| &t.chunks)
        .chain(m.blobs.iter().flat_map(|b| &b.chunks))
        .collect();
    let mut seen = HashSet::new();
    let new_bytes: u64 = all_chunks
        .iter()
        .filter(|c| new_segments.contains(&c.segment) && seen.insert((c.segment, c.offset)))
        .map(|c| c.stored_len)
        .sum();
    let segments: BTreeSet<u64> = all_chunks.iter().map(|c| c.segment).collect();

    if a.json {
        let mut v = info_json(&info);
        v["new_bytes"] = json!(new_bytes);
        v["segments"] = json!(segments.iter().collect::<Vec<_>>());
        v["new_segments"] = Value::Array(
            m.new_segments
                .iter()
                .map(|s| json!({ "id": s.id, "length": s.length }))
                .collect(),
        );
        v["tensors"] = Value::Array(tensors.iter().map(|i| item_json(i, a.chunks)).collect());
        v["blobs"] = Value::Array(blobs.iter().map(|i| item_json(i, a.chunks)).collect());
        return emit_json(&v);
    }

    let mut out = format!(
        "checkpoint {}  step {}  epoch {}\n",
        info.id, info.step, info.epoch
    );
    out += &format!(
        "time        {} ({})\n",
        iso_time(info.wall_time_unix_ns),
        age(info.wall_time_unix_ns)
    );
    out += &format!(
        "size        {} in {} tensor(s) and {} blob(s), {} chunks\n",
        human_bytes(info.bytes),
        info.tensors,
        info.blobs,
        all_chunks.len()
    );
    out += &format!(
        "stored      {} new in segments [{}]; {} shared with earlier checkpoints\n",
        human_bytes(new_bytes),
        segments_text(&new_segments.iter().copied().collect()),
        human_bytes(info.bytes.saturating_sub(new_bytes)),
    );
    out += &format!("segments    [{}]\n", segments_text(&segments));
    if info.metadata.is_empty() {
        out += "metadata    (none)\n";
    } else {
        out += "metadata\n";
        let w = info.metadata.keys().map(|k| k.len()).max().unwrap_or(0);
        for (k, v) in &info.metadata {
            out += &format!("  {k:w$}  {}\n", meta_text(v));
        }
    }
    let chunk_lines = |i: &Item, out: &mut String| {
        if a.chunks {
            for (n, c) in i.chunks.iter().enumerate() {
                let len = if c.stored_len == c.raw_len {
                    c.stored_len.to_string()
                } else {
                    format!(
                        "{} ({} raw, {})",
                        c.stored_len,
                        c.raw_len,
                        codec_name(c.codec)
                    )
                };
                *out += &format!(
                    "    chunk {n}: segment {} offset {} len {len} blake3 {}\n",
                    c.segment,
                    c.offset,
                    hex(&c.blake3)
                );
            }
        }
    };
    if !tensors.is_empty() {
        out += "\n";
        if a.chunks {
            for i in &tensors {
                out += &format!(
                    "tensor {} {} {:?} {}\n",
                    i.name,
                    i.dtype.as_deref().unwrap_or("?"),
                    i.shape.as_deref().unwrap_or(&[]),
                    human_bytes(i.bytes)
                );
                chunk_lines(i, &mut out);
            }
        } else {
            let rows: Vec<Vec<String>> = tensors
                .iter()
                .map(|i| {
                    vec![
                        i.name.clone(),
                        i.dtype.clone().unwrap_or_default(),
                        format!("{:?}", i.shape.as_deref().unwrap_or(&[])),
                        human_bytes(i.bytes),
                        i.chunks.len().to_string(),
                        human_bytes(i.new_bytes),
                        segments_text(&i.segments),
                    ]
                })
                .collect();
            out += &table(
                &[
                    "TENSOR", "DTYPE", "SHAPE", "SIZE", "CHUNKS", "NEW", "SEGMENTS",
                ],
                &[false, false, false, true, true, true, false],
                &rows,
            );
        }
    }
    if !blobs.is_empty() {
        out += "\n";
        if a.chunks {
            for i in &blobs {
                out += &format!("blob {} {}\n", i.name, human_bytes(i.bytes));
                chunk_lines(i, &mut out);
            }
        } else {
            let rows: Vec<Vec<String>> = blobs
                .iter()
                .map(|i| {
                    vec![
                        i.name.clone(),
                        human_bytes(i.bytes),
                        i.chunks.len().to_string(),
                        human_bytes(i.new_bytes),
                        segments_text(&i.segments),
                    ]
                })
                .collect();
            out += &table(
                &["BLOB", "SIZE", "CHUNKS", "NEW", "SEGMENTS"],
                &[false, true, true, true, false],
                &rows,
            );
        }
    }
    emit(&out)
}
