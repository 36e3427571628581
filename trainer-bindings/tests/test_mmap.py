"""load(mmap=True): tensors over private copy-on-write maps of the segment files. 1 GiB loads
without copying it (RSS), the tensors are writable, and writing leaves the store as it was."""

import json

import numpy as np
import pytest
import torch

import ckptstore as cs
from conftest import run_py

GiB = 1 << 30

# The saver and the loader run in fresh interpreters: this process's memory (pytest, torch,
# earlier tests) would blur what the load itself costs.
SAVE = """
import sys, torch, ckptstore as cs
g = torch.Generator().manual_seed(1)
state = {f"w{i}": torch.randint(-2**31, 2**31 - 1, (64 << 20,), dtype=torch.int32,
                                generator=g).view(torch.float32) for i in range(4)}
with cs.Store(sys.argv[1], segment_max_bytes=4 << 30) as s:
    cs.save(s, state, step=1)
"""

LOAD = """
import json, sys, torch, ckptstore as cs

def mem():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon"):
            out[k] = int(v.split()[0]) * 1024
    return out

s = cs.Store(sys.argv[1], read_only=True)
out = {}
for verify in (False, True):  # unverified first: its pages are still untouched
    before = mem()
    state = cs.load(s, mmap=True, verify=verify)
    after = mem()
    first = {k: (v[0].item(), v[-1].item()) for k, v in state.items()}
    for v in state.values():      # writable, in place: one page each becomes private
        v[0] = 42.0
        v[-1] = -42.0
    written = mem()
    out[str(verify)] = {"before": before, "after": after, "written": written,
                        "bytes": sum(v.nbytes for v in state.values()), "first": first,
                        "values": {k: (v[0].item(), v[-1].item()) for k, v in state.items()}}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def gib_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("mmap") / "store"
    r = run_py(SAVE, str(d), timeout=300)
    assert r.returncode == 0, r.stderr
    return d


def test_a_1gib_mmap_load_copies_nothing_and_writes_stay_private(gib_store):
    r = run_py(LOAD, str(gib_store), timeout=300)
    assert r.returncode == 0, r.stderr
    runs = json.loads(r.stdout)
    for verify, m in runs.items():
        assert m["bytes"] == GiB
        # No copy: anonymous memory grows by far less than the 1 GiB loaded. (Verifying reads
        # every page through the engine's shared map of the segment: page cache, not a copy.)
        assert m["after"]["RssAnon"] - m["before"]["RssAnon"] < 64 << 20, (verify, m)
        if verify == "False":  # nothing touched at all: the whole resident set stays put
            assert m["after"]["VmRSS"] - m["before"]["VmRSS"] < 64 << 20, m
        # Writes land in private pages (a few KiB each), in the loader's tensors only...
        assert m["written"]["RssAnon"] - m["after"]["RssAnon"] < 1 << 20, (verify, m)
        assert all(v == [42.0, -42.0] for v in m["values"].values()), (verify, m)
        # ...so the second load still saw the saved values
        assert m["first"] == runs["False"]["first"]
    # ...never in the store: it verifies, and a fresh load has the saved values.
    with cs.Store(gib_store, read_only=True) as s:
        s.verify(s.latest()["id"])
        back = cs.load(s, mmap=True, verify=False)  # (just verified)
        assert {k: [v[0].item(), v[-1].item()] for k, v in back.items()} == \
            {k: list(v) for k, v in runs["False"]["first"].items()}
    assert all(v[0] != 42.0 for v in runs["False"]["first"].values())


def test_mmap_gives_the_same_values_as_the_default_load_and_copies_what_is_not_mapped(store_dir):
    g = torch.Generator().manual_seed(0)
    state = {"a": torch.randn(300, 70, generator=g).bfloat16(),
             "b": torch.randn(1000, generator=g).double(),
             "same": torch.zeros(1 << 16), "same2": torch.zeros(1 << 16),  # deduplicated
             "n": np.arange(12, dtype=np.int16).reshape(3, 4), "step": 3}
    with cs.Store(store_dir, chunk_size=1 << 16) as s:
        cs.save(s, state, step=3)
        mapped, copied = cs.load(s, mmap=True), cs.load(s)
    assert mapped.keys() == copied.keys() and mapped["step"] == 3
    for k in ("a", "b", "same", "same2"):
        assert mapped[k].dtype == copied[k].dtype and torch.equal(mapped[k], copied[k]), k
        mapped[k].add_(1)  # writable, whether mapped or copied
    assert isinstance(mapped["n"], np.ndarray) and mapped["n"].flags.writeable
    assert np.array_equal(mapped["n"], state["n"])
    mapped["n"][0, 0] = 99
    with cs.Store(store_dir, read_only=True) as s:
        again = cs.load(s)
    assert torch.equal(again["a"], copied["a"]) and again["n"][0, 0] == 0


def test_mmap_refuses_a_device(store_dir):
    cs.save(store_dir, {"w": torch.ones(3)}, step=1)
    with pytest.raises(ValueError, match="mmap=True"):
        cs.load(store_dir, mmap=True, device="cuda:0")
