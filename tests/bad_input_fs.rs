//! Invariant: bad input from the file system and the environment — a full disk, failing reads,
//! denied permissions, files of the wrong kind, copies, symlinks, foreign or future-format
//! records, extreme but legal checkpoints — is either handled correctly or refused with a typed
//! error; nothing committed is lost, and nothing panics.
//!
//! The bad-input classes the test suite covers, one line each (file::test):
//!
//! | #  | class | test |
//! |----|-------|------|
//! | 1  | tensor bytes ≠ dtype × shape | bad_input::byte_length_must_match_dtype_times_shape |
//! | 2  | shape whose byte size overflows | bad_input::shape_overflow_is_invalid |
//! | 3  | duplicate tensor / blob name | bad_input::duplicate_tensor_name_in_one_checkpoint |
//! | 4  | invalid options | bad_input::bad_options_are_invalid_and_create_nothing |
//! | 5  | second writer | bad_input::second_writer_is_locked_out_naming_the_holder_pid |
//! | 6  | write on a read-only store | bad_input::writes_on_a_read_only_store_are_refused |
//! | 7  | read-only file system (EROFS) | bad_input::read_only_file_system_mem_io |
//! | 8  | read-only directory | bad_input::read_only_directory_real_fs |
//! | 9  | missing store directory | bad_input::read_only_open_of_a_missing_directory_is_not_found |
//! | 10 | unknown checkpoint / tensor | bad_input::unknown_checkpoints_and_tensors_are_not_found |
//! | 11 | bit flip in the WAL before its tail | recovery_corruption::flipped_bit_before_the_tail_refuses_with_file_and_offset |
//! | 12 | huge WAL record length | recovery_corruption::huge_record_length_is_an_error_or_a_tail_never_an_allocation |
//! | 13 | CRC-valid manifest with a huge chunk | recovery_corruption::crcd_manifest_with_huge_chunk_length_is_a_typed_error |
//! | 14 | CRC-valid manifest naming a huge missing segment | recovery_corruption::crcd_manifest_naming_a_huge_missing_segment_never_allocates_it |
//! | 15 | bit rot in a chunk | recovery_corruption::corrupt_chunk_names_checkpoint_tensor_and_chunk |
//! | 16 | missing segment | recovery_corruption::missing_segment_is_reported_skipped_and_never_deduplicated_against |
//! | 17 | truncated segment | recovery_corruption::truncated_segment_is_reported_skipped_and_never_deduplicated_against |
//! | 18 | corrupt segment header | recovery_corruption::corrupt_segment_header_marks_the_segment_damaged |
//! | 19 | CURRENT naming a missing WAL | recovery_corruption::current_naming_a_missing_wal_is_dangling |
//! | 20 | corrupt CURRENT | recovery_corruption::corrupt_current_is_a_bad_header |
//! | 21 | CURRENT missing beside a committed WAL, a damaged WAL header or first record, or segments without a WAL | recovery_corruption::missing_current_with_committed_wal_refuses_and_deletes_nothing, bad_input_fs::current_missing_with_a_damaged_wal_header_refuses_and_deletes_nothing, bad_input_fs::current_missing_with_a_damaged_first_record_refuses_and_deletes_nothing, bad_input_fs::current_missing_with_no_wal_but_segments_refuses_and_deletes_nothing |
//! | 22 | foreign files in the store | recovery_corruption::foreign_files_are_ignored_and_never_deleted |
//! | 23 | newer format version (CURRENT, WAL, segment) | recovery_corruption::newer_wal_version_is_unsupported (+ current, segment) |
//! | 24 | torn WAL tail | recovery_torn_tail::last_record_torn_at_every_byte |
//! | 25 | garbage after the last WAL record | recovery_torn_tail::garbage_after_the_last_record_is_cut |
//! | 26 | fsync failure (fsyncgate) | poisoning::sync_failure_at_each_sync_of_a_commit |
//! | 27 | ENOSPC mid-checkpoint | bad_input_fs::enospc_mid_checkpoint_keeps_earlier_checkpoints |
//! | 28 | ENOSPC at every write of a commit | bad_input_fs::enospc_at_every_point_of_a_commit |
//! | 29 | EIO on read | bad_input_fs::eio_on_read_names_the_chunk |
//! | 30 | segment replaced by a directory | bad_input_fs::segment_replaced_by_a_directory |
//! | 31 | permission denied | bad_input_fs::permission_denied_is_a_typed_error_and_changes_nothing |
//! | 32 | symlinked store directory | bad_input_fs::symlinked_store_directory_works |
//! | 33 | store copied while being written | bad_input_fs::store_copied_while_being_written_opens_consistent |
//! | 34 | WAL from another store | bad_input_fs::wal_records_from_another_store_are_refused, bad_input_fs::whole_wal_from_another_store_never_reads_wrong_bytes |
//! | 35 | unknown record type from a future version | bad_input_fs::unknown_record_type_with_a_valid_crc_is_refused |
//! | 36 | manifest chunk beyond the segment end | bad_input_fs::manifest_chunk_beyond_the_segment_end_is_refused |
//! | 37 | huge tensor counts / manifest over the record cap | bad_input_fs::hundred_thousand_tiny_tensors_in_one_checkpoint, bad_input_fs::manifest_over_the_record_cap_is_invalid |
//! | 38 | empty checkpoint | bad_input_fs::empty_checkpoint_round_trips |
//! | 39 | zero-sized tensors | bad_input_fs::zero_sized_tensors_round_trip |
//! | 40 | names with NUL and unicode | bad_input_fs::nul_and_unicode_names_round_trip |
//! | 41 | concurrent reader during delete | bad_input_fs::reader_during_delete_gets_right_bytes_or_a_typed_error |
//! | 42 | checkpoint deleted while a reader holds it (same process, another process) | reader_lease::same_process_reader_keeps_reading_and_space_is_freed_after_it_closes, reader_lease::another_process_keeps_reading_a_deleted_checkpoint_and_space_is_freed_after_it_exits |
//! | 43 | reader killed (SIGKILL) while holding a lease | reader_lease::a_reader_killed_with_sigkill_does_not_pin_space |
//! | 44 | GC / segment compaction interrupted by a power cut at any point | crash_sweep::crash_at_every_sync_in_every_mode (gc every 8 steps) |
//! | 45 | bit rot in a chunk being compacted | compaction::a_corrupt_source_chunk_is_quarantined_and_left_while_the_rest_compacts |
//! | 46 | CRC-valid Relocate record that does not fit the state | compaction::a_bad_relocate_record_refuses_the_open |
//! | 47 | `LOCK` (or any store file) a symlink to a victim | store_security::lock_symlink_victim_untouched |
//! | 48 | FIFO named like `LOCK`, a WAL, a segment or a lease (or a symlinked lease) | store_security::fifo_named_like_lock_wal_or_segment_does_not_hang_an_open, store_security::fifo_or_symlink_named_like_a_lease_neither_hangs_nor_pins_space |
//! | 49 | symlinked `segments/` or `readers/` | store_security::symlinked_segments_dir_is_refused_and_nothing_elsewhere_is_deleted, store_security::symlinked_readers_dir_is_refused_and_no_lease_is_created_elsewhere |
//! | 50 | world-writable or foreign-owned store directory | store_security::world_writable_store_dir_is_refused_unless_allowed, store_security::foreign_owned_store_dir_is_refused_for_a_writer_and_read_by_a_reader |
//! | 51 | export target or its old temp name a symlink | store_security::export_temp_file_is_exclusive_random_and_never_follows_symlinks |
//! | 52 | terminal escapes in names | store_security::ls_and_inspect_escape_control_characters_in_names |
//! | 53 | a pickle wherever a blob can hide (DCP bytes, tree blobs, Lightning) | trainer-bindings/tests/test_no_code_runs.py |
//! | 54 | a salvage past a Relocate record, a torn Relocate record (its outputs the only copy) | bad_input_fs::salvage_skips_the_damaged_record_and_keeps_a_relocate_records_outputs, bad_input_fs::a_torn_relocate_records_outputs_go_to_lost_found, bad_input_fs::orphan_segments_go_to_lost_found_with_a_note |
//! | 55 | a manifest claiming a 1 PiB tensor; a sparse 1 PiB WAL; an oversized CURRENT | bad_input_fs::a_manifest_claiming_a_1_pib_tensor_is_a_typed_error, bad_input_fs::a_sparse_petabyte_wal_is_a_typed_error, bad_input_fs::an_oversized_current_is_a_bad_header |
//! | 56 | a crafted 128 MiB WAL tail (a well-formed frame every 16 bytes) | bad_input_fs::a_crafted_128_mib_wal_tail_is_refused_without_a_quadratic_search |
//! | 57 | a store from a newer build (unknown incompatible, read-only-compatible, compatible feature) | bad_input_fs::a_store_from_a_newer_build_is_refused_as_newer_not_corrupt, bad_input_fs::a_store_with_an_unknown_read_only_compatible_feature_opens_read_only, bad_input_fs::a_store_with_an_unknown_compatible_feature_opens_and_keeps_the_bit |
//! | 58 | a bad chunk shared by 10 checkpoints; a CRC-valid Quarantine record that does not fit the state | bad_input_fs::a_bad_chunk_shared_by_10_checkpoints_is_reported_for_all_and_one_save_heals_all, bad_input_fs::a_quarantine_record_healing_onto_other_bytes_refuses_the_open |
//!
//! Beyond these classes, the fuzz targets in `fuzz/` (and `tests/model_proptest.rs`) feed
//! arbitrary bytes and operation sequences to the decoders and to recovery.

mod support;

