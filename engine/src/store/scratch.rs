//! [`Scratch`]: a directory one process uses for a while under a cache directory (a rank's
//! shard before its upload, a rank's view of a bucket store): `<parent>/<random>/`, with
//! `<parent>/<random>.lock` flock'ed by its owner for as long as it lives. Dropping it removes
//! both. A process killed first leaves them; the next [`Scratch::create`] under the same
//! parent removes every one whose lock is free (its owner is gone) and older than a minute (a
//! lock file just created may not be locked yet).

use crate::error::{Error, Result};
use crate::io::{Storage, StorageFile};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A fresh random token (16 hex digits): the directory of one upload's objects.
pub(crate) fn random_hex() -> Result<String> {
    let mut raw = [0u8; 8];
    getrandom::fill(&mut raw).map_err(|e| Error::invalid(format!("getrandom: {e}")))?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

/// A lock file younger than this is never taken for a dead owner's.
const MIN_AGE: Duration = Duration::from_secs(60);

/// A scratch directory, removed on drop.
pub struct Scratch {
    dir: PathBuf,
    lock_path: PathBuf,
    lock: Option<Box<dyn StorageFile>>,
    io: Arc<dyn Storage>,
}

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scratch").field("dir", &self.dir).finish()
    }
}

impl Scratch {
    /// Removes the scratch directories of dead owners under `parent`, then creates a new one.
    pub fn create(io: &Arc<dyn Storage>, parent: &Path) -> Result<Scratch> {
        super::recovery::create_store_dir(&**io, parent)?;
        sweep(&**io, parent);
        let name = random_hex()?;
        let lock_path = parent.join(format!("{name}.lock"));
        let lock = io
            .try_lock(&lock_path)
            .map_err(|e| Error::io("lock", &lock_path, e))?
            .ok_or_else(|| Error::invalid(format!("{} is locked", lock_path.display())))?;
        let dir = parent.join(name);
        io.create_dir_all(&dir)
            .map_err(|e| Error::io("create dir", &dir, e))?;
        Ok(Scratch {
            dir,
            lock_path,
            lock: Some(lock),
            io: io.clone(),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = self.io.remove_file(&self.lock_path);
        self.lock.take();
    }
}

/// Removes the scratch directories under `parent` whose owner is gone (best effort).
fn sweep(io: &dyn Storage, parent: &Path) {
    let Ok(names) = io.list(parent) else {
        return;
    };
    let now = SystemTime::now();
    for name in names {
        let Some(stem) = name.strip_suffix(".lock") else {
            continue;
        };
        if stem.len() != 16 || !stem.bytes().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        let lock_path = parent.join(&name);
        let old = std::fs::metadata(&lock_path)
            .and_then(|m| m.modified())
            .is_ok_and(|t| now.duration_since(t).is_ok_and(|age| age >= MIN_AGE));
        if !old {
            continue;
        }
        if let Ok(Some(_held)) = io.try_lock_existing(&lock_path) {
            let _ = std::fs::remove_dir_all(parent.join(stem));
            let _ = io.remove_file(&lock_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_owners_scratch_is_removed_a_live_ones_is_kept() {
        let io = crate::io::default_storage();
        let parent = tempfile::tempdir().unwrap();
        let p = parent.path();
        let old = SystemTime::now() - Duration::from_secs(3600);
        let age = |path: &Path| {
            std::fs::File::options()
                .write(true)
                .open(path)
                .unwrap()
                .set_modified(old)
                .unwrap()
        };
        // A dead owner's: its lock file is free.
        let dead = "0123456789abcdef";
        std::fs::create_dir_all(p.join(dead).join("segments")).unwrap();
        std::fs::write(p.join(format!("{dead}.lock")), b"").unwrap();
        age(&p.join(format!("{dead}.lock")));
        // A live one, as old: its lock is held.
        let live = Scratch::create(&io, p).unwrap();
        age(&live.lock_path);
        // A fresh free one (its owner may not have locked it yet).
        let young = "fedcba9876543210";
        std::fs::create_dir_all(p.join(young)).unwrap();
        std::fs::write(p.join(format!("{young}.lock")), b"").unwrap();
        let other = Scratch::create(&io, p).unwrap();
        assert!(!p.join(dead).exists() && !p.join(format!("{dead}.lock")).exists());
        assert!(live.path().is_dir() && p.join(young).is_dir());
        let (a, b) = (live.path().to_path_buf(), other.path().to_path_buf());
        drop((live, other));
        assert!(!a.exists() && !b.exists());
    }
}
