"""The README's Python example runs as written."""

import os
import re

import pytest

from conftest import REPO


def test_readme_python_example_runs(capsys, monkeypatch, tmp_path):
    readme = os.path.join(REPO, "README.md")
    if not os.path.exists(readme):
        pytest.skip("not run from a checkout")
    text = open(readme, encoding="utf-8").read()
    section = text[text.index("## Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the example's mkdtemp lands here
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    exec(compile(code, "README.md", "exec"), {})
    assert "model/weight" in capsys.readouterr().out