use ckptstore::io::{MemIo, Storage};
use ckptstore::proto::v1 as pb;
use ckptstore::proto::Message;
use ckptstore::wal::{self, RecordType};
use ckptstore::{DType, Error, Options, RecoveryMode, Selector, Store};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use support::*;

const DIR: &str = "/store";

fn mem_opts(mem: &MemIo) -> Options {
    Options {
        io: Arc::new(mem.clone()),
        ..opts()
    }
}

fn mem_read_only(mem: &MemIo) -> Options {
    Options {
        read_only: true,
        ..mem_opts(mem)
    }
}

/// Every file of a `MemIo` store (except the lock file, whose content is the writer's pid).
fn mem_files(mem: &MemIo) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for sub in ["", "segments"] {
        let d = Path::new(DIR).join(sub);
        for name in mem.list(&d).unwrap_or_default() {
            let p = d.join(&name);
            if name != "LOCK" {
                if let Some(b) = mem.read_file(&p) {
                    out.insert(p, b);
                }
            }
        }
    }
    out
}

/// A `MemIo` store with checkpoints at steps 1 and 2 (tensor "w" of 9000 bytes each, so three
/// chunks); returns the file system and the tensors.
fn mem_store() -> (MemIo, Vec<Vec<u8>>) {
    let mem = MemIo::new();
    let mut s = Store::open(DIR, mem_opts(&mem)).unwrap();
    let ws = vec![data(1, 9000), data(2, 9000)];
    commit(&mut s, 1, &[("w", &ws[0])]);
    commit(&mut s, 2, &[("w", &ws[1])]);
    (mem, ws)
}

fn io_errno<T: std::fmt::Debug>(r: Result<T, Error>, errno: i32) -> String {
    match r {
        Err(e @ Error::Io { .. }) => {
            let Error::Io { source, .. } = &e else {
                unreachable!()
            };
            assert_eq!(source.raw_os_error(), Some(errno), "{e}");
            e.to_string()
        }
        other => panic!("expected an I/O error with errno {errno}, got {other:?}"),
    }
}

fn wal_salt(bytes: &[u8]) -> u32 {
    wal::WalHeader::decode(bytes).unwrap().salt
}

// ---------------------------------------------------------------- full disk, failing reads

#[test]
fn enospc_mid_checkpoint_keeps_earlier_checkpoints() {
    let (mem, ws) = mem_store();
    let mut s = Store::open(DIR, mem_opts(&mem)).unwrap();
    let before = mem_files(&mem);
    // Room for a few chunks of the 40 000-byte tensor, not all of them.
    mem.faults.enospc_after_bytes.store(10_000, SeqCst);
    let mut t = s.begin(3).unwrap();
    let msg = io_errno(
        t.put_tensor("big", DType::U8, &[40_000], &data(3, 40_000)),
        28,
    );
    assert!(msg.contains("No space left on device"), "{msg}");
    assert!(msg.contains("segments"), "names the file: {msg}");
    // The transaction is unusable, the store is not poisoned (nothing was synced or lost).
    assert!(matches!(t.commit(), Err(Error::InvalidArgument(_))));
    assert!(s.poisoned().is_none());
    assert_eq!(s.list().len(), 2);
    assert_holds(&s, 1, &[("w", &ws[0])]);
    assert_holds(&s, 2, &[("w", &ws[1])]);
    // The aborted transaction removed its partial segment: the files are as before.
    assert_eq!(mem_files(&mem), before);
    drop(s);

    // While the disk is full a writer cannot even record its pid; a reader works.
    io_errno(Store::open(DIR, mem_opts(&mem)), 28);
    let r = Store::open(DIR, mem_read_only(&mem)).unwrap();
    assert_holds(&r, 2, &[("w", &ws[1])]);
    drop(r);

    // Space freed: everything is there and the store takes the checkpoint.
    mem.faults.enospc_after_bytes.store(0, SeqCst);
    let mut s = Store::open(DIR, mem_opts(&mem)).unwrap();
    assert!(s.recovery_report().orphan_segments.is_empty());
    let big = data(3, 40_000);
    commit(&mut s, 3, &[("big", &big)]);
    assert_holds(&s, 1, &[("w", &ws[0])]);
    assert_holds(&s, 3, &[("big", &big)]);
}

#[test]
fn enospc_at_every_point_of_a_commit() {
    // Budgets from "nothing" to "enough": the disk fills during the segment header, a frame, the
    // commit record, or not at all. Each failure is ENOSPC; the checkpoint is then wholly absent;
    // the earlier ones are intact after a reopen on a disk with space again.
    let mut outcomes = BTreeMap::new();
    for budget in (1..12_000).step_by(97) {
        let (mem, ws) = mem_store();
        let mut s = Store::open(DIR, mem_opts(&mem)).unwrap();
        mem.faults.enospc_after_bytes.store(budget, SeqCst);
        let r = (|| {
            let mut t = s.begin(3)?;
            t.put_tensor("x", DType::U8, &[6000], &data(3, 6000))?;
            t.commit()
        })();
        let ok = match r {
            Ok(_) => true,
            Err(Error::Io { op, source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(28), "budget {budget}");
                *outcomes.entry(op).or_insert(0) += 1;
                false
            }
            Err(e) => panic!("budget {budget}: {e}"),
        };
        drop(s);
        mem.faults.enospc_after_bytes.store(0, SeqCst);
        let s = Store::open(DIR, mem_opts(&mem)).unwrap();
        assert_eq!(s.list().len(), if ok { 3 } else { 2 }, "budget {budget}");
        assert_holds(&s, 1, &[("w", &ws[0])]);
        assert_holds(&s, 2, &[("w", &ws[1])]);
        if ok {
            assert_holds(&s, 3, &[("x", &data(3, 6000))]);
        }
    }
    // Both the segment writes and the WAL append ran out of space somewhere in the sweep.
    assert!(outcomes.contains_key("write"), "{outcomes:?}");
}

