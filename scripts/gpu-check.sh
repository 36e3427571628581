#!/usr/bin/env bash
# The GPU check of the CUDA staging path (cargo feature `cuda`), in one run:
#   1. builds with --features cuda (or takes prebuilt binaries from $CKPT_GPU_BIN, for GPU
#      hosts without a Rust toolchain: build them with `scripts/gpu-check.sh --build-only DIR`);
#   2. runs tests/cuda.rs with CKPT_REQUIRE_GPU=1 (a missing GPU fails instead of skipping);
#   3. saves SIZE_GIB of random device tensors through the pipeline, checks the checkpoint
#      bit-exact against a host copy, and prints the D2H staging GB/s next to a plain pinned
#      cuMemcpyDtoH of the same bytes in the same run (examples/gpu_check.rs);
#   4. where python3 imports torch and ckptstore (the wheel, built with the `cuda` feature):
#      trainer-bindings/tests/test_cuda.py with CKPT_REQUIRE_GPU=1, and the Python figures
#      (save_async stall and load(device="cuda:0") next to plain pinned copies,
#      trainer-bindings/benches/cuda_save_load.py).
# Usage: scripts/gpu-check.sh [SIZE_GIB=4] [DIR=/tmp/ckpt-gpu-check]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--build-only" ]; then
  out=${2:?usage: scripts/gpu-check.sh --build-only DIR}
  mkdir -p "$out"
  cargo build --release --features cuda --example gpu_check
  cp target/release/examples/gpu_check "$out/"
  test_bin=$(cargo test --release --features cuda --test cuda --no-run 2>&1 |
    grep -o 'target/release/deps/cuda-[0-9a-f]*' | head -1)
  cp "$test_bin" "$out/cuda_tests"
  echo "built $out/gpu_check and $out/cuda_tests"
  exit 0
fi

SIZE_GIB=${1:-4}
DIR=${2:-/tmp/ckpt-gpu-check}
if [ -n "${CKPT_GPU_BIN:-}" ]; then
  check="$CKPT_GPU_BIN/gpu_check"
  tests="$CKPT_GPU_BIN/cuda_tests"
else
  cargo build --release --features cuda --example gpu_check
  check=target/release/examples/gpu_check
  tests=$(cargo test --release --features cuda --test cuda --no-run 2>&1 |
    grep -o 'target/release/deps/cuda-[0-9a-f]*' | head -1)
fi

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "== tests/cuda.rs (CKPT_REQUIRE_GPU=1)"
CKPT_REQUIRE_GPU=1 "$tests" --test-threads=1
echo "== gpu_check: ${SIZE_GIB} GiB"
"$check" --size-gib "$SIZE_GIB" --dir "$DIR"
if python3 -c "import torch, ckptstore" 2>/dev/null; then
  echo "== python: trainer-bindings/tests/test_cuda.py (CKPT_REQUIRE_GPU=1)"
  (cd trainer-bindings && CKPT_REQUIRE_GPU=1 python3 -m pytest -q tests/test_cuda.py)
  echo "== python: benches/cuda_save_load.py"
  python3 trainer-bindings/benches/cuda_save_load.py --dir "$DIR-py" --gib "$SIZE_GIB"
else
  echo "== python: skipped (python3 cannot import torch and ckptstore here)"
fi
