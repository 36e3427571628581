//! The one writer of segment files, shared by transactions, shard writers and compaction.
//!
//! A [`SegmentWriter`] creates segment files in a directory, writes runs of chunks as frames
//! (payloads first, as they arrive, with writeback hints; the frame header with its BLAKE3
//! table when the run ends), rolls to a new file when the next run does not fit, and
//! fdatasyncs each file as it is finished. Until [`SegmentWriter::release`] says the files
//! belong to someone else (a durable commit record, or the caller that will commit them),
//! dropping the writer removes every file it created: a file is registered for that cleanup
//! before its header is written, so a failed write leaves nothing behind either.
//!
//! A writer given a key ([`SegmentWriter::sealing`]) seals every chunk it writes: the stored
//! bytes are encrypted with AES-256-GCM under a fresh nonce (crate::crypt) on their way to the
//! file, and the chunk's reference carries the nonce and tag. This is the one place chunk
//! bytes are encrypted.

use super::{align_up, encode_header, file_name, pads, ChunkEntry, FrameAt, FrameHeader};
use super::{FRAME_ALIGN, SEGMENT_DATA_OFFSET};
use crate::crypt::Sealer;
use crate::error::{Error, Result};
use crate::io::{Storage, StorageFile};
use ckptstore_proto::v1 as pb;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Told about the bytes of the segment files a writer writes, as they become final: the
/// bucket store (crate::remote::Streamer) uploads them while the checkpoint is still being
/// written. Bytes reported final are never written again; the commit trailer, past a
/// segment's committed length, is not part of what is reported.
pub trait SegmentTap: Send + Sync {
    /// Segment `id` was created at `path` (its header written).
    fn created(&self, id: u64, path: &Path);
    /// Bytes `[0, upto)` of segment `id` are final.
    fn final_upto(&self, id: u64, upto: u64);
    /// Segment `id` is whole: `len` committed bytes, all final.
    fn finished(&self, id: u64, len: u64);
    /// Segment `id` is being removed (its writer dropped before a commit took it).
    fn dropped(&self, id: u64);
}

/// Payload bytes written between two writeback hints.
const WRITEBACK_SLICE: usize = 16 << 20;

/// A segment file being filled.
struct OpenSegment {
    id: u64,
    path: PathBuf,
    file: Box<dyn StorageFile>,
    /// Where the next frame starts.
    end: u64,
}

/// A segment file finished (fdatasync'ed, or its fdatasync failed).
struct Finished {
    id: u64,
    path: PathBuf,
    len: u64,
}

/// A frame being filled: payloads are written as their chunks arrive; the header, with the
/// chunk table, goes to `start` when the run ends ([`SegmentWriter::end_run`]).
pub(crate) struct Run {
    start: u64,
    /// Bytes reserved for the header (table room for `capacity` chunks).
    header_len: u64,
    capacity: usize,
    /// Where the next payload goes.
    next: u64,
    chunks: Vec<ChunkEntry>,
    /// Codec of every chunk in the frame (a frame holds one codec).
    codec: pb::Codec,
}

impl Run {
    /// The frame's table is full: the next chunk needs a new run.
    pub(crate) fn is_full(&self) -> bool {
        self.chunks.len() == self.capacity
    }
}

/// Writes new segment files in one directory (see the module documentation).
pub(crate) struct SegmentWriter {
    io: Arc<dyn Storage>,
    dir: PathBuf,
    open: Option<OpenSegment>,
    finished: Vec<Finished>,
    /// An fdatasync or directory fsync failed: the kernel may have dropped dirty pages, so a
    /// store that owns this writer must be poisoned.
    sync_failed: bool,
    /// Seals every chunk written (see the module documentation).
    sealer: Option<Arc<Sealer>>,
    /// The ciphertext of the chunk being sealed (reused).
    sealed: Vec<u8>,
    /// Told as bytes become final (see [`SegmentTap`]).
    tap: Option<Arc<dyn SegmentTap>>,
}

impl SegmentWriter {
    /// A writer creating segment files in `dir` (the store's `segments/`).
    pub(crate) fn new(io: Arc<dyn Storage>, dir: PathBuf) -> Self {
        SegmentWriter {
            io,
            dir,
            open: None,
            finished: Vec::new(),
            sync_failed: false,
            sealer: None,
            sealed: Vec::new(),
            tap: None,
        }
    }

    /// Tells `tap` about every segment this writer writes (none: nobody).
    pub(crate) fn tapped(mut self, tap: Option<Arc<dyn SegmentTap>>) -> Self {
        self.tap = tap;
        self
    }

    /// Seals every chunk this writer writes with `sealer` (none: plain).
    pub(crate) fn sealing(mut self, sealer: Option<Arc<Sealer>>) -> Self {
        self.sealer = sealer;
        self
    }

