//! Rebuilding a store from its segments when the WAL and `CURRENT` are lost or damaged
//! (`ckptstore recover --rebuild`; docs/FORMAT.md, "Rebuild from segments").
//!
//! Every commit leaves a copy of its commit record after the frames of its last new segment
//! (the commit trailer, `segment::trailer`). A rebuild reads every segment's frame tables and
//! trailer (never the payloads), resolves each trailer's chunk references against the chunks
//! the frames list — at the recorded place, or, when segment compaction moved the chunk,
//! wherever a chunk with the same BLAKE3 and length now is — and writes a new WAL holding
//! every checkpoint whose chunks are all present, through the WAL compaction's own writer
//! (snapshot + commit records, made durable, then `CURRENT` switched). Nothing is deleted: the
//! old `CURRENT` and WAL files go to `lost+found/`, and the normal open that follows sets
//! aside the segments no restored checkpoint references.

use super::files::{self, WalWriter, SEGMENTS_DIR};
use super::lost_found;
use super::state::State;
use super::{commit_record_len, perms, writer_lock, Options, Store};
use crate::current;
use crate::error::{Error, Result};
use crate::features;
use crate::io::Storage;
use crate::manifest;
use crate::segment::{self, trailer};
use ckptstore_proto::v1 as pb;
use prost::Message;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// What a rebuild found and did.
#[derive(Debug, Clone, Default)]
pub struct RebuildReport {
    /// Segment files read.
    pub segments_scanned: usize,
    /// Segment files that could not be read (bad header, read error), with why.
    pub unreadable_segments: Vec<(u64, String)>,
    /// Commit trailers found.
    pub trailers: usize,
    /// Checkpoints written into the new WAL, by id.
    pub restored: Vec<u64>,
    /// Checkpoints whose trailer was found but whose chunks are not all present, with why.
    pub unrestorable: Vec<(u64, String)>,
    /// Chunk references found at another place than their trailer says (moved by segment
    /// compaction), and pointed there.
    pub repointed_chunks: usize,
    /// The new WAL file.
    pub wal_file: PathBuf,
    /// Where the old `CURRENT` and WAL files went.
    pub lost_found: Vec<PathBuf>,
    /// The scrub run on the rebuilt store ([`Store::scrub`]): the quarantine lived in the
    /// lost WAL, so the rotten chunks the trailers reference are found and quarantined again,
    /// and healed where a stored copy allows; `scrub.broken` names the checkpoints that do
    /// not verify.
    pub scrub: super::ScrubReport,
}

/// A chunk a frame lists: where it is, and what it is.
#[derive(Debug, Clone)]
struct Located {
    segment: u64,
    found: segment::trailer::FoundChunk,
}

impl Located {
    fn matches(&self, c: &pb::ChunkRef) -> bool {
        self.found.entry.blake3.as_slice() == c.blake3.as_slice()
            && self.found.entry.stored_len == c.stored_len
            && self.found.entry.raw_len == c.raw_len
            && i32::from(self.found.codec) == c.codec
    }
}

impl Store {
    /// Rebuilds the store in `dir` from its segments' commit trailers, replacing its WAL and
    /// `CURRENT` (set aside in `lost+found/`, never deleted), then opens it with `opts`.
    /// Restores every checkpoint whose trailer and chunks are present: every checkpoint
    /// committed by a build with the trailers that created a segment, including deleted
    /// ones whose chunks are still stored (a rebuild may bring back a deleted checkpoint,
    /// never lose a live one); pins are not restored. Refuses, changing nothing, when no
    /// segment carries a trailer. Then scrubs the rebuilt store ([`Store::scrub`]: every
    /// chunk read, the bad ones quarantined again, healed where a stored copy allows), and
    /// reports it in [`RebuildReport::scrub`].
    pub fn rebuild(dir: impl AsRef<Path>, opts: Options) -> Result<(Store, RebuildReport)> {
        if opts.read_only {
            return Err(Error::invalid(
                "a rebuild writes a new WAL: open it as the writer, not read-only",
            ));
        }
        opts.validate()?;
        let dir = dir.as_ref().to_path_buf();
        perms::check_store_dir(&*opts.io, &dir, &opts)?;
        let io = crate::io::WithMode::wrap(opts.io.clone(), opts.file_mode);
        let report = {
            let _lock = writer_lock::take(&*io, &dir)?;
            rebuild_wal(&*io, &dir)?
        };
        let mut report = report;
        let mut store = Store::open(&dir, opts)?;
        report.scrub = store.scrub()?;
        Ok((store, report))
    }
}

