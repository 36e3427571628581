//! `ckptstore ls`: the checkpoints of a store, as a table or JSON.

use super::{age, emit, emit_json, human_bytes, info_json, iso_time, meta_text, open_read_only};
use super::{table, CliResult};
use std::path::PathBuf;

/// Arguments of `ckptstore ls`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The store directory.
    pub dir: PathBuf,
    /// Print a JSON array, one object per checkpoint (oldest first): id, step, epoch,
    /// time_unix_ns, time (RFC 3339 UTC), tensors, blobs, bytes, metadata, pinned.
    #[arg(long)]
    pub json: bool,
}

/// Lists checkpoints. Opens read-only, so it works while a writer runs.
pub fn run(a: Args) -> CliResult {
    let store = open_read_only(&a.dir)?;
    let list = store.list();
    if a.json {
        return emit_json(&serde_json::Value::Array(
            list.iter().map(info_json).collect(),
        ));
    }
    if list.is_empty() {
        return emit(&format!("no checkpoints in {}\n", a.dir.display()));
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|c| {
            // The table shows a checkpoint's `name` first and leaves out the `ckptstore.`
            // keys conventions keep for themselves (FORMAT.md); --json and inspect show all.
            let mut shown: Vec<_> = c
                .metadata
                .iter()
                .filter(|(k, _)| !k.starts_with("ckptstore."))
                .collect();
            shown.sort_by_key(|(k, _)| k.as_str() != "name");
            let meta = shown
                .iter()
                .map(|(k, v)| format!("{k}={}", meta_text(v)))
                .collect::<Vec<_>>()
                .join(" ");
            vec![
                c.id.to_string(),
                c.step.to_string(),
                c.epoch.to_string(),
                iso_time(c.wall_time_unix_ns),
                age(c.wall_time_unix_ns),
                c.tensors.to_string(),
                c.blobs.to_string(),
                human_bytes(c.bytes),
                if c.pinned { "yes" } else { "" }.into(),
                meta,
            ]
        })
        .collect();
    emit(&table(
        &[
            "ID",
            "STEP",
            "EPOCH",
            "TIME (UTC)",
            "AGE",
            "TENSORS",
            "BLOBS",
            "SIZE",
            "PINNED",
            "METADATA",
        ],
        &[
            true, true, true, false, true, true, true, true, false, false,
        ],
        &rows,
    ))
}
