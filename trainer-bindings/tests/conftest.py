import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest


@pytest.fixture
def store_dir(tmp_path):
    return tmp_path / "ckpts"


def run_py(code: str, *args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter (the installed ckptstore)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, **kw)


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli() -> str | None:
    """The ckptstore CLI binary: $CKPTSTORE_BIN, the repository's cargo build, or on PATH."""
    import shutil
    for c in (os.environ.get("CKPTSTORE_BIN"), os.path.join(REPO, "target", "debug", "ckptstore"),
              os.path.join(REPO, "target", "release", "ckptstore"), shutil.which("ckptstore")):
        if c and os.access(c, os.X_OK):
            return c
    return None


def doc_code(relpath: str, heading: str) -> str:
    """The first ```python block under the heading line ``heading`` (exact) of the repository's
    Markdown file ``relpath``; skips the test outside a checkout."""
    import re
    path = os.path.join(REPO, relpath)
    if not os.path.exists(path):
        pytest.skip("not run from a checkout")
    text = open(path, encoding="utf-8").read()
    start = text.index("\n" + heading + "\n")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


# A real S3 protocol server for the bucket-store tests (test_object_store.py, test_dcp.py):
# moto_server on 127.0.0.1, started once per test module that asks for it and stopped after;
# skipped without it unless CKPTSTORE_REQUIRE_MOTO=1 (CI), where it fails instead.
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
    # Its output goes to a log, quoted if it does not start (a fresh machine may lack a part).
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                why = log_path.read_text(errors="replace")
                assert proc.poll() is None, f"moto_server exited ({proc.returncode}):\n{why}"
                assert time.monotonic() < deadline, f"moto_server did not start in 30 s:\n{why}"
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