fn rebuild_wal(io: &dyn Storage, dir: &Path) -> Result<RebuildReport> {
    let mut report = RebuildReport::default();
    let seg_dir = dir.join(SEGMENTS_DIR);
    let names = match io.list(&seg_dir) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotFound(format!(
                "commit trailer in {}: no such directory; nothing was changed",
                seg_dir.display()
            )))
        }
        Err(e) => return Err(Error::io("list", &seg_dir, e)),
    };
    let mut ids: Vec<u64> = names
        .iter()
        .filter_map(|n| segment::parse_file_name(n))
        .collect();
    ids.sort_unstable();

    // Every present segment: its committed length, its chunks, its trailer.
    let mut lengths = BTreeMap::new();
    let mut at: HashMap<(u64, u64), Located> = HashMap::new();
    let mut by_hash: HashMap<[u8; 32], Located> = HashMap::new();
    let mut trailers: BTreeMap<u64, (u64, pb::Manifest)> = BTreeMap::new();
    for &id in &ids {
        let path = seg_dir.join(segment::file_name(id));
        report.segments_scanned += 1;
        let walked = match io.open(&path, false) {
            Err(e) => Err(e.to_string()),
            Ok(f) => trailer::walk(&*f, id).map_err(|e| match e {
                trailer::WalkError::Header(why) => format!("bad header ({why})"),
                trailer::WalkError::Io(e) => e.to_string(),
            }),
        };
        let walked = match walked {
            Ok(w) => w,
            Err(why) => {
                report.unreadable_segments.push((id, why));
                continue;
            }
        };
        lengths.insert(id, walked.frames_end);
        for found in walked.chunks {
            let l = Located { segment: id, found };
            by_hash
                .entry(l.found.entry.blake3)
                .or_insert_with(|| l.clone());
            at.insert((id, l.found.offset), l);
        }
        let Some(bytes) = walked.trailer else {
            continue;
        };
        report.trailers += 1;
        let Some(m) = pb::CommitRecord::decode(bytes.as_slice())
            .ok()
            .and_then(|r| r.manifest)
        else {
            report
                .unrestorable
                .push((0, format!("segment {id}: its trailer does not decode")));
            continue;
        };
        // Two trailers with one id (a commit that crashed before its WAL record, its id given
        // again by a later commit): the later one's segment has the higher id, and is kept.
        let cid = m.id;
        if let Some((older, _)) = trailers.insert(cid, (id, m)) {
            report.unrestorable.push((
                cid,
                format!(
                    "the trailer in segment {older} names checkpoint {cid} too; the later one, \
                     in segment {id}, is kept"
                ),
            ));
        }
    }
    if report.trailers == 0 {
        return Err(Error::NotFound(format!(
            "commit trailer in {}: none of its {} segment file(s) carries one (written by a \
             build from before the trailers, or no segment is left); nothing was changed",
            seg_dir.display(),
            ids.len()
        )));
    }

    // Resolve each trailer's chunks against what the frames hold.
    let mut restored = Vec::new();
    for (_, (_, mut m)) in trailers {
        match resolve(&mut m, &at, &by_hash, &lengths) {
            Ok(n) => {
                report.repointed_chunks += n;
                restored.push(m);
            }
            Err(why) => report.unrestorable.push((m.id, why)),
        }
    }
    let mut state = State::new();
    state.apply_snapshot(&pb::SnapshotRecord {
        next_checkpoint_id: restored.iter().map(|m| m.id).max().unwrap_or(0) + 1,
        next_segment_id: ids.last().map_or(1, |&id| id.saturating_add(1)),
        segments: lengths
            .iter()
            .map(|(&id, &length)| pb::SegmentInfo { id, length })
            .collect(),
    });
    for m in restored {
        let id = m.id;
        let context = format!("commit trailer of checkpoint {id}");
        let len = commit_record_len(&m);
        match state.apply_commit(m, len, &context) {
            Ok(()) => report.restored.push(id),
            Err(e) => report.unrestorable.push((id, e.to_string())),
        }
    }
    state.drop_unreferenced_segments();

    // The new WAL, durable before CURRENT names it; the old files set aside.
    let names = io.list(dir).map_err(|e| Error::io("list", dir, e))?;
    let current_path = dir.join(current::CURRENT_NAME);
    let old_current = match files::read_small(io, &current_path, 4096) {
        Ok(b) => Some(b),
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => None,
        // Unreadable or oversized: set aside whole below, by a rename.
        Err(_) => None,
    };
    let number = names
        .iter()
        .filter_map(|n| files::parse_wal_file_name(n))
        .chain(old_current.as_deref().and_then(|b| current::decode(b).ok()))
        .max()
        .unwrap_or(0)
        .checked_add(1)
        .ok_or_else(|| Error::invalid("WAL file numbers are exhausted"))?;
    let new = WalWriter::create_durable(
        io,
        dir,
        number,
        features::NEW_STORE,
        &state.compacted_records(),
    )?;
    report.wal_file = new.path.clone();
    drop(new);
    let why_current = format!(
        "CURRENT as it was before `recover --rebuild` wrote {}",
        files::wal_file_name(number)
    );
    match old_current {
        Some(b) => report.lost_found.push(lost_found::save_copy(
            io,
            dir,
            "CURRENT.before-rebuild",
            &b,
            &why_current,
        )?),
        None if io
            .exists(&current_path)
            .map_err(|e| Error::io("stat", &current_path, e))? =>
        {
            if let Some(dest) = lost_found::move_in(io, dir, &current_path, &why_current)? {
                report.lost_found.push(dest);
            }
        }
        None => {}
    }
    files::switch_current_atomically(io, dir, number)?;
    for name in names {
        if files::parse_wal_file_name(&name).is_some_and(|n| n != number) {
            let why = format!(
                "WAL file {name}, replaced by `recover --rebuild` (the store's WAL is now {})",
                files::wal_file_name(number)
            );
            if let Some(dest) = lost_found::move_in(io, dir, &dir.join(&name), &why)? {
                report.lost_found.push(dest);
            }
        }
    }
    io.sync_dir(dir)
        .map_err(|e| Error::io("fsync dir", dir, e))?;
    Ok(report)
}

