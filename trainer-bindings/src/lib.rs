//! `ckptstore._native`: the engine, exposed to Python. This crate converts and calls; the
//! storage logic (commit protocol, recovery, verification, retention) is the engine's. The
//! Python package `ckptstore` (python/ckptstore) builds the user API on top of it.
#![deny(unsafe_code)]

mod dcp;
mod device_bytes;
mod errors;
mod host_bytes;
mod save_job;
mod store;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<store::PyStore>()?;
    m.add_class::<save_job::SaveHandle>()?;
    m.add_class::<host_bytes::MappedBytes>()?;
    m.add_class::<host_bytes::OwnedBytes>()?;
    m.add_class::<dcp::DcpCoordinator>()?;
    m.add_function(wrap_pyfunction!(dcp::write_shard, m)?)?;
    m.add_function(wrap_pyfunction!(dcp::write_shard_remote, m)?)?;
    m.add_class::<dcp::DcpRemoteView>()?;
    m.add_function(wrap_pyfunction!(device_bytes::cuda_staging, m)?)?;
    errors::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
