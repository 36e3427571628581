//! What a writer's recovery should have removed and did not: the check every crash test runs
//! after a recovery (the power-cut sweeps, `ckptstore crashtest`'s kill loop).

use super::files::{parse_wal_file_name, read_small, wal_file_name};
use super::{Store, SEGMENTS_DIR};
use crate::{current, manifest, segment};
use std::collections::BTreeSet;

impl Store {
    /// After a writer's recovery, the store's directory holds exactly what its live state
    /// needs: in `segments/`, the segment files live checkpoints reference or created (a
    /// trailer-only segment), all of them and nothing else; at the top, one WAL file, the one `CURRENT` names, and no temporary
    /// `CURRENT`. Returns one line per thing that is not so (empty: nothing was left behind).
    /// Read through the store's I/O seam, so it checks a simulated file system too.
    #[doc(hidden)]
    pub fn leftovers(&self) -> Vec<String> {
        let io = &*self.opts.io;
        let mut out = Vec::new();
        let referenced: BTreeSet<u64> = self
            .state
            .checkpoints
            .values()
            .flat_map(|m| {
                // A segment a live checkpoint created holds its commit trailer even when no
                // chunk reference names it (a commit that wrote no chunk): needed too.
                let created = m.new_segments.iter().map(|s| s.id);
                manifest::all_chunks(m)
                    .map(|c| c.segment)
                    .chain(created.filter(|id| self.state.segments.contains_key(id)))
            })
            .collect();
        let seg_dir = self.dir.join(SEGMENTS_DIR);
        let mut seg_names = io.list(&seg_dir).unwrap_or_default();
        seg_names.sort();
        let on_disk: BTreeSet<u64> = seg_names
            .iter()
            .filter_map(|n| segment::parse_file_name(n))
            .collect();
        let foreign: Vec<&String> = seg_names
            .iter()
            .filter(|n| segment::parse_file_name(n).is_none())
            .collect();
        if !foreign.is_empty() {
            out.push(format!(
                "after recovery, foreign file(s) {foreign:?} in segments/"
            ));
        }
        let orphans: Vec<String> = on_disk
            .difference(&referenced)
            .map(|&id| segment::file_name(id))
            .collect();
        if !orphans.is_empty() {
            out.push(format!(
                "after recovery, segment file(s) {orphans:?} are referenced by no live checkpoint"
            ));
        }
        let in_bucket: BTreeSet<u64> = self.segments_in_bucket().into_iter().collect();
        let missing: Vec<u64> = referenced
            .difference(&on_disk)
            .filter(|id| !in_bucket.contains(id))
            .copied()
            .collect();
        if !missing.is_empty() {
            out.push(format!(
                "after recovery, live checkpoints reference segment(s) {missing:?}, which are \
                 not on disk"
            ));
        }
        let mut top = io.list(&self.dir).unwrap_or_default();
        top.sort();
        let mut wals: Vec<u64> = top.iter().filter_map(|n| parse_wal_file_name(n)).collect();
        wals.sort_unstable();
        let current = read_small(
            io,
            &self.dir.join(current::CURRENT_NAME),
            super::recovery::MAX_CURRENT_LEN,
        )
        .ok()
        .and_then(|b| current::decode(&b).ok());
        match current {
            Some(n) if wals == [n] => {}
            Some(n) => out.push(format!(
                "after recovery, the store holds WAL file(s) {wals:?}; expected only {} (named \
                 by CURRENT)",
                wal_file_name(n)
            )),
            None => out.push("after recovery, CURRENT is missing or unreadable".into()),
        }
        if top.iter().any(|n| n == current::CURRENT_TMP_NAME) {
            out.push(format!(
                "after recovery, a stale {} is left",
                current::CURRENT_TMP_NAME
            ));
        }
        out
    }
}
