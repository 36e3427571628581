//! Phase 2: reopen the store (recovery) and check what the kill left against the
//! acknowledgements.

use super::kill::Killed;
use super::model::Model;
use super::writer::Commit;
use crate::cli::{fail, human_bytes, human_duration, say, CliResult};
use ckptstore::io::Storage;
use ckptstore::{CheckpointInfo, Options, RecoveryReport, Selector, Store};
use indicatif::ProgressBar;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// The reopened store and what phase 2 found in it.
pub(super) struct Recovered {
    pub(super) store: Store,
    pub(super) report: RecoveryReport,
    pub(super) last_acked: Option<Commit>,
    /// The newest checkpoint, checked bit-exact; training resumes from it.
    pub(super) resume_from: Option<CheckpointInfo>,
    pub(super) resume_step: u64,
    /// Tensors, blobs and metadata keys compared in `resume_from`.
    pub(super) exact: Option<(usize, usize, usize)>,
}

/// Every acknowledged commit survived unchanged, and the newest checkpoint is at least the
/// last acknowledged one and bit-exact.
pub(super) fn recover(
    dir: &Path,
    io: Arc<dyn Storage>,
    bar: &ProgressBar,
    model: &Model,
    killed: &Killed,
) -> CliResult<Recovered> {
    let acked = &killed.acked;
    let killed_step = killed.killed_step;
    bar.set_prefix("recovery");
    bar.set_message("reopening the store");
    let t = Instant::now();
    let store = Store::open(
        dir,
        Options {
            io,
            ..Options::default()
        },
    )?;
    let open_time = t.elapsed();
    let r = store.recovery_report().clone();
    say(
        bar,
        format!(
            "demo: recovery took {} (open {}): {} WAL records replayed, {} torn tail bytes cut, \
             {} orphan segment(s) moved to lost+found/ ({}), {} stale file(s), {} checkpoint(s)",
            human_duration(r.duration),
            human_duration(open_time),
            r.records_replayed,
            r.truncated_tail_bytes,
            r.orphan_segments.len(),
            human_bytes(r.orphan_bytes),
            r.stale_files.len(),
            r.checkpoints
        ),
    );
    if !r.damaged_segments.is_empty() {
        return fail(format!(
            "VIOLATION: recovery found damaged segments {:?}",
            r.damaged_segments
        ));
    }
    // Every acknowledged commit must have survived, unchanged.
    for c in acked {
        match store.info(Selector::Id(c.id)) {
            Ok(i) if i.step == c.step => {}
            Ok(i) => {
                return fail(format!(
                    "VIOLATION: acknowledged checkpoint {} was step {}, now step {}",
                    c.id, c.step, i.step
                ))
            }
            Err(e) => {
                return fail(format!(
                    "VIOLATION: acknowledged checkpoint {} (step {}) is gone after recovery: {e}",
                    c.id, c.step
                ))
            }
        }
    }
    let latest = store.latest();
    let last_acked = acked.last().cloned();
    let resume_from = match (&latest, &last_acked) {
        (None, None) => None,
        (None, Some(c)) => {
            return fail(format!(
                "VIOLATION: the store is empty after recovery, but step {} was acknowledged as checkpoint {}",
                c.step, c.id
            ))
        }
        (Some(l), Some(c)) if l.id < c.id || l.step < c.step => {
            return fail(format!(
                "VIOLATION: latest checkpoint after recovery is {} (step {}), older than the last acknowledged {} (step {})",
                l.id, l.step, c.id, c.step
            ))
        }
        (Some(l), c) => {
            let acked_step = c.as_ref().map_or(0, |c| c.step);
            if l.step != acked_step && Some(l.step) != killed_step {
                return fail(format!(
                    "VIOLATION: latest checkpoint {} is step {}, which was neither acknowledged nor being saved",
                    l.id, l.step
                ));
            }
            Some(l.clone())
        }
    };
    let (resume_step, exact) = match &resume_from {
        Some(l) => {
            let counts = model.check_exact(&store, l.id)?;
            let how = match killed_step {
                Some(s) if s == l.step => {
                    "the interrupted save had become durable before the kill (committed, not yet acknowledged)"
                }
                Some(_) => "the interrupted save was rolled back",
                None => "no save was in flight",
            };
            say(
                bar,
                format!(
                    "demo: latest checkpoint {} (step {}) is bit-exact ({} tensors, {} blob, {} metadata keys); {how}",
                    l.id, l.step, counts.0, counts.1, counts.2
                ),
            );
            (l.step, Some(counts))
        }
        None => {
            say(
                bar,
                "demo: no checkpoint was committed before the kill; training restarts from step 0",
            );
            (0, None)
        }
    };
    Ok(Recovered {
        store,
        report: r,
        last_acked,
        resume_from,
        resume_step,
        exact,
    })
}
