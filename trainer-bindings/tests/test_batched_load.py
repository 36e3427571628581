"""A torch CPU load reads every tensor of the state in one engine call (``read_many`` through
``_tensors.TorchBatch``): bit-exact for every dtype and shape, each tensor its own fresh
memory, the GIL released while it reads, overlapping targets refused."""

import os
import sys
import threading
import time

import pytest
import torch

import ckptstore as cs
from ckptstore import _native, _tensors

TORCH_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16,
                torch.float8_e4m3fn, torch.float8_e5m2, torch.int64, torch.int32,
                torch.int16, torch.int8, torch.uint8, torch.bool]


def _bits(t):
    return t.contiguous().view(-1).view(torch.uint8) if t.numel() else t


def _state():
    g = torch.Generator().manual_seed(3)
    state = {}
    for d in TORCH_DTYPES:
        name = str(d).split(".")[1]
        base = torch.randn(7, 9, generator=g)
        state[name] = base.to(d) if d != torch.bool else base > 0
        state[name + "_empty"] = torch.zeros(0, 3, dtype=d)
        state[name + "_scalar"] = torch.tensor(1, dtype=d)
    big = torch.randn(3 << 20, generator=g)  # several 4 MiB chunks: read on every core
    state["opt"] = {"bf16_t": big.to(torch.bfloat16).reshape(3 << 10, 1 << 10).t(),
                    "f32_slice": big[1::3], "big": big}
    return state


def _check(back, state):
    for k, v in state.items():
        if isinstance(v, dict):
            _check(back[k], v)
            continue
        b = back[k]
        assert b.dtype == v.dtype and b.shape == v.shape and b.is_contiguous(), k
        assert torch.equal(_bits(b), _bits(v)), k


def test_batched_torch_load_is_bit_exact_for_every_dtype_and_shape(store_dir):
    state = _state()
    with cs.Store(store_dir) as s:
        cs.save(s, state, step=1)
    with cs.Store(store_dir, read_only=True) as s:
        back = cs.load(s)
        flat = cs.load(s, prefix="opt/")
        prog = []
        with_progress = cs.load(s, progress=lambda done, total: prog.append((done, total)))
    _check(back, state)
    _check(with_progress, state)
    assert prog and prog[-1][0] == prog[-1][1]
    assert sorted(flat) == ["opt/bf16_t", "opt/big", "opt/f32_slice"]
    assert torch.equal(flat["opt/big"], state["opt"]["big"])
    # fresh, separate, writable memory per tensor
    ptrs = [t.data_ptr() for t in back["opt"].values()]
    assert len(set(ptrs)) == 3
    back["opt"]["big"].add_(1)
    assert torch.equal(back["opt"]["f32_slice"], state["opt"]["f32_slice"])


def test_read_many_releases_the_gil(store_dir):
    with cs.Store(store_dir) as s:
        cs.save(s, {"w": torch.randn(32 << 20)}, step=1)
    s = cs.Store(store_dir, read_only=True)
    ticks = [0]
    stop = threading.Event()

    def count():
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0.0002)  # gives the GIL back at once

    old = sys.getswitchinterval()
    # The main thread then never hands the GIL over on its own: the counter runs only while
    # the main thread has released it.
    sys.setswitchinterval(30)
    t = threading.Thread(target=count, daemon=True)
    try:
        t.start()
        time.sleep(0.05)
        ck = s.open()
        batch = _tensors.TorchBatch(s._native, ck.id, True)
        w = batch.add("w")
        before = ticks[0]
        batch.fill()
        during = ticks[0] - before
    finally:
        stop.set()
        sys.setswitchinterval(old)
        t.join()
        s.close()
    assert w.numel() == 32 << 20
    assert during > 0, "the other thread never ran while the tensors were read"


def test_overlapping_load_targets_are_refused(store_dir):
    with cs.Store(store_dir) as s:
        cs.save(s, {"a": torch.ones(1024), "b": torch.ones(1024)}, step=1)
    s = _native.Store(os.fspath(store_dir), read_only=True)
    try:
        buf = torch.zeros(2048)
        p = buf.data_ptr()
        with pytest.raises(ValueError, match="overlap"):
            s.read_many(s.list()[-1]["id"], [("a", (buf, p, 4096)), ("b", (buf, p + 2048, 4096))])
        assert not buf.any(), "nothing written"
        s.read_many(s.list()[-1]["id"], [("a", (buf, p, 4096)), ("b", (buf, p + 4096, 4096))])
        assert torch.equal(buf, torch.ones(2048))
    finally:
        s.close()


