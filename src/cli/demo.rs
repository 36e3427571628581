//! `ckptstore demo`: the store's main job, end to end. A synthetic training run saves a
//! checkpoint every K steps from a child writer process; the demo SIGKILLs that writer in the
//! middle of a save, reopens the store (recovery), checks the newest checkpoint is at least
//! the last acknowledged one and bit-exact, resumes training from it, and summarizes.
//!
//! The training state is a pure function of (seed, tensor name, step), so the state of any
//! step can be regenerated to check a checkpoint byte for byte.

use super::synth::{self, splitmix, Role, Spec};
use super::{fail, human_bytes, human_duration, say, CliResult, Reaper};
use ckptstore::{CommitInfo, DType, MetaValue, Options, Selector, Store};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Arguments of `ckptstore demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Store directory; must be absent or empty. Default: a fresh directory under the
    /// system temp dir.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Training steps.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub steps: u64,
    /// Save a checkpoint every K steps.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub save_every: u64,
    /// Size of the synthetic training state in MiB: a quarter is a frozen f32 embedding
    /// (deduplicated after the first save), the rest bf16 layers and f32 Adam moments that
    /// change every step.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub state_mib: u64,
    /// Keep the store directory at the end (it is always kept when the demo fails).
    #[arg(long)]
    pub keep: bool,
    /// Commits the writer gets acknowledged before it is killed during its next save.
    #[arg(long, default_value_t = 2)]
    pub kill_after: u64,
    /// Milliseconds from the writer announcing that save to the SIGKILL. Default: 40% of
    /// the writer's average save time so far, so the kill lands mid-save.
    #[arg(long)]
    pub kill_delay_ms: Option<u64>,
    /// Seed of the synthetic training state.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// Arguments of the hidden child writer (`ckptstore __demo-writer`).
#[derive(Debug, clap::Args)]
pub struct WriterArgs {
    /// Store directory.
    #[arg(long)]
    pub dir: PathBuf,
    /// Training steps.
    #[arg(long)]
    pub steps: u64,
    /// Save every K steps.
    #[arg(long)]
    pub save_every: u64,
    /// State size in MiB.
    #[arg(long)]
    pub state_mib: u64,
    /// Seed.
    #[arg(long)]
    pub seed: u64,
}

// ---------------------------------------------------------------------------------------
// The synthetic model: deterministic in (seed, tensor name, step).

const LAYERS: usize = 4;
const STEPS_PER_EPOCH: u64 = 10;
const BATCH: i64 = 32;
const OPTIMIZER_JSON: &[u8] =
    br#"{"type":"adamw","betas":[0.9,0.999],"eps":1e-8,"weight_decay":0.01}"#;

struct Model {
    seed: u64,
    steps: u64,
    specs: Vec<Spec>,
    /// Frozen tensors are generated once.
    frozen: BTreeMap<String, Arc<Vec<u8>>>,
}

impl Model {
    fn new(seed: u64, state_mib: u64, steps: u64) -> Model {
        let total = state_mib as f64 * (1u64 << 20) as f64;
        // Trainable: LAYERS × (bf16 d×d weight + f32 moments 2 × 4 d²) ≈ 10 L d² = ¾ total;
        // frozen embedding ≈ ¼ total.
        let d = (((0.75 * total / (10.0 * LAYERS as f64)).sqrt() as u64) / 64 * 64).max(64);
        let vocab = ((total / 4.0) as u64 / (4 * d)).max(64);
        let mut params = Vec::new();
        for i in 0..LAYERS {
            params.push((format!("layers.{i}.weight"), DType::BF16, vec![d, d]));
            params.push((format!("layers.{i}.bias"), DType::F32, vec![d]));
            params.push((format!("layers.{i}.norm.weight"), DType::F32, vec![d]));
        }
        let mut specs: Vec<Spec> = params
            .iter()
            .map(|(n, t, s)| Spec {
                name: n.clone(),
                dtype: *t,
                shape: s.clone(),
                role: Role::Param,
            })
            .collect();
        for (role, prefix) in [(Role::ExpAvg, "exp_avg"), (Role::ExpAvgSq, "exp_avg_sq")] {
            for (n, _, s) in &params {
                specs.push(Spec {
                    name: format!("optim.{prefix}.{n}"),
                    dtype: DType::F32,
                    shape: s.clone(),
                    role,
                });
            }
        }
        specs.push(Spec {
            name: "optim.step".into(),
            dtype: DType::I64,
            shape: vec![],
            role: Role::Counter,
        });
        // Last, so that a kill shortly after a save starts lands in segment writes.
        specs.push(Spec {
            name: "embed.weight".into(),
            dtype: DType::F32,
            shape: vec![vocab, d],
            role: Role::Frozen,
        });
        let mut m = Model {
            seed,
            steps,
            specs,
            frozen: BTreeMap::new(),
        };
        let frozen: Vec<(String, Arc<Vec<u8>>)> = m
            .specs
            .iter()
            .filter(|s| s.role == Role::Frozen)
            .map(|s| (s.name.clone(), Arc::new(m.generate(s, 0))))
            .collect();
        m.frozen.extend(frozen);
        m
    }

    fn state_bytes(&self) -> u64 {
        self.specs.iter().map(|s| s.nbytes() as u64).sum()
    }

    fn frozen_bytes(&self) -> u64 {
        self.frozen.values().map(|v| v.len() as u64).sum()
    }

    /// The bytes of tensor `s` at `step` (a frozen tensor ignores the step).
    fn generate(&self, s: &Spec, step: u64) -> Vec<u8> {
        synth::generate(self.seed, s, step)
    }

    /// Every tensor at `step`, in spec order.
    fn state(&self, step: u64) -> Vec<Arc<Vec<u8>>> {
        self.specs
            .iter()
            .map(|s| match self.frozen.get(&s.name) {
                Some(v) => v.clone(),
                None => Arc::new(self.generate(s, step)),
            })
            .collect()
    }

    fn epoch(step: u64) -> u64 {
        step / STEPS_PER_EPOCH
    }

    /// Metadata saved with the checkpoint of `step`: lr schedule, RNG state, data loader.
    fn metadata(&self, step: u64) -> BTreeMap<String, MetaValue> {
        let lr =
            3e-4 * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / self.steps as f64).cos());
        let mut sm = self.seed ^ step.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let rng: Vec<u8> = (0..4)
            .flat_map(|_| splitmix(&mut sm).to_le_bytes())
            .collect();
        BTreeMap::from([
            ("lr".to_string(), MetaValue::Float(lr)),
            ("rng_state".to_string(), MetaValue::Bytes(rng)),
            (
                "data_loader.position".to_string(),
                MetaValue::Int((step % STEPS_PER_EPOCH) as i64 * BATCH),
            ),
            (
                "run".to_string(),
                MetaValue::Str(format!("ckptstore-demo seed={}", self.seed)),
            ),
        ])
    }

    fn blobs(&self) -> Vec<(&'static str, &'static [u8])> {
        vec![("optimizer.json", OPTIMIZER_JSON)]
    }

    /// Saves the state of `step` (already generated as `data`) as one checkpoint.
    fn save(
        &self,
        store: &mut Store,
        step: u64,
        data: &[Arc<Vec<u8>>],
    ) -> ckptstore::Result<CommitInfo> {
        let mut t = store.begin(step)?;
        t.set_epoch(Self::epoch(step));
        for (k, v) in self.metadata(step) {
            t.set_metadata(k, v);
        }
        for (s, d) in self.specs.iter().zip(data) {
            t.put_tensor(&s.name, s.dtype, &s.shape, d)?;
        }
        for (name, b) in self.blobs() {
            t.put_blob(name, b)?;
        }
        t.commit()
    }

    /// Checks checkpoint `id` byte for byte against the regenerated state of its step.
    /// Returns the number of tensors, blobs and metadata keys compared.
    fn check_exact(&self, store: &Store, id: u64) -> CliResult<(usize, usize, usize)> {
        let ck = store.checkpoint(Selector::Id(id))?;
        let info = ck.info();
        let step = info.step;
        let here = format!("checkpoint {id} (step {step})");
        let names: Vec<&str> = self.specs.iter().map(|s| s.name.as_str()).collect();
        if ck.tensor_names() != names {
            return fail(format!(
                "{here}: tensor names {:?} differ from the model's",
                ck.tensor_names()
            ));
        }
        for s in &self.specs {
            let t = ck.tensor(&s.name)?;
            if t.dtype != s.dtype || t.shape != s.shape {
                return fail(format!(
                    "{here}: tensor {} is {} {:?}, expected {} {:?}",
                    s.name, t.dtype, t.shape, s.dtype, s.shape
                ));
            }
            let want = match self.frozen.get(&s.name) {
                Some(v) => v.clone(),
                None => Arc::new(self.generate(s, step)),
            };
            if t.data != *want {
                let at = t.data.iter().zip(want.iter()).position(|(a, b)| a != b);
                return fail(format!(
                    "{here}: tensor {} differs from the state of step {step} (first at byte {})",
                    s.name,
                    at.map_or_else(|| "length".into(), |a| a.to_string())
                ));
            }
        }
        let blobs = self.blobs();
        for (name, want) in &blobs {
            if ck.blob(name)? != *want {
                return fail(format!("{here}: blob {name} differs"));
            }
        }
        let meta = self.metadata(step);
        if info.metadata != meta {
            return fail(format!(
                "{here}: metadata {:?} differs from the state of step {step}",
                info.metadata.keys().collect::<Vec<_>>()
            ));
        }
        if info.epoch != Self::epoch(step) {
            return fail(format!(
                "{here}: epoch {} but step {step} is in epoch {}",
                info.epoch,
                Self::epoch(step)
            ));
        }
        Ok((self.specs.len(), blobs.len(), meta.len()))
    }
}

// ---------------------------------------------------------------------------------------
// The child writer.

/// `ckptstore __demo-writer`: trains from step 1 and saves every K steps, printing
/// `saving step S` before each save and `committed step S id I ...` after each commit.
pub fn run_writer(a: WriterArgs) -> CliResult {
    let model = Model::new(a.seed, a.state_mib, a.steps);
    let mut store = Store::open(&a.dir, Options::default())?;
    let mut out = std::io::stdout().lock();
    for step in (a.save_every..=a.steps).step_by(a.save_every as usize) {
        // Generate first, so the announced save is all store work.
        let data = model.state(step);
        writeln!(out, "saving step {step}")?;
        out.flush()?;
        let c = model.save(&mut store, step, &data)?;
        writeln!(
            out,
            "committed step {step} id {} logical {} written {} dedup {} ns {}",
            c.checkpoint.id,
            c.checkpoint.bytes,
            c.bytes_written,
            c.bytes_deduplicated,
            c.duration.as_nanos()
        )?;
        out.flush()?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The parent.

/// One acknowledged commit.
#[derive(Debug, Clone)]
struct Commit {
    step: u64,
    id: u64,
    logical: u64,
    written: u64,
    dedup: u64,
    duration: Duration,
}

impl Commit {
    fn of(c: &CommitInfo) -> Commit {
        Commit {
            step: c.checkpoint.step,
            id: c.checkpoint.id,
            logical: c.checkpoint.bytes,
            written: c.bytes_written,
            dedup: c.bytes_deduplicated,
            duration: c.duration,
        }
    }

    /// Parses `committed step S id I logical L written W dedup D ns T`.
    fn parse(line: &str) -> Option<Commit> {
        let w: Vec<&str> = line.split_whitespace().collect();
        let field = |key: &str| -> Option<u64> {
            let i = w.iter().position(|x| *x == key)?;
            w.get(i + 1)?.parse().ok()
        };
        Some(Commit {
            step: field("step")?,
            id: field("id")?,
            logical: field("logical")?,
            written: field("written")?,
            dedup: field("dedup")?,
            duration: Duration::from_nanos(field("ns")?),
        })
    }
}

fn prepare_dir(dir: Option<PathBuf>) -> CliResult<PathBuf> {
    let dir = match dir {
        Some(d) => d,
        None => {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            std::env::temp_dir().join(format!("ckptstore-demo-{}-{nanos}", std::process::id()))
        }
    };
    match std::fs::read_dir(&dir) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                return fail(format!(
                    "demo directory {} is not empty; pass an empty or new one with --dir",
                    dir.display()
                ));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&dir)
                .map_err(|e| super::Failure(format!("create {}: {e}", dir.display())))?;
        }
        Err(e) => return fail(format!("{}: {e}", dir.display())),
    }
    Ok(dir)
}

/// `3,6,9` or, for many, `3,6,9,…,291,294,297,300`.
fn steps_text(steps: &[u64]) -> String {
    let join = |s: &[u64]| s.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    if steps.len() <= 12 {
        join(steps)
    } else {
        format!(
            "{},…,{}",
            join(&steps[..3]),
            join(&steps[steps.len() - 4..])
        )
    }
}

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9)
}

/// Runs the demo; see the module docs.
pub fn run(a: Args) -> CliResult {
    let saves = a.steps / a.save_every;
    if saves <= a.kill_after {
        return fail(format!(
            "--steps {} with --save-every {} makes {saves} saves; the kill needs at least {} \
             (--kill-after {} commits, then one to interrupt)",
            a.steps,
            a.save_every,
            a.kill_after + 1,
            a.kill_after
        ));
    }
    let dir = prepare_dir(a.dir.clone())?;
    match demo(&a, &dir) {
        Ok(()) => {
            if !a.keep {
                let _ = std::fs::remove_dir_all(&dir);
            }
            Ok(())
        }
        Err(super::Failure(why)) => fail(format!("{why} (store kept at {})", dir.display())),
    }
}

fn demo(a: &Args, dir: &Path) -> CliResult {
    let started = Instant::now();
    let model = Model::new(a.seed, a.state_mib, a.steps);
    let bar = ProgressBar::new(a.steps);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>9} [{bar:30}] step {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    say(
        &bar,
        format!(
            "demo: {} of training state ({} tensors, {} frozen), {} steps, a checkpoint every {}",
            human_bytes(model.state_bytes()),
            model.specs.len(),
            human_bytes(model.frozen_bytes()),
            a.steps,
            a.save_every
        ),
    );
    say(&bar, format!("demo: store {}", dir.display()));

    // 1. Train in a child writer process; SIGKILL it in the middle of a save.
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .arg("__demo-writer")
        .arg("--dir")
        .arg(dir)
        .args(["--steps", &a.steps.to_string()])
        .args(["--save-every", &a.save_every.to_string()])
        .args(["--state-mib", &a.state_mib.to_string()])
        .args(["--seed", &a.seed.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| super::Failure(format!("spawn the demo writer: {e}")))?;
    let pid = child.id();
    let stdout = child.stdout.take().expect("piped");
    let mut reaper = Reaper(Some(child));
    bar.set_prefix("writer");
    say(&bar, format!("demo: writer process {pid} started"));

    // Lines the writer printed: `saving step S` (a save begins) and `committed ...` (its
    // commit() returned: acknowledged). `in_flight` is the save begun and not acknowledged.
    let mut acked: Vec<Commit> = Vec::new();
    let mut in_flight: Option<u64> = None;
    let mut on_line = |line: &str, acked: &mut Vec<Commit>, late: bool| -> CliResult {
        if let Some(rest) = line.strip_prefix("saving step ") {
            let step = rest
                .trim()
                .parse()
                .map_err(|_| super::Failure(format!("bad writer line {line:?}")))?;
            in_flight = Some(step);
            bar.set_message(format!("saving step {step}"));
        } else if line.starts_with("committed ") {
            let c = Commit::parse(line)
                .ok_or_else(|| super::Failure(format!("bad writer line {line:?}")))?;
            in_flight = None;
            bar.set_position(c.step);
            bar.set_message(format!("committed step {} (checkpoint {})", c.step, c.id));
            let late = if late { " (read after the kill)" } else { "" };
            say(
                &bar,
                format!(
                    "demo: writer committed step {} as checkpoint {} in {} ({} written, {} deduplicated){late}",
                    c.step,
                    c.id,
                    human_duration(c.duration),
                    human_bytes(c.written),
                    human_bytes(c.dedup)
                ),
            );
            acked.push(c);
        } else {
            return fail(format!("unexpected line from the demo writer: {line:?}"));
        }
        Ok(())
    };
    let mut lines = BufReader::new(stdout).lines();
    let mut killed: Option<(u64, Duration)> = None;
    for line in lines.by_ref() {
        let line = line?;
        on_line(&line, &mut acked, false)?;
        let Some(step) = line.strip_prefix("saving step ") else {
            continue;
        };
        if (acked.len() as u64) < a.kill_after {
            continue;
        }
        let announced = Instant::now();
        let delay = match a.kill_delay_ms {
            Some(ms) => Duration::from_millis(ms),
            None if acked.is_empty() => Duration::from_millis(5),
            None => {
                let mean = acked.iter().map(|c| c.duration).sum::<Duration>() / acked.len() as u32;
                (mean * 2 / 5).max(Duration::from_millis(1))
            }
        };
        std::thread::sleep(delay);
        let child = reaper.0.as_mut().expect("running");
        let at = announced.elapsed();
        child.kill()?; // SIGKILL
        let status = child.wait()?;
        reaper.0 = None;
        use std::os::unix::process::ExitStatusExt;
        if status.signal() != Some(9) {
            return fail(format!(
                "the writer exited ({status}) before the SIGKILL landed; use more --steps or a smaller --kill-delay-ms"
            ));
        }
        say(
            &bar,
            format!(
                "demo: SIGKILL sent to writer {pid} {} after it announced the save of step {}",
                human_duration(at),
                step.trim()
            ),
        );
        killed = Some((step.trim().parse().unwrap_or(0), at));
        break;
    }
    let Some((announced_step, killed_after)) = killed else {
        let status = reaper.0.take().map(|mut c| c.wait()).transpose()?;
        return fail(format!(
            "the demo writer ended ({}) before the kill point",
            status.map_or_else(|| "unknown status".into(), |s| s.to_string())
        ));
    };
    // The writer is dead; what it printed before dying still counts (a commit that returned
    // is acknowledged even if we read its line only now).
    for line in lines {
        on_line(&line?, &mut acked, true)?;
    }
    let killed_step = in_flight;
    match killed_step {
        Some(s) if s != announced_step => say(
            &bar,
            format!("demo: the writer had moved on: it died saving step {s}"),
        ),
        Some(_) => {}
        None => say(&bar, "demo: the writer died between saves"),
    }

    // 2. Reopen: recovery.
    bar.set_prefix("recovery");
    bar.set_message("reopening the store");
    let t = Instant::now();
    let mut store = Store::open(dir, Options::default())?;
    let open_time = t.elapsed();
    let r = store.recovery_report().clone();
    say(
        &bar,
        format!(
            "demo: recovery took {} (open {}): {} WAL records replayed, {} torn tail bytes cut, \
             {} orphan segment(s) removed ({}), {} stale file(s), {} checkpoint(s)",
            human_duration(r.duration),
            human_duration(open_time),
            r.records_replayed,
            r.truncated_tail_bytes,
            r.orphan_segments.len(),
            human_bytes(r.orphan_bytes),
            r.stale_files.len(),
            r.checkpoints
        ),
    );
    if !r.damaged_segments.is_empty() {
        return fail(format!(
            "VIOLATION: recovery found damaged segments {:?}",
            r.damaged_segments
        ));
    }
    // Every acknowledged commit must have survived, unchanged.
    for c in &acked {
        match store.info(Selector::Id(c.id)) {
            Ok(i) if i.step == c.step => {}
            Ok(i) => {
                return fail(format!(
                    "VIOLATION: acknowledged checkpoint {} was step {}, now step {}",
                    c.id, c.step, i.step
                ))
            }
            Err(e) => {
                return fail(format!(
                    "VIOLATION: acknowledged checkpoint {} (step {}) is gone after recovery: {e}",
                    c.id, c.step
                ))
            }
        }
    }
    let latest = store.latest();
    let last_acked = acked.last().cloned();
    let resume_from = match (&latest, &last_acked) {
        (None, None) => None,
        (None, Some(c)) => {
            return fail(format!(
                "VIOLATION: the store is empty after recovery, but step {} was acknowledged as checkpoint {}",
                c.step, c.id
            ))
        }
        (Some(l), Some(c)) if l.id < c.id || l.step < c.step => {
            return fail(format!(
                "VIOLATION: latest checkpoint after recovery is {} (step {}), older than the last acknowledged {} (step {})",
                l.id, l.step, c.id, c.step
            ))
        }
        (Some(l), c) => {
            let acked_step = c.as_ref().map_or(0, |c| c.step);
            if l.step != acked_step && Some(l.step) != killed_step {
                return fail(format!(
                    "VIOLATION: latest checkpoint {} is step {}, which was neither acknowledged nor being saved",
                    l.id, l.step
                ));
            }
            Some(l.clone())
        }
    };
    let (resume_step, exact) = match &resume_from {
        Some(l) => {
            let counts = model.check_exact(&store, l.id)?;
            let how = match killed_step {
                Some(s) if s == l.step => {
                    "the interrupted save had become durable before the kill (committed, not yet acknowledged)"
                }
                Some(_) => "the interrupted save was rolled back",
                None => "no save was in flight",
            };
            say(
                &bar,
                format!(
                    "demo: latest checkpoint {} (step {}) is bit-exact ({} tensors, {} blob, {} metadata keys); {how}",
                    l.id, l.step, counts.0, counts.1, counts.2
                ),
            );
            (l.step, Some(counts))
        }
        None => {
            say(
                &bar,
                "demo: no checkpoint was committed before the kill; training restarts from step 0",
            );
            (0, None)
        }
    };

    // 3. Resume training in-process from the recovered step.
    bar.set_prefix("resumed");
    bar.set_message("");
    bar.set_position(resume_step);
    let mut resumed: Vec<Commit> = Vec::new();
    let first_save = (resume_step / a.save_every + 1) * a.save_every;
    for step in (first_save..=a.steps).step_by(a.save_every as usize) {
        bar.set_message(format!("saving step {step}"));
        let data = model.state(step);
        let c = Commit::of(&model.save(&mut store, step, &data)?);
        bar.set_position(step);
        say(
            &bar,
            format!(
                "demo: resumed training committed step {} as checkpoint {} in {} ({} written, {} deduplicated)",
                c.step,
                c.id,
                human_duration(c.duration),
                human_bytes(c.written),
                human_bytes(c.dedup)
            ),
        );
        resumed.push(c);
    }
    bar.set_position(a.steps);
    bar.set_prefix("verify");
    bar.set_message("all checkpoints");
    for (id, res) in store.verify_all() {
        if let Err(e) = res {
            return fail(format!("VIOLATION: checkpoint {id} does not verify: {e}"));
        }
    }
    let list = store.list();
    let last = list.last().expect("at least one checkpoint");
    let last_step = a.steps / a.save_every * a.save_every;
    if last.step != last_step {
        return fail(format!(
            "VIOLATION: the newest checkpoint is step {}, expected {last_step}",
            last.step
        ));
    }
    model.check_exact(&store, last.id)?;
    // The frozen embedding must be deduplicated by every commit that has an older one.
    let commits: Vec<&Commit> = acked.iter().chain(&resumed).collect();
    let frozen = model.frozen_bytes();
    for c in &commits {
        let has_older = list.iter().any(|l| l.id < c.id);
        if has_older && c.dedup < frozen {
            return fail(format!(
                "VIOLATION: checkpoint {} deduplicated only {} bytes; the frozen tensors alone are {frozen}",
                c.id, c.dedup
            ));
        }
    }
    bar.finish_and_clear();

    let logical: u64 = commits.iter().map(|c| c.logical).sum();
    let written: u64 = commits.iter().map(|c| c.written).sum();
    let dedup: u64 = commits.iter().map(|c| c.dedup).sum();
    let save_time: Duration = commits.iter().map(|c| c.duration).sum();
    let stats = store.stats();
    let mut out = String::new();
    let mut line = |k: &str, v: String| out += &format!("  {k:<20}{v}\n");
    line(
        "state",
        format!(
            "{} per checkpoint ({} tensors; {} frozen embedding)",
            human_bytes(model.state_bytes()),
            model.specs.len(),
            human_bytes(frozen)
        ),
    );
    line(
        "killed",
        match killed_step {
            Some(step) if step == announced_step => format!(
                "writer pid {pid} by SIGKILL at step {step}, {} into its save",
                human_duration(killed_after)
            ),
            Some(step) => format!(
                "writer pid {pid} by SIGKILL at step {step}, mid-save ({} after the save of step {announced_step} began)",
                human_duration(killed_after)
            ),
            None => format!(
                "writer pid {pid} by SIGKILL between saves ({} after the save of step {announced_step} began)",
                human_duration(killed_after)
            ),
        },
    );
    line(
        "last acknowledged",
        last_acked.as_ref().map_or_else(
            || "none".into(),
            |c| format!("step {} (checkpoint {})", c.step, c.id),
        ),
    );
    line(
        "recovery",
        format!(
            "{} ({} WAL records; cut {} torn bytes; removed {} orphan segment(s), {})",
            human_duration(r.duration),
            r.records_replayed,
            r.truncated_tail_bytes,
            r.orphan_segments.len(),
            human_bytes(r.orphan_bytes)
        ),
    );
    line(
        "resumed from",
        match (&resume_from, exact) {
            (Some(l), Some((t, b, m))) => format!(
                "step {} (checkpoint {}), bit-exact: {t} tensors, {b} blob, {m} metadata keys",
                l.step, l.id
            ),
            _ => "step 0 (nothing committed before the kill)".into(),
        },
    );
    line(
        "checkpoints",
        format!(
            "{} live, steps {}; all verify",
            list.len(),
            steps_text(&list.iter().map(|c| c.step).collect::<Vec<_>>())
        ),
    );
    line(
        "saves",
        format!(
            "{} acknowledged ({} before the kill, {} after): {} logical",
            commits.len(),
            acked.len(),
            resumed.len(),
            human_bytes(logical)
        ),
    );
    line(
        "bytes",
        format!(
            "{} written, {} deduplicated ({:.0}%); {} on disk",
            human_bytes(written),
            human_bytes(dedup),
            100.0 * dedup as f64 / logical.max(1) as f64,
            human_bytes(stats.segment_bytes)
        ),
    );
    line(
        "save throughput",
        format!(
            "{:.0} MB/s of state ({:.0} MB/s written), {} per save on average",
            mb_per_s(logical, save_time),
            mb_per_s(written, save_time),
            human_duration(save_time / commits.len().max(1) as u32)
        ),
    );
    line("total time", human_duration(started.elapsed()));
    super::emit(&format!("ckptstore demo: ok\n{out}"))?;
    if !a.keep {
        eprintln!("demo: removing {} (pass --keep to keep it)", dir.display());
    }
    Ok(())
}
