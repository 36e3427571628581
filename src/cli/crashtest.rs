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

use super::synth::{self, Rng, Role, Spec};
use super::{fail, human_duration, CliResult, Failure, Reaper};
use ckptstore::manifest::all_chunks;
use ckptstore::store::{parse_wal_file_name, SEGMENTS_DIR};
use ckptstore::{current, segment, DType, MetaValue, Options, Selector, Store};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
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
}

// ---------------------------------------------------------------------------------------
// The workload: store options and checkpoint contents, a pure function of (seed, step).

const MARKER: &str = "crashtest.json";
const MARKER_TOOL: &str = "ckptstore crashtest";
const STEPS_PER_EPOCH: u64 = 10;
/// `head.weight` changes only every this many steps (deduplicated in between).
const SLOW_EVERY: u64 = 5;
/// The writer compacts the WAL explicitly after every step that is a multiple of this.
const COMPACT_EVERY: u64 = 13;
const OPTIMIZER_JSON: &[u8] = br#"{"type":"adamw","betas":[0.9,0.999],"eps":1e-8}"#;

/// Small chunks (many per tensor) and a tiny WAL compaction threshold, so that every kill has
/// many chunk writes, commits and compactions to land in.
fn store_options(read_only: bool) -> Options {
    Options {
        read_only,
        chunk_size: 4096,
        segment_max_bytes: 1 << 20,
        wal_compact_min_bytes: 4096,
        ..Default::default()
    }
}

/// How many checkpoints the writer keeps after saving `step`: 2 to 4, so it sometimes
/// deletes two in a row.
fn keep_last(step: u64) -> usize {
    2 + (step % 3) as usize
}

/// Everything one checkpoint holds.
struct Content {
    step: u64,
    epoch: u64,
    tensors: Vec<(Spec, Vec<u8>)>,
    blobs: Vec<(&'static str, Vec<u8>)>,
    metadata: BTreeMap<String, MetaValue>,
}

impl Content {
    /// The checkpoint of `step` (about 90 KiB in 20-odd 4 KiB chunks).
    fn of(seed: u64, step: u64) -> Content {
        let mut tensors = Vec::new();
        let mut put = |spec: Spec, at: u64| {
            let data = synth::generate(seed, &spec, at);
            tensors.push((spec, data));
        };
        put(
            Spec::new("layers.0.weight", DType::BF16, &[64, 80], Role::Param),
            step,
        );
        put(
            Spec::new("layers.0.bias", DType::F32, &[80], Role::Param),
            step,
        );
        put(
            Spec::new("layers.1.weight", DType::BF16, &[80, 64], Role::Param),
            step,
        );
        put(
            Spec::new("layers.1.bias", DType::F32, &[64], Role::Param),
            step,
        );
        put(
            Spec::new("head.weight", DType::F32, &[64, 32], Role::Param),
            step - step % SLOW_EVERY,
        );
        if step.is_multiple_of(3) {
            put(
                Spec::new("ema.layers.0.weight", DType::BF16, &[64, 80], Role::Param),
                step,
            );
        }
        put(
            Spec::new(
                "optim.exp_avg.layers.0.weight",
                DType::F32,
                &[64, 80],
                Role::ExpAvg,
            ),
            step,
        );
        put(
            Spec::new(
                "optim.exp_avg_sq.layers.0.weight",
                DType::F32,
                &[64, 80],
                Role::ExpAvgSq,
            ),
            step,
        );
        put(
            Spec::new("optim.step", DType::I64, &[], Role::Counter),
            step,
        );
        put(Spec::new("mask", DType::Bool, &[0], Role::Param), step);
        // Frozen (identical at every step: deduplicated), and last, so that a kill soon after
        // a save begins lands in chunk writes of the tensors above.
        put(
            Spec::new("embed.weight", DType::F32, &[48, 64], Role::Frozen),
            step,
        );

        let mut sm = seed ^ step.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let rng_len = if step.is_multiple_of(11) {
            0
        } else {
            (synth::splitmix(&mut sm) % 9000) as usize
        };
        let blobs = vec![
            ("optimizer.json", OPTIMIZER_JSON.to_vec()),
            ("rng.bin", synth::blob_bytes(seed, "rng.bin", step, rng_len)),
        ];
        let rng_state: Vec<u8> = (0..2)
            .flat_map(|_| synth::splitmix(&mut sm).to_le_bytes())
            .collect();
        let metadata = BTreeMap::from([
            (
                "lr".to_string(),
                MetaValue::Float(1e-3 / (1.0 + step as f64 / 100.0)),
            ),
            ("rng_state".to_string(), MetaValue::Bytes(rng_state)),
            (
                "data_loader.position".to_string(),
                MetaValue::Int((step % STEPS_PER_EPOCH) as i64 * 32),
            ),
            (
                "run".to_string(),
                MetaValue::Str(format!("ckptstore-crashtest seed={seed}")),
            ),
        ]);
        Content {
            step,
            epoch: step / STEPS_PER_EPOCH,
            tensors,
            blobs,
            metadata,
        }
    }