    /// Whether an fdatasync or directory fsync of this writer failed.
    pub(crate) fn sync_failed(&self) -> bool {
        self.sync_failed
    }

    /// Starts a frame for a run of chunks of `codec` that may hold up to `run_bytes` payload
    /// bytes (the rest of its tensor; what decides whether its header is padded so that its
    /// payload starts on a page, [`super::pads`]). `capacity(at)` says how many of the run's
    /// chunks fit in a frame at `at` of a segment; when none fit in the open segment, it is
    /// finished (fdatasync'ed) and a new one created with the id `next_id` gives, which takes
    /// at least one chunk even if it overflows the caller's size limit. The frame reserves
    /// table room for that many chunks.
    pub(crate) fn begin_run(
        &mut self,
        codec: pb::Codec,
        run_bytes: u64,
        capacity: impl Fn(FrameAt) -> usize,
        next_id: impl FnOnce() -> Result<u64>,
    ) -> Result<Run> {
        let pad = pads(codec as u8, run_bytes);
        let at = |start| FrameAt { start, pad };
        let mut cap = self.open.as_ref().map_or(0, |s| capacity(at(s.end)));
        if cap == 0 {
            self.finish_open()?;
            self.create(next_id()?)?;
            cap = capacity(at(SEGMENT_DATA_OFFSET)).max(1);
        }
        let start = self.open_segment()?.end;
        let header_len = at(start).header_len(cap);
        Ok(Run {
            start,
            header_len,
            capacity: cap,
            next: start + header_len,
            chunks: Vec::new(),
            codec,
        })
    }

    /// Writes one chunk's stored bytes at the end of the run's payloads, in slices with a
    /// writeback hint after each (the disk works while later slices are copied, and the
    /// fdatasync finds little left to do; the hint changes nothing about durability). `hash`
    /// is the BLAKE3 of the `raw_len` raw bytes. Returns the chunk's reference.
    pub(crate) fn write_chunk(
        &mut self,
        run: &mut Run,
        stored: &[u8],
        raw_len: u64,
        hash: [u8; 32],
    ) -> Result<pb::ChunkRef> {
        debug_assert!(!run.is_full());
        let seal = match &self.sealer {
            Some(s) => {
                self.sealed.clear();
                self.sealed.extend_from_slice(stored);
                Some(s.seal(&mut self.sealed, &hash, raw_len, run.codec as i32)?)
            }
            None => None,
        };
        let stored = if seal.is_some() {
            &self.sealed[..]
        } else {
            stored
        };
        let seg = self.open_segment()?;
        let mut at = run.next;
        for slice in stored.chunks(WRITEBACK_SLICE) {
            seg.file
                .write_at(slice, at)
                .map_err(|e| Error::io("write", &seg.path, e))?;
            let _ = seg.file.start_writeback(at, slice.len() as u64);
            at += slice.len() as u64;
        }
        let len = stored.len() as u64;
        run.chunks.push(ChunkEntry {
            blake3: hash,
            stored_len: len,
            raw_len,
        });
        let r = pb::ChunkRef {
            segment: seg.id,
            offset: run.next,
            stored_len: len,
            raw_len,
            codec: run.codec as i32,
            blake3: hash.to_vec(),
            nonce: seal.as_ref().map_or(Vec::new(), |s| s.nonce.to_vec()),
            tag: seal.as_ref().map_or(Vec::new(), |s| s.tag.to_vec()),
        };
        run.next += len;
        Ok(r)
    }

    /// Ends a run: writes the frame header (with its chunk table) before the payloads, and
    /// the zero padding to the next frame boundary after them.
    pub(crate) fn end_run(&mut self, run: Run) -> Result<()> {
        let seg = self.open_segment_mut()?;
        let mut header = FrameHeader::new(run.codec as u8, seg.id, run.chunks);
        header.header_len = run.header_len;
        let write = |buf: &[u8], off: u64| {
            seg.file
                .write_at(buf, off)
                .map_err(|e| Error::io("write", &seg.path, e))
        };
        write(&header.encode(), run.start)?;
        let end = align_up(run.next);
        if end > run.next {
            write(
                &[0u8; FRAME_ALIGN as usize][..(end - run.next) as usize],
                run.next,
            )?;
        }
        seg.end = end;
        let id = seg.id;
        if let Some(t) = &self.tap {
            t.final_upto(id, end);
        }
        Ok(())
    }

