"""Without a GPU (this file runs everywhere; test_cuda.py needs one): the wheel carries the
engine's CUDA support, finds no driver, says so once through `logging`, and CUDA saves would
take torch's host path."""

import logging

import pytest

import ckptstore as cs
from ckptstore import _cuda


@pytest.fixture
def fresh_staging_answer(monkeypatch):
    monkeypatch.setattr(_cuda, "_staging", None)


def test_the_wheel_has_cuda_support_and_says_why_it_cannot_stage(fresh_staging_answer, caplog):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: test_cuda.py covers the staged path")
    ok, why = cs._native.cuda_staging()
    # built with the cargo feature `cuda` (pyproject.toml): the reason is the missing driver,
    # not a build without CUDA
    assert not ok and "driver" in why, why
    with caplog.at_level(logging.INFO, logger="ckptstore"):
        assert _cuda.staging_available() is False
        assert _cuda.staging_available() is False
    said = [r for r in caplog.records if r.name == "ckptstore"]
    assert len(said) == 1 and "copied to host memory by torch" in said[0].getMessage(), said


def test_device_helpers_on_a_cpu_machine():
    assert _cuda.is_cuda("cuda:1") and not _cuda.is_cuda("cpu")
