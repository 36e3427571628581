//! A verified load reads and hashes chunks on several threads (chunk k on thread k % cores,
//! read ahead by hints); the error must still name the first damaged chunk of the tensor,
//! whatever the order the damage was found in, and a load that skips verification must return
//! the stored bytes. Both the small-tensor path (one thread) and the parallel one (tensors of
//! 8 MiB and more) are covered, through `tensor` and `tensor_into`.

mod support;

use ckptstore::{DType, Error, Selector, Store};
use support::{data, opts, CHUNK};

fn flip(dir: &std::path::Path, segment: u64, offset: u64) {
    let path = dir.join("segments").join(format!("{segment:08}.seg"));
    let mut b = std::fs::read(&path).unwrap();
    b[offset as usize] ^= 0x20;
    std::fs::write(&path, b).unwrap();
}

#[test]
fn first_damaged_chunk_is_named() {
    first_damaged_chunk_is_named_with(CHUNK, false);
}

/// Chunks of 1 MiB: the tensor (10 MiB and a bit) is read on every core.
#[test]
fn first_damaged_chunk_is_named_when_chunks_are_read_in_parallel() {
    first_damaged_chunk_is_named_with(1 << 20, false);
}

/// Chunks of 2 MiB, read cold: the tensor (20 MiB and a bit) is read by threads that only
/// read, ahead of the ones that hash and copy (store/prefetch.rs).
#[test]
fn first_damaged_chunk_is_named_when_reads_run_ahead() {
    first_damaged_chunk_is_named_with(2 << 20, true);
}

fn first_damaged_chunk_is_named_with(chunk_size: usize, cold: bool) {
    let opts = || ckptstore::Options {
        chunk_size,
        ..opts()
    };
    let dir = tempfile::tempdir().unwrap();
    let w = data(5, 10 * chunk_size + 123);
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let mut t = s.begin(1).unwrap();
    t.put_tensor("w", DType::U8, &[w.len() as u64], &w).unwrap();
    t.commit().unwrap();
    let chunks = s.checkpoint(Selector::Latest).unwrap().manifest().tensors[0]
        .chunks
        .clone();
    assert_eq!(chunks.len(), 11);
    drop(s);

    for damaged in [vec![10usize], vec![6, 2], vec![0, 1, 9]] {
        let copy = tempfile::tempdir().unwrap();
        for entry in walk(dir.path()) {
            let to = copy.path().join(entry.strip_prefix(dir.path()).unwrap());
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(&entry, &to).unwrap();
        }
        for &k in &damaged {
            flip(copy.path(), chunks[k].segment, chunks[k].offset + 7);
        }
        let s = Store::open(copy.path(), opts()).unwrap();
        if cold {
            make_cold(copy.path());
        }
        let ck = s.checkpoint(Selector::Latest).unwrap();
        let first = *damaged.iter().min().unwrap();
        match ck.tensor("w") {
            Err(Error::ChunkCorrupt { chunk, offset, .. }) => {
                assert_eq!(
                    (chunk, offset),
                    (first, chunks[first].offset),
                    "{damaged:?}"
                );
            }
            other => panic!("{damaged:?}: {other:?}"),
        }
        let mut into = vec![0u8; w.len()];
        match ck.tensor_into("w", &mut into, true) {
            Err(Error::ChunkCorrupt { chunk, .. }) => assert_eq!(chunk, first, "{damaged:?}"),
            other => panic!("{damaged:?}: tensor_into gave {other:?}"),
        }
        match ck.verify() {
            Err(Error::ChunkCorrupt { chunk, .. }) => assert_eq!(chunk, first, "{damaged:?}"),
            other => panic!("{damaged:?}: verify gave {other:?}"),
        }
        let raw = ck.tensor_with("w", false).unwrap().data;
        let mut want = w.clone();
        for &k in &damaged {
            want[k * chunk_size + 7] ^= 0x20;
        }
        assert!(raw == want, "unverified load returns the stored bytes");
        ck.tensor_into("w", &mut into, false).unwrap();
        assert!(
            into == want,
            "unverified tensor_into returns the stored bytes"
        );
    }
    // Undamaged: tensor_into gives the saved bytes, and refuses a destination of another size.
    let s = Store::open(dir.path(), opts()).unwrap();
    let ck = s.checkpoint(Selector::Latest).unwrap();
    let mut into = vec![0u8; w.len()];
    ck.tensor_into("w", &mut into, true).unwrap();
    assert!(into == w);
    let mut short = vec![0u8; w.len() - 1];
    let e = ck.tensor_into("w", &mut short, true).unwrap_err();
    assert!(e.to_string().contains("destination"), "{e}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.file_name().is_some_and(|n| n != "LOCK") {
            out.push(p);
        }
    }
    out
}

