//! `ckptstore bench`: the store against this machine's own limits, in one run, on one file
//! system: raw sequential write and read of the same byte count (each both O_DIRECT and
//! through the page cache; the limit is the faster), a memcpy into reused memory (the floor of
//! a save's stall), durable synchronous save, incremental save, async save (stall and time to
//! durable), cold verified loads, and the peak extra memory of the async save. Rounds are
//! interleaved and medians reported; ratios are to the raw limits of the same run. Several
//! sizes (`--sizes`) run one after another, and `--plot` draws GB/s against size.

use super::bench_cost::{costed, Cost};
use super::bench_raw::{self, Cold, BLOCK};
use super::plot::{line_chart, Series};
use super::{emit, emit_json, fail, human_bytes, CliResult};
use ckptstore::io::{default_backend, IoBackend, StdIo};
use ckptstore::{Compression, DType, Options, Pipeline, PipelineOptions, Selector, Store};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Arguments of `ckptstore bench`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Every figure is measured in this run on the file system of DIR, rounds interleaved, medians \
reported. 'Cold' reads drop the page cache first (`sync; echo 3 > /proc/sys/vm/drop_caches` \
when run as root, else the files' own pages with POSIX_FADV_DONTNEED; --cold file forces the \
latter). The raw limits are the fastest of O_DIRECT and page-cache I/O of the same bytes (reads \
O_DIRECT both into huge pages, where free, and into 4 KiB pages). Tensor data is pseudo-random (incompressible, nothing \
deduplicates), except for the compression pair: f32 values spread like trained weights, saved \
raw and with zstd-1 + byte shuffling. Peak extra RSS is sampled every millisecond during the async save, over the \
resident size before it.

Exit status: 0 on success; 1 with a one-line reason on stderr.")]
pub struct Args {
    /// Directory to benchmark in (created; what the bench writes there is removed at the end),
    /// or a bucket URL (s3://bucket/prefix, with AWS_ENDPOINT_URL / AWS_ALLOW_HTTP and the
    /// credentials from the environment): then the bench saves and loads bucket stores under
    /// that prefix and reports GB/s and requests per checkpoint.
    #[arg(long, default_value = "ckptstore-bench")]
    pub dir: PathBuf,
    /// Bytes per checkpoint (and for the raw figures): e.g. 2GiB, 512MiB, 1000000.
    #[arg(long, default_value = "2GiB", value_parser = parse_size, conflicts_with = "sizes")]
    pub size: u64,
    /// Several sizes, measured one after another (comma-separated): e.g. 256MiB,1GiB,2GiB.
    #[arg(long, value_parser = parse_size, value_delimiter = ',')]
    pub sizes: Vec<u64>,
    /// Also write an SVG chart of GB/s against size (store save and load next to the raw
    /// limits) to this file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// How cold reads are made cold: auto (drop the whole page cache when root) or file.
    #[arg(long, value_enum, default_value = "auto")]
    pub cold: Cold,
    /// Interleaved rounds; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Staging budget of the async save, MiB.
    #[arg(long, default_value_t = 256)]
    pub budget_mib: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also save and load the same bytes sealed (AES-256-GCM, a fresh key), next to the plain
    /// save and load of the round, with the CPU time (user + sys, all threads) per GB of each.
    #[arg(long)]
    pub encrypt: bool,
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

/// Median of the samples (seconds).
pub(super) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

#[derive(Default)]
struct Samples {
    raw_write_direct: Vec<f64>,
    raw_write_buffered: Vec<f64>,
    raw_read_direct: Vec<f64>,
    /// O_DIRECT into a buffer of 4 KiB pages (as `dd` reads); `raw_read_direct` reads into
    /// huge pages where the kernel has them free.
    raw_read_direct_small: Vec<f64>,
    raw_read_buffered: Vec<f64>,
    memcpy: Vec<f64>,
    save: Vec<f64>,
    save_std: Vec<f64>,
    float_raw: Vec<f64>,
    float_zstd: Vec<f64>,
    zstd_ratio: Vec<f64>,
    incremental: Vec<f64>,
    stall: Vec<f64>,
    async_durable: Vec<f64>,
    load: Vec<f64>,
    load_copy: Vec<f64>,
    /// Every tensor in one call (`tensors_owned`: what the Python package's `load` does).
    load_batch: Vec<f64>,
    peak_extra: Vec<u64>,
    /// What the durable save, the std save and the two cold loads cost (see `bench_cost`).
    costs: [Vec<Cost>; 5],
    /// Whether every cold read dropped the whole page cache.
    global_drop: bool,
    /// `--encrypt`: (wall, CPU) seconds of the plain durable save and cold load into new
    /// memory, and of the same sealed.
    plain_save_cpu: Vec<f64>,
    plain_load_cpu: Vec<f64>,
    sealed_save: Vec<(f64, f64)>,
    sealed_load: Vec<(f64, f64)>,
}

/// Runs `f`, returning its result with the (wall, CPU) seconds it took (CPU: user + sys of
/// every thread, as [`costed`] measures it).
fn timed<T>(f: impl FnOnce() -> CliResult<T>) -> CliResult<(T, f64, f64)> {
    let t = Instant::now();
    let (out, cost) = costed(f);
    Ok((out?, t.elapsed().as_secs_f64(), cost.user + cost.sys))
}

/// `--encrypt` figures: medians of (wall, CPU) seconds.
struct Sealed {
    plain_save_cpu: f64,
    plain_load_cpu: f64,
    save: f64,
    save_cpu: f64,
    load: f64,
    load_cpu: f64,
}

/// The steps whose cost is shown, in `Samples::costs` order.
const COSTED: [&str; 5] = [
    "durable save",
    "durable save (std)",
    "cold load, zero-copy",
    "cold load, new memory",
    "cold load, one call",
];

/// Medians of one size's samples, seconds (and the derived figures).
struct Report {
    size: u64,
    raw_write_direct: Option<f64>,
    raw_write_buffered: f64,
    raw_read_direct: Option<f64>,
    raw_read_direct_small: Option<f64>,
    raw_read_buffered: f64,
    memcpy: f64,
    save: f64,
    save_std: Option<f64>,
    float_raw: f64,
    float_zstd: f64,
    zstd_ratio: f64,
    incremental: f64,
    stall: f64,
    durable: f64,
    load: f64,
    load_copy: f64,
    load_batch: f64,
    peak_extra: u64,
    costs: [Cost; 5],
    global_drop: bool,
    budget: u64,
    sealed: Option<Sealed>,
}

fn median_opt(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| median(v))
}

impl Report {
    fn of(size: u64, budget: u64, s: &Samples) -> Report {
        let mut peak = s.peak_extra.clone();
        peak.sort_unstable();
        Report {
            size,
            raw_write_direct: median_opt(&s.raw_write_direct),
            raw_write_buffered: median(&s.raw_write_buffered),
            raw_read_direct: median_opt(&s.raw_read_direct),
            raw_read_direct_small: median_opt(&s.raw_read_direct_small),
            raw_read_buffered: median(&s.raw_read_buffered),
            memcpy: median(&s.memcpy),
            save: median(&s.save),
            save_std: median_opt(&s.save_std),
            float_raw: median(&s.float_raw),
            float_zstd: median(&s.float_zstd),
            zstd_ratio: median(&s.zstd_ratio),
            incremental: median(&s.incremental),
            stall: median(&s.stall),
            durable: median(&s.async_durable),
            load: median(&s.load),
            load_copy: median(&s.load_copy),
            load_batch: median(&s.load_batch),
            peak_extra: peak[peak.len() / 2],
            costs: s.costs.each_ref().map(|c| Cost::median(c)),
            global_drop: s.global_drop,
            budget,
            sealed: (!s.sealed_save.is_empty()).then(|| {
                let first: Vec<f64> = s.sealed_save.iter().map(|x| x.0).collect();
                let second: Vec<f64> = s.sealed_save.iter().map(|x| x.1).collect();
                let lw: Vec<f64> = s.sealed_load.iter().map(|x| x.0).collect();
                let lc: Vec<f64> = s.sealed_load.iter().map(|x| x.1).collect();
                Sealed {
                    plain_save_cpu: median(&s.plain_save_cpu),
                    plain_load_cpu: median(&s.plain_load_cpu),
                    save: median(&first),
                    save_cpu: median(&second),
                    load: median(&lw),
                    load_cpu: median(&lc),
                }
            }),
        }
    }

    /// CPU seconds per GB (10^9 bytes) of `cpu` seconds for this size.
    fn cpu_per_gb(&self, cpu: f64) -> f64 {
        cpu / (self.size as f64 / 1e9)
    }

    /// The async stall's floor: the memcpy of the state into reused memory, or, when the
    /// staging budget is smaller than the state, the raw write of what does not fit (seconds).
    fn stall_floor(&self) -> f64 {
        let over = self.size.saturating_sub(self.budget) as f64 / self.size as f64;
        self.memcpy.max(over * self.raw_write())
    }

    fn gb(&self, secs: f64) -> f64 {
        self.size as f64 / secs / 1e9
    }

    /// The raw write limit: the faster of O_DIRECT and buffered + fdatasync (seconds).
    fn raw_write(&self) -> f64 {
        self.raw_write_direct
            .map_or(self.raw_write_buffered, |d| d.min(self.raw_write_buffered))
    }

    /// The raw read limit: the fastest of O_DIRECT (into huge pages where free, and into
    /// 4 KiB pages) and buffered, cold (seconds).
    fn raw_read(&self) -> f64 {
        [self.raw_read_direct, self.raw_read_direct_small]
            .into_iter()
            .flatten()
            .fold(self.raw_read_buffered, f64::min)
    }

    fn json(&self, rounds: usize, budget: usize, dir: &Path) -> serde_json::Value {
        let gb = |s: f64| self.gb(s);
        let mut v = self.json_main(rounds, budget, dir);
        v["raw_read_direct_4k_pages_gbps"] = json!(self.raw_read_direct_small.map(gb));
        v["load_batch_gbps"] = json!(gb(self.load_batch));
        v["load_batch_vs_raw_read"] = json!(self.raw_read() / self.load_batch);
        v
    }

    /// [`Report::json`] but for the figures added later (one `json!` is as deep as the
    /// macro expands).
    fn json_main(&self, rounds: usize, budget: usize, dir: &Path) -> serde_json::Value {
        let gb = |s: f64| self.gb(s);
        json!({
            "dir": dir.display().to_string(),
            "size_bytes": self.size,
            "rounds": rounds,
            "budget_bytes": budget,
            "cold": if self.global_drop { "drop_caches" } else { "fadvise" },
            "raw_write_gbps": gb(self.raw_write()),
            "raw_write_direct_gbps": self.raw_write_direct.map(gb),
            "raw_write_buffered_gbps": gb(self.raw_write_buffered),
            "raw_read_gbps": gb(self.raw_read()),
            "raw_read_direct_gbps": self.raw_read_direct.map(gb),
            "raw_read_buffered_gbps": gb(self.raw_read_buffered),
            "memcpy_gbps": gb(self.memcpy),
            "save_gbps": gb(self.save),
            "save_vs_raw_write": self.raw_write() / self.save,
            "io_backend": default_backend().backend.to_string(),
            "save_std_gbps": self.save_std.map(gb),
            "save_floats_gbps": gb(self.float_raw),
            "save_floats_zstd_gbps": gb(self.float_zstd),
            "zstd_stored_over_raw": self.zstd_ratio,
            "save_incremental_s": self.incremental,
            "save_incremental_vs_full": self.incremental / self.save,
            "save_async_stall_s": self.stall,
            "save_async_stall_vs_memcpy": self.stall / self.memcpy,
            "save_async_stall_floor_s": self.stall_floor(),
            "save_async_stall_vs_floor": self.stall / self.stall_floor(),
            "save_async_durable_gbps": gb(self.durable),
            "load_gbps": gb(self.load),
            "load_vs_raw_read": self.raw_read() / self.load,
            "load_copy_gbps": gb(self.load_copy),
            "load_copy_vs_raw_read": self.raw_read() / self.load_copy,
            "peak_extra_rss_bytes": self.peak_extra,
            "encrypted": self.sealed.as_ref().map(|e| json!({
                "save_gbps": gb(e.save),
                "save_vs_plain_save": self.save / e.save,
                "save_cpu_s_per_gb": self.cpu_per_gb(e.save_cpu),
                "plain_save_cpu_s_per_gb": self.cpu_per_gb(e.plain_save_cpu),
                "load_copy_gbps": gb(e.load),
                "load_copy_vs_plain_load_copy": self.load_copy / e.load,
                "load_copy_cpu_s_per_gb": self.cpu_per_gb(e.load_cpu),
                "plain_load_copy_cpu_s_per_gb": self.cpu_per_gb(e.plain_load_cpu),
            })),
            "costs": COSTED.iter().zip(&self.costs).map(|(what, c)| json!({
                "what": what,
                "user_s": c.user,
                "sys_s": c.sys,
                "dirty_writeback_peak_bytes": c.dirty_peak,
                "rss_peak_bytes": c.rss_peak,
            })).collect::<Vec<_>>(),
        })
    }

    fn table(&self, rounds: usize, budget_mib: usize, dir: &Path) -> String {
        let backend = default_backend().backend;
        let row = |what: &str, secs: f64, vs: String| -> Vec<String> {
            vec![
                what.to_owned(),
                format!("{:.3} s", secs),
                format!("{:.2}", self.gb(secs)),
                vs,
            ]
        };
        let limit = |secs: f64, best: f64| {
            if secs == best {
                "1.00 (limit)".to_owned()
            } else {
                format!("{:.2} of the limit", best / secs)
            }
        };
        let (w, r) = (self.raw_write(), self.raw_read());
        let mut rows = Vec::new();
        if let Some(d) = self.raw_write_direct {
            rows.push(row("raw write, O_DIRECT + fdatasync", d, limit(d, w)));
        }
        rows.push(row(
            "raw write, buffered + fdatasync",
            self.raw_write_buffered,
            limit(self.raw_write_buffered, w),
        ));
        if let Some(d) = self.raw_read_direct {
            let what = "raw read, O_DIRECT, cold (huge pages)";
            rows.push(row(what, d, limit(d, r)));
        }
        if let Some(d) = self.raw_read_direct_small {
            let what = "raw read, O_DIRECT, cold (4 KiB pages)";
            rows.push(row(what, d, limit(d, r)));
        }
        rows.push(row(
            "raw read, buffered, cold",
            self.raw_read_buffered,
            limit(self.raw_read_buffered, r),
        ));
        rows.push(row("memcpy into reused memory", self.memcpy, "-".into()));
        rows.push(row(
            &format!("store save, durable (sync, {backend})"),
            self.save,
            format!("{:.2} of raw write", w / self.save),
        ));
        if let Some(std) = self.save_std {
            rows.push(row(
                "store save, durable (sync, std)",
                std,
                format!("{:.2} of raw write", w / std),
            ));
        }
        rows.extend([
            row(
                "store save, weight-like f32, raw",
                self.float_raw,
                format!("{:.2} of raw write", w / self.float_raw),
            ),
            row(
                "store save, weight-like f32, zstd-1",
                self.float_zstd,
                format!(
                    "{:.2}× the raw save's time; stored {:.2} of the bytes",
                    self.float_zstd / self.float_raw,
                    self.zstd_ratio
                ),
            ),
            row(
                "store save, incremental (90% unchanged)",
                self.incremental,
                format!("{:.2}× the full save's time", self.incremental / self.save),
            ),
            row(
                "store save async: stall",
                self.stall,
                format!(
                    "{:.2}× memcpy; {:.2}× the floor max(memcpy, (state − budget) / raw write)",
                    self.stall / self.memcpy,
                    self.stall / self.stall_floor()
                ),
            ),
            row(
                "store save async: durable",
                self.durable,
                format!("{:.2} of raw write", w / self.durable),
            ),
            row(
                "store load, cold, verified (zero-copy)",
                self.load,
                format!("{:.2} of raw read", r / self.load),
            ),
            row(
                "store load, cold, verified, into new memory",
                self.load_copy,
                format!("{:.2} of raw read", r / self.load_copy),
            ),
            row(
                "store load, cold, verified, all in one call",
                self.load_batch,
                format!("{:.2} of raw read", r / self.load_batch),
            ),
        ]);
        if let Some(e) = &self.sealed {
            rows.extend([
                row(
                    "store save, durable, AES-256-GCM sealed",
                    e.save,
                    format!(
                        "{:.2} of the plain save; CPU {:.2} s/GB (plain {:.2})",
                        self.save / e.save,
                        self.cpu_per_gb(e.save_cpu),
                        self.cpu_per_gb(e.plain_save_cpu)
                    ),
                ),
                row(
                    "store load, cold, sealed, into new memory",
                    e.load,
                    format!(
                        "{:.2} of the plain load; CPU {:.2} s/GB (plain {:.2})",
                        self.load_copy / e.load,
                        self.cpu_per_gb(e.load_cpu),
                        self.cpu_per_gb(e.plain_load_cpu)
                    ),
                ),
            ]);
        }
        let mut text = format!(
            "ckptstore bench: {} per run, {} rounds (medians), in {}; cold reads after {}\n\n",
            human_bytes(self.size),
            rounds,
            dir.display(),
            if self.global_drop {
                "sync + drop_caches"
            } else {
                "POSIX_FADV_DONTNEED of the files"
            }
        );
        text += &super::table(
            &["what", "time", "GB/s", "ratio"],
            &[false, true, true, false],
            &rows,
        );
        let gib = self.size as f64 / f64::from(1u32 << 30);
        let cost_rows: Vec<Vec<String>> = COSTED
            .iter()
            .zip(&self.costs)
            .filter(|(_, c)| c.user + c.sys > 0.0 || c.rss_peak > 0)
            .map(|(what, c)| {
                vec![
                    what.to_string(),
                    format!("{:.2} s", c.user),
                    format!("{:.2} s", c.sys),
                    format!("{:.2} s", (c.user + c.sys) / gib),
                    human_bytes(c.dirty_peak),
                    human_bytes(c.rss_peak),
                ]
            })
            .collect();
        text += "\nwhere the time went (medians; CPU of all this process's threads):\n";
        text += &super::table(
            &[
                "step",
                "user",
                "sys",
                "CPU per GiB",
                "peak dirty+writeback",
                "peak RSS",
            ],
            &[false, true, true, true, true, true],
            &cost_rows,
        );
        text += &format!(
            "\npeak extra RSS during the async save: {} (staging budget {})\n",
            human_bytes(self.peak_extra),
            human_bytes((budget_mib as u64) << 20),
        );
        text
    }
}

/// `ckptstore bench`.
pub fn run(a: Args) -> CliResult {
    if a.rounds == 0 {
        return fail("--rounds must be at least 1");
    }
    let sizes: Vec<u64> = if a.sizes.is_empty() {
        vec![a.size]
    } else {
        a.sizes.clone()
    };
    if super::is_url(&a.dir) {
        return super::bench_remote::run(&a, &sizes);
    }
    std::fs::create_dir_all(&a.dir)
        .map_err(|e| super::Failure(format!("cannot create {}: {e}", a.dir.display())))?;
    let work = a.dir.join(format!("bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let mut reports = Vec::new();
    for &size in &sizes {
        let size = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        let result = measure(&a, size, &work);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&work);
        }
        reports.push(Report::of(size, (a.budget_mib as u64) << 20, &result?));
    }
    let _ = std::fs::remove_dir_all(&work);
    let peak_rss = peak_rss_bytes();
    if let Some(path) = &a.plot {
        std::fs::write(path, plot(&reports))
            .map_err(|e| super::Failure(format!("cannot write {}: {e}", path.display())))?;
    }
    let budget = a.budget_mib << 20;
    if a.json {
        let mut v = if let [one] = &reports[..] {
            one.json(a.rounds, budget, &a.dir)
        } else {
            json!({
                "sizes": reports
                    .iter()
                    .map(|r| r.json(a.rounds, budget, &a.dir))
                    .collect::<Vec<_>>()
            })
        };
        v["peak_rss_bytes"] = json!(peak_rss);
        return emit_json(&v);
    }
    let mut text = reports
        .iter()
        .map(|r| r.table(a.rounds, a.budget_mib, &a.dir))
        .collect::<Vec<_>>()
        .join("\n");
    text += &format!("peak RSS of this process: {}\n", human_bytes(peak_rss));
    if let Some(path) = &a.plot {
        text += &format!("chart: {}\n", path.display());
    }
    emit(&text)
}

/// GB/s against size: the store's save and loads next to the raw limits.
fn plot(reports: &[Report]) -> String {
    let line = |label: &str, dashed: bool, secs: &dyn Fn(&Report) -> f64| Series {
        label: label.to_owned(),
        dashed,
        points: reports
            .iter()
            .map(|r| (r.size as f64, r.gb(secs(r))))
            .collect(),
    };
    let series = [
        line("raw write (limit)", true, &|r| r.raw_write()),
        line("raw read, cold (limit)", true, &|r| r.raw_read()),
        line("save, durable", false, &|r| r.save),
        line("save async, durable", false, &|r| r.durable),
        line("load, cold, zero-copy", false, &|r| r.load),
        line("load, cold, new memory", false, &|r| r.load_copy),
        line("load, cold, all in one call", false, &|r| r.load_batch),
    ];
    line_chart(
        "ckptstore bench: GB/s against checkpoint size",
        "GB/s (10^9 bytes per second)",
        &series,
        |x| human_bytes(x as u64),
    )
}

/// One durable synchronous save of `data` into a new store at `dir`: seconds.
fn sync_save(dir: &Path, data: &[u8], round: usize, opts: Options) -> CliResult<f64> {
    Ok(sync_save_info(dir, data, round, opts)?.0)
}

/// [`sync_save`], also returning stored bytes ÷ raw bytes.
fn sync_save_info(dir: &Path, data: &[u8], round: usize, opts: Options) -> CliResult<(f64, f64)> {
    let t = Instant::now();
    let mut store = Store::open(dir, opts)?;
    let mut txn = store.begin(round as u64)?;
    put_all(data, |name, bytes| {
        txn.put_tensor(name, DType::F32, &[bytes.len() as u64 / 4], bytes)
    })?;
    let c = txn.commit()?;
    let secs = t.elapsed().as_secs_f64();
    Ok((
        secs,
        c.bytes_written as f64 / c.raw_bytes_written.max(1) as f64,
    ))
}

/// f32 values spread like trained weights (uniform in ±0.02): the bytes a compressor sees in
/// a real checkpoint, unlike random bytes.
fn float_weights(out: &mut [u8]) {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for w in out.chunks_mut(4) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let v = (x >> 32) as i32 as f32 * (0.02 / 2_147_483_648.0);
        w.copy_from_slice(&v.to_le_bytes()[..w.len()]);
    }
}

