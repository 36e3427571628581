//! `ckptstore pin` / `ckptstore unpin`: a pinned checkpoint is never deleted — `gc` always
//! keeps it and `Store::delete` refuses it — until it is unpinned. Durable when it returns.

use super::{check_dir, emit, emit_json, fail, has_store, CliResult};
use ckptstore::{Selector, Store};
use serde_json::json;
use std::path::PathBuf;

/// Arguments of `ckptstore pin` and `ckptstore unpin`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The store directory.
    pub dir: PathBuf,
    /// The checkpoint id (see `ckptstore ls`).
    pub id: u64,
    /// Print JSON: {"id", "step", "pinned", "changed"}.
    #[arg(long)]
    pub json: bool,
}

/// Pins (`pin = true`) or unpins checkpoint `a.id`.
pub fn run(a: Args, pin: bool) -> CliResult {
    check_dir(&a.dir)?;
    if !has_store(&a.dir) {
        return fail(format!(
            "{} is not a ckptstore store (no CURRENT file)",
            a.dir.display()
        ));
    }
    let mut store = Store::open(&a.dir, super::store_options())?;
    let changed = if pin {
        store.pin(a.id)?
    } else {
        store.unpin(a.id)?
    };
    let info = store.info(Selector::Id(a.id))?;
    if a.json {
        return emit_json(&json!({
            "id": a.id, "step": info.step, "pinned": pin, "changed": changed,
        }));
    }
    let what = if pin { "pinned" } else { "unpinned" };
    emit(&if changed {
        format!("{what} checkpoint {} (step {})\n", a.id, info.step)
    } else {
        format!(
            "checkpoint {} (step {}) was already {what}\n",
            a.id, info.step
        )
    })
}
