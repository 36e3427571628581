//! The bucket tier: a store's state kept in object storage (S3 and S3-compatible servers,
//! `file://` for tests), by one protocol used twice — as the replica of a local store
//! (`Options::replica`, a background [`Replicator`]) and as the store itself
//! (`Store::open("s3://bucket/prefix")`, a local cache published synchronously at commit).
//!
//! Objects are immutable and there is no rename, so the commit point is a conditional create:
//! - segments are objects `PREFIX/segments/<token>/<NNNNNNNN>.seg`, uploaded whole (multipart,
//!   several parts in flight, a bounded memory budget) before anything names them; a bucket
//!   store streams them while they are written ([`Streamer`]);
//! - each commit is an object `PREFIX/log/<seq, 20 digits>` created with create-if-absent
//!   ([`object_store::PutMode::Create`]); it holds the whole live state (the records of a
//!   compacted WAL) and the map of segment ids to objects, so every commit object is also the
//!   snapshot that replaces the older ones (which are then deleted);
//! - losing the race for the next sequence number is [`crate::Error::WriterConflict`], never an
//!   overwrite; the single-writer rule holds across hosts;
//! - deletes (old commit objects, then segment objects) only after a commit object that no
//!   longer names them; recovery reads the newest commit object and ignores every object it
//!   does not name (an upload cut by a crash), removing such leftovers once they are old.
//!
//! The format is in docs/FORMAT.md ("Bucket layout"), the guarantees in docs/GUARANTEES.md.
//! The crate `object_store` is async: [`Bucket`] wraps it with one small tokio runtime so the
//! rest of the engine stays synchronous.

mod bucket;
pub mod cloud;
mod faults;
mod layout;
mod object;
mod publish;
mod pull;
mod replicator;
mod retain;
mod secrets;
mod stream;
mod url;

pub use bucket::{Bucket, RetryPolicy};
pub use faults::{Fault, Faults};
pub use layout::{log_key, parse_log_key, segment_key, LOG_DIR, SEGMENTS_DIR};
pub use object::{CommitObject, SegmentObject, COMMIT_MAGIC, COMMIT_VERSION};
pub use publish::{BucketRecovery, LocalImage, Publisher, Unnamed};
pub use pull::{download_segments, latest};
pub use replicator::{ReplicaStatus, Replication, Replicator};
pub use stream::Streamer;
pub use url::{is_url, RemoteUrl};
