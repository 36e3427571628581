"""One store per process: every Store(d) of a directory shares one open engine store and its
writer lock; the last handle (closed or freed, no garbage collector needed) releases it; a
Locked error never names this process as "another writer"."""

import gc
import os
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest

import ckptstore as cs
from ckptstore import _store
from conftest import run_py

CAN_LOCK = """
import sys, ckptstore as cs
try:
    cs.Store(sys.argv[1]).close()
    print("OPENED")
except cs.LockedError as e:
    print("LOCKED", e)
"""


def _other_process_can_write(d) -> bool:
    r = run_py(CAN_LOCK, str(d))
    assert "OPENED" in r.stdout or "LOCKED" in r.stdout, r.stderr
    return "OPENED" in r.stdout


@pytest.fixture
def no_gc():
    """The garbage collector off: only reference counting frees handles, so a reference cycle
    that keeps a store open shows."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_two_stores_on_one_directory_both_save(store_dir):
    a = cs.Store(store_dir)
    b = cs.Store(store_dir)
    cs.save(a, {"w": np.full(10, 1.0)}, step=1)
    cs.save(b, {"w": np.full(10, 2.0)}, step=2)
    h = cs.save_async(a, {"w": np.full(10, 3.0)}, step=3)
    cs.save(b, {"w": np.full(10, 3.5)}, step=4)  # commits after a's queued save
    h.wait()
    assert [c["step"] for c in b.list()] == [1, 2, 3, 4]
    # A load by path between saves (read-only, no lock) and a third handle: all fine.
    assert cs.load(store_dir)["w"][0] == 3.5
    with cs.Store(store_dir) as c:
        cs.save(c, {"w": np.full(10, 4.0)}, step=5)
    # A handle closed: the store stays open for the others, and the closed one says so.
    a.close()
    assert a.closed and not b.closed
    with pytest.raises(cs.StoreError, match="closed"):
        a.list()
    cs.save(b, {"w": np.full(10, 5.0)}, step=6)
    assert not _other_process_can_write(store_dir)
    b.close()
    assert _other_process_can_write(store_dir)
    assert [c["step"] for c in cs.Store(store_dir, read_only=True).list()] == [1, 2, 3, 4, 5, 6]


def test_a_second_handle_must_ask_for_the_same_options(store_dir):
    with cs.Store(store_dir, chunk_size=1 << 16) as s:
        with pytest.raises(ValueError, match="same ones"):
            cs.Store(store_dir, chunk_size=1 << 20)
        cs.save(s, {"w": np.ones(3)}, step=1)
        # read-only handles are private (they take no lock) and coexist
        with cs.Store(store_dir, read_only=True) as r:
            assert [c["step"] for c in r.list()] == [1]


def test_handles_of_one_directory_through_other_paths_share(store_dir, tmp_path):
    os.makedirs(store_dir)
    link = tmp_path / "link"
    os.symlink(store_dir, link)
    with cs.Store(store_dir) as a, cs.Store(link) as b, cs.Store(f"{store_dir}/.") as c:
        for i, s in enumerate((a, b, c)):
            cs.save(s, {"w": np.full(3, float(i))}, step=i)
    assert os.path.realpath(store_dir) not in _store._OPEN


def test_save_and_load_leave_no_garbage(store_dir, no_gc):
    """Regression: the tree codec's recursive closures referred to themselves, cycles that
    held the saved state and (on load) the store with its writer lock until gc ran."""
    import torch
    gc.collect()
    store = cs.Store(store_dir)
    state = {"model": {"w": torch.ones(4), "b": np.zeros(2)}, "opt": [1, 2.5, (3, "x")]}
    cs.save(store, state, step=1)
    back = cs.load(store)
    assert back["opt"] == [1, 2.5, (3, "x")]
    del store, back
    assert os.path.realpath(store_dir) not in _store._OPEN
    assert gc.collect() == 0


def _damage_newest(store_dir) -> None:
    newest = sorted((store_dir / "segments").iterdir())[-1]
    data = bytearray(newest.read_bytes())
    # Inside the last tensor's payload: before the commit trailer that ends the segment
    # (docs/FORMAT.md), if there is one.
    end = data.rfind(b"CKPTTRL\0")
    data[(end if end >= 0 else len(data)) - 100] ^= 0xFF
    newest.write_bytes(bytes(data))


def test_del_after_a_load_past_damage_releases_the_lock_without_gc(store_dir, no_gc):
    """Regression: load() walking back past a damaged checkpoint kept the error, whose
    traceback held load()'s frame, which held the error: a cycle that kept the store and its
    writer lock alive after `del store` until gc.collect() ran."""
    with cs.Store(store_dir) as s:
        cs.save(s, {"w": np.full(1000, 1.0)}, step=1)
        cs.save(s, {"w": np.full(1000, 2.0)}, step=2)
    _damage_newest(store_dir)
    store = cs.Store(store_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cs.load(store)["w"][0] == 1.0
    del store
    assert os.path.realpath(store_dir) not in _store._OPEN
    assert _other_process_can_write(store_dir)


CHILD_WRITER = """
import sys, numpy as np, ckptstore as cs
s = cs.Store(sys.argv[1])
step = 1000 * int(sys.argv[2])
while True:
    step += 1
    cs.save(s, {"w": np.full(1 << 16, float(step))}, step=step)
    print("saved", step, flush=True)
