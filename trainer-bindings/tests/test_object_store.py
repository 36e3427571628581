"""The bucket tier from Python, on a real S3 protocol server (moto_server on 127.0.0.1, started
for this module and stopped after; skipped without it unless CKPTSTORE_REQUIRE_MOTO=1):
``cs.Store("s3://bucket/prefix")`` saves and loads bit-exact, and a local store with
``replica=`` that loses its directory resumes from the newest replicated checkpoint."""

import shutil

import pytest
import torch
from conftest import make_bucket

import ckptstore as cs


def state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(300, 700, generator=g), "b": torch.randn(700, generator=g).half(),
            "step": torch.tensor(seed)}


def same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].view(-1).view(torch.uint8),
                                                 b[k].view(-1).view(torch.uint8)) for k in a)


def test_bucket_store_saves_and_loads_bit_exact(moto):
    url = make_bucket(moto, "py-store")
    with cs.Store(url) as s:
        cs.save(s, state(1), step=1)
        cs.save(s, state(2), step=2)
        assert s.replication() == {1: "replicated", 2: "replicated"}
    with cs.Store(url, read_only=True) as s:
        assert [c["step"] for c in s.list()] == [1, 2]
        assert same(cs.load(s, 1), state(1))
        assert same(cs.load(s), state(2))


def test_replica_restores_a_lost_directory(moto, tmp_path):
    url = make_bucket(moto, "py-replica")
    d = tmp_path / "local"
    with cs.Store(d, replica=url) as s:
        cs.save(s, state(3), step=3)
        cs.save(s, state(4), step=4)
        s.wait_replicated(timeout=60)
        assert s.replication() == {1: "replicated", 2: "replicated"}
    shutil.rmtree(d)
    with cs.Store(d, replica=url) as s:
        assert [c["step"] for c in s.list()] == [3, 4]
        # Restored lazily: the manifests now, the segments when a load first needs them.
        assert not list((d / "segments").glob("*.seg"))
        assert same(cs.load(s), state(4))
        assert list((d / "segments").glob("*.seg"))
        cs.save(s, state(5), step=5)
        s.wait_replicated(timeout=60)
        assert s.replication()[3] == "replicated"
    with pytest.raises(ValueError):
        with cs.Store(tmp_path / "x", replica=url) as s:
            s.wait_replicated(timeout=-1)


def test_missing_bucket_is_a_clear_error(moto, tmp_path):
    with pytest.raises(cs.StoreError, match="does the bucket exist"):
        cs.Store("s3://no-such-bucket-py/run")
    assert not (tmp_path / "never").exists()
    with pytest.raises(cs.StoreError):
        cs.Store(tmp_path / "never", replica="s3://no-such-bucket-py/run")
    assert not (tmp_path / "never").exists()


def test_a_second_opener_of_a_cache_gets_locked_error(moto):
    url = make_bucket(moto, "py-cache-lock")
    with cs.Store(url) as s:
        cs.save(s, state(6), step=6)
        with pytest.raises(cs.LockedError, match="one process per cache"):
            cs.Store(url, read_only=True)
    with cs.Store(url, read_only=True) as s:
        assert same(cs.load(s), state(6))
