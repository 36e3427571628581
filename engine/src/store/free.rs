//! Freeing segments, the one place that unlinks segment files no live checkpoint references
//! (after a delete or a compaction, and in `gc`): each is unlinked unless a reader's lease
//! holds it; then it waits, in memory, for the next delete, `gc` or open.

use super::{lease, Store, SEGMENTS_DIR};
use crate::segment;

/// What freeing a set of dead segments did.
#[derive(Debug, Default)]
pub(crate) struct Freed {
    pub freed: Vec<u64>,
    pub bytes_freed: u64,
    pub pending: Vec<u64>,
}

impl Store {
    /// Adds `dead` (segment id, bytes) to the segments waiting to be freed, then unlinks every
    /// waiting segment no live reader's lease holds. Called after the WAL record that made
    /// them dead is durable.
    pub(super) fn free_segments(&mut self, dead: impl IntoIterator<Item = (u64, u64)>) -> Freed {
        for (s, len) in dead {
            self.open_segments().remove(&s);
            if let Some(l) = &self.lazy {
                l.forget(s);
            }
            self.pending_free.insert(s, len);
        }
        let mut out = Freed::default();
        if self.pending_free.is_empty() {
            return out;
        }
        let io = self.opts.io.clone();
        let leases = lease::scan(&*io, &self.dir, true);
        let seg_dir = self.dir.join(SEGMENTS_DIR);
        let waiting = std::mem::take(&mut self.pending_free);
        for (s, len) in waiting {
            if leases.holds(s) {
                out.pending.push(s);
                self.pending_free.insert(s, len);
                continue;
            }
            // The record is durable: a failed unlink only leaves an orphan that the next
            // recovery removes.
            if io.remove_file(&seg_dir.join(segment::file_name(s))).is_ok() {
                out.bytes_freed += len;
            }
            out.freed.push(s);
        }
        out
    }
}
