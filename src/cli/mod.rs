//! The `ckptstore` command line: one file per subcommand, shared helpers here (opening a
//! store, checkpoint selection, human-readable sizes and times, JSON output, errors).

mod bench;
mod bench_cost;
mod bench_raw;
mod crashtest;
mod demo;
mod export;
mod gc;
mod import;
mod inspect;
mod ls;
mod pin;
mod plot;
mod pull;
mod recover;
mod rekey;
mod scrub;
mod synth;
mod verify;

use ckptstore::crypt::Key;
use ckptstore::{CheckpointInfo, MetaValue, Options, Selector, Store};
use clap::{Parser, Subcommand};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Crash-consistent checkpoint store for ML training.
///
/// Exit status: 0 on success; 1 with a one-line reason on stderr (`ckptstore: ...`) when the
/// command failed or found damage; 2 for a usage error.
#[derive(Debug, Parser)]
#[command(name = "ckptstore", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    access: StoreAccess,
}

/// How every subcommand opens a store: its keys and whether an unsafe directory is accepted.
#[derive(Debug, clap::Args)]
struct StoreAccess {
    /// Key file of an encrypted store (32 bytes, or 64 hex digits): new checkpoints are sealed
    /// with it and sealed ones read with it. Default: the file $CKPTSTORE_KEY_FILE names, else
    /// the hex key in $CKPTSTORE_KEY, else none (a plain store).
    #[arg(long, global = true, value_name = "PATH")]
    key_file: Option<PathBuf>,
    /// Key file of checkpoints sealed before a key rotation (read with it, never written
    /// with); may be given several times.
    #[arg(long, global = true, value_name = "PATH")]
    old_key_file: Vec<PathBuf>,
    /// Open a store directory that is world-writable or (for a writer) owned by another user,
    /// which is refused by default (whoever can write there can plant files the store acts on).
    #[arg(long, global = true)]
    allow_unsafe_dir: bool,
}

/// The store options the command line chose (`--key-file`, `--old-key-file`,
/// `--allow-unsafe-dir`), set once before the subcommand runs.
static ACCESS: std::sync::OnceLock<Options> = std::sync::OnceLock::new();

impl StoreAccess {
    /// Loads the keys (errors name the file, never its content).
    fn options(&self) -> CliResult<Options> {
        let encryption_key = match &self.key_file {
            Some(p) => Some(Key::from_file(p)?),
            None => Key::from_env()?,
        };
        let old_keys = self
            .old_key_file
            .iter()
            .map(|p| Key::from_file(p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Options {
            encryption_key,
            old_keys,
            allow_unsafe_dir: self.allow_unsafe_dir,
            ..Options::default()
        })
    }
}

/// Default store options with the command line's keys and `--allow-unsafe-dir`.
pub fn store_options() -> Options {
    ACCESS.get().cloned().unwrap_or_default()
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the checkpoints of a store (read-only; safe while a writer runs).
    Ls(ls::Args),
    /// Show one checkpoint: info, metadata, every tensor and blob with its chunks.
    Inspect(inspect::Args),
    /// Read every chunk and check its BLAKE3; exits non-zero naming the first bad chunk.
    Verify(verify::Args),
    /// Open a store as its writer, run crash recovery, and report what it repaired.
    Recover(recover::Args),
    /// Verify every chunk, quarantine the bad ones, heal the checkpoints a stored copy of the
    /// bytes can heal; exits non-zero naming the checkpoints that stay broken.
    Scrub(scrub::Args),
    /// Apply a retention policy: keep what any --keep-* rule keeps (and the newest and every
    /// pinned checkpoint), delete the rest, free their space (segments open readers still hold
    /// wait for them), then compact mostly-dead segments unless --no-compact.
    Gc(gc::Args),
    /// Pin a checkpoint: gc always keeps it and delete refuses it until it is unpinned.
    Pin(pin::Args),
    /// Unpin a checkpoint pinned with `ckptstore pin`.
    Unpin(pin::Args),
    /// Reseal every checkpoint under the key of --key-file (after a key rotation; the old
    /// keys given with --old-key-file), crash-safely, then free the old bytes.
    Rekey(rekey::Args),
    /// Write one checkpoint to a file in another format (safetensors, MindSpore .ckpt).
    Export(export::Args),
    /// Commit a file in another format (safetensors, MindSpore .ckpt) to a store as a new checkpoint.
    Import(import::Args),
    /// Measure the store against this machine's limits: raw O_DIRECT write/read, memcpy,
    /// durable and async save, cold load, peak memory (one run, medians of rounds).
    Bench(bench::Args),
    /// Restore a bucket store's newest state (s3://, gs://, az:// or file:///dir) into an empty
    /// local directory, lazily: the log now, each segment when first read (--all: now).
    Pull(pull::Args),
    /// Run a synthetic training job, SIGKILL its writer mid-save, recover, verify, resume.
    Demo(demo::Args),
    /// SIGKILL a writer again and again on this file system; check every acknowledged
    /// checkpoint survives each recovery bit-exact.
    Crashtest(crashtest::Args),
    /// Internal: the child writer process of `ckptstore demo`.
    #[command(name = "__demo-writer", hide = true)]
    DemoWriter(demo::WriterArgs),
    /// Internal: the child writer process of `ckptstore crashtest`.
    #[command(name = "__crash-writer", hide = true)]
    CrashWriter(crashtest::WriterArgs),
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
                || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            {
                // Help and version are output, not errors (the latter case exits 2).
                let _ = e.print();
                return if e.exit_code() == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(2)
                };
            }
            // clap's message is a paragraph (e.g. "required arguments were not provided:"
            // followed by the arguments), then usage and tips: keep the paragraph, one line.
            let text = e.render().to_string();
            let paragraph: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let reason = paragraph.join(" ");
            let reason = reason.strip_prefix("error: ").unwrap_or(&reason);
            eprintln!("ckptstore: {reason} (see --help)");
            return ExitCode::from(2);
        }
    };
    match cli.access.options() {
        Ok(o) => {
            let _ = ACCESS.set(o);
        }
        Err(Failure(reason)) => {
            eprintln!("ckptstore: {}", escape_controls(&reason));
            return ExitCode::FAILURE;
        }
    }
    let result = match cli.command {
        Command::Ls(a) => ls::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Verify(a) => verify::run(a),
        Command::Recover(a) => recover::run(a),
        Command::Scrub(a) => scrub::run(a),
        Command::Gc(a) => gc::run(a),
        Command::Pin(a) => pin::run(a, true),
        Command::Unpin(a) => pin::run(a, false),
        Command::Rekey(a) => rekey::run(a),
        Command::Export(a) => export::run(a),
        Command::Import(a) => import::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Pull(a) => pull::run(a),
        Command::Demo(a) => demo::run(a),
        Command::DemoWriter(a) => demo::run_writer(a),
        Command::Crashtest(a) => crashtest::run(a),
        Command::CrashWriter(a) => crashtest::run_writer(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(reason)) => {
            let line = reason.split_whitespace().collect::<Vec<_>>().join(" ");
            // The reason may name a tensor, a key or a path from the store: escaped as stdout is.
            eprintln!("ckptstore: {}", escape_controls(&line));
            ExitCode::FAILURE
        }
    }
}

