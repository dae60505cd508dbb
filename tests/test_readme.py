"""Every Python block of the README runs as written (each in a fresh interpreter, from an empty directory)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_block_runs(i, tmp_path):
    code = BLOCKS[i]
    if "pllm_kernels.hf" in code or "pllm_kernels.testing" in code:
        pytest.importorskip("transformers")
        pytest.importorskip("peft")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"README block {i} failed:\n{code}\n--- stderr ---\n{r.stderr[-3000:]}"


def test_readme_setup_commands():
    """Exactly two set-up commands: the demo and the test command CI runs (after the test-command marker)."""
    text = README.read_text()
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    cmds = re.findall(r"^```bash\n(.*?)^```", setup, flags=re.S | re.M)
    assert len(cmds) == 2
    assert "pllm_kernels.testing.demo" in cmds[0] and "pytest" in cmds[1]
    assert "<!-- test-command -->\n```bash\n" + cmds[1] in text
