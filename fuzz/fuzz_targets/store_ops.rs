//! Structured operations (Put, Commit, Abort, Delete, Pin/unpin, keep-last retention, Compact, Gc, a reader held open across them, Reopen, a read-only view,
//! Verify, and a power cut in the middle of a commit) against a reference model, on the
//! power-loss simulator `SimIo`. The model and its checks live in
//! `tests/model/mod.rs`, shared with the proptest `tests/model_proptest.rs`.
//!
//! Invariants: no panic; the store lists exactly the model's checkpoints after every
//! operation; every checkpoint reads back bit-exact after every reopen; `latest_valid()` is
//! the newest one.
//! After a `Crash`, every acknowledged checkpoint is there and the one in flight is wholly
//! there or absent.
#![no_main]

#[path = "../../tests/model/mod.rs"]
mod model;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum FuzzOp {
    Put {
        name: u8,
        len: u16,
        seed: u8,
        float: bool,
    },
    Commit {
        step: u8,
    },
    Abort,
    Delete {
        pick: u8,
    },
    Compact,
    Reopen,
    ReadOnlyView,
    Verify {
        pick: u8,
    },
    Crash {
        within: u8,
        mode: u8,
        seed: u8,
    },
    Pin {
        pick: u8,
        on: bool,
    },
    Retain {
        keep: u8,
    },
    Gc,
    HoldReader,
    ReleaseReader,
}

impl From<&FuzzOp> for model::Op {
    fn from(op: &FuzzOp) -> Self {
        use model::Op;
        match *op {
            FuzzOp::Put {
                name,
                len,
                seed,
                float,
            } => Op::Put {
                name,
                len,
                seed,
                float,
            },
            FuzzOp::Commit { step } => Op::Commit { step },
            FuzzOp::Abort => Op::Abort,
            FuzzOp::Delete { pick } => Op::Delete { pick },
            FuzzOp::Compact => Op::Compact,
            FuzzOp::Reopen => Op::Reopen,
            FuzzOp::ReadOnlyView => Op::ReadOnlyView,
            FuzzOp::Verify { pick } => Op::Verify { pick },
            FuzzOp::Crash { within, mode, seed } => Op::Crash { within, mode, seed },
            FuzzOp::Pin { pick, on } => Op::Pin { pick, on },
            FuzzOp::Retain { keep } => Op::Retain { keep },
            FuzzOp::Gc => Op::Gc,
            FuzzOp::HoldReader => Op::HoldReader,
            FuzzOp::ReleaseReader => Op::ReleaseReader,
        }
    }
}

fuzz_target!(|ops: Vec<FuzzOp>| {
    // Bounded, so one input stays fast.
    let ops: Vec<model::Op> = ops.iter().take(64).map(Into::into).collect();
    model::run(&ops);
});
