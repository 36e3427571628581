//! Opening a store: find the live WAL through `CURRENT`, replay it, repair a torn tail, check
//! the segments, remove orphans. Reads metadata only. Every repair is idempotent, so a crash
//! during recovery is recovered by the next open.

use super::files::{self, WalWriter, SEGMENTS_DIR};
use super::lease;
use super::lost_found;
use super::state::State;
use super::{Options, RecoveryMode};
use crate::current::{self, CurrentDecodeError};
use crate::error::{Error, Result};
use crate::features::FeatureSet;
use crate::io::Storage;
use crate::manifest;
use crate::segment::{self, DecodeError};
use crate::wal::{self, HeaderError, RecordType, WalHeader};
use ckptstore_proto::v1 as pb;
use prost::Message;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What recovery found and did.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// The store was created by this open.
    pub created: bool,
    /// The live WAL file.
    pub wal_file: PathBuf,
    /// Records replayed.
    pub records_replayed: usize,
    /// Records of a type this build does not know, skipped because the WAL header declares a
    /// compatible or read-only-compatible feature this build lacks (docs/FORMAT.md, "Feature
    /// flags").
    pub unknown_records_skipped: usize,
    /// Bytes of a torn WAL tail that were cut off (0 if the log ended cleanly).
    pub truncated_tail_bytes: u64,
    /// Why the torn tail's first record was rejected.
    pub truncated_tail_reason: Option<String>,
    /// Records dropped after corruption, only in `RecoveryMode::PointInTime`.
    pub salvaged_corruption: Option<String>,
    /// Segment files no committed record references, moved to `lost+found/` (or, read-only,
    /// found).
    pub orphan_segments: Vec<PathBuf>,
    /// Of those, the ones a live reader's lease still holds: kept, and freed by a later
    /// delete, `gc` or open once the lease is gone (docs/GUARANTEES.md, "Readers").
    pub orphans_leased: Vec<PathBuf>,
    /// Their total size in bytes.
    pub orphan_bytes: u64,
    /// Other leftovers: old WAL files (moved to `lost+found/`), a stale `CURRENT.tmp` (removed).
    pub stale_files: Vec<PathBuf>,
    /// Where recovery set files aside instead of deleting them (`lost+found/`, see
    /// [`super::Store::purge_lost_found`]): orphan segments, stale WAL files, the WAL as it
    /// was before a salvage cut it.
    pub lost_found: Vec<PathBuf>,
    /// Referenced segments that are missing or shorter than committed, with the problem.
    pub damaged_segments: Vec<(u64, String)>,
    /// Checkpoints live after recovery.
    pub checkpoints: usize,
    /// Wall time of the whole open.
    pub duration: Duration,
}

pub(crate) struct Recovered {
    pub state: State,
    /// The features the live WAL's header declares.
    pub features: FeatureSet,
    pub wal: Option<WalWriter>,
    pub report: RecoveryReport,
    /// Unreferenced segments kept for live readers (id → bytes): freed later.
    pub pending_free: BTreeMap<u64, u64>,
}

/// Largest `CURRENT` read (it is 24 bytes; anything past 4 KiB is no pointer).
pub(super) const MAX_CURRENT_LEN: u64 = 4096;

fn not_found(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
}

/// How often a read-only open retries when `CURRENT` moved on while it read.
const READ_ONLY_ATTEMPTS: usize = 16;

/// Runs recovery on `dir`. A writer repairs; a read-only open only reads.
///
/// A read-only open may race the writer's WAL compaction: it reads `CURRENT`, the writer
/// switches it to a new WAL and removes the old one, the open finds the old one gone. Then
/// `CURRENT` names another file: read again. Only a `CURRENT` that still names the missing
/// file is `CurrentDangling`.
pub(crate) fn recover(io: &dyn Storage, dir: &Path, opts: &Options) -> Result<Recovered> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match recover_once(io, dir, opts) {
            Err(Error::CurrentDangling { path, target })
                if opts.read_only && attempt < READ_ONLY_ATTEMPTS =>
            {
                let now = files::read_small(io, &path, MAX_CURRENT_LEN)
                    .ok()
                    .and_then(|b| current::decode(&b).ok())
                    .map(files::wal_file_name);
                if now.as_ref().is_some_and(|n| *n != target) {
                    continue;
                }
                return Err(Error::CurrentDangling { path, target });
            }
            r => return r,
        }
    }
}