fn measure(a: &Args, size: u64, work: &Path) -> CliResult<Samples> {
    let backend = default_backend().backend;
    let bar = ProgressBar::new((a.rounds * 7) as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} bench [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let msg = |round: usize, what: &str| {
        bar.set_message(format!(
            "{}, round {}: {what}",
            human_bytes(size),
            round + 1
        ));
    };
    bar.set_message("generating data");
    let mut data = pseudo_random(size as usize);
    // Weight-like floats for the compression pair; also the (pre-faulted) destination of the
    // memcpy, so the bench holds two copies of the state, not three.
    let mut floats = vec![0u8; size as usize];
    let mut s = Samples {
        global_drop: true,
        ..Samples::default()
    };
    let mut cold = |files: &[&Path]| -> CliResult {
        s.global_drop &= bench_raw::drop_cache(files, a.cold)?;
        Ok(())
    };
    let (mut plain_save_cpu, mut plain_load_cpu, mut sealed_save, mut sealed_load) =
        (vec![], vec![], vec![], vec![]);
    let mut raw_w = [Vec::new(), Vec::new()];
    let mut raw_r = [Vec::new(), Vec::new()];
    let mut raw_read_small = Vec::new();
    let (mut memcpy, mut save, mut save_std, mut float_raw, mut float_zstd, mut zstd_ratio) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut load, mut load_copy, mut incremental, mut stall, mut durable, mut peak) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut load_batch = vec![];
    let mut costs: [Vec<Cost>; 5] = Default::default();
    for round in 0..a.rounds {
        // Every chunk differs from every earlier round's: nothing deduplicates.
        stamp(&mut data, round, 0);
        // The raw limits, both ways, the way first alternating between rounds.
        let raw = work.join("raw.bin");
        for k in 0..2 {
            let direct = (k + round) % 2 == 0;
            let way = if direct { "O_DIRECT" } else { "buffered" };
            msg(round, &format!("raw write and read, {way}"));
            if let Some(w) = bench_raw::write(&raw, &data, direct)? {
                raw_w[usize::from(direct)].push(w);
                cold(&[&raw])?;
                if let Some(r) = bench_raw::read(&raw, size, direct, true)? {
                    raw_r[usize::from(direct)].push(r);
                }
                if direct {
                    // The same read into 4 KiB pages, as `dd` reads: a block device request
                    // covers fewer bytes of scattered pages (bench_raw::aligned_block).
                    cold(&[&raw])?;
                    if let Some(r) = bench_raw::read(&raw, size, true, false)? {
                        raw_read_small.push(r);
                    }
                }
            }
            std::fs::remove_file(&raw)?;
        }
        bar.inc(1);
        msg(round, "memcpy");
        memcpy.push(memcpy_reused(&data, &mut floats));
        bar.inc(1);

        msg(round, &format!("durable save ({backend})"));
        let dir = work.join(format!("sync-{round}"));
        let (secs, cost) = costed(|| sync_save(&dir, &data, round, Options::default()));
        save.push(secs?);
        plain_save_cpu.push(cost.user + cost.sys);
        costs[0].push(cost);
        bar.inc(1);
        if a.encrypt {
            msg(round, "durable save, sealed");
            let sdir = work.join(format!("sealed-{round}"));
            let sealed = Options {
                encryption_key: Some(ckptstore::crypt::Key::generate()?),
                ..Options::default()
            };
            let (_, wall, cpu) = timed(|| sync_save(&sdir, &data, round, sealed.clone()))?;
            sealed_save.push((wall, cpu));
            msg(round, "cold load, sealed");
            let files = segment_files(&sdir)?;
            let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
            cold(&refs)?;
            let (_, wall, cpu) = timed(|| cold_load_with(&sdir, false, sealed.clone()))?;
            sealed_load.push((wall, cpu));
            std::fs::remove_dir_all(&sdir)?;
        }
        if backend != IoBackend::Std {
            msg(round, "durable save (std)");
            stamp(&mut data, round, 1); // differ from the other saves' chunks
            let std_dir = work.join(format!("sync-std-{round}"));
            let opts = Options {
                io: Arc::new(StdIo),
                ..Options::default()
            };
            let (secs, cost) = costed(|| sync_save(&std_dir, &data, round, opts));
            save_std.push(secs?);
            costs[1].push(cost);
            std::fs::remove_dir_all(&std_dir)?;
            stamp(&mut data, round, 0); // back to the bytes the first save stored
        }
        // Compression, on weight-like floats (random bytes never compress): the same data
        // saved raw and with zstd-1 + byte shuffling.
        msg(round, "float save, raw and zstd");
        float_weights(&mut floats);
        stamp(&mut floats, round, 0);
        let fdir = work.join(format!("float-raw-{round}"));
        float_raw.push(sync_save(&fdir, &floats, round, Options::default())?);
        std::fs::remove_dir_all(&fdir)?;
        let fdir = work.join(format!("float-zstd-{round}"));
        let zopts = Options {
            compression: Compression::zstd(),
            ..Options::default()
        };
        let (secs, ratio) = sync_save_info(&fdir, &floats, round, zopts)?;
        float_zstd.push(secs);
        zstd_ratio.push(ratio);
        std::fs::remove_dir_all(&fdir)?;
        bar.inc(1);
        msg(round, "cold loads");
        let segments = segment_files(&dir)?;
        let seg_refs: Vec<&Path> = segments.iter().map(PathBuf::as_path).collect();
        cold(&seg_refs)?;
        let (secs, cost) = costed(|| cold_load(&dir, true));
        load.push(secs?);
        costs[2].push(cost);
        cold(&seg_refs)?;
        let (secs, cost) = costed(|| cold_load(&dir, false));
        load_copy.push(secs?);
        plain_load_cpu.push(cost.user + cost.sys);
        costs[3].push(cost);
        cold(&seg_refs)?;
        let (secs, cost) = costed(|| cold_load_batch(&dir));
        load_batch.push(secs?);
        costs[4].push(cost);
        bar.inc(1);
        // Incremental: one 4 MiB block in ten changes, the rest is what the store holds.
        msg(round, "incremental save");
        for block in data.chunks_mut(BLOCK).step_by(10) {
            block[18] ^= 0x5a;
        }
        incremental.push(sync_save(&dir, &data, round + 1, Options::default())?);
        for block in data.chunks_mut(BLOCK).step_by(10) {
            block[18] ^= 0x5a;
        }
        std::fs::remove_dir_all(&dir)?;
        bar.inc(1);

        msg(round, "async save");
        stamp(&mut data, round, 2); // differ from the sync saves' chunks
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
        stall.push(r.stall.as_secs_f64());
        durable.push(r.time_to_durable.as_secs_f64());
        drop(p.close());
        peak.push(sampler.stop());
        std::fs::remove_dir_all(&dir)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let [raw_write_buffered, raw_write_direct] = raw_w;
    let [raw_read_buffered, raw_read_direct] = raw_r;
    Ok(Samples {
        raw_write_direct,
        raw_write_buffered,
        raw_read_direct,
        raw_read_direct_small: raw_read_small,
        raw_read_buffered,
        memcpy,
        save,
        save_std,
        float_raw,
        float_zstd,
        zstd_ratio,
        incremental,
        stall,
        async_durable: durable,
        load,
        load_copy,
        load_batch,
        peak_extra: peak,
        costs,
        global_drop: s.global_drop,
        plain_save_cpu,
        plain_load_cpu,
        sealed_save,
        sealed_load,
    })
}

/// Writes `(round, block, variant)` into the head of every block, so no block equals one of
/// another round or variant (nothing deduplicates by accident).
pub(super) fn stamp(data: &mut [u8], round: usize, variant: u64) {
    for (k, block) in data.chunks_mut(BLOCK).enumerate() {
        let head = [round as u64, k as u64, variant];
        for (i, w) in head.iter().enumerate() {
            block[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
    }
}

fn segment_files(dir: &Path) -> CliResult<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir.join("segments"))? {
        out.push(e?.path());
    }
    Ok(out)
}

/// Splits the data into tensors of 64 MiB (the last shorter), named like a model's layers.
pub(super) fn put_all(
    data: &[u8],
    mut put: impl FnMut(&str, &[u8]) -> ckptstore::Result<()>,
) -> CliResult {
    for (i, t) in data.chunks(64 << 20).enumerate() {
        put(&format!("layers.{i}.weight"), t)?;
    }
    Ok(())
}

pub(super) fn pseudo_random(n: usize) -> Vec<u8> {
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

/// A memcpy of the data into memory that is already faulted in (a save's stall floor).
fn memcpy_reused(data: &[u8], dst: &mut [u8]) -> f64 {
    dst.copy_from_slice(data); // fault the pages in (if they were not)
    let t = Instant::now();
    dst.copy_from_slice(data);
    std::hint::black_box(&dst);
    t.elapsed().as_secs_f64()
}

/// Opens the (cold) store read-only and reads every tensor verified: `zero_copy` through the
/// view path (the segment's memory map; what the Python package's numpy loads use), else into
/// new memory (one copy; what a load into fresh torch tensors costs), one byte of every page
/// read after: seconds.
fn cold_load(dir: &Path, zero_copy: bool) -> CliResult<f64> {
    cold_load_with(dir, zero_copy, Options::default())
}

/// [`cold_load`] with the options (a key) of `opts`, opened read-only.
fn cold_load_with(dir: &Path, zero_copy: bool, opts: Options) -> CliResult<f64> {
    let t = Instant::now();
    let opts = Options {
        read_only: true,
        ..opts
    };
    let store = Store::open(dir, opts)?;
    let ck = store.checkpoint(Selector::Latest)?;
    let mut n = 0usize;
    for name in ck.tensor_names() {
        // Every page touched: a load that left bytes unread (a map not yet faulted in) would
        // look faster than it is.
        n += if zero_copy {
            touch(ck.tensor_view(name)?.data())
        } else {
            touch(&ck.tensor(name)?.data)
        };
    }
    std::hint::black_box(n);
    Ok(t.elapsed().as_secs_f64())
}

/// Opens the (cold) store read-only and reads every tensor verified into memory of its own in
/// one call (`tensors_owned`, the Python package's `load`), one byte of every page read
/// after: seconds.
fn cold_load_batch(dir: &Path) -> CliResult<f64> {
    let t = Instant::now();
    let store = Store::open(dir, Options::read_only())?;
    let ck = store.checkpoint(Selector::Latest)?;
    let names = ck.tensor_names();
    let n: usize = ck
        .tensors_owned(&names, true)?
        .iter()
        .map(|v| touch(v.data()))
        .sum();
    std::hint::black_box(n);
    Ok(t.elapsed().as_secs_f64())
}

/// Reads one byte of every 4 KiB page of `b` (a user's first look at a loaded tensor).
pub(super) fn touch(b: &[u8]) -> usize {
    b.iter()
        .step_by(4096)
        .map(|&x| usize::from(x))
        .sum::<usize>()
        + b.len()
}

/// Resident set size now, from /proc/self/statm (0 where unavailable).
pub(super) fn rss_bytes() -> u64 {
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
