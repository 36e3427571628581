//! Fault injection: EIO on the n-th call of a kind, ENOSPC after a byte budget, short
//! writes, and the crash armed at the n-th sync (see the module docs of `sim`).

use super::SimIo;

/// Kinds of calls a [`Fault::Eio`] can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// `write_at`, `set_len`, `allocate`.
    Write,
    /// `read_at`.
    Read,
    /// `sync_data`, `sync_all`, `sync_dir`.
    Sync,
    /// `create_new`, `create_dir_all` (when it creates), `try_lock` (when it creates).
    Create,
    /// `rename`.
    Rename,
    /// `remove_file`.
    Remove,
}

/// An injectable fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The `nth` call (1 = the next) of `kind` from now fails with EIO, once. A failed file
    /// sync drops the file's unsynced writes from the durable path.
    Eio {
        /// Which calls count.
        kind: OpKind,
        /// Which of them fails.
        nth: u64,
    },
    /// Once `bytes` more bytes have been written, writes fail with ENOSPC (the write that
    /// crosses the line writes what fits first) until [`SimIo::clear_faults`].
    Enospc {
        /// The byte budget.
        bytes: u64,
    },
    /// The `nth` `write_at` from now writes only its first `keep` bytes, then fails with EIO.
    ShortWrite {
        /// Which write.
        nth: u64,
        /// How many bytes it writes.
        keep: usize,
    },
}

pub(super) const ENOSPC: i32 = 28;

#[derive(Debug, Clone, Copy)]
pub(super) struct Countdown {
    pub(super) kind: OpKind,
    pub(super) left: u64,
}

impl SimIo {
    /// Arms a fault.
    pub fn inject(&self, fault: Fault) {
        let mut fs = self.lock();
        match fault {
            Fault::Eio { kind, nth } => fs.eio.push(Countdown {
                kind,
                left: nth.max(1),
            }),
            Fault::Enospc { bytes } => fs.enospc_left = Some(bytes),
            Fault::ShortWrite { nth, keep } => fs.short_write = Some((nth.max(1), keep)),
        }
    }

    /// Disarms every fault (not an armed or happened crash).
    pub fn clear_faults(&self) {
        let mut fs = self.lock();
        fs.eio.clear();
        fs.enospc_left = None;
        fs.short_write = None;
    }
}
