//! `ckptstore gc`: apply a retention policy — keep what any rule keeps (plus the newest and
//! every pinned checkpoint), delete the rest oldest first, each deletion a durable WAL record
//! before its space is freed — then compact mostly-dead segments (unless `--no-compact`) and
//! free what readers that have closed left behind. `--dry-run` only prints the plan.

use super::{check_dir, emit, emit_json, fail, has_store, human_bytes, info_json, iso_time, table};
use super::{open_read_only, CliResult};
use ckptstore::store::LOST_FOUND_DIR;
use ckptstore::{CheckpointInfo, GcOptions, MetricMode, RetentionPolicy, Store};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::path::PathBuf;

/// Direction of the `--metric` of `--keep-best`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Mode {
    /// Lower is better (a loss).
    Min,
    /// Higher is better (an accuracy).
    Max,
}

/// Arguments of `ckptstore gc`.
#[derive(Debug, clap::Args)]
#[command(group(
    clap::ArgGroup::new("policy")
        .required(true)
        .multiple(true)
        .args(["keep_last", "keep_per_minutes", "keep_every_steps", "keep_best", "purge_lost_found"])
))]
pub struct Args {
    /// The store directory.
    pub dir: PathBuf,
    /// Keep the N newest checkpoints.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub keep_last: Option<u64>,
    /// Keep the newest checkpoint of each M-minute window of wall time (windows aligned to
    /// the Unix epoch; MindSpore's keep_checkpoint_per_n_minutes).
    #[arg(long, value_name = "M", value_parser = clap::value_parser!(u64).range(1..))]
    pub keep_per_minutes: Option<u64>,
    /// Keep every checkpoint whose step is a multiple of S.
    #[arg(long, value_name = "S", value_parser = clap::value_parser!(u64).range(1..))]
    pub keep_every_steps: Option<u64>,
    /// Keep the K best checkpoints by the metadata metric --metric (--mode min or max).
    /// Checkpoints without a numeric value for it are never among the best.
    #[arg(long, value_name = "K", requires_all = ["metric", "mode"],
          value_parser = clap::value_parser!(u64).range(1..))]
    pub keep_best: Option<u64>,
    /// The metadata key --keep-best ranks by.
    #[arg(long, value_name = "NAME", requires = "keep_best")]
    pub metric: Option<String>,
    /// Whether a lower (min) or higher (max) --metric is better.
    #[arg(long, value_enum, requires = "keep_best")]
    pub mode: Option<Mode>,
    /// Also keep this checkpoint id on this run (repeatable); `ckptstore pin` keeps one for good.
    #[arg(long = "keep-id", value_name = "ID")]
    pub keep_ids: Vec<u64>,
    /// Print what would be kept and deleted, change nothing (opens read-only, so it works
    /// while a writer runs).
    #[arg(long)]
    pub dry_run: bool,
    /// Do not compact segments after the deletions (segments no live checkpoint references
    /// are still freed). Compaction copies the live chunks of segments that are mostly dead
    /// into new ones, so the files stay within 1.5x the live bytes.
    #[arg(long)]
    pub no_compact: bool,
    /// Delete the files recovery set aside in the store's `lost+found/` (orphan segments, old
    /// WAL files, the WAL before a salvage, with their `.why` notes): the only way they are
    /// ever deleted. Alone, or after the retention policy's deletions.
    #[arg(long)]
    pub purge_lost_found: bool,
    /// Print JSON: {"dir", "dry_run", "kept": [checkpoint as in `ls --json` + "reasons":
    /// [{"kind", "text"}]], "deleted": [checkpoint], "segments_freed", "bytes_freed",
    /// "segments_compacted", "segments_written", "bytes_written", "corrupt_chunks" ([{"segment",
    /// "offset"}]: found bad while copied, quarantined and left in place), "bytes_reclaimed"
    /// (freed − written), "segments_pending" and "bytes_pending" (kept for open readers),
    /// "live_bytes", "segment_bytes", "amplification" (after), "lost_found_purged" (files,
    /// or with --dry-run files that would be) and "lost_found_bytes"}. With
    /// --purge-lost-found alone: {"dir", "dry_run", "lost_found_purged", "lost_found_bytes"}.
    #[arg(long)]
    pub json: bool,
}

