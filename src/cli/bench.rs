//! `ckptstore bench`: the store against this machine's own limits, in one run, on one file
//! system: raw O_DIRECT sequential write and read of the same byte count, a memcpy into
//! reused memory (the floor of a save's stall), durable synchronous save, async save (stall
//! and time to durable), cold verified load, and the peak extra memory of the async save.
//! Rounds are interleaved and medians reported; ratios are to the raw figures of the same run.

use super::{emit, emit_json, fail, human_bytes, CliResult};
use ckptstore::{DType, Options, Pipeline, PipelineOptions, Selector, Store};
use indicatif::{ProgressBar, ProgressStyle};
use rustix::fs::{Advice, Mode, OFlags};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Arguments of `ckptstore bench`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Every figure is measured in this run on the file system of DIR, rounds interleaved, medians \
reported. 'Cold' reads drop the files' clean pages from the page cache first \
(POSIX_FADV_DONTNEED; no root needed). Tensor data is pseudo-random (incompressible, nothing \
deduplicates). Peak extra RSS is sampled every millisecond during the async save, over the \
resident size before it.

Exit status: 0 on success; 1 with a one-line reason on stderr.")]
pub struct Args {
    /// Directory to benchmark in (created; what the bench writes there is removed at the end).
    #[arg(long, default_value = "ckptstore-bench")]
    pub dir: PathBuf,
    /// Bytes per checkpoint (and for the raw figures): e.g. 2GiB, 512MiB, 1000000.
    #[arg(long, default_value = "2GiB", value_parser = parse_size)]
    pub size: u64,
    /// Interleaved rounds; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Staging budget of the async save, MiB.
    #[arg(long, default_value_t = 256)]
    pub budget_mib: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Parses `2GiB`, `512MiB`, `64KiB`, `3GB`, `1000`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (try 2GiB, 512MiB or a byte count)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        u => {
            return Err(format!(
                "unknown size unit {u:?} in {s:?} (use KiB, MiB, GiB)"
            ))
        }
    };
    let v = (n * mult as f64) as u64;
    if v == 0 {
        return Err(format!("size {s:?} must be positive"));
    }
    Ok(v)
}

const BLOCK: usize = 4 << 20;

/// Median of the samples (seconds).
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

#[derive(Default)]
struct Samples {
    raw_write: Vec<f64>,
    raw_read: Vec<f64>,
    memcpy: Vec<f64>,
    save: Vec<f64>,
    stall: Vec<f64>,
    async_durable: Vec<f64>,
    load: Vec<f64>,
    peak_extra: Vec<u64>,
}

