//! The hidden child writer (`ckptstore __crash-writer`).

use super::workload::{keep_last, store_options, Content, COMPACT_EVERY};
use super::WriterArgs;
use crate::cli::CliResult;
use ckptstore::Store;
use std::io::Write;

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
