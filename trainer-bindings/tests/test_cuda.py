"""CUDA tensors (skipped without a GPU): saved through the engine's CUDA stager (device
pointer + torch's current stream, copied into the pinned staging pool), loaded back onto the
device through pinned buffers with asynchronous copies; load_into a module on the GPU."""

import os

import pytest
import torch

import ckptstore as cs
from ckptstore import _cuda

# CKPT_REQUIRE_GPU=1 (scripts/gpu-check.sh): a missing GPU fails instead of skipping
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("CKPT_REQUIRE_GPU") != "1",
    reason="no CUDA device")


def _state(device="cuda"):
    g = torch.Generator(device=device).manual_seed(0)
    return {"w": torch.randn(256, 1024, device=device, generator=g).bfloat16(),
            "b": torch.randn(1024, device=device, generator=g),
            "t": torch.randn(64, 32, device=device, generator=g).t(),  # non-contiguous
            "i": torch.arange(1000, device=device, dtype=torch.int64),
            "empty": torch.empty(0, 3, device=device)}


def test_the_engine_stages_cuda_tensors():
    assert _cuda.staging_available(), cs._native.cuda_staging()


def test_cuda_tensors_round_trip_bit_exact_onto_the_device(store_dir):
    state = _state()
    with cs.Store(store_dir) as s:
        cs.save(s, state, step=1)
        h = cs.save_async(s, state, step=2)
        h.wait()
        for step in (1, 2):
            back = cs.load(s, step=step, device="cuda")
            for k, v in state.items():
                assert back[k].device.type == "cuda" and back[k].dtype == v.dtype
                assert back[k].shape == v.shape and torch.equal(back[k], v), (step, k)
            host = cs.load(s, step=step)  # and the bytes on disk are the tensors' bytes
            for k, v in state.items():
                assert torch.equal(host[k], v.cpu()), (step, k)


def test_save_async_has_its_snapshot_when_it_returns(store_dir):
    """The stager's copies are ordered after torch's current stream and fenced before
    save_async returns: changing the tensor right after changes nothing saved."""
    x = torch.randn(64 << 20 >> 2, device="cuda")  # 64 MiB
    want = x.clone()
    with cs.Store(store_dir) as s:
        x.mul_(2).add_(1)  # queued on the current stream before the save
        want = want.mul(2).add(1)
        h = cs.save_async(s, {"x": x}, step=1)
        x.zero_()
        h.wait()
        assert torch.equal(cs.load(s, device="cuda")["x"], want)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="one GPU")
def test_a_tensor_is_staged_from_its_own_device(store_dir):
    a = torch.arange(10, device="cuda:0", dtype=torch.float32)
    b = torch.arange(10, device="cuda:1", dtype=torch.float32) * 2
    with cs.Store(store_dir) as s:
        cs.save(s, {"a": a, "b": b}, step=1)
        back = cs.load(s)
    assert torch.equal(back["a"], a.cpu()) and torch.equal(back["b"], b.cpu())


def test_load_into_a_module_on_the_gpu(store_dir):
    src = torch.nn.Linear(128, 64).cuda()
    dst = torch.nn.Linear(128, 64).cuda()
    with cs.Store(store_dir) as s:
        cs.save(s, src.state_dict(), step=1)
        assert cs.load_into(dst, s) == cs.LoadResult([], [])
    assert torch.equal(src.weight, dst.weight) and torch.equal(src.bias, dst.bias)


def test_a_load_larger_than_the_pinned_ring_onto_the_device(store_dir):
    big = torch.randn(200 << 20 >> 2, device="cuda")  # 200 MiB: several passes of the ring
    with cs.Store(store_dir) as s:
        cs.save(s, {"big": big}, step=1)
        back = cs.load(s, device="cuda:0")
    assert torch.equal(back["big"], big)
