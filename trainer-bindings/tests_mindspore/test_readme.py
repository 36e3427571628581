"""The README's "From MindSpore" example runs as written, with the one import changed, and
leaves the checkpoints it describes."""

import os
import re

import ckptstore

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_readme_mindspore_example_runs(tmp_path, monkeypatch, capsys):
    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme[readme.index("### From MindSpore"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "from ckptstore.mindspore import" in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.split()
    assert out[0] == "2" and "[]" in out[1]
    with ckptstore.Store(tmp_path / "ckpt_dir", read_only=True) as s:
        assert [c["metadata"]["name"] for c in s.list()] == [
            "checkpoint_lenet-1_8", "checkpoint_lenet-2_4", "checkpoint_lenet-2_8"]
