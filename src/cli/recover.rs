//! `ckptstore recover`: open a store as its writer (which runs recovery) and report what
//! recovery found and repaired.

use super::CliResult;
use super::{check_dir, emit, emit_json, fail, human_bytes, human_duration, info_json};
use ckptstore::current::CURRENT_NAME;
use ckptstore::store::{parse_wal_file_name, SEGMENTS_DIR};
use ckptstore::{Options, RebuildReport, RecoveryMode, RecoveryReport, Store};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Arguments of `ckptstore recover`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The store directory (it must exist: `recover` never creates a store), or a bucket
    /// store's URL (s3://bucket/prefix, file://...): then recovery lists its commit objects,
    /// reports the newest, and removes the objects no commit names once older than the grace.
    pub dir: PathBuf,
    /// A URL only: report what would be removed, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// A URL only: objects no commit names are removed once this old (seconds; default one
    /// hour: a younger one may be a live writer's upload in flight).
    #[arg(long, value_name = "SECS")]
    pub grace_secs: Option<u64>,
    /// Salvage a store whose WAL is corrupt before its end (RecoveryMode::PointInTime):
    /// skip the damaged record and keep every valid record before and after it that applies.
    /// Nothing is deleted: the WAL as it was and the segments no kept record references go
    /// to `lost+found/` in the store.
    #[arg(long)]
    pub salvage: bool,
    /// Refuse to repair anything, even a torn tail left by a crash mid-commit
    /// (RecoveryMode::AbsoluteConsistency): a check that the store is clean.
    #[arg(long, conflicts_with = "salvage")]
    pub strict: bool,
    /// Rebuild the WAL from the commit trailers in the segments (the WAL or CURRENT is lost
    /// or damaged): restores every checkpoint whose trailer and chunks are present, then
    /// scrubs the store (as `ckptstore scrub`: reads every chunk, quarantines the bad ones
    /// again — the quarantine lived in the WAL — and heals what a stored copy can heal; with
    /// --json, its report is `scrub`). Nothing is deleted: the old CURRENT and WAL files go to
    /// `lost+found/`. Pins are not restored; a deleted checkpoint whose chunks are still
    /// stored comes back (delete it again).
    #[arg(long, conflicts_with_all = ["salvage", "strict"])]
    pub rebuild: bool,
    /// Print JSON: every field of the recovery report, plus `latest` (the newest checkpoint,
    /// as in `ls --json`, or null).
    #[arg(long)]
    pub json: bool,
}

fn looks_like_store(dir: &Path) -> bool {
    dir.join(CURRENT_NAME).exists()
        || dir.join(SEGMENTS_DIR).is_dir()
        || std::fs::read_dir(dir).is_ok_and(|rd| {
            rd.flatten()
                .any(|e| parse_wal_file_name(&e.file_name().to_string_lossy()).is_some())
        })
}

