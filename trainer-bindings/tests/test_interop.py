"""Checkpoints cross between the Python package, the CLI and safetensors: a Python save
exports to a safetensors file that the safetensors library reads; a safetensors file imported
by the CLI loads in Python as a flat dict of its tensors."""

import subprocess

import pytest
import torch

import ckptstore as cs
from conftest import cli

safetensors_torch = pytest.importorskip("safetensors.torch")
pytestmark = pytest.mark.skipif(cli() is None, reason="ckptstore CLI not built (cargo build)")


def test_python_save_exports_to_safetensors(store_dir, tmp_path):
    state = {"fc.weight": torch.randn(4, 3).bfloat16(), "fc.bias": torch.arange(4.0)}
    with cs.Store(store_dir) as s:
        cs.save(s, state, step=12)
    out = tmp_path / "m.safetensors"
    subprocess.run([cli(), "export", str(store_dir), str(out)], check=True, capture_output=True)
    back = safetensors_torch.load_file(str(out))
    for k, v in state.items():
        assert torch.equal(back[k], v), k


def test_cli_import_loads_in_python_as_a_flat_dict(store_dir, tmp_path):
    state = {"a": torch.randn(5, 5), "b": torch.randint(0, 9, (7,), dtype=torch.int32)}
    f = tmp_path / "in.safetensors"
    safetensors_torch.save_file(state, str(f), metadata={"step": "40"})
    subprocess.run([cli(), "import", str(f), str(store_dir)], check=True, capture_output=True)
    with cs.Store(store_dir, read_only=True) as s:
        assert s.latest()["step"] == 40
        back = cs.load(s)
    assert sorted(k for k in back if not k.startswith("__")) == ["a", "b"]
    for k, v in state.items():
        assert torch.equal(back[k], v), k
