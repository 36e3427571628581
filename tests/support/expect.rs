//! What a checkpoint should hold, and the check that it holds exactly that (the crash sweeps'
//! oracle).

use ckptstore::{DType, MetaValue, Selector, Store};
use std::collections::BTreeMap;

/// What a checkpoint holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    pub step: u64,
    pub epoch: u64,
    pub tensors: Vec<(String, DType, Vec<u64>, Vec<u8>)>,
    pub blobs: Vec<(String, Vec<u8>)>,
    pub metadata: BTreeMap<String, MetaValue>,
}

/// Checks that checkpoint `id` holds exactly `e`, bit-exact, and verifies.
pub fn check_content(store: &Store, id: u64, e: &Expected) -> Result<(), String> {
    let ck = store
        .checkpoint(Selector::Id(id))
        .map_err(|x| format!("open checkpoint {id}: {x}"))?;
    let info = ck.info();
    ensure!(
        (info.step, info.epoch) == (e.step, e.epoch),
        "checkpoint {id}: step/epoch {}/{} instead of {}/{}",
        info.step,
        info.epoch,
        e.step,
        e.epoch
    );
    ensure!(
        ck.metadata() == e.metadata,
        "checkpoint {id}: metadata differs"
    );
    let names: Vec<&str> = e.tensors.iter().map(|t| t.0.as_str()).collect();
    ensure!(
        ck.tensor_names() == names,
        "checkpoint {id}: tensors {:?}",
        ck.tensor_names()
    );
    for (name, dtype, shape, bytes) in &e.tensors {
        let t = ck
            .tensor(name)
            .map_err(|x| format!("checkpoint {id} tensor {name}: {x}"))?;
        ensure!(
            t.dtype == *dtype && t.shape == *shape && t.data == *bytes,
            "checkpoint {id} tensor {name} differs"
        );
    }
    let names: Vec<&str> = e.blobs.iter().map(|b| b.0.as_str()).collect();
    ensure!(
        ck.blob_names() == names,
        "checkpoint {id}: blobs {:?}",
        ck.blob_names()
    );
    for (name, bytes) in &e.blobs {
        let b = ck
            .blob(name)
            .map_err(|x| format!("checkpoint {id} blob {name}: {x}"))?;
        ensure!(b == *bytes, "checkpoint {id} blob {name} differs");
    }
    store
        .verify(id)
        .map_err(|x| format!("checkpoint {id} fails verification: {x}"))
}