/// `verify_all` reads a chunk shared by several checkpoints once, and a damaged shared chunk
/// still fails every checkpoint that uses it.
#[test]
fn verify_all_reads_shared_chunks_once() {
    use ckptstore::io::{OpKind, SimIo};
    let sim = SimIo::new();
    let o = || ckptstore::Options {
        io: std::sync::Arc::new(sim.clone()),
        ..opts()
    };
    let frozen = data(8, 8 * CHUNK);
    let mut s = Store::open("/s", o()).unwrap();
    for step in 0..4u64 {
        let mut t = s.begin(step).unwrap();
        t.put_tensor("frozen", DType::U8, &[frozen.len() as u64], &frozen)
            .unwrap();
        t.put_tensor("head", DType::U8, &[CHUNK as u64], &data(100 + step, CHUNK))
            .unwrap();
        t.commit().unwrap();
    }
    let reads = |f: &dyn Fn()| {
        let before = sim.call_count(OpKind::Read);
        f();
        sim.call_count(OpKind::Read) - before
    };
    // 8 shared chunks + 4 own chunks, not 4 × 9.
    let n = reads(&|| assert!(s.verify_all().iter().all(|(_, r)| r.is_ok())));
    assert_eq!(n, 8 + 4);
    assert_eq!(reads(&|| s.verify(1).unwrap()), 9);

    // Damage one shared chunk: every checkpoint fails, each naming the frozen tensor.
    let c = s.checkpoint(Selector::Id(1)).unwrap().manifest().tensors[0].chunks[3].clone();
    drop(s);
    let path = std::path::Path::new("/s/segments").join(format!("{:08}.seg", c.segment));
    let mut b = sim.read_file(&path).unwrap();
    b[c.offset as usize] ^= 1;
    let img = sim.fork();
    {
        use ckptstore::io::Storage;
        let f = img.open(&path, true).unwrap();
        f.write_at(&b, 0).unwrap();
    }
    let s = Store::open(
        "/s",
        ckptstore::Options {
            io: std::sync::Arc::new(img),
            ..opts()
        },
    )
    .unwrap();
    for (id, r) in s.verify_all() {
        match r {
            Err(Error::ChunkCorrupt { name, chunk, .. }) => {
                assert_eq!((name.as_str(), chunk), ("frozen", 3), "checkpoint {id}")
            }
            other => panic!("checkpoint {id}: {other:?}"),
        }
    }
}

/// Drops the page cache's clean pages of every segment file of `dir` (after syncing them), so
/// the next read is cold and takes the direct route where the file system has one.
fn make_cold(dir: &std::path::Path) {
    for path in walk(&dir.join("segments")) {
        let f = std::fs::File::open(&path).unwrap();
        f.sync_all().unwrap();
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    }
}

/// Cold loads read chunks with O_DIRECT where the file system takes it: the aligned range
/// around each chunk (frames start at 64-byte, not 4 KiB, boundaries; tensors of odd lengths
/// put later chunks anywhere) into a reused buffer. Every way of loading must return the saved
/// bytes — owned, into a caller's buffer, as a view, compressed, and with direct reads off
/// (`CKPTSTORE_DIRECT_READ=0` is read once per process, so that way is the fallback test in
/// the engine's `io::std_io` tests).
#[test]
fn cold_direct_reads_return_the_saved_bytes_at_unaligned_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let chunk_size = 1 << 20;
    let opts = |compress: bool| ckptstore::Options {
        chunk_size,
        compression: if compress {
            ckptstore::Compression::zstd()
        } else {
            Default::default()
        },
        ..opts()
    };
    // Odd lengths: every chunk after the first tensor starts off any 4 KiB boundary.
    let tensors: Vec<(String, Vec<u8>)> = [
        (1, 100),
        (2, 3 * chunk_size + 77),
        (3, 9 * chunk_size + 4097),
        (4, 5),
    ]
    .iter()
    .map(|&(seed, n)| (format!("t{seed}"), data(seed, n)))
    .collect();
    for compress in [false, true] {
        let d = dir.path().join(format!("c{compress}"));
        let mut s = Store::open(&d, opts(compress)).unwrap();
        let mut t = s.begin(1).unwrap();
        for (name, w) in &tensors {
            t.put_tensor(name, DType::U8, &[w.len() as u64], w).unwrap();
        }
        t.commit().unwrap();
        let offsets: Vec<u64> = s
            .checkpoint(Selector::Latest)
            .unwrap()
            .manifest()
            .tensors
            .iter()
            .flat_map(|t| t.chunks.iter().map(|c| c.offset))
            .collect();
        assert!(offsets.iter().any(|o| o % 4096 != 0), "{offsets:?}");
        drop(s);
        let s = Store::open(&d, ckptstore::Options::read_only()).unwrap();
        let ck = s.checkpoint(Selector::Latest).unwrap();
        for (name, w) in &tensors {
            make_cold(&d);
            assert!(
                ck.tensor(name).unwrap().data == *w,
                "{name} compressed={compress}"
            );
            make_cold(&d);
            let mut into = vec![0u8; w.len()];
            ck.tensor_into(name, &mut into, true).unwrap();
            assert!(into == *w, "{name} into, compressed={compress}");
            make_cold(&d);
            assert!(*ck.tensor_view(name).unwrap() == w[..], "{name} view");
        }
        make_cold(&d);
        ck.verify().unwrap();
    }
}

