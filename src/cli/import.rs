//! `ckptstore import`: commit a file in another format (safetensors, MindSpore `.ckpt`) to a
//! store as one new checkpoint.
//!
//! The input file is not store state: it is opened with `std::fs` here and read one tensor at
//! a time; the store side is one ordinary transaction, durable when the command succeeds.

use super::{emit, emit_json, fail, human_bytes, human_duration, CliResult, Failure};
use ckptstore::{interop, Options, Store};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::time::Instant;

/// Input formats of `import`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Hugging Face safetensors.
    Safetensors,
    /// MindSpore `.ckpt` (`mindspore.save_checkpoint`; slices joined, CRC trailer checked).
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

/// Arguments of `ckptstore import`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The file to import.
    pub file: PathBuf,
    /// The store directory (created if it does not exist). Fails if another process holds
    /// the store's writer lock.
    pub dir: PathBuf,
    /// Training step of the new checkpoint. Default: the file's step (safetensors
    /// `__metadata__["step"]`, MindSpore `step_num`), or 0.
    #[arg(long)]
    pub step: Option<u64>,
    /// Input format. Default: from the file name's extension (`.safetensors`, `.ckpt`).
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// I/O backend: auto (uring where io_uring can be set up, else std), std or uring.
    #[arg(long, default_value = "auto")]
    pub io: ckptstore::io::IoBackend,
    /// Print JSON: {"format", "file", "dir", "id", "step", "epoch", "tensors", "blobs",
    /// "metadata", "data_bytes", "duration_ns"}.
    #[arg(long)]
    pub json: bool,
}

/// Imports one file as a new checkpoint.
pub fn run(a: Args) -> CliResult {
    let started = Instant::now();
    let format = match a.format {
        Some(f) => f,
        None => match a.file.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => Format::Safetensors,
            Some("ckpt") => Format::Mindspore,
            _ => {
                return fail(format!(
                    "cannot tell the format of {} from its name; pass --format safetensors or \
                     --format mindspore",
                    a.file.display()
                ))
            }
        },
    };
    let file = File::open(&a.file).map_err(|e| Failure(format!("{}: {e}", a.file.display())))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut input = BufReader::with_capacity(1 << 20, file);
    let io = a.io.open();
    if let Some(why) = &io.fallback_reason {
        eprintln!("ckptstore: I/O backend {}: {why}", io.backend);
    }
    let opts = Options {
        io: io.io,
        ..super::store_options()
    };
    let mut store = Store::open(&a.dir, opts)?;
    // Hidden automatically when stderr is not a terminal.
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "importing [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let mut progress = |n| bar.inc(n);
    let result = match format {
        Format::Safetensors => {
            interop::import_safetensors(&mut store, &mut input, &a.file, a.step, &mut progress)
        }
        Format::Mindspore => {
            interop::import_mindspore(&mut store, &mut input, &a.file, a.step, &mut progress)
        }
    };
    bar.finish_and_clear();
    let s = result?;
    let elapsed = started.elapsed();
    if a.json {
        return emit_json(&json!({
            "format": format.name(),
            "file": a.file.display().to_string(),
            "dir": a.dir.display().to_string(),
            "id": s.id,
            "step": s.step,
            "epoch": s.epoch,
            "tensors": s.tensors,
            "blobs": s.blobs,
            "metadata": s.metadata,
            "data_bytes": s.data_bytes,
            "duration_ns": elapsed.as_nanos() as u64,
        }));
    }
    emit(&format!(
        "imported {} into {} as checkpoint {} (step {}, epoch {}): {} tensors, {} blobs, {} metadata entries, {} in {}\n",
        a.file.display(),
        a.dir.display(),
        s.id,
        s.step,
        s.epoch,
        s.tensors,
        s.blobs,
        s.metadata,
        human_bytes(s.data_bytes),
        human_duration(elapsed)
    ))
}