#[test]
fn eio_on_read_names_the_chunk() {
    let (mem, ws) = mem_store();
    // Recovery reads CURRENT and the WAL: a failing read refuses the open, naming the file.
    mem.faults.fail_reads.store(true, SeqCst);
    let msg = io_errno(Store::open(DIR, mem_read_only(&mem)), 5);
    assert!(msg.contains("CURRENT"), "{msg}");
    mem.faults.fail_reads.store(false, SeqCst);

    let s = Store::open(DIR, mem_read_only(&mem)).unwrap();
    mem.faults.fail_reads.store(true, SeqCst);
    let ck = s.checkpoint(Selector::Id(2)).unwrap();
    for r in [ck.tensor("w").map(|_| ()), ck.verify(), s.verify(2)] {
        match r {
            Err(Error::ChunkCorrupt {
                checkpoint,
                name,
                chunk,
                reason,
                ..
            }) => {
                assert_eq!((checkpoint, name.as_str(), chunk), (2, "w", 0));
                assert!(reason.contains("read failed"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
    // Nothing reads, so nothing is valid; but nothing is reported as valid either.
    assert_eq!(s.latest_valid().unwrap(), None);
    // The disk recovers: the same store object reads everything again.
    mem.faults.fail_reads.store(false, SeqCst);
    assert_holds(&s, 1, &[("w", &ws[0])]);
    assert_holds(&s, 2, &[("w", &ws[1])]);
}

// ---------------------------------------------------------------- files of the wrong kind, permissions

#[test]
fn segment_replaced_by_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (w1, w2) = (data(1, 9000), data(2, 9000));
    {
        let mut s = Store::open(dir.path(), opts()).unwrap();
        commit(&mut s, 1, &[("w", &w1)]);
        commit(&mut s, 2, &[("w", &w2)]);
    }
    let seg2 = segment_path(dir.path(), 2);
    std::fs::remove_file(&seg2).unwrap();
    std::fs::create_dir(&seg2).unwrap();
    std::fs::write(seg2.join("inside"), b"x").unwrap();
    for o in [opts(), Options::read_only()] {
        let o = Options {
            chunk_size: CHUNK,
            ..o
        };
        let s = Store::open(dir.path(), o).unwrap();
        assert!(
            s.recovery_report()
                .damaged_segments
                .iter()
                .any(|(id, _)| *id == 2),
            "{:?}",
            s.recovery_report()
        );
        assert!(matches!(s.verify(2), Err(Error::SegmentMissing { .. })));
        assert!(matches!(
            s.checkpoint(Selector::Id(2)).unwrap().tensor("w"),
            Err(Error::SegmentMissing { .. })
        ));
        assert_eq!(s.latest_valid().unwrap().map(|c| c.id), Some(1));
        assert_holds(&s, 1, &[("w", &w1)]);
    }
    // The directory and what it holds are never deleted.
    assert!(seg2.join("inside").exists());
    // A directory with a segment's name that nothing references is foreign: left alone, and it
    // does not stop a writer from opening.
    let stray = segment_path(dir.path(), 77);
    std::fs::create_dir(&stray).unwrap();
    let mut s = Store::open(dir.path(), opts()).unwrap();
    assert!(stray.is_dir());
    commit(&mut s, 3, &[("w", &data(3, 100))]);
    assert_holds(&s, 1, &[("w", &w1)]);
}

#[test]
fn permission_denied_is_a_typed_error_and_changes_nothing() {
    let (mem, ws) = mem_store();
    let before = mem_files(&mem);
    let seg_dir = Path::new(DIR).join("segments");
    let seg1 = seg_dir.join(ckptstore::segment::file_name(1));
    for denied in [Path::new(DIR).to_path_buf(), seg_dir.clone(), seg1.clone()] {
        mem.faults.deny(&denied);
        for o in [mem_opts(&mem), mem_read_only(&mem)] {
            let msg = io_errno(Store::open(DIR, o), 13);
            assert!(msg.contains("Permission denied"), "{msg}");
        }
        mem.faults.allow_all();
        assert_eq!(mem_files(&mem), before, "denied {}", denied.display());
    }
    // Denied after the open: reading the segment is a typed error, and the other checkpoint
    // still reads.
    let s = Store::open(DIR, mem_read_only(&mem)).unwrap();
    mem.faults.deny(&seg1);
    match s.checkpoint(Selector::Id(1)).unwrap().tensor("w") {
        Err(Error::Io { path, source, .. }) => {
            assert_eq!(path, seg1);
            assert_eq!(source.raw_os_error(), Some(13));
        }
        other => panic!("{other:?}"),
    }
    assert_holds(&s, 2, &[("w", &ws[1])]);
    mem.faults.allow_all();
    assert_holds(&s, 1, &[("w", &ws[0])]);
}

#[test]
fn symlinked_store_directory_works() {
    let root = tempfile::tempdir().unwrap();
    let real = root.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = root.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let w1 = data(1, 9000);
    {
        let mut s = Store::open(&link, opts()).unwrap();
        commit(&mut s, 1, &[("w", &w1)]);
        s.compact_wal().unwrap();
        commit(&mut s, 2, &[("w", &w1)]);
        s.delete(1).unwrap();
    }
    // The files are in the real directory; the link is still a link.
    assert!(real.join("CURRENT").is_file());
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    for path in [&link, &real] {
        let s = Store::open(path, opts()).unwrap();
        assert!(s.recovery_report().orphan_segments.is_empty());
        assert_eq!(s.list().iter().map(|c| c.id).collect::<Vec<_>>(), vec![2]);
        assert_holds(&s, 2, &[("w", &w1)]);
    }
    // The lock is on the real file: a writer through the link excludes one through the path.
    let _w = Store::open(&link, opts()).unwrap();
    assert!(matches!(
        Store::open(&real, opts()),
        Err(Error::Locked { .. })
    ));
}

#[test]
fn store_copied_while_being_written_opens_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let (w1, w2, w3) = (data(1, 9000), data(2, 9000), data(3, 9000));
    let mut s = Store::open(dir.path(), opts()).unwrap();
    commit(&mut s, 1, &[("w", &w1)]);

    // 1. Copied mid-transaction (its segment is half written, no commit record yet).
    let copy1 = tempfile::tempdir().unwrap();
    let mut t = s.begin(2).unwrap();
    t.put_tensor("w", DType::U8, &[9000], &w2).unwrap();
    copy_tree(dir.path(), copy1.path());
    t.put_tensor("v", DType::U8, &[10], &[1; 10]).unwrap();
    t.commit().unwrap();

    // 2. Copied file by file while a commit happens between the segments and the WAL: the
    //    copy's WAL names a segment the copy does not have.
    let copy2 = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(copy2.path().join("segments")).unwrap();
    for (name, _) in segment_files(dir.path()) {
        std::fs::copy(
            dir.path().join("segments").join(&name),
            copy2.path().join("segments").join(&name),
        )
        .unwrap();
    }
    commit(&mut s, 3, &[("w", &w3)]);
    for f in ["CURRENT", "LOCK"] {
        std::fs::copy(dir.path().join(f), copy2.path().join(f)).unwrap();
    }
    let wal = live_wal(dir.path());
    std::fs::copy(&wal, copy2.path().join(wal.file_name().unwrap())).unwrap();
    drop(s);

    // The first copy holds checkpoint 1 and drops the unfinished transaction's segment.
    let c = Store::open(copy1.path(), opts()).unwrap();
    assert_eq!(c.list().len(), 1);
    assert_eq!(c.recovery_report().orphan_segments.len(), 1);
    assert_holds(&c, 1, &[("w", &w1)]);
    assert_eq!(c.latest_valid().unwrap().map(|c| c.id), Some(1));

    // The second lists checkpoint 3 but reports its segment missing and falls back to 2.
    let c = Store::open(copy2.path(), opts()).unwrap();
    assert_eq!(c.list().len(), 3);
    assert_eq!(c.recovery_report().damaged_segments.len(), 1);
    assert!(matches!(c.verify(3), Err(Error::SegmentMissing { .. })));
    assert_eq!(c.latest_valid().unwrap().map(|c| c.id), Some(2));
    assert_holds(&c, 1, &[("w", &w1)]);
    assert_holds(&c, 2, &[("w", &w2), ("v", &[1; 10])]);

    // The original is untouched by all this.
    let s = Store::open(dir.path(), opts()).unwrap();
    assert_holds(&s, 3, &[("w", &w3)]);
}

// ---------------------------------------------------------------- foreign and future records

#[test]
fn wal_records_from_another_store_are_refused() {
    // Store A's WAL header followed by store B's records (another salt): none validates.
    // That is not a torn tail (which is one record): it must not open as an empty store, and
    // the writer must not cut those records off.
    let (a, _) = mem_store();
    let (b, _) = mem_store();
    let wal = Path::new(DIR).join("00000001.wal");
    let (wa, wb) = (a.read_file(&wal).unwrap(), b.read_file(&wal).unwrap());
    assert_ne!(wal_salt(&wa), wal_salt(&wb));
    let mut spliced = wa[..wal::WAL_HEADER_LEN].to_vec();
    spliced.extend_from_slice(&wb[wal::WAL_HEADER_LEN..]);
    a.write_file(&wal, spliced.clone());
    for o in [mem_opts(&a), mem_read_only(&a)] {
        match Store::open(DIR, o) {
            Err(Error::WalCorrupt { offset, reason, .. }) => {
                assert_eq!(offset, wal::WAL_HEADER_LEN as u64);
                assert!(reason.contains("checksum"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(a.read_file(&wal).unwrap(), spliced, "the WAL was modified");
}

#[test]
fn whole_wal_from_another_store_never_reads_wrong_bytes() {
    // B's whole WAL (its own header and salt) copied over A's: its records are valid, but they
    // describe B's chunks; A's segments hold other bytes. Every read is a typed error.
    let (a, _) = mem_store();
    let (b, _) = mem_store();
    // B's checkpoint 2 holds other bytes than A's (same length, so no segment looks short).
    let mut sb = Store::open(DIR, mem_opts(&b)).unwrap();
    sb.delete(2).unwrap();
    commit(&mut sb, 3, &[("w", &data(99, 9000))]);
    drop(sb);
    let wal = Path::new(DIR).join("00000001.wal");
    a.write_file(&wal, b.read_file(&wal).unwrap());
    let s = Store::open(DIR, mem_opts(&a)).unwrap();
    // Checkpoint 1 has the same bytes in both stores; checkpoint 3 names segment 3, which A
    // does not have.
    assert_holds(&s, 1, &[("w", &data(1, 9000))]);
    assert!(matches!(s.verify(3), Err(Error::SegmentMissing { .. })));
    assert!(s.checkpoint(Selector::Id(3)).unwrap().tensor("w").is_err());
    assert_eq!(s.latest_valid().unwrap().map(|c| c.id), Some(1));
}

#[test]
fn unknown_record_type_with_a_valid_crc_is_refused() {
    // A record of type 9 (from a future version) whose checksum is valid is synced data this
    // build cannot interpret: refuse to open, never treat it as a torn tail and cut it.
    for at_end in [true, false] {
        let (mem, ws) = mem_store();
        let wal = Path::new(DIR).join("00000001.wal");
        let bytes = mem.read_file(&wal).unwrap();
        let salt = wal_salt(&bytes);
        let payload = b"future record";
        let mut fields = [0u8; 8];
        fields[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        fields[4] = 9;
        let mut crc_in = salt.to_le_bytes().to_vec();
        crc_in.extend_from_slice(&fields);
        crc_in.extend_from_slice(payload);
        let mut rec = crc32c(&crc_in).to_le_bytes().to_vec();
        rec.extend_from_slice(&fields);
        rec.extend_from_slice(payload);
        let mut img = bytes.clone();
        let at = if at_end {
            img.len()
        } else {
            wal::WAL_HEADER_LEN
        };
        img.splice(at..at, rec);
        mem.write_file(&wal, img.clone());
        for o in [mem_opts(&mem), mem_read_only(&mem)] {
            match Store::open(DIR, o) {
                Err(Error::WalCorrupt { offset, reason, .. }) => {
                    assert_eq!(offset, at as u64);
                    assert!(reason.contains("record type 9"), "{reason}");
                }
                other => panic!("at_end {at_end}: {other:?}"),
            }
        }
        assert_eq!(mem.read_file(&wal).unwrap(), img, "the WAL was modified");
        // Salvage keeps what precedes it.
        let o = Options {
            recovery_mode: RecoveryMode::PointInTime,
            ..mem_read_only(&mem)
        };
        let s = Store::open(DIR, o).unwrap();
        if at_end {
            assert_holds(&s, 2, &[("w", &ws[1])]);
        } else {
            assert!(s.list().is_empty());
        }
    }
}

#[test]
fn manifest_chunk_beyond_the_segment_end_is_refused() {
    let (mem, _) = mem_store();
    let s = Store::open(DIR, mem_read_only(&mem)).unwrap();
    let mut m = s.checkpoint(Selector::Id(2)).unwrap().manifest().clone();
    let seg_len = s.stats().segment_bytes;
    drop(s);
    m.id = 3;
    m.new_segments.clear();
    m.tensors[0].chunks[2].offset += 1 << 20; // far past segment 2's committed length
    let wal = Path::new(DIR).join("00000001.wal");
    let mut bytes = mem.read_file(&wal).unwrap();
    let payload = pb::CommitRecord { manifest: Some(m) }.encode_to_vec();
    let salt = wal_salt(&bytes);
    wal::encode_record(&mut bytes, salt, RecordType::Commit, &payload);
    mem.write_file(&wal, bytes);
    let before = mem_files(&mem);
    for o in [mem_opts(&mem), mem_read_only(&mem)] {
        match Store::open(DIR, o) {
            Err(Error::BadManifest { context, reason }) => {
                assert!(reason.contains("past the end of segment 2"), "{reason}");
                assert!(context.contains("00000001.wal"), "{context}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(mem_files(&mem), before);
    assert!(seg_len > 0);
}

// ---------------------------------------------------------------- extreme but legal checkpoints

#[test]
fn hundred_thousand_tiny_tensors_in_one_checkpoint() {
    const N: u32 = 100_000;
    let mem = MemIo::new();
    let mut s = Store::open(DIR, mem_opts(&mem)).unwrap();
    let mut t = s.begin(1).unwrap();
    for i in 0..N {
        t.put_tensor(&format!("layer.{i}"), DType::U8, &[4], &i.to_le_bytes())
            .unwrap();
    }
    let info = t.commit().unwrap();
    assert_eq!(info.checkpoint.tensors, N as usize);
    drop(s);
    let s = Store::open(DIR, mem_opts(&mem)).unwrap();
    let ck = s.checkpoint(Selector::Latest).unwrap();
    assert_eq!(ck.tensor_names().len(), N as usize);
    for i in [0, 1, N / 2, N - 1] {
        let t = ck.tensor(&format!("layer.{i}")).unwrap();
        assert_eq!(t.data, i.to_le_bytes());
    }
}

#[test]
fn manifest_over_the_record_cap_is_invalid() {
    // ~67 MB of tensor names: the manifest cannot fit one 64 MiB WAL record. The commit is
    // refused with a clear error, nothing is committed, nothing is left behind.
    let mem = MemIo::new();
    let mut s = Store::open(DIR, mem_opts(&mem)).unwrap();
    commit(&mut s, 1, &[("w", &data(1, 100))]);
    let before = mem_files(&mem);
    let mut t = s.begin(2).unwrap();
    let long = "n".repeat(112 << 10);
    for i in 0..600 {
        t.put_tensor(&format!("{i}{long}"), DType::U8, &[0], &[])
            .unwrap();
    }
    match t.commit() {
        Err(Error::InvalidArgument(msg)) => {
            assert!(msg.contains("WAL record limit"), "{msg}");
            assert!(msg.contains("too many tensors"), "{msg}");
        }
        other => panic!("{:?}", other.map(|i| i.checkpoint.id)),
    }
    assert!(s.poisoned().is_none());
    assert_eq!(s.list().len(), 1);
    assert_eq!(mem_files(&mem), before);
    commit(&mut s, 3, &[("w", &data(3, 100))]);
}

#[test]
fn empty_checkpoint_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let mut t = s.begin(5).unwrap();
    t.set_metadata("note", "nothing to save yet");
    let info = t.commit().unwrap();
    assert_eq!((info.checkpoint.tensors, info.checkpoint.bytes), (0, 0));
    assert_eq!(info.bytes_written, 0);
    // No chunk to write: one segment holding only the commit trailer (so a rebuild restores
    // it; docs/FORMAT.md, "Commit trailer"): a header and the trailer, no frame.
    let segs = segment_files(dir.path());
    assert_eq!(segs.len(), 1, "{segs:?}");
    assert!(
        segs.values().all(|&len| len > 4096 && len < 8192),
        "{segs:?}"
    );
    drop(s);
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let c = s.latest_valid().unwrap().unwrap();
    assert_eq!((c.id, c.step, c.tensors), (info.checkpoint.id, 5, 0));
    s.verify(c.id).unwrap();
    assert!(s
        .checkpoint(Selector::Id(c.id))
        .unwrap()
        .tensor_names()
        .is_empty());
    s.compact_wal().unwrap();
    s.delete(c.id).unwrap();
    drop(s);
    let s = Store::open(dir.path(), opts()).unwrap();
    assert!(s.list().is_empty());
    // Freed with its checkpoint.
    assert!(segment_files(dir.path()).is_empty());
}

#[test]
fn zero_sized_tensors_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, DType, &[u64], usize); 5] = [
        ("empty", DType::U8, &[0], 0),
        ("rows_no_cols", DType::F32, &[3, 0], 0),
        ("middle_zero", DType::BF16, &[2, 0, 7], 0),
        ("scalar", DType::F64, &[], 8),
        ("bool_one", DType::Bool, &[1, 1, 1], 1),
    ];
    {
        let mut s = Store::open(dir.path(), opts()).unwrap();
        let mut t = s.begin(1).unwrap();
        for (name, dtype, shape, n) in cases {
            t.put_tensor(name, dtype, shape, &data(n as u64, n))
                .unwrap();
        }
        t.put_blob("empty_blob", &[]).unwrap();
        t.commit().unwrap();
        // The same zero-sized tensors again: nothing to write or deduplicate.
        let mut t = s.begin(2).unwrap();
        t.put_tensor("empty", DType::U8, &[0], &[]).unwrap();
        let info = t.commit().unwrap();
        assert_eq!(info.bytes_written + info.bytes_deduplicated, 0);
    }
    let s = Store::open(dir.path(), opts()).unwrap();
    let ck = s.checkpoint(Selector::Id(1)).unwrap();
    for (name, dtype, shape, n) in cases {
        let t = ck.tensor(name).unwrap();
        assert_eq!((t.dtype, t.shape.as_slice()), (dtype, shape), "{name}");
        assert_eq!(t.data, data(n as u64, n), "{name}");
        assert_eq!(ck.tensor_meta(name).unwrap(), (dtype, shape.to_vec()));
    }
    assert_eq!(ck.blob("empty_blob").unwrap(), Vec::<u8>::new());
    s.verify(1).unwrap();
    s.verify(2).unwrap();
}

#[test]
fn nul_and_unicode_names_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let names = [
        "a\0b",
        "\0",
        "",
        "权重/层.0",
        "🙂.bias",
        "e\u{301}", // decomposed é: a different name from the composed one
        "\u{e9}",
        "tab\tnew\nline",
        "\u{feff}bom",
        "rtl\u{202e}txt",
    ];
    let tensors: Vec<(&str, Vec<u8>)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (*n, data(i as u64, 100 + i)))
        .collect();
    let refs: Vec<(&str, &[u8])> = tensors.iter().map(|(n, d)| (*n, d.as_slice())).collect();
    {
        let mut s = Store::open(dir.path(), opts()).unwrap();
        let mut t = s.begin(1).unwrap();
        for (n, d) in &refs {
            t.put_tensor(n, DType::U8, &[d.len() as u64], d).unwrap();
        }
        t.put_blob("blob\0\u{10ffff}", b"b").unwrap();
        t.set_metadata("key\0with nul", "值\0");
        t.set_metadata("ключ", 7i64);
        t.commit().unwrap();
        s.compact_wal().unwrap();
    }
    let s = Store::open(dir.path(), opts()).unwrap();
    assert_holds(&s, 1, &refs);
    let ck = s.checkpoint(Selector::Id(1)).unwrap();
    assert_eq!(ck.blob("blob\0\u{10ffff}").unwrap(), b"b");
    let meta = ck.metadata();
    assert_eq!(
        meta.get("key\0with nul"),
        Some(&ckptstore::MetaValue::Str("值\0".into()))
    );
    assert_eq!(meta.get("ключ"), Some(&ckptstore::MetaValue::Int(7)));
    // Prefixes and near-misses are not found.
    assert!(matches!(ck.tensor("a"), Err(Error::NotFound(_))));
    assert!(matches!(ck.tensor("a\0"), Err(Error::NotFound(_))));
}

// ---------------------------------------------------------------- concurrency

#[test]
fn reader_during_delete_gets_right_bytes_or_a_typed_error() {
    // In memory and on a real file system: a read-only store opened before a delete reads
    // checkpoints whose segments the writer then deletes. Its lease (readers/) keeps them:
    // it reads them bit-exact, and they are freed once it is gone. A reader that could not
    // take a lease (here: readers/ denied to it) gets a typed error, never wrong bytes.
    let tmp = tempfile::tempdir().unwrap();
    let (mem, unleased_mem) = (MemIo::new(), MemIo::new());
    let setups: [(PathBuf, Options, Option<&MemIo>); 3] = [
        (Path::new(DIR).to_path_buf(), mem_opts(&mem), None),
        (tmp.path().to_path_buf(), opts(), None),
        (
            Path::new(DIR).to_path_buf(),
            mem_opts(&unleased_mem),
            Some(&unleased_mem),
        ),
    ];
    for (dir, o, deny_lease) in setups {
        let ro = Options {
            read_only: true,
            ..o.clone()
        };
        let (w1, w2, w3) = (data(1, 9000), data(2, 9000), data(3, 9000));
        let mut w = Store::open(&dir, o.clone()).unwrap();
        commit(&mut w, 1, &[("w", &w1)]);
        commit(&mut w, 2, &[("w", &w2)]);
        if let Some(m) = deny_lease {
            m.faults.deny(dir.join("readers"));
        }
        let r = Store::open(&dir, ro.clone()).unwrap();
        if let Some(m) = deny_lease {
            m.faults.allow_all();
        }
        assert_eq!(r.reader_lease().is_some(), deny_lease.is_none());
        // The reader has checkpoint 2's segment open already; checkpoint 1's not yet.
        assert_holds(&r, 2, &[("w", &w2)]);

        w.delete(1).unwrap();
        w.delete(2).unwrap();
        // New segments never reuse a freed segment's id, even after compaction and a reopen.
        w.compact_wal().unwrap();
        drop(w);
        let mut w = Store::open(&dir, o.clone()).unwrap();
        commit(&mut w, 3, &[("w", &w3)]);

        for _ in 0..2 {
            match (
                r.checkpoint(Selector::Id(1)).unwrap().tensor("w"),
                deny_lease,
            ) {
                // Leased: the segment is kept for the reader.
                (Ok(t), None) => assert!(t.data == w1),
                // Not leased: its file is gone, a typed error; never another checkpoint's bytes.
                (Err(Error::Io { source, .. }), Some(_)) => {
                    assert_eq!(source.kind(), std::io::ErrorKind::NotFound)
                }
                (Ok(t), Some(_)) => panic!("read {} bytes of a freed segment", t.data.len()),
                (Err(e), _) => panic!("{e}"),
            }
        }
        // Checkpoint 2: the reader's open file still holds the segment's bytes either way.
        let t = r.checkpoint(Selector::Id(2)).unwrap().tensor("w").unwrap();
        assert!(t.data == w2);
        // The reader's view is as of its open; a new reader sees the writer's state.
        assert_eq!(r.list().len(), 2);
        let r2 = Store::open(&dir, ro).unwrap();
        assert_eq!(r2.list().iter().map(|c| c.id).collect::<Vec<_>>(), vec![3]);
        assert_holds(&r2, 3, &[("w", &w3)]);
        // Once the first reader is gone, gc frees what it held: one segment file is left.
        drop(r);
        w.gc().unwrap();
        assert!(w.pending_segments().is_empty());
        let segs = o.io.list(&dir.join("segments")).unwrap();
        assert_eq!(segs.len(), 1, "{segs:?}");
    }
}

// ---------------------------------------------------------------- regressions found by fuzzing

/// Bug (found by fuzz target `recover_image`, seed `fuzz/corpus/recover_image/regress-orphan-u64-max`):
/// recovery set `next_segment_id = max(.., id + 1)` for every orphan segment file, so a file
/// named `18446744073709551615.seg` overflowed the counter: a panic in debug builds, a wrap in
/// release ones.
#[test]
fn regression_orphan_segment_named_u64_max_overflowed_the_id_counter() {
    let (mem, ws) = mem_store();
    let seg_dir = Path::new(DIR).join("segments");
    for (i, name) in ["18446744073709551615.seg", "18446744073709551614.seg"]
        .into_iter()
        .enumerate()
    {
        let x = [i as u8 + 1; 5];
        mem.write_file(&seg_dir.join(name), vec![0; 10]);
        let mut s = Store::open(DIR, mem_opts(&mem)).unwrap();
        assert_eq!(s.recovery_report().orphan_segments.len(), 1);
        assert!(
            mem.read_file(&seg_dir.join(name)).is_none(),
            "orphan removed"
        );
        // The counter sits at the end of the id space: a new segment is refused, not wrapped
        // onto an id in use.
        let mut t = s.begin(3).unwrap();
        match t.put_tensor("x", DType::U8, &[5], &x) {
            Err(Error::InvalidArgument(msg)) => assert!(msg.contains("exhausted"), "{msg}"),
            other => panic!("{other:?}"),
        }
        drop(t);
        assert_holds(&s, 2, &[("w", &ws[1])]);
        drop(s);
        // The orphan is gone, so the next open counts from the WAL again.
        let mut s = Store::open(DIR, mem_opts(&mem)).unwrap();
        let id = commit(&mut s, 3, &[("x", &x)]).checkpoint.id;
        assert_holds(&s, id, &[("x", &x)]);
        assert_holds(&s, 1, &[("w", &ws[0])]);
    }
}

/// Bug (same family, found while fixing the one above): a CRC-valid commit record with
/// checkpoint id u64::MAX overflowed `next_checkpoint_id` at replay, and the next commit would
/// have written a record whose id was already live and then panicked applying it.
#[test]
fn regression_checkpoint_id_u64_max_overflowed_the_id_counter() {
    let (mem, ws) = mem_store();
    let wal = Path::new(DIR).join("00000001.wal");
    let mut bytes = mem.read_file(&wal).unwrap();
    let m = pb::Manifest {
        id: u64::MAX,
        step: 9,
        new_segments: vec![pb::SegmentInfo {
            id: u64::MAX,
            length: 4096,
        }],
        ..Default::default()
    };
    let payload = pb::CommitRecord { manifest: Some(m) }.encode_to_vec();
    let salt = wal_salt(&bytes);
    wal::encode_record(&mut bytes, salt, RecordType::Commit, &payload);
    mem.write_file(&wal, bytes);
    let mut s = Store::open(DIR, mem_opts(&mem)).unwrap();
    assert_eq!(s.list().len(), 3);
    let before = mem_files(&mem);
    match s.begin(10).unwrap().commit() {
        Err(Error::InvalidArgument(msg)) => assert!(msg.contains("exhausted"), "{msg}"),
        other => panic!("{other:?}"),
    }
    assert!(s.poisoned().is_none());
    assert_eq!(mem_files(&mem), before, "nothing written");
    assert_holds(&s, 2, &[("w", &ws[1])]);
    // Deleting the odd checkpoint works and is durable.
    s.delete(u64::MAX).unwrap();
    drop(s);
    let s = Store::open(DIR, mem_opts(&mem)).unwrap();
    assert_eq!(s.list().len(), 2);
}

/// Bug (found by fuzz target `manifest_decode`, seed
/// `fuzz/corpus/manifest_decode/regress-snapshot-segment-id-reused`): a snapshot record whose
/// `next_segment_id` was not above the ids of the segments it lists let the next transaction
/// reuse such an id. Its commit was acknowledged, but at the next open the replay kept the
/// snapshot's (shorter) length for that id and refused the commit record as "past the end of
/// segment": an acknowledged checkpoint made the store unopenable.
#[test]
fn regression_snapshot_with_a_low_segment_counter_let_an_id_be_reused() {
    let mem = MemIo::new();
    drop(Store::open(DIR, mem_opts(&mem)).unwrap());
    let wal = Path::new(DIR).join("00000001.wal");
    let mut bytes = mem.read_file(&wal).unwrap();
    let snap = pb::SnapshotRecord {
        next_checkpoint_id: 1,
        next_segment_id: 1,
        segments: vec![pb::SegmentInfo {
            id: 1,
            length: 5000,
        }],
    }
    .encode_to_vec();
    let salt = wal_salt(&bytes);
    wal::encode_record(&mut bytes, salt, RecordType::Snapshot, &snap);
    mem.write_file(&wal, bytes);
    let x = data(5, 9000);
    let id = {
        let mut s = Store::open(DIR, mem_opts(&mem)).unwrap();
        commit(&mut s, 1, &[("x", &x)]).checkpoint.id
    };
    let s = Store::open(DIR, mem_opts(&mem)).unwrap();
    assert_holds(&s, id, &[("x", &x)]);
}

// ---------------------------------------------------------------- never delete what recovery does not understand

/// Every file under `dir` except `LOCK`, as (relative path → contents).
fn tree_without_lock(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut t = snapshot_tree(dir);
    t.remove(Path::new("LOCK"));
    t
}

/// A real-file-system store with checkpoints at steps 1 and 2.
fn fs_store(dir: &Path) {
    let mut s = Store::open(dir, opts()).unwrap();
    commit(&mut s, 1, &[("w", &data(1, 3 * CHUNK))]);
    commit(&mut s, 2, &[("w", &data(2, 3 * CHUNK))]);
}

/// Opens `dir` as writer and read-only; both must refuse with `CurrentMissing` naming
/// `what`, and the directory must be exactly as before.
fn assert_current_missing_refused(dir: &Path, what: &str) {
    let before = tree_without_lock(dir);
    for o in [opts(), Options::read_only()] {
        match Store::open(
            dir,
            Options {
                chunk_size: CHUNK,
                ..o
            },
        ) {
            Err(e @ Error::CurrentMissing { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(what), "{msg}");
                assert!(msg.contains("nothing was changed"), "{msg}");
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    assert_eq!(tree_without_lock(dir), before, "{what}: the store changed");
    assert!(!dir.join("CURRENT").exists());
}

/// Issue 14, item 1: CURRENT deleted and the WAL header damaged; `recover` used to start a
/// new store on top and remove every segment.
#[test]
fn current_missing_with_a_damaged_wal_header_refuses_and_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    fs_store(dir.path());
    std::fs::remove_file(dir.path().join("CURRENT")).unwrap();
    let wal = dir.path().join("00000001.wal");
    let mut b = std::fs::read(&wal).unwrap();
    b[0..4].copy_from_slice(b"XXXX");
    std::fs::write(&wal, b).unwrap();
    assert_current_missing_refused(dir.path(), "00000001.wal");
    assert_current_missing_refused(dir.path(), "a damaged header");
    assert_current_missing_refused(dir.path(), "segment file(s)");
}

#[test]
fn current_missing_with_a_damaged_first_record_refuses_and_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    fs_store(dir.path());
    std::fs::remove_file(dir.path().join("CURRENT")).unwrap();
    let wal = dir.path().join("00000001.wal");
    let mut b = std::fs::read(&wal).unwrap();
    b[wal::WAL_HEADER_LEN + wal::RECORD_HEADER_LEN + 2] ^= 0x40;
    std::fs::write(&wal, b).unwrap();
    assert_current_missing_refused(dir.path(), "a damaged first record");
}

#[test]
fn current_missing_with_no_wal_but_segments_refuses_and_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    fs_store(dir.path());
    std::fs::remove_file(dir.path().join("CURRENT")).unwrap();
    std::fs::remove_file(dir.path().join("00000001.wal")).unwrap();
    assert_current_missing_refused(dir.path(), "segment file(s) in segments/");
}

/// What a creation that crashed before `CURRENT` leaves (an empty WAL, an empty
/// `segments/`) is still finished into a new store: only a store's data stops it.
#[test]
fn a_creation_that_crashed_before_current_is_finished() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path(), opts()).unwrap());
    std::fs::remove_file(dir.path().join("CURRENT")).unwrap();
    assert_eq!(
        file_len(&dir.path().join("00000001.wal")),
        wal::WAL_HEADER_LEN as u64
    );
    let mut s = Store::open(dir.path(), opts()).unwrap();
    assert!(s.recovery_report().created);
    commit(&mut s, 1, &[("w", &data(1, 100))]);
}

/// Every file content of `before` is somewhere in `after` (at its path or in lost+found/).
fn assert_nothing_lost(before: &BTreeMap<PathBuf, Vec<u8>>, after: &BTreeMap<PathBuf, Vec<u8>>) {
    let have: std::collections::HashSet<&Vec<u8>> = after.values().collect();
    for (p, b) in before {
        assert!(
            have.contains(b),
            "{} ({} bytes) was lost",
            p.display(),
            b.len()
        );
    }
}

/// A store whose last WAL records are a Delete and the Relocate record of the compaction after
/// it. Returns (WAL offset of the Delete record, offset of the Relocate record, the Relocate
/// outputs' paths and bytes).
fn store_ending_in_a_relocate(dir: &Path) -> (usize, usize, Vec<(PathBuf, Vec<u8>)>) {
    let frozen = data(100, 2 * CHUNK);
    let mut s = Store::open(dir, opts()).unwrap();
    for step in 1..=3u64 {
        let big = data(step, if step == 1 { 12 * CHUNK } else { CHUNK });
        commit(&mut s, step, &[("frozen", &frozen), ("w", &big)]);
    }
    let delete_at = file_len(&live_wal(dir)) as usize;
    s.delete(1).unwrap();
    let relocate_at = file_len(&live_wal(dir)) as usize;
    let g = s.gc().unwrap();
    assert_eq!(g.segments_compacted, vec![1], "{g:?}");
    assert!(!g.segments_written.is_empty());
    let outputs = g
        .segments_written
        .iter()
        .map(|&id| {
            let p = segment_path(dir, id);
            (p.clone(), std::fs::read(p).unwrap())
        })
        .collect();
    (delete_at, relocate_at, outputs)
}

/// Issue 14, items 1 and 3: a salvage cut every record after the damage and unlinked the
/// segments only they referenced — a Relocate record's outputs among them, the only copy of
/// the chunks it moved. Now it skips the damaged record, keeps the valid ones after it that
/// apply (the Relocate: its outputs stay live), and sets the old WAL aside.
#[test]
fn salvage_skips_the_damaged_record_and_keeps_a_relocate_records_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let (delete_at, _, outputs) = store_ending_in_a_relocate(dir.path());
    // Damage the Delete record: the Relocate record after it is valid, so this is corruption.
    let wal_path = live_wal(dir.path());
    let mut b = std::fs::read(&wal_path).unwrap();
    b[delete_at + wal::RECORD_HEADER_LEN] ^= 0x01;
    std::fs::write(&wal_path, &b).unwrap();
    let before = tree_without_lock(dir.path());
    assert!(matches!(
        Store::open(dir.path(), opts()),
        Err(Error::WalCorrupt { .. })
    ));
    assert_eq!(tree_without_lock(dir.path()), before);
    let salvage = Options {
        recovery_mode: RecoveryMode::PointInTime,
        ..opts()
    };
    let s = Store::open(dir.path(), salvage.clone()).unwrap();
    let r = s.recovery_report().clone();
    let why = r.salvaged_corruption.clone().unwrap();
    assert!(why.contains("1 valid record(s) after it"), "{why}");
    // The deletion was the damaged record: checkpoint 1 is back (damaged: compaction freed
    // its segment); 2 and 3 read back through the Relocate record's outputs.
    assert_eq!(
        s.list().iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    s.verify(2).unwrap();
    s.verify(3).unwrap();
    assert!(s.verify(1).is_err());
    for (p, bytes) in &outputs {
        assert_eq!(&std::fs::read(p).unwrap(), bytes, "{}", p.display());
    }
    let moved = dir.path().join("lost+found/00000001.wal");
    assert_eq!(std::fs::read(&moved).unwrap(), b, "the WAL as it was");
    assert_eq!(r.lost_found, vec![moved]);
    drop(s);
    let mut before = before;
    before.remove(Path::new("CURRENT")); // now names the salvaged WAL
    assert_nothing_lost(&before, &tree_without_lock(dir.path()));
    // The salvaged store reopens as it is, in the default mode.
    let s = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(s.list().len(), 3);
    s.verify(3).unwrap();
}

/// A Relocate record torn as the WAL's last record (a crash while it was being written) is
/// cut as a torn tail; its outputs, orphans now, used to be unlinked — with the sources
/// already freed by a compaction that did happen, they may be the only copy. Now they go to
/// lost+found/, and only the explicit purge deletes them.
#[test]
fn a_torn_relocate_records_outputs_go_to_lost_found() {
    let dir = tempfile::tempdir().unwrap();
    let (_, relocate_at, outputs) = store_ending_in_a_relocate(dir.path());
    let wal_path = live_wal(dir.path());
    let mut b = std::fs::read(&wal_path).unwrap();
    b[relocate_at + wal::RECORD_HEADER_LEN + 1] ^= 0x01;
    std::fs::write(&wal_path, &b).unwrap();
    let mut before = tree_without_lock(dir.path());
    before.retain(|p, _| p.starts_with("segments")); // the WAL's torn tail is cut
    let mut s = Store::open(dir.path(), opts()).unwrap();
    assert!(s.recovery_report().truncated_tail_bytes > 0);
    let lf = dir.path().join("lost+found");
    for (p, bytes) in &outputs {
        let moved = lf.join(p.file_name().unwrap());
        assert_eq!(
            &std::fs::read(&moved).unwrap(),
            bytes,
            "{}",
            moved.display()
        );
        assert!(std::fs::read_to_string(format!("{}.why", moved.display()))
            .unwrap()
            .contains("no committed record"));
    }
    assert_nothing_lost(&before, &tree_without_lock(dir.path()));
    let p = s.purge_lost_found().unwrap();
    assert_eq!(p.files.len(), 2 * outputs.len(), "{p:?}");
    assert!(s.lost_found().unwrap().is_empty());
}

/// An orphan segment (a transaction that crashed before its commit) is set aside, not
/// unlinked; a read-only open moves nothing.
#[test]
fn orphan_segments_go_to_lost_found_with_a_note() {
    let dir = tempfile::tempdir().unwrap();
    fs_store(dir.path());
    let orphan = segment_path(dir.path(), 77);
    std::fs::write(&orphan, b"not referenced by any commit").unwrap();
    let s = Store::open(dir.path(), Options::read_only()).unwrap();
    assert_eq!(s.recovery_report().orphan_segments, vec![orphan.clone()]);
    drop(s);
    assert!(orphan.exists());
    let s = Store::open(dir.path(), opts()).unwrap();
    let moved = dir
        .path()
        .join("lost+found")
        .join(orphan.file_name().unwrap());
    assert_eq!(s.recovery_report().lost_found, vec![moved.clone()]);
    assert!(!orphan.exists());
    assert_eq!(
        std::fs::read(&moved).unwrap(),
        b"not referenced by any commit"
    );
    assert!(std::fs::read_to_string(format!("{}.why", moved.display()))
        .unwrap()
        .contains("segment 77"));
    assert_eq!(s.lost_found().unwrap().len(), 2);
    assert_eq!(s.list().len(), 2);
}

// ---------------------------------------------------------------- hostile lengths

/// Issue 14, item 5: a CRC-valid manifest may claim a tensor far larger than memory (1 PiB,
/// as 2^20 compressed chunks of 1 GiB each, all the same 100 stored bytes). Reading it used
/// to abort the process in the allocator; now it is a typed error and nothing is allocated.
#[test]
fn a_manifest_claiming_a_1_pib_tensor_is_a_typed_error() {
    let (mem, ws) = mem_store();
    let s = Store::open(DIR, mem_read_only(&mem)).unwrap();
    let mut m = s.checkpoint(Selector::Id(2)).unwrap().manifest().clone();
    drop(s);
    let template = m.tensors[0].chunks[0].clone();
    let chunk = pb::ChunkRef {
        stored_len: 100,
        raw_len: 1 << 30,
        codec: pb::Codec::Zstd as i32,
        ..template
    };
    let mut t = m.tensors[0].clone();
    t.name = "huge".into();
    t.shape = vec![1 << 50];
    t.nbytes = 1 << 50;
    t.chunks = vec![chunk; 1 << 20];
    m.id = 3;
    m.step = 3;
    m.new_segments.clear();
    m.tensors.push(t);
    let wal = Path::new(DIR).join("00000001.wal");
    let mut bytes = mem.read_file(&wal).unwrap();
    let payload = pb::CommitRecord { manifest: Some(m) }.encode_to_vec();
    assert!(payload.len() < wal::MAX_RECORD_LEN as usize);
    let salt = wal_salt(&bytes);
    wal::encode_record(&mut bytes, salt, RecordType::Commit, &payload);
    mem.write_file(&wal, bytes);
    let s = Store::open(DIR, mem_read_only(&mem)).unwrap();
    let ck = s.checkpoint(Selector::Id(3)).unwrap();
    match ck.tensor("huge") {
        Err(Error::TooLarge { what, bytes }) => {
            assert_eq!(bytes, 1 << 50);
            assert!(
                what.contains("\"huge\"") && what.contains("checkpoint 3"),
                "{what}"
            );
        }
        other => panic!("{:?}", other.map(|t| t.data.len())),
    }
    // The rest of the checkpoint still reads.
    assert_eq!(ck.tensor("w").unwrap().data, ws[1]);
}

/// A sparse WAL file claiming a petabyte is a typed error, not an allocation abort.
#[test]
fn a_sparse_petabyte_wal_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    fs_store(dir.path());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("00000001.wal"))
        .unwrap();
    if f.set_len(1 << 50).is_err() {
        return; // a file system without petabyte sparse files: nothing to check
    }
    drop(f);
    for o in [opts(), Options::read_only()] {
        match Store::open(
            dir.path(),
            Options {
                chunk_size: CHUNK,
                ..o
            },
        ) {
            Err(Error::TooLarge { bytes, .. }) => assert_eq!(bytes, 1 << 50),
            other => panic!("{other:?}"),
        }
    }
}

/// A `CURRENT` far longer than a pointer is a bad header, read no further.
#[test]
fn an_oversized_current_is_a_bad_header() {
    let dir = tempfile::tempdir().unwrap();
    fs_store(dir.path());
    let cur = dir.path().join("CURRENT");
    let mut b = std::fs::read(&cur).unwrap();
    b.resize(1 << 20, 0);
    std::fs::write(&cur, b).unwrap();
    match Store::open(dir.path(), opts()) {
        Err(Error::BadHeader { what, .. }) => assert_eq!(what, "CURRENT"),
        other => panic!("{other:?}"),
    }
}

/// Issue 14, item 5: after a bad record the scanner looks for a valid frame at every later
/// offset, to tell a torn tail from damage. A crafted tail whose every 16th offset is a
/// well-formed frame claiming ~64 MiB made that O(tail × 64 MiB): a 128 MiB WAL hung every
/// open. The search is budgeted now; past the budget the tail is not provably torn and the
/// open refuses it as corruption (a salvage would keep everything before it). How fast: see
/// docs/BENCHMARKS.md; this test checks the outcome only.
#[test]
fn a_crafted_128_mib_wal_tail_is_refused_without_a_quadratic_search() {
    let (mem, _) = mem_store();
    let wal_path = Path::new(DIR).join("00000001.wal");
    let mut bytes = mem.read_file(&wal_path).unwrap();
    let bad_at = bytes.len();
    // A bad frame (nonzero reserved bytes), then 128 MiB of 16-byte cells: crc, a length of
    // up to 64 MiB that stays inside the file, type 1 and zero reserved bytes, filler.
    bytes.extend_from_slice(&[0xee; 12]);
    let cells = (128usize << 20) / 16;
    bytes.reserve(cells * 16);
    for i in 0..cells {
        let left = ((cells - i) * 16 - 12) as u32;
        let len = left.min(wal::MAX_RECORD_LEN);
        bytes.extend_from_slice(&(i as u32).to_le_bytes());
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&[1, 0, 0, 0]);
        bytes.extend_from_slice(&[0xab; 4]);
    }
    mem.write_file(&wal_path, bytes);
    let before = mem_files(&mem);
    match Store::open(DIR, mem_opts(&mem)) {
        Err(Error::WalCorrupt { offset, reason, .. }) => {
            assert_eq!(offset, bad_at as u64);
            assert!(reason.contains("stopped after checksumming"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(mem_files(&mem), before);
}

// ---------------------------------------------------------------- a store from a newer build

/// Rewrites the header of `dir`'s live WAL to declare `features` (what a newer build that
/// turned them on writes), keeping its salt and file number.
fn set_wal_features(dir: &Path, features: ckptstore::features::FeatureSet) {
    let wal = live_wal(dir);
    let mut b = std::fs::read(&wal).unwrap();
    let h = wal::WalHeader {
        features,
        ..wal::WalHeader::decode(&b).unwrap()
    };
    b[..wal::WAL_HEADER_LEN].copy_from_slice(&h.encode());
    std::fs::write(&wal, b).unwrap();
}

/// Appends a CRC-valid record of type `ty` (one this build does not know) to `dir`'s WAL.
fn append_unknown_record(dir: &Path, ty: u8) {
    let wal = live_wal(dir);
    let mut b = std::fs::read(&wal).unwrap();
    let salt = wal_salt(&b);
    let payload = b"a newer build's record";
    let mut fields = [0u8; 8];
    fields[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    fields[4] = ty;
    let mut crc_in = salt.to_le_bytes().to_vec();
    crc_in.extend_from_slice(&fields);
    crc_in.extend_from_slice(payload);
    b.extend_from_slice(&crc32c(&crc_in).to_le_bytes());
    b.extend_from_slice(&fields);
    b.extend_from_slice(payload);
    std::fs::write(&wal, b).unwrap();
}

/// Issue 14, item 4: a store from a newer build that uses an incompatible feature this build
/// lacks is refused as newer — `NewerFormat` naming the feature bit, never `WalCorrupt` and
/// never a salvage hint — by every open (writer, reader, salvage), and nothing changes. Even
/// with records of an unknown type after it: the header decides first.
#[test]
fn a_store_from_a_newer_build_is_refused_as_newer_not_corrupt() {
    use ckptstore::features::FeatureSet;
    let dir = tempfile::tempdir().unwrap();
    fs_store(dir.path());
    set_wal_features(
        dir.path(),
        FeatureSet {
            incompat: 1 << 15,
            ..FeatureSet::EMPTY
        },
    );
    append_unknown_record(dir.path(), 200);
    let before = tree_without_lock(dir.path());
    for mode in [
        RecoveryMode::TolerateTailCorruption,
        RecoveryMode::PointInTime,
        RecoveryMode::AbsoluteConsistency,
    ] {
        for ro in [false, true] {
            let o = Options {
                read_only: ro,
                recovery_mode: mode,
                ..opts()
            };
            match Store::open(dir.path(), o) {
                Err(e @ Error::NewerFormat { .. }) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains(
                            "written by a newer ckptstore: needs incompatible feature bit 15"
                        ),
                        "{msg}"
                    );
                    assert!(msg.contains("00000001.wal"), "{msg}");
                    assert!(!msg.contains("salvage"), "{msg}");
                    assert!(!msg.contains("read-only"), "{msg}");
                }
                other => panic!("{mode:?} ro={ro}: {other:?}"),
            }
        }
    }
    assert_eq!(tree_without_lock(dir.path()), before, "the store changed");
    // With CURRENT lost too, the refusal says what the WAL is.
    std::fs::remove_file(dir.path().join("CURRENT")).unwrap();
    assert_current_missing_refused(
        dir.path(),
        "written by a newer ckptstore: needs incompatible feature bit 15",
    );
}

/// A read-only-compatible feature this build lacks: read-only opens read it (skipping the
/// feature's records), a writer is refused as newer with the read-only hint.
#[test]
fn a_store_with_an_unknown_read_only_compatible_feature_opens_read_only() {
    use ckptstore::features::FeatureSet;
    let dir = tempfile::tempdir().unwrap();
    fs_store(dir.path());
    set_wal_features(
        dir.path(),
        FeatureSet {
            ro_compat: 1 << 9,
            ..FeatureSet::EMPTY
        },
    );
    append_unknown_record(dir.path(), 201);
    let before = tree_without_lock(dir.path());
    match Store::open(dir.path(), opts()) {
        Err(e @ Error::NewerFormat { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains(
                    "written by a newer ckptstore: needs read-only-compatible feature bit 9"
                ),
                "{msg}"
            );
            assert!(msg.contains("open it read-only"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(tree_without_lock(dir.path()), before);
    let s = Store::open(dir.path(), Options::read_only()).unwrap();
    assert_eq!(s.recovery_report().unknown_records_skipped, 1);
    assert_holds(&s, 2, &[("w", &data(2, 3 * CHUNK))]);
    assert_eq!(s.features().ro_compat, 1 << 9);
    drop(s);
    assert_eq!(tree_without_lock(dir.path()), before);
}

/// A compatible feature this build lacks: the store opens read-write, the feature's records
/// are skipped, and the bit survives this build's WAL compaction.
#[test]
fn a_store_with_an_unknown_compatible_feature_opens_and_keeps_the_bit() {
    let dir = tempfile::tempdir().unwrap();
    fs_store(dir.path());
    // This build's own features (the store was created with them) plus one it lacks.
    let mut f = wal::WalHeader::decode(&std::fs::read(live_wal(dir.path())).unwrap())
        .unwrap()
        .features;
    f.compat |= 1 << 12;
    set_wal_features(dir.path(), f);
    append_unknown_record(dir.path(), 202);
    let mut s = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(s.recovery_report().unknown_records_skipped, 1);
    commit(&mut s, 3, &[("w", &data(3, 3 * CHUNK))]);
    s.compact_wal().unwrap();
    assert_eq!(s.features(), f);
    drop(s);
    let b = std::fs::read(live_wal(dir.path())).unwrap();
    assert_eq!(wal::WalHeader::decode(&b).unwrap().features, f);
    // Compatible bits alone keep the header at version 1, which builds before the flags read.
    assert_eq!(&b[8..10], &[1, 0]);
    let s = Store::open(dir.path(), opts()).unwrap();
    assert_holds(&s, 3, &[("w", &data(3, 3 * CHUNK))]);
}

/// A chunk of a frozen tensor that 10 checkpoints share rots on disk: `scrub` reports all 10
/// as broken (and `latest_valid` finds none), one save of the same tensor heals all 10 —
/// bit-exact, and after a reopen.
#[test]
fn a_bad_chunk_shared_by_10_checkpoints_is_reported_for_all_and_one_save_heals_all() {
    let dir = tempfile::tempdir().unwrap();
    let frozen = data(77, 3 * CHUNK);
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let mut own = BTreeMap::new();
    for step in 1..=10u64 {
        let w = data(500 + step, 100);
        let id = commit(&mut s, step, &[("frozen", &frozen), ("w", &w)])
            .checkpoint
            .id;
        own.insert(id, w);
    }
    let m = s.checkpoint(Selector::Id(1)).unwrap().manifest().clone();
    let bad = m.tensors[0].chunks[2].clone();
    let seg = dir
        .path()
        .join("segments")
        .join(format!("{:08}.seg", bad.segment));
    let mut b = std::fs::read(&seg).unwrap();
    b[bad.offset as usize + 99] ^= 0x80;
    std::fs::write(&seg, b).unwrap();

    let r = s.scrub().unwrap();
    assert_eq!(r.heal.quarantined, vec![(bad.segment, bad.offset)]);
    assert_eq!(r.heal.unhealed.len(), 1);
    assert_eq!(r.heal.broken_checkpoints(), (1..=10).collect::<Vec<u64>>());
    let broken: Vec<u64> = r.broken.iter().map(|b| b.0).collect();
    assert_eq!(
        broken,
        (1..=10).collect::<Vec<u64>>(),
        "all 10 are reported"
    );
    assert!(r.broken.iter().all(|(_, e)| e.contains("BLAKE3")), "{r:?}");
    assert_eq!(s.latest_valid().unwrap(), None);

    let info = commit(&mut s, 11, &[("frozen", &frozen)]);
    assert_eq!(info.chunks_written, 1, "one fresh copy");
    let check = |s: &Store| {
        for (id, w) in &own {
            assert_holds(s, *id, &[("frozen", &frozen), ("w", w)]);
        }
        assert!(s.quarantined().is_empty());
    };
    check(&s);
    assert!(s.scrub().unwrap().broken.is_empty());
    drop(s);
    check(&Store::open(dir.path(), Options::read_only()).unwrap());
}

/// A CRC-valid Quarantine record whose heal points a chunk at bytes with another BLAKE3 is a
/// bad record: the open is refused naming it, never a checkpoint silently rewired.
#[test]
fn a_quarantine_record_healing_onto_other_bytes_refuses_the_open() {
    let mem = MemIo::new();
    let mut s = Store::open(DIR, mem_opts(&mem)).unwrap();
    commit(&mut s, 1, &[("a", &data(1, 100))]);
    commit(&mut s, 2, &[("b", &data(2, 100))]);
    let a = s.checkpoint(Selector::Id(1)).unwrap().manifest().tensors[0].chunks[0].clone();
    let b = s.checkpoint(Selector::Id(2)).unwrap().manifest().tensors[0].chunks[0].clone();
    s.enable_feature(&ckptstore::features::QUARANTINE).unwrap();
    let wal_path = PathBuf::from(DIR).join(ckptstore::store::wal_file_name(2));
    drop(s);
    let mut bytes = mem.read_file(&wal_path).unwrap();
    let salt = wal_salt(&bytes);
    let rec = pb::QuarantineRecord {
        bad: vec![a.clone()],
        healed: vec![pb::ChunkHeal {
            from_segment: a.segment,
            from_offset: a.offset,
            to: Some(b),
        }],
    };
    wal::encode_record(
        &mut bytes,
        salt,
        RecordType::Quarantine,
        &rec.encode_to_vec(),
    );
    let f = mem.open(&wal_path, true).unwrap();
    f.write_at(&bytes, 0).unwrap();
    match Store::open(DIR, mem_read_only(&mem)) {
        Err(e @ Error::BadManifest { .. }) => {
            assert!(e.to_string().contains("other bytes"), "{e}")
        }
        other => panic!("{other:?}"),
    }
}

/// A 128 MiB zero tail after the last record — what a power cut leaves when the io_uring
/// backend's reserve (fallocate ahead of direct writes) reached the disk and its trim did not:
/// a torn tail, cut by the writer's open; every checkpoint is kept and the WAL takes commits
/// again. How fast: `cargo bench --bench hostile_wal` (case `zeros`).
#[test]
fn a_128_mib_zero_tail_of_the_wal_is_cut_as_torn_and_loses_nothing() {
    let (mem, ws) = mem_store();
    let wal_path = Path::new(DIR).join("00000001.wal");
    let mut bytes = mem.read_file(&wal_path).unwrap();
    let end = bytes.len();
    bytes.resize(end + (128 << 20), 0);
    mem.write_file(&wal_path, bytes);
    let s = Store::open(DIR, mem_read_only(&mem)).unwrap();
    assert_eq!(s.list().len(), 2);
    drop(s);
    let mut s = Store::open(DIR, mem_opts(&mem)).unwrap();
    assert_eq!(s.list().len(), 2);
    assert_eq!(
        mem.read_file(&wal_path).unwrap().len(),
        end,
        "the tail is cut"
    );
    assert_holds(&s, 2, &[("w", &ws[1])]);
    commit(&mut s, 3, &[("w", &ws[0])]);
    drop(s);
    let s = Store::open(DIR, mem_opts(&mem)).unwrap();
    assert_eq!(s.list().len(), 3);
}

/// 128 MiB of whole, well-formed records whose checksums are all wrong: damage (more than one
/// record cannot be in flight), refused at the first one without a search, and nothing is
/// changed. How fast: `cargo bench --bench hostile_wal` (case `bad_crc_records`).
#[test]
fn a_128_mib_run_of_records_with_bad_checksums_is_refused_and_changes_nothing() {
    let (mem, _) = mem_store();
    let wal_path = Path::new(DIR).join("00000001.wal");
    let mut bytes = mem.read_file(&wal_path).unwrap();
    let bad_at = bytes.len();
    let payload = vec![0x5au8; 4096 - wal::RECORD_HEADER_LEN];
    for i in 0..(128usize << 20) / 4096 {
        bytes.extend_from_slice(&(i as u32).to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&[1, 0, 0, 0]);
        bytes.extend_from_slice(&payload);
    }
    mem.write_file(&wal_path, bytes);
    let before = mem_files(&mem);
    match Store::open(DIR, mem_opts(&mem)) {
        Err(Error::WalCorrupt { offset, reason, .. }) => {
            assert_eq!(offset, bad_at as u64);
            assert!(reason.contains("another whole record follows"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(mem_files(&mem), before);
}

/// Issue 14, item 5 (`read_all` had no cap on small-by-format files): a second writer finding
/// the store locked reads the holder's pid from `LOCK` to name it in the error. A `LOCK` grown
/// to 8 MiB (crafted, or written by something else) was read whole into that message; now it
/// is read no further than a pid can be, and the holder is "unknown".
#[test]
fn regression_an_oversized_lock_file_is_not_read_into_the_locked_error() {
    let dir = tempfile::tempdir().unwrap();
    let _writer = Store::open(dir.path(), opts()).unwrap();
    std::fs::write(dir.path().join("LOCK"), vec![b'7'; 8 << 20]).unwrap();
    match Store::open(dir.path(), opts()) {
        Err(Error::Locked { pid, .. }) => assert_eq!(pid, "unknown"),
        other => panic!("{:?}", other.map(|s| s.list().len())),
    }
}

/// After every damaged record it skips, a salvage searches for the next valid one. Each search
/// had a budget of its own, so a crafted WAL of many short damaged stretches — a bad frame, two
/// frame headers each claiming the rest of the file, one checksummed record — cost
/// O(stretches × file) of checksumming (here ~20,000 × 1.5 MiB × 4: a hang). The searches of
/// one salvage now share one budget (twice the file plus one largest record); the salvage ends
/// keeping what it proved, and nothing is deleted.
#[test]
fn a_salvage_of_many_damaged_stretches_shares_one_search_budget() {
    let (mem, ws) = mem_store();
    let wal_path = Path::new(DIR).join("00000001.wal");
    let mut bytes = mem.read_file(&wal_path).unwrap();
    let salt = wal_salt(&bytes);
    let mut record = Vec::new();
    wal::encode_record(&mut record, salt, RecordType::Delete, &[0xff; 20]);
    let stretches = 20_000usize;
    let stretch = wal::RECORD_HEADER_LEN + 32 + record.len();
    let end = bytes.len() + stretches * stretch;
    for _ in 0..stretches {
        bytes.extend_from_slice(&[0xee; wal::RECORD_HEADER_LEN]);
        for _ in 0..2 {
            let rest = (end - bytes.len() - wal::RECORD_HEADER_LEN) as u32;
            bytes.extend_from_slice(&0xdead_beefu32.to_le_bytes());
            bytes.extend_from_slice(&rest.to_le_bytes());
            bytes.extend_from_slice(&[1, 0, 0, 0, 0xab, 0xab, 0xab, 0xab]);
        }
        bytes.extend_from_slice(&record);
    }
    assert_eq!(bytes.len(), end);
    mem.write_file(&wal_path, bytes);
    assert!(matches!(
        Store::open(DIR, mem_opts(&mem)),
        Err(Error::WalCorrupt { .. })
    ));
    let salvage = Options {
        recovery_mode: RecoveryMode::PointInTime,
        ..mem_opts(&mem)
    };
    let s = Store::open(DIR, salvage).unwrap();
    assert!(s.recovery_report().salvaged_corruption.is_some());
    assert_eq!(s.list().len(), 2);
    assert_holds(&s, 2, &[("w", &ws[1])]);
}