"""


def test_kill_a_child_writer_and_reopen_in_a_loop_never_locks(store_dir, no_gc):
    """The loop of the report: a child writer killed mid-save, then this process opens the
    store, loads, saves and drops it; the next child must get the lock again."""
    for round_ in range(1, 4):
        child = subprocess.Popen([sys.executable, "-c", CHILD_WRITER, str(store_dir),
                                  str(round_)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        try:
            line = child.stdout.readline()
            assert line.startswith("saved"), (line, child.stderr.read() if child.poll() else "")
            line = child.stdout.readline()  # at least two: the kill lands mid-save
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
            child.stdout.close()
            child.stderr.close()
        store = cs.Store(store_dir)
        state = cs.load(store)
        assert state["w"][0] >= 1000 * round_
        cs.save(store, {"w": np.full(16, -1.0)}, step=1000 * round_ + 999)
        del store, state


def test_a_forked_child_does_not_keep_the_parents_lock(store_dir):
    """Regression: a child forked while the store was open inherited its locked LOCK file;
    once the parent closed its store it could not reopen it, and the error named the parent's
    own pid as "another writer"."""
    s = cs.Store(store_dir)
    cs.save(s, {"w": np.ones(4)}, step=1)
    r, w = os.pipe()
    ready_r, ready_w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads running
        pid = os.fork()
    if pid == 0:  # the child (past its at-fork handlers): waits for the parent, then leaves
        os.close(w)
        os.write(ready_w, b"r")
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"r"
        s.close()
        with cs.Store(store_dir) as again:  # the child (still alive) holds no lock
            cs.save(again, {"w": np.ones(4)}, step=2)
    finally:
        os.write(w, b"x")
        os.close(w)
        os.close(ready_r)
        os.waitpid(pid, 0)


def test_the_locked_error_never_names_this_process_as_another_writer(store_dir):
    coord = cs._native.DcpCoordinator(os.fspath(store_dir))  # a writer that does not share
    try:
        with pytest.raises(cs.LockedError) as ei:
            cs.Store(store_dir)
        msg = str(ei.value)
        assert f"in this same process (pid {os.getpid()})" in msg and "stop" not in msg
    finally:
        coord.close()
    with cs.Store(store_dir) as s:
        # another process's error names this one
        r = run_py(CAN_LOCK, str(store_dir))
        assert "LOCKED" in r.stdout and f"(pid {os.getpid()})" in r.stdout, \
            (r.stdout, r.stderr)
        assert s.list() == []
