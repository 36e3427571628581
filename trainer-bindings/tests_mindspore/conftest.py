"""Tests of ckptstore.mindspore against the real MindSpore (2.10, CPU). They run in MindSpore's
own virtual environment (its dataset code needs numpy<2): `.ci/run` makes it and runs
`$VENV/bin/python -m pytest trainer-bindings/tests_mindspore`."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli() -> str | None:
    """The ckptstore CLI binary: $CKPTSTORE_BIN or the repository's cargo build."""
    import shutil
    for c in (os.environ.get("CKPTSTORE_BIN"), os.path.join(REPO, "target", "debug", "ckptstore"),
              os.path.join(REPO, "target", "release", "ckptstore"), shutil.which("ckptstore")):
        if c and os.access(c, os.X_OK):
            return c
    return None


@pytest.fixture
def ckpt_cli():
    c = cli()
    if c is None:
        if os.environ.get("CI"):
            pytest.fail("no ckptstore CLI binary (cargo build first, or set CKPTSTORE_BIN)")
        pytest.skip("no ckptstore CLI binary (cargo build first, or set CKPTSTORE_BIN)")
    return c
