"""The MindSpore examples of README.md (the quick start) and docs/PYTHON.md ("From MindSpore")
run as written, with the one import changed, and leave the checkpoints they describe."""

import os
import re

import ckptstore

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def doc_code(relpath: str, heading: str) -> str:
    text = open(os.path.join(REPO, relpath), encoding="utf-8").read()
    start = text.index("\n" + heading + "\n")
    code = re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)
    assert "from ckptstore.mindspore import" in code
    return code


def names(store_dir) -> list:
    with ckptstore.Store(store_dir, read_only=True) as s:
        return [c["metadata"]["name"] for c in s.list()]


def test_readme_mindspore_quick_start_runs(tmp_path, monkeypatch):
    code = doc_code("README.md", "### MindSpore")
    monkeypatch.chdir(tmp_path)
    env: dict = {}
    exec(compile(code, "README.md", "exec"), env)
    assert names(tmp_path / "ckpt_dir") == ["lenet-1_8", "lenet-2_4", "lenet-2_8"]


def test_python_guide_mindspore_example_runs(tmp_path, monkeypatch, capsys):
    code = doc_code("docs/PYTHON.md", "## From MindSpore: one import changed")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/PYTHON.md", "exec"), {})
    out = capsys.readouterr().out.split()
    assert out[0] == "2" and "[]" in out[1]
    assert names(tmp_path / "ckpt_dir") == [
        "checkpoint_lenet-1_8", "checkpoint_lenet-2_4", "checkpoint_lenet-2_8"]
