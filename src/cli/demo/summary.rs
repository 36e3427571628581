//! The demo's summary.

use super::kill::Killed;
use super::model::Model;
use super::recover::Recovered;
use super::resume::Resumed;
use super::writer::Commit;
use super::Args;
use crate::cli::{human_bytes, human_duration, CliResult};
use std::path::Path;
use std::time::{Duration, Instant};

/// Prints the summary of a demo that passed every check.
pub(super) fn print(
    a: &Args,
    dir: &Path,
    started: Instant,
    model: &Model,
    killed: &Killed,
    rec: &Recovered,
    resumed: &Resumed,
) -> CliResult {
    let (pid, announced_step, killed_after, killed_step) = (
        killed.pid,
        killed.announced_step,
        killed.killed_after,
        killed.killed_step,
    );
    let (acked, r, last_acked, resume_from, exact) = (
        &killed.acked,
        &rec.report,
        &rec.last_acked,
        &rec.resume_from,
        rec.exact,
    );
    let (list, resumed) = (&resumed.list, &resumed.commits);
    let store = &rec.store;
    let commits: Vec<&Commit> = acked.iter().chain(resumed).collect();
    let frozen = model.frozen_bytes();
    let logical: u64 = commits.iter().map(|c| c.logical).sum();
    let written: u64 = commits.iter().map(|c| c.written).sum();
    let dedup: u64 = commits.iter().map(|c| c.dedup).sum();
    let save_time: Duration = commits.iter().map(|c| c.duration).sum();
    let stats = store.stats();
    let mut out = String::new();
    let mut line = |k: &str, v: String| out += &format!("  {k:<20}{v}\n");
    line(
        "state",
        format!(
            "{} per checkpoint ({} tensors; {} frozen embedding)",
            human_bytes(model.state_bytes()),
            model.specs.len(),
            human_bytes(frozen)
        ),
    );
    line(
        "killed",
        match killed_step {
            Some(step) if step == announced_step => format!(
                "writer pid {pid} by SIGKILL at step {step}, {} into its save",
                human_duration(killed_after)
            ),
            Some(step) => format!(
                "writer pid {pid} by SIGKILL at step {step}, mid-save ({} after the save of step {announced_step} began)",
                human_duration(killed_after)
            ),
            None => format!(
                "writer pid {pid} by SIGKILL between saves ({} after the save of step {announced_step} began)",
                human_duration(killed_after)
            ),
        },
    );
    line(
        "last acknowledged",
        last_acked.as_ref().map_or_else(
            || "none".into(),
            |c| format!("step {} (checkpoint {})", c.step, c.id),
        ),
    );
    line(
        "recovery",
        format!(
            "{} ({} WAL records; cut {} torn bytes; {} orphan segment(s) moved to lost+found/, {})",
            human_duration(r.duration),
            r.records_replayed,
            r.truncated_tail_bytes,
            r.orphan_segments.len(),
            human_bytes(r.orphan_bytes)
        ),
    );
    line(
        "resumed from",
        match (&resume_from, exact) {
            (Some(l), Some((t, b, m))) => format!(
                "step {} (checkpoint {}), bit-exact: {t} tensors, {b} blob, {m} metadata keys",
                l.step, l.id
            ),
            _ => "step 0 (nothing committed before the kill)".into(),
        },
    );
    line(
        "checkpoints",
        format!(
            "{} live, steps {}; all verify",
            list.len(),
            steps_text(&list.iter().map(|c| c.step).collect::<Vec<_>>())
        ),
    );
    line(
        "saves",
        format!(
            "{} acknowledged ({} before the kill, {} after): {} logical",
            commits.len(),
            acked.len(),
            resumed.len(),
            human_bytes(logical)
        ),
    );
    line(
        "bytes",
        format!(
            "{} written, {} deduplicated ({:.0}%); {} on disk",
            human_bytes(written),
            human_bytes(dedup),
            100.0 * dedup as f64 / logical.max(1) as f64,
            human_bytes(stats.segment_bytes)
        ),
    );
    line(
        "save throughput",
        format!(
            "{:.0} MB/s of state ({:.0} MB/s written), {} per save on average",
            mb_per_s(logical, save_time),
            mb_per_s(written, save_time),
            human_duration(save_time / commits.len().max(1) as u32)
        ),
    );
    line("total time", human_duration(started.elapsed()));
    crate::cli::emit(&format!("ckptstore demo: ok\n{out}"))?;
    if !a.keep {
        eprintln!("demo: removing {} (pass --keep to keep it)", dir.display());
    }
    Ok(())
}

/// `3,6,9` or, for many, `3,6,9,…,291,294,297,300`.
fn steps_text(steps: &[u64]) -> String {
    let join = |s: &[u64]| s.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    if steps.len() <= 12 {
        join(steps)
    } else {
        format!(
            "{},…,{}",
            join(&steps[..3]),
            join(&steps[steps.len() - 4..])
        )
    }
}

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9)
}
