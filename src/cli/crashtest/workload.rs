//! The crashtest workload: store options and checkpoint contents, a pure function of the
//! data seed and the step, so the parent can regenerate any checkpoint to compare it.

use crate::cli::synth::{self, Role, Spec};
use ckptstore::{DType, MetaValue, Options, Pipeline, SaveHandle, Selector, Store};
use std::collections::BTreeMap;

pub(super) const STEPS_PER_EPOCH: u64 = 10;
/// `head.weight` changes only every this many steps (deduplicated in between).
pub(super) const SLOW_EVERY: u64 = 5;
/// The writer compacts the WAL explicitly after every step that is a multiple of this.
pub(super) const COMPACT_EVERY: u64 = 13;
pub(super) const OPTIMIZER_JSON: &[u8] = br#"{"type":"adamw","betas":[0.9,0.999],"eps":1e-8}"#;

/// Small chunks (many per tensor) and a tiny WAL compaction threshold, so that every kill has
/// many chunk writes, commits and compactions to land in.
pub(super) fn store_options(read_only: bool) -> Options {
    Options {
        read_only,
        chunk_size: 4096,
        segment_max_bytes: 1 << 20,
        wal_compact_min_bytes: 4096,
        ..Default::default()
    }
}

/// How many checkpoints the writer keeps after saving `step`: 2 to 4, so it sometimes
/// deletes two in a row.
pub(super) fn keep_last(step: u64) -> usize {
    2 + (step % 3) as usize
}

/// Everything one checkpoint holds.
pub(super) struct Content {
    pub(super) step: u64,
    pub(super) epoch: u64,
    pub(super) tensors: Vec<(Spec, Vec<u8>)>,
    pub(super) blobs: Vec<(&'static str, Vec<u8>)>,
    pub(super) metadata: BTreeMap<String, MetaValue>,
}

impl Content {
    /// The checkpoint of `step` (about 90 KiB in 20-odd 4 KiB chunks).
    pub(super) fn of(seed: u64, step: u64) -> Content {
        let mut tensors = Vec::new();
        let mut put = |spec: Spec, at: u64| {
            let data = synth::generate(seed, &spec, at);
            tensors.push((spec, data));
        };
        put(
            Spec::new("layers.0.weight", DType::BF16, &[64, 80], Role::Param),
            step,
        );
        put(
            Spec::new("layers.0.bias", DType::F32, &[80], Role::Param),
            step,
        );
        put(
            Spec::new("layers.1.weight", DType::BF16, &[80, 64], Role::Param),
            step,
        );
        put(
            Spec::new("layers.1.bias", DType::F32, &[64], Role::Param),
            step,
        );
        put(
            Spec::new("head.weight", DType::F32, &[64, 32], Role::Param),
            step - step % SLOW_EVERY,
        );
        if step.is_multiple_of(3) {
            put(
                Spec::new("ema.layers.0.weight", DType::BF16, &[64, 80], Role::Param),
                step,
            );
        }
        put(
            Spec::new(
                "optim.exp_avg.layers.0.weight",
                DType::F32,
                &[64, 80],
                Role::ExpAvg,
            ),
            step,
        );
        put(
            Spec::new(
                "optim.exp_avg_sq.layers.0.weight",
                DType::F32,
                &[64, 80],
                Role::ExpAvgSq,
            ),
            step,
        );
        put(
            Spec::new("optim.step", DType::I64, &[], Role::Counter),
            step,
        );
        put(Spec::new("mask", DType::Bool, &[0], Role::Param), step);
        // Frozen (identical at every step: deduplicated), and last, so that a kill soon after
        // a save begins lands in chunk writes of the tensors above.
        put(
            Spec::new("embed.weight", DType::F32, &[48, 64], Role::Frozen),
            step,
        );

        let mut sm = seed ^ step.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let rng_len = if step.is_multiple_of(11) {
            0
        } else {
            (synth::splitmix(&mut sm) % 9000) as usize
        };
        let blobs = vec![
            ("optimizer.json", OPTIMIZER_JSON.to_vec()),
            ("rng.bin", synth::blob_bytes(seed, "rng.bin", step, rng_len)),
        ];
        let rng_state: Vec<u8> = (0..2)
            .flat_map(|_| synth::splitmix(&mut sm).to_le_bytes())
            .collect();
        let metadata = BTreeMap::from([
            (
                "lr".to_string(),
                MetaValue::Float(1e-3 / (1.0 + step as f64 / 100.0)),
            ),
            ("rng_state".to_string(), MetaValue::Bytes(rng_state)),
            (
                "data_loader.position".to_string(),
                MetaValue::Int((step % STEPS_PER_EPOCH) as i64 * 32),
            ),
            (
                "run".to_string(),
                MetaValue::Str(format!("ckptstore-crashtest seed={seed}")),
            ),
        ]);
        Content {
            step,
            epoch: step / STEPS_PER_EPOCH,
            tensors,
            blobs,
            metadata,
        }
    }

