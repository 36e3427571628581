//! `lost+found/`: where recovery puts the files it no longer needs instead of deleting them
//! (orphan segments, WAL files `CURRENT` does not name, the WAL as it was before a salvage cut
//! it). Each file gets a note beside it (`NAME.why`) saying why it was moved. Only an explicit
//! purge ([`super::Store::purge_lost_found`], `ckptstore gc --purge-lost-found`) deletes them.

use crate::error::{Error, Result};
use crate::io::Storage;
use std::path::{Path, PathBuf};

/// The directory, inside the store, of files recovery set aside.
pub const LOST_FOUND_DIR: &str = "lost+found";
/// Suffix of the note file written beside each file set aside.
const NOTE_SUFFIX: &str = ".why";

fn not_found(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
}

/// A name in `lost+found/` not taken yet: `base`, else `base.1`, `base.2`, ...
fn free_name(io: &dyn Storage, lf: &Path, base: &str) -> Result<PathBuf> {
    for n in 0..=u32::MAX {
        let name = match n {
            0 => base.to_string(),
            n => format!("{base}.{n}"),
        };
        let path = lf.join(&name);
        let note = lf.join(format!("{name}{NOTE_SUFFIX}"));
        let taken = io.exists(&path).map_err(|e| Error::io("stat", &path, e))?
            || io.exists(&note).map_err(|e| Error::io("stat", &note, e))?;
        if !taken {
            return Ok(path);
        }
    }
    Err(Error::invalid(format!(
        "{}: no free name for {base}",
        lf.display()
    )))
}

fn write_note(io: &dyn Storage, dest: &Path, why: &str) -> Result<()> {
    let mut note = dest.as_os_str().to_owned();
    note.push(NOTE_SUFFIX);
    let note = PathBuf::from(note);
    let when = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let text = format!(
        "{why}\nset aside by ckptstore recovery at unix time {when}; \
         `ckptstore gc DIR --purge-lost-found` deletes it\n"
    );
    let f = io
        .create_new(&note)
        .map_err(|e| Error::io("create", &note, e))?;
    f.write_at(text.as_bytes(), 0)
        .map_err(|e| Error::io("write", &note, e))?;
    f.sync_data().map_err(|e| Error::io("fdatasync", &note, e))
}

fn ensure_dir(io: &dyn Storage, store: &Path) -> Result<PathBuf> {
    let lf = store.join(LOST_FOUND_DIR);
    if !io.exists(&lf).map_err(|e| Error::io("stat", &lf, e))? {
        io.create_dir_all(&lf)
            .map_err(|e| Error::io("create dir", &lf, e))?;
        io.sync_dir(store)
            .map_err(|e| Error::io("fsync dir", store, e))?;
    }
    Ok(lf)
}

/// Moves `path` (a file inside the store) into `store/lost+found/` with a note of `why`.
/// Returns where it went, or `None` if it was gone already. The caller fsyncs the directory
/// it came from; this one fsyncs `lost+found/`.
pub(crate) fn move_in(
    io: &dyn Storage,
    store: &Path,
    path: &Path,
    why: &str,
) -> Result<Option<PathBuf>> {
    let lf = ensure_dir(io, store)?;
    let base = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let dest = free_name(io, &lf, &base)?;
    match io.rename(path, &dest) {
        Ok(()) => {}
        Err(e) if not_found(&e) => return Ok(None),
        Err(e) => return Err(Error::io("rename", path, e)),
    }
    write_note(io, &dest, why)?;
    io.sync_dir(&lf)
        .map_err(|e| Error::io("fsync dir", &lf, e))?;
    Ok(Some(dest))
}

/// Writes `bytes` as a new file `name` in `store/lost+found/` with a note of `why` (a copy of
/// something about to be changed in place, e.g. a WAL a salvage is about to cut).
pub(crate) fn save_copy(
    io: &dyn Storage,
    store: &Path,
    name: &str,
    bytes: &[u8],
    why: &str,
) -> Result<PathBuf> {
    let lf = ensure_dir(io, store)?;
    let dest = free_name(io, &lf, name)?;
    let f = io
        .create_new(&dest)
        .map_err(|e| Error::io("create", &dest, e))?;
    f.write_at(bytes, 0)
        .map_err(|e| Error::io("write", &dest, e))?;
    f.sync_data()
        .map_err(|e| Error::io("fdatasync", &dest, e))?;
    write_note(io, &dest, why)?;
    io.sync_dir(&lf)
        .map_err(|e| Error::io("fsync dir", &lf, e))?;
    Ok(dest)
}

/// What [`purge`] deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PurgeReport {
    /// Files deleted from `lost+found/` (notes included).
    pub files: Vec<PathBuf>,
    /// Their bytes.
    pub bytes: u64,
}

/// Deletes every plain file in `store/lost+found/` (a directory someone put there is left).
pub(crate) fn purge(io: &dyn Storage, store: &Path) -> Result<PurgeReport> {
    let lf = store.join(LOST_FOUND_DIR);
    let mut names = match io.list(&lf) {
        Ok(n) => n,
        Err(e) if not_found(&e) => return Ok(PurgeReport::default()),
        Err(e) => return Err(Error::io("list", &lf, e)),
    };
    names.sort();
    let mut out = PurgeReport::default();
    for name in names {
        let path = lf.join(&name);
        let bytes = io
            .open(&path, false)
            .ok()
            .and_then(|f| f.len().ok())
            .unwrap_or(0);
        match io.remove_file(&path) {
            Ok(()) => {
                out.bytes += bytes;
                out.files.push(path);
            }
            Err(e) if not_found(&e) => {}
            // Not a plain file: someone else's, left alone.
            Err(e)
                if e.kind() == std::io::ErrorKind::IsADirectory
                    || crate::io::private_fs::is_refused_kind(&e) => {}
            Err(e) => return Err(Error::io("remove", &path, e)),
        }
    }
    if !out.files.is_empty() {
        io.sync_dir(&lf)
            .map_err(|e| Error::io("fsync dir", &lf, e))?;
    }
    Ok(out)
}

impl super::Store {
    /// Deletes every file recovery set aside in `lost+found/` (orphan segments, stale WAL
    /// files, the WAL before a salvage cut it, and their notes). The only way they are ever
    /// deleted; the writer's (`ckptstore gc --purge-lost-found`).
    pub fn purge_lost_found(&mut self) -> Result<PurgeReport> {
        self.check_writable()?;
        purge(&*self.opts.io, &self.dir)
    }

    /// The names in `lost+found/`, sorted (empty if it does not exist).
    pub fn lost_found(&self) -> Result<Vec<String>> {
        entries(&*self.opts.io, &self.dir)
    }
}

/// The entries of `store/lost+found/` (empty if it does not exist).
pub(crate) fn entries(io: &dyn Storage, store: &Path) -> Result<Vec<String>> {
    let lf = store.join(LOST_FOUND_DIR);
    match io.list(&lf) {
        Ok(mut n) => {
            n.sort();
            Ok(n)
        }
        Err(e) if not_found(&e) => Ok(Vec::new()),
        Err(e) => Err(Error::io("list", &lf, e)),
    }
}
