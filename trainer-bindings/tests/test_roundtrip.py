"""save/load round trips: nested state dicts, every dtype, zero-copy numpy loads, slices."""

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch

import ckptstore as cs

TORCH_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16,
                torch.float8_e4m3fn, torch.float8_e5m2, torch.int64, torch.int32,
                torch.int16, torch.int8, torch.uint8, torch.bool]


def _rand(dtype, shape, g):
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g,
                         dtype=torch.int64).to(dtype)


def _bits(t):
    return t.contiguous().view(-1).view(torch.uint8) if t.numel() else t


def test_every_torch_dtype_round_trips_bit_exact(store_dir):
    g = torch.Generator().manual_seed(1)
    state = {f"t_{str(d).split('.')[1]}": _rand(d, (3, 5), g) for d in TORCH_DTYPES}
    state["scalar"] = torch.tensor(2.5, dtype=torch.bfloat16)
    state["empty"] = torch.zeros(0, 4)
    with cs.Store(store_dir) as s:
        cs.save(s, state, step=7)
        back = cs.load(s)
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert torch.equal(_bits(back[k]), _bits(v)), k


def test_nested_state_with_optimizer_and_plain_values(store_dir):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3)
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": torch.get_rng_state(),
        "np_rng": np.random.default_rng(3).bit_generator.state,
        "values": [None, True, 1 << 70, -3, 0.1, math.inf, math.nan, "text", b"\x00\xff",
                   (1, (2, "x")), {1: "int key", 2.5: "float key", ("a", 1): "tuple key"}],
        "np_scalar": np.float32(1.25),
        "big_bytes": bytes(range(256)) * 1000,
        "ordered": OrderedDict([("b", 1), ("a", 2)]),
    }
    with cs.Store(store_dir) as s:
        cs.save(s, state, step=1, epoch=2, metadata={"lr": 1e-3, "tag": "x"})
        back = cs.load(s)
        info = s.list()[0]
    assert info["step"] == 1 and info["epoch"] == 2 and info["metadata"] == {"lr": 1e-3, "tag": "x"}
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v)
    o, ob = state["optimizer"], back["optimizer"]
    assert ob["param_groups"] == o["param_groups"]
    for pid, st in o["state"].items():
        for k, v in st.items():
            assert torch.equal(ob["state"][pid][k], v), (pid, k)
    assert back["scheduler"] == state["scheduler"]
    assert torch.equal(back["rng"], state["rng"])
    assert back["np_rng"] == state["np_rng"]
    vals = back["values"]
    assert vals[:6] == state["values"][:6] and math.isnan(vals[6])
    assert vals[7:] == state["values"][7:]
    assert back["np_scalar"] == state["np_scalar"] and back["np_scalar"].dtype == np.float32
    assert back["big_bytes"] == state["big_bytes"]
    assert list(back["ordered"]) == ["b", "a"]
    # The restored optimizer works: its tensors are ordinary writable tensors.
    opt2 = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    model(torch.randn(3, 4)).sum().backward()
    opt2.step()


def test_flat_state_dict_keeps_its_names_and_numpy_loads_are_zero_copy_read_only(store_dir):
    w = np.arange(1 << 20, dtype=np.float32).reshape(1024, 1024)
    with cs.Store(store_dir) as s:
        cs.save(s, {"fc.weight": w, "fc.bias": np.ones(3, np.int16)}, step=5)
        with s.open(step=5, framework="numpy") as ck:
            assert ck.keys() == ["fc.weight", "fc.bias"]
            a = ck.get_tensor("fc.weight")
            assert np.array_equal(a, w) and a.dtype == np.float32
            assert not a.flags.writeable
            with pytest.raises(ValueError):
                a[0, 0] = 1
            mb = s._native.tensor(ck.id, "fc.weight")
            assert mb.zero_copy  # served from the segment's map, not copied
            sl = ck.get_slice("fc.weight")
            assert sl.shape == (1024, 1024) and sl.dtype == "f32"
            assert np.array_equal(sl[10:12, ::100], w[10:12, ::100])
            t = ck.get_tensor("fc.bias", framework="torch")
            assert t.dtype == torch.int16 and t.tolist() == [1, 1, 1]
            t += 1  # torch loads are copies: writable


