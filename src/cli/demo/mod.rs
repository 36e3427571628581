//! `ckptstore demo`: the store's main job, end to end. A synthetic training run saves a
//! checkpoint every K steps from a child writer process; the demo SIGKILLs that writer in the
//! middle of a save, reopens the store (recovery), checks the newest checkpoint is at least
//! the last acknowledged one and bit-exact, resumes training from it, and summarizes.
//!
//! The training state is a pure function of (seed, tensor name, step), so the state of any
//! step can be regenerated to check a checkpoint byte for byte.
//!
//! Files: `model` (the synthetic training state), `writer` (the hidden child process and its
//! line protocol), then the demo's phases in order: `kill` (train in the writer, SIGKILL it
//! mid-save), `recover` (reopen and check), `resume` (train on, verify), `summary`.

mod kill;
mod model;
mod recover;
mod resume;
mod summary;
mod writer;

pub use writer::run_writer;

use super::{fail, human_bytes, say, CliResult};
use ckptstore::io::{IoBackend, OpenedBackend};
use indicatif::{ProgressBar, ProgressStyle};
use model::Model;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Arguments of `ckptstore demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Store directory; must be absent or empty. Default: a fresh directory under the
    /// system temp dir.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Training steps.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub steps: u64,
    /// Save a checkpoint every K steps.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub save_every: u64,
    /// Size of the synthetic training state in MiB: a quarter is a frozen f32 embedding
    /// (deduplicated after the first save), the rest bf16 layers and f32 Adam moments that
    /// change every step.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub state_mib: u64,
    /// Keep the store directory at the end (it is always kept when the demo fails).
    #[arg(long)]
    pub keep: bool,
    /// Commits the writer gets acknowledged before it is killed during its next save.
    #[arg(long, default_value_t = 2)]
    pub kill_after: u64,
    /// Milliseconds from the writer announcing that save to the SIGKILL. Default: 40% of
    /// the writer's average save time so far, so the kill lands mid-save.
    #[arg(long)]
    pub kill_delay_ms: Option<u64>,
    /// Seed of the synthetic training state.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// I/O backend: `std` (pwrite + fdatasync), `uring` (io_uring batches, O_DIRECT where
    /// the file system takes it), or `auto` (uring where io_uring can be set up, else std;
    /// `CKPTSTORE_IO` overrides). Where io_uring is unavailable, `uring` falls back to `std`
    /// and says so.
    #[arg(long, default_value = "auto")]
    pub io: IoBackend,
}

/// Arguments of the hidden child writer (`ckptstore __demo-writer`).
#[derive(Debug, clap::Args)]
pub struct WriterArgs {
    /// Store directory.
    #[arg(long)]
    pub dir: PathBuf,
    /// Training steps.
    #[arg(long)]
    pub steps: u64,
    /// Save every K steps.
    #[arg(long)]
    pub save_every: u64,
    /// State size in MiB.
    #[arg(long)]
    pub state_mib: u64,
    /// Seed.
    #[arg(long)]
    pub seed: u64,
    /// I/O backend (auto, std or uring).
    #[arg(long, default_value = "auto")]
    pub io: IoBackend,
}

fn prepare_dir(dir: Option<PathBuf>) -> CliResult<PathBuf> {
    let dir = match dir {
        Some(d) => d,
        None => {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            std::env::temp_dir().join(format!("ckptstore-demo-{}-{nanos}", std::process::id()))
        }
    };
    match std::fs::read_dir(&dir) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                return fail(format!(
                    "demo directory {} is not empty; pass an empty or new one with --dir",
                    dir.display()
                ));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&dir)
                .map_err(|e| super::Failure(format!("create {}: {e}", dir.display())))?;
        }
        Err(e) => return fail(format!("{}: {e}", dir.display())),
    }
    Ok(dir)
}

/// Runs the demo; see the module docs.
pub fn run(a: Args) -> CliResult {
    let saves = a.steps / a.save_every;
    if saves <= a.kill_after {
        return fail(format!(
            "--steps {} with --save-every {} makes {saves} saves; the kill needs at least {} \
             (--kill-after {} commits, then one to interrupt)",
            a.steps,
            a.save_every,
            a.kill_after + 1,
            a.kill_after
        ));
    }
    let dir = prepare_dir(a.dir.clone())?;
    match demo(&a, &dir) {
        Ok(()) => {
            if !a.keep {
                let _ = std::fs::remove_dir_all(&dir);
            }
            Ok(())
        }
        Err(super::Failure(why)) => fail(format!("{why} (store kept at {})", dir.display())),
    }
}

fn demo(a: &Args, dir: &Path) -> CliResult {
    let started = Instant::now();
    let model = Model::new(a.seed, a.state_mib, a.steps);
    let bar = ProgressBar::new(a.steps);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>9} [{bar:30}] step {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    say(
        &bar,
        format!(
            "demo: {} of training state ({} tensors, {} frozen), {} steps, a checkpoint every {}",
            human_bytes(model.state_bytes()),
            model.specs.len(),
            human_bytes(model.frozen_bytes()),
            a.steps,
            a.save_every
        ),
    );
    say(&bar, format!("demo: store {}", dir.display()));
    let opened = a.io.open();
    say(&bar, backend_line(&opened));

    let killed = kill::train_and_kill(a, dir, &bar)?;
    let mut rec = recover::recover(dir, opened.io, &bar, &model, &killed)?;
    let resumed = resume::resume_and_verify(
        a,
        &bar,
        &model,
        &mut rec.store,
        rec.resume_step,
        &killed.acked,
    )?;
    bar.finish_and_clear();
    summary::print(a, dir, started, &model, &killed, &rec, &resumed)
}

/// The line that says which I/O backend runs, and why not the one asked for.
fn backend_line(o: &OpenedBackend) -> String {
    match &o.fallback_reason {
        None => format!("demo: I/O backend {}", o.backend),
        Some(why) => format!("demo: I/O backend {} (uring unavailable: {why})", o.backend),
    }
}