fn recover_once(io: &dyn Storage, dir: &Path, opts: &Options) -> Result<Recovered> {
    let started = Instant::now();
    let writable = !opts.read_only;
    let mut report = RecoveryReport::default();
    let current_path = dir.join(current::CURRENT_NAME);

    let current_bytes = match files::read_small(io, &current_path, MAX_CURRENT_LEN) {
        Ok(b) => Some(b),
        Err(Error::Io { source, .. }) if not_found(&source) => None,
        // Longer than any CURRENT this build or a later one writes: not a pointer.
        Err(Error::TooLarge { .. }) => {
            return Err(Error::BadHeader {
                path: current_path,
                what: "CURRENT",
            })
        }
        Err(e) => return Err(e),
    };
    let wal_number = match current_bytes {
        None => {
            return initialize(io, dir, opts, report, started);
        }
        Some(b) => match current::decode(&b) {
            Ok(n) => n,
            Err(CurrentDecodeError::Corrupt) => {
                return Err(Error::BadHeader {
                    path: current_path,
                    what: "CURRENT",
                })
            }
            Err(CurrentDecodeError::NewerVersion(v)) => {
                return Err(Error::UnsupportedVersion {
                    path: current_path,
                    found: v as u32,
                    supported: current::CURRENT_VERSION as u32,
                })
            }
        },
    };

    let wal_path = dir.join(files::wal_file_name(wal_number));
    report.wal_file = wal_path.clone();
    let buf = match files::read_all(io, &wal_path) {
        Ok(b) => b,
        Err(Error::Io { source, .. }) if not_found(&source) => {
            return Err(Error::CurrentDangling {
                path: current_path,
                target: files::wal_file_name(wal_number),
            })
        }
        Err(e) => return Err(e),
    };
    let header = match WalHeader::decode(&buf) {
        Ok(h) if h.file_number == wal_number => h,
        Ok(_) | Err(HeaderError::Corrupt) => {
            return Err(Error::BadHeader {
                path: wal_path,
                what: "WAL",
            })
        }
        Err(HeaderError::NewerVersion(v)) => {
            return Err(Error::UnsupportedVersion {
                path: wal_path,
                found: v as u32,
                supported: wal::WAL_VERSION as u32,
            })
        }
    };

    // The header's features decide before any record is read: a store that needs a feature
    // this build lacks is a newer store, never damage.
    if let Some(missing) = header.features.blocking(opts.read_only) {
        return Err(Error::NewerFormat {
            path: wal_path,
            features: missing.to_string(),
            read_only_would_open: missing.incompat == 0,
        });
    }
    let skip_unknown = header.features.may_hold_unknown_records();
    let scan = wal::scan_with(&buf, wal::WAL_HEADER_LEN as u64, header.salt, skip_unknown);
    let valid_end = scan.valid_end;
    if let Some(bad) = &scan.bad {
        match (bad.valid_record_after, opts.recovery_mode) {
            (true, RecoveryMode::PointInTime) => {
                report.salvaged_corruption = Some(format!(
                    "dropped everything from offset {} ({})",
                    bad.offset, bad.reason
                ));
            }
            (true, _) => {
                return Err(Error::WalCorrupt {
                    path: wal_path,
                    offset: bad.offset,
                    reason: bad.reason.clone(),
                })
            }
            (false, RecoveryMode::AbsoluteConsistency) => {
                return Err(Error::WalTornTail {
                    path: wal_path,
                    offset: bad.offset,
                    reason: bad.reason.clone(),
                })
            }
            (false, _) => {
                report.truncated_tail_reason = Some(bad.reason.clone());
            }
        }
        report.truncated_tail_bytes = buf.len() as u64 - bad.offset;
    }

    let mut state = State::new();
    for (i, rec) in scan.records.iter().enumerate() {
        apply_record(&mut state, rec, &buf, &wal_path, i == 0)?;
    }
    // A salvage keeps every valid record after the damage that applies to the state (a
    // record that does not — it depends on what the damage took — is skipped too).
    let mut kept_after = 0usize;
    if let (Some(bad), RecoveryMode::PointInTime) = (&scan.bad, opts.recovery_mode) {
        if bad.valid_record_after {
            let mut skipped = vec![bad.offset];
            let mut at = bad.offset;
            // One checksum budget for every search of the salvage: bounded by the file, not
            // by the number of damaged stretches in it.
            let mut budget = wal::SearchBudget::for_file(buf.len());
            while let Some(p) = (!wal::newer_record_at(&buf, at, header.salt))
                .then(|| wal::resync_within(&buf, at, header.salt, &mut budget))
                .flatten()
            {
                let more = wal::scan_from_within(&buf, p, header.salt, skip_unknown, &mut budget);
                for rec in &more.records {
                    // No trial copy of the state: every record type is validated in full
                    // before it changes anything (State::apply_*), so a record that does not
                    // apply leaves the state as it was. Linear in the records, not
                    // O(records x state) (regression: salvage_clones_no_state_per_record).
                    match apply_record(&mut state, rec, &buf, &wal_path, false) {
                        Ok(()) => kept_after += 1,
                        Err(_) => skipped.push(rec.offset),
                    }
                }
                match more.bad {
                    Some(b) if b.valid_record_after => {
                        skipped.push(b.offset);
                        at = b.offset;
                    }
                    _ => break,
                }
            }
            if kept_after > 0 {
                report.truncated_tail_bytes = 0;
            }
            if kept_after > 0 {
                report.truncated_tail_bytes = 0;
            }
            report.salvaged_corruption = Some(format!(
                "skipped the damaged or inconsistent record(s) at offset(s) {skipped:?} (first: \
                 {}); kept {} record(s) before the damage and {kept_after} valid record(s) \
                 after it",
                bad.reason,
                scan.records.len()
            ));
        }
    }
    report.records_replayed = scan.records.len() + kept_after;
    report.unknown_records_skipped = scan.skipped_unknown.len();
    state.drop_unreferenced_segments();

    let mut live_wal = wal_number;
    let wal = if writable && kept_after > 0 {
        // The kept records are not contiguous in the old file: write the state as a new WAL
        // (as a WAL compaction does), switch CURRENT to it, set the old one aside.
        live_wal = wal_number.checked_add(1).ok_or_else(|| Error::BadHeader {
            path: dir.join(current::CURRENT_NAME),
            what: "CURRENT",
        })?;
        let new = WalWriter::create_durable(
            io,
            dir,
            live_wal,
            header.features,
            &state.compacted_records(),
        )?;
        files::switch_current_atomically(io, dir, live_wal)?;
        let why = format!(
            "{} as it was before `recover --salvage` ({}); the store's WAL is now {}",
            files::wal_file_name(wal_number),
            report.salvaged_corruption.as_deref().unwrap_or_default(),
            files::wal_file_name(live_wal)
        );
        if let Some(dest) = lost_found::move_in(io, dir, &wal_path, &why)? {
            report.lost_found.push(dest);
        }
        report.wal_file = new.path.clone();
        Some(new)
    } else if writable {
        let file = io
            .open(&wal_path, true)
            .map_err(|e| Error::io("open", &wal_path, e))?;
        if report.salvaged_corruption.is_some() {
            // A salvage drops valid records after the damage: keep the WAL as it was.
            let why = format!(
                "{} before `recover --salvage` cut it at offset {valid_end}: {}",
                files::wal_file_name(wal_number),
                report.salvaged_corruption.as_deref().unwrap_or_default()
            );
            let name = format!("{}.before-salvage", files::wal_file_name(wal_number));
            report
                .lost_found
                .push(lost_found::save_copy(io, dir, &name, &buf, &why)?);
        }
        if scan.bad.is_some() {
            file.set_len(valid_end)
                .map_err(|e| Error::io("truncate", &wal_path, e))?;
        }
        // Make what was replayed durable before anything builds on it: a writer that crashed
        // after a failed fdatasync may have left its last record only in the page cache. After
        // a failed writeback the kernel marks those pages clean, so an fdatasync alone would
        // report success without writing them (fsyncgate): rewrite the record first. Only the
        // last one can be in that state — a writer appends nothing after a failed sync — and
        // rewriting identical bytes leaves each sector old or new, i.e. unchanged.
        if let Some(last) = scan.records.last() {
            file.write_at(&buf[last.offset as usize..valid_end as usize], last.offset)
                .map_err(|e| Error::io("write", &wal_path, e))?;
        }
        file.sync_data()
            .map_err(|e| Error::io("fdatasync", &wal_path, e))?;
        Some(WalWriter {
            file,
            path: wal_path.clone(),
            number: wal_number,
            salt: header.salt,
            end: valid_end,
        })
    } else {
        None
    };

    let pending_free = check_segments(io, dir, opts, &mut state, &mut report)?;
    if writable {
        remove_leftovers(io, dir, live_wal, &mut report)?;
    }
    report.checkpoints = state.checkpoints.len();
    report.duration = started.elapsed();
    Ok(Recovered {
        state,
        features: header.features,
        wal,
        report,
        pending_free,
    })
}

