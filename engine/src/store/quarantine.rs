//! Quarantine and self-healing (docs/GUARANTEES.md, "Bad chunks: quarantine and healing").
//!
//! A verified read that finds a chunk whose bytes do not match its BLAKE3 (or whose frame does
//! not decode) notes it as a suspect. Reads take `&Store`, so they cannot append to the WAL:
//! the writer records its suspects durably — one Quarantine record (type 6), through
//! [`Store::heal`] — before the next transaction begins, at the start of `gc` and in
//! `scrub`. From then on deduplication never references the chunk, so the next save holding
//! the same bytes writes a fresh copy, and the same kind of record, appended right after that
//! commit, repoints every live reference at the copy: the checkpoints that used the bad chunk
//! verify again. A read-only store keeps its suspects in memory and reports them through its
//! errors; the next writer's verified read or `scrub` records them.
//!
//! Crash safety: the record is the only durable effect, appended and fdatasync'ed in one
//! piece. A crash before it loses only the note (the next verified read finds the chunk
//! again); a crash between a commit and its heal leaves the heal to the next writer open,
//! which heals whatever a live copy can heal. Segments a heal leaves unreferenced are freed
//! after the record, as after a deletion (orphans, set aside, at the next open if a crash
//! comes first).

use super::Store;
use crate::error::{Error, Result};
use crate::features;
use crate::wal::{self, RecordType};
use ckptstore_proto::v1 as pb;
use prost::Message;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// Chunks reads found bad and the writer has not recorded yet, by (segment, offset).
#[derive(Debug, Default)]
pub(crate) struct Suspects(Mutex<BTreeMap<(u64, u64), pb::ChunkRef>>);