def test_zero_dim_arrays_and_tensors_keep_their_shape(store_dir):
    state = {"lr": np.array(0.5, np.float32), "n": np.array(7), "t": torch.tensor(2.5),
             "v": np.ones(1, np.float32)}
    cs.save(store_dir, state, step=1)
    out = cs.load(store_dir)
    for k, v in state.items():
        assert tuple(out[k].shape) == tuple(v.shape), k
    assert out["lr"].item() == 0.5 and out["n"].item() == 7 and out["t"].item() == 2.5


def test_bf16_slices_and_numpy_refusal(store_dir):
    w = torch.randn(8, 16).bfloat16()
    with cs.Store(store_dir) as s:
        cs.save(s, {"w": w}, step=1)
        with s.open() as ck:
            assert torch.equal(ck.get_slice("w")[2:5, 3], w[2:5, 3])
            try:
                import ml_dtypes  # noqa: F401
            except ImportError:
                with pytest.raises(TypeError, match="numpy has no bf16"):
                    ck.get_tensor("w", framework="numpy")
        with pytest.raises(ValueError, match="device"):
            cs.load(s, framework="numpy", device="cuda")


def test_non_contiguous_tensors_are_stored_as_their_values(store_dir):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {"t": base.t(), "strided": base[:, ::2], "np_t": base.numpy().T}
    with cs.Store(store_dir) as s:
        cs.save(s, state, step=1)
        back = cs.load(s)
    assert torch.equal(back["t"], base.t())
    assert torch.equal(back["strided"], base[:, ::2])
    assert isinstance(back["np_t"], np.ndarray)  # as saved
    assert np.array_equal(back["np_t"], base.numpy().T)


def test_prefix_filter_and_strict_selection(store_dir):
    state = {"model": {"a.w": torch.ones(2), "b.w": torch.zeros(2)}, "opt": {"m": torch.ones(1)}}
    with cs.Store(store_dir) as s:
        cs.save(s, state, step=1)
        assert sorted(cs.load(s, prefix="model/")) == ["model/a.w", "model/b.w"]
        assert sorted(cs.load(s, prefix="model/", filter="model/b")) == ["model/a.w"]
        assert sorted(cs.load(s, filter=lambda n: n.endswith(".w"))) == ["model/a.w", "model/b.w"]
        with pytest.raises(cs.NotFoundError, match="nope"):
            cs.load(s, prefix=["model/", "nope"])
        assert sorted(cs.load(s, prefix=["model/", "nope"], strict=False)) == ["model/a.w",
                                                                              "model/b.w"]
        with pytest.raises(cs.NotFoundError):
            cs.load(s, step=99)


def test_load_by_step_id_and_latest(store_dir):
    with cs.Store(store_dir) as s:
        for step in (10, 20, 30):
            cs.save(s, {"x": torch.full((2,), float(step))}, step=step)
        assert cs.load(s)["x"][0].item() == 30
        assert cs.load(s, step=20)["x"][0].item() == 20
        assert cs.load(s, id=1)["x"][0].item() == 10
        assert cs.load(s, framework="numpy")["x"].dtype == np.float32
        with s.open() as ck:
            assert ck.step == 30


def test_path_instead_of_store_opens_and_closes(store_dir):
    cs.save(store_dir, {"x": np.ones(2)}, step=1)
    assert cs.load(store_dir, framework="numpy")["x"].tolist() == [1.0, 1.0]
    with cs.Store(store_dir) as s:  # the lock was released
        assert len(s.list()) == 1
        # loading by path while a writer holds the store: a read-only open, no lock error
        assert cs.load(store_dir, framework="numpy")["x"].tolist() == [1.0, 1.0]
        net = torch.nn.Linear(1, 2, bias=False)
        with pytest.raises(cs.StrictLoadError):
            cs.load_into(net, store_dir)