    /// Writes one chunk as the next of `run`: the run is ended first when its table is full
    /// or its codec is not `codec`, and begun ([`SegmentWriter::begin_run`], with
    /// `run_bytes`, `capacity` and `next_id`) when there is none.
    #[allow(clippy::too_many_arguments)] // the chunk (3) and how a run begins (4)
    pub(crate) fn append(
        &mut self,
        run: &mut Option<Run>,
        codec: pb::Codec,
        run_bytes: u64,
        capacity: impl Fn(FrameAt) -> usize,
        next_id: impl FnOnce() -> Result<u64>,
        stored: &[u8],
        raw_len: u64,
        hash: [u8; 32],
    ) -> Result<pb::ChunkRef> {
        if run
            .as_ref()
            .is_some_and(|r| r.is_full() || r.codec != codec)
        {
            self.end(run)?;
        }
        let r = match run {
            Some(r) => r,
            None => run.insert(self.begin_run(codec, run_bytes, capacity, next_id)?),
        };
        self.write_chunk(r, stored, raw_len, hash)
    }

    /// Ends `run` ([`SegmentWriter::end_run`]), if there is one.
    pub(crate) fn end(&mut self, run: &mut Option<Run>) -> Result<()> {
        match run.take() {
            Some(r) => self.end_run(r),
            None => Ok(()),
        }
    }

    /// Creates segment `id` holding no frame (its header only, committed length 4096), as
    /// the open segment: the place of the commit trailer of a commit that wrote no chunk
    /// (`Store::commit_manifest`). The open segment, if any, is finished first.
    pub(crate) fn create_empty(&mut self, id: u64) -> Result<()> {
        self.finish_open()?;
        self.create(id)
    }

    /// fdatasyncs the open segment and returns every segment written, with its final
    /// length. The directory is not fsync'ed (see [`SegmentWriter::finish`]).
    pub(crate) fn sync(&mut self) -> Result<Vec<pb::SegmentInfo>> {
        self.finish_open()?;
        Ok(self
            .finished
            .iter()
            .map(|s| pb::SegmentInfo {
                id: s.id,
                length: s.len,
            })
            .collect())
    }

    /// [`SegmentWriter::sync`], then fsyncs the directory when a segment was written, so the
    /// files' entries are durable too.
    pub(crate) fn finish(&mut self) -> Result<Vec<pb::SegmentInfo>> {
        let written = self.sync()?;
        if !written.is_empty() {
            if let Err(e) = self.io.sync_dir(&self.dir) {
                self.sync_failed = true;
                return Err(Error::io("fsync dir", &self.dir, e));
            }
        }
        Ok(written)
    }

    /// The files written now belong to someone else (a commit record that is, or may be,
    /// durable; a caller that commits them): dropping the writer leaves them.
    pub(crate) fn release(&mut self) {
        self.open = None;
        self.finished.clear();
    }

    /// Creates segment `id` and registers it for cleanup before writing its header.
    fn create(&mut self, id: u64) -> Result<()> {
        let path = self.dir.join(file_name(id));
        let file = self
            .io
            .create_new(&path)
            .map_err(|e| Error::io("create", &path, e))?;
        let seg = self.open.insert(OpenSegment {
            id,
            path,
            file,
            end: SEGMENT_DATA_OFFSET,
        });
        seg.file
            .write_at(&encode_header(id), 0)
            .map_err(|e| Error::io("write", &seg.path, e))?;
        if let Some(t) = &self.tap {
            t.created(id, &seg.path);
        }
        Ok(())
    }

    /// fdatasyncs the open segment and sets it aside with its final length (also when the
    /// fdatasync fails, so that the cleanup still removes it).
    fn finish_open(&mut self) -> Result<()> {
        if let Some(seg) = self.open.take() {
            // Before the fdatasync: the upload and the disk work at once.
            if let Some(t) = &self.tap {
                t.finished(seg.id, seg.end);
            }
            let synced = seg.file.sync_data();
            self.finished.push(Finished {
                id: seg.id,
                path: seg.path.clone(),
                len: seg.end,
            });
            if let Err(e) = synced {
                self.sync_failed = true;
                return Err(Error::io("fdatasync", &seg.path, e));
            }
        }
        Ok(())
    }

    fn open_segment(&self) -> Result<&OpenSegment> {
        self.open
            .as_ref()
            .ok_or_else(|| Error::invalid("no segment is open (a run was not begun)"))
    }

    fn open_segment_mut(&mut self) -> Result<&mut OpenSegment> {
        self.open
            .as_mut()
            .ok_or_else(|| Error::invalid("no segment is open (a run was not begun)"))
    }
}

impl Drop for SegmentWriter {
    fn drop(&mut self) {
        // Not released: remove what this writer created. Best effort; recovery removes any
        // segment no commit record references.
        if let Some(seg) = self.open.take() {
            if let Some(t) = &self.tap {
                t.dropped(seg.id);
            }
            drop(seg.file);
            let _ = self.io.remove_file(&seg.path);
        }
        for s in self.finished.drain(..) {
            if let Some(t) = &self.tap {
                t.dropped(s.id);
            }
            let _ = self.io.remove_file(&s.path);
        }
    }
}
