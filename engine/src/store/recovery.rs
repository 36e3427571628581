//! Opening a store: find the live WAL through `CURRENT`, replay it, repair a torn tail, check
//! the segments, remove orphans. Reads metadata only. Every repair is idempotent, so a crash
//! during recovery is recovered by the next open.

use super::files::{self, WalWriter, SEGMENTS_DIR};
use super::lease;
use super::state::State;
use super::{Options, RecoveryMode};
use crate::current::{self, CurrentDecodeError};
use crate::error::{Error, Result};
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
    /// Bytes of a torn WAL tail that were cut off (0 if the log ended cleanly).
    pub truncated_tail_bytes: u64,
    /// Why the torn tail's first record was rejected.
    pub truncated_tail_reason: Option<String>,
    /// Records dropped after corruption, only in `RecoveryMode::PointInTime`.
    pub salvaged_corruption: Option<String>,
    /// Segment files no committed record references, removed (or, read-only, found).
    pub orphan_segments: Vec<PathBuf>,
    /// Of those, the ones a live reader's lease still holds: kept, and freed by a later
    /// delete, `gc` or open once the lease is gone (docs/GUARANTEES.md, "Readers").
    pub orphans_leased: Vec<PathBuf>,
    /// Their total size in bytes.
    pub orphan_bytes: u64,
    /// Other leftovers removed: old WAL files, a stale `CURRENT.tmp`.
    pub stale_files: Vec<PathBuf>,
    /// Referenced segments that are missing or shorter than committed, with the problem.
    pub damaged_segments: Vec<(u64, String)>,
    /// Checkpoints live after recovery.
    pub checkpoints: usize,
    /// Wall time of the whole open.
    pub duration: Duration,
}

pub(crate) struct Recovered {
    pub state: State,
    pub wal: Option<WalWriter>,
    pub report: RecoveryReport,
    /// Unreferenced segments kept for live readers (id → bytes): freed later.
    pub pending_free: BTreeMap<u64, u64>,
}

fn not_found(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
}

/// Runs recovery on `dir`. A writer repairs; a read-only open only reads.
pub(crate) fn recover(io: &dyn Storage, dir: &Path, opts: &Options) -> Result<Recovered> {
    let started = Instant::now();
    let writable = !opts.read_only;
    let mut report = RecoveryReport::default();
    let current_path = dir.join(current::CURRENT_NAME);

    let current_bytes = match files::read_all(io, &current_path) {
        Ok(b) => Some(b),
        Err(Error::Io { source, .. }) if not_found(&source) => None,
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

    let scan = wal::scan(&buf, header.salt);
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
        let payload = &buf[rec.payload.clone()];
        let context = format!("{} record at offset {}", wal_path.display(), rec.offset);
        let decode_err = |e: prost::DecodeError| Error::BadManifest {
            context: context.clone(),
            reason: e.to_string(),
        };
        match rec.ty {
            RecordType::Snapshot if i == 0 => {
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
                // The sources it leaves unreferenced are orphans now: removed below, unless
                // a live reader's lease holds them.
                state.apply_relocate(&r, super::commit_record_len, &context)?;
            }
        }
    }
    report.records_replayed = scan.records.len();
    state.drop_unreferenced_segments();

    let wal = if writable {
        let file = io
            .open(&wal_path, true)
            .map_err(|e| Error::io("open", &wal_path, e))?;
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
        remove_leftovers(io, dir, wal_number, &mut report)?;
    }
    report.checkpoints = state.checkpoints.len();
    report.duration = started.elapsed();
    Ok(Recovered {
        state,
        wal,
        report,
        pending_free,
    })
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
    // durable (then nothing was ever committed). A WAL with records means someone removed
    // CURRENT by hand: refuse rather than start over on top of committed checkpoints.
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
    for name in &names {
        if files::parse_wal_file_name(name).is_some() {
            let path = dir.join(name);
            let buf = files::read_all(io, &path)?;
            let has_records = WalHeader::decode(&buf)
                .map(|h| !wal::scan(&buf, h.salt).records.is_empty())
                .unwrap_or(false);
            if has_records {
                return Err(Error::CurrentMissing {
                    path: dir.to_path_buf(),
                });
            }
        }
    }
    if opts.read_only {
        return Err(Error::NotFound(format!(
            "store at {} (no CURRENT file)",
            dir.display()
        )));
    }
    io.create_dir_all(&dir.join(SEGMENTS_DIR))
        .map_err(|e| Error::io("create dir", dir.join(SEGMENTS_DIR), e))?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        io.sync_dir(parent)
            .map_err(|e| Error::io("fsync dir", parent, e))?;
    }
    let wal = WalWriter::create_durable(io, dir, 1, &[])?;
    files::switch_current_atomically(io, dir, 1)?;
    report.created = true;
    report.wal_file = wal.path.clone();
    let mut state = State::new();
    let pending_free = check_segments(io, dir, opts, &mut state, &mut report)?;
    remove_leftovers(io, dir, 1, &mut report)?;
    report.duration = started.elapsed();
    Ok(Recovered {
        state,
        wal: Some(wal),
        report,
        pending_free,
    })
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
    for (&id, seg) in &state.segments {
        let problem = match on_disk.get(&id) {
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
        let mut bytes = 0;
        if let Ok(f) = io.open(path, false) {
            bytes = f.len().unwrap_or(0);
            report.orphan_bytes += bytes;
        }
        if leases.as_ref().is_some_and(|l| l.holds(*id)) {
            pending.insert(*id, bytes);
            report.orphans_leased.push(path.clone());
            report.orphan_segments.push(path.clone());
            continue;
        }
        if !opts.read_only {
            match io.remove_file(path) {
                Ok(()) => {}
                Err(e) if not_found(&e) => {}
                // A directory with a segment's name is foreign (docs/FORMAT.md): left alone,
                // it must not stop the store from opening.
                Err(e) if e.kind() == std::io::ErrorKind::IsADirectory => continue,
                Err(e) => return Err(Error::io("remove", path, e)),
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
            match io.remove_file(&path) {
                Ok(()) => {}
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(Error::io("remove", &path, e)),
            }
            report.stale_files.push(path);
        }
    }
    // Always, not only after a removal: `CURRENT` and the live WAL's entry were read from the
    // page cache, and a writer whose directory fsync failed (say, while switching `CURRENT`)
    // may have left them there only. Nothing may be built on them until they are durable.
    io.sync_dir(dir).map_err(|e| Error::io("fsync dir", dir, e))
}
