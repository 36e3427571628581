//! Retention policies (MindSpore's `CheckpointConfig`, Orbax's and Lightning's keep rules) as
//! one transactional mechanism: a policy says which checkpoints to keep, everything else is
//! deleted through the store's ordinary, durable delete path.
//!
//! Rules combine as the **union** of what each keeps. Whatever the rules say, the newest
//! checkpoint is always kept (so every deletion comes after a newer durable commit), and so
//! is every pinned one ([`crate::Store::pin`], or [`RetentionPolicy::pin`] for this call).
//! A policy with no keep rule is refused rather than read as "delete everything else".
//!
//! [`plan`] is pure: it sees only the checkpoint list, so a plan is the same whenever it is
//! made (windows of wall time are aligned to the Unix epoch, not to "now").

use crate::error::{Error, Result};
use crate::manifest::CheckpointInfo;
use crate::manifest::MetaValue;
use std::collections::{BTreeMap, BTreeSet};

/// Direction of a "best" metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricMode {
    /// Lower is better (a loss).
    Min,
    /// Higher is better (an accuracy).
    Max,
}

impl MetricMode {
    /// `min` or `max`.
    pub fn name(self) -> &'static str {
        match self {
            MetricMode::Min => "min",
            MetricMode::Max => "max",
        }
    }
}

/// The keep-best rule: the `k` checkpoints with the best value of a metadata metric.
#[derive(Debug, Clone, PartialEq)]
pub struct KeepBest {
    /// How many to keep (at least 1).
    pub k: usize,
    /// Metadata key of the metric. Only checkpoints whose value under it is a number
    /// (`MetaValue::Int` or `MetaValue::Float`, not NaN) are candidates; others are never
    /// "best" (another rule may still keep them).
    pub metric: String,
    /// Whether lower or higher is better. Ties go to the newer checkpoint.
    pub mode: MetricMode,
}

/// Which checkpoints to keep. Every rule is off by default; at least one must be set.
/// The rules combine as the union of what each keeps; the newest checkpoint and every
/// pinned one are always kept on top of that.
///
/// ```
/// use ckptstore_engine::retention::{MetricMode, RetentionPolicy};
/// let p = RetentionPolicy::new()
///     .keep_last(3)
///     .keep_every_steps(1000)
///     .keep_best(2, "val_loss", MetricMode::Min);
/// assert_eq!(p.keep_last, Some(3));
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RetentionPolicy {
    /// Keep the N newest checkpoints (by commit order). Default `None` (off); N ≥ 1.
    pub keep_last: Option<usize>,
    /// Keep one checkpoint per M minutes of wall time (MindSpore's
    /// `keep_checkpoint_per_n_minutes`): wall time is cut into M-minute windows aligned to the
    /// Unix epoch, and the newest checkpoint (by commit order) of each window is kept.
    /// Default `None` (off); M ≥ 1.
    pub keep_one_per_minutes: Option<u64>,
    /// Keep every checkpoint whose training step is a multiple of S. Default `None` (off);
    /// S ≥ 1.
    pub keep_every_steps: Option<u64>,
    /// Keep the best K by a metadata metric. Default `None` (off).
    pub keep_best: Option<KeepBest>,
    /// Checkpoint ids this call must keep in addition to the store's durable pins (say, the
    /// one the current run resumed from). Ids that are not live are ignored. Default empty.
    pub pins: BTreeSet<u64>,
}

impl RetentionPolicy {
    /// A policy with every rule off (set at least one before using it).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`RetentionPolicy::keep_last`].
    pub fn keep_last(mut self, n: usize) -> Self {
        self.keep_last = Some(n);
        self
    }

    /// Sets [`RetentionPolicy::keep_one_per_minutes`].
    pub fn keep_one_per_minutes(mut self, minutes: u64) -> Self {
        self.keep_one_per_minutes = Some(minutes);
        self
    }

    /// Sets [`RetentionPolicy::keep_every_steps`].
    pub fn keep_every_steps(mut self, steps: u64) -> Self {
        self.keep_every_steps = Some(steps);
        self
    }

    /// Sets [`RetentionPolicy::keep_best`].
    pub fn keep_best(mut self, k: usize, metric: impl Into<String>, mode: MetricMode) -> Self {
        self.keep_best = Some(KeepBest {
            k,
            metric: metric.into(),
            mode,
        });
        self
    }

    /// Adds an id to [`RetentionPolicy::pins`].
    pub fn pin(mut self, id: u64) -> Self {
        self.pins.insert(id);
        self
    }

