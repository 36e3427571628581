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
