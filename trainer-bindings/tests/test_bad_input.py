"""Bad input: unencodable values, damage, locks, strict load_into, interrupts."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import ckptstore as cs
from conftest import run_py


class Opaque:
    pass


@pytest.mark.parametrize("value, where", [
    ({"a": {"b": [1, Opaque()]}}, "a/b/1"),
    ({"a": {1, 2}}, "a"),
    ({"a": torch.zeros(2).to_sparse()}, "a"),
    ({"a": [1j]}, "a/0"),
    ({"a": np.array(["x"], dtype=object)}, "a"),
    ({"a": {object(): 1}}, "a"),
    ({"a": torch.float32}, "a"),
])
def test_unencodable_values_raise_type_error_naming_the_key_and_write_nothing(store_dir, value,
                                                                             where):
    with cs.Store(store_dir) as s:
        cs.save(s, {"ok": torch.ones(1)}, step=1)
        segments = sorted(os.listdir(store_dir / "segments"))
        with pytest.raises(TypeError, match=f"^{where}: "):
            cs.save(s, {"model": torch.ones(3), **value}, step=2)
        assert [c["step"] for c in s.list()] == [1]
        assert sorted(os.listdir(store_dir / "segments")) == segments
    with cs.Store(store_dir) as s:
        assert [c["step"] for c in s.list()] == [1]


def test_bad_metadata_is_a_type_error_and_writes_nothing(store_dir):
    with cs.Store(store_dir) as s:
        with pytest.raises(TypeError, match='metadata "x"'):
            cs.save(s, {"w": torch.ones(1)}, step=1, metadata={"x": [1]})
        assert s.list() == []


def test_second_writer_gets_the_lock_error(store_dir):
    with cs.Store(store_dir) as s:
        cs.save(s, {"w": torch.ones(1)}, step=1)
        r = run_py("""
            import sys, ckptstore as cs
            try:
                cs.Store(sys.argv[1])
            except cs.LockedError as e:
                print("LOCKED", e)
            ro = cs.Store(sys.argv[1], read_only=True)
            print("READ", ro.list()[0]["step"])
        """, str(store_dir))
        assert "LOCKED" in r.stdout and f"pid {os.getpid()}" in r.stdout, r.stderr
        assert "READ 1" in r.stdout


def test_damaged_newest_checkpoint_is_skipped_with_a_warning(store_dir):
    with cs.Store(store_dir) as s:
        cs.save(s, {"w": torch.full((1000,), 1.0)}, step=1)
        cs.save(s, {"w": torch.full((1000,), 2.0)}, step=2)
    segs = sorted((store_dir / "segments").iterdir())
    newest = segs[-1]
    data = bytearray(newest.read_bytes())
    # Inside the last tensor's payload: before the commit trailer that ends the segment
    # (docs/FORMAT.md), if there is one.
    end = data.rfind(b"CKPTTRL\0")
    data[(end if end >= 0 else len(data)) - 100] ^= 0xFF
    newest.write_bytes(bytes(data))
    with cs.Store(store_dir) as s:
        with pytest.warns(UserWarning, match="damaged"):
            back = cs.load(s)
        assert back["w"][0].item() == 1.0
        with pytest.raises(cs.CorruptionError, match="BLAKE3"):
            cs.load(s, step=2)
        assert cs.load(s, step=2, verify=False)["w"].shape == (1000,)


def test_load_into_strict_nonstrict_and_mismatch(store_dir):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    with cs.Store(store_dir) as s:
        cs.save(s, {"model": net.state_dict(), "step": 3}, step=3)
        other = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        assert cs.load_into(other, s, prefix="model/") == cs.LoadResult([], [])
        for a, b in zip(net.parameters(), other.parameters()):
            assert torch.equal(a, b)

        bigger = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2),
                                     torch.nn.Linear(2, 1))
        before = [p.clone() for p in bigger.parameters()]
        with pytest.raises(cs.StrictLoadError) as ei:
            cs.load_into(bigger, s, prefix="model/")
        assert ei.value.missing == ["2.weight", "2.bias"] and ei.value.unexpected == []
        assert all(torch.equal(a, b) for a, b in zip(before, bigger.parameters()))
        r = cs.load_into(bigger, s, prefix="model/", strict=False)
        assert r.missing_keys == ["2.weight", "2.bias"]
        assert torch.equal(bigger[0].weight, net[0].weight)

        with pytest.raises(cs.StrictLoadError) as ei:
            cs.load_into(net, s)  # without the prefix nothing lines up
        assert "model/0.weight" in ei.value.unexpected

        wrong = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
        with pytest.raises(ValueError, match=r"'model/0.weight': module expects f32 \[5, 3\]"):
            cs.load_into(wrong, s, prefix="model/")
        half = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).bfloat16()
        with pytest.raises(ValueError, match="module expects bf16"):
            cs.load_into(half, s, prefix="model/")


def test_keyboard_interrupt_during_save_tears_nothing(store_dir):
    """SIGINT lands while the engine is committing (GIL released): the interrupt is taken
    after the commit returns, or before it started; either way the store reopens at a whole
    checkpoint that verifies."""
    code = """
        import signal, sys, torch, ckptstore as cs
        # A shell that starts jobs in the background hands them SIGINT ignored, and Python then
        # installs no KeyboardInterrupt handler: install it, so the test means the same anywhere.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        s = cs.Store(sys.argv[1])
        big = {"w": torch.randn(16, 1 << 20)}   # 64 MiB; later saves write one 4 MiB chunk
        step = 0
        print("ready", flush=True)
        try:
            while step < 300:  # bounded: an ignored signal must not fill the disk
                step += 1
                big["w"][0, 0] = step
                cs.save(s, big, step=step)
                print("saved", step, flush=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    """
    p = subprocess.Popen([sys.executable, "-c", __import__("textwrap").dedent(code),
                          str(store_dir)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    time.sleep(1.5)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=120)
    assert "interrupted" in out
    acked = [int(l.split()[1]) for l in out.splitlines() if l.startswith("saved")]
    with cs.Store(store_dir) as s:
        ls = s.list()
        if acked:
            assert ls[-1]["step"] >= acked[-1]
        for c in ls:
            s.verify(c["id"])
        if ls:
            assert cs.load(s)["w"][0, 0].item() == ls[-1]["step"]


def test_bad_options_and_arguments(store_dir):
    with pytest.raises(TypeError, match="unknown option"):
        cs.Store(store_dir, chunksize=1)
    with pytest.raises(ValueError, match="chunk_size"):
        cs.Store(store_dir, chunk_size=1)
    with pytest.raises(ValueError, match="recovery_mode"):
        cs.Store(store_dir, recovery_mode="yolo")
    with cs.Store(store_dir) as s:
        with pytest.raises(TypeError, match="state must be a dict"):
            cs.save(s, [torch.ones(1)], step=1)
        with pytest.raises(ValueError, match="framework"):
            cs.load(s, framework="jax")
    with cs.Store(store_dir, read_only=True) as ro:
        with pytest.raises(cs.ReadOnlyError):
            cs.save(ro, {"w": torch.ones(1)}, step=1)


def _crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_a_store_from_a_newer_build_is_refused_as_newer_not_corrupt(store_dir):
    # Issue 14, item 4: the WAL header declares an incompatible feature this build lacks
    # (docs/FORMAT.md, "Feature flags"): Store() says so, never "corrupt", never salvage.
    import struct
    with cs.Store(store_dir) as s:
        cs.save(s, {"w": torch.ones(3)}, step=1)
    number = struct.unpack_from("<Q", (store_dir / "CURRENT").read_bytes(), 12)[0]
    wal = store_dir / f"{number:08}.wal"
    b = bytearray(wal.read_bytes())
    struct.pack_into("<H", b, 8, 2)          # version 2: room for the incompatible bits
    struct.pack_into("<H", b, 26, 1 << 7)    # incompatible feature bit 7
    struct.pack_into("<I", b, 28, _crc32c(bytes(b[:28])))
    wal.write_bytes(bytes(b))
    for ro in (False, True):
        with pytest.raises(cs.StoreError,
                           match="written by a newer ckptstore: needs incompatible feature bit 7") as e:
            cs.Store(store_dir, read_only=ro)
        assert not isinstance(e.value, cs.CorruptionError)
        assert "salvage" not in str(e.value)
    assert bytes(b) == wal.read_bytes()
