//! Unit tests of the power-loss simulator.

use super::faults::ENOSPC;
use super::*;
use crate::io::Storage;
use std::collections::BTreeSet;

const SEEDS: u64 = 200;

fn p(s: &str) -> &Path {
    Path::new(s)
}

/// `/d` durable, holding `f` with `synced` synced and then `unsynced` appended.
fn one_file(synced: &[u8], unsynced: &[&[u8]]) -> SimIo {
    let sim = SimIo::new();
    sim.create_dir_all(p("/d")).unwrap();
    sim.sync_dir(p("/")).unwrap();
    let f = sim.create_new(p("/d/f")).unwrap();
    f.write_at(synced, 0).unwrap();
    f.sync_data().unwrap();
    sim.sync_dir(p("/d")).unwrap();
    let mut at = synced.len() as u64;
    for w in unsynced {
        f.write_at(w, at).unwrap();
        at += w.len() as u64;
    }
    sim
}

fn image(sim: &SimIo, mode: CrashMode, seed: u64) -> Option<Vec<u8>> {
    sim.crash_image(mode, seed).read_file(p("/d/f"))
}

#[test]
fn drop_unsynced_keeps_only_synced_data_and_entries() {
    let sim = one_file(b"durable", &[b"lost", b"lost too"]);
    let g = sim.create_new(p("/d/g")).unwrap();
    g.write_at(b"synced data, unsynced entry", 0).unwrap();
    g.sync_data().unwrap();
    for seed in 0..SEEDS {
        let img = sim.crash_image(CrashMode::DropUnsynced, seed);
        assert_eq!(img.read_file(p("/d/f")).unwrap(), b"durable");
        assert_eq!(img.read_file(p("/d/g")), None);
        assert_eq!(img.list_dir(p("/d")).unwrap(), vec!["f"]);
    }
    // The image is all durable: a second cut changes nothing.
    let img = sim.crash_image(CrashMode::TornPrefix, 1);
    assert_eq!(
        img.crash_image(CrashMode::Garbage, 2).read_file(p("/d/f")),
        img.read_file(p("/d/f"))
    );
}

#[test]
fn torn_prefix_keeps_a_prefix_cut_at_a_byte() {
    let full = b"durable|first write|second write".to_vec();
    let sim = one_file(&full[..8], &[&full[8..20], &full[20..]]);
    let mut lens = BTreeSet::new();
    for seed in 0..SEEDS {
        let got = image(&sim, CrashMode::TornPrefix, seed).unwrap();
        assert!(
            got.len() >= 8 && full.starts_with(&got),
            "seed {seed}: {got:?}"
        );
        lens.insert(got.len());
    }
    // Nothing, everything, and cuts inside each write all happen.
    assert!(lens.contains(&8) && lens.contains(&full.len()), "{lens:?}");
    assert!(lens.iter().any(|&l| l > 8 && l < 20), "{lens:?}");
    assert!(lens.iter().any(|&l| l > 20 && l < full.len()), "{lens:?}");
}

#[test]
fn garbage_only_in_sectors_of_unsynced_bytes() {
    // Sector 0 is synced up to byte 100; the unsynced append shares it, then fills
    // sectors 1 and 2.
    let synced = vec![7u8; 100];
    let new = vec![9u8; 1300];
    let sim = one_file(&synced, &[&new]);
    let mut full = synced.clone();
    full.extend_from_slice(&new);
    let (mut garbage, mut old, mut fresh) = (false, false, false);
    for seed in 0..SEEDS {
        let got = image(&sim, CrashMode::Garbage, seed).unwrap();
        assert_eq!(got.len(), full.len());
        assert_eq!(
            &got[..100],
            &synced[..],
            "seed {seed}: synced bytes touched"
        );
        let s0 = &got[100..512];
        assert!(
            s0 == &full[100..512] || s0.iter().all(|&b| b == 0),
            "seed {seed}"
        );
        for s in 1..3 {
            let sec = &got[s * 512..((s + 1) * 512).min(full.len())];
            if sec.iter().all(|&b| b == 9) {
                fresh = true;
            } else if sec.iter().all(|&b| b == 0) {
                old = true;
            } else {
                garbage = true;
            }
        }
    }
    assert!(garbage && old && fresh);
}