    fn save(&self, store: &mut Store) -> ckptstore::Result<ckptstore::CommitInfo> {
        let mut t = store.begin(self.step)?;
        t.set_epoch(self.epoch);
        for (k, v) in &self.metadata {
            t.set_metadata(k.clone(), v.clone());
        }
        for (s, d) in &self.tensors {
            t.put_tensor(&s.name, s.dtype, &s.shape, d)?;
        }
        for (name, b) in &self.blobs {
            t.put_blob(name, b)?;
        }
        t.commit()
    }

    /// Compares checkpoint `id` with this content byte for byte; the error says what differs.
    fn check(&self, store: &Store, id: u64) -> Result<(), String> {
        let ck = store
            .checkpoint(Selector::Id(id))
            .map_err(|e| format!("does not open: {e}"))?;
        let info = ck.info();
        if info.step != self.step || info.epoch != self.epoch {
            return Err(format!(
                "is step {} epoch {}, expected step {} epoch {}",
                info.step, info.epoch, self.step, self.epoch
            ));
        }
        let names: Vec<&str> = self.tensors.iter().map(|(s, _)| s.name.as_str()).collect();
        if ck.tensor_names() != names {
            return Err(format!(
                "has tensors {:?}, expected {names:?}",
                ck.tensor_names()
            ));
        }
        for (s, want) in &self.tensors {
            let t = ck
                .tensor(&s.name)
                .map_err(|e| format!("tensor {}: {e}", s.name))?;
            if t.dtype != s.dtype || t.shape != s.shape {
                return Err(format!(
                    "tensor {} is {} {:?}, expected {} {:?}",
                    s.name, t.dtype, t.shape, s.dtype, s.shape
                ));
            }
            if t.data != *want {
                let at = t.data.iter().zip(want).position(|(a, b)| a != b);
                return Err(format!(
                    "tensor {} differs from what was written (first at byte {})",
                    s.name,
                    at.map_or_else(|| "length".into(), |a| a.to_string())
                ));
            }
        }
        let blob_names: Vec<&str> = self.blobs.iter().map(|(n, _)| *n).collect();
        if ck.blob_names() != blob_names {
            return Err(format!(
                "has blobs {:?}, expected {blob_names:?}",
                ck.blob_names()
            ));
        }
        for (name, want) in &self.blobs {
            let got = ck.blob(name).map_err(|e| format!("blob {name}: {e}"))?;
            if got != *want {
                return Err(format!("blob {name} differs from what was written"));
            }
        }
        if info.metadata != self.metadata {
            return Err("metadata differs from what was written".into());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The child writer.

/// `ckptstore __crash-writer`: opens the store (recovery) and saves, deletes and compacts
/// forever, one line on stdout before and after each operation:
/// `opening`, `opened N`, `begin STEP`, `commit STEP ID C`, `delete-begin ID`, `delete ID C`,
/// `compact-begin`, `compact` (C is `compacted` when the operation also compacted the WAL,
/// else `-`). Only the parent's SIGKILL ends it; any error ends it with a message on stderr.
pub fn run_writer(a: WriterArgs) -> CliResult {
    let mut out = std::io::stdout().lock();
    let mut tell = |line: String| -> CliResult {
        writeln!(out, "{line}")?;
        out.flush()?;
        Ok(())
    };
    tell("opening".into())?;
    let mut store = Store::open(&a.dir, store_options(false))?;
    tell(format!("opened {}", store.list().len()))?;
    let mut lie = a.lie;
    let mut step = a.first_step;
    let flag = |compacted: bool| if compacted { "compacted" } else { "-" };
    loop {
        // Generate first, so that what follows `begin` is all store work.
        let content = Content::of(a.seed, step);
        tell(format!("begin {step}"))?;
        if std::mem::take(&mut lie) {
            let id = store.list().last().map_or(1, |c| c.id + 1);
            tell(format!("commit {step} {id} -"))?;
            step += 1;
            continue;
        }
        let wal_before = store.stats().wal_bytes;
        let c = content.save(&mut store)?;
        // A compaction rewrites the WAL to a snapshot smaller than it was before the commit.
        let compacted = store.stats().wal_bytes < wal_before;
        tell(format!(
            "commit {step} {} {}",
            c.checkpoint.id,
            flag(compacted)
        ))?;

        let live = store.list();
        let keep = keep_last(step);
        for old in &live[..live.len().saturating_sub(keep)] {
            tell(format!("delete-begin {}", old.id))?;
            let wal_before = store.stats().wal_bytes;
            store.delete(old.id)?;
            let compacted = store.stats().wal_bytes < wal_before;
            tell(format!("delete {} {}", old.id, flag(compacted)))?;
        }
        if step.is_multiple_of(COMPACT_EVERY) {
            tell("compact-begin".into())?;
            store.compact_wal()?;
            tell("compact".into())?;
        }
        step += 1;
    }
}

// ---------------------------------------------------------------------------------------
// The parent: the ledger of what the writers acknowledged.

/// Where a writer was when it was killed: what its last line said it had started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// Nothing printed yet: exec, dynamic loading, argument parsing.
    Startup,
    /// In `Store::open`: recovery of what the previous kill left.
    Recovery,
    /// In a commit: chunk writes, segment fsyncs, the WAL append, an automatic compaction.
    Commit,
    /// In a delete: its WAL record, segment removal, an automatic compaction.
    Delete,
    /// In an explicit `compact_wal()`.
    Compaction,
    /// Between operations (generating the next checkpoint's data).
    Between,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Startup => "startup",
            Phase::Recovery => "recovery",
            Phase::Commit => "commit",
            Phase::Delete => "delete",
            Phase::Compaction => "compaction",
            Phase::Between => "between",
        }
    }

