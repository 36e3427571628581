//! The invariants checked after each kill, against the ledger: (a) the store opens, (b)
//! acknowledged checkpoints are there and bit-exact, (c) everything verifies and nothing
//! unexpected is listed, (d) no leftovers after a writer's recovery, (e) a final commit works.

use super::ledger::Run;
use super::workload::store_options;
use crate::cli::CliResult;
use ckptstore::manifest::all_chunks;
use ckptstore::store::SEGMENTS_DIR;
use ckptstore::{segment, Selector, Store};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};

impl Run<'_> {
    /// Reopens the store after a kill and checks (a)–(c), and with a writer open (which
    /// repairs) also (d). `adopt_all` (a continued store): every listed checkpoint joins the
    /// ledger, checked against its step's content.
    pub(super) fn check(&mut self, writable: bool, adopt_all: bool) {
        self.tally.recoveries += 1;
        if !writable {
            self.tally.read_only_checks += 1;
        }
        let how = if writable { "as writer" } else { "read-only" };
        let store = match Store::open(self.dir, store_options(!writable)) {
            Ok(s) => s,
            Err(e) => return self.violation(format!("the store does not open ({how}): {e}")),
        };
        let report = store.recovery_report().clone();
        if !report.damaged_segments.is_empty() {
            self.violation(format!(
                "recovery ({how}) found damaged segments {:?}",
                report.damaged_segments
            ));
        }
        let listed: BTreeMap<u64, u64> = store.list().iter().map(|c| (c.id, c.step)).collect();

        // (b) Everything acknowledged and not deleted is there, with its step.
        let expected: Vec<(u64, u64)> = self.ledger.live.iter().map(|(&i, &s)| (i, s)).collect();
        for (id, step) in expected {
            match listed.get(&id) {
                Some(&s) if s == step => {}
                Some(&s) => self.violation(format!(
                    "acknowledged checkpoint {id} (step {step}) is step {s} after recovery ({how})"
                )),
                None if self.ledger.pending_delete == Some(id) => {
                    // Its delete was in flight and became durable: allowed.
                    self.ledger.live.remove(&id);
                    self.ledger.deleted.insert(id);
                    self.tally.unacked_deletes_found += 1;
                }
                None => self.violation(format!(
                    "acknowledged checkpoint {id} (step {step}) is missing after recovery ({how})"
                )),
            }
        }
        // Nothing is listed that was deleted, or never acknowledged nor in flight.
        let max_acked = self.ledger.max_id;
        let mut found: Vec<(u64, u64)> = Vec::new();
        for (&id, &step) in &listed {
            if self.ledger.live.contains_key(&id) {
                continue;
            }
            if self.ledger.deleted.contains(&id) {
                self.violation(format!(
                    "checkpoint {id} (step {step}) was deleted (acknowledged) but is listed after recovery ({how})"
                ));
            } else if adopt_all || (self.ledger.pending_commits.contains(&step) && id > max_acked) {
                // A save in flight at the kill had become durable: allowed, and from now on
                // it must stay (it is checked bit-exact below like the others).
                if !adopt_all {
                    self.tally.unacked_commits_found += 1;
                    found.push((id, step));
                }
                self.ledger.live.insert(id, step);
                self.ledger.max_id = self.ledger.max_id.max(id);
                self.ledger.next_step = self.ledger.next_step.max(step + 1);
            } else {
                self.violation(format!(
                    "checkpoint {id} (step {step}) is listed after recovery ({how}) but was \
                     never acknowledged nor being committed"
                ));
            }
        }
        // Saves commit in submission order: those in flight that became durable are the
        // oldest of them, in that order (a later save never survives an earlier one that was
        // lost). `found` is in id order, which is commit order.
        let steps: Vec<u64> = found.iter().map(|&(_, s)| s).collect();
        let pending = &self.ledger.pending_commits;
        if !pending.starts_with(&steps) {
            let pending = pending.clone();
            self.violation(format!(
                "saves in flight at the kill were submitted as steps {pending:?}; after recovery \
                 ({how}) steps {steps:?} of them are listed, not the first {} in that order",
                steps.len()
            ));
        }
        self.ledger.pending_commits.clear();
        self.ledger.pending_delete = None;

        // (b) bit-exact, (c) verifies.
        let live: Vec<(u64, u64)> = self
            .ledger
            .live
            .iter()
            .filter(|(id, _)| listed.contains_key(id))
            .map(|(&i, &s)| (i, s))
            .collect();
        for (id, step) in live {
            match self.content(step).check(&store, id) {
                Ok(()) => self.tally.verified += 1,
                Err(why) => self.violation(format!(
                    "acknowledged checkpoint {id} (step {step}) after recovery ({how}): {why}"
                )),
            }
        }
        for (id, res) in store.verify_all() {
            if let Err(e) = res {
                self.violation(format!(
                    "checkpoint {id} does not verify after recovery ({how}): {e}"
                ));
            }
        }
        // Only live checkpoints are compared again: forget the others' contents.
        let steps: BTreeSet<u64> = self.ledger.live.values().copied().collect();
        self.contents.retain(|s, _| steps.contains(s));
        // (d) After a writer's recovery, nothing left over.
        if writable {
            for why in store.leftovers() {
                self.violation(why);
            }
        }
    }

    /// (e) After the last kill: a commit made now, after recovery, works and survives a
    /// reopen.
    pub(super) fn final_commit(&mut self) {
        let step = self.ledger.next_step;
        let result = (|| -> Result<u64, String> {
            let mut store = Store::open(self.dir, store_options(false))
                .map_err(|e| format!("the store does not open: {e}"))?;
            let c = self
                .content(step)
                .save(&mut store)
                .map_err(|e| format!("a commit after recovery failed: {e}"))?;
            Ok(c.checkpoint.id)
        })();
        match result {
            Ok(id) => {
                if id <= self.ledger.max_id {
                    self.violation(format!(
                        "a commit after recovery got id {id}, not above the largest acknowledged {}",
                        self.ledger.max_id
                    ));
                }
                self.tally.acknowledged += 1;
                self.ledger.max_id = self.ledger.max_id.max(id);
                self.ledger.live.insert(id, step);
                self.ledger.next_step = step + 1;
                self.tally.final_commit = Some((id, step));
                self.check(true, false);
            }
            Err(why) => self.violation(why),
        }
    }

    /// For `--inject-fault corrupt`: flips a byte in a chunk of the newest acknowledged
    /// checkpoint. Returns whether it did.
    pub(super) fn corrupt_one(&mut self) -> CliResult<bool> {
        let Some((&id, _)) = self.ledger.live.last_key_value() else {
            return Ok(false);
        };
        let (path, at) = {
            let store = Store::open(self.dir, store_options(true))?;
            let ck = store.checkpoint(Selector::Id(id))?;
            let Some(c) = all_chunks(ck.manifest()).find(|c| c.stored_len > 0) else {
                return Ok(false);
            };
            (
                self.dir
                    .join(SEGMENTS_DIR)
                    .join(segment::file_name(c.segment)),
                c.offset + c.stored_len / 2,
            )
        };
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)?;
        let mut b = [0u8; 1];
        use std::io::{Seek, SeekFrom};
        f.seek(SeekFrom::Start(at))?;
        f.read_exact(&mut b)?;
        b[0] ^= 0x40;
        f.seek(SeekFrom::Start(at))?;
        f.write_all(&b)?;
        f.sync_all()?;
        Ok(true)
    }
}