/// The directory holding `path`'s entry: its parent, `.` for a relative name without one.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        Some(_) => Path::new("."),
        None => path,
    }
}

/// Creates the store directory `dir` and any missing ancestors, making each new entry
/// durable (an fsync of the directory holding it, `.` for a relative path), so a power cut
/// after the first commit cannot lose the path to it.
pub(crate) fn create_store_dir(io: &dyn Storage, dir: &Path) -> Result<()> {
    let mut missing = Vec::new();
    for anc in dir.ancestors() {
        if anc.as_os_str().is_empty() || io.exists(anc).map_err(|e| Error::io("stat", anc, e))? {
            break;
        }
        missing.push(anc);
    }
    if missing.is_empty() {
        return Ok(());
    }
    io.create_dir_all(dir)
        .map_err(|e| Error::io("create dir", dir, e))?;
    for d in missing.iter().rev() {
        let parent = parent_dir(d);
        io.sync_dir(parent)
            .map_err(|e| Error::io("fsync dir", parent, e))?;
    }
    Ok(())
}

/// Creates a new store (or finishes a creation that crashed before `CURRENT` was durable).
fn initialize(
    io: &dyn Storage,
    dir: &Path,
    opts: &Options,
    mut report: RecoveryReport,
    started: Instant,
) -> Result<Recovered> {
    // No CURRENT: either a new directory, or a creation that crashed before CURRENT became
    // durable (then the directory holds at most an empty WAL, an empty `segments/` and the
    // lock). Anything more means a store whose CURRENT was lost: refuse, change nothing.
    let names = match io.list(dir) {
        Ok(n) => n,
        Err(e) if not_found(&e) && !opts.read_only => Vec::new(),
        Err(e) if not_found(&e) => {
            return Err(Error::NotFound(format!(
                "store at {} (no such directory)",
                dir.display()
            )))
        }
        Err(e) => return Err(Error::io("list", dir, e)),
    };
    let found = store_contents(io, dir, &names)?;
    if !found.is_empty() {
        return Err(Error::CurrentMissing {
            path: dir.to_path_buf(),
            found: found.join("; "),
        });
    }
    if opts.read_only {
        return Err(Error::NotFound(format!(
            "store at {} (no CURRENT file)",
            dir.display()
        )));
    }
    io.create_dir_all(&dir.join(SEGMENTS_DIR))
        .map_err(|e| Error::io("create dir", dir.join(SEGMENTS_DIR), e))?;
    // The store directory's own entry, even if it existed before this open (made by a crashed
    // creation, or by `mkdir` just before).
    let parent = parent_dir(dir);
    io.sync_dir(parent)
        .map_err(|e| Error::io("fsync dir", parent, e))?;
    let wal = WalWriter::create_durable(io, dir, 1, crate::features::NEW_STORE, &[])?;
    files::switch_current_atomically(io, dir, 1)?;
    report.created = true;
    report.wal_file = wal.path.clone();
    let mut state = State::new();
    let pending_free = check_segments(io, dir, opts, &mut state, &mut report)?;
    remove_leftovers(io, dir, 1, &mut report)?;
    report.duration = started.elapsed();
    Ok(Recovered {
        state,
        features: crate::features::NEW_STORE,
        wal: Some(wal),
        report,
        pending_free,
    })
}