impl Suspects {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(u64, u64), pb::ChunkRef>> {
        // One insert or one take at a time: a panic cannot leave the map half changed.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A chunk location: segment and offset of its stored bytes.
pub type ChunkLocation = (u64, u64);

/// What [`Store::heal`] recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealReport {
    /// Chunks quarantined by this call (found bad by reads since the last one).
    pub quarantined: Vec<ChunkLocation>,
    /// Quarantined chunks whose references now point at a fresh copy: (bad, copy).
    pub healed: Vec<(ChunkLocation, ChunkLocation)>,
    /// Quarantined chunks live checkpoints still reference, no copy of their bytes being
    /// stored yet, with those checkpoints' ids: healed by the next save that holds the bytes.
    pub unhealed: Vec<(ChunkLocation, Vec<u64>)>,
}

impl HealReport {
    /// Checkpoints left broken by a quarantined chunk no save has healed yet, ascending.
    pub fn broken_checkpoints(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.unhealed.iter().flat_map(|(_, c)| c.clone()).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

impl Store {
    /// Notes chunk `c` as found bad by a verified read (recorded by the next [`Store::heal`]).
    /// A chunk of a segment fetched from the bucket (a lazy restore's cache) is not suspected:
    /// the cache file is dropped instead, and the next read fetches the bucket's copy again.
    pub(crate) fn suspect(&self, c: &pb::ChunkRef) {
        if let Some(lazy) = self.lazy.as_ref().filter(|l| l.came_from_bucket(c.segment)) {
            self.open_segments().remove(&c.segment);
            lazy.evict(
                &*self.opts.io,
                &self.dir.join(super::SEGMENTS_DIR),
                c.segment,
            );
            return;
        }
        self.suspects
            .lock()
            .entry((c.segment, c.offset))
            .or_insert_with(|| c.clone());
    }

    /// Chunks in quarantine, by location (what the WAL recorded, healed ones excepted).
    pub fn quarantined(&self) -> Vec<ChunkLocation> {
        self.state.quarantined.keys().copied().collect()
    }

    /// Records durably (one Quarantine WAL record, fdatasync'ed) the chunks verified reads of
    /// this store found bad, and repoints every live reference to a quarantined chunk whose
    /// bytes a later save stored again at that copy. Runs by itself before each transaction,
    /// after each commit, at a writer's open, in `gc` and in `scrub`; a no-op (nothing
    /// written) when there is nothing to record. A read-only store records nothing (it keeps
    /// what it found for its own errors) and reports the unhealed chunks only.
    pub fn heal(&mut self) -> Result<HealReport> {
        if self.wal.is_none() {
            return Ok(self.heal_report(Vec::new(), Vec::new()));
        }
        self.check_writable()?;
        let mut suspects: Vec<pb::ChunkRef> = std::mem::take(&mut *self.suspects.lock())
            .into_values()
            .filter(|c| {
                self.state.segments.contains_key(&c.segment)
                    && !self.state.quarantined.contains_key(&(c.segment, c.offset))
            })
            .collect();
        let (mut quarantined, mut healed) = (Vec::new(), Vec::new());
        // Twice at most: quarantining may point deduplication at another stored copy of the
        // bytes (state.rs, `retarget_index_off_quarantine`), which the second round heals with.
        for _ in 0..2 {
            let heals = self.state.heals(&suspects);
            if suspects.is_empty() && heals.is_empty() {
                break;
            }
            let record = pb::QuarantineRecord {
                bad: std::mem::take(&mut suspects),
                healed: heals,
            };
            self.append_and_apply_quarantine(&record)?;
            quarantined.extend(record.bad.iter().map(|c| (c.segment, c.offset)));
            healed.extend(record.healed.iter().filter_map(|h| {
                let to = h.to.as_ref()?;
                Some(((h.from_segment, h.from_offset), (to.segment, to.offset)))
            }));
        }
        Ok(self.heal_report(quarantined, healed))
    }

    /// Appends `record` durably, applies it, frees the segments it leaves unreferenced.
    fn append_and_apply_quarantine(&mut self, record: &pb::QuarantineRecord) -> Result<()> {
        let payload = record.encode_to_vec();
        if payload.len() > wal::MAX_RECORD_LEN as usize {
            return Err(Error::invalid("quarantine record above the WAL record cap"));
        }
        let lens: BTreeMap<u64, u64> = self
            .state
            .segments
            .iter()
            .map(|(&k, s)| (k, s.len))
            .collect();
        if let Err(e) = self.append_quarantine(&payload) {
            return Err(self.poison(e));
        }
        let dead = match self
            .state
            .apply_quarantine(record, super::commit_record_len, "quarantine")
        {
            Ok(dead) => dead,
            // Unreachable: built from this state. Should it happen, the durable record and the
            // memory disagree: refuse further writes.
            Err(e) => return Err(self.poison(e)),
        };
        let dead = dead
            .into_iter()
            .map(|s| (s, lens.get(&s).copied().unwrap_or(0)));
        self.free_segments(dead);
        Ok(())
    }

    fn heal_report(
        &self,
        quarantined: Vec<ChunkLocation>,
        healed: Vec<(ChunkLocation, ChunkLocation)>,
    ) -> HealReport {
        HealReport {
            quarantined,
            healed,
            unhealed: self
                .state
                .unhealed()
                .into_iter()
                .map(|(loc, (_, ids))| (loc, ids))
                .collect(),
        }
    }

    /// [`Store::heal`] after a write that is already durable: a failure poisons the store
    /// (the next write reports it) but does not fail that write.
    pub(crate) fn heal_after_durable_write(&mut self) {
        if let Err(e) = self.heal() {
            self.poison(e);
        }
    }

    /// Appends a Quarantine record: the one place the WAL gets one, and so where the format
    /// feature it needs ([`features::QUARANTINE`]) is turned on first — at the store's first
    /// quarantine, so a store that never had a bad chunk stays readable by older builds.
    fn append_quarantine(&mut self, payload: &[u8]) -> Result<u64> {
        self.enable_feature(&features::QUARANTINE)?;
        self.wal_mut()?
            .append_durable(RecordType::Quarantine, payload)
    }
}

/// What [`Store::scrub`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Live checkpoints checked.
    pub checkpoints: usize,
    /// Stored bytes read (each distinct chunk once).
    pub bytes_read: u64,
    /// What was quarantined, healed, and is left unhealed (see [`Store::heal`]).
    pub heal: HealReport,
    /// Checkpoints that still fail verification after the heal, oldest first, with the
    /// first error of each: a quarantined chunk no save has stored again, a missing segment.
    pub broken: Vec<(u64, String)>,
}

impl Store {
    /// Verifies every chunk of every live checkpoint (each distinct chunk once, going on past
    /// bad ones), quarantines those that do not match their BLAKE3, heals every checkpoint a
    /// stored copy of the bytes can heal ([`Store::heal`]), and reports which checkpoints stay
    /// broken. On a read-only store it records nothing and reports the same.
    pub fn scrub(&mut self) -> Result<ScrubReport> {
        let mut seen = super::VerifiedChunks::default();
        let mut bad = super::VerifiedChunks::default();
        let mut report = ScrubReport {
            checkpoints: self.state.checkpoints.len(),
            ..Default::default()
        };
        let manifests: Vec<_> = self.state.checkpoints.values().cloned().collect();
        for m in manifests {
            // A sealed checkpoint whose key was not supplied cannot be read: the verification
            // below reports it broken, naming the key.
            let Ok(reader) = super::CheckpointReader::new(self, m) else {
                continue;
            };
            let (read, _) = reader.scrub_with(&mut seen, &mut bad);
            report.bytes_read += read;
        }
        report.heal = self.heal()?;
        // Healed checkpoints now reference copies `seen` holds as intact (a live checkpoint
        // references each): only the bad chunks are read again.
        let ids: Vec<u64> = self.state.checkpoints.keys().copied().collect();
        for id in ids {
            if let Err(e) = self.verify_with(id, &mut seen) {
                report.broken.push((id, e.to_string()));
            }
        }
        Ok(report)
    }
}
