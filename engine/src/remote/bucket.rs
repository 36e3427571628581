//! [`Bucket`]: the synchronous client of one store's prefix in an object store. Every request
//! goes through one retry loop: a per-request timeout, a bounded number of attempts with
//! exponential backoff for transient failures, then a typed [`Error::Remote`]. The optional
//! [`Faults`] injector sees every request (tests stop a writer between any two).

use super::faults::{Fault, Faults, Verdict};
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
    pub part_size: usize,
    /// Parts (or ranges) in flight at once per transfer: the memory budget of a transfer is
    /// `part_size * parts_in_flight`. Default 4.
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
fn runtime() -> Result<&'static tokio::runtime::Runtime> {
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

/// Replaces the values of credential environment variables in `msg` (a server's error body
/// may echo the access key id): credentials never reach an error, a log or a `Debug`.
pub(crate) fn scrub(msg: String) -> String {
    let mut msg = msg;
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "GOOGLE_SERVICE_ACCOUNT_KEY",
        "AZURE_STORAGE_ACCOUNT_KEY",
        "AZURE_STORAGE_ACCESS_KEY",
        "AZURE_STORAGE_CLIENT_SECRET",
        "AZURE_STORAGE_SAS_KEY",
        "AZURE_STORAGE_TOKEN",
    ] {
        if let Ok(v) = std::env::var(var) {
            if v.len() >= 4 {
                msg = msg.replace(&v, "***");
            }
        }
    }
    msg
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
        let key = format!("{}/", super::layout::LOG_DIR);
        self.list(super::layout::LOG_DIR)
            .map(|_| ())
            .map_err(|e| match e {
                Error::Remote { url, message, .. } => Error::Remote {
                    url,
                    op: "open",
                    key,
                    message: format!(
                        "cannot list the store's commit log (does the bucket exist, and may these \
                     credentials read it?): {message}"
                    ),
                },
                other => other,
            })
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

    /// Uploads the first `len` bytes of `file` as object `key`: one PUT up to `part_size`,
    /// else a multipart upload with at most `parts_in_flight` parts in flight (the memory
    /// budget). A failed part aborts that upload and the whole upload is retried (bounded);
    /// an upload cut short never becomes visible (S3 shows an object only once completed).
    pub fn upload_file(&self, key: &str, file: &dyn StorageFile, len: u64) -> Result<()> {
        let path = self.path(key);
        let r = if len <= self.policy.part_size as u64 {
            let mut buf = vec![0u8; len as usize];
            file.read_at(&mut buf, 0)
                .map_err(|e| self.error("read", key, Failure::Permanent(e.to_string())))?;
            let payload = PutPayload::from(buf);
            self.block_on(self.retried(|| {
                let fut = self.store.put(&path, payload.clone());
                async { self.attempt(fut).await.map(|_| ()) }
            }))?
        } else {
            self.block_on(self.retried(|| self.multipart_once(&path, file, len)))?
        };
        r.map_err(|f| self.error("upload", key, f))
    }

    async fn multipart_once(
        &self,
        path: &ObjPath,
        file: &dyn StorageFile,
        len: u64,
    ) -> std::result::Result<(), Failure> {
        let mut up = self.attempt(self.store.put_multipart(path)).await?;
        let mut in_flight = FuturesUnordered::new();
        let part = self.policy.part_size as u64;
        let mut off = 0u64;
        let result: std::result::Result<(), Failure> = async {
            while off < len {
                let n = part.min(len - off);
                let mut buf = vec![0u8; n as usize];
                file.read_at(&mut buf, off)
                    .map_err(|e| Failure::Permanent(format!("read: {e}")))?;
                off += n;
                while in_flight.len() >= self.policy.parts_in_flight {
                    if let Some(r) = in_flight.next().await {
                        r?;
                    }
                }
                let slow = self.gate()?;
                let put = up.put_part(PutPayload::from(buf));
                let timeout = self.policy.request_timeout;
                in_flight.push(async move {
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
                });
            }
            while let Some(r) = in_flight.next().await {
                r?;
            }
            Ok(())
        }
        .await;
        drop(in_flight);
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
    /// `part_size`, at most `parts_in_flight` at once, each retried on its own.
    pub fn download_file(&self, key: &str, len: u64, file: &dyn StorageFile) -> Result<()> {
        let path = self.path(key);
        let part = self.policy.part_size as u64;
        let ranges: Vec<std::ops::Range<u64>> = (0..len.div_ceil(part))
            .map(|i| i * part..((i + 1) * part).min(len))
            .collect();
        let r = self.block_on(async {
            let mut chunks = futures_util::stream::iter(ranges.into_iter().map(|r| {
                let path = &path;
                async move {
                    let b = self
                        .retried(|| self.attempt(self.store.get_range(path, r.clone())))
                        .await?;
                    Ok::<_, Failure>((r.start, b))
                }
            }))
            .buffer_unordered(self.policy.parts_in_flight);
            while let Some(got) = chunks.next().await {
                let (at, bytes) = got?;
                file.write_at(&bytes, at)
                    .map_err(|e| Failure::Permanent(format!("write: {e}")))?;
            }
            Ok(())
        })?;
        r.map_err(|f| self.error("download", key, f))
    }
}