/// Applies one replayed WAL record to `state` (`first`: the file's first record, the only
/// place a snapshot may be).
fn apply_record(
    state: &mut State,
    rec: &wal::ScannedRecord,
    buf: &[u8],
    wal_path: &Path,
    first: bool,
) -> Result<()> {
    let payload = &buf[rec.payload.clone()];
    let context = format!("{} record at offset {}", wal_path.display(), rec.offset);
    let decode_err = |e: prost::DecodeError| Error::BadManifest {
        context: context.clone(),
        reason: e.to_string(),
    };
    match rec.ty {
        RecordType::Snapshot if first => {
            state.apply_snapshot(&pb::SnapshotRecord::decode(payload).map_err(decode_err)?);
        }
        RecordType::Snapshot => {
            return Err(Error::BadManifest {
                context,
                reason: "snapshot record after the first record".into(),
            })
        }
        RecordType::Commit => {
            let m = pb::CommitRecord::decode(payload)
                .map_err(decode_err)?
                .manifest
                .unwrap_or_default();
            let size = (wal::RECORD_HEADER_LEN + payload.len()) as u64;
            state.apply_commit(m, size, &context)?;
        }
        RecordType::Delete => {
            let d = pb::DeleteRecord::decode(payload).map_err(decode_err)?;
            for id in d.ids {
                state.apply_delete(id, super::commit_record_len);
            }
        }
        RecordType::Pin => {
            let p = pb::PinRecord::decode(payload).map_err(decode_err)?;
            state.apply_pin(p.id, p.pinned, &context)?;
        }
        RecordType::Relocate => {
            let r = pb::RelocateRecord::decode(payload).map_err(decode_err)?;
            // The sources it leaves unreferenced are orphans now: set aside below, unless a
            // live reader's lease holds them.
            state.apply_relocate(&r, super::commit_record_len, &context)?;
        }
        RecordType::Quarantine => {
            let q = pb::QuarantineRecord::decode(payload).map_err(decode_err)?;
            // Segments a heal leaves unreferenced are orphans now, like a relocation's sources.
            state.apply_quarantine(&q, super::commit_record_len, &context)?;
        }
    }
    Ok(())
}