/// A damaged chunk read cold (through O_DIRECT where the file system takes it) is still
/// named: the first one of the tensor, by `tensor`, `tensor_into` and `verify`.
#[test]
fn damaged_chunk_is_named_when_read_cold() {
    let dir = tempfile::tempdir().unwrap();
    let chunk_size = 1 << 20;
    let opts = ckptstore::Options {
        chunk_size,
        ..opts()
    };
    let w = data(9, 10 * chunk_size + 123);
    let mut s = Store::open(dir.path(), opts).unwrap();
    let mut t = s.begin(1).unwrap();
    t.put_tensor("lead", DType::U8, &[1000], &data(8, 1000))
        .unwrap();
    t.put_tensor("w", DType::U8, &[w.len() as u64], &w).unwrap();
    t.commit().unwrap();
    let chunks = s.checkpoint(Selector::Latest).unwrap().manifest().tensors[1]
        .chunks
        .clone();
    drop(s);
    for k in [7usize, 3] {
        flip(dir.path(), chunks[k].segment, chunks[k].offset + 4095);
    }
    let s = Store::open(dir.path(), ckptstore::Options::read_only()).unwrap();
    let ck = s.checkpoint(Selector::Latest).unwrap();
    make_cold(dir.path());
    match ck.tensor("w") {
        Err(Error::ChunkCorrupt { chunk, offset, .. }) => {
            assert_eq!((chunk, offset), (3, chunks[3].offset))
        }
        other => panic!("{other:?}"),
    }
    make_cold(dir.path());
    let mut into = vec![0u8; w.len()];
    match ck.tensor_into("w", &mut into, true) {
        Err(Error::ChunkCorrupt { chunk, .. }) => assert_eq!(chunk, 3),
        other => panic!("tensor_into gave {other:?}"),
    }
    make_cold(dir.path());
    match ck.verify() {
        Err(Error::ChunkCorrupt { name, chunk, .. }) => {
            assert_eq!((name.as_str(), chunk), ("w", 3))
        }
        other => panic!("verify gave {other:?}"),
    }
}

/// Whether the file system of `dir` takes O_DIRECT opens (ext4 and xfs do; tmpfs does not).
fn takes_o_direct(dir: &std::path::Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join("o_direct_probe");
    std::fs::write(&p, [0u8; 4096]).unwrap();
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(&p)
        .is_ok();
    std::fs::remove_file(&p).unwrap();
    ok
}

/// One tensor of odd length after a short one (so its chunks start off any 4 KiB boundary),
/// committed, then the store reopened read-only with `io`; returns the tensor and its chunks.
fn odd_run(
    dir: &std::path::Path,
    io: Option<std::sync::Arc<dyn ckptstore::io::Storage>>,
) -> (Vec<u8>, Vec<ckptstore::proto::v1::ChunkRef>, Store) {
    // Not a multiple of 4 KiB: with payloads padded to 4 KiB file offsets (segment writer), the
    // chunks after the first still start off any 4 KiB boundary.
    let chunk_size = (1 << 20) + 100;
    let w = data(21, 10 * chunk_size + 4097);
    let mut s = Store::open(
        dir,
        ckptstore::Options {
            chunk_size,
            ..opts()
        },
    )
    .unwrap();
    let mut t = s.begin(1).unwrap();
    t.put_tensor("lead", DType::U8, &[777], &data(20, 777))
        .unwrap();
    t.put_tensor("w", DType::U8, &[w.len() as u64], &w).unwrap();
    t.commit().unwrap();
    let chunks = s.checkpoint(Selector::Latest).unwrap().manifest().tensors[1]
        .chunks
        .clone();
    assert!(chunks.iter().any(|c| c.offset % 4096 != 0), "offsets");
    drop(s);
    let mut ro = ckptstore::Options::read_only();
    if let Some(io) = io {
        ro.io = io;
    }
    (w, chunks, Store::open(dir, ro).unwrap())
}

/// A verified view of cold chunks is read from the disk straight into memory of its own (no
/// map, no page cache) where the file system takes O_DIRECT: the same bytes, at unaligned
/// offsets, still zero-copy; the same view of cached chunks is the segment's map.
#[test]
fn cold_view_reads_direct_and_returns_the_saved_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (w, _, s) = odd_run(dir.path(), None);
    let ck = s.checkpoint(Selector::Latest).unwrap();
    make_cold(dir.path());
    let v = ck.tensor_view("w").unwrap();
    assert!(v.is_zero_copy());
    assert_eq!(v.is_mapped(), !takes_o_direct(dir.path()), "cold: direct");
    assert!(v.data() == &w[..], "cold view bytes");
    assert!(ck.tensor_view("lead").unwrap().data() == &data(20, 777)[..]);
    // `tensor_map` keeps the map, cold or not (Python's load(mmap=True) maps its pages).
    make_cold(dir.path());
    let m = ck.tensor_map("w", true).unwrap();
    assert!(m.is_mapped() && m.data() == &w[..], "tensor_map: the map");
    drop(ck);
    drop(s);
    assert!(v.data() == &w[..], "a read view outlives its store");
    // Cached now (read through the page cache): the map.
    let s = Store::open(dir.path(), ckptstore::Options::read_only()).unwrap();
    let ck = s.checkpoint(Selector::Latest).unwrap();
    for path in walk(&dir.path().join("segments")) {
        std::fs::read(path).unwrap();
    }
    let v = ck.tensor_view("w").unwrap();
    assert!(v.is_mapped() && v.data() == &w[..], "cached: mapped");
}

