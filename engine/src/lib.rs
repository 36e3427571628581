//! ckptstore-engine: a crash-consistent checkpoint store for ML training.
//!
//! Layers, each calling only the one below: [`io`] (the only code that touches the file
//! system), [`segment`] and [`wal`] (on-disk framing), [`manifest`] (the data model), and
//! [`store`] (transactions, the commit protocol, recovery). The byte-level format is in
//! `docs/FORMAT.md`, the durability contract in `docs/GUARANTEES.md`.
#![deny(unsafe_code)]
#![warn(missing_docs)]
// Outside tests, a panic is never the way to report a failure: an `expect` stays only where
// an invariant holds, under an `#[allow]` that says which.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod alloc;
#[doc(hidden)]
pub mod codec;
pub mod crypt;
#[doc(hidden)]
pub mod current;
pub mod device;
pub mod dtype;
pub mod error;
pub mod features;
pub mod interop;
pub mod io;
mod le;
#[doc(hidden)]
pub mod manifest;
pub mod pipeline;
pub mod remote;
pub mod retention;
#[doc(hidden)]
pub mod segment;
#[doc(hidden)]
pub mod staging;
pub mod store;
#[doc(hidden)]
pub mod wal;

pub use ckptstore_proto as proto;
pub use codec::Compression;
pub use dtype::DType;
pub use error::{Error, Result};
pub use manifest::{CheckpointInfo, MetaValue};
pub use pipeline::{Pipeline, PipelineOptions, SaveHandle, SaveReport};
pub use retention::{KeepReason, MetricMode, RetentionPlan, RetentionPolicy};
pub use store::{
    ChainReport, CheckpointReader, ChunkLocation, CommitInfo, CompactionPlan, DeleteInfo,
    GcOptions, GcReport, HealReport, LoadReport, LoadSpec, Options, RebuildReport, RecoveryMode,
    RecoveryReport, RemoteView, ScrubReport, Selector, ShardFragment, ShardOptions, ShardWriter,
    SpaceStats, Store, StoreStats, Tensor, TensorView, Transaction, VerifiedChunks,
    DIRECT_LOAD_MIN_BYTES,
};
