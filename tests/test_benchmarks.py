"""The benchmark harnesses end to end on tiny shapes, so that they cannot rot on CPU-only CI.

The kernel benchmark runs in smoke mode (all three ops, all three modes, through the Triton
interpreter without a GPU) into pytest's tmp_path; the tests then read back the CSV, the markdown
table and the plots it wrote, and check the README generator on them.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import kernels, report
from benchmarks.providers import MODES, OPS

REPO = Path(__file__).resolve().parent.parent
ALWAYS_THERE = ("triton-softmax", "torch", "torch.compile")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels")
    code = kernels.main(["--smoke", "--out", str(out)])
    (csv_path,) = out.glob("kernels-smoke_*.csv")
    return code, out, csv_path, report.read_csv(csv_path)


def test_smoke_run_succeeds_and_writes_every_column(smoke):
    code, _, csv_path, rows = smoke
    assert code == 0
    header = csv_path.read_text().splitlines()[0].split(",")
    assert header == kernels.CSV_COLUMNS
    assert {(r["op"], r["mode"]) for r in rows} == {(op, mode) for op in OPS for mode in MODES}


def test_smoke_rows_are_checked_and_timed(smoke):
    _, _, _, rows = smoke
    import triton_softmax as ts

    for op in OPS:
        for mode in MODES:
            case = [r for r in rows if (r["op"], r["mode"]) == (op, mode)]
            by_provider = {r["provider"]: r for r in case if r["N"] == case[0]["N"]}
            for name in ALWAYS_THERE:
                r = by_provider[name]
                assert r["status"] == "ok", (op, mode, name, r["status"])
                for column in ("ms_p50", "ms_p20", "ms_p80", "gbps", "pct_copy_bw", "copy_gbps"):
                    assert math.isfinite(r[column]) and r[column] > 0, (op, mode, name, column)
                assert r["ms_p20"] <= r["ms_p50"] <= r["ms_p80"]
                assert r["max_rel_err"] <= kernels.TOLERANCE[torch.float32]
                n_bytes, formula = kernels.bytes_moved(op, mode, r["M"], r["N"], 4)
                assert (r["bytes"], r["bytes_formula"]) == (n_bytes, formula)
                assert r["gbps"] == pytest.approx(n_bytes / (r["ms_p50"] * 1e-3) / 1e9)
            assert by_provider["triton-softmax"]["kernel_path"] == ts.kernel_path(torch.empty(1))
            # The peers are either measured or skipped with the reason written down.
            for name in ("liger", "quack"):
                status = by_provider[name]["status"]
                assert status == "ok" or status.startswith("skipped: "), status
            inplace = by_provider.get("triton-softmax-inplace")
            assert (inplace is not None) == ((op, mode) == ("cross_entropy", "forward+backward"))


def test_smoke_report_has_tables_and_plots(smoke):
    _, out, csv_path, _ = smoke
    md = csv_path.with_suffix(".md").read_text()
    assert "### softmax, forward, fp32, M = 16" in md
    assert "### cross_entropy, forward+backward, fp32, M = 8" in md
    assert "Bytes counted: 2*M*V*s (read logits once, write grad once)." in md
    assert "quack: skipped: not installed" in md or "quack" in md.split("\n### ")[1]
    pytest.importorskip("matplotlib")
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == len(OPS) * len(MODES)
    assert all(p.stat().st_size > 10_000 for p in out.glob("*.png"))


def test_readme_kernel_section_is_generated_from_csvs(smoke, tmp_path):
    _, _, csv_path, _ = smoke
    empty = report.readme_kernels_section(tmp_path, REPO / "README.md")
    assert "No GPU numbers have been measured yet" in empty
    (tmp_path / "kernels_fake-gpu.csv").write_bytes(csv_path.read_bytes())
    section = report.readme_kernels_section(tmp_path, REPO / "README.md")
    assert "#### softmax, forward, fp32, M = 16" in section
    assert "#### cross_entropy, forward+backward, fp32, M = 8" in section
    assert "No GPU numbers" not in section
    text = "a\n<!-- bench:kernels:start -->\nold\n<!-- bench:kernels:end -->\nb\n"
    new = report.replace_section(text, "bench:kernels", "new table")
    assert new == "a\n<!-- bench:kernels:start -->\nnew table\n<!-- bench:kernels:end -->\nb\n"
    with pytest.raises(ValueError, match="markers"):
        report.replace_section("no markers", "bench:kernels", "x")


def test_time_budget_records_the_rest_as_skipped(tmp_path):
    args = ["--smoke", "--op", "softmax", "--mode", "forward", "--time-budget", "0"]
    assert kernels.main([*args, "--no-report", "--out", str(tmp_path)]) == 0
    (csv_path,) = tmp_path.glob("*.csv")
    rows = report.read_csv(csv_path)
    assert rows and all(r["status"].startswith("skipped: time budget") for r in rows)


def test_bytes_formulas():
    assert kernels.bytes_moved("softmax", "forward", 4, 8, 2) == (128, "2*M*N*s (read x, write y)")
    assert kernels.bytes_moved("log_softmax", "backward", 4, 8, 4)[0] == 3 * 4 * 8 * 4
    assert kernels.bytes_moved("softmax", "forward+backward", 4, 8, 4)[0] == 5 * 4 * 8 * 4
    assert kernels.bytes_moved("cross_entropy", "forward", 4, 8, 2)[0] == 4 * 8 * 2
    assert kernels.bytes_moved("cross_entropy", "forward+backward", 4, 8, 2)[0] == 2 * 4 * 8 * 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_full_kernel_benchmark_without_cuda_exits_nonzero_and_says_why():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernels", "--out", os.devnull],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == kernels.NO_GPU_EXIT != 0
    assert "no CUDA device: the kernel benchmark needs a GPU" in done.stderr
    assert "--smoke" in done.stderr


def test_serving_smoke_checks_times_and_reports(tmp_path):
    from benchmarks import serving

    assert serving.main(["--smoke", "--out", str(tmp_path)]) == 0
    (csv_path,) = tmp_path.glob("serving-smoke_*.csv")
    rows = report.read_csv(csv_path)
    by = {(r["provider"], r["rows"]): r for r in rows}
    for name in (
        "onnxruntime",
        "OnnxClassifier",
        "torch eager",
        "torch eager (F.softmax)",
        "numpy",
    ):
        for n in (1, *serving.SMOKE_SIZES):
            r = by[(name, n)]
            assert r["status"] == "ok", (name, n, r["status"])
            assert r["max_abs_err"] <= serving.ATOL
            assert 0 < r["p50_us"] <= r["p99_us"] and math.isfinite(r["rows_per_s"])
    sklearn = by[("scikit-learn", 1)]["status"]
    assert sklearn == "ok" or sklearn.startswith("skipped: not installed")
    md = csv_path.with_suffix(".md").read_text()
    assert "| onnxruntime vs torch eager |" in md and "Machine: " in md
    section = report.readme_serving_section(tmp_path, REPO / "README.md")
    assert "No serving numbers" in section  # smoke CSVs never reach the README
