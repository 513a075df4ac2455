"""The README's Python example runs as written, and its commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_python_example_runs():
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["out"].attn_probs.shape[0] == 1
    assert 0 <= scope["scan"].best_layer < scope["cfg"].num_layers


def test_readme_commands_match_ci():
    text = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -e . && python -m bin.layer_scan" in text
    test_cmd = 'pip install -e ".[test]" && python -m pytest -q'
    assert test_cmd in text
    assert 'pip install -e ".[test]" && lint-imports && python -m pytest -q' in ci
