//! The hidden child writer (`ckptstore __crash-writer`): synchronous saves, or (with
//! `--in-flight K`) saves through the asynchronous pipeline with up to K not yet acknowledged.

use super::workload::{keep_last, store_options, Content, COMPACT_EVERY};
use super::WriterArgs;
use crate::cli::CliResult;
use ckptstore::{current, Pipeline, PipelineOptions, SaveHandle, Store};
use std::collections::VecDeque;
use std::io::Write;
use std::path::Path;

/// Staging buffers of the asynchronous writer, in chunks of the workload's 4 KiB: about two
/// checkpoints' worth, so that with three in flight staging sometimes waits for writes.
const STAGING_CHUNKS: usize = 48;

/// `ckptstore __crash-writer`: opens the store (recovery) and saves, deletes and compacts
/// forever, one line on stdout before and after each operation:
/// `opening`, `opened N`, `begin STEP`, `commit STEP ID C`, `delete-begin ID`, `delete ID C`,
/// `compact-begin`, `compact` (C is `compacted` when the operation also compacted the WAL,
/// else `-`). Only the parent's SIGKILL ends it; any error ends it with a message on stderr.
///
/// With `--in-flight K` it saves through a [`Pipeline`]: `begin STEP` when it starts staging
/// a save, `commit STEP ID C` when that save's handle returns (in submission order, with up
/// to K saves begun and not acknowledged; C is `compacted` when the WAL was compacted by a
/// commit since the previous acknowledgement, as the live WAL's number in `CURRENT` shows).
/// Deletions and compactions go through `Pipeline::store` and touch only acknowledged
/// checkpoints.
pub fn run_writer(a: WriterArgs) -> CliResult {
    if let Some(k) = a.in_flight {
        return run_async(a, k.max(1));
    }
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

fn flag(compacted: bool) -> &'static str {
    if compacted {
        "compacted"
    } else {
        "-"
    }
}

/// One line on stdout, flushed (the parent reads it at once).
fn tell(line: String) -> CliResult {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// The live WAL's number, from `CURRENT`: a compaction switches to a new one.
fn wal_number(dir: &Path) -> Option<u64> {
    let b = std::fs::read(dir.join(current::CURRENT_NAME)).ok()?;
    current::decode(&b).ok()
}

/// Deletes the oldest of `acked` until `keep` are left, through the pipeline's store (which
/// waits while a save is being written). Returns the live WAL's number after the last one.
fn trim(
    p: &Pipeline,
    dir: &Path,
    acked: &mut VecDeque<u64>,
    keep: usize,
) -> CliResult<Option<u64>> {
    let mut wal = None;
    while acked.len() > keep {
        let old = acked.pop_front().expect("longer than keep");
        tell(format!("delete-begin {old}"))?;
        let mut store = p.store();
        let wal_before = store.stats().wal_bytes;
        store.delete(old)?;
        let compacted = store.stats().wal_bytes < wal_before;
        // Under the store's lock no commit runs: a compaction seen now is the delete's.
        wal = wal_number(dir);
        drop(store);
        tell(format!("delete {old} {}", flag(compacted)))?;
    }
    Ok(wal)
}

/// The asynchronous writer: keeps up to `k` saves submitted and not acknowledged.
fn run_async(a: WriterArgs, k: usize) -> CliResult {
    tell("opening".into())?;
    let store = Store::open(&a.dir, store_options(false))?;
    tell(format!("opened {}", store.list().len()))?;
    // Live checkpoints this writer may delete, oldest first: what it found, then what it
    // acknowledged. Saves in flight (committed or not) are never among them.
    let mut acked: VecDeque<u64> = store.list().iter().map(|c| c.id).collect();
    let chunk = store.options().chunk_size;
    let mut p = Pipeline::new(
        store,
        PipelineOptions {
            budget_bytes: STAGING_CHUNKS * chunk,
            hash_workers: 2,
        },
    )?;
    let dir = a.dir.as_path();
    let mut step = a.first_step;
    if a.reorder {
        // The checker's test: step `step` is begun and dropped (never committed), the next
        // one is committed; then nothing more is acknowledged until the kill.
        tell(format!("begin {step}"))?;
        drop(p.begin(step)?);
        let later = Content::of(a.seed, step + 1);
        tell(format!("begin {}", step + 1))?;
        later.save_async(&mut p)?.wait()?;
        // Not an acknowledgement (the checker must find the later save by itself): it tells
        // the parent the save is durable, so that the kill lands after it however slowly
        // this machine runs the save.
        tell("parked".into())?;
        loop {
            std::thread::park();
        }
    }
    // Up to `k` saves in flight that were found durable after a kill join the live set; a
    // writer killed before its first acknowledgement would never trim them: trim first.
    let mut wal_seen = wal_number(dir);
    if let Some(w) = trim(&p, dir, &mut acked, keep_last(step))? {
        wal_seen = Some(w);
    }
    let mut lie = a.lie;
    let mut in_flight: VecDeque<(u64, SaveHandle)> = VecDeque::new();
    loop {
        // Generate first, so that what follows `begin` is all store work.
        let content = Content::of(a.seed, step);
        tell(format!("begin {step}"))?;
        if std::mem::take(&mut lie) {
            let id = p.store().list().last().map_or(1, |c| c.id + 1);
            tell(format!("commit {step} {id} -"))?;
            step += 1;
            continue;
        }
        in_flight.push_back((step, content.save_async(&mut p)?));
        // Acknowledge, in order, what has committed; wait for the oldest while `k` are in
        // flight.
        while let Some((_, h)) = in_flight.front() {
            if in_flight.len() < k && !h.is_done() {
                break;
            }
            let (done_step, h) = in_flight.pop_front().expect("front exists");
            let id = h.wait()?.commit.checkpoint.id;
            // Any compaction since the last look was a commit's (deletes and explicit
            // compactions record theirs): at least one since the previous acknowledgement.
            let now = wal_number(dir);
            let compacted = now != wal_seen;
            wal_seen = now;
            tell(format!("commit {done_step} {id} {}", flag(compacted)))?;
            acked.push_back(id);
            if let Some(w) = trim(&p, dir, &mut acked, keep_last(done_step))? {
                wal_seen = Some(w);
            }
            if done_step.is_multiple_of(COMPACT_EVERY) {
                tell("compact-begin".into())?;
                let mut store = p.store();
                store.compact_wal()?;
                wal_seen = wal_number(dir);
                drop(store);
                tell("compact".into())?;
            }
        }
        step += 1;
    }
}
