//! The parent's model of what the writers acknowledged: the ledger, the kill phases, the
//! counters, and the parsing of the writers' lines into them.

use super::workload::Content;
use super::Args;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Where a writer was when it was killed: what its last line said it had started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Phase {
    /// Nothing printed yet: exec, dynamic loading, argument parsing.
    Startup,
    /// In `Store::open`: recovery of what the previous kill left.
    Recovery,
    /// In a commit: chunk writes, segment fsyncs, the WAL append, an automatic compaction
    /// (for the asynchronous writer: whenever a save it submitted is not yet acknowledged,
    /// unless its own thread is in a delete or compaction).
    Commit,
    /// In a delete: its WAL record, segment removal, an automatic compaction.
    Delete,
    /// In an explicit `compact_wal()`.
    Compaction,
    /// Between operations (generating the next checkpoint's data).
    Between,
}

impl Phase {
    pub(super) fn name(self) -> &'static str {
        match self {
            Phase::Startup => "startup",
            Phase::Recovery => "recovery",
            Phase::Commit => "commit",
            Phase::Delete => "delete",
            Phase::Compaction => "compaction",
            Phase::Between => "between",
        }
    }

    pub(super) fn words(self) -> &'static str {
        match self {
            Phase::Startup => "during startup",
            Phase::Recovery => "during recovery",
            Phase::Commit => "during a commit",
            Phase::Delete => "during a delete",
            Phase::Compaction => "during a WAL compaction",
            Phase::Between => "between operations",
        }
    }
}

/// What must hold, from the writers' acknowledgements.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    /// Acknowledged (or found durable after a kill) and not deleted: id → step.
    pub(super) live: BTreeMap<u64, u64>,
    /// Acknowledged deletions.
    pub(super) deleted: BTreeSet<u64>,
    /// The largest checkpoint id acknowledged or found.
    pub(super) max_id: u64,
    /// The step the next writer starts at (after every step ever begun).
    pub(super) next_step: u64,
    /// Saves begun and not yet acknowledged, by step, in submission order: at most one for
    /// the synchronous writer, up to `--in-flight` for the asynchronous one.
    pub(super) pending_commits: Vec<u64>,
    /// A delete begun and not acknowledged when its writer died: its id.
    pub(super) pending_delete: Option<u64>,
}

/// Counters for the summary.
#[derive(Debug, Default)]
pub(super) struct Tally {
    pub(super) kills: u64,
    pub(super) phases: BTreeMap<Phase, u64>,
    /// Kills of a writer in its recovery of a store left torn by the previous kill.
    pub(super) torn_recovery_kills: u64,
    pub(super) acknowledged: u64,
    pub(super) deletes: u64,
    pub(super) explicit_compactions: u64,
    pub(super) auto_compactions: u64,
    /// Reopens after a kill (writer opens with repair, or read-only looks).
    pub(super) recoveries: u64,
    pub(super) read_only_checks: u64,
    /// Checkpoints compared bit-exact (over all checks).
    pub(super) verified: u64,
    /// Commits that were not acknowledged but had become durable before the kill.
    pub(super) unacked_commits_found: u64,
    /// Kills by the number of saves begun and not acknowledged at that moment.
    pub(super) saves_in_flight: BTreeMap<usize, u64>,
    /// Deletes that were not acknowledged but had become durable before the kill.
    pub(super) unacked_deletes_found: u64,
    /// Writers that acknowledged at least one commit.
    pub(super) writers_committed: u64,
    /// The commit the parent makes itself after the last kill.
    pub(super) final_commit: Option<(u64, u64)>,
}

pub(super) struct Run<'a> {
    pub(super) a: &'a Args,
    pub(super) dir: &'a Path,
    pub(super) data_seed: u64,
    /// The store was left by an earlier crashtest and continued.
    pub(super) continued: bool,
    pub(super) ledger: Ledger,
    pub(super) tally: Tally,
    pub(super) violations: Vec<String>,
    /// Cache of regenerated contents by step.
    pub(super) contents: BTreeMap<u64, Content>,
}

impl Run<'_> {
    pub(super) fn content(&mut self, step: u64) -> &Content {
        let seed = self.data_seed;
        self.contents
            .entry(step)
            .or_insert_with(|| Content::of(seed, step))
    }

    pub(super) fn violation(&mut self, why: String) {
        self.violations.push(why);
    }

    /// The phase once the writer's thread finished an operation: between operations, unless
    /// saves it submitted are still being written (the asynchronous writer).
    fn phase_after_ack(&self) -> Phase {
        if self.ledger.pending_commits.is_empty() {
            Phase::Between
        } else {
            Phase::Commit
        }
    }

    /// Applies one line of a writer.
    pub(super) fn on_line(&mut self, line: &str, phase: &mut Phase) {
        let w: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| w.get(i).and_then(|s| s.parse::<u64>().ok());
        match (w.first().copied(), num(1), num(2)) {
            (Some("opening"), _, _) => *phase = Phase::Recovery,
            (Some("opened"), Some(_), _) => *phase = Phase::Between,
            (Some("begin"), Some(step), _) => {
                *phase = Phase::Commit;
                self.ledger.pending_commits.push(step);
                self.ledger.next_step = self.ledger.next_step.max(step + 1);
            }
            (Some("commit"), Some(step), Some(id)) => {
                // Acknowledgements come in submission order: the oldest save begun.
                match self.ledger.pending_commits.first() {
                    Some(&s) if s == step => {
                        self.ledger.pending_commits.remove(0);
                    }
                    _ => self.violation(format!(
                        "the writer acknowledged step {step} out of order: the saves begun and \
                         not acknowledged were {:?}",
                        self.ledger.pending_commits
                    )),
                }
                *phase = self.phase_after_ack();
                self.tally.acknowledged += 1;
                if w.get(3) == Some(&"compacted") {
                    self.tally.auto_compactions += 1;
                }
                if id <= self.ledger.max_id {
                    let was = match self.ledger.live.get(&id) {
                        Some(s) => format!("live, step {s}"),
                        None if self.ledger.deleted.contains(&id) => "deleted".into(),
                        None => "never seen".into(),
                    };
                    self.violation(format!(
                        "the writer acknowledged step {step} as checkpoint {id}, but ids only \
                         grow and {} was already acknowledged ({was})",
                        self.ledger.max_id
                    ));
                }
                self.ledger.max_id = self.ledger.max_id.max(id);
                self.ledger.live.insert(id, step);
            }
            (Some("delete-begin"), Some(id), _) => {
                *phase = Phase::Delete;
                self.ledger.pending_delete = Some(id);
            }
            (Some("delete"), Some(id), _) => {
                *phase = self.phase_after_ack();
                self.ledger.pending_delete = None;
                self.tally.deletes += 1;
                if w.get(2) == Some(&"compacted") {
                    self.tally.auto_compactions += 1;
                }
                if self.ledger.live.remove(&id).is_none() {
                    self.violation(format!(
                        "the writer deleted checkpoint {id}, which no acknowledgement created"
                    ));
                }
                self.ledger.deleted.insert(id);
            }
            (Some("compact-begin"), _, _) => *phase = Phase::Compaction,
            // The reorder fault's writer: its later save is durable, it waits for the kill.
            (Some("parked"), _, _) => {}
            (Some("compact"), _, _) => {
                *phase = self.phase_after_ack();
                self.tally.explicit_compactions += 1;
            }
            _ => self.violation(format!("unexpected line from the writer: {line:?}")),
        }
    }
}