    pub(super) fn save(&self, store: &mut Store) -> ckptstore::Result<ckptstore::CommitInfo> {
        let mut t = store.begin(self.step)?;
        t.set_epoch(self.epoch);
        for (k, v) in &self.metadata {
            t.set_metadata(k.clone(), v.clone());
        }
        for (s, d) in &self.tensors {
            t.put_tensor(&s.name, s.dtype, &s.shape, d)?;
        }
        for (name, b) in &self.blobs {
            t.put_blob(name, b)?;
        }
        t.commit()
    }

    /// The same checkpoint through the asynchronous pipeline: returns once it is staged
    /// (submitted); the handle reports the commit.
    pub(super) fn save_async(&self, p: &mut Pipeline) -> ckptstore::Result<SaveHandle> {
        let mut s = p.begin(self.step)?;
        s.set_epoch(self.epoch);
        for (k, v) in &self.metadata {
            s.set_metadata(k.clone(), v.clone());
        }
        for (spec, d) in &self.tensors {
            s.put_tensor(&spec.name, spec.dtype, &spec.shape, d)?;
        }
        for (name, b) in &self.blobs {
            s.put_blob(name, b)?;
        }
        s.submit()
    }

    /// Compares checkpoint `id` with this content byte for byte; the error says what differs.
    pub(super) fn check(&self, store: &Store, id: u64) -> Result<(), String> {
        let ck = store
            .checkpoint(Selector::Id(id))
            .map_err(|e| format!("does not open: {e}"))?;
        let info = ck.info();
        if info.step != self.step || info.epoch != self.epoch {
            return Err(format!(
                "is step {} epoch {}, expected step {} epoch {}",
                info.step, info.epoch, self.step, self.epoch
            ));
        }
        let names: Vec<&str> = self.tensors.iter().map(|(s, _)| s.name.as_str()).collect();
        if ck.tensor_names() != names {
            return Err(format!(
                "has tensors {:?}, expected {names:?}",
                ck.tensor_names()
            ));
        }
        for (s, want) in &self.tensors {
            let t = ck
                .tensor(&s.name)
                .map_err(|e| format!("tensor {}: {e}", s.name))?;
            if t.dtype != s.dtype || t.shape != s.shape {
                return Err(format!(
                    "tensor {} is {} {:?}, expected {} {:?}",
                    s.name, t.dtype, t.shape, s.dtype, s.shape
                ));
            }
            if t.data != *want {
                let at = t.data.iter().zip(want).position(|(a, b)| a != b);
                return Err(format!(
                    "tensor {} differs from what was written (first at byte {})",
                    s.name,
                    at.map_or_else(|| "length".into(), |a| a.to_string())
                ));
            }
        }
        let blob_names: Vec<&str> = self.blobs.iter().map(|(n, _)| *n).collect();
        if ck.blob_names() != blob_names {
            return Err(format!(
                "has blobs {:?}, expected {blob_names:?}",
                ck.blob_names()
            ));
        }
        for (name, want) in &self.blobs {
            let got = ck.blob(name).map_err(|e| format!("blob {name}: {e}"))?;
            if got != *want {
                return Err(format!("blob {name} differs from what was written"));
            }
        }
        if info.metadata != self.metadata {
            return Err("metadata differs from what was written".into());
        }
        Ok(())
    }
}
