//! Partial and strict loads, after MindSpore's `load_checkpoint(specify_prefix, filter_prefix)`
//! and `load_param_into_net(strict_load)`: pick tensors by name list, by prefix, excluding
//! prefixes, or by predicate ([`LoadSpec`], [`CheckpointReader::load`]); or load against the
//! caller's expected names, dtypes and shapes ([`CheckpointReader::load_into`]), strictly (any
//! missing or unexpected name is an [`Error::StrictLoad`]) or not (both lists are returned in
//! a [`LoadReport`]). A dtype or shape that differs from the expectation is an
//! [`Error::TensorMismatch`] naming the tensor. Every check runs before any tensor byte is
//! read, so a failed load reads nothing.
//!
//! A name that does not exist is an [`Error::NotFound`] that lists up to three close matches
//! ([`CheckpointReader::close_matches`]).

use super::reader::{CheckpointReader, Tensor};
use super::suggest::{close_matches, not_found};
use crate::dtype::DType;
use crate::error::{Error, Result};
use std::collections::{BTreeSet, HashSet};

/// A name predicate of a [`LoadSpec`].
pub type NamePredicate<'a> = Box<dyn Fn(&str) -> bool + 'a>;

/// Which tensors [`CheckpointReader::load`] reads. Every given selector must accept a name
/// for it to be loaded (they combine with AND); the default selects every tensor.
pub struct LoadSpec<'a> {
    /// Exactly these names, in this order (`None`: every tensor, in checkpoint order). A name
    /// that does not exist is an [`Error::NotFound`] listing close matches.
    pub names: Option<Vec<String>>,
    /// Keep only names that start with any of these (empty: no restriction). MindSpore's
    /// `specify_prefix`.
    pub specify_prefix: Vec<String>,
    /// Drop names that start with any of these. MindSpore's `filter_prefix`.
    pub filter_prefix: Vec<String>,
    /// Keep only names for which this returns `true`.
    pub predicate: Option<NamePredicate<'a>>,
    /// Verify every chunk against its BLAKE3 (default `true`).
    pub verify: bool,
}

impl Default for LoadSpec<'_> {
    fn default() -> Self {
        LoadSpec {
            names: None,
            specify_prefix: Vec::new(),
            filter_prefix: Vec::new(),
            predicate: None,
            verify: true,
        }
    }
}

impl std::fmt::Debug for LoadSpec<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadSpec")
            .field("names", &self.names)
            .field("specify_prefix", &self.specify_prefix)
            .field("filter_prefix", &self.filter_prefix)
            .field(
                "predicate",
                &self.predicate.as_ref().map(|_| "Fn(&str) -> bool"),
            )
            .field("verify", &self.verify)
            .finish()
    }
}

impl<'a> LoadSpec<'a> {
    /// Every tensor, verified.
    pub fn all() -> Self {
        Self::default()
    }

    /// Exactly these names (see [`LoadSpec::names`]).
    pub fn names<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.names = Some(names.into_iter().map(Into::into).collect());
        self
    }

    /// Adds prefixes to keep (see [`LoadSpec::specify_prefix`]).
    pub fn specify_prefix<S: Into<String>>(mut self, p: impl IntoIterator<Item = S>) -> Self {
        self.specify_prefix.extend(p.into_iter().map(Into::into));
        self
    }

    /// Adds prefixes to drop (see [`LoadSpec::filter_prefix`]).
    pub fn filter_prefix<S: Into<String>>(mut self, p: impl IntoIterator<Item = S>) -> Self {
        self.filter_prefix.extend(p.into_iter().map(Into::into));
        self
    }

    /// Sets the predicate (see [`LoadSpec::predicate`]).
    pub fn predicate(mut self, f: impl Fn(&str) -> bool + 'a) -> Self {
        self.predicate = Some(Box::new(f));
        self
    }

    /// Turns BLAKE3 verification on or off (a trusted fast path).
    pub fn verify(mut self, verify: bool) -> Self {
        self.verify = verify;
        self
    }

    fn validate(&self) -> Result<()> {
        let lists = [
            ("specify_prefix", &self.specify_prefix),
            ("filter_prefix", &self.filter_prefix),
        ];
        for (what, list) in lists {
            if list.iter().any(String::is_empty) {
                return Err(Error::invalid(format!(
                    "{what} holds an empty prefix, which matches every name; leave the list \
                     empty instead"
                )));
            }
        }
        if let Some(names) = &self.names {
            let mut seen = HashSet::new();
            if let Some(dup) = names.iter().find(|n| !seen.insert(n.as_str())) {
                return Err(Error::invalid(format!("name {dup:?} is listed twice")));
            }
        }
        Ok(())
    }

    /// Whether the prefix and predicate selectors keep `name` (the name list aside).
    fn keeps(&self, name: &str) -> bool {
        (self.specify_prefix.is_empty()
            || self
                .specify_prefix
                .iter()
                .any(|p| name.starts_with(p.as_str())))
            && !self
                .filter_prefix
                .iter()
                .any(|p| name.starts_with(p.as_str()))
            && self.predicate.as_ref().is_none_or(|f| f(name))
    }
}

