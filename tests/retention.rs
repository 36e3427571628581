//! Retention and pins through the store: pins are durable (a reopen, a WAL compaction, a
//! power cut keep them), a pinned checkpoint cannot be deleted, `apply_retention` deletes
//! exactly what `plan_retention` says, oldest first, frees what it predicted, and a power cut
//! at any sync of it leaves every kept checkpoint intact and an oldest-first prefix deleted.

mod support;

use ckptstore::io::{CrashMode, SimIo};
use ckptstore::{
    Error, MetaValue, MetricMode, Options, RecoveryMode, RetentionPolicy, Selector, Store,
};
use std::sync::Arc;
use support::{commit, data, opts};

fn sim_opts(sim: &SimIo) -> Options {
    Options {
        io: Arc::new(sim.clone()),
        wal_compact_min_bytes: 4096,
        ..opts()
    }
}

/// Six checkpoints at steps 10..=60, each with its own tensor and a shared frozen one, and a
/// `loss` metric.
fn six(s: &mut Store) {
    let frozen = data(1, 9000);
    for i in 1..=6u64 {
        let mine = data(100 + i, 5000);
        let mut t = s.begin(i * 10).unwrap();
        t.set_metadata("loss", [0.9, 0.2, 0.5, 0.1, 0.7, 0.8][i as usize - 1]);
        t.put_tensor("frozen", ckptstore::DType::U8, &[9000], &frozen)
            .unwrap();
        t.put_tensor("w", ckptstore::DType::U8, &[5000], &mine)
            .unwrap();
        t.commit().unwrap();
    }
}

fn ids(s: &Store) -> Vec<u64> {
    s.list().iter().map(|c| c.id).collect()
}

#[test]
fn pins_survive_reopen_and_compaction_and_block_delete() {
    let d = tempfile::tempdir().unwrap();
    let mut s = Store::open(d.path(), opts()).unwrap();
    six(&mut s);
    assert!(s.pin(2).unwrap());
    assert!(!s.pin(2).unwrap(), "pinning twice writes nothing");
    assert!(s.pin(3).unwrap());
    assert!(s.unpin(3).unwrap());
    assert!(!s.unpin(3).unwrap());
    assert!(matches!(s.pin(99), Err(Error::NotFound(_))));
    match s.delete(2) {
        Err(Error::Pinned { id: 2 }) => {}
        other => panic!("delete of a pinned checkpoint: {other:?}"),
    }
    assert!(s.info(Selector::Id(2)).unwrap().pinned);
    assert!(!s.info(Selector::Id(3)).unwrap().pinned);
    drop(s);

    let ro = Store::open(d.path(), Options::read_only()).unwrap();
    assert_eq!(ro.pinned(), vec![2]);
    drop(ro);
    let mut s = Store::open(d.path(), opts()).unwrap();
    assert_eq!(s.pinned(), vec![2]);
    s.compact_wal().unwrap();
    drop(s);
    let mut s = Store::open(d.path(), opts()).unwrap();
    assert_eq!(s.pinned(), vec![2], "pins survive WAL compaction");
    assert_eq!(
        s.list()
            .iter()
            .filter(|c| c.pinned)
            .map(|c| c.id)
            .collect::<Vec<_>>(),
        vec![2]
    );
    assert!(matches!(s.delete(2), Err(Error::Pinned { id: 2 })));
    s.unpin(2).unwrap();
    s.compact_wal().unwrap();
    s.delete(2).unwrap();
    drop(s);
    let s = Store::open(d.path(), opts()).unwrap();
    assert!(s.pinned().is_empty());
    assert_eq!(ids(&s), vec![1, 3, 4, 5, 6]);
}