/// A damaged chunk of a cold view is named: one damaged in its middle, and one damaged in its
/// last bytes — those lie in the next chunk's aligned part of the view's buffer, and are
/// hashed from there after every part is in.
#[test]
fn cold_view_names_a_damaged_chunk() {
    for (k, at_end) in [(3usize, false), (5, true), (10, true)] {
        let dir = tempfile::tempdir().unwrap();
        let (_, chunks, s) = odd_run(dir.path(), None);
        drop(s);
        let c = &chunks[k];
        let at = if at_end {
            c.offset + c.stored_len - 1
        } else {
            c.offset + 4095
        };
        flip(dir.path(), c.segment, at);
        let s = Store::open(dir.path(), ckptstore::Options::read_only()).unwrap();
        let ck = s.checkpoint(Selector::Latest).unwrap();
        make_cold(dir.path());
        match ck.tensor_view("w") {
            Err(Error::ChunkCorrupt {
                name,
                chunk,
                offset,
                ..
            }) => assert_eq!((name.as_str(), chunk, offset), ("w", k, c.offset)),
            other => panic!("chunk {k}: {other:?}"),
        }
    }
}

/// Storage on the real file system whose files claim their bytes are cold but refuse every
/// direct read (as a file system that takes an O_DIRECT open and then refuses its reads).
/// It also notes the offset of every read of a MiB or more its files serve (chunk reads), and
/// the address of the memory it lands in.
#[derive(Debug)]
struct RefusesDirect(ckptstore::io::StdIo, Reads);
struct RefusingFile(Box<dyn ckptstore::io::StorageFile>, Reads);
type Reads = std::sync::Arc<std::sync::Mutex<Vec<(u64, usize)>>>;

impl ckptstore::io::Storage for RefusesDirect {
    fn create_dir_all(&self, p: &std::path::Path) -> std::io::Result<()> {
        self.0.create_dir_all(p)
    }
    fn create_new(
        &self,
        p: &std::path::Path,
    ) -> std::io::Result<Box<dyn ckptstore::io::StorageFile>> {
        self.0.create_new(p)
    }
    fn open(
        &self,
        p: &std::path::Path,
        write: bool,
    ) -> std::io::Result<Box<dyn ckptstore::io::StorageFile>> {
        Ok(Box::new(RefusingFile(
            self.0.open(p, write)?,
            self.1.clone(),
        )))
    }
    fn rename(&self, a: &std::path::Path, b: &std::path::Path) -> std::io::Result<()> {
        self.0.rename(a, b)
    }
    fn remove_file(&self, p: &std::path::Path) -> std::io::Result<()> {
        self.0.remove_file(p)
    }
    fn sync_dir(&self, p: &std::path::Path) -> std::io::Result<()> {
        self.0.sync_dir(p)
    }
    fn list(&self, d: &std::path::Path) -> std::io::Result<Vec<String>> {
        self.0.list(d)
    }
    fn exists(&self, p: &std::path::Path) -> std::io::Result<bool> {
        self.0.exists(p)
    }
    fn try_lock(
        &self,
        p: &std::path::Path,
    ) -> std::io::Result<Option<Box<dyn ckptstore::io::StorageFile>>> {
        self.0.try_lock(p)
    }
    fn try_lock_existing(
        &self,
        p: &std::path::Path,
    ) -> std::io::Result<Option<Box<dyn ckptstore::io::StorageFile>>> {
        self.0.try_lock_existing(p)
    }
    fn dir_status(&self, p: &std::path::Path) -> std::io::Result<Option<ckptstore::io::DirStatus>> {
        self.0.dir_status(p)
    }
}

impl ckptstore::io::StorageFile for RefusingFile {
    fn write_at(&self, b: &[u8], o: u64) -> std::io::Result<()> {
        self.0.write_at(b, o)
    }
    fn read_at(&self, b: &mut [u8], o: u64) -> std::io::Result<()> {
        if b.len() >= 1 << 20 {
            self.1.lock().unwrap().push((o, b.as_ptr() as usize));
        }
        self.0.read_at(b, o)
    }
    fn cached(&self, _: u64, _: u64) -> bool {
        false
    }
    fn read_direct(&self, _: u64, _: &mut [u8]) -> std::io::Result<Option<usize>> {
        Ok(None)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
    fn sync_all(&self) -> std::io::Result<()> {
        self.0.sync_all()
    }
    fn allocate(&self, l: u64) -> std::io::Result<()> {
        self.0.allocate(l)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, l: u64) -> std::io::Result<()> {
        self.0.set_len(l)
    }
    fn map(&self) -> std::io::Result<Option<std::sync::Arc<ckptstore::io::MappedFile>>> {
        self.0.map()
    }
}

/// Where the direct reads of a cold view are refused, its parts are read buffered into the
/// same buffer: the same bytes, and a damaged chunk is still named.
#[test]
fn cold_view_falls_back_to_buffered_reads_when_direct_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let io = || -> Option<std::sync::Arc<dyn ckptstore::io::Storage>> {
        Some(std::sync::Arc::new(RefusesDirect(
            ckptstore::io::StdIo,
            Reads::default(),
        )))
    };
    let (w, chunks, s) = odd_run(dir.path(), io());
    let ck = s.checkpoint(Selector::Latest).unwrap();
    let v = ck.tensor_view("w").unwrap();
    assert!(
        v.is_zero_copy() && !v.is_mapped(),
        "read into its own memory"
    );
    assert!(v.data() == &w[..]);
    drop(ck);
    drop(s);
    let c = &chunks[6];
    flip(dir.path(), c.segment, c.offset + c.stored_len - 2);
    let mut ro = ckptstore::Options::read_only();
    ro.io = io().unwrap();
    let s = Store::open(dir.path(), ro).unwrap();
    let ck = s.checkpoint(Selector::Latest).unwrap();
    match ck.tensor_view("w") {
        Err(Error::ChunkCorrupt { chunk, .. }) => assert_eq!(chunk, 6),
        other => panic!("{other:?}"),
    }
}

