//! Reading a bucket store: its newest commit object, and segments into a local directory (a
//! `RemoteView`'s; a restore fetches each when first read instead: store/lazy.rs).

use super::bucket::Bucket;
use super::layout::{parse_log_key, LOG_DIR};
use super::object::CommitObject;
use crate::error::{Error, Result};
use crate::io::Storage;
use crate::segment;
use std::path::Path;

/// The newest commit object (`None`: an empty store). Objects that are not commit objects are
/// ignored; a newest one that vanished under a concurrent writer's cleanup is looked up again.
pub fn latest(bucket: &Bucket) -> Result<Option<CommitObject>> {
    for _ in 0..5 {
        let newest = bucket
            .list(LOG_DIR)?
            .into_iter()
            .filter_map(|o| parse_log_key(&o.key).map(|s| (s, o.key)))
            .max();
        let Some((seq, key)) = newest else {
            return Ok(None);
        };
        if let Some(bytes) = bucket.get(&key)? {
            let obj = CommitObject::decode(&key, &bytes)?;
            if obj.seq != seq {
                return Err(Error::BadCommitObject {
                    name: key,
                    reason: format!("holds sequence number {}", obj.seq),
                });
            }
            return Ok(Some(obj));
        }
    }
    Err(Error::Remote {
        url: bucket.url().to_string(),
        op: "get",
        key: LOG_DIR.into(),
        message: "the newest commit object kept vanishing (another writer busy?)".into(),
    })
}

/// Downloads every segment `obj` names into `seg_dir` (created), each fdatasync'ed,
/// then the directory fsync'ed. Each is written under a temporary name and renamed once whole,
/// so a file already there under its own name with the right length is kept (a pull cut short
/// resumes).
pub fn download_segments(
    bucket: &Bucket,
    obj: &CommitObject,
    seg_dir: &Path,
    io: &dyn Storage,
) -> Result<()> {
    io.create_dir_all(seg_dir)
        .map_err(|e| Error::io("create dir", seg_dir, e))?;
    for (&id, s) in &obj.segments {
        let path = seg_dir.join(segment::file_name(id));
        if let Ok(f) = io.open(&path, false) {
            if f.len().ok() == Some(s.len) {
                continue;
            }
            drop(f);
            io.remove_file(&path)
                .map_err(|e| Error::io("remove", &path, e))?;
        }
        let part = seg_dir.join(format!("{}.part", segment::file_name(id)));
        match io.remove_file(&part) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", &part, e)),
        }
        let f = io
            .create_new(&part)
            .map_err(|e| Error::io("create", &part, e))?;
        bucket.download_file(&s.key, s.len, &*f)?;
        f.sync_data()
            .map_err(|e| Error::io("fdatasync", &part, e))?;
        drop(f);
        io.rename(&part, &path)
            .map_err(|e| Error::io("rename", &path, e))?;
    }
    io.sync_dir(seg_dir)
        .map_err(|e| Error::io("fsync dir", seg_dir, e))
}