fn policy(a: &Args) -> RetentionPolicy {
    let mut p = RetentionPolicy::new();
    p.keep_last = a.keep_last.map(|n| n as usize);
    p.keep_one_per_minutes = a.keep_per_minutes;
    p.keep_every_steps = a.keep_every_steps;
    if let (Some(k), Some(metric), Some(mode)) = (a.keep_best, &a.metric, a.mode) {
        let mode = match mode {
            Mode::Min => MetricMode::Min,
            Mode::Max => MetricMode::Max,
        };
        p = p.keep_best(k as usize, metric.clone(), mode);
    }
    p.pins.extend(a.keep_ids.iter().copied());
    p
}

fn row(action: &str, c: &CheckpointInfo, why: String) -> Vec<String> {
    vec![
        action.into(),
        c.id.to_string(),
        c.step.to_string(),
        iso_time(c.wall_time_unix_ns),
        human_bytes(c.bytes),
        why,
    ]
}

/// Deletes (or with --dry-run counts) the files in `lost+found/`: (files, bytes).
fn purge_lost_found(store: &mut Store, dry_run: bool) -> CliResult<(usize, u64)> {
    if dry_run {
        let lf = store.dir().join(LOST_FOUND_DIR);
        let names = store.lost_found()?;
        let bytes = names
            .iter()
            .filter_map(|n| std::fs::symlink_metadata(lf.join(n)).ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum();
        return Ok((names.len(), bytes));
    }
    let r = store.purge_lost_found()?;
    Ok((r.files.len(), r.bytes))
}

fn has_policy(a: &Args) -> bool {
    a.keep_last.is_some()
        || a.keep_per_minutes.is_some()
        || a.keep_every_steps.is_some()
        || a.keep_best.is_some()
}

/// Plans and (unless --dry-run) applies the retention policy.
pub fn run(a: Args) -> CliResult {
    let policy = policy(&a);
    let mut store = if a.dry_run {
        open_read_only(&a.dir)?
    } else {
        check_dir(&a.dir)?;
        if !has_store(&a.dir) {
            return fail(format!(
                "{} is not a ckptstore store (no CURRENT file)",
                a.dir.display()
            ));
        }
        Store::open(&a.dir, super::store_options())?
    };
    if !has_policy(&a) {
        // --purge-lost-found alone (the argument group requires one of them).
        let (files, bytes) = purge_lost_found(&mut store, a.dry_run)?;
        if a.json {
            return emit_json(&json!({
                "dir": a.dir.display().to_string(),
                "dry_run": a.dry_run,
                "lost_found_purged": files,
                "lost_found_bytes": bytes,
            }));
        }
        let verb = if a.dry_run { "would delete" } else { "deleted" };
        return emit(&format!(
            "{verb} {files} file(s) ({}) from {}\n",
            human_bytes(bytes),
            a.dir.join(LOST_FOUND_DIR).display()
        ));
    }
    let plan = store.plan_retention(&policy)?;
    let (mut segments_freed, mut bytes_freed) = (plan.segments_freed.len(), plan.bytes_freed);
    if !a.dry_run && !plan.delete.is_empty() {
        // Hidden automatically when stderr is not a terminal.
        let bar = ProgressBar::new(plan.delete.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("deleting [{bar:30}] {pos}/{len} checkpoints ({eta})")
                .expect("valid template")
                .progress_chars("=> "),
        );
        let done = store.apply_retention_with(&policy, |n, _| bar.set_position(n as u64));
        bar.finish_and_clear();
        let done = done?;
        segments_freed = done.iter().map(|d| d.segments_freed.len()).sum();
        bytes_freed = done.iter().map(|d| d.bytes_freed).sum();
    }
    // Then compaction (and what closed readers left): after the deletions, or as planned.
    let gc_opts = GcOptions {
        compact: !a.no_compact,
        dry_run: a.dry_run,
    };
    let gc = if a.dry_run {
        // What the deletions would leave, then what compaction would do to that.
        let only_free = GcOptions {
            compact: false,
            ..gc_opts
        };
        let mut r = store.gc_with(only_free, |_, _| {})?;
        if gc_opts.compact {
            let deleting: Vec<u64> = plan.delete.iter().map(|c| c.id).collect();
            let c = store.plan_compaction_after(&deleting);
            r.segments_compacted = c.sources;
            r.bytes_written = c.output_bytes;
            r.bytes_freed += c.source_bytes;
            r.after.segment_bytes = (r.before.segment_bytes + c.output_bytes)
                .saturating_sub(plan.bytes_freed + c.source_bytes);
        }
        r
    } else {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "compacting [{bar:30}] {bytes}/{total_bytes} ({binary_bytes_per_sec}, {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        let r = store.gc_with(gc_opts, |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        });
        bar.finish_and_clear();
        r?
    };
    segments_freed += gc.segments_freed.len();
    bytes_freed += gc.bytes_freed;
    let bytes_reclaimed = bytes_freed.saturating_sub(gc.bytes_written);
    let purged = if a.purge_lost_found {
        Some(purge_lost_found(&mut store, a.dry_run)?)
    } else {
        None
    };

    if a.json {
        let kept: Vec<Value> = plan
            .keep
            .iter()
            .map(|k| {
                let mut v = info_json(&k.info);
                v["reasons"] = k
                    .reasons
                    .iter()
                    .map(|r| json!({"kind": r.kind(), "text": r.to_string()}))
                    .collect();
                v
            })
            .collect();
        return emit_json(&json!({
            "dir": a.dir.display().to_string(),
            "dry_run": a.dry_run,
            "kept": kept,
            "deleted": plan.delete.iter().map(info_json).collect::<Vec<_>>(),
            "segments_freed": segments_freed,
            "bytes_freed": bytes_freed,
            "segments_compacted": gc.segments_compacted,
            "segments_written": gc.segments_written,
            "bytes_written": gc.bytes_written,
            "corrupt_chunks": gc.corrupt_chunks.iter().map(|(s, o)| json!({"segment": s, "offset": o})).collect::<Vec<_>>(),
            "bytes_reclaimed": bytes_reclaimed,
            "segments_pending": gc.segments_pending,
            "bytes_pending": gc.bytes_pending,
            "live_bytes": gc.after.live_bytes,
            "segment_bytes": gc.after.segment_bytes,
            "amplification": gc.after.amplification(),
            "lost_found_purged": purged.map_or(0, |p| p.0),
            "lost_found_bytes": purged.map_or(0, |p| p.1),
        }));
    }
    if plan.keep.is_empty() {
        return emit(&format!("no checkpoints in {}\n", a.dir.display()));
    }
    let mut rows: Vec<Vec<String>> = plan
        .keep
        .iter()
        .map(|k| {
            let why = k.reasons.iter().map(|r| r.to_string()).collect::<Vec<_>>();
            (k.info.id, row("keep", &k.info, why.join("; ")))
        })
        .chain(plan.delete.iter().map(|c| {
            let action = if a.dry_run { "would delete" } else { "deleted" };
            (c.id, row(action, c, "no rule keeps it".into()))
        }))
        .collect::<std::collections::BTreeMap<_, _>>()
        .into_values()
        .collect();
    rows.sort_by_key(|r| r[1].parse::<u64>().unwrap_or(0));
    let mut out = table(
        &["ACTION", "ID", "STEP", "TIME (UTC)", "SIZE", "WHY"],
        &[false, true, true, false, true, false],
        &rows,
    );
    let n = plan.delete.len();
    let s = if n == 1 { "" } else { "s" };
    let compacted = gc.segments_compacted.len();
    let cs = if compacted == 1 { "" } else { "s" };
    out += &if a.dry_run {
        format!(
            "dry run: would delete {n} checkpoint{s} and free {} ({segments_freed} segment files); \
             would keep {}\n",
            human_bytes(bytes_freed),
            plan.keep.len()
        )
    } else {
        format!(
            "deleted {n} checkpoint{s}, freed {} ({segments_freed} segment files); kept {}\n",
            human_bytes(bytes_freed),
            plan.keep.len()
        )
    };
    if !a.no_compact {
        let verb = if a.dry_run {
            "would compact"
        } else {
            "compacted"
        };
        out += &format!(
            "{verb} {compacted} segment{cs} (copying {}); reclaimed {} in all\n",
            human_bytes(gc.bytes_written),
            human_bytes(bytes_reclaimed)
        );
    }
    for (seg, off) in &gc.corrupt_chunks {
        out += &format!(
            "chunk at segment {seg} offset {off} does not match its BLAKE3: quarantined and left \
             in place (run `ckptstore scrub`; the next save of the same tensor heals it)\n"
        );
    }
    if !gc.segments_pending.is_empty() {
        out += &format!(
            "{} in {} segment files kept for open readers (freed by the next gc after they close)\n",
            human_bytes(gc.bytes_pending),
            gc.segments_pending.len()
        );
    }
    if !a.dry_run {
        out += &format!(
            "segments: {} for {} live ({:.2}x)\n",
            human_bytes(gc.after.segment_bytes),
            human_bytes(gc.after.live_bytes),
            gc.after.amplification()
        );
    }
    if let Some((files, bytes)) = purged {
        let verb = if a.dry_run { "would delete" } else { "deleted" };
        out += &format!(
            "lost+found: {verb} {files} file(s) ({})\n",
            human_bytes(bytes)
        );
    }
    emit(&out)
}
