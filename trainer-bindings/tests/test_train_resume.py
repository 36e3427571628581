"""examples/train_resume.py killed with SIGKILL at random points, restarted each time, ends
with the same weights and optimizer state as an uninterrupted run, bit for bit."""

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckptstore as cs

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_resume.py"
STEPS = 120


def _run(store: Path, *extra: str, kill_after_step: int | None = None,
         kill_after_line: str | None = None) -> tuple[bool, str]:
    """Runs the example; SIGKILLs it once it printed ``step N`` (N = kill_after_step).
    Returns (finished, output)."""
    p = subprocess.Popen([sys.executable, str(EXAMPLE), "--dir", str(store), "--steps",
                          str(STEPS), "--save-every", "7", *extra], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    out = []
    for line in p.stdout:
        out.append(line)
        if kill_after_step is not None and line.startswith(f"step {kill_after_step} "):
            p.send_signal(signal.SIGKILL)
            break
    p.stdout.close()
    rc = p.wait(timeout=300)
    text = "".join(out)
    if kill_after_step is None:
        assert rc == 0, text
    return rc == 0 and "done" in text, text


def _final(store: Path) -> dict:
    with cs.Store(store, read_only=True) as s:
        assert s.latest()["step"] == STEPS
        return cs.load(s)


def _assert_bit_equal(a, b, path="state"):
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            _assert_bit_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bit_equal(x, y, f"{path}/{i}")
    else:
        assert a == b, path


@pytest.mark.parametrize("async_save", [False, True])
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path, async_save):
    extra = ["--async-save"] if async_save else []
    ref = tmp_path / "ref"
    done, _ = _run(ref, *extra)
    assert done
    reference = _final(ref)

    rng = random.Random(int(os.environ.get("CKPT_SEED", "7")) + async_save)
    store = tmp_path / "killed"
    kills, resumed = 0, 0
    last = 0
    while True:
        # Strike somewhere in the next stretch of steps: mid-step, just after a save, ...
        target = last + rng.randint(3, 15)  # 5 kills stay below STEPS
        finished, out = _run(store, *extra, kill_after_step=target if kills < 5 else None)
        resumed += "resumed at step" in out
        if finished:
            break
        kills += 1
        steps = [int(l.split()[1]) for l in out.splitlines() if l.startswith("step ")]
        last = steps[-1] if steps else last
    assert kills == 5 and resumed >= 4
    _assert_bit_equal(_final(store), reference)