/// `tensors_into` reads several tensors on one set of threads: every one bit-exact (a
/// zero-size one, one below a chunk, several chunks long), a wrong destination length refused
/// before a byte is read, and a damaged chunk named by its own tensor and index, not by the
/// position of the chunk among all the tensors' chunks.
#[test]
fn tensors_into_reads_many_tensors_and_names_the_damaged_one() {
    let chunk_size = 1 << 20;
    let opts = || ckptstore::Options {
        chunk_size,
        ..opts()
    };
    let dir = tempfile::tempdir().unwrap();
    let a = data(1, 3 * chunk_size + 5);
    let b = data(2, 100);
    let c = data(3, 6 * chunk_size + 77);
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let mut t = s.begin(1).unwrap();
    t.put_tensor("a", DType::U8, &[a.len() as u64], &a).unwrap();
    t.put_tensor("empty", DType::F32, &[0], &[]).unwrap();
    t.put_tensor("b", DType::U8, &[b.len() as u64], &b).unwrap();
    t.put_tensor("c", DType::U8, &[c.len() as u64], &c).unwrap();
    t.commit().unwrap();
    drop(s);
    let s = Store::open(dir.path(), opts()).unwrap();
    let ck = s.checkpoint(Selector::Latest).unwrap();
    let (mut oa, mut oe, mut ob, mut oc) = (
        vec![0u8; a.len()],
        Vec::<u8>::new(),
        vec![0u8; b.len()],
        vec![0u8; c.len()],
    );
    ck.tensors_into(
        vec![
            ("c", &mut oc[..]),
            ("a", &mut oa[..]),
            ("empty", &mut oe[..]),
            ("b", &mut ob[..]),
        ],
        true,
    )
    .unwrap();
    assert!(oa == a && ob == b && oc == c && oe.is_empty());
    let mut short = vec![0u8; b.len() - 1];
    let mut oa2 = vec![0u8; a.len()];
    let e = ck
        .tensors_into(vec![("a", &mut oa2[..]), ("b", &mut short[..])], true)
        .unwrap_err();
    assert!(e.to_string().contains("destination"), "{e}");
    assert!(
        oa2.iter().all(|&x| x == 0),
        "nothing read before the lengths are checked"
    );
    // Damage chunk 4 of "c".
    let cref = ck.manifest().tensors[3].chunks[4].clone();
    drop(ck);
    drop(s);
    flip(dir.path(), cref.segment, cref.offset + 9);
    let s = Store::open(dir.path(), opts()).unwrap();
    let ck = s.checkpoint(Selector::Latest).unwrap();
    let mut oc = vec![0u8; c.len()];
    match ck.tensors_into(vec![("a", &mut oa[..]), ("c", &mut oc[..])], true) {
        Err(Error::ChunkCorrupt { name, chunk, .. }) => {
            assert_eq!((name.as_str(), chunk), ("c", 4))
        }
        other => panic!("tensors_into gave {other:?}"),
    }
}

