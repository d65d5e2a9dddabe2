"""The launch-table sweep (benchmarks/tune.py) end to end on a CPU, so that it cannot rot
before a GPU runs it: ``--smoke`` through Triton's interpreter (tiny rows, 2 candidates a rule,
one compile worker process), and its refusal to time anything on a CPU without ``--smoke``.
Both run in subprocesses from the repository root (``benchmarks`` is not installed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import tune

REPO = Path(__file__).resolve().parent.parent


def _tune(*args: str, interpret: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    command = [sys.executable, "-m", "benchmarks.tune", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # the sweep's pipeline end to end: ~10 s on 2 cores
def test_smoke_sweep_writes_tables_timings_and_a_snippet(tmp_path):
    done = _tune("--smoke", "--out", str(tmp_path), interpret=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (json_path,) = tmp_path.glob("tiles-smoke_*.json")
    (md_path,) = tmp_path.glob("tiles-smoke_*.md")
    report = json.loads(json_path.read_text())
    assert report["smoke"] and report["complete"]
    assert report["precompiled"] > 0  # the compile worker answered
    assert set(report["tables"]) == set(tune.TABLES)
    for name, tables in report["tables"].items():
        assert set(tables) == {"2", "4"}, name
        for entry in tables.values():
            assert len(entry["rules"]) == len(entry["current_rules"])
            assert all(len(rule) == 5 for rule in entry["rules"])
            measured = [r for r in entry["per_rule"] if r["status"] == "measured"]
            assert len(measured) == 2, (name, entry["per_rule"])  # lengths 16 and 64
            for rule in measured:
                for length in rule["lengths"]:
                    assert [c["status"] for c in length["candidates"]] == ["ok", "ok"]
                    assert 0 < length["best_ms"] <= length["current_ms"]
    md = md_path.read_text()
    assert "speed-up" in md and "human step" in md and "TileRule(" in md
    assert 'LAUNCHES["softmax.forward"]' in done.stdout and "TABLE: TileTable = {" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
@pytest.mark.parametrize("interpret", [False, True])
def test_refuses_without_cuda_unless_smoke(tmp_path, interpret):
    done = _tune("--out", str(tmp_path), interpret=interpret)
    assert done.returncode == tune.NO_GPU_EXIT
    assert "no CUDA device" in done.stderr
    assert not list(tmp_path.iterdir())
