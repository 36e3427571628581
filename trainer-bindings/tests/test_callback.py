"""CheckpointConfig / ModelCheckpoint: MindSpore's triggers, precedence and retention (after
the commit), names, exception and SIGTERM saves, resuming."""

import json
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import ckptstore as cs

from conftest import cli as _cli  # noqa: E402


def test_config_precedence_and_validation():
    c = cs.CheckpointConfig(save_checkpoint_steps=10, save_checkpoint_seconds=30,
                            keep_checkpoint_max=3, keep_checkpoint_per_n_minutes=5)
    assert c.save_checkpoint_seconds is None  # steps win
    assert c.keep_checkpoint_per_n_minutes is None  # max wins
    c = cs.CheckpointConfig(save_checkpoint_steps=0, save_checkpoint_seconds=30,
                            keep_checkpoint_max=0, keep_checkpoint_per_n_minutes=5)
    assert c.save_checkpoint_seconds == 30 and c.keep_checkpoint_per_n_minutes == 5
    with pytest.raises(ValueError, match="nothing would ever be saved"):
        cs.CheckpointConfig(save_checkpoint_steps=0, save_checkpoint_seconds=0)
    with pytest.raises(ValueError, match="keep_checkpoint_max"):
        cs.CheckpointConfig(keep_checkpoint_max=0, keep_checkpoint_per_n_minutes=0)
    with pytest.raises(ValueError, match="non-negative"):
        cs.CheckpointConfig(save_checkpoint_steps=-1)
    with pytest.raises(ValueError, match="whole minutes"):
        cs.CheckpointConfig(keep_checkpoint_max=None, keep_checkpoint_per_n_minutes=1.5)
    with pytest.raises(ValueError, match="append_info"):
        cs.CheckpointConfig(append_info=["lr"])
    with pytest.raises(TypeError, match="append_info 'x'"):
        cs.CheckpointConfig(append_info=[{"x": [1]}])


