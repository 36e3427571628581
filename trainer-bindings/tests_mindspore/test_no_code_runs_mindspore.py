"""No code runs when ckptstore.mindspore loads a crafted store (docs/DECISIONS.md, "No load path
runs code"): a blob holding a pickle is never unpickled, and ``append_info`` kinds outside the
ones this module writes are refused by name."""

import json
import os
import pickle

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from ckptstore import _native  # noqa: E402
from ckptstore.mindspore import APPEND_KEY, load_checkpoint  # noqa: E402


class _Sentinel:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _crafted(path, sentinel, kinds):
    w = np.arange(6, dtype=np.float32)
    evil = pickle.dumps(_Sentinel(os.fspath(sentinel)))
    s = _native.Store(os.fspath(path))
    try:
        s.save(1, [("w", "f32", [6], w.view(np.uint8))], [("__ckptstore__/tree", evil),
                                                           ("rng", evil)],
               metadata={"name": "net", APPEND_KEY: json.dumps(kinds), "lr": 0.5})
    finally:
        s.close()


def test_mindspore_load_never_unpickles_blobs(tmp_path):
    path, sentinel = tmp_path / "ck", tmp_path / "SENTINEL"
    _crafted(path, sentinel, {"w": "tensor", "lr": "float"})
    out = load_checkpoint(os.fspath(path / "net.ckpt"))
    assert np.array_equal(out["w"].asnumpy(), np.arange(6, dtype=np.float32))
    assert float(out["lr"].asnumpy()) == 0.5
    assert not sentinel.exists()


@pytest.mark.parametrize("kind", ["__import__", "pickle", "eval"])
def test_mindspore_unknown_append_info_kind_is_refused_by_name(tmp_path, kind):
    path, sentinel = tmp_path / "ck", tmp_path / "SENTINEL"
    _crafted(path, sentinel, {"w": "tensor", "lr": kind})
    with pytest.raises(ValueError, match=f"'lr' of kind '{kind}'"):
        load_checkpoint(os.fspath(path / "net.ckpt"))
    assert not sentinel.exists()
