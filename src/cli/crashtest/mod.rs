//! `ckptstore crashtest`: the kill loop, for users on their own file system.
//!
//! A child writer process (`ckptstore __crash-writer`) opens the store and saves checkpoints
//! in a loop: several tensors cut into many small chunks (some frozen or slow-changing, so
//! deduplication hits), blobs, metadata, deletions that keep the last few, WAL compaction
//! (automatic with a tiny threshold, and explicit now and then). Before each operation it
//! prints what it starts, after each it prints the acknowledgement, flushing stdout every
//! time. The parent SIGKILLs it at a random moment (seeded), then reopens the store and
//! checks it against a ledger built from the acknowledgements:
//!
//! (a) the store opens; (b) every acknowledged, not-deleted checkpoint is listed and reads back
//! bit-exact (its content is a pure function of the data seed and its step, so it is
//! regenerated); (c) every listed checkpoint verifies, and nothing is listed that was never
//! acknowledged or in flight; (d) after a writer's recovery nothing is left over: every
//! segment file is referenced by a live checkpoint, there is one WAL file (the one `CURRENT`
//! names), no `CURRENT.tmp`; (e) the next writer continues on the same store.
//!
//! Sometimes the parent only looks (a read-only open, which repairs nothing) and hands the
//! torn store to the next writer, which it kills early, during that writer's own recovery.
//!
//! With `--async` the writer saves through the [`Pipeline`](ckptstore::Pipeline), keeping up
//! to `--in-flight` saves begun and not acknowledged (acknowledged in submission order). The
//! ledger then holds several pending saves, and (c) gains: those found committed after a kill
//! are the oldest pending ones, in submission order.
//!
//! Files: `workload` (what a writer saves: a pure function of seed and step), `writer` (the
//! hidden child process), `ledger` (the model built from the writers' acknowledgements),
//! `check` (the invariants checked after each kill), `report` (the summary); this file has
//! the arguments and the kill loop.

mod check;
mod ledger;
mod report;
mod workload;
mod writer;

pub use writer::run_writer;

use super::synth::Rng;
use super::{fail, CliResult, Failure, Reaper};
use indicatif::{ProgressBar, ProgressStyle};
use ledger::{Ledger, Phase, Run, Tally};
use report::report;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Arguments of `ckptstore crashtest`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
A process kill keeps the page cache: this proves the ordering of the commit protocol and of \
recovery on the file system under DIR (and catches file systems or FUSE mounts that break \
rename, fsync-of-directory or flock semantics), not that the disk honours fsync on power loss.

With --async the writer saves through the asynchronous write pipeline with up to --in-flight \
saves begun and not acknowledged; after each kill, the saves in flight that committed must be \
the oldest of them, in submission order.

Exit status: 0 if no violation was found; 1 with a one-line reason on stderr naming the first \
violation (the store is kept for inspection).")]
pub struct Args {
    /// Store directory: new, empty, or a store that an earlier crashtest left (continued).
    /// Put it on the file system you want to test.
    #[arg(long)]
    pub dir: PathBuf,
    /// Number of SIGKILLs to deliver.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub kills: u64,
    /// Seed of the kill times and choices (and, for a new store, of the checkpoint data).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Save through the asynchronous write pipeline, with several saves submitted and not
    /// yet acknowledged when the kill lands (default: synchronous saves, one at a time).
    #[arg(long = "async")]
    pub asynchronous: bool,
    /// With --async: the most saves the writer keeps submitted and not yet acknowledged.
    #[arg(long, value_name = "K", default_value_t = 3, requires = "asynchronous",
          value_parser = clap::value_parser!(u64).range(1..=64))]
    pub in_flight: u64,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Testing the checker itself: make a violation happen.
    #[arg(long, value_enum, hide = true)]
    pub inject_fault: Option<Fault>,
}

/// A fault injected to show the checker catches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// The writer acknowledges a commit it never made.
    Lie,
    /// The parent flips a byte of an acknowledged checkpoint between a kill and the check.
    Corrupt,
    /// With --async: the writer begins two saves, drops the first and commits the second (a
    /// later save survives an earlier one that was lost).
    Reorder,
}