#[test]
fn lose_dir_entries_models_inodes() {
    let sim = SimIo::new();
    sim.create_dir_all(p("/d")).unwrap();
    sim.sync_dir(p("/")).unwrap();
    for name in ["a", "kept", "gone"] {
        let f = sim.create_new(&Path::new("/d").join(name)).unwrap();
        f.write_at(name.as_bytes(), 0).unwrap();
        f.sync_data().unwrap();
    }
    sim.sync_dir(p("/d")).unwrap();
    // Renamed (synced data), replaced, unlinked and created: none of it synced.
    sim.rename(p("/d/a"), p("/d/b")).unwrap();
    let tmp = sim.create_new(p("/d/tmp")).unwrap();
    tmp.write_at(b"new kept", 0).unwrap();
    tmp.sync_data().unwrap();
    sim.rename(p("/d/tmp"), p("/d/kept")).unwrap();
    sim.remove_file(p("/d/gone")).unwrap();
    let n = sim.create_new(p("/d/new")).unwrap();
    n.write_at(b"x", 0).unwrap();
    n.sync_data().unwrap();
    let f = sim.open(p("/d/kept"), true).unwrap();
    f.write_at(b"!", 8).unwrap();
    let (mut synced_only, mut in_full) = (false, false);
    for seed in 0..SEEDS {
        let img = sim.crash_image(CrashMode::LoseDirEntries, seed);
        assert_eq!(img.list_dir(p("/d")).unwrap(), vec!["a", "gone", "kept"]);
        assert_eq!(img.read_file(p("/d/a")).unwrap(), b"a");
        assert_eq!(img.read_file(p("/d/gone")).unwrap(), b"gone");
        assert_eq!(img.read_file(p("/d/kept")).unwrap(), b"kept");
    }
    // Once the rename is durable, the data written after the file's sync ("!" and "?")
    // is kept or lost, per file.
    sim.sync_dir(p("/d")).unwrap();
    f.write_at(b"?", 9).unwrap();
    for seed in 0..SEEDS {
        let got = image_of(&sim, "/d/kept", seed);
        match got.as_slice() {
            b"new kept" => synced_only = true,
            b"new kept!?" => in_full = true,
            other => panic!("seed {seed}: {other:?}"),
        }
    }
    assert!(synced_only && in_full);

    fn image_of(sim: &SimIo, path: &str, seed: u64) -> Vec<u8> {
        sim.crash_image(CrashMode::LoseDirEntries, seed)
            .read_file(Path::new(path))
            .unwrap()
    }
}

#[test]
fn data_modes_keep_a_subset_of_directory_operations() {
    let sim = SimIo::new();
    sim.create_dir_all(p("/d")).unwrap();
    sim.sync_dir(p("/")).unwrap();
    sim.create_new(p("/d/1")).unwrap();
    sim.create_new(p("/d/2")).unwrap();
    sim.rename(p("/d/1"), p("/d/3")).unwrap();
    // Any subset of {create 1, create 2, rename 1 -> 3}, each atomic.
    let allowed: [&[&str]; 6] = [&[], &["1"], &["2"], &["3"], &["1", "2"], &["2", "3"]];
    let mut seen = BTreeSet::new();
    for mode in [
        CrashMode::TornPrefix,
        CrashMode::Garbage,
        CrashMode::Reorder,
    ] {
        for seed in 0..SEEDS {
            let names = sim.crash_image(mode, seed).list_dir(p("/d")).unwrap();
            let i = allowed.iter().position(|a| *a == names).expect("a subset");
            seen.insert(i);
        }
    }
    assert_eq!(seen.len(), 6);
    // The directory itself was made durable; a new unsynced one may vanish whole.
    sim.create_dir_all(p("/d/sub/x")).unwrap();
    let img = sim.crash_image(CrashMode::DropUnsynced, 0);
    assert_eq!(img.list_dir(p("/d/sub")), None);
    assert!(!img.exists(p("/d/sub/x")).unwrap());
}

