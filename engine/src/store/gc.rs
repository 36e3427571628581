//! Garbage collection: `Store::gc` frees the segments readers no longer hold (`free.rs`) and
//! runs segment compaction (`compact.rs`); space statistics.

use super::compact::CompactionPlan;
use super::{lease, Store};
use crate::error::Result;
use crate::manifest;
use std::collections::HashSet;

/// Options of [`Store::gc_with`].
#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// Compact segments (store options `compact_live_fraction`, `max_space_amplification`).
    /// Default `true`; `false` only frees what readers no longer hold.
    pub compact: bool,
    /// Plan only: report what would be freed and compacted, change nothing. Default `false`.
    pub dry_run: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            compact: true,
            dry_run: false,
        }
    }
}

/// Space the live segments take against the live data they hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpaceStats {
    /// Live segment files.
    pub segments: usize,
    /// Their committed bytes (headers, frame headers, padding and dead chunks included).
    pub segment_bytes: u64,
    /// Stored bytes of the distinct chunks live checkpoints reference.
    pub live_bytes: u64,
    /// Bytes of segment files kept only for open readers (freed when they close).
    pub pending_bytes: u64,
}

impl SpaceStats {
    /// `segment_bytes / live_bytes` (1.0 for an empty store): the space amplification.
    pub fn amplification(&self) -> f64 {
        if self.live_bytes == 0 {
            1.0
        } else {
            self.segment_bytes as f64 / self.live_bytes as f64
        }
    }
}

/// What [`Store::gc`] did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GcReport {
    /// Nothing was changed.
    pub dry_run: bool,
    /// Segment files removed: compacted sources, and segments earlier deletions left to
    /// readers that have closed since.
    pub segments_freed: Vec<u64>,
    /// Their bytes.
    pub bytes_freed: u64,
    /// Segments whose live chunks were copied (compacted); part of `segments_freed` unless a
    /// reader still holds them.
    pub segments_compacted: Vec<u64>,
    /// New segments compaction wrote.
    pub segments_written: Vec<u64>,
    /// Their bytes.
    pub bytes_written: u64,
    /// Segments no live checkpoint references, still held by an open reader's lease.
    pub segments_pending: Vec<u64>,
    /// Their bytes.
    pub bytes_pending: u64,
    /// Live chunks compaction found not to match their BLAKE3: quarantined (see
    /// [`Store::heal`]) and left where they are, so their segments stay until a save heals
    /// them or their checkpoints are deleted. The rest of the plan compacted.
    pub corrupt_chunks: Vec<super::ChunkLocation>,
    /// Space before.
    pub before: SpaceStats,
    /// Space after (with `dry_run`: as planned).
    pub after: SpaceStats,
}

impl GcReport {
    /// Bytes of disk space given back: freed minus written (0 if compaction wrote more than
    /// it could free yet, because readers hold the sources).
    pub fn bytes_reclaimed(&self) -> u64 {
        self.bytes_freed.saturating_sub(self.bytes_written)
    }
}

impl Store {
    /// Segments no live checkpoint references that open readers still hold, with their
    /// bytes. They are freed by the first delete, [`Store::gc`] or open after the reader
    /// closes (or dies).
    pub fn pending_segments(&self) -> Vec<(u64, u64)> {
        self.pending_free.iter().map(|(&s, &l)| (s, l)).collect()
    }

    /// Live bytes against segment bytes (see [`SpaceStats::amplification`]).
    pub fn space(&self) -> SpaceStats {
        let mut seen = HashSet::new();
        let mut live_bytes = 0;
        for m in self.state.checkpoints.values() {
            for c in manifest::all_chunks(m) {
                if seen.insert((c.segment, c.offset)) {
                    live_bytes += c.stored_len;
                }
            }
        }
        SpaceStats {
            segments: self.state.segments.len(),
            segment_bytes: self.state.segments.values().map(|s| s.len).sum(),
            live_bytes,
            pending_bytes: self.pending_free.values().sum(),
        }
    }

