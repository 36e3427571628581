"""The Python examples of README.md (the quick start) and docs/PYTHON.md run as written."""

import tempfile

from conftest import doc_code


def run_example(relpath, heading, monkeypatch, tmp_path):
    code = doc_code(relpath, heading)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the example's mkdtemp lands here
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    env: dict = {}
    exec(compile(code, relpath, "exec"), env)
    return env


def test_readme_python_quick_start_runs(monkeypatch, tmp_path):
    env = run_example("README.md", "### Python", monkeypatch, tmp_path)
    assert env["state"]["epoch"] == 1
    assert set(env["state"]) == {"model", "optimizer", "epoch"}


def test_python_guide_example_runs(capsys, monkeypatch, tmp_path):
    run_example("docs/PYTHON.md", "## Install and use", monkeypatch, tmp_path)
    assert "model/weight" in capsys.readouterr().out