#[test]
fn reorder_applies_a_subset_of_sector_writes_in_any_order() {
    // Two unsynced writes to the same sector and one to a later sector.
    let sim = one_file(&[1u8; 512], &[]);
    let f = sim.open(p("/d/f"), true).unwrap();
    f.write_at(&[2u8; 512], 512).unwrap();
    f.write_at(&[3u8; 512], 512).unwrap();
    f.write_at(&[4u8; 512], 1024).unwrap();
    let mut outcomes = BTreeSet::new();
    for seed in 0..SEEDS {
        let got = image(&sim, CrashMode::Reorder, seed).unwrap();
        assert_eq!(&got[..512], &[1u8; 512]);
        let s1 = got.get(512..1024).map(|s| s[0]).unwrap_or(0);
        let s2 = got.get(1024..1536).map(|s| s[0]).unwrap_or(0);
        outcomes.insert((s1, s2));
    }
    // The older value of sector 1 can win, and sector 2 can land without sector 1.
    assert!(
        outcomes.contains(&(2, 0)) && outcomes.contains(&(2, 4)),
        "{outcomes:?}"
    );
    assert!(
        outcomes.contains(&(0, 4)) && outcomes.contains(&(3, 4)),
        "{outcomes:?}"
    );
}

#[test]
fn same_seed_same_image() {
    let sim = one_file(b"abc", &[&[5u8; 3000], &[6u8; 700]]);
    for mode in CrashMode::ALL {
        let images: BTreeSet<Vec<u8>> = (0..20).map(|s| image(&sim, mode, s).unwrap()).collect();
        assert_eq!(image(&sim, mode, 7), image(&sim, mode, 7), "{mode}");
        if mode != CrashMode::DropUnsynced {
            assert!(images.len() > 1, "{mode}: every seed gave the same image");
        }
    }
}

#[test]
fn crash_at_the_nth_sync_freezes_everything_before_it() {
    let sim = SimIo::new();
    sim.crash_at_sync(3);
    sim.create_dir_all(p("/d")).unwrap();
    sim.sync_dir(p("/")).unwrap(); // 1
    let f = sim.create_new(p("/d/f")).unwrap();
    f.write_at(b"one", 0).unwrap();
    f.sync_data().unwrap(); // 2
    f.write_at(b"two", 3).unwrap();
    assert!(f.sync_data().is_err()); // 3: does not happen
    assert!(sim.crashed().unwrap().contains("sync #3: sync_data /d/f"));
    assert!(f.write_at(b"x", 6).is_err());
    assert!(f.read_at(&mut [0u8; 1], 0).is_err());
    assert!(sim.list(p("/d")).is_err());
    assert!(sim.sync_dir(p("/d")).is_err());
    assert_eq!(sim.sync_count(), 3);
    // The entry of f was never synced; its data was.
    for mode in CrashMode::ALL {
        for seed in 0..20 {
            let img = sim.crash_image(mode, seed);
            if let Some(got) = img.read_file(p("/d/f")) {
                assert_ne!(mode, CrashMode::DropUnsynced);
                // Unsynced bytes are there, or zeros where the length grew without them.
                assert!(got.starts_with(b"one") && got.len() <= 6, "{mode} {got:?}");
                for (i, &b) in got.iter().enumerate().skip(3) {
                    assert!(b == b"onetwo"[i] || b == 0, "{mode} {got:?}");
                }
            }
            // The image is a healthy file system.
            img.create_new(p("/d/g")).unwrap().sync_data().unwrap();
        }
    }
}

