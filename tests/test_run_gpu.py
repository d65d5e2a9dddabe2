"""benchmarks/run_gpu.sh --dry-run: the GPU machine's one-call script, end to end on this CPU
through Triton's interpreter on tiny shapes, so a lent GPU's minutes never go to a typo."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # every step of the GPU script under the interpreter: ~30 s on 2 cores
def test_dry_run_writes_every_step_and_the_summary(tmp_path):
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "run_gpu.sh"), "--dry-run", str(tmp_path)],
        cwd=ROOT,
        env=dict(os.environ, TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = (tmp_path / "summary.md").read_text()
    assert result.returncode == 0, summary + result.stdout[-2000:] + result.stderr[-2000:]
    for step in ("tests", "kernels", "tune"):
        assert f"| {step} | 0 |" in summary, summary
        assert (tmp_path / f"{step}.log").exists()
    assert "passed" in summary
    assert list(tmp_path.glob("kernels-smoke_*.csv")) and list(tmp_path.glob("tiles-smoke_*.json"))