    /// Whether no keep rule is set (pins alone do not count).
    pub fn has_no_rule(&self) -> bool {
        self.keep_last.is_none()
            && self.keep_one_per_minutes.is_none()
            && self.keep_every_steps.is_none()
            && self.keep_best.is_none()
    }

    /// Checks the policy: at least one rule, every count and period at least 1, a metric name.
    pub fn validate(&self) -> Result<()> {
        if self.has_no_rule() {
            return Err(Error::invalid(
                "retention policy has no keep rule (set keep_last, keep_one_per_minutes, \
                 keep_every_steps or keep_best); refusing to delete everything but the newest",
            ));
        }
        if self.keep_last == Some(0) {
            return Err(Error::invalid("keep_last must be at least 1"));
        }
        if let Some(m) = self.keep_one_per_minutes {
            if m == 0 || window_ns(m).is_none() {
                return Err(Error::invalid(format!(
                    "keep_one_per_minutes {m} outside 1..={}",
                    i64::MAX / 60_000_000_000
                )));
            }
        }
        if self.keep_every_steps == Some(0) {
            return Err(Error::invalid("keep_every_steps must be at least 1"));
        }
        if let Some(b) = &self.keep_best {
            if b.k == 0 {
                return Err(Error::invalid("keep_best needs k of at least 1"));
            }
            if b.metric.is_empty() {
                return Err(Error::invalid("keep_best needs a metric name"));
            }
        }
        Ok(())
    }
}

fn window_ns(minutes: u64) -> Option<i64> {
    i64::try_from(minutes).ok()?.checked_mul(60_000_000_000)
}

/// Why a checkpoint is kept.
#[derive(Debug, Clone, PartialEq)]
pub enum KeepReason {
    /// It is the newest checkpoint (always kept).
    Newest,
    /// It is pinned in the store (always kept until unpinned).
    Pinned,
    /// The policy's own [`RetentionPolicy::pins`] name it.
    PolicyPin,
    /// One of the `n` newest; `rank` 1 is the newest.
    KeepLast {
        /// The rule's N.
        n: usize,
        /// Its place, 1 = newest.
        rank: usize,
    },
    /// The newest of its wall-time window.
    OnePerMinutes {
        /// The rule's M.
        minutes: u64,
        /// Start of the window, nanoseconds since the Unix epoch.
        window_start_unix_ns: i64,
    },
    /// Its step is a multiple of `every`.
    EverySteps {
        /// The rule's S.
        every: u64,
    },
    /// Among the best `k` by `metric`.
    Best {
        /// The rule's K.
        k: usize,
        /// The metric.
        metric: String,
        /// min or max.
        mode: MetricMode,
        /// Its place, 1 = best.
        rank: usize,
        /// Its value.
        value: f64,
    },
}

impl KeepReason {
    /// A short stable name: `newest`, `pinned`, `policy-pin`, `keep-last`, `keep-per-minutes`,
    /// `keep-every-steps`, `keep-best` (as the CLI's `--json` prints it).
    pub fn kind(&self) -> &'static str {
        match self {
            KeepReason::Newest => "newest",
            KeepReason::Pinned => "pinned",
            KeepReason::PolicyPin => "policy-pin",
            KeepReason::KeepLast { .. } => "keep-last",
            KeepReason::OnePerMinutes { .. } => "keep-per-minutes",
            KeepReason::EverySteps { .. } => "keep-every-steps",
            KeepReason::Best { .. } => "keep-best",
        }
    }
}

impl std::fmt::Display for KeepReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeepReason::Newest => write!(f, "newest"),
            KeepReason::Pinned => write!(f, "pinned"),
            KeepReason::PolicyPin => write!(f, "pinned by this policy"),
            KeepReason::KeepLast { n, rank } => write!(f, "last {n} (#{rank})"),
            KeepReason::OnePerMinutes { minutes, .. } => {
                write!(f, "newest in its {minutes}-minute window")
            }
            KeepReason::EverySteps { every } => write!(f, "step multiple of {every}"),
            KeepReason::Best {
                k,
                metric,
                mode,
                rank,
                value,
            } => write!(
                f,
                "best {k} by {metric} ({}): #{rank}, {value}",
                mode.name()
            ),
        }
    }
}

/// A checkpoint that stays, and every reason it does.
#[derive(Debug, Clone, PartialEq)]
pub struct Kept {
    /// The checkpoint.
    pub info: CheckpointInfo,
    /// Why (at least one reason), in the order: newest, pinned, policy pin, keep-last,
    /// per-minutes, every-steps, best.
    pub reasons: Vec<KeepReason>,
}

