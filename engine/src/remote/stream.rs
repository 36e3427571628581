//! [`Streamer`]: a bucket store's new segments go to the bucket while the checkpoint is being
//! written. It is the [`SegmentTap`] of the store's transactions: each segment's upload starts
//! when the segment is created, sends its parts as the writer reports its bytes final (reading
//! them back from the page cache, within the bucket's budget of parts in flight), and completes
//! once the segment is whole — while the local commit fdatasyncs. The [`super::Publisher`]
//! then takes the finished uploads ([`Streamer::take`]) instead of uploading the segments
//! itself, and creates the commit object last, as always: an upload cut by a crash is an
//! object no commit names (S3 shows none until a multipart upload completes), removed after
//! the grace by a later sweep.
//!
//! The streamed objects are named by a token fresh for each open of the store, so an upload of
//! a transaction that never committed (a crash before its local commit: its segment ids are
//! allocated again after recovery) is never mistaken for a later segment of the same id.

use super::bucket::{runtime, Bucket, Progress};
use super::layout::segment_key;
use super::object::SegmentObject;
use crate::error::Result;
use crate::io::{Storage, StorageFile};
use crate::segment::SegmentTap;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use tokio::task::JoinHandle;

struct Upload {
    key: String,
    tx: watch::Sender<Progress>,
    task: JoinHandle<Result<()>>,
}

/// Streams the segments of one writer to one bucket prefix (see the module documentation).
pub struct Streamer {
    bucket: Arc<Bucket>,
    token: String,
    io: Arc<dyn Storage>,
    uploads: Mutex<BTreeMap<u64, Upload>>,
}

impl std::fmt::Debug for Streamer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streamer")
            .field("bucket", &self.bucket)
            .field("token", &self.token)
            .finish()
    }
}

impl Streamer {
    /// Uploads under `segments/<token>/`, reading the segment files through `io`.
    pub fn new(bucket: Arc<Bucket>, token: &str, io: Arc<dyn Storage>) -> Streamer {
        Streamer {
            bucket,
            token: token.to_string(),
            io,
            uploads: Mutex::new(BTreeMap::new()),
        }
    }

    fn uploads(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Upload>> {
        self.uploads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The object of segment `id`, streamed whole with `len` bytes: waits for its upload.
    /// `None`: not streamed (or not as this length; that upload is given up), and the caller
    /// uploads it. `Some(Err)`: the upload failed after its retries (a typed error).
    pub fn take(&self, id: u64, len: u64) -> Option<Result<SegmentObject>> {
        let up = self.uploads().remove(&id)?;
        let whole = up.tx.borrow().len == Some(len);
        if !whole {
            self.give_up(up);
            return None;
        }
        let r = match runtime().map(|rt| rt.block_on(up.task)) {
            Ok(Ok(r)) => r,
            Ok(Err(join)) => Err(crate::error::Error::invalid(format!(
                "the upload of segment {id} panicked: {join}"
            ))),
            Err(e) => Err(e),
        };
        Some(r.map(|()| SegmentObject { key: up.key, len }))
    }

    /// Stops an upload and removes what it may have completed (best effort: a sweep removes
    /// what this misses).
    fn give_up(&self, up: Upload) {
        up.tx.send_modify(|p| p.abandoned = true);
        let done = runtime().map(|rt| rt.block_on(up.task));
        if matches!(done, Ok(Ok(Ok(())))) {
            let _ = self.bucket.delete(&up.key);
        }
    }

    /// Gives up every upload not taken (the store is closing).
    pub fn abandon_all(&self) {
        let all = std::mem::take(&mut *self.uploads());
        for up in all.into_values() {
            self.give_up(up);
        }
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        self.abandon_all();
    }
}

impl SegmentTap for Streamer {
    fn created(&self, id: u64, path: &Path) {
        // A segment that cannot be opened again is not streamed: the publisher uploads it.
        let Ok(file) = self.io.open(path, false) else {
            return;
        };
        let Ok(rt) = runtime() else {
            return;
        };
        let file: Arc<dyn StorageFile> = Arc::from(file);
        let key = segment_key(&self.token, id);
        let (tx, rx) = watch::channel(Progress::default());
        let bucket = self.bucket.clone();
        let k = key.clone();
        let task = rt.spawn(async move { bucket.upload_streamed(&k, &*file, rx).await });
        if let Some(old) = self.uploads().insert(id, Upload { key, tx, task }) {
            self.give_up(old);
        }
    }

    fn final_upto(&self, id: u64, upto: u64) {
        if let Some(up) = self.uploads().get(&id) {
            up.tx.send_modify(|p| p.upto = p.upto.max(upto));
        }
    }

    fn finished(&self, id: u64, len: u64) {
        if let Some(up) = self.uploads().get(&id) {
            up.tx.send_modify(|p| {
                p.upto = len;
                p.len = Some(len);
            });
        }
    }

    fn dropped(&self, id: u64) {
        let up = self.uploads().remove(&id);
        if let Some(up) = up {
            self.give_up(up);
        }
    }
}