@pytest.mark.parametrize("async_save", [False, True])
def test_step_trigger_retention_names_and_append_info(store_dir, async_save):
    cfg = cs.CheckpointConfig(save_checkpoint_steps=3, keep_checkpoint_max=2,
                              async_save=async_save,
                              append_info=["epoch_num", "step_num", {"lr": 0.5}])
    w = torch.zeros(4)
    with cs.ModelCheckpoint(prefix="lenet", directory=store_dir, config=cfg) as cb:
        for step in range(1, 11):
            w.fill_(step)
            saved = cb.step_end(step, step // 5, lambda: {"w": w, "step": step})
            assert saved == (step % 3 == 0)
            if not async_save and saved:
                assert len(cb.store.list()) == min(step // 3, 2)
    with cs.Store(store_dir) as s:
        ls = s.list()
        assert [c["step"] for c in ls] == [6, 9]
        assert [c["metadata"]["name"] for c in ls] == ["lenet-1_6", "lenet-1_9"]
        assert ls[-1]["metadata"]["epoch_num"] == 1 and ls[-1]["metadata"]["step_num"] == 9
        assert ls[-1]["metadata"]["lr"] == 0.5
        assert cs.load(s)["w"][0].item() == 9


class FakeClock:
    """``time.monotonic`` for ``ckptstore._callback``: moves only when the test says, so a
    seconds trigger does not depend on how fast this machine runs the steps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_seconds_trigger(store_dir, monkeypatch):
    """Regression (ciguard): with the real clock, a pause of 0.2 s between two steps (a loaded
    CI machine) would make step 1 or step 3 save too; the clock moves only where the test says."""
    import ckptstore._callback as callback
    clock = FakeClock()
    monkeypatch.setattr(callback, "time", clock)
    cfg = cs.CheckpointConfig(save_checkpoint_steps=None, save_checkpoint_seconds=0.25,
                              keep_checkpoint_max=100)
    with cs.ModelCheckpoint(prefix="p", directory=store_dir, config=cfg) as cb:
        clock.now += 0.125
        assert not cb.step_end(1, 0, {"x": torch.ones(1)})
        clock.now += 0.25
        assert cb.step_end(2, 0, {"x": torch.ones(1)})
        clock.now += 0.125  # counted from the end of the save at step 2
        assert not cb.step_end(3, 0, {"x": torch.ones(1)})
        clock.now += 0.25
        assert cb.step_end(4, 0, {"x": torch.ones(1)})
        assert [c["step"] for c in cb.store.list()] == [2, 4]


def test_exception_save_is_a_breakpoint_checkpoint(store_dir):
    cfg = cs.CheckpointConfig(save_checkpoint_steps=100, exception_save=True)
    w = torch.zeros(2)
    with pytest.raises(RuntimeError, match="boom"):
        with cs.ModelCheckpoint(prefix="net", directory=store_dir, config=cfg) as cb:
            for step in range(1, 8):
                w.fill_(step)
                cb.step_end(step, 2, lambda: {"w": w})
            raise RuntimeError("boom")
    with cs.Store(store_dir) as s:
        (c,) = s.list()
        assert c["metadata"]["name"] == "net-2_7_breakpoint" and c["metadata"]["breakpoint"] == 1
        assert cs.load(s)["w"].tolist() == [7.0, 7.0]


def test_sigterm_saves_a_breakpoint_then_exits(store_dir):
    code = """
        import sys, time, torch, ckptstore as cs
        cfg = cs.CheckpointConfig(save_checkpoint_steps=1000, exception_save=True)
        w = torch.zeros(3)
        with cs.ModelCheckpoint(prefix="run", directory=sys.argv[1], config=cfg) as cb:
            for step in range(1, 10**9):
                w.fill_(step)
                cb.step_end(step, 0, {"w": w})
                if step == 5:
                    print("ready", flush=True)
                time.sleep(0.001) if step >= 5 else None
                if step == 5:
                    time.sleep(30)
    """
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(store_dir)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 128 + signal.SIGTERM
    with cs.Store(store_dir) as s:
        (c,) = s.list()
        assert c["metadata"]["name"] == "run-0_5_breakpoint"
        assert cs.load(s)["w"].tolist() == [5.0] * 3


def test_resume_protects_the_checkpoint_resumed_from(store_dir):
    cfg = cs.CheckpointConfig(save_checkpoint_steps=1, keep_checkpoint_max=1)
    with cs.ModelCheckpoint(prefix="a", directory=store_dir, config=cfg) as cb:
        assert cb.resume() is None
        cb.step_end(1, 0, {"x": torch.ones(1), "step": 1})
    with cs.ModelCheckpoint(prefix="a", directory=store_dir, config=cfg) as cb:
        state = cb.resume()
        assert state["step"] == 1
        for step in (2, 3, 4):
            cb.step_end(step, 0, {"x": torch.ones(1), "step": step})
        assert [c["step"] for c in cb.store.list()] == [1, 4]


def test_per_n_minutes_retention_runs_after_each_commit(store_dir):
    cfg = cs.CheckpointConfig(save_checkpoint_steps=1, keep_checkpoint_max=0,
                              keep_checkpoint_per_n_minutes=60)
    with cs.ModelCheckpoint(prefix="m", directory=store_dir, config=cfg) as cb:
        for step in range(1, 5):
            cb.step_end(step, 0, {"x": torch.full((1,), float(step))})
            ls = cb.store.list()
            # one per 60-minute window, plus the newest: at most two (a window boundary may
            # fall between two saves), and the newest is always the one just committed
            assert len(ls) <= 2 and ls[-1]["step"] == step


@pytest.mark.skipif(_cli() is None, reason="ckptstore CLI not built (cargo build)")
def test_cli_ls_shows_mindspore_style_names(store_dir):
    cfg = cs.CheckpointConfig(save_checkpoint_steps=5, keep_checkpoint_max=10)
    with cs.ModelCheckpoint(prefix="lenet", directory=store_dir, config=cfg) as cb:
        for step in range(1, 11):
            cb.step_end(step, 1 + step // 10, {"w": torch.ones(2)})
    out = subprocess.run([_cli(), "ls", str(store_dir), "--json"], capture_output=True,
                         text=True, check=True).stdout
    names = [c["metadata"]["name"] for c in json.loads(out)]
    assert names == ["lenet-1_5", "lenet-2_10"]
    human = subprocess.run([_cli(), "ls", str(store_dir)], capture_output=True, text=True,
                           check=True).stdout
    assert 'name="lenet-2_10"' in human
