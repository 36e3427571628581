//! [`Bucket`]: the synchronous client of one store's prefix in an object store. Every request
//! goes through one retry loop: a per-request timeout, a bounded number of attempts with
//! exponential backoff for transient failures, then a typed [`Error::Remote`]. The optional
//! [`Faults`] injector sees every request (tests stop a writer between any two).

use super::faults::{Fault, Faults, Verdict};
use super::secrets::scrub;
use super::url::RemoteUrl;
use crate::error::{Error, Result};
use crate::io::StorageFile;
use futures_util::stream::{FuturesUnordered, StreamExt, TryStreamExt};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};
use tokio::sync::{watch, Semaphore};

/// Bounds of the retry loop and of the transfer buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per request (or per whole multipart upload), at least 1. Default 4.
    pub attempts: u32,
    /// Backoff before the second attempt, doubled each time up to `max_backoff`. Default 100 ms.
    pub backoff: Duration,
    /// Default 2 s.
    pub max_backoff: Duration,
    /// One request's time limit (a part of `part_size` bytes must fit). Default 120 s.
    pub request_timeout: Duration,
    /// Multipart part size and ranged-GET size (S3's minimum part is 5 MiB). Default 16 MiB.
    /// An object's last part (or range) takes in a rest of up to a quarter of this after it
    /// ([`part_end`]): it is up to 1¼ `part_size`, never a small extra request.
    pub part_size: usize,
    /// Parts (or ranges) in flight at once, over all the transfers of one [`Bucket`]: its
    /// memory budget is `part_size * parts_in_flight` (an object's last part may be up to
    /// 1¼ `part_size`). Default 4.
    pub parts_in_flight: usize,
    /// Objects no commit object names (uploads or deletes cut short) are removed by a writer's
    /// open once older than this; a younger one may be another writer's upload in flight.
    /// Default one hour.
    pub orphan_grace: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 4,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            request_timeout: Duration::from_secs(120),
            part_size: 16 << 20,
            parts_in_flight: 4,
            orphan_grace: Duration::from_secs(3600),
        }
    }
}

/// An object as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Key relative to the store's prefix.
    pub key: String,
    /// Bytes.
    pub size: u64,
    /// When the server last wrote it.
    pub last_modified: SystemTime,
}

/// Why one request failed.
#[derive(Debug)]
pub(crate) enum Failure {
    NotFound,
    AlreadyExists,
    Permanent(String),
    Transient(String),
    Stopped,
    /// The writer of a streamed object gave it up (its segment was removed).
    Abandoned,
}

/// How much of an object being written is final, for a streamed upload
/// ([`Bucket::upload_streamed`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Progress {
    /// Bytes `[0, upto)` are final (never written again).
    pub upto: u64,
    /// The object's length, once known (then all of it is final).
    pub len: Option<u64>,
    /// The writer gave the object up: the upload stops (and is aborted).
    pub abandoned: bool,
}

/// The end of the part (or ranged GET) that starts at `off` of an object of `len` bytes:
/// `part` bytes on, except that a rest of at most `part / 4` after that joins it. A segment is
/// a whole number of parts plus its few header bytes; without this they would be one more
/// request (a part and a range) of a few KiB each.
pub(crate) fn part_end(off: u64, len: u64, part: u64) -> u64 {
    match len.saturating_sub(off) <= part + part / 4 {
        true => len,
        false => off + part,
    }
}

/// Waits until the bytes up to `need` are final, or the length is known; an error once the
/// object is given up (or its writer is gone).
async fn wait_for(rx: &mut watch::Receiver<Progress>, need: u64) -> Result<Progress, Failure> {
    let p = rx
        .wait_for(|p| p.abandoned || p.len.is_some() || p.upto >= need)
        .await
        .map(|p| *p)
        .map_err(|_| Failure::Abandoned)?;
    match p.abandoned {
        true => Err(Failure::Abandoned),
        false => Ok(p),
    }
}

/// One store's prefix in a bucket. Cheap to share (`Arc`); safe to use from several threads.
pub struct Bucket {
    url: RemoteUrl,
    store: Arc<dyn ObjectStore>,
    prefix: String,
    policy: RetryPolicy,
    faults: Option<Arc<Faults>>,
    cancel: AtomicBool,
    /// Set once a request was refused as stopped (cancelled, or a test's simulated death).
    stopped: AtomicBool,
    requests: AtomicU64,
    /// The memory budget: one permit per part or range in flight.
    budget: Arc<Semaphore>,
}