fn names(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| {
            p.file_name()
                .map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn rebuild_json(r: &RebuildReport) -> Value {
    json!({
        "segments_scanned": r.segments_scanned,
        "unreadable_segments": r.unreadable_segments.iter().map(|(s, p)| json!({"segment": s, "problem": p})).collect::<Vec<_>>(),
        "trailers": r.trailers,
        "restored": r.restored,
        "not_restored": r.unrestorable.iter().map(|(id, why)| json!({"id": id, "why": why})).collect::<Vec<_>>(),
        "repointed_chunks": r.repointed_chunks,
        "wal_file": r.wal_file.display().to_string(),
        "lost_found": r.lost_found.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
    })
}

fn report_json(r: &RecoveryReport, mode: &str, store: &Store) -> Value {
    json!({
        "dir": store.dir().display().to_string(),
        "mode": mode,
        "created": r.created,
        "wal_file": r.wal_file.display().to_string(),
        "records_replayed": r.records_replayed,
        "truncated_tail_bytes": r.truncated_tail_bytes,
        "truncated_tail_reason": r.truncated_tail_reason,
        "salvaged_corruption": r.salvaged_corruption,
        "orphan_segments": r.orphan_segments.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "orphan_bytes": r.orphan_bytes,
        "lost_found": r.lost_found.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "stale_files": r.stale_files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "damaged_segments": r.damaged_segments.iter().map(|(s, p)| json!({"segment": s, "problem": p})).collect::<Vec<_>>(),
        "checkpoints": r.checkpoints,
        "features": store.features().names(),
        "unknown_records_skipped": r.unknown_records_skipped,
        "duration_ns": r.duration.as_nanos() as u64,
        "latest": store.latest().as_ref().map(info_json),
    })
}

/// Runs recovery as the writer and prints its report.
pub fn run(a: Args) -> CliResult {
    if super::is_url(&a.dir) {
        return super::recover_remote::run(&a);
    }
    if a.dry_run || a.grace_secs.is_some() {
        return fail("--dry-run and --grace-secs are for a bucket store (a URL)");
    }
    check_dir(&a.dir)?;
    if !looks_like_store(&a.dir) {
        return fail(format!(
            "{} is not a ckptstore store (no CURRENT, WAL file or segments/); refusing to create one",
            a.dir.display()
        ));
    }
    let (mode, mode_name) = if a.rebuild {
        (
            RecoveryMode::TolerateTailCorruption,
            "rebuild from segments",
        )
    } else if a.salvage {
        (RecoveryMode::PointInTime, "point-in-time (salvage)")
    } else if a.strict {
        (RecoveryMode::AbsoluteConsistency, "absolute-consistency")
    } else {
        (
            RecoveryMode::TolerateTailCorruption,
            "tolerate-tail-corruption",
        )
    };
    let opts = Options {
        recovery_mode: mode,
        ..super::store_options()
    };
    let (store, rebuilt) = if a.rebuild {
        // Only a store that does not open: a rebuild of a healthy one would drop its pins and
        // bring back deleted checkpoints, for nothing.
        if let Ok(s) = Store::open(&a.dir, Options::read_only()) {
            return fail(format!(
                "{} opens ({} checkpoints): its WAL is intact, nothing to rebuild (a rebuild \
                 would drop its pins and bring back deleted checkpoints); run `ckptstore \
                 recover` without --rebuild",
                a.dir.display(),
                s.list().len()
            ));
        }
        let (s, r) = Store::rebuild(&a.dir, opts)?;
        (s, Some(r))
    } else {
        (Store::open(&a.dir, opts)?, None)
    };
    let r = store.recovery_report().clone();
    // A rebuild scrubs what it restored (the trailers are copies, the chunks are the truth;
    // the quarantine was in the lost WAL): what stays broken is reported.
    let bad: Vec<(u64, String)> = rebuilt
        .as_ref()
        .map(|rb| rb.scrub.broken.clone())
        .unwrap_or_default();
    if a.json {
        let mut v = report_json(&r, mode_name, &store);
        if let Some(rb) = &rebuilt {
            v["rebuild"] = rebuild_json(rb);
            v["scrub"] = super::scrub::report_json(&rb.scrub);
            v["verify_failures"] = bad
                .iter()
                .map(|(id, e)| json!({"id": id, "error": e}))
                .collect();
        }
        emit_json(&v)?;
    } else {
        let mut out = format!(
            "recovered {} in {} (mode: {mode_name})\n",
            a.dir.display(),
            human_duration(r.duration)
        );
        let mut line = |k: &str, v: String| out += &format!("  {k:<18}{v}\n");
        if let Some(rb) = &rebuilt {
            line(
                "rebuild",
                format!(
                    "{} segment(s) read, {} commit trailer(s), {} checkpoint(s) restored {:?}, \
                     {} chunk reference(s) found moved; new WAL {}",
                    rb.segments_scanned,
                    rb.trailers,
                    rb.restored.len(),
                    rb.restored,
                    rb.repointed_chunks,
                    rb.wal_file.display()
                ),
            );
            for (id, why) in &rb.unrestorable {
                line("not restored", format!("checkpoint {id}: {why}"));
            }
            for (s, why) in &rb.unreadable_segments {
                line("unreadable", format!("segment {s}: {why}"));
            }
            if !rb.lost_found.is_empty() {
                line(
                    "set aside",
                    format!("in lost+found/: {}", names(&rb.lost_found)),
                );
            }
            let h = &rb.scrub.heal;
            line(
                "scrub",
                format!(
                    "{} read; {} chunk(s) quarantined, {} healed, {} unhealed",
                    human_bytes(rb.scrub.bytes_read),
                    h.quarantined.len(),
                    h.healed.len(),
                    h.unhealed.len()
                ),
            );
            line(
                "verify",
                if bad.is_empty() {
                    format!("all {} checkpoint(s) verify", r.checkpoints)
                } else {
                    bad.iter()
                        .map(|(id, e)| format!("checkpoint {id}: {e}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                },
            );
        }
        line(
            "wal",
            format!(
                "{}, {} records replayed",
                r.wal_file.display(),
                r.records_replayed
            ),
        );
        line(
            "torn tail",
            match (&r.truncated_tail_reason, r.truncated_tail_bytes) {
                (_, 0) => "none".into(),
                (Some(why), n) => format!("cut {n} bytes ({why})"),
                (None, n) => format!("cut {n} bytes"),
            },
        );
        if let Some(s) = &r.salvaged_corruption {
            line("salvage", s.clone());
        }
        line(
            "orphan segments",
            if r.orphan_segments.is_empty() {
                "none".into()
            } else {
                format!(
                    "moved to lost+found/ {} ({}): {}",
                    r.orphan_segments.len(),
                    human_bytes(r.orphan_bytes),
                    names(&r.orphan_segments)
                )
            },
        );
        line(
            "stale files",
            if r.stale_files.is_empty() {
                "none".into()
            } else {
                format!("{}: {}", r.stale_files.len(), names(&r.stale_files))
            },
        );
        if !r.lost_found.is_empty() {
            line(
                "lost+found",
                format!(
                    "{} file(s) set aside: {} (`ckptstore gc {} --purge-lost-found` deletes them)",
                    r.lost_found.len(),
                    names(&r.lost_found),
                    a.dir.display()
                ),
            );
        }
        line(
            "damaged segments",
            if r.damaged_segments.is_empty() {
                "none".into()
            } else {
                r.damaged_segments
                    .iter()
                    .map(|(s, p)| format!("{s} ({p})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        );
        line("format features", store.features().to_string());
        line(
            "checkpoints",
            match store.latest() {
                Some(l) => format!(
                    "{} live, latest id {} at step {}",
                    r.checkpoints, l.id, l.step
                ),
                None => format!("{} live", r.checkpoints),
            },
        );
        emit(&out)?;
    }
    if !bad.is_empty() {
        return fail(format!(
            "rebuilt, but {} checkpoint(s) do not verify: {}",
            bad.len(),
            bad.iter()
                .map(|(id, _)| id.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !r.damaged_segments.is_empty() {
        return fail(format!(
            "recovered, but {} segment(s) referenced by committed checkpoints are damaged ({}); \
             `ckptstore verify` names the affected checkpoints",
            r.damaged_segments.len(),
            r.damaged_segments
                .iter()
                .map(|(s, p)| format!("segment {s} {p}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(())
}