/// Arguments of the hidden child writer (`ckptstore __crash-writer`).
#[derive(Debug, clap::Args)]
pub struct WriterArgs {
    /// Store directory.
    #[arg(long)]
    pub dir: PathBuf,
    /// Seed of the checkpoint data.
    #[arg(long)]
    pub seed: u64,
    /// Step of the first checkpoint this writer saves.
    #[arg(long)]
    pub first_step: u64,
    /// Acknowledge one commit that is never made (to test the checker).
    #[arg(long)]
    pub lie: bool,
    /// Save through the pipeline with up to this many saves not yet acknowledged (absent:
    /// synchronous saves).
    #[arg(long)]
    pub in_flight: Option<usize>,
    /// Begin two saves, drop the first, commit the second, then stop (to test the checker).
    #[arg(long)]
    pub reorder: bool,
}

const MARKER: &str = "crashtest.json";
const MARKER_TOOL: &str = "ckptstore crashtest";

/// Running estimates of how long a writer takes, for aiming kills.
#[derive(Debug)]
struct Timing {
    /// From spawn to the `opening` line (process startup).
    opening: f64,
    /// From spawn to the `opened` line (startup and recovery).
    opened: f64,
    /// Between consecutive acknowledged commits of one writer.
    period: f64,
}

impl Timing {
    fn update(v: &mut f64, sample: Duration) {
        *v = 0.8 * *v + 0.2 * sample.as_secs_f64();
    }
}

/// Creates or validates the directory; returns the data seed and whether the store is an
/// earlier crashtest's, continued.
fn prepare_dir(dir: &Path, seed: u64) -> CliResult<(u64, bool)> {
    let refuse = || {
        fail(format!(
            "{} is not empty and is not a crashtest store (no valid {MARKER}); crashtest \
             writes and deletes checkpoints, so give it a new or empty directory",
            dir.display()
        ))
    };
    match std::fs::read_dir(dir) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                let Ok(text) = std::fs::read_to_string(dir.join(MARKER)) else {
                    return refuse();
                };
                let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                return match (v["tool"].as_str(), v["seed"].as_u64()) {
                    (Some(MARKER_TOOL), Some(s)) => Ok((s, true)),
                    _ => refuse(),
                };
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir)
                .map_err(|e| Failure(format!("create {}: {e}", dir.display())))?;
        }
        Err(e) => return fail(format!("{}: {e}", dir.display())),
    }
    let marker = json!({ "tool": MARKER_TOOL, "version": 1, "seed": seed });
    let mut f = std::fs::File::create(dir.join(MARKER))?;
    f.write_all(format!("{marker}\n").as_bytes())?;
    f.sync_all()?;
    Ok((seed, false))
}

// ---------------------------------------------------------------------------------------
// The kill loop.

