//! `ckptstore scrub`: verify every chunk, quarantine the bad ones, heal what a stored copy can
//! heal, and say which checkpoints stay broken.

use super::CliResult;
use super::{check_dir, emit, emit_json, fail, human_bytes, human_duration};
use ckptstore::current::CURRENT_NAME;
use ckptstore::{Options, ScrubReport, Store};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `ckptstore scrub`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The store directory (an existing store; scrub takes the writer lock).
    pub dir: PathBuf,
    /// Print JSON: {"ok", "checkpoints", "bytes_read", "quarantined": [{"segment", "offset"}],
    /// "healed": [{"segment", "offset", "to_segment", "to_offset"}], "unhealed": [{"segment",
    /// "offset", "checkpoints"}], "broken": [{"id", "error"}]}. Same exit status.
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn report_json(r: &ScrubReport) -> Value {
    let loc = |(segment, offset): (u64, u64)| json!({ "segment": segment, "offset": offset });
    json!({
        "ok": r.broken.is_empty(),
        "checkpoints": r.checkpoints,
        "bytes_read": r.bytes_read,
        "quarantined": r.heal.quarantined.iter().copied().map(loc).collect::<Vec<_>>(),
        "healed": r.heal.healed.iter().map(|&((s, o), (ts, to))| json!({
            "segment": s, "offset": o, "to_segment": ts, "to_offset": to,
        })).collect::<Vec<_>>(),
        "unhealed": r.heal.unhealed.iter().map(|((s, o), ids)| json!({
            "segment": s, "offset": o, "checkpoints": ids,
        })).collect::<Vec<_>>(),
        "broken": r.broken.iter().map(|(id, e)| json!({ "id": id, "error": e })).collect::<Vec<_>>(),
    })
}

/// Scrubs; exits non-zero when a checkpoint stays broken.
pub fn run(a: Args) -> CliResult {
    check_dir(&a.dir)?;
    if !a.dir.join(CURRENT_NAME).exists() {
        return fail(format!(
            "{} is not a ckptstore store (no CURRENT); scrub never creates one",
            a.dir.display()
        ));
    }
    let started = Instant::now();
    let mut store = Store::open(&a.dir, Options::default())?;
    let r = store.scrub()?;
    if a.json {
        emit_json(&report_json(&r))?;
    } else {
        let mut out = format!(
            "scrubbed {}: {} checkpoint{}, {} read in {}\n",
            a.dir.display(),
            r.checkpoints,
            if r.checkpoints == 1 { "" } else { "s" },
            human_bytes(r.bytes_read),
            human_duration(started.elapsed())
        );
        for (s, o) in &r.heal.quarantined {
            out += &format!(
                "quarantined  chunk at segment {s} offset {o}: does not match its BLAKE3\n"
            );
        }
        for ((s, o), (ts, to)) in &r.heal.healed {
            out += &format!(
                "healed       chunk at segment {s} offset {o}: its checkpoints now use the copy at segment {ts} offset {to}\n"
            );
        }
        for ((s, o), ids) in &r.heal.unhealed {
            out += &format!(
                "unhealed     chunk at segment {s} offset {o}: no intact copy stored; checkpoints {ids:?} \
                 stay broken until a save holds these bytes again\n"
            );
        }
        for (id, e) in &r.broken {
            out += &format!("BROKEN       checkpoint {id}: {e}\n");
        }
        if r.broken.is_empty() {
            out += "every checkpoint verifies\n";
        }
        emit(&out)?;
    }
    match r.broken.len() {
        0 => Ok(()),
        n => fail(format!(
            "{n} checkpoint(s) stay broken (first: checkpoint {}); the next save of the same \
             tensors heals those whose chunks it holds",
            r.broken[0].0
        )),
    }
}
