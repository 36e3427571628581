//! Which store directories a process trusts (docs/DECISIONS.md, "Files only the owner can
//! touch"). Checked once by `Store::open`, before anything is created or read:
//!
//! * the store directory must not be world-writable (anyone could plant a `LOCK` symlink, a
//!   FIFO named like a WAL, a crafted checkpoint), for a writer or a reader;
//! * a writer refuses a store directory owned by another user (its owner could swap any of its
//!   entries under the writer); a reader accepts one (sharing with a group is what
//!   `Options::file_mode` 0640 is for, and reads neither follow links nor run code);
//! * `segments/` and `readers/` must be real directories, never symlinks (a writer deletes files
//!   in them, a reader creates its lease in `readers/`): refused whatever the options say;
//!
//! `Options::allow_unsafe_dir` lifts the first two for a caller who knows why. Modes looser than
//! the default (an existing store written 0644/0755, or checked out from git) are accepted: modes
//! change no bytes of the format, and only new files get the store's mode.
//!
//! The check is made once at open, by name; a writer then holds the lock, and only the owner
//! (checked here) can replace the directory's entries, so no other user can race it.

use super::{lease::READERS_DIR, Options, SEGMENTS_DIR};
use crate::error::{Error, Result};
use crate::io::{private_fs, Storage};
use std::path::Path;

/// Refuses a store directory this process must not trust (see the module docs).
pub(crate) fn check_store_dir(io: &dyn Storage, dir: &Path, opts: &Options) -> Result<()> {
    let refuse = |path: &Path, reason: String| Error::UnsafeDir {
        path: path.to_path_buf(),
        reason,
    };
    let status = |p: &Path| io.dir_status(p).map_err(|e| Error::io("stat", p, e));
    if let Some(st) = status(dir)? {
        if st.is_dir && !opts.allow_unsafe_dir {
            if st.mode & 0o002 != 0 {
                return Err(refuse(
                    dir,
                    format!(
                        "it is world-writable (mode {:04o}): any local user could plant files or \
                         symlinks in it. `chmod o-w` it (ckptstore creates stores 0700), or if you \
                         must, open it with allow_unsafe_dir (Options field, Python Store argument)",
                        st.mode
                    ),
                ));
            }
            let me = private_fs::euid();
            if !opts.read_only && st.uid != me {
                return Err(refuse(
                    dir,
                    format!(
                        "it is owned by uid {}, not by this process (uid {me}); its owner could \
                         replace its files under the writer. Write to a store you own, open it \
                         read-only, or if you must, open it with allow_unsafe_dir (Options field, \
                         Python Store argument)",
                        st.uid
                    ),
                ));
            }
        }
    }
    for sub in [SEGMENTS_DIR, READERS_DIR] {
        let p = dir.join(sub);
        let Some(st) = status(&p)? else { continue };
        if st.symlink {
            return Err(refuse(
                &p,
                "it is a symlink: the store creates and deletes files in it, and never does so \
                 through a link (move the real directory into the store instead)"
                    .into(),
            ));
        }
        if !st.is_dir {
            return Err(refuse(&p, "it is not a directory".into()));
        }
        if st.mode & 0o002 != 0 && !opts.allow_unsafe_dir {
            return Err(refuse(
                &p,
                format!(
                    "it is world-writable (mode {:04o}); `chmod o-w` it",
                    st.mode
                ),
            ));
        }
    }
    Ok(())
}