/// What in `dir` (whose `CURRENT` is missing) shows that it held a store, one line each: a
/// WAL file longer than its header (committed records, or a damaged header or first record:
/// either way more than a crashed creation leaves), a segment file, a non-empty `lost+found/`.
fn store_contents(io: &dyn Storage, dir: &Path, names: &[String]) -> Result<Vec<String>> {
    let mut found = Vec::new();
    let mut names = names.to_vec();
    names.sort();
    for name in &names {
        if files::parse_wal_file_name(name).is_none() {
            continue;
        }
        let path = dir.join(name);
        let len = io
            .open(&path, false)
            .and_then(|f| f.len())
            .map_err(|e| Error::io("stat", &path, e))?;
        if len <= wal::WAL_HEADER_LEN as u64 {
            continue;
        }
        // Only the header and the first frame are read: enough to say what is wrong.
        let head_len = len.min(
            (wal::WAL_HEADER_LEN + wal::RECORD_HEADER_LEN) as u64 + u64::from(wal::MAX_RECORD_LEN),
        );
        let mut head = vec![0u8; head_len as usize];
        io.open(&path, false)
            .and_then(|f| f.read_at(&mut head, 0))
            .map_err(|e| Error::io("read", &path, e))?;
        let what = match WalHeader::decode(&head) {
            Err(HeaderError::Corrupt) => "a damaged header".to_string(),
            Err(HeaderError::NewerVersion(v)) => format!("a header of newer version {v}"),
            Ok(h) if h.features.blocking(true).is_some() => format!(
                "written by a newer ckptstore: needs {}",
                h.features.unknown()
            ),
            Ok(h) => match wal::scan(&head, h.salt).records.first() {
                Some(_) => "committed records".to_string(),
                None => "a damaged first record".to_string(),
            },
        };
        found.push(format!("WAL file {name} ({len} bytes, {what})"));
    }
    let seg_dir = dir.join(SEGMENTS_DIR);
    if let Ok(seg_names) = io.list(&seg_dir) {
        let segs: Vec<&String> = seg_names
            .iter()
            .filter(|n| segment::parse_file_name(n).is_some())
            .collect();
        if !segs.is_empty() {
            found.push(format!("{} segment file(s) in {SEGMENTS_DIR}/", segs.len()));
        }
    }
    let lf = lost_found::entries(io, dir)?;
    if !lf.is_empty() {
        found.push(format!(
            "{} file(s) in {}/",
            lf.len(),
            lost_found::LOST_FOUND_DIR
        ));
    }
    Ok(found)
}

