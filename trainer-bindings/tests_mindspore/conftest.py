"""Tests of ckptstore.mindspore against the real MindSpore (2.10, CPU). They run in MindSpore's
own virtual environment (its dataset code needs numpy<2): `.ci/run` makes it and runs
`$VENV/bin/python -m pytest trainer-bindings/tests_mindspore`."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_bindings_conftest():
    """trainer-bindings/tests/conftest.py (its cli() finds the ckptstore binary), loaded under
    another name: this file is `conftest` here."""
    import importlib.util
    path = os.path.join(REPO, "trainer-bindings", "tests", "conftest.py")
    spec = importlib.util.spec_from_file_location("ckptstore_bindings_conftest", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cli = _load_bindings_conftest().cli


@pytest.fixture
def ckpt_cli():
    c = cli()
    if c is None:
        if os.environ.get("CI"):
            pytest.fail("no ckptstore CLI binary (cargo build first, or set CKPTSTORE_BIN)")
        pytest.skip("no ckptstore CLI binary (cargo build first, or set CKPTSTORE_BIN)")
    return c