/// `ckptstore bench`.
pub fn run(a: Args) -> CliResult {
    if a.rounds == 0 {
        return fail("--rounds must be at least 1");
    }
    let size = a.size.div_ceil(BLOCK as u64) * BLOCK as u64;
    std::fs::create_dir_all(&a.dir)
        .map_err(|e| super::Failure(format!("cannot create {}: {e}", a.dir.display())))?;
    let work = a.dir.join(format!("bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = measure(&a, size, &work);
    let _ = std::fs::remove_dir_all(&work);
    let s = result?;
    let gb = |secs: f64| size as f64 / secs / 1e9;
    let raw_w = median(&s.raw_write);
    let raw_r = median(&s.raw_read);
    let save = median(&s.save);
    let stall = median(&s.stall);
    let durable = median(&s.async_durable);
    let load = median(&s.load);
    let memcpy = median(&s.memcpy);
    let mut peak = s.peak_extra.clone();
    peak.sort_unstable();
    let peak_extra = peak[peak.len() / 2];
    let peak_rss = peak_rss_bytes();
    if a.json {
        return emit_json(&json!({
            "dir": a.dir.display().to_string(),
            "size_bytes": size,
            "rounds": a.rounds,
            "budget_bytes": a.budget_mib << 20,
            "raw_write_gbps": gb(raw_w),
            "raw_read_gbps": gb(raw_r),
            "memcpy_gbps": gb(memcpy),
            "save_gbps": gb(save),
            "save_vs_raw_write": raw_w / save,
            "save_async_stall_s": stall,
            "save_async_stall_vs_memcpy": stall / memcpy,
            "save_async_durable_gbps": gb(durable),
            "load_gbps": gb(load),
            "load_vs_raw_read": raw_r / load,
            "peak_extra_rss_bytes": peak_extra,
            "peak_rss_bytes": peak_rss,
        }));
    }
    let row = |what: &str, secs: f64, vs: String| -> Vec<String> {
        vec![
            what.to_owned(),
            format!("{:.3} s", secs),
            format!("{:.2}", gb(secs)),
            vs,
        ]
    };
    let rows = vec![
        row(
            "raw write, O_DIRECT + fdatasync",
            raw_w,
            "1.00 (limit)".into(),
        ),
        row("raw read, O_DIRECT, cold", raw_r, "1.00 (limit)".into()),
        row("memcpy into reused memory", memcpy, "-".into()),
        row(
            "store save, durable (sync)",
            save,
            format!("{:.2} of raw write", raw_w / save),
        ),
        row(
            "store save async: stall",
            stall,
            format!("{:.2}× memcpy", stall / memcpy),
        ),
        row(
            "store save async: durable",
            durable,
            format!("{:.2} of raw write", raw_w / durable),
        ),
        row(
            "store load, cold, verified",
            load,
            format!("{:.2} of raw read", raw_r / load),
        ),
    ];
    let mut text = format!(
        "ckptstore bench: {} per run, {} rounds (medians), in {}\n\n",
        human_bytes(size),
        a.rounds,
        a.dir.display()
    );
    text += &super::table(
        &["what", "time", "GB/s", "ratio"],
        &[false, true, true, false],
        &rows,
    );
    text += &format!(
        "\npeak extra RSS during the async save: {} (staging budget {}); peak RSS of this process: {}\n",
        human_bytes(peak_extra),
        human_bytes((a.budget_mib as u64) << 20),
        human_bytes(peak_rss)
    );
    emit(&text)
}

fn measure(a: &Args, size: u64, work: &Path) -> CliResult<Samples> {
    let bar = ProgressBar::new((a.rounds * 6) as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} bench [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message("generating data");
    let mut data = pseudo_random(size as usize);
    let mut s = Samples::default();
    for round in 0..a.rounds {
        // Every chunk differs from every earlier round's: nothing deduplicates.
        for (k, block) in data.chunks_mut(BLOCK).enumerate() {
            block[..16].copy_from_slice(
                &[(round as u64).to_le_bytes(), (k as u64).to_le_bytes()].concat(),
            );
        }
        bar.set_message(format!("round {}: raw write", round + 1));
        let raw = work.join("raw.bin");
        s.raw_write.push(raw_write(&raw, &data)?);
        bar.inc(1);
        bar.set_message(format!("round {}: raw read", round + 1));
        s.raw_read.push(raw_read(&raw, size)?);
        std::fs::remove_file(&raw)?;
        bar.inc(1);
        bar.set_message(format!("round {}: memcpy", round + 1));
        s.memcpy.push(memcpy_reused(&data));
        bar.inc(1);

        bar.set_message(format!("round {}: durable save", round + 1));
        let dir = work.join(format!("sync-{round}"));
        let t = Instant::now();
        {
            let mut store = Store::open(&dir, Options::default())?;
            let mut txn = store.begin(round as u64)?;
            put_all(&data, |name, bytes| {
                txn.put_tensor(name, DType::F32, &[bytes.len() as u64 / 4], bytes)
            })?;
            txn.commit()?;
        }
        s.save.push(t.elapsed().as_secs_f64());
        bar.inc(1);
        bar.set_message(format!("round {}: cold load", round + 1));
        s.load.push(cold_load(&dir)?);
        std::fs::remove_dir_all(&dir)?;
        bar.inc(1);

        bar.set_message(format!("round {}: async save", round + 1));
        for block in data.chunks_mut(BLOCK) {
            block[16] ^= 0x5a; // differ from the sync save's chunks
        }
        let dir = work.join(format!("async-{round}"));
        // From before the pipeline exists: its staging pool counts as extra memory.
        let sampler = RssSampler::start();
        let store = Store::open(&dir, Options::default())?;
        let mut p = Pipeline::new(
            store,
            PipelineOptions {
                budget_bytes: a.budget_mib << 20,
                ..Default::default()
            },
        )?;
        let mut save = p.begin(round as u64)?;
        put_all(&data, |name, bytes| {
            save.put_tensor(name, DType::F32, &[bytes.len() as u64 / 4], bytes)
        })?;
        let r = save.submit()?.wait()?;
        s.stall.push(r.stall.as_secs_f64());
        s.async_durable.push(r.time_to_durable.as_secs_f64());
        drop(p.close());
        s.peak_extra.push(sampler.stop());
        std::fs::remove_dir_all(&dir)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(s)
}

/// Splits the data into tensors of 64 MiB (the last shorter), named like a model's layers.
fn put_all(data: &[u8], mut put: impl FnMut(&str, &[u8]) -> ckptstore::Result<()>) -> CliResult {
    for (i, t) in data.chunks(64 << 20).enumerate() {
        put(&format!("layers.{i}.weight"), t)?;
    }
    Ok(())
}

fn pseudo_random(n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for w in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
    out
}

/// A page-aligned, pre-faulted buffer of one block (O_DIRECT needs aligned memory).
fn aligned_block() -> CliResult<memmap2::MmapMut> {
    Ok(memmap2::MmapOptions::new()
        .len(BLOCK)
        .populate()
        .map_anon()?)
}

/// O_DIRECT open, or buffered where the file system refuses O_DIRECT (tmpfs).
fn open_direct(path: &Path, flags: OFlags) -> CliResult<std::os::fd::OwnedFd> {
    match rustix::fs::open(
        path,
        flags | OFlags::DIRECT | OFlags::CLOEXEC,
        Mode::from(0o644),
    ) {
        Ok(fd) => Ok(fd),
        Err(rustix::io::Errno::INVAL) => Ok(rustix::fs::open(
            path,
            flags | OFlags::CLOEXEC,
            Mode::from(0o644),
        )?),
        Err(e) => Err(super::Failure(format!("open {}: {e}", path.display()))),
    }
}

/// Sequential O_DIRECT writes of `data` in 4 MiB blocks, then fdatasync: seconds.
fn raw_write(path: &Path, data: &[u8]) -> CliResult<f64> {
    let mut block = aligned_block()?;
    let t = Instant::now();
    let fd = open_direct(path, OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC)?;
    let mut off = 0u64;
    for chunk in data.chunks(BLOCK) {
        block[..chunk.len()].copy_from_slice(chunk);
        let mut done = 0;
        while done < BLOCK {
            let n = rustix::io::pwrite(&fd, &block[done..], off + done as u64)?;
            if n == 0 {
                return fail("raw write: the disk accepted no bytes");
            }
            done += n;
        }
        off += BLOCK as u64;
    }
    rustix::fs::fdatasync(&fd)?;
    Ok(t.elapsed().as_secs_f64())
}

/// Drops the file's clean pages, then reads it with O_DIRECT: seconds.
fn raw_read(path: &Path, size: u64) -> CliResult<f64> {
    drop_cache(path)?;
    let mut block = aligned_block()?;
    let t = Instant::now();
    let fd = open_direct(path, OFlags::RDONLY)?;
    let mut off = 0u64;
    while off < size {
        let n = rustix::io::pread(&fd, &mut block[..], off)?;
        if n == 0 {
            return fail(format!("raw read: {} ended early", path.display()));
        }
        off += n as u64;
    }
    std::hint::black_box(&block[..]);
    Ok(t.elapsed().as_secs_f64())
}

/// A memcpy of the data into memory that is already faulted in (a save's stall floor).
fn memcpy_reused(data: &[u8]) -> f64 {
    let mut dst = vec![0u8; data.len()];
    dst.copy_from_slice(data); // fault the pages in
    let t = Instant::now();
    dst.copy_from_slice(data);
    std::hint::black_box(&dst);
    t.elapsed().as_secs_f64()
}

fn drop_cache(path: &Path) -> CliResult {
    let f = std::fs::File::open(path)?;
    rustix::fs::fadvise(&f, 0, None, Advice::DontNeed)?;
    Ok(())
}

/// Drops the store's segment pages, opens it read-only and reads every tensor verified.
fn cold_load(dir: &Path) -> CliResult<f64> {
    for e in std::fs::read_dir(dir.join("segments"))? {
        drop_cache(&e?.path())?;
    }
    let t = Instant::now();
    let store = Store::open(dir, Options::read_only())?;
    let ck = store.checkpoint(Selector::Latest)?;
    let mut n = 0usize;
    for name in ck.tensor_names() {
        n += ck.tensor(name)?.data.len();
    }
    std::hint::black_box(n);
    Ok(t.elapsed().as_secs_f64())
}

/// Resident set size now, from /proc/self/statm (0 where unavailable).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * rustix::param::page_size() as u64)
}

/// Peak RSS of the process (VmHWM), 0 where unavailable.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// Samples RSS every millisecond on a thread; `stop` returns the peak over the start value.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    base: u64,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start() -> Self {
        let base = rss_bytes();
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(base));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_bytes(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        RssSampler {
            stop,
            peak,
            base,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed).max(rss_bytes()) - self.base
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert_eq!(parse_size("3GB"), Ok(3_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("2 parsecs")
            .unwrap_err()
            .contains("unknown size unit"));
        assert!(parse_size("lots").is_err());
    }
}