def _cold(store_dir):
    """Syncs and evicts every segment's pages: the next read is cold."""
    for p in (store_dir / "segments").iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _takes_o_direct(d):
    p = os.path.join(d, "o_direct_probe")
    with open(p, "wb") as f:
        f.write(b"\0" * 4096)
    try:
        os.close(os.open(p, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        os.remove(p)


def _big_state():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(3 << 20, generator=g)
    return {"lead": torch.arange(5, dtype=torch.int16),  # puts later tensors off 4 KiB
            "bf16": base[: 5 << 18].to(torch.bfloat16).reshape(5, 1 << 18),
            "f32": base[1::2].clone(),
            "f16_odd": base[: (1 << 20) + 3].to(torch.float16),
            "i64": torch.arange(300_001, dtype=torch.int64),
            "small": base[:10].clone()}


def test_cold_torch_load_reads_in_place_and_outlives_the_store(store_dir):
    """A cold load of uncompressed tensors of a MiB or more hands torch the memory the disk
    read them into (``load_many``: zero-copy, writable), bit-exact for every dtype, and the
    tensors outlive the store and the engine's objects."""
    import gc
    state = _big_state()
    with cs.Store(store_dir) as s:
        cs.save(s, state, step=1)
    direct = _takes_o_direct(store_dir)
    _cold(store_dir)
    s = _native.Store(os.fspath(store_dir), read_only=True)
    try:
        bufs = s.load_many(s.list()[-1]["id"], list(state))
        big = {n: len(b) >= 1 << 20 for n, b in zip(state, bufs)}
        assert [b.zero_copy for b in bufs] == [direct and big[n] for n in state]
        mv = memoryview(bufs[1])
        assert not mv.readonly and mv.nbytes == state["bf16"].numel() * 2
    finally:
        s.close()
    _cold(store_dir)
    with cs.Store(store_dir, read_only=True) as st:
        back = cs.load(st)
        one = st.open().get_tensor("f16_odd")
    del st, bufs, mv
    gc.collect()
    _check(back, state)
    assert torch.equal(one, state["f16_odd"])
    back["f32"].add_(1)  # writable, its own memory
    back["bf16"][0, 0] = 7
    assert torch.equal(back["f32"], state["f32"] + 1) and back["bf16"][0, 0].item() == 7


def test_cold_torch_load_names_the_damaged_chunk(store_dir):
    """A damaged chunk of a tensor read in place is found before the tensor is handed out;
    verify=False hands the stored bytes out."""
    state = _big_state()
    with cs.Store(store_dir) as s:
        cs.save(s, state, step=1)
    seg = sorted((store_dir / "segments").iterdir())[-1]
    data = bytearray(seg.read_bytes())
    at = data.find(state["f32"][1000:1016].numpy().tobytes())
    assert at > 0
    data[at] ^= 0x01
    seg.write_bytes(bytes(data))
    _cold(store_dir)
    with cs.Store(store_dir, read_only=True) as st:
        with pytest.raises(cs.CorruptionError, match="BLAKE3") as e, \
                pytest.warns(UserWarning, match="damaged"):
            cs.load(st)
        assert "'f32'" in str(e.value) or '"f32"' in str(e.value), str(e.value)
        _cold(store_dir)
        back = cs.load(st, verify=False)
    assert not torch.equal(back["f32"], state["f32"])
    assert torch.equal(back["bf16"], state["bf16"])


def test_cold_torch_load_without_direct_reads(store_dir):
    """``CKPTSTORE_DIRECT_READ=0`` (read once per process: a fresh interpreter) reads through
    the page cache and copies: the same bytes, nothing zero-copy."""
    import subprocess
    import textwrap
    state = _big_state()
    with cs.Store(store_dir) as s:
        cs.save(s, state, step=1)
    torch.save(state, store_dir / "want.pt")
    _cold(store_dir)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys, torch, ckptstore as cs
        from ckptstore import _native
        want = torch.load(sys.argv[1] + "/want.pt")
        s = _native.Store(sys.argv[1], read_only=True)
        bufs = s.load_many(s.list()[-1]["id"], list(want))
        s.close()
        assert not any(b.zero_copy for b in bufs)
        with cs.Store(sys.argv[1], read_only=True) as st:
            back = cs.load(st)
        for k, v in want.items():
            assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
        print("ok")
    """), os.fspath(store_dir)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CKPTSTORE_DIRECT_READ": "0"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