    /// What compaction would do now (changes nothing; works on a read-only store).
    pub fn plan_compaction(&self) -> CompactionPlan {
        super::compact::plan(&self.state, &self.opts, &self.segments_in_bucket())
    }

    /// What compaction would do after checkpoints `deleting` were deleted (the dry run of a
    /// retention pass followed by gc). Changes nothing.
    pub fn plan_compaction_after(&self, deleting: &[u64]) -> CompactionPlan {
        let mut state = self.state.clone();
        for &id in deleting {
            state.apply_delete(id, super::commit_record_len);
        }
        super::compact::plan(&state, &self.opts, &self.segments_in_bucket())
    }

    /// Garbage collection with default [`GcOptions`]: frees segments whose readers have
    /// closed, then compacts mostly-dead segments. See [`Store::gc_with`].
    pub fn gc(&mut self) -> Result<GcReport> {
        self.gc_with(GcOptions::default(), |_, _| {})
    }

    /// Garbage collection: frees the segments earlier deletions left to readers that have
    /// closed (or died) since, then (unless `opts.compact` is off) compacts: the live chunks
    /// of every segment below the store's `compact_live_fraction`, and of the emptiest others
    /// while the segments would take more than `max_space_amplification` times the live bytes,
    /// are copied into new segments (fdatasync'ed, directory fsync'ed), a Relocate record is
    /// made durable, and the sources are freed — unless a reader holds them. A crash at any
    /// point leaves every live checkpoint readable (docs/GUARANTEES.md). `progress(done,
    /// total)` is called in bytes copied as compaction goes.
    pub fn gc_with(
        &mut self,
        opts: GcOptions,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<GcReport> {
        let before = self.space();
        let mut report = GcReport {
            dry_run: opts.dry_run,
            before,
            after: before,
            ..Default::default()
        };
        let plan = if opts.compact {
            self.plan_compaction()
        } else {
            CompactionPlan::default()
        };
        if opts.dry_run {
            let leases = lease::scan(&*self.opts.io, &self.dir, false);
            for (&s, &len) in &self.pending_free {
                if leases.holds(s) {
                    report.segments_pending.push(s);
                    report.bytes_pending += len;
                } else {
                    report.segments_freed.push(s);
                    report.bytes_freed += len;
                }
            }
            report.segments_compacted = plan.sources.clone();
            report.bytes_freed += plan.source_bytes;
            report.bytes_written = plan.output_bytes;
            report.after.segments = before.segments - plan.sources.len() + plan.outputs;
            report.after.segment_bytes =
                before.segment_bytes - plan.source_bytes + plan.output_bytes;
            return Ok(report);
        }
        self.check_writable()?;
        // What verified reads (a retention pass's, say) found bad is quarantined first, so
        // the plan leaves it alone.
        self.heal()?;
        let plan = if opts.compact {
            self.plan_compaction()
        } else {
            CompactionPlan::default()
        };
        let freed = self.free_segments([]);
        report.segments_freed = freed.freed;
        report.bytes_freed = freed.bytes_freed;
        if !plan.sources.is_empty() {
            let done = self.compact_segments(&plan, &mut progress)?;
            // A source holding a corrupt chunk keeps it, and so stays.
            report.segments_compacted = plan
                .sources
                .into_iter()
                .filter(|s| !done.corrupt.iter().any(|c| c.0 == *s))
                .collect();
            report.segments_written = done.written;
            report.bytes_written = done.bytes_written;
            report.segments_freed.extend(done.freed.freed);
            report.bytes_freed += done.freed.bytes_freed;
            report.corrupt_chunks = done.corrupt;
        }
        report.segments_pending = self.pending_free.keys().copied().collect();
        report.bytes_pending = self.pending_free.values().sum();
        report.after = self.space();
        Ok(report)
    }
}