/// Checks every live segment exists and is long enough; removes (writer) orphan segments,
/// except those a live reader's lease holds: those are returned (id → bytes), to free later.
fn check_segments(
    io: &dyn Storage,
    dir: &Path,
    opts: &Options,
    state: &mut State,
    report: &mut RecoveryReport,
) -> Result<BTreeMap<u64, u64>> {
    let seg_dir = dir.join(SEGMENTS_DIR);
    let names = match io.list(&seg_dir) {
        Ok(n) => n,
        Err(e) if not_found(&e) && state.segments.is_empty() => Vec::new(),
        Err(e) if not_found(&e) && !opts.read_only => {
            io.create_dir_all(&seg_dir)
                .map_err(|e| Error::io("create dir", &seg_dir, e))?;
            Vec::new()
        }
        Err(e) if not_found(&e) => Vec::new(),
        Err(e) => return Err(Error::io("list", &seg_dir, e)),
    };
    let mut on_disk = std::collections::BTreeMap::new();
    for name in names {
        if let Some(id) = segment::parse_file_name(&name) {
            on_disk.insert(id, seg_dir.join(name));
        }
    }
    let mut trailer_only_gone = Vec::new();
    // Segments a lazy restore left in the bucket are fetched when read, not damaged.
    let in_bucket = super::lazy::listed_lengths(io, dir)?;
    for (&id, seg) in &state.segments {
        let problem = match on_disk.get(&id) {
            None if in_bucket.get(&id) == Some(&seg.len) => None,
            None => Some("missing".to_string()),
            // Not a regular file (a directory, FIFO or symlink in its place, refused by the
            // backend: io::private_fs): damaged, like a missing one.
            Some(path) => match io.open(path, false) {
                Err(e) if crate::io::private_fs::is_refused_kind(&e) => Some(e.to_string()),
                Err(e) => return Err(Error::io("open", path, e)),
                Ok(f) => {
                    let len = f.len().map_err(|e| Error::io("stat", path, e))?;
                    if len < seg.len.max(32) {
                        Some(format!("truncated to {len} bytes"))
                    } else {
                        // The header is metadata too: a newer format is refused, not misread.
                        let mut h = [0u8; 32];
                        f.read_at(&mut h, 0)
                            .map_err(|e| Error::io("read", path, e))?;
                        match segment::decode_header(&h) {
                            Ok(found) if found == id => None,
                            Ok(found) => Some(format!("header names segment {found}")),
                            Err(DecodeError::Corrupt(why)) => Some(format!("bad header ({why})")),
                            Err(DecodeError::NewerVersion(v)) => {
                                return Err(Error::UnsupportedVersion {
                                    path: path.clone(),
                                    found: v as u32,
                                    supported: segment::SEGMENT_VERSION as u32,
                                })
                            }
                        }
                    }
                }
            },
        };
        if let Some(problem) = problem {
            if seg.refs == 0 {
                // No live chunk in it: it held only a commit trailer (a commit that wrote no
                // chunk), set aside as an orphan by a build from before such segments. No
                // checkpoint needs it to read; that checkpoint just cannot be rebuilt.
                trailer_only_gone.push(id);
                continue;
            }
            if opts.recovery_mode == RecoveryMode::AbsoluteConsistency {
                let checkpoint = state
                    .checkpoints
                    .values()
                    .find(|m| manifest::all_chunks(m).any(|c| c.segment == id))
                    .map_or(0, |m| m.id);
                return Err(Error::SegmentMissing {
                    path: seg_dir.join(segment::file_name(id)),
                    problem,
                    checkpoint,
                    needed: seg.len,
                });
            }
            report.damaged_segments.push((id, problem));
            state.damaged_segments.insert(id);
        }
    }
    for id in &trailer_only_gone {
        state.segments.remove(id);
    }
    let orphans: Vec<(u64, PathBuf)> = on_disk
        .into_iter()
        .filter(|(id, _)| !state.segments.contains_key(id))
        .collect();
    // Only the writer frees, and only what no live reader holds (store/lease.rs).
    let leases = (!opts.read_only && !orphans.is_empty()).then(|| lease::scan(io, dir, true));
    let mut pending = BTreeMap::new();
    for (id, path) in &orphans {
        // Never reuse the id, even of a file that stays (a directory, see below).
        state.next_segment_id = state.next_segment_id.max(id.saturating_add(1));
        let bytes = match io.open(path, false) {
            Ok(f) => f.len().unwrap_or(0),
            // Not a regular file (a directory with a segment's name is foreign, docs/FORMAT.md):
            // left alone, it must not stop the store from opening.
            Err(e) if crate::io::private_fs::is_refused_kind(&e) => continue,
            Err(e) if not_found(&e) => continue,
            Err(e) => return Err(Error::io("open", path, e)),
        };
        report.orphan_bytes += bytes;
        if leases.as_ref().is_some_and(|l| l.holds(*id)) {
            pending.insert(*id, bytes);
            report.orphans_leased.push(path.clone());
            report.orphan_segments.push(path.clone());
            continue;
        }
        if !opts.read_only {
            // Set aside, never unlinked here: a crash mid-transaction leaves such a file, but
            // so does a WAL that lost records recovery could not read (docs/GUARANTEES.md).
            let why = format!(
                "segment {id}: no committed record of the live WAL references it (a \
                 transaction that crashed before its commit, or records cut by a salvage)"
            );
            if let Some(dest) = lost_found::move_in(io, dir, path, &why)? {
                report.lost_found.push(dest);
            }
        }
        report.orphan_segments.push(path.clone());
    }
    if !opts.read_only && !orphans.is_empty() {
        io.sync_dir(&seg_dir)
            .map_err(|e| Error::io("fsync dir", &seg_dir, e))?;
    }
    Ok(pending)
}

