//! The summary of a crashtest run, as text or JSON, and the exit status.

use super::ledger::{Phase, Run};
use crate::cli::{fail, human_duration, CliResult};
use serde_json::{json, Value};
use std::time::Duration;

/// Prints the summary (text or JSON) and fails naming the first violation, if any.
pub(super) fn report(run: &Run, elapsed: Duration, failed_at: Option<(u64, Phase)>) -> CliResult {
    let t = &run.tally;
    let a = run.a;
    let ok = run.violations.is_empty();
    let phases: serde_json::Map<String, Value> = t
        .phases
        .iter()
        .map(|(p, n)| (p.name().to_string(), json!(n)))
        .collect();
    let in_flight: serde_json::Map<String, Value> = t
        .saves_in_flight
        .iter()
        .map(|(n, k)| (n.to_string(), json!(k)))
        .collect();
    if a.json {
        crate::cli::emit_json(&json!({
            "ok": ok,
            "dir": run.dir.display().to_string(),
            "seed": a.seed,
            "data_seed": run.data_seed,
            "continued": run.continued,
            "mode": if a.asynchronous { "async" } else { "sync" },
            "in_flight": if a.asynchronous { json!(a.in_flight) } else { Value::Null },
            "kills_by_saves_in_flight": in_flight,
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
            "saves",
            if a.asynchronous {
                let by: Vec<String> = t
                    .saves_in_flight
                    .iter()
                    .map(|(n, k)| format!("{k} with {n}"))
                    .collect();
                format!(
                    "asynchronous, up to {} in flight; kills by saves begun and not acknowledged: {}",
                    a.in_flight,
                    by.join(", ")
                )
            } else {
                "synchronous, one at a time".into()
            },
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
        crate::cli::emit(&format!("ckptstore crashtest: {head}\n{out}"))?;
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
