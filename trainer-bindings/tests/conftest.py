import os
import subprocess
import sys
import textwrap

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
