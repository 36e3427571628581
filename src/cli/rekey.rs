//! `ckptstore rekey`: reseal every live checkpoint under the current key (`--key-file`),
//! reading the older ones with `--old-key-file`; crash-safe (`Store::rekey`).

use super::{check_dir, emit, emit_json, fail, human_bytes, CliResult};
use ckptstore::current::CURRENT_NAME;
use ckptstore::Store;
use serde_json::json;
use std::path::PathBuf;

/// Arguments of `ckptstore rekey`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The store directory.
    pub dir: PathBuf,
    /// Print JSON: {"checkpoints", "chunks_written", "bytes_written", "segments_freed",
    /// "segments_pending"}.
    #[arg(long)]
    pub json: bool,
}

/// Reseals what is not under the new key, then frees the old bytes.
pub fn run(a: Args) -> CliResult {
    check_dir(&a.dir)?;
    if !a.dir.join(CURRENT_NAME).exists() {
        return fail(format!(
            "{} is not a ckptstore store (no CURRENT file)",
            a.dir.display()
        ));
    }
    let opts = super::store_options();
    if opts.encryption_key.is_none() {
        return fail("rekey needs the new key: --key-file (or CKPTSTORE_KEY_FILE / CKPTSTORE_KEY)");
    }
    let mut store = Store::open(&a.dir, opts)?;
    let r = store.rekey(|_, _| {})?;
    if a.json {
        return emit_json(&json!({
            "checkpoints": r.checkpoints,
            "chunks_written": r.chunks_written,
            "bytes_written": r.bytes_written,
            "segments_freed": r.segments_freed,
            "segments_pending": r.segments_pending,
        }));
    }
    emit(&format!(
        "resealed {} checkpoint(s) under the new key: {} chunks, {} written; {} old segment(s) \
         freed, {} held by open readers\n",
        r.checkpoints.len(),
        r.chunks_written,
        human_bytes(r.bytes_written),
        r.segments_freed.len(),
        r.segments_pending.len()
    ))
}
