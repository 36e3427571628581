"""The bucket tier from Python, on a real S3 protocol server (moto_server on 127.0.0.1, started
for this module and stopped after; skipped without it unless CKPTSTORE_REQUIRE_MOTO=1):
``cs.Store("s3://bucket/prefix")`` saves and loads bit-exact, and a local store with
``replica=`` that loses its directory resumes from the newest replicated checkpoint."""

import os
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest
import torch

import ckptstore as cs


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    exe = shutil.which("moto_server")
    if exe is None:
        if os.environ.get("CKPTSTORE_REQUIRE_MOTO") == "1":
            pytest.fail("CKPTSTORE_REQUIRE_MOTO=1 but moto_server is not on PATH")
        pytest.skip("moto_server not on PATH (pip install 'moto[server]')")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto_server did not start in 30 s"
                time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true",
               "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
               "AWS_REGION": "us-east-1",
               "CKPTSTORE_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        yield endpoint
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    finally:
        proc.kill()
        proc.wait(timeout=10)


def make_bucket(endpoint: str, name: str) -> str:
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{name}", method="PUT"),
                           timeout=10).read()
    return f"s3://{name}/run"


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