/// A store of a short tensor (so later chunks start off any 4 KiB boundary), an empty one and
/// two multi-chunk tensors of odd lengths; returns the saved bytes by name.
fn owned_store(
    dir: &std::path::Path,
    io: Option<std::sync::Arc<dyn ckptstore::io::Storage>>,
    scale: usize,
) -> (Vec<(&'static str, Vec<u8>)>, Store) {
    let chunk_size = (1 << 20) + 100; // chunks off 4 KiB even in a padded payload
    let opts = || ckptstore::Options {
        chunk_size,
        ..opts()
    };
    let tensors = vec![
        ("lead", data(30, 777)),
        ("a", data(31, 3 * scale * chunk_size + 5)),
        ("empty", Vec::new()),
        ("c", data(32, 6 * scale * chunk_size + 77)),
    ];
    let mut s = Store::open(dir, opts()).unwrap();
    let mut t = s.begin(1).unwrap();
    for (n, b) in &tensors {
        t.put_tensor(n, DType::U8, &[b.len() as u64], b).unwrap();
    }
    t.commit().unwrap();
    drop(s);
    let mut ro = ckptstore::Options::read_only();
    if let Some(io) = io {
        ro.io = io;
    }
    (tensors, Store::open(dir, ro).unwrap())
}

/// `tensors_owned` (the Python torch load): in a batch under 16 MiB cold runs of at least a
/// MiB are read direct into memory of their own (zero-copy, writable, outliving the store),
/// the rest copied into owned memory; a larger batch (`scale` 2) runs its reads ahead and
/// copies every tensor; every tensor bit-exact, never a segment's map, cold or cached.
#[test]
fn tensors_owned_reads_cold_runs_direct_and_the_rest_by_copy() {
    tensors_owned_reads_cold_runs_direct_and_the_rest_by_copy_at(1);
}

#[test]
fn tensors_owned_of_a_large_batch_runs_its_reads_ahead_and_copies() {
    tensors_owned_reads_cold_runs_direct_and_the_rest_by_copy_at(2);
}

fn tensors_owned_reads_cold_runs_direct_and_the_rest_by_copy_at(scale: usize) {
    let dir = tempfile::tempdir().unwrap();
    let (tensors, s) = owned_store(dir.path(), None, scale);
    let names: Vec<&str> = tensors.iter().map(|(n, _)| *n).collect();
    let ck = s.checkpoint(Selector::Latest).unwrap();
    make_cold(dir.path());
    let mut views = ck.tensors_owned(&names, true).unwrap();
    let direct = takes_o_direct(dir.path());
    for ((n, want), v) in tensors.iter().zip(&views) {
        assert!(v.data() == &want[..], "{n}: bytes");
        assert!(!v.is_mapped(), "{n}: never the map");
        let big = want.len() as u64 >= ckptstore::DIRECT_LOAD_MIN_BYTES;
        let in_place = big && direct && scale == 1;
        assert_eq!(v.is_zero_copy(), in_place, "{n}: read in place");
    }
    // Cached now: every one copied, none mapped.
    for path in walk(&dir.path().join("segments")) {
        std::fs::read(path).unwrap();
    }
    for (v, (n, want)) in ck.tensors_owned(&names, true).unwrap().iter().zip(&tensors) {
        assert!(
            v.data() == &want[..] && !v.is_zero_copy(),
            "{n}: cached, copied"
        );
    }
    drop(ck);
    drop(s);
    // Writable, and alive after the store is gone.
    for v in &mut views {
        if let Some(b) = v.bytes_mut().unwrap().first_mut() {
            *b ^= 1;
        }
    }
    for ((n, want), v) in tensors.iter().zip(&views) {
        let mut want = want.clone();
        if let Some(b) = want.first_mut() {
            *b ^= 1;
        }
        assert!(
            v.data() == &want[..],
            "{n}: written, after the store closed"
        );
    }
}

/// A damaged chunk of a `tensors_owned` load is named by its tensor and index — the first one
/// in the order asked, whether it was found by a reading thread (a copied tensor) or after the
/// reads (the tail of a chunk read in place lies in the next chunk's part) — and where direct
/// reads are refused the same load reads buffered into the same memory.
#[test]
fn tensors_owned_names_the_first_damaged_chunk() {
    let io = || -> Option<std::sync::Arc<dyn ckptstore::io::Storage>> {
        Some(std::sync::Arc::new(RefusesDirect(
            ckptstore::io::StdIo,
            Reads::default(),
        )))
    };
    for (refuse, scale) in [(false, 1), (true, 1), (false, 2), (true, 2)] {
        let dir = tempfile::tempdir().unwrap();
        let (tensors, s) = owned_store(dir.path(), if refuse { io() } else { None }, scale);
        let names: Vec<&str> = tensors.iter().map(|(n, _)| *n).collect();
        let m = s.checkpoint(Selector::Latest).unwrap().manifest().clone();
        let views = s
            .checkpoint(Selector::Latest)
            .unwrap()
            .tensors_owned(&names, true)
            .unwrap();
        for ((n, want), v) in tensors.iter().zip(&views) {
            assert!(v.data() == &want[..], "{n}: bytes (refused: {refuse})");
        }
        drop(s);
        let chunk = |t: usize, k: usize| m.tensors[t].chunks[k].clone();
        // Last byte of a's chunk 1 (in chunk 2's part), middle of c's chunk 4, lead's byte 9.
        // (damaged (tensor, chunk, at its last byte) list, the (tensor, chunk) named)
        type Case = (Vec<(usize, usize, bool)>, (&'static str, usize));
        let cases: Vec<Case> = vec![
            (vec![(3, 4, false), (1, 1, true)], ("a", 1)),
            (vec![(3, 4, true)], ("c", 4)),
            (vec![(3, 2, false), (0, 0, false)], ("lead", 0)),
        ];
        for (damage, want) in cases {
            let d2 = tempfile::tempdir().unwrap();
            for e in std::fs::read_dir(dir.path()).unwrap() {
                copy_tree(&e.unwrap().path(), d2.path());
            }
            for &(t, k, at_end) in &damage {
                let c = chunk(t, k);
                let at = if at_end {
                    c.offset + c.stored_len - 1
                } else {
                    c.offset + 9
                };
                flip(d2.path(), c.segment, at);
            }
            let mut ro = ckptstore::Options::read_only();
            if refuse {
                ro.io = io().unwrap();
            }
            let s = Store::open(d2.path(), ro).unwrap();
            make_cold(d2.path());
            match s
                .checkpoint(Selector::Latest)
                .unwrap()
                .tensors_owned(&names, true)
            {
                Err(Error::ChunkCorrupt { name, chunk, .. }) => {
                    assert_eq!((name.as_str(), chunk), want, "refused: {refuse}")
                }
                other => panic!("{damage:?}: {:?}", other.map(|v| v.len())),
            }
            // verify = false hands the damaged bytes out.
            let v = s.checkpoint(Selector::Latest).unwrap();
            assert!(v.tensors_owned(&names, false).is_ok());
        }
    }
}

fn copy_tree(src: &std::path::Path, dst_dir: &std::path::Path) {
    let dst = dst_dir.join(src.file_name().unwrap());
    if src.is_dir() {
        std::fs::create_dir_all(&dst).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            copy_tree(&e.unwrap().path(), &dst);
        }
    } else {
        std::fs::copy(src, &dst).unwrap();
    }
}

/// A store of `n` tensors `t0`, `t1`, … of 8 chunks of 2 MiB and `extra` bytes each, one
/// checkpoint: its directory, the tensors' bytes and the manifest.
fn in_order_store(
    n: u64,
    seed: u64,
    extra: usize,
) -> (
    tempfile::TempDir,
    Vec<Vec<u8>>,
    ckptstore::manifest::Manifest,
) {
    let chunk_size = 2 << 20;
    let opts = ckptstore::Options {
        chunk_size,
        ..opts()
    };
    let dir = tempfile::tempdir().unwrap();
    let tensors: Vec<Vec<u8>> = (0..n)
        .map(|k| data(seed + k, 8 * chunk_size + extra))
        .collect();
    let mut s = Store::open(dir.path(), opts).unwrap();
    let mut t = s.begin(1).unwrap();
    for (k, b) in tensors.iter().enumerate() {
        t.put_tensor(&format!("t{k}"), DType::U8, &[b.len() as u64], b)
            .unwrap();
    }
    t.commit().unwrap();
    let m = s.checkpoint(Selector::Latest).unwrap().manifest().clone();
    (dir, tensors, m)
}

/// The store at `dir`, read-only, through [`RefusesDirect`]: with the list of its chunk reads.
fn open_counting_reads(dir: &std::path::Path) -> (Store, Reads) {
    let reads = Reads::default();
    let mut ro = ckptstore::Options::read_only();
    ro.io = std::sync::Arc::new(RefusesDirect(ckptstore::io::StdIo, reads.clone()));
    (Store::open(dir, ro).unwrap(), reads)
}

/// A load that reads every tensor in order, one call each, reads the next tensor's first
/// chunks during the call before, so the disk does not drain between calls
/// (store/prefetch.rs): every chunk is still read once, and a damaged chunk read that way is
/// named by the call that hands its tensor out.
#[test]
fn sequential_tensor_reads_read_the_next_tensor_ahead_and_still_verify_it() {
    let (dir, tensors, m) = in_order_store(3, 40, 11);
    let (s, reads) = open_counting_reads(dir.path());
    let ck = s.checkpoint(Selector::Latest).unwrap();
    assert!(ck.tensor("t0").unwrap().data == tensors[0]);
    let next = m.tensors[1].chunks[0].offset;
    assert!(
        reads.lock().unwrap().iter().any(|&(o, _)| o == next),
        "t1's first chunk is read during t0's call"
    );
    assert!(ck.tensor("t1").unwrap().data == tensors[1]);
    assert!(ck.tensor("t2").unwrap().data == tensors[2]);
    let mut seen: Vec<u64> = reads.lock().unwrap().iter().map(|&(o, _)| o).collect();
    seen.sort_unstable();
    let mut want: Vec<u64> = m
        .tensors
        .iter()
        .flat_map(|t| t.chunks.iter())
        .filter(|c| c.stored_len >= 1 << 20)
        .map(|c| c.offset)
        .collect();
    want.sort_unstable();
    assert_eq!(seen, want, "every chunk of a MiB or more read exactly once");
    drop(ck);
    drop(s);

    // Views of cold runs this large are read the same way, and copied (not zero-copy).
    let s = Store::open(dir.path(), ckptstore::Options::read_only()).unwrap();
    make_cold(dir.path());
    let ck = s.checkpoint(Selector::Latest).unwrap();
    for (k, want) in tensors.iter().enumerate() {
        let v = ck.tensor_view(&format!("t{k}")).unwrap();
        assert!(v.data() == &want[..], "t{k}");
        assert!(
            !v.is_mapped() && !v.is_zero_copy(),
            "t{k}: read ahead, copied"
        );
    }

    // t1's chunks 0 and 3 damaged: chunk 0 is read ahead by t0's call, and named by t1's.
    let copy = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(dir.path()).unwrap() {
        copy_tree(&e.unwrap().path(), copy.path());
    }
    for k in [3, 0] {
        let c = &m.tensors[1].chunks[k];
        flip(copy.path(), c.segment, c.offset + 7);
    }
    let s = Store::open(copy.path(), ckptstore::Options::read_only()).unwrap();
    make_cold(copy.path());
    let ck = s.checkpoint(Selector::Latest).unwrap();
    assert!(ck.tensor("t0").unwrap().data == tensors[0]);
    match ck.tensor("t1") {
        Err(Error::ChunkCorrupt { name, chunk, .. }) => {
            assert_eq!((name.as_str(), chunk), ("t1", 0))
        }
        other => panic!("t1: {:?}", other.map(|t| t.data.len())),
    }
    make_cold(copy.path());
    let ck = s.checkpoint(Selector::Latest).unwrap();
    assert!(ck.tensor_view("t0").unwrap().data() == &tensors[0][..]);
    match ck.tensor_view("t1") {
        Err(Error::ChunkCorrupt { name, chunk, .. }) => {
            assert_eq!((name.as_str(), chunk), ("t1", 0))
        }
        other => panic!("t1 view: {:?}", other.map(|v| v.data().len())),
    }
    assert!(ck.tensor("t2").unwrap().data == tensors[2]);
}

/// Regression (issue 13, "Buffers read ahead count against the rotation"): a load of one
/// tensor per call, in order, reads into one buffer per worker plus two, however many calls it
/// makes. The chunks a call reads ahead for the next one used to arrive on top of that bound,
/// so the calls after the first read into two more buffers (six on two cores), and on the VM
/// the device serves reads more slowly the more distinct memory they land in.
#[test]
fn buffers_read_ahead_for_the_next_call_count_against_the_bound() {
    let (dir, tensors, _) = in_order_store(6, 60, 5);
    let (s, reads) = open_counting_reads(dir.path());
    let ck = s.checkpoint(Selector::Latest).unwrap();
    for (k, want) in tensors.iter().enumerate() {
        assert!(ck.tensor(&format!("t{k}")).unwrap().data == *want, "t{k}");
    }
    // Buffers are separate maps of at least a chunk: reads into one start within a page of
    // each other, reads into two others a chunk or more apart.
    let mut at: Vec<usize> = reads.lock().unwrap().iter().map(|&(_, p)| p).collect();
    at.sort_unstable();
    let buffers = 1 + at.windows(2).filter(|w| w[1] - w[0] >= 64 << 10).count();
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(9);
    assert!(
        buffers <= workers + 2,
        "{buffers} read buffers for {workers} workers"
    );
    assert!(at.len() >= 6 * 8, "every chunk read: {}", at.len());
}

/// A cold view of 16 MiB or more is read ahead and copied into memory of its own, and that
/// memory, once the view is dropped, serves the next view of a similar size (io/recycle.rs;
/// the sizes here let a's buffer serve b and c): a later view must hold exactly its own bytes
/// — none of the earlier view's, none written into it by its holder — and a damaged chunk of
/// it is still named.
#[test]
fn a_dropped_views_memory_serves_the_next_view_with_only_its_own_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let chunk_size = 2 << 20;
    let (a, b, c) = (
        data(41, 22 << 20),
        data(42, (20 << 20) + 4097),
        data(43, 21 << 20),
    );
    let opts = || ckptstore::Options {
        chunk_size,
        ..opts()
    };
    let mut s = Store::open(dir.path(), opts()).unwrap();
    let mut t = s.begin(1).unwrap();
    for (name, bytes) in [("a", &a), ("b", &b), ("c", &c)] {
        t.put_tensor(name, DType::U8, &[bytes.len() as u64], bytes)
            .unwrap();
    }
    t.commit().unwrap();
    let c_chunks = s.checkpoint(Selector::Latest).unwrap().manifest().tensors[2]
        .chunks
        .clone();
    drop(s);
    flip(dir.path(), c_chunks[4].segment, c_chunks[4].offset + 99);
    let s = Store::open(dir.path(), ckptstore::Options::read_only()).unwrap();
    let ck = s.checkpoint(Selector::Latest).unwrap();
    let direct = takes_o_direct(dir.path());
    for round in 0..3 {
        make_cold(dir.path());
        let mut va = ck.tensor_view("a").unwrap();
        assert!(va.data() == &a[..], "round {round}: a");
        assert_eq!(va.is_zero_copy(), !direct, "cold and large: copied");
        // The holder writes into its memory (it is the only holder) before letting it go.
        va.bytes_mut()
            .expect("the only holder may write")
            .fill(0xee);
        drop(va);
        let vb = ck.tensor_view("b").unwrap();
        assert_eq!(vb.data().len(), b.len());
        assert!(
            vb.data() == &b[..],
            "round {round}: b holds its own bytes only"
        );
        drop(vb);
        match ck.tensor_view("c") {
            Err(Error::ChunkCorrupt { name, chunk, .. }) => {
                assert_eq!((name.as_str(), chunk), ("c", 4), "round {round}")
            }
            other => panic!("round {round}: c gave {other:?}"),
        }
        let vb = ck.tensor_view("b").unwrap();
        assert!(
            vb.data() == &b[..],
            "round {round}: b after a refused view of c"
        );
    }
}