/// Runs `ckptstore crashtest`; see the module docs.
pub fn run(a: Args) -> CliResult {
    if a.inject_fault == Some(Fault::Reorder) && !a.asynchronous {
        return fail("--inject-fault reorder needs --async");
    }
    let started = Instant::now();
    let dir = a.dir.as_path();
    let (data_seed, continued) = prepare_dir(dir, a.seed)?;
    let exe = std::env::current_exe()?;
    let mut rng = Rng::new(a.seed ^ 0x6b69_6c6c_6c6f_6f70);
    let mut run = Run {
        a: &a,
        dir,
        data_seed,
        continued,
        ledger: Ledger {
            next_step: 1,
            ..Default::default()
        },
        tally: Tally::default(),
        violations: Vec::new(),
        contents: BTreeMap::new(),
    };
    let bar = ProgressBar::new(a.kills);
    bar.set_style(
        ProgressStyle::with_template("crashtest [{bar:30}] {pos}/{len} kills {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut store_exists = false;
    if continued {
        run.check(true, true);
        store_exists = true;
    }
    let mut timing = Timing {
        opening: 0.005,
        opened: 0.010,
        period: 0.030,
    };
    // The previous writer's torn store was handed on without a repair: aim at recovery.
    let mut handed_on = false;
    let mut failed_at: Option<(u64, Phase)> = None;
    let lie = a.inject_fault == Some(Fault::Lie);
    let reorder = a.inject_fault == Some(Fault::Reorder);
    let corrupt_at = a.kills / 2;
    let mut corrupted = false;

    for k in 1..=a.kills {
        if !run.violations.is_empty() {
            break;
        }
        let delay = if reorder {
            // Killed once its later save is durable (the `parked` line), whatever the
            // machine's speed: aimed by the estimates below, the kills of a loaded machine
            // all landed before it, and the fault went unnoticed. Bounded all the same.
            30.0
        } else if handed_on {
            let lo = timing.opening * 0.7;
            let hi = timing.opened * 1.3 + 0.000_5;
            lo + rng.unit() * (hi - lo)
        } else if rng.chance(0.1) {
            rng.unit() * timing.opened * 1.5
        } else {
            timing.opened + rng.unit() * 6.0 * timing.period
        };
        let delay = Duration::from_secs_f64(delay.clamp(0.0, if reorder { 30.0 } else { 5.0 }));

        // Spawn a writer, kill it after `delay`.
        let spawned = Instant::now();
        let mut cmd = Command::new(&exe);
        cmd.arg("__crash-writer")
            .arg("--dir")
            .arg(dir)
            .args(["--seed", &data_seed.to_string()])
            .args(["--first-step", &run.ledger.next_step.to_string()]);
        if lie {
            cmd.arg("--lie");
        }
        if a.asynchronous {
            cmd.args(["--in-flight", &a.in_flight.to_string()]);
        }
        if reorder {
            cmd.arg("--reorder");
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Failure(format!("spawn the crash writer: {e}")))?;
        let stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let mut reaper = Reaper(Some(child));
        let (tx, rx) = mpsc::channel::<(Instant, String)>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let deadline = spawned + delay;
        let mut phase = Phase::Startup;
        let mut last_commit: Option<Instant> = None;
        let mut committed = false;
        let mut handle = |run: &mut Run, at: Instant, line: &str, phase: &mut Phase| {
            match line.split_whitespace().next() {
                Some("opening") => Timing::update(&mut timing.opening, at - spawned),
                Some("opened") => Timing::update(&mut timing.opened, at - spawned),
                Some("commit") => {
                    if let Some(prev) = last_commit {
                        Timing::update(&mut timing.period, at - prev);
                    }
                    last_commit = Some(at);
                    committed = true;
                }
                _ => {}
            }
            run.on_line(line, phase);
        };
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match rx.recv_timeout(deadline - now) {
                Ok((at, line)) => {
                    handle(&mut run, at, &line, &mut phase);
                    if line == "parked" {
                        break;
                    }
                }
                Err(_) => break, // the deadline, or the writer closed its stdout (exited)
            }
        }
        let child = reaper.0.as_mut().expect("running");
        child.kill()?; // SIGKILL
        let status = child.wait()?;
        reaper.0 = None;
        // What it printed before it died counts: an acknowledgement read late is still one.
        for (at, line) in rx.iter() {
            handle(&mut run, at, &line, &mut phase);
        }
        let _ = reader.join();
        let err_text = err_reader.join().unwrap_or_default();
        use std::os::unix::process::ExitStatusExt;
        if status.signal() != Some(9) {
            let why = err_text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no message");
            run.violation(format!(
                "the writer ended by itself ({status}) before the kill, {}: {}",
                phase.words(),
                why.trim()
            ));
            failed_at = Some((k, phase));
            break;
        }
        run.tally.kills += 1;
        *run.tally.phases.entry(phase).or_default() += 1;
        *run.tally
            .saves_in_flight
            .entry(run.ledger.pending_commits.len())
            .or_default() += 1;
        if handed_on && phase == Phase::Recovery {
            run.tally.torn_recovery_kills += 1;
        }
        if committed {
            run.tally.writers_committed += 1;
        }
        // A writer that got past its open made the store; one killed earlier may have left
        // a half-made one that only a writer's open finishes.
        store_exists |= phase > Phase::Recovery;

        if a.inject_fault == Some(Fault::Corrupt) && k >= corrupt_at && !corrupted {
            corrupted = run.corrupt_one()?;
        }
        // Check, and either repair (a writer open) or hand the torn store on.
        handed_on = store_exists && k < a.kills && rng.chance(0.25);
        run.check(!handed_on, false);
        store_exists = true;
        if !run.violations.is_empty() {
            failed_at = Some((k, phase));
            break;
        }
        bar.inc(1);
        bar.set_message(format!(
            "{} acknowledged, {} live, 0 violations",
            run.tally.acknowledged,
            run.ledger.live.len()
        ));
    }
    if run.violations.is_empty() {
        run.final_commit();
    }
    bar.finish_and_clear();
    let elapsed = started.elapsed();
    report(&run, elapsed, failed_at)
}