/// What [`CheckpointReader::load_into`] loaded, and the names that did not line up
/// (MindSpore's `param_not_load` and `ckpt_not_load`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoadReport {
    /// Expected tensors found in the checkpoint, in the caller's order.
    pub loaded: Vec<(String, Tensor)>,
    /// Expected names the checkpoint lacks, in the caller's order.
    pub missing: Vec<String>,
    /// Checkpoint tensors the caller did not expect, in checkpoint order.
    pub unexpected: Vec<String>,
}

impl CheckpointReader<'_> {
    /// Up to three tensor names close to `name` (by edit distance and common prefix), best
    /// first; the same list a [`Error::NotFound`] for `name` shows.
    pub fn close_matches(&self, name: &str) -> Vec<&str> {
        close_matches(name, self.tensor_names())
    }

    /// The names `spec` selects, without reading anything: the name list (each must exist)
    /// or every tensor in checkpoint order, filtered by the prefix and predicate selectors.
    pub fn select(&self, spec: &LoadSpec<'_>) -> Result<Vec<&str>> {
        spec.validate()?;
        let all = self.tensor_names();
        let picked: Vec<&str> = match &spec.names {
            None => all.clone(),
            Some(names) => {
                let have: HashSet<&str> = all.iter().copied().collect();
                let mut out = Vec::with_capacity(names.len());
                for n in names {
                    match have.get(n.as_str()) {
                        Some(&n) => out.push(n),
                        None => {
                            return Err(not_found(
                                "tensor",
                                n,
                                self.manifest().id,
                                all.iter().copied(),
                            ))
                        }
                    }
                }
                out
            }
        };
        Ok(picked.into_iter().filter(|n| spec.keeps(n)).collect())
    }

    /// Reads the tensors `spec` selects ([`CheckpointReader::select`]), in that order.
    pub fn load(&self, spec: &LoadSpec<'_>) -> Result<Vec<(String, Tensor)>> {
        self.select(spec)?
            .into_iter()
            .map(|n| Ok((n.to_owned(), self.tensor_with(n, spec.verify)?)))
            .collect()
    }

    /// Loads the tensors a model expects, given as `(name, dtype, shape)`, verified.
    ///
    /// Checks first, reading nothing on failure: a duplicate expected name is an
    /// [`Error::InvalidArgument`]; with `strict`, any expected name the checkpoint lacks or
    /// checkpoint tensor not expected is an [`Error::StrictLoad`] listing both; an expected
    /// tensor whose dtype or shape differs is an [`Error::TensorMismatch`]. Without `strict`
    /// the found tensors are loaded and both lists returned.
    pub fn load_into<S, V>(&self, expected: &[(S, DType, V)], strict: bool) -> Result<LoadReport>
    where
        S: AsRef<str>,
        V: AsRef<[u64]>,
    {
        let mut seen = HashSet::new();
        if let Some((dup, _, _)) = expected.iter().find(|(n, _, _)| !seen.insert(n.as_ref())) {
            return Err(Error::invalid(format!(
                "expected name {:?} is listed twice",
                dup.as_ref()
            )));
        }
        let all = self.tensor_names();
        let have: BTreeSet<&str> = all.iter().copied().collect();
        let missing: Vec<String> = expected
            .iter()
            .map(|(n, _, _)| n.as_ref())
            .filter(|n| !have.contains(n))
            .map(str::to_owned)
            .collect();
        let unexpected: Vec<String> = all
            .iter()
            .filter(|n| !seen.contains(*n))
            .map(|n| (*n).to_owned())
            .collect();
        if strict && (!missing.is_empty() || !unexpected.is_empty()) {
            return Err(Error::StrictLoad {
                checkpoint: self.manifest().id,
                missing,
                unexpected,
            });
        }
        let present: Vec<&(S, DType, V)> = expected
            .iter()
            .filter(|(n, _, _)| have.contains(n.as_ref()))
            .collect();
        for (name, dtype, shape) in &present {
            let (found_dtype, found_shape) = self.tensor_meta(name.as_ref())?;
            if found_dtype != *dtype || found_shape[..] != *shape.as_ref() {
                return Err(Error::TensorMismatch {
                    checkpoint: self.manifest().id,
                    name: name.as_ref().to_owned(),
                    expected_dtype: *dtype,
                    expected_shape: shape.as_ref().to_vec(),
                    found_dtype,
                    found_shape,
                });
            }
        }
        let loaded = present
            .into_iter()
            .map(|(n, _, _)| Ok((n.as_ref().to_owned(), self.tensor(n.as_ref())?)))
            .collect::<Result<_>>()?;
        Ok(LoadReport {
            loaded,
            missing,
            unexpected,
        })
    }
}
