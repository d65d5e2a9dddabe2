"""The README's kernel example runs as written on a CPU (the plain-torch path, as a new user
without a GPU or TRITON_INTERPRET runs it)."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.DOTALL)


def test_readme_kernel_example_runs_on_a_cpu():
    example = _python_blocks((REPO / "README.md").read_text(encoding="utf-8"))[0]
    assert "ts.linear_cross_entropy" in example and "cuda" not in example
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", example], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "torch"
