"""Progress of a load: a callback with (done, total) bytes, or logging lines at INFO."""

import logging

import numpy as np
import pytest

import ckptstore as cs


def test_a_progress_callback_sees_the_load_advance_to_its_total(store_dir):
    state = {f"w{i}": np.full(1 << 16, float(i)) for i in range(8)}
    with cs.Store(store_dir) as s:
        cs.save(s, state, step=1)
        calls = []
        back = cs.load(s, progress=lambda done, total: calls.append((done, total)))
    assert all(np.array_equal(back[k], v) for k, v in state.items())
    total = calls[-1][1]
    assert total >= 8 * (1 << 19) and calls[-1][0] == total
    dones = [d for d, _ in calls]
    assert len(calls) >= 8 and dones == sorted(dones) and dones[0] < total


def test_progress_true_without_tqdm_logs(store_dir, caplog, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_tqdm(name, *a, **kw):
        if name.startswith("tqdm"):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    cs.save(store_dir, {f"w{i}": np.ones(1 << 15) for i in range(4)}, step=1)
    with caplog.at_level(logging.INFO, logger="ckptstore"):
        cs.load(store_dir, progress=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "ckptstore"]
    assert any("100%" in m for m in lines), lines


def test_a_bad_progress_argument_is_a_type_error(store_dir):
    cs.save(store_dir, {"w": np.ones(3)}, step=1)
    with pytest.raises(TypeError, match="progress"):
        cs.load(store_dir, progress="yes")


def test_load_into_reports_progress(store_dir):
    torch = pytest.importorskip("torch")
    net = torch.nn.Linear(256, 128)
    cs.save(store_dir, net.state_dict(), step=1)
    calls = []
    cs.load_into(torch.nn.Linear(256, 128), store_dir,
                 progress=lambda d, t: calls.append((d, t)))
    assert len(calls) >= 2 and calls[-1][0] == calls[-1][1] > 256 * 128 * 4
