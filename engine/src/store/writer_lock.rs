//! The writer lock: `flock(2)` on `LOCK`, with this process's pid written into it.
//!
//! A `flock` belongs to the open file description, and `fork(2)` copies descriptors: a child
//! forked by any thread of this process (a subprocess being spawned, a data-loader worker)
//! holds the lock too until it execs or exits. So after a writer here closes the store, the
//! lock can still be "held" by this very process for a moment, and a reopen would be refused
//! naming our own pid. The registry below tells the two cases apart: a lock held by a live
//! `Store` of this process is refused at once; a lock whose holder wrote our pid but which no
//! live `Store` here holds is a descriptor inherited by a child, and is retried for a bounded
//! time (a spawn's fork-to-exec window is short) before it is refused like any other.

use super::files::{self, LOCK_NAME};
use crate::error::{Error, Result};
use crate::io::{Storage, StorageFile};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a lock that only a child of this process holds is waited for.
const INHERITED_WAIT: Duration = Duration::from_secs(2);

/// The lock files held by live writers of this process.
fn held() -> &'static Mutex<HashSet<PathBuf>> {
    static HELD: OnceLock<Mutex<HashSet<PathBuf>>> = OnceLock::new();
    HELD.get_or_init(Default::default)
}

fn held_set() -> std::sync::MutexGuard<'static, HashSet<PathBuf>> {
    // Each use is one insert, lookup or removal: a poisoned mutex holds a consistent set.
    held().lock().unwrap_or_else(|p| p.into_inner())
}

/// The writer lock of one open store; released (and forgotten by the registry) on drop.
pub(crate) struct WriterLock {
    _file: Box<dyn StorageFile>,
    key: PathBuf,
}

impl Drop for WriterLock {
    fn drop(&mut self) {
        held_set().remove(&self.key);
    }
}

/// Takes the writer lock of the store in `dir`, writing our pid into it; names the holder's
/// pid if it is taken.
pub(crate) fn take(io: &dyn Storage, dir: &Path) -> Result<WriterLock> {
    let path = dir.join(LOCK_NAME);
    let key = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let me = std::process::id().to_string();
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(f) = io
            .try_lock(&path)
            .map_err(|e| Error::io("lock", &path, e))?
        {
            let pid = format!("{me}\n");
            f.set_len(0).map_err(|e| Error::io("write", &path, e))?;
            f.write_at(pid.as_bytes(), 0)
                .map_err(|e| Error::io("write", &path, e))?;
            held_set().insert(key.clone());
            return Ok(WriterLock { _file: f, key });
        }
        // Capped: a LOCK holds a pid; a crafted one is read no further than that.
        let pid = files::read_small(io, &path, 64)
            .ok()
            .map(|b| String::from_utf8_lossy(&b).trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".into());
        let inherited = pid == me && !held_set().contains(&key);
        if !inherited || start.elapsed() >= INHERITED_WAIT {
            return Err(Error::Locked { path, pid });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}
