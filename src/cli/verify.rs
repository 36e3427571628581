//! `ckptstore verify`: read every chunk of one or all checkpoints and check its BLAKE3.

use super::CliResult;
use super::{emit, emit_json, fail, human_bytes, human_duration, open_read_only, selector};
use ckptstore::{CheckpointInfo, VerifiedChunks};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `ckptstore verify`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The store directory.
    pub dir: PathBuf,
    /// Verify only the newest checkpoint with this training step. Default: all checkpoints.
    pub step: Option<u64>,
    /// Verify only the checkpoint with this id.
    #[arg(long, conflicts_with = "step")]
    pub id: Option<u64>,
    /// Verify every checkpoint (the default when no STEP or --id is given).
    #[arg(long, conflicts_with_all = ["step", "id"])]
    pub all: bool,
    /// Print JSON: {"ok": bool, "bytes": n, "checkpoints": [{"id", "step", "bytes", "ok",
    /// "error"}]}. The exit status and the stderr line are the same as without it.
    #[arg(long)]
    pub json: bool,
}

/// Verifies; exits non-zero with the first failure (checkpoint, tensor, chunk) on stderr.
pub fn run(a: Args) -> CliResult {
    let started = Instant::now();
    let store = open_read_only(&a.dir)?;
    let targets: Vec<CheckpointInfo> = if a.step.is_none() && a.id.is_none() {
        store.list()
    } else {
        vec![store.info(selector(a.step, a.id))?]
    };
    let total: u64 = targets.iter().map(|c| c.bytes).sum();
    // Hidden automatically when stderr is not a terminal.
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "verifying {msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let mut results = Vec::new();
    // Chunks shared between checkpoints (frozen layers) are hashed once for the whole run.
    let mut seen = VerifiedChunks::default();
    for c in &targets {
        bar.set_message(format!("checkpoint {} (step {})", c.id, c.step));
        let r = store.verify_with(c.id, &mut seen);
        bar.inc(c.bytes);
        results.push((c, r));
    }
    bar.finish_and_clear();

    let bad: Vec<String> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    if a.json {
        let items: Vec<Value> = results
            .iter()
            .map(|(c, r)| {
                json!({
                    "id": c.id,
                    "step": c.step,
                    "bytes": c.bytes,
                    "ok": r.is_ok(),
                    "error": r.as_ref().err().map(|e| e.to_string()),
                })
            })
            .collect();
        emit_json(&json!({ "ok": bad.is_empty(), "bytes": total, "checkpoints": items }))?;
    } else {
        let mut out = String::new();
        for (c, r) in &results {
            match r {
                Ok(()) => {
                    out += &format!(
                        "ok   checkpoint {} (step {}, {})\n",
                        c.id,
                        c.step,
                        human_bytes(c.bytes)
                    )
                }
                Err(e) => out += &format!("BAD  checkpoint {} (step {}): {e}\n", c.id, c.step),
            }
        }
        if bad.is_empty() {
            out += &format!(
                "verified {} checkpoint{} ({}) in {}: all chunks match their BLAKE3\n",
                results.len(),
                if results.len() == 1 { "" } else { "s" },
                human_bytes(total),
                human_duration(started.elapsed())
            );
        }
        emit(&out)?;
    }
    match bad.len() {
        0 => Ok(()),
        1 => fail(bad[0].clone()),
        n => fail(format!("{} (and {} more bad checkpoints)", bad[0], n - 1)),
    }
}
