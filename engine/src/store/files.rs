//! File-level helpers of the store, named for the guarantee they give. All go through the I/O
//! seam.

use crate::current;
use crate::error::{Error, Result};
use crate::features::FeatureSet;
use crate::io::{Storage, StorageFile};
use crate::wal::{self, RecordType, WalHeader};
use std::path::{Path, PathBuf};

/// Name of the writer lock file.
pub const LOCK_NAME: &str = "LOCK";
/// Directory of segment files.
pub const SEGMENTS_DIR: &str = "segments";

/// File name of WAL file `n`: `NNNNNNNN.wal`.
pub fn wal_file_name(n: u64) -> String {
    format!("{n:08}.wal")
}

/// Parses a WAL file name; foreign names give `None`.
pub fn parse_wal_file_name(name: &str) -> Option<u64> {
    crate::segment::parse_numbered(name, ".wal")
}

/// Reads a whole (small, metadata-only) file.
pub(crate) fn read_all(io: &dyn Storage, path: &Path) -> Result<Vec<u8>> {
    let f = io
        .open(path, false)
        .map_err(|e| Error::io("open", path, e))?;
    let len = f.len().map_err(|e| Error::io("stat", path, e))?;
    // The length of a (possibly sparse, possibly crafted) file is a claim like any other.
    let mut buf = crate::alloc::zeroed(len, || path.display().to_string())?;
    f.read_at(&mut buf, 0)
        .map_err(|e| Error::io("read", path, e))?;
    Ok(buf)
}

/// [`read_all`] of a file that is small by its format (`CURRENT`, `LOCK`, a lease):
/// [`Error::TooLarge`] if it holds more than `max` bytes, read or allocated not at all.
pub(crate) fn read_small(io: &dyn Storage, path: &Path, max: u64) -> Result<Vec<u8>> {
    let f = io
        .open(path, false)
        .map_err(|e| Error::io("open", path, e))?;
    let len = f.len().map_err(|e| Error::io("stat", path, e))?;
    if len > max {
        return Err(Error::TooLarge {
            what: format!("{} (at most {max} bytes by its format)", path.display()),
            bytes: len,
        });
    }
    let mut buf = vec![0u8; len as usize];
    f.read_at(&mut buf, 0)
        .map_err(|e| Error::io("read", path, e))?;
    Ok(buf)
}

/// Replaces `CURRENT` atomically so that it names WAL file `wal_number`. A crash at any point
/// leaves either the old pointer or the new one.
pub(crate) fn switch_current_atomically(
    io: &dyn Storage,
    dir: &Path,
    wal_number: u64,
) -> Result<()> {
    replace_file_atomically(
        io,
        dir,
        current::CURRENT_NAME,
        current::CURRENT_TMP_NAME,
        &current::encode(wal_number),
    )
}

/// Removes `path` if it is there: `true` if it was removed, `false` if there was none.
pub(crate) fn remove_if_present(io: &dyn Storage, path: &Path) -> Result<bool> {
    match io.remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io("remove", path, e)),
    }
}

/// Installs `records` as the store's state in `dir`: WAL file 1 declaring `features`, made
/// durable, then `CURRENT` switched to it — the commit point of a store made from a bucket's
/// commit object (a crash before it leaves no store there).
pub(crate) fn install_wal(
    io: &dyn Storage,
    dir: &Path,
    features: FeatureSet,
    records: &[(RecordType, Vec<u8>)],
) -> Result<()> {
    drop(WalWriter::create_durable(io, dir, 1, features, records)?);
    switch_current_atomically(io, dir, 1)
}

/// Replaces the small file `dir/name` atomically with `bytes`: write the temp file `tmp_name`
/// (a stale one from a crash is removed first), fdatasync it, rename it over `name`, fsync the
/// directory. A crash at any point leaves either the old file (or none) or the new one.
pub(crate) fn replace_file_atomically(
    io: &dyn Storage,
    dir: &Path,
    name: &str,
    tmp_name: &str,
    bytes: &[u8],
) -> Result<()> {
    let tmp = dir.join(tmp_name);
    let dst = dir.join(name);
    remove_if_present(io, &tmp)?;
    let f = io
        .create_new(&tmp)
        .map_err(|e| Error::io("create", &tmp, e))?;
    f.write_at(bytes, 0)
        .map_err(|e| Error::io("write", &tmp, e))?;
    f.sync_data().map_err(|e| Error::io("fdatasync", &tmp, e))?;
    drop(f);
    io.rename(&tmp, &dst)
        .map_err(|e| Error::io("rename", &dst, e))?;
    io.sync_dir(dir).map_err(|e| Error::io("fsync dir", dir, e))
}

/// The open, live WAL file: appends records and makes them durable.
pub(crate) struct WalWriter {
    pub(crate) file: Box<dyn StorageFile>,
    pub(crate) path: PathBuf,
    pub(crate) number: u64,
    pub(crate) salt: u32,
    /// Where the next record goes (end of the last valid record).
    pub(crate) end: u64,
}

impl WalWriter {
    /// Creates WAL file `number` in `dir` holding a header declaring `features` and `records`,
    /// fdatasyncs it and fsyncs the directory, so the file and its entry are durable before
    /// anything points to it.
    pub(crate) fn create_durable(
        io: &dyn Storage,
        dir: &Path,
        number: u64,
        features: FeatureSet,
        records: &[(RecordType, Vec<u8>)],
    ) -> Result<Self> {
        let path = dir.join(wal_file_name(number));
        remove_if_present(io, &path)?;
        let salt = random_salt();
        let header = WalHeader {
            salt,
            file_number: number,
            features,
        };
        let mut buf = header.encode().to_vec();
        for (ty, payload) in records {
            wal::encode_record(&mut buf, salt, *ty, payload);
        }
        let file = io
            .create_new(&path)
            .map_err(|e| Error::io("create", &path, e))?;
        file.write_at(&buf, 0)
            .map_err(|e| Error::io("write", &path, e))?;
        file.sync_data()
            .map_err(|e| Error::io("fdatasync", &path, e))?;
        io.sync_dir(dir)
            .map_err(|e| Error::io("fsync dir", dir, e))?;
        Ok(WalWriter {
            file,
            path,
            number,
            salt,
            end: buf.len() as u64,
        })
    }

    /// Appends one record with a single write and fdatasyncs it. On error the caller must
    /// poison the store: the file's tail is unknown.
    pub(crate) fn append_durable(&mut self, ty: RecordType, payload: &[u8]) -> Result<u64> {
        let mut buf = Vec::with_capacity(wal::RECORD_HEADER_LEN + payload.len());
        wal::encode_record(&mut buf, self.salt, ty, payload);
        self.file
            .write_at(&buf, self.end)
            .map_err(|e| Error::io("write", &self.path, e))?;
        self.file
            .sync_data()
            .map_err(|e| Error::io("fdatasync", &self.path, e))?;
        self.end += buf.len() as u64;
        Ok(buf.len() as u64)
    }
}

fn random_salt() -> u32 {
    let mut b = [0u8; 4];
    if getrandom::fill(&mut b).is_err() {
        // Fall back to time and pid: the salt must differ between files, not be secret.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        b = ((t ^ (t >> 32)) as u32 ^ std::process::id()).to_le_bytes();
    }
    u32::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_names() {
        // The parsing rules themselves are segment::parse_numbered's (tested there).
        assert_eq!(wal_file_name(1), "00000001.wal");
        assert_eq!(parse_wal_file_name(&wal_file_name(77)), Some(77));
    }
}