/// What a policy keeps and deletes ([`crate::Store::plan_retention`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RetentionPlan {
    /// Checkpoints kept, oldest first, with their reasons.
    pub keep: Vec<Kept>,
    /// Checkpoints to delete, oldest first (the order they are deleted in).
    pub delete: Vec<CheckpointInfo>,
    /// Segment files the deletions free (no kept checkpoint references them).
    pub segments_freed: Vec<u64>,
    /// Their committed bytes.
    pub bytes_freed: u64,
}

/// A metadata value usable as a metric: a number, not NaN.
fn metric_value(v: Option<&MetaValue>) -> Option<f64> {
    match v? {
        MetaValue::Int(i) => Some(*i as f64),
        MetaValue::Float(f) if !f.is_nan() => Some(*f),
        _ => None,
    }
}

/// Plans `policy` over `checkpoints` (the live ones; their `pinned` flags are the store's
/// pins). Pure. The segment fields of the plan are left empty (the store fills them in).
pub fn plan(policy: &RetentionPolicy, checkpoints: &[CheckpointInfo]) -> Result<RetentionPlan> {
    policy.validate()?;
    let mut list: Vec<&CheckpointInfo> = checkpoints.iter().collect();
    list.sort_by_key(|c| c.id);
    let mut reasons: BTreeMap<u64, Vec<KeepReason>> = BTreeMap::new();
    let mut keep = |id: u64, r: KeepReason| reasons.entry(id).or_default().push(r);

    if let Some(newest) = list.last() {
        keep(newest.id, KeepReason::Newest);
    }
    for c in &list {
        if c.pinned {
            keep(c.id, KeepReason::Pinned);
        }
    }
    for c in &list {
        if policy.pins.contains(&c.id) {
            keep(c.id, KeepReason::PolicyPin);
        }
    }
    if let Some(n) = policy.keep_last {
        for (i, c) in list.iter().rev().take(n).enumerate() {
            keep(c.id, KeepReason::KeepLast { n, rank: i + 1 });
        }
    }
    if let Some(minutes) = policy.keep_one_per_minutes {
        let w = window_ns(minutes).ok_or_else(|| {
            Error::invalid(format!("keep_one_per_minutes {minutes} is too large"))
        })?;
        let mut newest_of: BTreeMap<i64, u64> = BTreeMap::new();
        for c in &list {
            // Ascending ids: the last one seen in a window is its newest.
            newest_of.insert(c.wall_time_unix_ns.div_euclid(w), c.id);
        }
        let by_id: BTreeMap<u64, i64> = newest_of.into_iter().map(|(k, id)| (id, k)).collect();
        for (id, window) in by_id {
            keep(
                id,
                KeepReason::OnePerMinutes {
                    minutes,
                    window_start_unix_ns: window * w,
                },
            );
        }
    }
    if let Some(every) = policy.keep_every_steps {
        for c in &list {
            if c.step.is_multiple_of(every) {
                keep(c.id, KeepReason::EverySteps { every });
            }
        }
    }
    if let Some(b) = &policy.keep_best {
        let mut candidates: Vec<(f64, u64)> = list
            .iter()
            .filter_map(|c| Some((metric_value(c.metadata.get(&b.metric))?, c.id)))
            .collect();
        candidates.sort_by(|x, y| {
            let by_value = match b.mode {
                MetricMode::Min => x.0.total_cmp(&y.0),
                MetricMode::Max => y.0.total_cmp(&x.0),
            };
            by_value.then(y.1.cmp(&x.1)) // ties: the newer first
        });
        for (i, (value, id)) in candidates.into_iter().take(b.k).enumerate() {
            keep(
                id,
                KeepReason::Best {
                    k: b.k,
                    metric: b.metric.clone(),
                    mode: b.mode,
                    rank: i + 1,
                    value,
                },
            );
        }
    }

    let mut out = RetentionPlan::default();
    for c in list {
        match reasons.remove(&c.id) {
            Some(reasons) => out.keep.push(Kept {
                info: c.clone(),
                reasons,
            }),
            None => out.delete.push(c.clone()),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000_000_000;

    /// Checkpoint `id` at `step`, committed `minute` minutes after the epoch (+ `id` ns, so
    /// times differ), with an optional `loss`.
    fn ck(id: u64, step: u64, minute: i64, loss: Option<MetaValue>) -> CheckpointInfo {
        CheckpointInfo {
            id,
            step,
            epoch: 0,
            wall_time_unix_ns: minute * MIN + id as i64,
            tensors: 0,
            blobs: 0,
            bytes: 0,
            metadata: loss.into_iter().map(|v| ("loss".to_string(), v)).collect(),
            pinned: false,
        }
    }

    /// Ten checkpoints, ids 1..=10, steps 100..=1000, one a minute.
    fn ten() -> Vec<CheckpointInfo> {
        (1..=10).map(|i| ck(i, i * 100, i as i64, None)).collect()
    }

    fn kept(p: &RetentionPolicy, list: &[CheckpointInfo]) -> Vec<u64> {
        plan(p, list)
            .unwrap()
            .keep
            .iter()
            .map(|k| k.info.id)
            .collect()
    }

    fn reasons(p: &RetentionPolicy, list: &[CheckpointInfo], id: u64) -> Vec<&'static str> {
        plan(p, list)
            .unwrap()
            .keep
            .iter()
            .find(|k| k.info.id == id)
            .map(|k| k.reasons.iter().map(KeepReason::kind).collect())
            .unwrap_or_default()
    }

    #[test]
    fn keep_last() {
        let p = RetentionPolicy::new().keep_last(3);
        assert_eq!(kept(&p, &ten()), vec![8, 9, 10]);
        let pl = plan(&p, &ten()).unwrap();
        assert_eq!(
            pl.delete.iter().map(|c| c.id).collect::<Vec<_>>(),
            (1..=7).collect::<Vec<_>>(),
            "oldest first"
        );
        assert_eq!(reasons(&p, &ten(), 10), vec!["newest", "keep-last"]);
        // More than there are: all kept.
        assert_eq!(
            kept(&RetentionPolicy::new().keep_last(50), &ten()).len(),
            10
        );
        // The input order does not matter.
        let mut rev = ten();
        rev.reverse();
        assert_eq!(kept(&p, &rev), vec![8, 9, 10]);
    }

    #[test]
    fn keep_every_steps() {
        let p = RetentionPolicy::new().keep_every_steps(300);
        // Steps 300, 600, 900, plus the newest (1000).
        assert_eq!(kept(&p, &ten()), vec![3, 6, 9, 10]);
        assert_eq!(reasons(&p, &ten(), 10), vec!["newest"]);
        // Step 0 is a multiple of everything.
        let list = vec![ck(1, 0, 0, None), ck(2, 7, 0, None), ck(3, 9, 0, None)];
        assert_eq!(
            kept(&RetentionPolicy::new().keep_every_steps(5), &list),
            [1, 3]
        );
    }

    #[test]
    fn keep_one_per_minutes() {
        // One a minute for 10 minutes: 5-minute windows [0,5) [5,10) [10,15).
        let p = RetentionPolicy::new().keep_one_per_minutes(5);
        assert_eq!(kept(&p, &ten()), vec![4, 9, 10]);
        let pl = plan(&p, &ten()).unwrap();
        let k4 = &pl.keep[0];
        assert_eq!(
            k4.reasons,
            vec![KeepReason::OnePerMinutes {
                minutes: 5,
                window_start_unix_ns: 0
            }]
        );
        // Many checkpoints in one window: only the newest of it (by commit order, even if
        // the clock went backwards).
        let list = vec![
            ck(1, 1, 0, None),
            ck(2, 2, 1, None),
            ck(3, 3, 0, None), // clock stepped back
            ck(4, 4, 61, None),
        ];
        assert_eq!(
            kept(&RetentionPolicy::new().keep_one_per_minutes(60), &list),
            vec![3, 4]
        );
        // Times before the epoch fall in their own (negative) windows.
        let list = vec![ck(1, 1, -1, None), ck(2, 2, 0, None), ck(3, 3, 0, None)];
        assert_eq!(
            kept(&RetentionPolicy::new().keep_one_per_minutes(1), &list),
            vec![1, 3]
        );
    }

    #[test]
    fn keep_best_min_and_max() {
        let vals = [5.0, 1.0, 3.0, 0.5, 9.0, 2.0];
        let list: Vec<_> = vals
            .iter()
            .enumerate()
            .map(|(i, v)| ck(i as u64 + 1, i as u64, 0, Some(MetaValue::Float(*v))))
            .collect();
        let min = RetentionPolicy::new().keep_best(2, "loss", MetricMode::Min);
        // Best by min: 0.5 (id 4), 1.0 (id 2); plus the newest (6).
        assert_eq!(kept(&min, &list), vec![2, 4, 6]);
        let pl = plan(&min, &list).unwrap();
        let k4 = pl.keep.iter().find(|k| k.info.id == 4).unwrap();
        assert!(matches!(
            k4.reasons[..],
            [KeepReason::Best { rank: 1, value, .. }] if value == 0.5
        ));
        let max = RetentionPolicy::new().keep_best(2, "loss", MetricMode::Max);
        assert_eq!(kept(&max, &list), vec![1, 5, 6]);
    }

    #[test]
    fn keep_best_ignores_missing_and_non_numeric() {
        let list = vec![
            ck(1, 1, 0, Some(MetaValue::Int(1))),
            ck(2, 2, 0, Some(MetaValue::Str("0".into()))),
            ck(3, 3, 0, None),
            ck(4, 4, 0, Some(MetaValue::Float(f64::NAN))),
            ck(5, 5, 0, Some(MetaValue::Bytes(vec![0]))),
            ck(6, 6, 0, Some(MetaValue::Float(7.5))),
            ck(7, 7, 0, None),
        ];
        // Only ids 1 and 6 are candidates; k = 5 keeps just those (and the newest).
        let p = RetentionPolicy::new().keep_best(5, "loss", MetricMode::Min);
        assert_eq!(kept(&p, &list), vec![1, 6, 7]);
        // Another metric name: no candidates at all.
        let p = RetentionPolicy::new().keep_best(5, "acc", MetricMode::Max);
        assert_eq!(kept(&p, &list), vec![7]);
    }

    #[test]
    fn keep_best_ties_go_to_the_newer() {
        let list: Vec<_> = (1..=4)
            .map(|i| ck(i, i, 0, Some(MetaValue::Int(1))))
            .collect();
        let p = RetentionPolicy::new().keep_best(2, "loss", MetricMode::Min);
        assert_eq!(kept(&p, &list), vec![3, 4]);
    }

    #[test]
    fn pins_and_newest_are_always_kept() {
        let mut list = ten();
        list[1].pinned = true; // id 2
        let p = RetentionPolicy::new().keep_last(1).pin(5).pin(999);
        assert_eq!(kept(&p, &list), vec![2, 5, 10]);
        assert_eq!(reasons(&p, &list, 2), vec!["pinned"]);
        assert_eq!(reasons(&p, &list, 5), vec!["policy-pin"]);
        // A newest checkpoint that no rule picks is still kept.
        let p = RetentionPolicy::new().keep_every_steps(1_000_000);
        assert_eq!(kept(&p, &list), vec![2, 10]);
    }

    #[test]
    fn rules_combine_as_a_union() {
        let mut list = ten();
        list[3]
            .metadata
            .insert("loss".into(), MetaValue::Float(0.1)); // id 4
        list[4].pinned = true; // id 5
        let p = RetentionPolicy::new()
            .keep_last(2)
            .keep_every_steps(300)
            .keep_best(1, "loss", MetricMode::Min)
            .keep_one_per_minutes(60);
        // last 2: 9, 10; every 300: 3, 6, 9; best: 4; pinned: 5; one window: 10.
        assert_eq!(kept(&p, &list), vec![3, 4, 5, 6, 9, 10]);
        assert_eq!(
            reasons(&p, &list, 10),
            vec!["newest", "keep-last", "keep-per-minutes"]
        );
        assert_eq!(reasons(&p, &list, 9), vec!["keep-last", "keep-every-steps"]);
        let pl = plan(&p, &list).unwrap();
        assert_eq!(
            pl.delete.iter().map(|c| c.id).collect::<Vec<_>>(),
            vec![1, 2, 7, 8]
        );
        // Adding a rule never keeps less.
        let more = p.clone().keep_last(5);
        let a: BTreeSet<u64> = kept(&p, &list).into_iter().collect();
        let b: BTreeSet<u64> = kept(&more, &list).into_iter().collect();
        assert!(a.is_subset(&b));
    }

    #[test]
    fn bad_policies_are_refused() {
        let bad = [
            RetentionPolicy::new(),
            RetentionPolicy::new().pin(1),
            RetentionPolicy::new().keep_last(0),
            RetentionPolicy::new().keep_every_steps(0),
            RetentionPolicy::new().keep_one_per_minutes(0),
            RetentionPolicy::new().keep_one_per_minutes(u64::MAX),
            RetentionPolicy::new().keep_best(0, "loss", MetricMode::Min),
            RetentionPolicy::new().keep_best(1, "", MetricMode::Min),
        ];
        for p in bad {
            assert!(
                matches!(plan(&p, &ten()), Err(Error::InvalidArgument(_))),
                "{p:?}"
            );
        }
        // An empty store plans to do nothing.
        let pl = plan(&RetentionPolicy::new().keep_last(1), &[]).unwrap();
        assert!(pl.keep.is_empty() && pl.delete.is_empty());
    }
}