    fn words(self) -> &'static str {
        match self {
            Phase::Startup => "during startup",
            Phase::Recovery => "during recovery",
            Phase::Commit => "during a commit",
            Phase::Delete => "during a delete",
            Phase::Compaction => "during a WAL compaction",
            Phase::Between => "between operations",
        }
    }
}

/// What must hold, from the writers' acknowledgements.
#[derive(Debug, Default)]
struct Ledger {
    /// Acknowledged (or found durable after a kill) and not deleted: id → step.
    live: BTreeMap<u64, u64>,
    /// Acknowledged deletions.
    deleted: BTreeSet<u64>,
    /// The largest checkpoint id acknowledged or found.
    max_id: u64,
    /// The step the next writer starts at (after every step ever begun).
    next_step: u64,
    /// A commit begun and not acknowledged when its writer died: its step.
    pending_commit: Option<u64>,
    /// A delete begun and not acknowledged when its writer died: its id.
    pending_delete: Option<u64>,
}

/// Counters for the summary.
#[derive(Debug, Default)]
struct Tally {
    kills: u64,
    phases: BTreeMap<Phase, u64>,
    /// Kills of a writer in its recovery of a store left torn by the previous kill.
    torn_recovery_kills: u64,
    acknowledged: u64,
    deletes: u64,
    explicit_compactions: u64,
    auto_compactions: u64,
    /// Reopens after a kill (writer opens with repair, or read-only looks).
    recoveries: u64,
    read_only_checks: u64,
    /// Checkpoints compared bit-exact (over all checks).
    verified: u64,
    /// Commits that were not acknowledged but had become durable before the kill.
    unacked_commits_found: u64,
    /// Deletes that were not acknowledged but had become durable before the kill.
    unacked_deletes_found: u64,
    /// Writers that acknowledged at least one commit.
    writers_committed: u64,
    /// The commit the parent makes itself after the last kill.
    final_commit: Option<(u64, u64)>,
}

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

