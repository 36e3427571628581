//! Invariant: under any sequence of puts, commits, aborts, deletes, WAL compactions, reopens,
//! read-only views and power cuts in the middle of a commit (any crash mode), the store lists exactly the checkpoints a reference model says are
//! live, every one reads back bit-exact, and `latest_valid()` is the newest. The model is
//! `tests/model/mod.rs`, shared with the cargo-fuzz target `store_ops` (fuzz/), which explores
//! the same space for longer; this test runs a bounded number of cases on every `cargo test`.

mod model;

use model::Op;
use proptest::prelude::*;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<u8>(), any::<u16>(), any::<u8>(), any::<bool>())
            .prop_map(|(name, len, seed, float)| Op::Put { name, len, seed, float }),
        4 => any::<u8>().prop_map(|step| Op::Commit { step }),
        1 => Just(Op::Abort),
        2 => any::<u8>().prop_map(|pick| Op::Delete { pick }),
        1 => Just(Op::Compact),
        1 => Just(Op::Reopen),
        1 => Just(Op::ReadOnlyView),
        1 => any::<u8>().prop_map(|pick| Op::Verify { pick }),
        1 => (any::<u8>(), any::<u8>(), any::<u8>())
            .prop_map(|(within, mode, seed)| Op::Crash { within, mode, seed }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2048,
        // A failure is shrunk to a short sequence; keep that bounded too.
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn store_matches_the_model(ops in prop::collection::vec(op(), 1..40)) {
        model::run(&ops);
    }
}

/// A fixed sequence that touches every operation, so a regression shows without luck.
#[test]
fn every_operation_once() {
    model::run(&[
        Op::Put {
            name: 0,
            len: 9000,
            seed: 1,
            float: false,
        },
        Op::Put {
            name: 1,
            len: 400,
            seed: 2,
            float: true,
        },
        Op::Put {
            name: 1,
            len: 4,
            seed: 3,
            float: false,
        },
        Op::Put {
            name: 2,
            len: 0,
            seed: 0,
            float: false,
        },
        Op::Commit { step: 1 },
        Op::Commit { step: 2 },
        Op::Put {
            name: 0,
            len: 9000,
            seed: 1,
            float: false,
        },
        Op::Commit { step: 3 },
        Op::Put {
            name: 5,
            len: 100,
            seed: 4,
            float: false,
        },
        Op::Abort,
        Op::ReadOnlyView,
        Op::Delete { pick: 0 },
        Op::Delete { pick: 4 },
        Op::Compact,
        Op::Verify { pick: 1 },
        Op::Reopen,
        Op::Delete { pick: 0 },
        Op::Delete { pick: 0 },
        Op::Commit { step: 4 },
        Op::Put {
            name: 3,
            len: 13000,
            seed: 5,
            float: true,
        },
        Op::Crash {
            within: 1,
            mode: 1,
            seed: 7,
        },
        Op::Crash {
            within: 5,
            mode: 4,
            seed: 8,
        },
    ]);
}
