//! The hidden child writer (`ckptstore __demo-writer`) and the parent's parsing of its lines.

use super::model::Model;
use super::WriterArgs;
use crate::cli::CliResult;
use ckptstore::{CommitInfo, Options, Store};
use std::io::Write;
use std::time::Duration;

/// `ckptstore __demo-writer`: trains from step 1 and saves every K steps, printing
/// `saving step S` before each save and `committed step S id I ...` after each commit.
pub fn run_writer(a: WriterArgs) -> CliResult {
    let model = Model::new(a.seed, a.state_mib, a.steps);
    let opts = Options {
        io: a.io.open().io,
        ..Options::default()
    };
    let mut store = Store::open(&a.dir, opts)?;
    let mut out = std::io::stdout().lock();
    for step in (a.save_every..=a.steps).step_by(a.save_every as usize) {
        // Generate first, so the announced save is all store work.
        let data = model.state(step);
        writeln!(out, "saving step {step}")?;
        out.flush()?;
        let c = model.save(&mut store, step, &data)?;
        writeln!(
            out,
            "committed step {step} id {} logical {} written {} dedup {} ns {}",
            c.checkpoint.id,
            c.checkpoint.bytes,
            c.bytes_written,
            c.bytes_deduplicated,
            c.duration.as_nanos()
        )?;
        out.flush()?;
    }
    // Stay alive until the parent closes our stdin (or kills us): a parent that reads our
    // lines late must still find a process to SIGKILL, not one that already exited.
    drop(out);
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut rest);
    Ok(())
}
/// One acknowledged commit.
#[derive(Debug, Clone)]
pub(super) struct Commit {
    pub(super) step: u64,
    pub(super) id: u64,
    pub(super) logical: u64,
    pub(super) written: u64,
    pub(super) dedup: u64,
    pub(super) duration: Duration,
}

impl Commit {
    pub(super) fn of(c: &CommitInfo) -> Commit {
        Commit {
            step: c.checkpoint.step,
            id: c.checkpoint.id,
            logical: c.checkpoint.bytes,
            written: c.bytes_written,
            dedup: c.bytes_deduplicated,
            duration: c.duration,
        }
    }

    /// Parses `committed step S id I logical L written W dedup D ns T`.
    pub(super) fn parse(line: &str) -> Option<Commit> {
        let w: Vec<&str> = line.split_whitespace().collect();
        let field = |key: &str| -> Option<u64> {
            let i = w.iter().position(|x| *x == key)?;
            w.get(i + 1)?.parse().ok()
        };
        Some(Commit {
            step: field("step")?,
            id: field("id")?,
            logical: field("logical")?,
            written: field("written")?,
            dedup: field("dedup")?,
            duration: Duration::from_nanos(field("ns")?),
        })
    }
}
