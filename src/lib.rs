//! ckptstore: a crash-consistent checkpoint store for ML training.
//!
//! This crate is the facade: it re-exports the storage engine ([`ckptstore_engine`]) and
//! carries the `ckptstore` command-line tool. See the README for the guarantee and the API.
#![deny(unsafe_code)]

pub use ckptstore_engine::*;

/// The README's examples run as doctests, so the README stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The Rust API guide's examples (docs/RUST.md) run as doctests too.
#[cfg(doctest)]
#[doc = include_str!("../docs/RUST.md")]
pub struct RustGuideDoctests;
