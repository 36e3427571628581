"""CUDA tensors (skipped without a GPU): saved through torch-side staging to host memory,
loaded back onto the device; load_into a module on the GPU."""

import pytest
import torch

import ckptstore as cs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_cuda_tensors_round_trip_onto_the_device(store_dir):
    g = torch.Generator(device="cuda").manual_seed(0)
    state = {"w": torch.randn(256, 1024, device="cuda", generator=g).bfloat16(),
             "b": torch.randn(1024, device="cuda", generator=g),
             "t": torch.randn(64, 32, device="cuda", generator=g).t()}  # non-contiguous
    with cs.Store(store_dir) as s:
        cs.save(s, state, step=1)
        h = cs.save_async(s, state, step=2)
        h.wait()
        for step in (1, 2):
            back = cs.load(s, step=step, device="cuda")
            for k, v in state.items():
                assert back[k].device.type == "cuda" and back[k].dtype == v.dtype
                assert torch.equal(back[k], v), (step, k)


def test_load_into_a_module_on_the_gpu(store_dir):
    src = torch.nn.Linear(128, 64).cuda()
    dst = torch.nn.Linear(128, 64).cuda()
    with cs.Store(store_dir) as s:
        cs.save(s, src.state_dict(), step=1)
        assert cs.load_into(dst, s) == cs.LoadResult([], [])
    assert torch.equal(src.weight, dst.weight) and torch.equal(src.bias, dst.bias)
