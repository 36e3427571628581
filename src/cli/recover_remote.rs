//! `ckptstore recover URL`: recovery of a bucket store. There is no WAL tail to repair in a
//! bucket (a commit object is whole or absent), so recovery is: list the commit prefix,
//! read the newest commit object, and remove what no commit names (superseded commit objects;
//! segment objects once older than the grace: uploads or deletes cut short by a crash).

use super::{emit, emit_json, fail, human_bytes, human_duration, CliResult};
use ckptstore::remote::{log_key, Bucket, Publisher};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

pub fn run(a: &super::recover::Args) -> CliResult {
    if a.salvage || a.strict || a.rebuild {
        return fail(
            "--salvage, --strict and --rebuild are for a store directory: a bucket store has no \
             WAL to repair (a commit object is whole or absent)",
        );
    }
    let url = a.dir.to_string_lossy().into_owned();
    let opts = super::store_options();
    let bucket = Bucket::open(&url.parse()?)?.with_policy(opts.remote_policy);
    bucket.check_access()?;
    let grace = a
        .grace_secs
        .map_or(opts.remote_policy.orphan_grace, Duration::from_secs);
    // A token that names no writer's uploads: every unnamed object is judged by its age alone.
    let mut p = Publisher::new(Arc::new(bucket), "recover")?;
    let r = p.recover(grace, !a.dry_run)?;
    if a.json {
        return emit_json(&json!({
            "url": url,
            "newest_commit": r.head_seq.map(log_key),
            "seq": r.head_seq,
            "checkpoints": r.checkpoints,
            "segment_objects": r.segment_objects,
            "segment_bytes": r.segment_bytes,
            "grace_secs": grace.as_secs(),
            "dry_run": a.dry_run,
            "unnamed": r.unnamed.iter().map(|o| json!({
                "key": o.key,
                "bytes": o.size,
                "age_secs": o.age.as_secs(),
                "removable": o.removable,
                "removed": o.removed,
            })).collect::<Vec<_>>(),
        }));
    }
    let mut out = format!("recovered {url} (bucket store)\n");
    let mut line = |k: &str, v: String| out += &format!("  {k:<18}{v}\n");
    line(
        "newest commit",
        match r.head_seq {
            Some(seq) => format!(
                "{} (seq {seq}): {} checkpoint(s), {} segment object(s), {}",
                log_key(seq),
                r.checkpoints,
                r.segment_objects,
                human_bytes(r.segment_bytes)
            ),
            None => "none (an empty store)".into(),
        },
    );
    if r.unnamed.is_empty() {
        line("unnamed objects", "none".into());
    }
    for o in &r.unnamed {
        let what = match (o.removable, o.removed) {
            (_, true) => "removed".to_string(),
            (true, false) => "would remove (--dry-run)".to_string(),
            (false, _) => format!(
                "kept: younger than the grace of {} (may be an upload in flight)",
                human_duration(grace)
            ),
        };
        line(
            "unnamed",
            format!(
                "{} ({}, {} old): {what}",
                o.key,
                human_bytes(o.size),
                human_duration(o.age)
            ),
        );
    }
    emit(&out)
}