/// Why a command failed: one line, printed as `ckptstore: <reason>`.
#[derive(Debug)]
pub struct Failure(pub String);

impl<E: std::error::Error> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(e.to_string())
    }
}

/// Result of a subcommand.
pub type CliResult<T = ()> = Result<T, Failure>;

/// A failure with a message.
pub fn fail<T>(reason: impl Into<String>) -> CliResult<T> {
    Err(Failure(reason.into()))
}

/// Whether `dir` is a bucket store's URL (`s3://`, `gs://`, `az://`, `file://`) rather than a
/// directory.
pub fn is_url(dir: &Path) -> bool {
    dir.to_str().is_some_and(ckptstore::remote::is_url)
}

/// Whether `dir` holds a store: a URL always may (the bucket is checked at open), a directory
/// when it has a `CURRENT` file.
pub fn has_store(dir: &Path) -> bool {
    is_url(dir) || dir.join(ckptstore::current::CURRENT_NAME).exists()
}

/// Checks that `dir` is an existing directory (or a bucket URL, checked at open), so that a
/// typo is reported as such rather than as a failed file-system call deep inside the engine.
pub fn check_dir(dir: &Path) -> CliResult {
    if is_url(dir) {
        return Ok(());
    }
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => fail(format!("{} is not a directory", dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fail(format!("{}: no such directory", dir.display()))
        }
        Err(e) => fail(format!("{}: {e}", dir.display())),
    }
}

/// Opens a store read-only (no lock, no repair): works while a writer runs.
pub fn open_read_only(dir: &Path) -> CliResult<Store> {
    check_dir(dir)?;
    let opts = Options {
        read_only: true,
        ..store_options()
    };
    Ok(Store::open(dir, opts)?)
}

/// The checkpoint picked by an optional positional STEP and an optional `--id`.
pub fn selector(step: Option<u64>, id: Option<u64>) -> Selector {
    match (id, step) {
        (Some(id), _) => Selector::Id(id),
        (None, Some(step)) => Selector::Step(step),
        (None, None) => Selector::Latest,
    }
}

