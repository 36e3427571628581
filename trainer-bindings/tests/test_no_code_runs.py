"""No load path runs code (docs/DECISIONS.md, "No load path runs code"): stores crafted as an
attacker who controls a store would, with a pickle that creates a sentinel file wherever a blob
or a name can hide, loaded through DCP, ``ckptstore.load`` (the JSON tree), Lightning's
``StoreCheckpointIO``; every one refuses or decodes without running anything. Also the private
tensor-pointer API's checks and ``Store(mode=)``."""

from __future__ import annotations

import base64
import json
import os
import stat

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import ckptstore  # noqa: E402
from ckptstore import _native  # noqa: E402
from ckptstore._tree import TREE_BLOB  # noqa: E402


class _Sentinel:
    """Unpickling this creates the file ``path`` (as ``open(path, "w")`` would)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.path, "w"))


def _evil_pickle(sentinel) -> bytes:
    """What ``torch.save`` writes for a value whose unpickling runs code (here: creates the
    sentinel file). ``torch.load(weights_only=False)`` of it runs ``open``."""
    import io
    buf = io.BytesIO()
    torch.save({"x": _Sentinel(os.fspath(sentinel))}, buf)
    return buf.getvalue()


def _commit_raw(path, blobs, metadata=None, tensors=()):
    """Writes a checkpoint with exactly these blobs (what an attacker who can write a store
    can do)."""
    s = _native.Store(os.fspath(path))
    try:
        s.save(1, list(tensors), blobs, metadata=metadata or {})
    finally:
        s.close()


# -- DCP -----------------------------------------------------------------------------------
dcp = pytest.importorskip("torch.distributed.checkpoint")


def _dcp_store(path, sentinel, *, dtype_entry=None):
    from ckptstore.dcp import METADATA_BLOB, METADATA_FORMAT
    sdm = {"evil": {"bytes": True}}
    if dtype_entry is not None:
        sdm["t"] = dtype_entry
    md = {"format": METADATA_FORMAT, "version": "1.0.0", "state_dict_metadata": sdm,
          "planner_data": None,
          "storage_data": [["evil", None, None, "dcp/bytes/evil", True, None, None]],
          "storage_meta": None}
    _commit_raw(path, [(METADATA_BLOB, json.dumps(md).encode()),
                       ("dcp/bytes/evil", _evil_pickle(sentinel))],
                metadata={"dcp.format": METADATA_FORMAT})


def test_dcp_load_pickle_never_runs(tmp_path):
    from ckptstore.dcp import StoreReader
    path, sentinel = tmp_path / "ck", tmp_path / "SENTINEL"
    _dcp_store(path, sentinel)
    from ckptstore.dcp import UnsafePickleError
    from torch.distributed.checkpoint.api import CheckpointException
    state = {"evil": 0}
    with pytest.raises(CheckpointException) as e:  # DCP wraps each rank's failure
        dcp.load(state, storage_reader=StoreReader(path))
    (exc, _trace), = e.value.failures.values()
    assert isinstance(exc, UnsafePickleError), exc
    assert "'evil': refused to unpickle" in str(exc) and "\x1b" not in str(exc)
    assert not sentinel.exists()
    assert state == {"evil": 0}


def test_dcp_allow_pickle_is_the_explicit_opt_in_and_the_crafted_pickle_is_real(tmp_path):
    # The same store with allow_pickle=True runs the pickle: proof that the refusal above is
    # what stands between a crafted store and code execution.
    from ckptstore.dcp import StoreReader
    path, sentinel = tmp_path / "ck", tmp_path / "SENTINEL"
    _dcp_store(path, sentinel)
    dcp.load({"evil": 0}, storage_reader=StoreReader(path, allow_pickle=True))
    assert sentinel.exists()


def test_dcp_plain_bytes_items_still_load_without_allow_pickle(tmp_path):
    from ckptstore.dcp import StoreReader, StoreWriter
    path = tmp_path / "ck"
    state = {"w": torch.arange(6.0), "extra": {"lr": 0.5, "names": ["a", "b"], "n": 3,
                                                "t": torch.tensor([1, 2]), "none": None}}
    dcp.save(state, storage_writer=StoreWriter(path, step=1))
    out = {"w": torch.zeros(6), "extra": {"lr": None, "names": None, "n": None,
                                          "t": torch.zeros(2, dtype=torch.int64),
                                          "none": 1}}
    dcp.load(out, storage_reader=StoreReader(path))
    assert torch.equal(out["w"], state["w"])
    assert out["extra"]["lr"] == 0.5 and out["extra"]["names"] == ["a", "b"]
    assert out["extra"]["n"] == 3 and out["extra"]["none"] is None
    assert torch.equal(out["extra"]["t"], torch.tensor([1, 2]))


@pytest.mark.parametrize("field, value", [("dtype", "load"), ("dtype", "_C"),
                                          ("layout", "save"), ("memory_format", "ops")])
def test_dcp_metadata_names_outside_the_whitelist_are_refused(tmp_path, field, value):
    from ckptstore.dcp import StoreReader
    path, sentinel = tmp_path / "ck", tmp_path / "SENTINEL"
    entry = {"dtype": "float32", "layout": "strided", "requires_grad": False,
             "memory_format": "contiguous_format", "pin_memory": False, "strides": None,
             "size": [2], "chunks": [[[0], [2]]]}
    entry[field] = value
    _dcp_store(path, sentinel, dtype_entry=entry)
    with pytest.raises(ValueError, match=f"stored torch {field} '{value}'"):
        StoreReader(path).read_metadata()
    assert not sentinel.exists()


# -- the JSON tree (ckptstore.load, Store.open().state(), Lightning) ---------------------------

def _tree_format():
    from ckptstore import _tree
    return _tree.FORMAT


def test_tree_blob_holding_a_pickle_comes_back_as_bytes_never_unpickled(tmp_path):
    path, sentinel = tmp_path / "ck", tmp_path / "SENTINEL"
    evil = _evil_pickle(sentinel)
    root = {"d": [["inline", {"b": base64.b64encode(evil).decode()}],
                  ["big", {"blob": "__ckptstore__/blob/big"}]]}
    doc = json.dumps({"format": _tree_format(), "root": root}).encode()
    _commit_raw(path, [(TREE_BLOB, doc), ("__ckptstore__/blob/big", evil)])
    out = ckptstore.load(path)
    assert out == {"inline": evil, "big": evil}
    assert not sentinel.exists()


@pytest.mark.parametrize("node", [
    {"np": "O", "b": base64.b64encode(b"\0" * 8).decode()},
    {"np": "V8", "b": base64.b64encode(b"\0" * 8).decode()},
    {"np": "i4,O", "b": base64.b64encode(b"\0" * 12).decode()},
    {"tensor": "raw", "fw": "numpy", "as": "O", "shape": [1]},
    {"tensor": "raw", "fw": "torch", "as": "torch.load", "shape": [1]},
    {"tensor": "raw", "fw": "torch", "as": "torch._C", "shape": [1]},
])
def test_tree_dtype_names_outside_the_whitelist_are_refused(tmp_path, node):
    path = tmp_path / "ck"
    raw = np.zeros(8, dtype=np.uint8)
    doc = json.dumps({"format": _tree_format(), "root": {"d": [["x", node]]}}).encode()
    _commit_raw(path, [(TREE_BLOB, doc)], tensors=[("raw", "u8", [8], raw)])
    with pytest.raises(ValueError, match="stored (numpy|torch) dtype"):
        ckptstore.load(path)


def test_lightning_load_never_unpickles(tmp_path):
    pytest.importorskip("lightning")
    from ckptstore.lightning import PATH_KEY, StoreCheckpointIO
    path, sentinel = tmp_path / "ck", tmp_path / "SENTINEL"
    evil = _evil_pickle(sentinel)
    key = os.path.abspath(tmp_path / "epoch=0.ckpt")
    root = {"d": [["state_dict", {"d": []}], ["callbacks", {"b": base64.b64encode(evil).decode()}],
                  ["hyper_parameters", {"blob": "__ckptstore__/blob/hp"}]]}
    doc = json.dumps({"format": _tree_format(), "root": root}).encode()
    _commit_raw(path, [(TREE_BLOB, doc), ("__ckptstore__/blob/hp", evil)],
                metadata={PATH_KEY: key})
    ck = StoreCheckpointIO(path).load_checkpoint(key)
    assert ck["callbacks"] == evil and ck["hyper_parameters"] == evil
    assert not sentinel.exists()


# -- the private tensor-pointer API --------------------------------------------------------

def test_raw_source_must_lie_inside_the_tensors_storage(tmp_path):
    t = torch.arange(16, dtype=torch.uint8)
    s = _native.Store(os.fspath(tmp_path / "ck"))
    try:
        for addr, n in [(t.data_ptr() + 8, 16), (t.data_ptr() - 1, 4), (1 << 40, 4)]:
            with pytest.raises(ValueError, match="not inside the tensor's storage"):
                s.save(1, [("x", "u8", [n], (t, addr, n))], [])
        with pytest.raises(TypeError, match="must be a torch tensor"):
            s.save(1, [("x", "u8", [4], (object(), t.data_ptr(), 4))], [])
        assert s.list() == []
    finally:
        s.close()


class _ShiftingStorage:
    """A storage whose ``data_ptr`` changes after the first look, as a ``resize_()`` from
    another thread during the GIL-released read would make it."""

    def __init__(self, base: int, n: int) -> None:
        self.base, self.n, self.looks = base, n, 0

    def data_ptr(self) -> int:
        self.looks += 1
        return self.base if self.looks == 1 else self.base + 4096

    def nbytes(self) -> int:
        return self.n


class _Owner:
    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr
        self.storage = _ShiftingStorage(arr.ctypes.data, arr.nbytes)

    def untyped_storage(self) -> _ShiftingStorage:
        return self.storage


@pytest.mark.parametrize("mode", ["save", "save_async"])
def test_storage_resized_during_a_save_is_detected_and_the_save_undone(tmp_path, mode):
    arr = np.arange(64, dtype=np.uint8)
    owner = _Owner(arr)
    s = _native.Store(os.fspath(tmp_path / "ck"))
    try:
        src = ("x", "u8", [64], (owner, arr.ctypes.data, 64))
        with pytest.raises(_native.StoreError, match="storage changed while it was being saved"):
            h = getattr(s, mode)(1, [src], [])
            if mode == "save_async":
                h.wait()
        assert s.list() == []
    finally:
        s.close()


# -- Store(mode=) --------------------------------------------------------------------------

def test_store_files_are_private_by_default_and_mode_shares_with_the_group(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    for mode, fmode, dmode in [(None, 0o600, 0o700), (0o640, 0o640, 0o750)]:
        path = tmp_path / f"ck{mode}"
        kw = {} if mode is None else {"mode": mode}
        with ckptstore.Store(path, **kw) as s:
            ckptstore.save(s, {"w": torch.ones(4)}, step=1)
        for root, dirs, files in os.walk(path):
            assert stat.S_IMODE(os.stat(root).st_mode) == dmode & ~umask, root
            for f in files:
                p = os.path.join(root, f)
                assert stat.S_IMODE(os.stat(p).st_mode) == fmode & ~umask, p


def test_world_writable_store_dir_is_refused_with_the_reason(tmp_path):
    path = tmp_path / "ck"
    with ckptstore.Store(path) as s:
        ckptstore.save(s, {"w": torch.ones(4)}, step=1)
    os.chmod(path, 0o777)
    with pytest.raises(ckptstore.StoreError, match="world-writable"):
        ckptstore.Store(path)
    with ckptstore.Store(path, allow_unsafe_dir=True) as s:
        assert len(s.list()) == 1