/// Removes WAL files other than the live one and a stale `CURRENT.tmp`, then makes the
/// directory's entries durable.
fn remove_leftovers(
    io: &dyn Storage,
    dir: &Path,
    live_wal: u64,
    report: &mut RecoveryReport,
) -> Result<()> {
    let names = io.list(dir).map_err(|e| Error::io("list", dir, e))?;
    for name in names {
        let stale = name == current::CURRENT_TMP_NAME
            || files::parse_wal_file_name(&name).is_some_and(|n| n != live_wal);
        if stale {
            let path = dir.join(&name);
            if name == current::CURRENT_TMP_NAME {
                // A copy of a pointer, never the only copy of anything.
                super::files::remove_if_present(io, &path)?;
            } else {
                let why = format!(
                    "WAL file {name}: CURRENT names {} (left by a WAL compaction)",
                    files::wal_file_name(live_wal)
                );
                if let Some(dest) = lost_found::move_in(io, dir, &path, &why)? {
                    report.lost_found.push(dest);
                }
            }
            report.stale_files.push(path);
        }
    }
    // Always, not only after a removal: `CURRENT` and the live WAL's entry were read from the
    // page cache, and a writer whose directory fsync failed (say, while switching `CURRENT`)
    // may have left them there only. Nothing may be built on them until they are durable.
    io.sync_dir(dir).map_err(|e| Error::io("fsync dir", dir, e))
}