#[test]
fn apply_retention_does_what_the_plan_says() {
    let d = tempfile::tempdir().unwrap();
    let mut s = Store::open(d.path(), opts()).unwrap();
    six(&mut s);
    s.pin(1).unwrap();
    let policy = RetentionPolicy::new()
        .keep_last(1)
        .keep_best(1, "loss", MetricMode::Min);
    let plan = s.plan_retention(&policy).unwrap();
    let keep: Vec<u64> = plan.keep.iter().map(|k| k.info.id).collect();
    let del: Vec<u64> = plan.delete.iter().map(|c| c.id).collect();
    // Pinned 1, best loss 0.1 is id 4, newest 6.
    assert_eq!(keep, vec![1, 4, 6]);
    assert_eq!(del, vec![2, 3, 5]);
    assert_eq!(plan.segments_freed.len(), 3, "{plan:?}");
    assert!(plan.bytes_freed >= 3 * 5000);
    assert_eq!(ids(&s).len(), 6, "planning changes nothing");

    let before = s.stats().segment_bytes;
    let mut seen = Vec::new();
    let done = s
        .apply_retention_with(&policy, |n, total| seen.push((n, total)))
        .unwrap();
    assert_eq!(seen, vec![(1, 3), (2, 3), (3, 3)]);
    assert_eq!(done.iter().map(|d| d.id).collect::<Vec<_>>(), del);
    let freed: u64 = done.iter().map(|d| d.bytes_freed).sum();
    assert_eq!(freed, plan.bytes_freed);
    assert_eq!(before - s.stats().segment_bytes, freed);
    assert_eq!(ids(&s), keep);
    for id in keep {
        s.verify(id).unwrap();
    }
    // Applying it again deletes nothing.
    assert!(s.apply_retention(&policy).unwrap().is_empty());
    // A read-only store plans but cannot apply.
    drop(s);
    let mut ro = Store::open(d.path(), Options::read_only()).unwrap();
    assert!(ro.plan_retention(&policy).unwrap().delete.is_empty());
    assert!(matches!(
        ro.apply_retention(&RetentionPolicy::new().keep_last(1)),
        Err(Error::ReadOnly { .. })
    ));
    // An empty policy is refused.
    assert!(matches!(
        ro.plan_retention(&RetentionPolicy::new()),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn metadata_metric_of_ints_and_floats() {
    let d = tempfile::tempdir().unwrap();
    let mut s = Store::open(d.path(), opts()).unwrap();
    for (step, v) in [
        (1u64, MetaValue::Int(3)),
        (2, MetaValue::Float(2.5)),
        (3, MetaValue::Str("1".into())),
        (4, MetaValue::Int(7)),
    ] {
        let mut t = s.begin(step).unwrap();
        t.set_metadata("acc", v);
        t.commit().unwrap();
    }
    let p = RetentionPolicy::new().keep_best(1, "acc", MetricMode::Max);
    s.apply_retention(&p).unwrap();
    assert_eq!(ids(&s), vec![4]);
    commit(&mut s, 5, &[]);
    s.apply_retention(&RetentionPolicy::new().keep_best(1, "acc", MetricMode::Max))
        .unwrap();
    assert_eq!(ids(&s), vec![4, 5]);
}

/// A power cut at every sync of a retention run (and of the pin before it), in every crash
/// mode: the store opens, every checkpoint the plan keeps is there and verifies, the pin holds,
/// and what is gone is an oldest-first prefix of the plan's deletions.
#[test]
fn power_cut_during_retention() {
    let policy = RetentionPolicy::new().keep_every_steps(20);
    let base = SimIo::new();
    {
        let mut s = Store::open("/r", sim_opts(&base)).unwrap();
        six(&mut s);
    }
    let mut cases = 0;
    for crash_at in 1..=12u64 {
        for mode in CrashMode::ALL {
            let sim = base.crash_image(CrashMode::ALL[0], 0);
            let mut s = Store::open("/r", sim_opts(&sim)).unwrap();
            sim.crash_at_sync(sim.sync_count() + crash_at);
            let pinned = s.pin(1).is_ok();
            let applied = pinned && s.apply_retention(&policy).is_ok();
            drop(s);
            let image = sim.crash_image(mode, crash_at);
            let s = Store::open("/r", sim_opts(&image))
                .unwrap_or_else(|e| panic!("open after a cut at sync {crash_at} ({mode}): {e}"));
            let live = ids(&s);
            let keep = [2, 4, 6];
            for id in keep {
                assert!(
                    live.contains(&id),
                    "kept {id} lost: {live:?} ({mode}, {crash_at})"
                );
                s.verify(id).unwrap();
            }
            if pinned {
                assert_eq!(
                    s.pinned(),
                    vec![1],
                    "acknowledged pin lost ({mode}, {crash_at})"
                );
            }
            let gone: Vec<u64> = [1, 3, 5]
                .into_iter()
                .filter(|i| !live.contains(i))
                .collect();
            let plan_order = if s.pinned() == vec![1] {
                vec![3, 5]
            } else {
                vec![1, 3, 5]
            };
            assert_eq!(
                gone[..],
                plan_order[..gone.len()],
                "{mode} {crash_at}: {live:?}"
            );
            if applied {
                assert_eq!(live, vec![1, 2, 4, 6]);
            }
            assert!(s.recovery_report().damaged_segments.is_empty());
            drop(s);
            // Strict reopen: nothing left to repair.
            let mut o = sim_opts(&image);
            o.recovery_mode = RecoveryMode::AbsoluteConsistency;
            Store::open("/r", o).unwrap();
            cases += 1;
        }
    }
    assert!(cases > 0);
}

/// Issue 14, item 5: retention kept the newest checkpoint by id even when it was damaged, so
/// `keep_last = 1` deleted the last intact one. Now the newest that verifies is kept too.
#[test]
fn keep_last_one_never_deletes_the_last_intact_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), opts()).unwrap();
    for step in 1..=3u64 {
        commit(&mut s, step, &[("w", &data(step, 3 * support::CHUNK))]);
    }
    // Rot one chunk of the newest checkpoint (3) on disk.
    let (seg, off) = support::chunk_location(&s, 3, "w", 1);
    drop(s);
    let path = support::segment_path(dir.path(), seg);
    let mut b = std::fs::read(&path).unwrap();
    b[off as usize + 7] ^= 0x20;
    std::fs::write(&path, b).unwrap();

    let mut s = Store::open(dir.path(), opts()).unwrap();
    let policy = RetentionPolicy::new().keep_last(1);
    let plan = s.plan_retention(&policy).unwrap();
    let kept: Vec<(u64, Vec<&str>)> = plan
        .keep
        .iter()
        .map(|k| (k.info.id, k.reasons.iter().map(|r| r.kind()).collect()))
        .collect();
    assert_eq!(
        kept,
        vec![(2, vec!["newest-intact"]), (3, vec!["newest", "keep-last"])]
    );
    assert_eq!(
        plan.delete.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![1]
    );
    s.apply_retention(&policy).unwrap();
    assert_eq!(ids(&s), vec![2, 3]);
    s.verify(2).unwrap();
    // With an intact newest, nothing extra is kept.
    commit(&mut s, 4, &[("w", &data(4, 3 * support::CHUNK))]);
    s.apply_retention(&policy).unwrap();
    assert_eq!(ids(&s), vec![4]);
}