struct Run<'a> {
    a: &'a Args,
    dir: &'a Path,
    data_seed: u64,
    /// The store was left by an earlier crashtest and continued.
    continued: bool,
    ledger: Ledger,
    tally: Tally,
    violations: Vec<String>,
    /// Cache of regenerated contents by step.
    contents: BTreeMap<u64, Content>,
}

impl Run<'_> {
    fn content(&mut self, step: u64) -> &Content {
        let seed = self.data_seed;
        self.contents
            .entry(step)
            .or_insert_with(|| Content::of(seed, step))
    }

    fn violation(&mut self, why: String) {
        self.violations.push(why);
    }

    /// Applies one line of a writer.
    fn on_line(&mut self, line: &str, phase: &mut Phase) {
        let w: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| w.get(i).and_then(|s| s.parse::<u64>().ok());
        match (w.first().copied(), num(1), num(2)) {
            (Some("opening"), _, _) => *phase = Phase::Recovery,
            (Some("opened"), Some(_), _) => *phase = Phase::Between,
            (Some("begin"), Some(step), _) => {
                *phase = Phase::Commit;
                self.ledger.pending_commit = Some(step);
                self.ledger.next_step = self.ledger.next_step.max(step + 1);
            }
            (Some("commit"), Some(step), Some(id)) => {
                *phase = Phase::Between;
                self.ledger.pending_commit = None;
                self.tally.acknowledged += 1;
                if w.get(3) == Some(&"compacted") {
                    self.tally.auto_compactions += 1;
                }
                if id <= self.ledger.max_id {
                    let was = match self.ledger.live.get(&id) {
                        Some(s) => format!("live, step {s}"),
                        None if self.ledger.deleted.contains(&id) => "deleted".into(),
                        None => "never seen".into(),
                    };
                    self.violation(format!(
                        "the writer acknowledged step {step} as checkpoint {id}, but ids only \
                         grow and {} was already acknowledged ({was})",
                        self.ledger.max_id
                    ));
                }
                self.ledger.max_id = self.ledger.max_id.max(id);
                self.ledger.live.insert(id, step);
            }
            (Some("delete-begin"), Some(id), _) => {
                *phase = Phase::Delete;
                self.ledger.pending_delete = Some(id);
            }
            (Some("delete"), Some(id), _) => {
                *phase = Phase::Between;
                self.ledger.pending_delete = None;
                self.tally.deletes += 1;
                if w.get(2) == Some(&"compacted") {
                    self.tally.auto_compactions += 1;
                }
                if self.ledger.live.remove(&id).is_none() {
                    self.violation(format!(
                        "the writer deleted checkpoint {id}, which no acknowledgement created"
                    ));
                }
                self.ledger.deleted.insert(id);
            }
            (Some("compact-begin"), _, _) => *phase = Phase::Compaction,
            (Some("compact"), _, _) => {
                *phase = Phase::Between;
                self.tally.explicit_compactions += 1;
            }
            _ => self.violation(format!("unexpected line from the writer: {line:?}")),
        }
    }

    /// Reopens the store after a kill and checks (a)–(c), and with a writer open (which
    /// repairs) also (d). `adopt_all` (a continued store): every listed checkpoint joins the
    /// ledger, checked against its step's content.
    fn check(&mut self, writable: bool, adopt_all: bool) {
        self.tally.recoveries += 1;
        if !writable {
            self.tally.read_only_checks += 1;
        }
        let how = if writable { "as writer" } else { "read-only" };
        let store = match Store::open(self.dir, store_options(!writable)) {
            Ok(s) => s,
            Err(e) => return self.violation(format!("the store does not open ({how}): {e}")),
        };
        let report = store.recovery_report().clone();
        if !report.damaged_segments.is_empty() {
            self.violation(format!(
                "recovery ({how}) found damaged segments {:?}",
                report.damaged_segments
            ));
        }
        let listed: BTreeMap<u64, u64> = store.list().iter().map(|c| (c.id, c.step)).collect();

        // (b) Everything acknowledged and not deleted is there, with its step.
        let expected: Vec<(u64, u64)> = self.ledger.live.iter().map(|(&i, &s)| (i, s)).collect();
        for (id, step) in expected {
            match listed.get(&id) {
                Some(&s) if s == step => {}
                Some(&s) => self.violation(format!(
                    "acknowledged checkpoint {id} (step {step}) is step {s} after recovery ({how})"
                )),
                None if self.ledger.pending_delete == Some(id) => {
                    // Its delete was in flight and became durable: allowed.
                    self.ledger.live.remove(&id);
                    self.ledger.deleted.insert(id);
                    self.tally.unacked_deletes_found += 1;
                }
                None => self.violation(format!(
                    "acknowledged checkpoint {id} (step {step}) is missing after recovery ({how})"
                )),
            }
        }
        // Nothing is listed that was deleted, or never acknowledged nor in flight.
        for (&id, &step) in &listed {
            if self.ledger.live.contains_key(&id) {
                continue;
            }
            if self.ledger.deleted.contains(&id) {
                self.violation(format!(
                    "checkpoint {id} (step {step}) was deleted (acknowledged) but is listed after recovery ({how})"
                ));
            } else if adopt_all
                || (self.ledger.pending_commit == Some(step) && id > self.ledger.max_id)
            {
                // The commit in flight at the kill had become durable: allowed, and from now
                // on it must stay (it is checked bit-exact below like the others).
                if !adopt_all {
                    self.tally.unacked_commits_found += 1;
                }
                self.ledger.live.insert(id, step);
                self.ledger.max_id = self.ledger.max_id.max(id);
                self.ledger.next_step = self.ledger.next_step.max(step + 1);
            } else {
                self.violation(format!(
                    "checkpoint {id} (step {step}) is listed after recovery ({how}) but was \
                     never acknowledged nor being committed"
                ));
            }
        }
        self.ledger.pending_commit = None;
        self.ledger.pending_delete = None;

        // (b) bit-exact, (c) verifies.
        let live: Vec<(u64, u64)> = self
            .ledger
            .live
            .iter()
            .filter(|(id, _)| listed.contains_key(id))
            .map(|(&i, &s)| (i, s))
            .collect();
        for (id, step) in live {
            match self.content(step).check(&store, id) {
                Ok(()) => self.tally.verified += 1,
                Err(why) => self.violation(format!(
                    "acknowledged checkpoint {id} (step {step}) after recovery ({how}): {why}"
                )),
            }
        }
        for (id, res) in store.verify_all() {
            if let Err(e) = res {
                self.violation(format!(
                    "checkpoint {id} does not verify after recovery ({how}): {e}"
                ));
            }
        }
        // Only live checkpoints are compared again: forget the others' contents.
        let steps: BTreeSet<u64> = self.ledger.live.values().copied().collect();
        self.contents.retain(|s, _| steps.contains(s));
        // (d) After a writer's recovery, nothing left over.
        if writable {
            for why in leftovers(self.dir, &store) {
                self.violation(why);
            }
        }
    }

    /// (e) After the last kill: a commit made now, after recovery, works and survives a
    /// reopen.
    fn final_commit(&mut self) {
        let step = self.ledger.next_step;
        let result = (|| -> Result<u64, String> {
            let mut store = Store::open(self.dir, store_options(false))
                .map_err(|e| format!("the store does not open: {e}"))?;
            let c = self
                .content(step)
                .save(&mut store)
                .map_err(|e| format!("a commit after recovery failed: {e}"))?;
            Ok(c.checkpoint.id)
        })();
        match result {
            Ok(id) => {
                if id <= self.ledger.max_id {
                    self.violation(format!(
                        "a commit after recovery got id {id}, not above the largest acknowledged {}",
                        self.ledger.max_id
                    ));
                }
                self.tally.acknowledged += 1;
                self.ledger.max_id = self.ledger.max_id.max(id);
                self.ledger.live.insert(id, step);
                self.ledger.next_step = step + 1;
                self.tally.final_commit = Some((id, step));
                self.check(true, false);
            }
            Err(why) => self.violation(why),
        }
    }

    /// For `--inject-fault corrupt`: flips a byte in a chunk of the newest acknowledged
    /// checkpoint. Returns whether it did.
    fn corrupt_one(&mut self) -> CliResult<bool> {
        let Some((&id, _)) = self.ledger.live.last_key_value() else {
            return Ok(false);
        };
        let (path, at) = {
            let store = Store::open(self.dir, store_options(true))?;
            let ck = store.checkpoint(Selector::Id(id))?;
            let Some(c) = all_chunks(ck.manifest()).find(|c| c.stored_len > 0) else {
                return Ok(false);
            };
            (
                self.dir
                    .join(SEGMENTS_DIR)
                    .join(segment::file_name(c.segment)),
                c.offset + c.stored_len / 2,
            )
        };
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)?;
        let mut b = [0u8; 1];
        use std::io::{Seek, SeekFrom};
        f.seek(SeekFrom::Start(at))?;
        f.read_exact(&mut b)?;
        b[0] ^= 0x40;
        f.seek(SeekFrom::Start(at))?;
        f.write_all(&b)?;
        f.sync_all()?;
        Ok(true)
    }
}

