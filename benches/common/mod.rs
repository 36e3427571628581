//! Helpers shared by the benches (each includes this with `mod common;`).

use std::path::PathBuf;

/// SplitMix64: deterministic, random-looking bench data.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The bench's working directory, created: `$CKPTSTORE_BENCH_DIR` if set, else `name` under
/// the target directory (the project's disk, not tmpfs).
pub fn bench_root(name: &str) -> PathBuf {
    let dir = match std::env::var_os("CKPTSTORE_BENCH_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
            target.join(name)
        }
    };
    std::fs::create_dir_all(&dir).expect("create bench dir");
    dir
}