/// Points every chunk reference of `m` at a chunk the frames hold: its own place if the
/// chunk is there, else any chunk with the same BLAKE3 and raw length (a compaction moved
/// it; the codec and stored length are the copy's). Keeps only the new segments present, with
/// their walked lengths. Returns how many references moved, or why `m` cannot be restored.
fn resolve(
    m: &mut pb::Manifest,
    at: &HashMap<(u64, u64), Located>,
    by_hash: &HashMap<[u8; 32], Located>,
    lengths: &BTreeMap<u64, u64>,
) -> std::result::Result<usize, String> {
    manifest::validate(m, "commit trailer").map_err(|e| e.to_string())?;
    let mut moved = 0;
    let tensors = m
        .tensors
        .iter_mut()
        .map(|t| (&t.name, &mut t.chunks))
        .chain(m.blobs.iter_mut().map(|b| (&b.name, &mut b.chunks)));
    for (name, chunks) in tensors {
        for (i, c) in chunks.iter_mut().enumerate() {
            if at.get(&(c.segment, c.offset)).is_some_and(|l| l.matches(c)) {
                continue;
            }
            let copy = <[u8; 32]>::try_from(c.blake3.as_slice())
                .ok()
                .and_then(|h| by_hash.get(&h))
                .filter(|l| l.found.entry.raw_len == c.raw_len);
            let Some(l) = copy else {
                return Err(format!(
                    "{name:?} chunk {i} (segment {}, offset {}) is in no segment present",
                    c.segment, c.offset
                ));
            };
            c.segment = l.segment;
            c.offset = l.found.offset;
            c.stored_len = l.found.entry.stored_len;
            c.codec = i32::from(l.found.codec);
            moved += 1;
        }
    }
    m.new_segments.retain_mut(|s| match lengths.get(&s.id) {
        Some(&len) => {
            s.length = len;
            true
        }
        None => false,
    });
    Ok(moved)
}
