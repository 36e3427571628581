//! Invariant: under any sequence of puts, commits, aborts, deletes, pins and unpins,
//! keep-last retention runs, WAL compactions, segment compactions (gc), readers held open
//! across all of these, reopens,
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
        1 => (any::<u8>(), any::<bool>()).prop_map(|(pick, on)| Op::Pin { pick, on }),
        1 => any::<u8>().prop_map(|keep| Op::Retain { keep }),
    ]
}

/// [`op`] plus `Gc` (segment compaction) and a reader held open across operations (its lease
/// must keep what it saw readable through deletions, gc and reopens). A separate strategy, so
/// that the seeds kept for `store_matches_the_model` still generate the cases they were kept
/// for.
fn op_with_gc() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => op(),
        2 => Just(Op::Gc),
        1 => Just(Op::HoldReader),
        1 => Just(Op::ReleaseReader),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn store_with_segment_compaction_matches_the_model(
        ops in prop::collection::vec(op_with_gc(), 1..40)
    ) {
        model::run(&ops);
    }
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

/// Pins survive a WAL compaction followed by a power cut mid-commit (every crash mode), block
/// deletes and retention, and go away with an unpin.
#[test]
fn pin_then_compaction_then_crash() {
    let put = |name, seed| Op::Put {
        name,
        len: 5000,
        seed,
        float: false,
    };
    for mode in 0..5 {
        for within in 0..6 {
            model::run(&[
                put(0, 1),
                Op::Commit { step: 1 },
                put(0, 2),
                Op::Commit { step: 2 },
                put(1, 3),
                Op::Commit { step: 3 },
                Op::Pin { pick: 0, on: true },
                Op::Pin { pick: 1, on: true },
                Op::Pin { pick: 1, on: false },
                Op::Compact,
                put(2, 4),
                Op::Crash {
                    within,
                    mode,
                    seed: within,
                },
                Op::Delete { pick: 0 },
                Op::Retain { keep: 0 },
                Op::Reopen,
                Op::Pin { pick: 0, on: false },
                Op::Retain { keep: 0 },
                Op::Compact,
            ]);
        }
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
        Op::Pin { pick: 0, on: true },
        Op::Compact,
        Op::Retain { keep: 0 },
        Op::Delete { pick: 0 },
        Op::Crash {
            within: 2,
            mode: 2,
            seed: 9,
        },
        Op::Pin { pick: 0, on: false },
        Op::Retain { keep: 1 },
    ]);
}