/// `1536` → `1.5 KiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if v >= 100.0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A duration for people: `850 µs`, `12.3 ms`, `4.56 s`.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1e-3 {
        format!("{:.0} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// Nanoseconds since the Unix epoch → `2024-05-01T12:34:56.789Z` (UTC, RFC 3339).
pub fn iso_time(unix_ns: i64) -> String {
    let secs = unix_ns.div_euclid(1_000_000_000);
    let millis = unix_ns.rem_euclid(1_000_000_000) / 1_000_000;
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

/// How long ago `unix_ns` was: `5s ago`, `3m ago`, `2h ago`, `4d ago`.
pub fn age(unix_ns: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    let secs = (now - unix_ns) / 1_000_000_000;
    match secs {
        s if s < 0 => "in the future".into(),
        s if s < 120 => format!("{s}s ago"),
        s if s < 7_200 => format!("{}m ago", s / 60),
        s if s < 172_800 => format!("{}h ago", s / 3_600),
        s => format!("{}d ago", s / 86_400),
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A metadata value as JSON: strings and numbers as themselves, bytes as `{"hex": "..."}`
/// (a non-finite float becomes `null`).
pub fn meta_json(v: &MetaValue) -> Value {
    match v {
        MetaValue::Str(s) => json!(s),
        MetaValue::Int(i) => json!(i),
        MetaValue::Float(f) => json!(f),
        MetaValue::Bytes(b) => json!({ "hex": hex(b) }),
    }
}

/// All metadata as a JSON object.
pub fn metadata_json(m: &BTreeMap<String, MetaValue>) -> Value {
    Value::Object(
        m.iter()
            .map(|(k, v)| (k.clone(), meta_json(v)))
            .collect::<Map<_, _>>(),
    )
}

/// A metadata value for a table: short, one line.
pub fn meta_text(v: &MetaValue) -> String {
    match v {
        MetaValue::Str(s) => format!("{s:?}"),
        MetaValue::Int(i) => i.to_string(),
        MetaValue::Float(f) => format!("{f}"),
        MetaValue::Bytes(b) if b.len() <= 8 => format!("0x{}", hex(b)),
        MetaValue::Bytes(b) => format!("0x{}… ({} bytes)", hex(&b[..8]), b.len()),
    }
}

/// One checkpoint's summary as JSON (the object `ls --json` prints per checkpoint).
pub fn info_json(c: &CheckpointInfo) -> Value {
    json!({
        "id": c.id,
        "step": c.step,
        "epoch": c.epoch,
        "time_unix_ns": c.wall_time_unix_ns,
        "time": iso_time(c.wall_time_unix_ns),
        "tensors": c.tensors,
        "blobs": c.blobs,
        "bytes": c.bytes,
        "metadata": metadata_json(&c.metadata),
        "pinned": c.pinned,
    })
}

/// Writes `text` to stdout; a closed pipe (`ckptstore ls | head`) is not an error. Control
/// characters other than newlines (from tensor, blob and metadata names a store may hold) are
/// escaped (see [`escape_controls`]), so a crafted name cannot drive the terminal.
pub fn emit(text: &str) -> CliResult {
    emit_raw(&escape_controls(text))
}

/// `text` with every control character but `\n` written as `\u{XX}`: the C0 controls (ESC,
/// CR, BEL, TAB, ...), DEL and the C1 controls (U+0080..U+009F, which some terminals take as
/// CSI and friends). Everything else, other Unicode included, is left as it is.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(|c| c != '\n' && c.is_control()) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if c != '\n' && c.is_control() {
            out += &format!("\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

fn emit_raw(text: &str) -> CliResult {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => fail(format!("stdout: {e}")),
        _ => Ok(()),
    }
}

/// Pretty-prints a JSON value on stdout.
pub fn emit_json(v: &Value) -> CliResult {
    // serde_json escapes the C0 controls; DEL and the C1 controls it leaves raw, so they get
    // JSON's own escape (they only occur inside strings: JSON's syntax is ASCII).
    let raw = serde_json::to_string_pretty(v)?;
    let mut s = String::with_capacity(raw.len() + 1);
    for c in raw.chars() {
        if ('\u{7f}'..='\u{9f}').contains(&c) {
            s += &format!("\\u{:04x}", c as u32);
        } else {
            s.push(c);
        }
    }
    s.push('\n');
    emit_raw(&s)
}

/// Kills (SIGKILL) and reaps a child process if the parent leaves early.
pub struct Reaper(pub Option<std::process::Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Prints a line on stderr without tearing the progress bar.
pub fn say(bar: &indicatif::ProgressBar, msg: impl AsRef<str>) {
    bar.suspend(|| eprintln!("{}", msg.as_ref()));
}

/// Left-aligned columns (right-aligned where `right[i]`), two spaces apart.
pub fn table(header: &[&str], right: &[bool], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let n = cells.len();
        let mut s = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            let pad = widths[i].saturating_sub(c.chars().count());
            if i > 0 {
                s.push_str("  ");
            }
            if right.get(i).copied().unwrap_or(false) {
                s.extend(std::iter::repeat_n(' ', pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                if i + 1 < n {
                    s.extend(std::iter::repeat_n(' ', pad));
                }
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_time_known_instants() {
        assert_eq!(iso_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            iso_time(1_709_251_199_123_000_000),
            "2024-02-29T23:59:59.123Z"
        );
        assert_eq!(iso_time(-1_000_000_000), "1969-12-31T23:59:59.000Z");
    }

    #[test]
    fn human_bytes_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(256 << 20), "256 MiB");
    }
}
