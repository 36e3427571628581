//! Tamper evidence: the keyed MAC chain over sealed commits (docs/FORMAT.md, "Commit MACs").
//!
//! A writer with a key gives every checkpoint it commits a MAC (keyed BLAKE3 under a key
//! derived from the store key) over what the checkpoint is — ids, step, metadata, names,
//! shapes, chunk ids, nonces and tags; not where compaction moved the chunks — and over the MAC
//! of the newest live checkpoint before it (`prev_mac`). Every open with the key checks every
//! MAC: a changed, swapped or replayed commit record (one whose id or content differs from
//! what the key holder committed) refuses the open. What no MAC inside the store can show —
//! the newest commits dropped (a rollback) — [`Store::verify_chain`] makes visible to a caller
//! who remembers the head it saw ([`Store::check_head`]).

use super::state::State;
use super::Store;
use crate::crypt::{KeyId, Keyring};
use crate::error::{Error, Result};
use std::path::Path;

/// What [`Store::verify_chain`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainReport {
    /// Checkpoints whose MAC verified, oldest first.
    pub verified: Vec<u64>,
    /// Checkpoints without a MAC (plain ones): nothing vouches for them.
    pub unauthenticated: Vec<u64>,
    /// Checkpoints with a MAC under a key not supplied: not checked.
    pub unchecked: Vec<u64>,
    /// `(a, b)`: consecutive checkpoints with MACs where `b` was not committed right after `a`
    /// was the newest: what was committed between them is gone — deleted, or dropped by
    /// someone who can write the store (the MACs cannot tell which).
    pub breaks: Vec<(u64, u64)>,
    /// The newest checkpoint with a MAC, and its MAC in hex. Keep it: a later store whose head
    /// is older, or that no longer holds it with that MAC, was rolled back or forked
    /// ([`Store::check_head`]).
    pub head: Option<(u64, String)>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Checks the MAC of every live checkpoint that has one and whose key was supplied.
pub(super) fn check_macs(dir: &Path, state: &State, keys: &Keyring) -> Result<()> {
    for m in state.checkpoints.values().filter(|m| !m.mac.is_empty()) {
        let Some(sealer) = KeyId::from_slice(&m.key_id).and_then(|id| keys.find(&id)) else {
            continue;
        };
        if sealer.commit_mac(m)[..] != m.mac[..] {
            return Err(Error::MacMismatch {
                what: format!("checkpoint {} in {}", m.id, dir.display()),
                reason: "commit MAC mismatch".into(),
            });
        }
    }
    Ok(())
}

impl Store {
    /// Checks every commit MAC and the links between them; see [`ChainReport`]. A MAC that
    /// does not match is `Error::MacMismatch` (an open with the key refuses such a store, so
    /// this only fails on a store opened before it was changed).
    pub fn verify_chain(&self) -> Result<ChainReport> {
        check_macs(&self.dir, &self.state, &self.keys)?;
        let mut r = ChainReport::default();
        let mut prev: Option<(u64, &[u8])> = None;
        for m in self.state.checkpoints.values() {
            if m.mac.is_empty() {
                r.unauthenticated.push(m.id);
                continue;
            }
            let known =
                KeyId::from_slice(&m.key_id).is_some_and(|id| self.keys.find(&id).is_some());
            if known {
                r.verified.push(m.id);
            } else {
                r.unchecked.push(m.id);
            }
            if let Some((pid, pmac)) = prev {
                if m.prev_mac[..] != *pmac {
                    r.breaks.push((pid, m.id));
                }
            }
            prev = Some((m.id, &m.mac));
        }
        r.head = prev.map(|(id, mac)| (id, hex(mac)));
        Ok(r)
    }

    /// Fails with `Error::Rollback` unless the store still holds the chain head a caller saw
    /// earlier (`id`, `mac_hex` from [`ChainReport::head`]): its head is older than `id`, or
    /// checkpoint `id` is live with another MAC. A head that was deleted since (and newer
    /// checkpoints committed) passes.
    pub fn check_head(&self, id: u64, mac_hex: &str) -> Result<()> {
        let report = self.verify_chain()?;
        let rollback = |reason: String| Error::Rollback {
            what: format!("store {}", self.dir.display()),
            reason,
        };
        match &report.head {
            None => return Err(rollback(format!("no checkpoint with a MAC; {id} was seen"))),
            Some((h, _)) if *h < id => {
                return Err(rollback(format!(
                    "its newest authenticated checkpoint is {h}; {id} was seen"
                )))
            }
            _ => {}
        }
        if let Some(m) = self.state.checkpoints.get(&id) {
            if !hex(&m.mac).eq_ignore_ascii_case(mac_hex.trim()) {
                return Err(rollback(format!(
                    "checkpoint {id} has another MAC than the one seen (a different history)"
                )));
            }
        }
        Ok(())
    }
}
