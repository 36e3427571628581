"""benches/peers.py: every cold load starts after the same settle wait (equal memory for all
loaders), with no real save or load run here."""

import importlib.util
import os

import pytest

from conftest import REPO


def peers():
    spec = importlib.util.spec_from_file_location(
        "peers", os.path.join(REPO, "benches", "peers.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_settle_defaults_to_the_page_reporting_wait_and_refuses_negative():
    p = peers()
    assert p.parse_args([]).settle == p.SETTLE_S >= 3  # longer than page reporting's 2 s
    assert p.parse_args(["--settle", "0"]).settle == 0
    with pytest.raises(SystemExit):
        p.parse_args(["--settle", "-1"])


def test_every_load_waits_the_settle_time_after_the_cache_drop(tmp_path, monkeypatch):
    p = peers()
    events = []
    monkeypatch.setattr(p, "make_state", lambda size: {"model": {}})
    monkeypatch.setattr(p, "nbytes", lambda state: 1)
    monkeypatch.setattr(p, "drop_cache", lambda d: events.append("drop"))
    monkeypatch.setattr(p.time, "sleep", lambda s: events.append(("sleep", s)))

    def save(state, d, n, args):
        events.append("save")
        return {"durable": 1.0}

    def load(state, d, touched=False):
        events.append("load")
        return 1.0

    monkeypatch.setattr(p, "METHODS", ["fake", "fake_async"])
    monkeypatch.setattr(p, "SAVE", {"fake": save, "fake_async": save})
    monkeypatch.setattr(p, "LOAD", {"fake": load})
    args = p.parse_args(["--dir", str(tmp_path / "x"), "--rounds", "2", "--settle", "4.5"])
    r = p.run(args, 0.001)
    assert r["median"]["fake"]["load"] == 1.0 and r["median"]["fake"]["load_touched"] == 1.0
    loads = [i for i, e in enumerate(events) if e == "load"]
    assert len(loads) == 4  # two rounds, load and load+touch; the async method loads nothing
    for i in loads:
        assert events[i - 2:i] == ["drop", ("sleep", 4.5)], events
