"""SIGKILL mid-training, resume from the latest checkpoint in a fresh process (MindSpore's own
resume code: load_checkpoint + load_param_into_net + model.train(initial_epoch=...)), and end
with the same parameters, optimizer state included, as an uninterrupted run, bit for bit."""

import os
import random
import signal
import subprocess
import sys

import numpy as np

import ckptstore

HERE = os.path.dirname(os.path.abspath(__file__))


def start(store_dir, npz, sleep=0.0, *extra):
    """run_train.py in a fresh interpreter; its stderr goes to NPZ.err."""
    env = dict(os.environ)  # the child runs in HERE: make a relative PYTHONPATH absolute
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p)
                                            for p in env["PYTHONPATH"].split(os.pathsep))
    err = open(f"{npz}.err", "a")
    return subprocess.Popen([sys.executable, os.path.join(HERE, "run_train.py"), str(store_dir),
                             str(npz), "--sleep", str(sleep), *extra], stdout=subprocess.PIPE,
                            stderr=err, text=True, cwd=HERE, env=env)


def errors(npz) -> str:
    with open(f"{npz}.err") as f:
        return "".join(line for line in f if "[WARNING]" not in line)[-4000:]


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    ref = start(tmp_path / "ref", tmp_path / "ref.npz")
    out = ref.communicate(timeout=300)[0]
    assert ref.returncode == 0 and out.rstrip().endswith("DONE"), errors(tmp_path / "ref.npz")

    rnd = random.Random(int.from_bytes(os.urandom(4), "little"))
    st = tmp_path / "killed"
    kills = []
    for _ in range(3):
        victim = start(st, tmp_path / "never.npz", sleep=0.03)
        kill_at = None
        for line in victim.stdout:
            if not line.startswith("STEP"):
                continue
            _, step, _, saved = line.split()
            if kill_at is None and int(saved) > 0:  # this process has committed a checkpoint
                kill_at = int(step) + rnd.randint(0, 5)
            if kill_at is not None and int(step) >= min(kill_at, 28):
                os.kill(victim.pid, signal.SIGKILL)
                kills.append(int(step))
                break
        victim.wait(timeout=300)
        if victim.returncode != -signal.SIGKILL:
            break  # it finished first
    assert kills, ("no run was killed", errors(tmp_path / "never.npz"))

    res = start(st, tmp_path / "resumed.npz")
    out = res.communicate(timeout=300)[0]
    assert res.returncode == 0 and "RESUME" in out, (out, errors(tmp_path / "resumed.npz"))
    a, b = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "resumed.npz")
    assert sorted(a.files) == sorted(b.files) and "moments.fc1.weight" in a.files
    for k in a.files:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), (k, kills)

    # the store: whole checkpoints only, steps counting on across resumes, the last at the end
    with ckptstore.Store(st, read_only=True) as s:
        live = s.list()
        for c in live:
            s.verify(c["id"])
        steps = [c["step"] for c in live]
        assert steps == sorted(steps) and steps[-1] == 30, (steps, kills)
        assert live[-1]["metadata"]["name"] == "train-5_6"


def test_sigterm_with_exception_save_commits_the_step_then_dies_of_it(tmp_path):
    """A preempted node's SIGTERM: the step running finishes, a _breakpoint checkpoint of it is
    committed, and the process still ends by SIGTERM."""
    st = tmp_path / "term"
    victim = start(st, tmp_path / "never.npz", 0.05, "--exception-save")
    printed = []
    for line in victim.stdout:
        if line.startswith("STEP"):
            printed.append(int(line.split()[1]))
            if len(printed) == 9:  # past the first checkpoint (step 6), mid-epoch 2
                os.kill(victim.pid, signal.SIGTERM)
    victim.wait(timeout=300)
    assert victim.returncode == -signal.SIGTERM, errors(tmp_path / "never.npz")
    with ckptstore.Store(st, read_only=True) as s:
        live = s.list()
        for c in live:
            s.verify(c["id"])
        bp = live[-1]
        assert bp["metadata"]["name"].endswith("_breakpoint"), [c["metadata"] for c in live]
        # the step after the last one reported: it ran to its end, then was saved
        assert bp["step"] == printed[-1] + 1
        assert live[-2]["metadata"]["name"] == "train-1_6"
    from ckptstore.mindspore import load_checkpoint
    d = load_checkpoint(str(st / bp["metadata"]["name"]))
    assert int(d["global_step"].asnumpy()[0]) == bp["step"]  # the optimizer's own count agrees
