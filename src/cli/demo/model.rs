//! The synthetic model: deterministic in (seed, tensor name, step).

use crate::cli::synth::{self, splitmix, Role, Spec};
use crate::cli::{fail, CliResult};
use ckptstore::{CommitInfo, DType, MetaValue, Selector, Store};
use std::collections::BTreeMap;
use std::sync::Arc;

pub(super) const LAYERS: usize = 4;
pub(super) const STEPS_PER_EPOCH: u64 = 10;
pub(super) const BATCH: i64 = 32;
pub(super) const OPTIMIZER_JSON: &[u8] =
    br#"{"type":"adamw","betas":[0.9,0.999],"eps":1e-8,"weight_decay":0.01}"#;

pub(super) struct Model {
    pub(super) seed: u64,
    pub(super) steps: u64,
    pub(super) specs: Vec<Spec>,
    /// Frozen tensors are generated once.
    pub(super) frozen: BTreeMap<String, Arc<Vec<u8>>>,
}

impl Model {
    pub(super) fn new(seed: u64, state_mib: u64, steps: u64) -> Model {
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

    pub(super) fn state_bytes(&self) -> u64 {
        self.specs.iter().map(|s| s.nbytes() as u64).sum()
    }

    pub(super) fn frozen_bytes(&self) -> u64 {
        self.frozen.values().map(|v| v.len() as u64).sum()
    }

    /// The bytes of tensor `s` at `step` (a frozen tensor ignores the step).
    pub(super) fn generate(&self, s: &Spec, step: u64) -> Vec<u8> {
        synth::generate(self.seed, s, step)
    }

    /// Every tensor at `step`, in spec order.
    pub(super) fn state(&self, step: u64) -> Vec<Arc<Vec<u8>>> {
        self.specs
            .iter()
            .map(|s| match self.frozen.get(&s.name) {
                Some(v) => v.clone(),
                None => Arc::new(self.generate(s, step)),
            })
            .collect()
    }

    pub(super) fn epoch(step: u64) -> u64 {
        step / STEPS_PER_EPOCH
    }

    /// Metadata saved with the checkpoint of `step`: lr schedule, RNG state, data loader.
    pub(super) fn metadata(&self, step: u64) -> BTreeMap<String, MetaValue> {
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

    pub(super) fn blobs(&self) -> Vec<(&'static str, &'static [u8])> {
        vec![("optimizer.json", OPTIMIZER_JSON)]
    }

    /// Saves the state of `step` (already generated as `data`) as one checkpoint.
    pub(super) fn save(
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
    pub(super) fn check_exact(&self, store: &Store, id: u64) -> CliResult<(usize, usize, usize)> {
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