/// (d): what a writer's recovery should have removed and did not.
fn leftovers(dir: &Path, store: &Store) -> Vec<String> {
    let mut out = Vec::new();
    let mut referenced = BTreeSet::new();
    for c in store.list() {
        if let Ok(ck) = store.checkpoint(Selector::Id(c.id)) {
            referenced.extend(all_chunks(ck.manifest()).map(|r| r.segment));
        }
    }
    let names = |d: &Path| -> Vec<String> {
        std::fs::read_dir(d)
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut orphans: Vec<String> = names(&dir.join(SEGMENTS_DIR))
        .into_iter()
        .filter(|n| segment::parse_file_name(n).is_some_and(|id| !referenced.contains(&id)))
        .collect();
    orphans.sort();
    if !orphans.is_empty() {
        out.push(format!(
            "after recovery, segment file(s) {orphans:?} are referenced by no live checkpoint"
        ));
    }
    let top = names(dir);
    let mut wals: Vec<u64> = top.iter().filter_map(|n| parse_wal_file_name(n)).collect();
    wals.sort_unstable();
    let current = std::fs::read(dir.join(current::CURRENT_NAME))
        .ok()
        .and_then(|b| current::decode(&b).ok());
    match current {
        Some(n) if wals == [n] => {}
        Some(n) => out.push(format!(
            "after recovery, the store holds WAL file(s) {wals:?}; expected only {n} (named by CURRENT)"
        )),
        None => out.push("after recovery, CURRENT is missing or unreadable".into()),
    }
    if top.iter().any(|n| n == current::CURRENT_TMP_NAME) {
        out.push(format!(
            "after recovery, a stale {} is left",
            current::CURRENT_TMP_NAME
        ));
    }
    out
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
    let corrupt_at = a.kills / 2;
    let mut corrupted = false;

    for k in 1..=a.kills {
        if !run.violations.is_empty() {
            break;
        }
        let delay = if handed_on {
            let lo = timing.opening * 0.7;
            let hi = timing.opened * 1.3 + 0.000_5;
            lo + rng.unit() * (hi - lo)
        } else if rng.chance(0.1) {
            rng.unit() * timing.opened * 1.5
        } else {
            timing.opened + rng.unit() * 6.0 * timing.period
        };
        let delay = Duration::from_secs_f64(delay.clamp(0.0, 5.0));

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
                Ok((at, line)) => handle(&mut run, at, &line, &mut phase),
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

/// Prints the summary (text or JSON) and fails naming the first violation, if any.
fn report(run: &Run, elapsed: Duration, failed_at: Option<(u64, Phase)>) -> CliResult {
    let t = &run.tally;
    let a = run.a;
    let ok = run.violations.is_empty();
    let phases: serde_json::Map<String, Value> = t
        .phases
        .iter()
        .map(|(p, n)| (p.name().to_string(), json!(n)))
        .collect();
    if a.json {
        super::emit_json(&json!({
            "ok": ok,
            "dir": run.dir.display().to_string(),
            "seed": a.seed,
            "data_seed": run.data_seed,
            "continued": run.continued,
            "kills": t.kills,
            "kills_by_phase": phases,
            "kills_in_torn_recovery": t.torn_recovery_kills,
            "acknowledged": t.acknowledged,
            "deletes": t.deletes,
            "compactions": { "explicit": t.explicit_compactions, "automatic": t.auto_compactions },
            "recovered": t.recoveries,
            "read_only_checks": t.read_only_checks,
            "verified": t.verified,
            "unacknowledged_commits_found": t.unacked_commits_found,
            "unacknowledged_deletes_found": t.unacked_deletes_found,
            "writers_that_committed": t.writers_committed,
            "live": run.ledger.live.len(),
            "final_commit": t.final_commit.map(|(id, step)| json!({ "id": id, "step": step })),
            "violations": run.violations.len(),
            "violation_list": run.violations,
            "duration_s": elapsed.as_secs_f64(),
        }))?;
    } else {
        let mut out = String::new();
        let mut line = |k: &str, v: String| out += &format!("  {k:<14}{v}\n");
        line(
            "store",
            format!(
                "{} ({}; data seed {}, kill seed {})",
                run.dir.display(),
                if run.continued { "continued" } else { "new" },
                run.data_seed,
                a.seed
            ),
        );
        let by_phase: Vec<String> = t
            .phases
            .iter()
            .map(|(p, n)| format!("{n} {}", p.words()))
            .collect();
        line(
            "kills",
            format!(
                "{} SIGKILLs: {} ({} while recovering a store the previous kill left torn)",
                t.kills,
                by_phase.join(", "),
                t.torn_recovery_kills
            ),
        );
        line(
            "acknowledged",
            format!(
                "{} commits, {} deletes, {} WAL compactions ({} explicit, {} automatic)",
                t.acknowledged,
                t.deletes,
                t.explicit_compactions + t.auto_compactions,
                t.explicit_compactions,
                t.auto_compactions
            ),
        );
        line(
            "recovered",
            format!(
                "{} reopens ({} read-only, the rest as writer); {} checkpoints read back bit-exact",
                t.recoveries, t.read_only_checks, t.verified
            ),
        );
        line(
            "in flight",
            format!(
                "{} unacknowledged commit(s) and {} delete(s) had become durable (allowed: wholly there)",
                t.unacked_commits_found, t.unacked_deletes_found
            ),
        );
        line(
            "resumed",
            format!(
                "{} of {} writers committed after recovering{}",
                t.writers_committed,
                t.kills,
                t.final_commit
                    .map_or_else(String::new, |(id, step)| format!(
                        "; a final commit (checkpoint {id}, step {step}) after the last kill"
                    ))
            ),
        );
        line("live", format!("{} checkpoints", run.ledger.live.len()));
        let listed: String = run
            .violations
            .iter()
            .map(|v| format!("\n    {v}"))
            .collect();
        line("violations", format!("{}{listed}", run.violations.len()));
        line("duration", human_duration(elapsed));
        let head = if ok { "ok" } else { "FAILED" };
        super::emit(&format!("ckptstore crashtest: {head}\n{out}"))?;
    }
    match (run.violations.first(), failed_at) {
        (None, _) => Ok(()),
        (Some(v), Some((k, phase))) => fail(format!(
            "VIOLATION after kill {k} ({}): {v} (store kept at {})",
            phase.words(),
            run.dir.display()
        )),
        (Some(v), None) => fail(format!(
            "VIOLATION: {v} (store kept at {})",
            run.dir.display()
        )),
    }
}
