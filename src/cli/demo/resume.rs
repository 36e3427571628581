//! Phase 3: resume training in-process from the recovered step, then verify every checkpoint.

use super::model::Model;
use super::writer::Commit;
use super::Args;
use crate::cli::{fail, human_bytes, human_duration, say, CliResult};
use ckptstore::{CheckpointInfo, Store};
use indicatif::ProgressBar;

/// The commits made after the recovery and the checkpoints listed at the end.
pub(super) struct Resumed {
    pub(super) commits: Vec<Commit>,
    pub(super) list: Vec<CheckpointInfo>,
}

/// Saves the remaining steps, verifies all checkpoints, checks the newest bit-exact and that
/// every commit with an older one deduplicated the frozen tensors.
pub(super) fn resume_and_verify(
    a: &Args,
    bar: &ProgressBar,
    model: &Model,
    store: &mut Store,
    resume_step: u64,
    acked: &[Commit],
) -> CliResult<Resumed> {
    bar.set_prefix("resumed");
    bar.set_message("");
    bar.set_position(resume_step);
    let mut resumed: Vec<Commit> = Vec::new();
    let first_save = (resume_step / a.save_every + 1) * a.save_every;
    for step in (first_save..=a.steps).step_by(a.save_every as usize) {
        bar.set_message(format!("saving step {step}"));
        let data = model.state(step);
        let c = Commit::of(&model.save(store, step, &data)?);
        bar.set_position(step);
        say(
            bar,
            format!(
                "demo: resumed training committed step {} as checkpoint {} in {} ({} written, {} deduplicated)",
                c.step,
                c.id,
                human_duration(c.duration),
                human_bytes(c.written),
                human_bytes(c.dedup)
            ),
        );
        resumed.push(c);
    }
    bar.set_position(a.steps);
    bar.set_prefix("verify");
    bar.set_message("all checkpoints");
    for (id, res) in store.verify_all() {
        if let Err(e) = res {
            return fail(format!("VIOLATION: checkpoint {id} does not verify: {e}"));
        }
    }
    let list = store.list();
    let last = list.last().expect("at least one checkpoint");
    let last_step = a.steps / a.save_every * a.save_every;
    if last.step != last_step {
        return fail(format!(
            "VIOLATION: the newest checkpoint is step {}, expected {last_step}",
            last.step
        ));
    }
    model.check_exact(store, last.id)?;
    // The frozen embedding must be deduplicated by every commit that has an older one.
    let commits: Vec<&Commit> = acked.iter().chain(&resumed).collect();
    let frozen = model.frozen_bytes();
    for c in &commits {
        let has_older = list.iter().any(|l| l.id < c.id);
        if has_older && c.dedup < frozen {
            return fail(format!(
                "VIOLATION: checkpoint {} deduplicated only {} bytes; the frozen tensors alone are {frozen}",
                c.id, c.dedup
            ));
        }
    }
    Ok(Resumed {
        commits: resumed,
        list,
    })
}
