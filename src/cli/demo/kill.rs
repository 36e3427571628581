//! Phase 1: train in a child writer process and SIGKILL it in the middle of a save.

use super::writer::Commit;
use super::Args;
use crate::cli::{fail, human_bytes, human_duration, say, CliResult, Failure, Reaper};
use indicatif::ProgressBar;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What phase 1 left: the writer's acknowledged commits and where the kill landed.
pub(super) struct Killed {
    /// The writer's process id.
    pub(super) pid: u32,
    /// Its acknowledged commits, in order (those read after the kill included).
    pub(super) acked: Vec<Commit>,
    /// The step whose save the kill was aimed at.
    pub(super) announced_step: u64,
    /// From that announcement to the SIGKILL.
    pub(super) killed_after: Duration,
    /// The save in flight when the writer died, if any.
    pub(super) killed_step: Option<u64>,
}

/// Spawns the writer, reads its lines, kills it during the save after `--kill-after` commits.
pub(super) fn train_and_kill(a: &Args, dir: &Path, bar: &ProgressBar) -> CliResult<Killed> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .arg("__demo-writer")
        .arg("--dir")
        .arg(dir)
        .args(["--steps", &a.steps.to_string()])
        .args(["--save-every", &a.save_every.to_string()])
        .args(["--state-mib", &a.state_mib.to_string()])
        .args(["--seed", &a.seed.to_string()])
        .args(["--io", &a.io.to_string()])
        // The writer waits for its stdin to close before it exits, so the SIGKILL always finds
        // it alive, however late this parent reads its lines on a loaded machine.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| Failure(format!("spawn the demo writer: {e}")))?;
    let pid = child.id();
    let stdout = child.stdout.take().expect("piped");
    let hold_open = child.stdin.take();
    let mut reaper = Reaper(Some(child));
    bar.set_prefix("writer");
    say(bar, format!("demo: writer process {pid} started"));

    // Lines the writer printed: `saving step S` (a save begins) and `committed ...` (its
    // commit() returned: acknowledged). `in_flight` is the save begun and not acknowledged.
    let mut acked: Vec<Commit> = Vec::new();
    let mut in_flight: Option<u64> = None;
    let mut on_line = |line: &str, acked: &mut Vec<Commit>, late: bool| -> CliResult {
        if let Some(rest) = line.strip_prefix("saving step ") {
            let step = rest
                .trim()
                .parse()
                .map_err(|_| Failure(format!("bad writer line {line:?}")))?;
            in_flight = Some(step);
            bar.set_message(format!("saving step {step}"));
        } else if line.starts_with("committed ") {
            let c =
                Commit::parse(line).ok_or_else(|| Failure(format!("bad writer line {line:?}")))?;
            in_flight = None;
            bar.set_position(c.step);
            bar.set_message(format!("committed step {} (checkpoint {})", c.step, c.id));
            let late = if late { " (read after the kill)" } else { "" };
            say(
                bar,
                format!(
                    "demo: writer committed step {} as checkpoint {} in {} ({} written, {} deduplicated){late}",
                    c.step,
                    c.id,
                    human_duration(c.duration),
                    human_bytes(c.written),
                    human_bytes(c.dedup)
                ),
            );
            acked.push(c);
        } else {
            return fail(format!("unexpected line from the demo writer: {line:?}"));
        }
        Ok(())
    };
    let mut lines = BufReader::new(stdout).lines();
    let mut killed: Option<(u64, Duration)> = None;
    for line in lines.by_ref() {
        let line = line?;
        on_line(&line, &mut acked, false)?;
        let Some(step) = line.strip_prefix("saving step ") else {
            continue;
        };
        if (acked.len() as u64) < a.kill_after {
            continue;
        }
        let announced = Instant::now();
        let delay = match a.kill_delay_ms {
            Some(ms) => Duration::from_millis(ms),
            None if acked.is_empty() => Duration::from_millis(5),
            None => {
                let mean = acked.iter().map(|c| c.duration).sum::<Duration>() / acked.len() as u32;
                (mean * 2 / 5).max(Duration::from_millis(1))
            }
        };
        std::thread::sleep(delay);
        let child = reaper.0.as_mut().expect("running");
        let at = announced.elapsed();
        child.kill()?; // SIGKILL
        let status = child.wait()?;
        reaper.0 = None;
        use std::os::unix::process::ExitStatusExt;
        if status.signal() != Some(9) {
            return fail(format!(
                "the writer exited ({status}) before the SIGKILL landed; use more --steps or a smaller --kill-delay-ms"
            ));
        }
        say(
            bar,
            format!(
                "demo: SIGKILL sent to writer {pid} {} after it announced the save of step {}",
                human_duration(at),
                step.trim()
            ),
        );
        killed = Some((step.trim().parse().unwrap_or(0), at));
        break;
    }
    let Some((announced_step, killed_after)) = killed else {
        drop(hold_open);
        let status = reaper.0.take().map(|mut c| c.wait()).transpose()?;
        return fail(format!(
            "the demo writer ended ({}) before the kill point",
            status.map_or_else(|| "unknown status".into(), |s| s.to_string())
        ));
    };
    // The writer is dead; what it printed before dying still counts (a commit that returned
    // is acknowledged even if we read its line only now).
    for line in lines {
        on_line(&line?, &mut acked, true)?;
    }
    let killed_step = in_flight;
    match killed_step {
        Some(s) if s != announced_step => say(
            bar,
            format!("demo: the writer had moved on: it died saving step {s}"),
        ),
        Some(_) => {}
        None => say(bar, "demo: the writer died between saves"),
    }
    Ok(Killed {
        pid,
        acked,
        announced_step,
        killed_after,
        killed_step,
    })
}