impl std::fmt::Debug for Bucket {
    // The object store's own Debug would show its configuration (credentials included).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bucket")
            .field("url", &self.url.to_string())
            .field("requests", &self.requests())
            .finish()
    }
}

/// The process's runtime for object-store requests (two worker threads, started on first use).
pub(super) fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ckptstore-remote")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| Error::invalid(format!("cannot start the object-store runtime: {e}")))
}

/// A client that could not be configured (the message already scrubbed).
fn configure(url: &RemoteUrl, message: String) -> Error {
    Error::Remote {
        url: url.to_string(),
        op: "configure",
        key: String::new(),
        message,
    }
}

fn classify(e: object_store::Error) -> Failure {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => Failure::NotFound,
        E::AlreadyExists { .. } | E::Precondition { .. } => Failure::AlreadyExists,
        E::PermissionDenied { .. }
        | E::Unauthenticated { .. }
        | E::NotSupported { .. }
        | E::NotImplemented { .. }
        | E::InvalidPath { .. }
        | E::UnknownConfigurationKey { .. }
        | E::NotModified { .. } => Failure::Permanent(scrub(e.to_string())),
        other => Failure::Transient(scrub(other.to_string())),
    }
}

impl Bucket {
    /// Connects to `url`: S3 from the usual environment (`AWS_ENDPOINT_URL`, `AWS_REGION`,
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_ALLOW_HTTP`
    /// for a loopback test server), GCS and Azure from `GOOGLE_*` and `AZURE_*`
    /// ([`super::cloud`]), or a local directory for `file://`. Sends nothing; see
    /// [`Bucket::check_access`].
    pub fn open(url: &RemoteUrl) -> Result<Bucket> {
        let (store, prefix): (Arc<dyn ObjectStore>, String) = match url {
            RemoteUrl::S3 { bucket, prefix } => {
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_conditional_put(object_store::aws::S3ConditionalPut::ETagMatch)
                    .with_retry(object_store::RetryConfig {
                        max_retries: 2,
                        retry_timeout: Duration::from_secs(30),
                        ..Default::default()
                    });
                if std::env::var_os("AWS_REGION").is_none()
                    && std::env::var_os("AWS_DEFAULT_REGION").is_none()
                {
                    b = b.with_region("us-east-1");
                }
                let s = b.build().map_err(|e| Error::Remote {
                    url: url.to_string(),
                    op: "configure",
                    key: String::new(),
                    message: scrub(e.to_string()),
                })?;
                (Arc::new(s), prefix.clone())
            }
            RemoteUrl::Gcs { bucket, prefix } => {
                let vars = super::cloud::env_vars();
                let s = super::cloud::gcs(&vars, bucket).map_err(|m| configure(url, m))?;
                (s, prefix.clone())
            }
            RemoteUrl::Azure {
                account,
                container,
                prefix,
            } => {
                let vars = super::cloud::env_vars();
                let s = super::cloud::azure(&vars, account.as_deref(), container)
                    .map_err(|m| configure(url, m))?;
                (s, prefix.clone())
            }
            RemoteUrl::File { root } => {
                let s =
                    object_store::local::LocalFileSystem::new_with_prefix(root).map_err(|e| {
                        Error::Remote {
                            url: url.to_string(),
                            op: "open",
                            key: String::new(),
                            message: format!(
                                "{e} (a file:// bucket must be an existing directory)"
                            ),
                        }
                    })?;
                (Arc::new(s), String::new())
            }
        };
        Ok(Bucket::from_store(url.clone(), store, prefix))
    }

    /// A bucket over any `ObjectStore` (tests: `object_store::memory::InMemory`), under `prefix`.
    pub fn from_store(url: RemoteUrl, store: Arc<dyn ObjectStore>, prefix: String) -> Bucket {
        Bucket {
            url,
            store,
            prefix,
            policy: RetryPolicy::default(),
            faults: None,
            cancel: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            budget: Arc::new(Semaphore::new(RetryPolicy::default().parts_in_flight)),
        }
    }