def test_store_management_delete_pin_retention(store_dir):
    with cs.Store(store_dir) as s:
        for step in range(1, 6):
            loss = {1: 0.1, 2: 0.9, 3: 0.2, 4: 0.3, 5: 0.4}[step]
            cs.save(s, {"x": torch.ones(1)}, step=step, metadata={"loss": loss})
        assert s.pin(1) is True
        with pytest.raises(cs.PinnedError):
            s.delete(1)
        plan = s.apply_retention(keep_last=1, keep_best=(1, "loss", "max"), dry_run=True)
        assert plan == [3, 4]  # 1 pinned, 2 best (highest loss), 5 newest
        assert [c["id"] for c in s.list()] == [1, 2, 3, 4, 5]
        assert s.apply_retention(keep_last=1, keep_best=(1, "loss", "max")) == [3, 4]
        assert s.delete(2) >= 0
        assert [c["id"] for c in s.list()] == [1, 5]
        with pytest.raises(ValueError, match="mode"):
            s.apply_retention(keep_best=(1, "loss", "up"))
        with pytest.raises(cs.NotFoundError):
            s.delete(42)
    with cs.Store(store_dir, read_only=True) as ro:
        assert [(c["id"], c["pinned"]) for c in ro.list()] == [(1, True), (5, False)]


def test_dtypes_the_engine_lacks_travel_as_bytes(store_dir):
    """numpy's legacy RNG state (a uint32 array), unsigned and complex tensors: stored as
    their bytes with the dtype in the tree, back bit-exact."""
    np.random.seed(5)
    state = {
        "np_rng": np.random.get_state(),
        "u16": torch.arange(6, dtype=torch.int32).to(torch.uint16).reshape(2, 3),
        "u64": np.array([1 << 63, 7], dtype=np.uint64),
        "c64": torch.randn(3, dtype=torch.complex64),
        "c128": np.array([1 + 2j, -3.5j]),
        "empty_u32": np.zeros((0, 3), dtype=np.uint32),
    }
    with cs.Store(store_dir) as s:
        cs.save(s, state, step=1)
        back = cs.load(s)
        np.random.set_state(back["np_rng"])  # accepted as is
        assert np.random.randint(1 << 30) == (np.random.seed(5), np.random.randint(1 << 30))[1]
        assert back["np_rng"][1].dtype == np.uint32 and not back["np_rng"][1].flags.writeable
        assert back["u16"].dtype == torch.uint16 and torch.equal(back["u16"].int(),
                                                                  state["u16"].int())
        assert back["u64"].dtype == np.uint64 and back["u64"].tolist() == [1 << 63, 7]
        assert torch.equal(back["c64"], state["c64"])
        assert np.array_equal(back["c128"], state["c128"])
        assert back["empty_u32"].shape == (0, 3)
        as_np = cs.load(s, framework="numpy")
        assert as_np["c64"].dtype == np.complex64
        assert np.array_equal(as_np["c64"], state["c64"].numpy())
        as_torch = cs.load(s, framework="torch")
        assert as_torch["u64"].dtype == torch.uint64
        assert as_torch["c128"].dtype == torch.complex128
        with s.open() as ck:  # stored as u8 tensors of their bytes
            assert ck.get_slice("c64").dtype == "u8"


def test_large_torch_tensors_are_read_straight_into_new_tensors(store_dir):
    # Several 4 MiB chunks each: the engine reads them on every core into the new tensor
    # (read_into); a damaged middle chunk fails the verified load and names the tensor.
    g = torch.Generator().manual_seed(13)
    state = {"w": torch.randn(3 << 20, generator=g).to(torch.bfloat16).reshape(3, 1 << 20),
             "m": torch.randn(9 << 18, generator=g)}
    with cs.Store(store_dir) as s:
        cs.save(s, state, step=1)
    with cs.Store(store_dir, read_only=True) as s:
        back = cs.load(s)
    for k, t in state.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    back["w"].add_(1)  # a fresh, writable tensor, not a view of the store
    seg = sorted((store_dir / "segments").iterdir())[-1]
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0x10
    seg.write_bytes(bytes(data))
    with cs.Store(store_dir, read_only=True) as s:
        with pytest.raises(cs.CorruptionError, match="BLAKE3"):
            cs.load(s, step=1)
        assert cs.load(s, step=1, verify=False)["w"].shape == (3, 1 << 20)
