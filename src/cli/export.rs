//! `ckptstore export`: write one checkpoint to a file in another format (safetensors,
//! MindSpore `.ckpt`).
//!
//! The output file is not store state: it is written with `std::fs` here, to a temp file next
//! to `OUT` (exclusive, random name, 0600), then fsync'ed, renamed over `OUT`, and the directory
//! fsync'ed, so `OUT` is either the old file or the whole new one, never a torn one.

use super::{emit, emit_json, fail, human_bytes, human_duration, open_read_only, selector};
use super::{CliResult, Failure};
use ckptstore::interop;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::time::Instant;

/// Output formats of `export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Hugging Face safetensors (`__metadata__` holds step, epoch, id and user metadata).
    Safetensors,
    /// MindSpore `.ckpt`, as `mindspore.save_checkpoint` writes it (`step_num`/`epoch_num`
    /// Int64 scalars, metadata as `append_info` values; `--crc` adds the `crc_num` trailer).
    Mindspore,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Safetensors => "safetensors",
            Format::Mindspore => "mindspore",
        }
    }
}

/// Arguments of `ckptstore export`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The store directory, optionally the training STEP (default: the newest checkpoint),
    /// and the output file.
    #[arg(value_name = "DIR [STEP] OUT", num_args = 1.., required = true)]
    pub args: Vec<String>,
    /// Export the checkpoint with this id instead of by step.
    #[arg(long)]
    pub id: Option<u64>,
    /// Output format. Default: `mindspore` when OUT ends in `.ckpt`, else `safetensors`.
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// With `--format mindspore`: end the file with MindSpore's CRC-32 trailer (what
    /// `save_checkpoint(..., crc_check=True)` writes; `load_checkpoint(..., crc_check=True)`
    /// checks it).
    #[arg(long)]
    pub crc: bool,
    /// Print JSON: {"format", "out", "id", "step", "tensors", "blobs", "data_bytes",
    /// "file_bytes", "duration_ns"}.
    #[arg(long)]
    pub json: bool,
}

/// Writes a temp file next to `out`, fsyncs it, renames it to `out`, fsyncs the directory.
/// The temp file is created exclusively (`O_EXCL`: never an existing file, never through a
/// symlink) with a random name (`.OUT.XXXXXX.tmp`) and mode 0600, so nobody can predict it,
/// plant a link there, or read the weights while they are written; `rename` replaces `out`
/// itself, never what a symlink named `out` points to. On error only that temp file is removed.
fn write_atomically(
    out: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> CliResult<interop::ExportSummary>,
) -> CliResult<interop::ExportSummary> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let base = out.file_name().map(|n| n.to_string_lossy().into_owned());
    let prefix = format!(".{}.", base.as_deref().unwrap_or("export"));
    let tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .tempfile_in(parent)
        .map_err(|e| Failure(format!("create a temp file in {}: {e}", parent.display())))?;
    let tmp_name = tmp.path().to_path_buf();
    let (file, tmp_path) = tmp.into_parts();
    let mut w = BufWriter::with_capacity(1 << 20, file);
    // `tmp_path` removes the temp file when dropped, unless it was persisted (renamed).
    let summary = write(&mut w)?;
    let file = w
        .into_inner()
        .map_err(|e| Failure(format!("write {}: {}", tmp_name.display(), e.error())))?;
    file.sync_all()
        .map_err(|e| Failure(format!("fsync {}: {e}", tmp_name.display())))?;
    drop(file);
    tmp_path.persist(out).map_err(|e| {
        Failure(format!(
            "rename {} to {}: {}",
            tmp_name.display(),
            out.display(),
            e.error
        ))
    })?;
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| Failure(format!("fsync directory {}: {e}", parent.display())))?;
    Ok(summary)
}

/// Exports one checkpoint.
pub fn run(a: Args) -> CliResult {
    let started = Instant::now();
    let (dir, step, out) = match &a.args[..] {
        [dir, out] => (dir, None, out),
        [dir, step, out] => match step.parse::<u64>() {
            Ok(s) => (dir, Some(s), out),
            Err(_) => return fail(format!("STEP {step:?} is not a non-negative integer")),
        },
        _ => {
            return fail(
                "expected DIR [STEP] OUT: the store, optionally a step, and the output file",
            )
        }
    };
    if step.is_some() && a.id.is_some() {
        return fail("give STEP or --id, not both");
    }
    let format =
        a.format.unwrap_or_else(
            || match Path::new(out).extension().and_then(|e| e.to_str()) {
                Some("ckpt") => Format::Mindspore,
                _ => Format::Safetensors,
            },
        );
    if a.crc && format != Format::Mindspore {
        return fail("--crc is for --format mindspore (safetensors has no CRC trailer)");
    }
    let (dir, out) = (Path::new(dir), Path::new(out));
    if out.is_dir() {
        return fail(format!(
            "{} is a directory; name the output file",
            out.display()
        ));
    }
    let store = open_read_only(dir)?;
    let ck = store.checkpoint(selector(step, a.id))?;
    let info = ck.info();
    // Hidden automatically when stderr is not a terminal.
    let bar = ProgressBar::new(info.bytes);
    bar.set_style(
        ProgressStyle::with_template(
            "exporting {msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("checkpoint {} (step {})", info.id, info.step));
    let mut progress = |n| bar.inc(n);
    let summary = write_atomically(out, |w| {
        Ok(match format {
            Format::Safetensors => interop::export_safetensors(&ck, w, out, &mut progress)?,
            Format::Mindspore => {
                let opts = interop::MindSporeExport {
                    crc: a.crc,
                    ..Default::default()
                };
                interop::export_mindspore(&ck, w, out, opts, &mut progress)?
            }
        })
    });
    bar.finish_and_clear();
    let s = summary?;
    let elapsed = started.elapsed();
    if a.json {
        return emit_json(&json!({
            "format": format.name(),
            "out": out.display().to_string(),
            "id": s.id,
            "step": s.step,
            "tensors": s.tensors,
            "blobs": s.blobs,
            "data_bytes": s.data_bytes,
            "file_bytes": s.file_bytes,
            "duration_ns": elapsed.as_nanos() as u64,
        }));
    }
    emit(&format!(
        "exported checkpoint {} (step {}) to {}: {} tensors ({} of them blobs), {} in {}\n",
        s.id,
        s.step,
        out.display(),
        s.tensors,
        s.blobs,
        human_bytes(s.file_bytes),
        human_duration(elapsed)
    ))
}