    /// With these bounds.
    pub fn with_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = RetryPolicy {
            attempts: policy.attempts.max(1),
            part_size: policy.part_size.max(1),
            parts_in_flight: policy.parts_in_flight.max(1),
            ..policy
        };
        self.budget = Arc::new(Semaphore::new(self.policy.parts_in_flight));
        self
    }

    /// Injecting these faults.
    pub fn with_faults(mut self, faults: Arc<Faults>) -> Self {
        self.faults = Some(faults);
        self
    }

    /// The bounds in use.
    pub fn policy(&self) -> RetryPolicy {
        self.policy
    }

    /// The store's URL (never with credentials).
    pub fn url(&self) -> &RemoteUrl {
        &self.url
    }

    /// Requests sent so far (each attempt counts), for the request counts of the bench.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Makes every later request fail at once (a closing store stops its replicator between
    /// two requests).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Whether a request was refused because this client is stopped (no later one can pass).
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    fn path(&self, key: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(key)
        } else {
            ObjPath::from(format!("{}/{key}", self.prefix))
        }
    }

    pub(crate) fn error(&self, op: &'static str, key: &str, f: Failure) -> Error {
        let message = match f {
            Failure::NotFound => "not found".to_string(),
            Failure::AlreadyExists => "already exists".to_string(),
            Failure::Permanent(m) => m,
            Failure::Transient(m) => format!(
                "{m} (gave up after {} attempts; retry later)",
                self.policy.attempts
            ),
            Failure::Stopped => "stopped: the store is closing (or a test stopped it)".into(),
            Failure::Abandoned => "given up: its segment was removed before it was whole".into(),
        };
        Error::Remote {
            url: self.url.to_string(),
            op,
            key: key.to_string(),
            message,
        }
    }

    /// Counts one request and asks the fault injector about it: `Ok(delay)` to go ahead.
    fn gate(&self) -> std::result::Result<Option<Duration>, Failure> {
        if self.cancel.load(Ordering::Relaxed) {
            self.stopped.store(true, Ordering::Relaxed);
            return Err(Failure::Stopped);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        match self.faults.as_ref().map(|f| f.next()) {
            Some(Verdict::Stopped) => {
                self.stopped.store(true, Ordering::Relaxed);
                Err(Failure::Stopped)
            }
            Some(Verdict::Fault(Fault::Error)) => {
                Err(Failure::Transient("injected transient fault".into()))
            }
            Some(Verdict::Fault(Fault::Slow(d))) => Ok(Some(d)),
            Some(Verdict::Go) | None => Ok(None),
        }
    }

    /// One attempt: the gate, then `fut` under the request timeout.
    async fn attempt<T, Fut>(&self, fut: Fut) -> std::result::Result<T, Failure>
    where
        Fut: Future<Output = std::result::Result<T, object_store::Error>>,
    {
        let slow = self.gate()?;
        let timed = async {
            if let Some(d) = slow {
                tokio::time::sleep(d).await;
            }
            fut.await
        };
        match tokio::time::timeout(self.policy.request_timeout, timed).await {
            Err(_) => Err(Failure::Transient(format!(
                "no answer within {:?}",
                self.policy.request_timeout
            ))),
            Ok(r) => r.map_err(classify),
        }
    }

    /// `make()` retried while it fails transiently, at most `attempts` times, with backoff.
    async fn retried<T, F, Fut>(&self, mut make: F) -> std::result::Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, Failure>>,
    {
        let mut delay = self.policy.backoff;
        let mut attempt = 1;
        loop {
            match make().await {
                Err(Failure::Transient(m)) if attempt < self.policy.attempts => {
                    let _ = m;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.policy.max_backoff);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn block_on<T>(&self, fut: impl Future<Output = T>) -> Result<T> {
        Ok(runtime()?.block_on(fut))
    }

    /// Fails with a clear error unless the bucket exists and this identity may list it; sent
    /// before anything is written.
    pub fn check_access(&self) -> Result<()> {
        self.list(super::layout::LOG_DIR)
            .map(|_| ())
            .map_err(Self::access_error)
    }

    /// The error of a failed listing of the commit log, said as what it most likely means
    /// (what [`Bucket::check_access`] reports; an open that lists the log anyway maps its own
    /// listing's error with this instead of sending one more request).
    pub fn access_error(e: Error) -> Error {
        match e {
            Error::Remote {
                url,
                message,
                op: "list",
                ..
            } => Error::Remote {
                url,
                op: "open",
                key: format!("{}/", super::layout::LOG_DIR),
                message: format!(
                    "cannot list the store's commit log (does the bucket exist, and may these \
                     credentials read it?): {message}"
                ),
            },
            other => other,
        }
    }

    /// Creates `key` holding `bytes` if no object has that name. `Ok(false)`: one exists (not
    /// ours: a retried create whose first attempt landed compares the bytes and says `true`).
    pub fn put_create(&self, key: &str, bytes: Vec<u8>) -> Result<bool> {
        let path = self.path(key);
        let payload = PutPayload::from(bytes.clone());
        let mut attempts = 0u32;
        let r = self.block_on(self.retried(|| {
            attempts += 1;
            let opts = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            self.attempt(self.store.put_opts(&path, payload.clone(), opts))
        }))?;
        match r {
            Ok(_) => Ok(true),
            // A retry whose first attempt landed (its answer lost) finds its own bytes.
            Err(Failure::AlreadyExists) if attempts > 1 => {
                Ok(self.get(key)?.is_some_and(|found| found == bytes))
            }
            Err(Failure::AlreadyExists) => Ok(false),
            Err(f) => Err(self.error("create", key, f)),
        }
    }

    /// The object `key`, whole; `None` if there is none.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(key);
        let r = self.block_on(
            self.retried(|| self.attempt(async { self.store.get(&path).await?.bytes().await })),
        )?;
        match r {
            Ok(b) => Ok(Some(b.to_vec())),
            Err(Failure::NotFound) => Ok(None),
            Err(f) => Err(self.error("get", key, f)),
        }
    }

    /// Objects under `dir/` (relative to the prefix), sorted by key.
    pub fn list(&self, dir: &str) -> Result<Vec<Listed>> {
        let path = self.path(dir);
        let strip = match self.prefix.is_empty() {
            true => String::new(),
            false => format!("{}/", self.prefix),
        };
        let r = self.block_on(self.retried(|| {
            self.attempt(async {
                self.store
                    .list(Some(&path))
                    .try_collect::<Vec<object_store::ObjectMeta>>()
                    .await
            })
        }))?;
        let metas = match r {
            Ok(m) => m,
            Err(Failure::NotFound) => Vec::new(),
            Err(f) => return Err(self.error("list", dir, f)),
        };
        let mut out: Vec<Listed> = metas
            .into_iter()
            .filter_map(|m| {
                let key = m.location.as_ref().strip_prefix(&strip)?.to_string();
                Some(Listed {
                    key,
                    size: m.size,
                    last_modified: m.last_modified.into(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Deletes `key`; deleting what is not there is not an error.
    pub fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key);
        let r = self.block_on(self.retried(|| self.attempt(self.store.delete(&path))))?;
        match r {
            Ok(()) | Err(Failure::NotFound) => Ok(()),
            Err(f) => Err(self.error("delete", key, f)),
        }
    }

    /// Uploads the first `len` bytes of `file` as object `key` ([`Bucket::upload_streamed`]
    /// with every byte final already).
    pub fn upload_file(&self, key: &str, file: &dyn StorageFile, len: u64) -> Result<()> {
        let (_tx, rx) = watch::channel(Progress {
            upto: len,
            len: Some(len),
            abandoned: false,
        });
        self.block_on(self.upload_streamed(key, file, rx))?
    }

    /// Uploads object `key` from `file` while it is being written: its bytes are read (from
    /// the page cache, where they were just written) as `progress` says they are final. One
    /// PUT when the object ends within `part_size`, else a multipart upload whose parts go
    /// out as soon as they are final, within the bucket's budget of parts in flight. A failed
    /// part aborts that upload and the whole upload is retried (bounded); an upload cut short
    /// never becomes visible (S3 shows an object only once completed).
    pub(crate) async fn upload_streamed(
        &self,
        key: &str,
        file: &dyn StorageFile,
        progress: watch::Receiver<Progress>,
    ) -> Result<()> {
        let path = self.path(key);
        self.retried(|| {
            let mut rx = progress.clone();
            let path = &path;
            async move { self.upload_once(path, file, &mut rx).await }
        })
        .await
        .map_err(|f| self.error("upload", key, f))
    }

    async fn upload_once(
        &self,
        path: &ObjPath,
        file: &dyn StorageFile,
        rx: &mut watch::Receiver<Progress>,
    ) -> std::result::Result<(), Failure> {
        let part = self.policy.part_size as u64;
        let read = |off: u64, end: u64| {
            let mut buf = vec![0u8; (end - off) as usize];
            file.read_at(&mut buf, off)
                .map_err(|e| Failure::Permanent(format!("read: {e}")))?;
            Ok::<_, Failure>(buf)
        };
        // A part goes out once the bytes after it are final too (or the length is known):
        // whether the rest joins it as the last part is known by then.
        let lookahead = part + part / 4;
        let first = wait_for(rx, lookahead).await?;
        if let Some(len) = first.len.filter(|&l| part_end(0, l, part) == l) {
            let _permit = self.budget.acquire().await;
            let payload = PutPayload::from(read(0, len)?);
            return self
                .attempt(self.store.put(path, payload))
                .await
                .map(|_| ());
        }
        let mut up = self.attempt(self.store.put_multipart(path)).await?;
        let mut in_flight = FuturesUnordered::new();
        let mut off = 0u64;
        let result: std::result::Result<(), Failure> = async {
            loop {
                let p = wait_for(rx, off + lookahead).await?;
                let end = p.len.map_or(off + part, |l| part_end(off, l, part));
                if end <= off {
                    break;
                }
                // The budget bounds the parts in flight over every transfer of the bucket.
                let permit = self
                    .budget
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|e| Failure::Permanent(e.to_string()))?;
                let buf = read(off, end)?;
                off = end;
                let slow = self.gate()?;
                let put = up.put_part(PutPayload::from(buf));
                let timeout = self.policy.request_timeout;
                in_flight.push(tokio::spawn(async move {
                    let _permit = permit;
                    let timed = async {
                        if let Some(d) = slow {
                            tokio::time::sleep(d).await;
                        }
                        put.await
                    };
                    match tokio::time::timeout(timeout, timed).await {
                        Err(_) => Err(Failure::Transient(format!(
                            "part: no answer within {timeout:?}"
                        ))),
                        Ok(r) => r.map_err(classify),
                    }
                }));
                // Collect the parts already answered (a failure ends this attempt early).
                while let Some(Some(r)) = futures_util::FutureExt::now_or_never(in_flight.next()) {
                    r.map_err(|e| Failure::Permanent(format!("part task: {e}")))??;
                }
            }
            while let Some(r) = in_flight.next().await {
                r.map_err(|e| Failure::Permanent(format!("part task: {e}")))??;
            }
            Ok(())
        }
        .await;
        for h in in_flight.iter() {
            h.abort();
        }
        match result {
            Ok(()) => self.attempt(up.complete()).await.map(|_| ()),
            Err(Failure::Stopped) => Err(Failure::Stopped),
            Err(e) => {
                let _ = up.abort().await;
                Err(e)
            }
        }
    }

    /// Downloads object `key` (`len` bytes) into `file` from offset 0, in ranged GETs of
    /// `part_size`, within the bucket's budget of ranges in flight, each retried on its own and
    /// written where it belongs as it arrives, with a writeback hint (the disk works while
    /// later ranges arrive, so the caller's fdatasync finds little left to do).
    pub fn download_file(&self, key: &str, len: u64, file: &dyn StorageFile) -> Result<()> {
        let path = self.path(key);
        let part = self.policy.part_size as u64;
        let mut ranges: Vec<std::ops::Range<u64>> = Vec::new();
        let mut off = 0;
        while off < len {
            let end = part_end(off, len, part);
            ranges.push(off..end);
            off = end;
        }
        let r = self.block_on(async {
            let mut chunks = futures_util::stream::iter(ranges.into_iter().map(|r| {
                let path = &path;
                async move {
                    let _permit = self.budget.acquire().await;
                    let b = self
                        .retried(|| self.attempt(self.store.get_range(path, r.clone())))
                        .await?;
                    file.write_at(&b, r.start)
                        .map_err(|e| Failure::Permanent(format!("write: {e}")))?;
                    let _ = file.start_writeback(r.start, b.len() as u64);
                    Ok::<_, Failure>(())
                }
            }))
            .buffer_unordered(self.policy.parts_in_flight);
            while let Some(got) = chunks.next().await {
                got?;
            }
            Ok(())
        })?;
        r.map_err(|f| self.error("download", key, f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    #[test]
    fn a_small_rest_joins_the_last_part() {
        let p = 16;
        assert_eq!(part_end(0, 0, p), 0);
        assert_eq!(part_end(0, 20, p), 20, "1¼ parts: one");
        assert_eq!(part_end(0, 21, p), 16);
        assert_eq!(part_end(16, 21, p), 21);
        assert_eq!(part_end(0, 2 * p + 3, p), 16);
        assert_eq!(part_end(16, 2 * p + 3, p), 2 * p + 3);
        assert_eq!(part_end(0, 3 * p, p), 16, "whole parts stay whole");
        assert_eq!(part_end(32, 3 * p, p), 3 * p);
    }

    /// Regression test (issue 16, requests per checkpoint): a segment is whole parts plus its
    /// few header bytes, and those bytes cost a part of their own and a ranged GET of their
    /// own (on moto, a ranged GET costs the server a read of the whole object). An object of
    /// two parts and 300 bytes now uploads as a create, two parts and a complete, and
    /// downloads as two ranged GETs, bit-exact.
    #[test]
    fn two_parts_and_a_few_bytes_cost_no_extra_request() {
        let part = 5 << 20;
        let policy = RetryPolicy {
            part_size: part,
            ..Default::default()
        };
        let url: RemoteUrl = "s3://b/p".parse().unwrap();
        let b = Bucket::from_store(url, Arc::new(InMemory::new()), "p".into()).with_policy(policy);
        let io = crate::io::default_storage();
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..2 * part + 300).map(|i| (i * 7 % 251) as u8).collect();
        let src = dir.path().join("src");
        std::fs::write(&src, &bytes).unwrap();
        let f = io.open(&src, false).unwrap();
        b.upload_file("obj", &*f, bytes.len() as u64).unwrap();
        assert_eq!(b.requests(), 4, "a create, two parts, a complete");
        let dst = dir.path().join("dst");
        let g = io.create_new(&dst).unwrap();
        b.download_file("obj", bytes.len() as u64, &*g).unwrap();
        assert_eq!(b.requests(), 6, "two ranged GETs");
        g.sync_all().unwrap(); // (io_uring's files reserve space ahead until synced)
        drop(g);
        let got = std::fs::read(&dst).unwrap();
        let first = got.iter().zip(&bytes).position(|(a, b)| a != b);
        assert!(
            got == bytes,
            "not bit-exact: {} bytes, first difference at {first:?}",
            got.len()
        );
    }

    /// A ranged GET that fails is retried on its own and the file is bit-exact; ranged GETs
    /// that keep failing end the download with a typed error after the bounded attempts.
    #[test]
    fn a_failed_range_is_retried_then_a_typed_error() {
        let part = 5 << 20;
        let faults = Arc::new(super::super::Faults::new());
        let policy = RetryPolicy {
            part_size: part,
            backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
            ..Default::default()
        };
        let url: RemoteUrl = "s3://b/p".parse().unwrap();
        let b = Bucket::from_store(url, Arc::new(InMemory::new()), "p".into())
            .with_policy(policy)
            .with_faults(faults.clone());
        let io = crate::io::default_storage();
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..3 * part + 1000).map(|i| (i * 13 % 241) as u8).collect();
        let src = dir.path().join("src");
        std::fs::write(&src, &bytes).unwrap();
        let f = io.open(&src, false).unwrap();
        b.upload_file("obj", &*f, bytes.len() as u64).unwrap();
        let n = faults.requests();
        faults.at(n + 2, Fault::Error); // the second range's first attempt
        let dst = dir.path().join("dst");
        let g = io.create_new(&dst).unwrap();
        b.download_file("obj", bytes.len() as u64, &*g).unwrap();
        assert_eq!(faults.requests(), n + 4, "three ranges and one retry");
        g.sync_all().unwrap();
        drop(g);
        assert!(std::fs::read(&dst).unwrap() == bytes, "not bit-exact");
        faults.every(Some(Fault::Error));
        let h = io.create_new(&dir.path().join("dst2")).unwrap();
        let e = b.download_file("obj", bytes.len() as u64, &*h).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, Error::Remote { op: "download", .. }) && msg.contains("gave up after 4"),
            "{msg}"
        );
    }
}