#[test]
fn eio_on_the_nth_call_of_a_kind() {
    let sim = SimIo::new();
    let f = sim.create_new(p("/f")).unwrap();
    sim.inject(Fault::Eio {
        kind: OpKind::Write,
        nth: 2,
    });
    f.write_at(b"a", 0).unwrap();
    assert!(f.write_at(b"b", 1).is_err());
    f.write_at(b"c", 1).unwrap();
    for (kind, call) in [
        (OpKind::Read, 0),
        (OpKind::Create, 1),
        (OpKind::Rename, 2),
        (OpKind::Remove, 3),
        (OpKind::Sync, 4),
    ] {
        sim.inject(Fault::Eio { kind, nth: 1 });
        let failed = match call {
            0 => f.read_at(&mut [0u8; 1], 0).is_err(),
            1 => sim.create_new(p("/g")).is_err(),
            2 => sim.rename(p("/f"), p("/h")).is_err(),
            3 => sim.remove_file(p("/f")).is_err(),
            _ => sim.sync_dir(p("/")).is_err(),
        };
        assert!(failed, "{kind:?}");
    }
    assert_eq!(sim.read_file(p("/f")).unwrap(), b"ac");
}

#[test]
fn enospc_and_short_writes_write_a_prefix() {
    let sim = SimIo::new();
    let f = sim.create_new(p("/f")).unwrap();
    sim.inject(Fault::Enospc { bytes: 5 });
    f.write_at(b"abc", 0).unwrap();
    let e = f.write_at(b"defg", 3).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(ENOSPC));
    assert_eq!(sim.read_file(p("/f")).unwrap(), b"abcde");
    assert!(f.allocate(100).is_err());
    sim.clear_faults();
    sim.inject(Fault::ShortWrite { nth: 2, keep: 2 });
    f.write_at(b"X", 0).unwrap();
    assert!(f.write_at(b"123456", 5).is_err());
    assert_eq!(sim.read_file(p("/f")).unwrap(), b"Xbcde12");
    f.write_at(b"3", 7).unwrap();
}

/// fsyncgate: a failed fdatasync loses the data it was to persist even though reads still
/// see it and a later fdatasync succeeds.
#[test]
fn failed_sync_is_not_fixed_by_a_retry() {
    let sim = one_file(b"durable", &[b"+doomed"]);
    let f = sim.open(p("/d/f"), true).unwrap();
    sim.inject(Fault::Eio {
        kind: OpKind::Sync,
        nth: 1,
    });
    assert!(f.sync_data().is_err());
    f.sync_data().unwrap();
    assert_eq!(sim.read_file(p("/d/f")).unwrap(), b"durable+doomed");
    f.write_at(b"+later", 14).unwrap();
    f.sync_data().unwrap();
    for mode in CrashMode::ALL {
        let got = image(&sim, mode, 3).unwrap();
        assert_eq!(got, b"durable\0\0\0\0\0\0\0+later", "{mode}");
    }
}

#[test]
fn locks_and_unlinked_open_files() {
    let sim = SimIo::new();
    let l = sim.try_lock(p("/LOCK")).unwrap().unwrap();
    assert!(sim.try_lock(p("/LOCK")).unwrap().is_none());
    drop(l);
    assert!(sim.try_lock(p("/LOCK")).unwrap().is_some());
    let f = sim.create_new(p("/f")).unwrap();
    sim.sync_dir(p("/")).unwrap();
    sim.remove_file(p("/f")).unwrap();
    f.write_at(b"still writable", 0).unwrap();
    f.sync_data().unwrap();
    sim.sync_dir(p("/")).unwrap();
    assert!(!sim
        .crash_image(CrashMode::Garbage, 0)
        .exists(p("/f"))
        .unwrap());
}
