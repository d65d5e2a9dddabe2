"""The benchmark harnesses end to end on tiny shapes, so that they cannot rot on CPU-only CI.

The kernel benchmark runs in smoke mode (every op and mode, the fused linear cross-entropy
included, through the Triton interpreter without a GPU); the serving and CPU-path benchmarks run
in smoke mode too, the CPU paths (ours vs torch.nn.functional, and the fused linear cross-entropy
vs torch's chunked op) in processes of their own without TRITON_INTERPRET (which this test
session sets). The tests then read back what
they wrote and check the report step on it. These run from the repository root (``python -m
pytest``): ``benchmarks`` is not installed.
"""

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from benchmarks import common, cpu_linear_ce, cpu_path, kernels, kernels_report, report, serving

REPO = Path(__file__).resolve().parent.parent
ALWAYS_THERE = ("triton-softmax", "torch", "torch.compile")
#: Installed or not: rows that are measured or skipped with the reason written down.
OPTIONAL = ("liger", "quack", "torch-chunked", "cce", "cce-filtered")
TORCH_HAS_CHUNKED = hasattr(F, "linear_cross_entropy")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels")
    code = kernels.main(["--smoke", "--out", str(out)])
    (csv_path,) = out.glob("kernels-smoke_*.csv")
    return code, out, csv_path, common.read_csv(csv_path)


#: Where the kernel benchmark's smoke run puts its tensors (CUDA when torch sees one).
_SMOKE_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_kernel_smoke_run_writes_every_op_and_mode(smoke):
    code, _, csv_path, rows = smoke
    assert code == 0
    assert csv_path.read_text().splitlines()[0].split(",") == kernels.COLUMNS
    assert {(r["op"], r["mode"]) for r in rows} == {
        (o, m) for o in kernels.OPS for m in kernels.MODES
    }


def test_kernel_rows_are_checked_timed_and_counted(smoke):
    import triton_softmax as ts

    for r in smoke[3]:
        if r["provider"] in OPTIONAL:  # measured or skipped with the reason written down
            assert r["status"] == "ok" or r["status"].startswith("skipped: "), r["status"]
        if r["provider"] not in ALWAYS_THERE:
            continue
        case = (r["op"], r["mode"], r["N"], r["provider"])
        assert r["status"] == "ok", (case, r["status"])
        assert 0 < r["ms_p20"] <= r["ms_p50"] <= r["ms_p80"], case
        assert r["max_rel_err"] <= kernels.TOLERANCE[torch.float32], case
        if r["op"] in (kernels.LCE, kernels.RL):
            continue  # counted in flops: test_linear_cross_entropy_rows, test_rl_head_rows
        args = (r["op"], r["mode"], r["M"], r["N"], 4)
        assert (r["bytes_min"], r["min_formula"]) == kernels.bytes_min(*args)
        assert (r["bytes_moved"], r["moved_formula"]) == kernels.bytes_moved(r["provider"], *args)
        assert r["gbps_min"] == pytest.approx(r["bytes_min"] / (r["ms_p50"] * 1e-3) / 1e9)
        assert r["pct_copy_min"] == pytest.approx(100 * r["gbps_min"] / r["copy_gbps"])
        if r["provider"] == "triton-softmax":
            assert r["kernel_path"] == ts.kernel_path(_SMOKE_DEVICE)
            if (r["op"], r["mode"]) == ("cross_entropy", "forward+backward"):
                assert r["pct_copy_moved"] == pytest.approx(1.5 * r["pct_copy_min"])
    inplace = {(r["op"], r["mode"]) for r in smoke[3] if r["provider"] == "triton-softmax-inplace"}
    assert inplace == {("cross_entropy", "forward+backward")}


def test_linear_cross_entropy_rows(smoke):
    import triton_softmax as ts

    rows = [r for r in smoke[3] if r["op"] == kernels.LCE]
    providers = {r["provider"] for r in rows}
    assert providers == {
        "triton-softmax",
        "triton-softmax-tp1",
        "torch",
        "torch.compile",
        "torch-chunked",
        "liger",
        "cce",
        "cce-filtered",
        kernels.CEILING,  # the GEMMs alone, timed in the same run
    }
    ceiling = [r for r in rows if r["provider"] == kernels.CEILING]
    assert len(ceiling) == len(kernels.MODES) * len(kernels.SMOKE_GRID[kernels.LCE][1])
    assert all(r["status"] == "ok" and r["tflops"] > 0 for r in ceiling)
    assert {(r["mode"], r["N"]) for r in rows} == {
        (m, v) for m in kernels.MODES for v in kernels.SMOKE_GRID[kernels.LCE][1]
    }
    for r in rows:
        assert r["H"] == kernels.SMOKE_HIDDEN and r["M"] == 8 and r["dtype"] == "fp32"
        if r["provider"] == "torch-chunked":
            assert (r["status"] == "ok") == TORCH_HAS_CHUNKED, r["status"]
        if r["status"] != "ok":
            continue
        flops, formula = kernels.flops(r["mode"], r["M"], r["N"], r["H"])
        assert (r["flops"], r["flops_formula"]) == (flops, formula)
        assert r["tflops"] == pytest.approx(flops / (r["ms_p50"] * 1e-3) / 1e12)
        assert math.isnan(r["gbps_min"]) and r["bytes_min"] == 0
        if r["provider"] == "triton-softmax":
            assert r["kernel_path"] == ts.kernel_path(_SMOKE_DEVICE) and r["max_rel_err"] == 0
    # Rows only where a provider has the op.
    other = {r["provider"] for r in smoke[3] if r["op"] != kernels.LCE}
    assert not other & {"torch-chunked", "cce", "cce-filtered"}
    assert "quack" in other and "quack" not in providers


def test_flop_formulas_and_run_order():
    assert kernels.flops("forward", 2, 3, 5) == (60, "2*M*V*H (logits)")
    assert kernels.flops("forward+backward", 2, 3, 5)[0] == 6 * 2 * 3 * 5
    args = SimpleNamespace(
        op=list(kernels.OPS),
        mode=list(kernels.MODES),
        dtype=None,
        rows=None,
        cols=None,
        smoke=False,
    )
    cases = kernels.plan(args)
    lce = [c for c in cases if c[0] == kernels.LCE]
    rl = [c for c in cases if c[0] == kernels.RL]
    assert rl == [(kernels.RL, *c[1:]) for c in lce]  # the RL head at the same shapes, last
    assert cases[-len(rl) :] == rl
    assert cases[-len(lce) - len(rl) : -len(rl)] == lce  # then linear CE, its budget share kept
    (rows, vocabs), first = kernels.GRID[kernels.LCE], lce[: 2 * len(kernels.GRID[kernels.LCE][1])]
    assert rows[0] == 8192 and {c[2] for c in lce} == {"bf16"}
    assert first == [
        (kernels.LCE, mode, "bf16", 8192, v)
        for mode in ("forward+backward", "forward")
        for v in vocabs
    ]
    assert len(lce) == 2 * len(rows) * len(vocabs)
    assert {c[2] for c in cases if c[0] == "softmax"} == {"fp32", "bf16"}


def test_time_budget_keeps_a_share_for_linear_cross_entropy(tmp_path):
    args = ["--smoke", "--op", "softmax", kernels.LCE, "--mode", "forward", "-N", "100"]
    args += ["--time-budget", "1000", "--lce-budget", "1000", "--out", str(tmp_path)]
    assert kernels.main(args) == 0
    rows = common.read_csv(next(tmp_path.glob("*.csv")))
    softmax = [r for r in rows if r["op"] == "softmax"]
    assert softmax and all("kept for linear_cross_entropy" in r["status"] for r in softmax)
    ours = [r for r in rows if r["op"] == kernels.LCE and r["provider"] == "triton-softmax"]
    assert [r["status"] for r in ours] == ["ok"]


def test_rl_head_rows(smoke):
    rows = [r for r in smoke[3] if r["op"] == kernels.RL]
    assert {r["provider"] for r in rows} == {"triton-softmax", "torch", "torch.compile", "liger"}
    assert sorted((r["mode"], r["N"]) for r in rows if r["provider"] == "torch") == sorted(
        (m, v) for m in kernels.MODES for v in kernels.SMOKE_GRID[kernels.LCE][1]
    )
    for r in rows:
        assert r["H"] == kernels.SMOKE_HIDDEN and r["M"] == 8 and r["dtype"] == "fp32"
        if r["provider"] == "liger" and not torch.cuda.is_available():
            assert r["status"].startswith("skipped: "), r["status"]
        if r["status"] != "ok":
            continue
        flops, formula = kernels.flops(r["mode"], r["M"], r["N"], r["H"])
        assert (r["flops"], r["flops_formula"]) == (flops, formula)
        assert r["tflops"] == pytest.approx(flops / (r["ms_p50"] * 1e-3) / 1e12)
        assert r["max_rel_err"] <= kernels.TOLERANCE[torch.float32]
    md = smoke[2].with_suffix(".md").read_text()
    assert "### linear_cross_entropy_rl, forward+backward, fp32, M = 8, H = 32" in md
    assert f"Per-token loss and entropy at temperature {kernels.RL_TEMPERATURE:g}" in md
    assert "| V | triton-softmax | torch | torch.compile | ours vs torch |" in md


@pytest.mark.parametrize(
    "mode, corrupt",
    [
        ("forward", lambda loss, entropy: (loss, entropy * 1.01)),
        # the same values; the entropy's gradient lost: only the gradient check can see it
        ("forward+backward", lambda loss, entropy: (loss, entropy.detach() + 0 * entropy)),
    ],
    ids=["entropy value", "entropy gradient"],
)
def test_rl_head_check_compares_entropy_and_its_gradient(tmp_path, monkeypatch, mode, corrupt):
    right = kernels._torch_rl
    monkeypatch.setattr(kernels, "_torch_rl", lambda x, w, t: corrupt(*right(x, w, t)))
    args = ["--smoke", "--op", kernels.RL, "--mode", mode, "-N", "100", "--out", str(tmp_path)]
    assert kernels.main(args) == common.MISMATCH_EXIT
    by = {r["provider"]: r for r in common.read_csv(next(tmp_path.glob("*.csv")))}
    assert by["triton-softmax"]["status"] == "ok"
    assert by["torch"]["status"].startswith("mismatch: max rel err")
    assert math.isnan(by["torch"]["ms_p50"])  # not timed


def test_rl_head_runs_in_seconds_of_its_own(tmp_path):
    args = ["--smoke", "--op", "softmax", kernels.LCE, kernels.RL, "--mode", "forward"]
    args += ["-N", "100", "--time-budget", "0", "--rl-budget", "1000", "--out", str(tmp_path)]
    assert kernels.main(args) == 0
    rows = common.read_csv(next(tmp_path.glob("*.csv")))
    others = [r for r in rows if r["op"] != kernels.RL]
    assert others and all(r["status"].startswith("skipped: time budget") for r in others)
    rl = {r["provider"]: r["status"] for r in rows if r["op"] == kernels.RL}
    assert not rl.pop("liger").startswith("skipped: time budget")  # ok, or skipped for its reason
    assert rl == dict.fromkeys(ALWAYS_THERE, "ok")


def test_byte_formulas():
    M, N, s = 4, 8, 2
    assert kernels.bytes_min("softmax", "forward", M, N, s) == (128, "2*M*N*s (read x, write y)")
    assert kernels.bytes_min("log_softmax", "forward+backward", M, N, s)[0] == 5 * M * N * s
    assert kernels.bytes_min("cross_entropy", "forward", M, N, s) == (64, "M*V*s (read logits)")
    assert kernels.bytes_min("cross_entropy", "forward+backward", M, N, s)[0] == 2 * M * N * s
    # Cross-entropy forward+backward reads the logits twice and writes once: ours and Liger's.
    for provider in ("triton-softmax", "triton-softmax-inplace", "liger", "quack"):
        moved = kernels.bytes_moved(provider, "cross_entropy", "forward+backward", M, N, s)
        assert moved[0] == 3 * M * N * s
    # Our softmax moves the minimum for rows held whole or split over programs (up to 128
    # slices of 4096), and reads a row twice once it is streamed (over 524288 in fp32).
    for n in (32768, 32768 + 1, 524288):
        for mode, k in (("forward", 2), ("forward+backward", 5)):
            assert (
                kernels.bytes_moved("triton-softmax", "softmax", mode, M, n, s)[0] == k * M * n * s
            )
    long = 524288 + 1
    assert (
        kernels.bytes_moved("triton-softmax", "softmax", "forward", M, long, s)[0]
        == 3 * M * long * s
    )
    assert kernels.bytes_moved("triton-softmax", "log_softmax", "forward+backward", M, long, s)[
        0
    ] == (7 * M * long * s)
    assert kernels.bytes_moved("triton-softmax", "softmax", "forward+backward", M, long, s)[0] == (
        8 * M * long * s
    )
    assert kernels.bytes_moved("triton-softmax", "softmax", "forward", M, long - 1, s)[0] == (
        2 * M * (long - 1) * s
    )
    assert kernels.bytes_moved("liger", "softmax", "forward", M, long, s)[0] == 2 * M * long * s
    assert kernels.bytes_moved("torch", "softmax", "forward", M, N, s) == (0, "not modelled")


def test_kernel_report_has_tables_and_plots(smoke):
    _, out, csv_path, _ = smoke
    md = csv_path.with_suffix(".md").read_text()
    assert "### softmax, forward, fp32, M = 16" in md
    assert "### cross_entropy, forward+backward, fp32, M = 8" in md
    assert "GB/s over the minimum bytes, 2*M*V*s (read logits once, write grad once)" in md
    assert "move 3*M*V*s (read logits twice, write grad)" in md and ", moved " in md
    assert "### linear_cross_entropy, forward+backward, fp32, M = 8, H = 32" in md
    assert "TFLOP/s over 6*M*V*H (logits, grad_input, grad_weight" in md
    assert "| V | triton-softmax | triton-softmax-tp1 | torch | torch.compile |" in md
    assert "ours vs torch |" in md
    assert f"| {kernels.CEILING} | ours / {kernels.CEILING} |" in md
    pytest.importorskip("matplotlib")
    pngs = list(out.glob("*.png"))
    assert len(pngs) == len(kernels.OPS) * len(kernels.MODES)
    assert all(p.stat().st_size > 10_000 for p in pngs)


def test_readme_sections_are_generated_from_csvs(smoke, tmp_path):
    _, _, csv_path, _ = smoke
    assert "No GPU numbers have been measured yet" in kernels_report.readme_section(tmp_path)
    assert "No CPU-path numbers" in cpu_path.readme_section(tmp_path)
    shutil.copy(csv_path, tmp_path / "kernels_fake-gpu.csv")
    section = kernels_report.readme_section(tmp_path)
    assert "#### softmax, forward, fp32, M = 16" in section
    assert "#### cross_entropy, forward+backward, fp32, M = 8" in section
    assert "#### linear_cross_entropy, forward+backward, fp32, M = 8, H = 32" in section
    assert "No GPU numbers" not in section
    readme = tmp_path / "README.md"
    readme.write_text(
        "a\n<!-- bench:kernels:start -->\nold\n<!-- bench:kernels:end -->\n"
        "<!-- bench:serving:start -->\n<!-- bench:serving:end -->\nb\n"
    )
    text = report.update_readme(readme, tmp_path).read_text()
    assert text.startswith("a\n<!-- bench:kernels:start -->\n## Benchmarks: kernels\n")
    assert text.index("bench:serving:end") < text.index("bench:cpu:start") < text.index("\nb\n")
    assert text.index("bench:cpu:end") < text.index("bench:cpu-linear-ce:start")
    assert text.index("bench:cpu-linear-ce:end") < text.index("\nb\n")
    assert "No numbers have been measured yet" in text
    assert "old" not in text and "No serving numbers" in text
    with pytest.raises(ValueError, match="markers"):
        common.replace_section("no markers", "bench:kernels", "x")


def test_time_budget_records_the_rest_as_skipped(tmp_path):
    args = ["--smoke", "--op", "softmax", "--mode", "forward", "--time-budget", "0"]
    assert kernels.main([*args, "--out", str(tmp_path)]) == 0
    rows = common.read_csv(next(tmp_path.glob("*.csv")))
    assert rows and all(r["status"].startswith("skipped: time budget") for r in rows)


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


@pytest.mark.slow  # a whole benchmark run in smoke mode: 10-25 s on 2 cores
def test_serving_smoke_checks_times_and_reports(tmp_path):
    assert serving.main(["--smoke", "--out", str(tmp_path)]) == 0
    (csv_path,) = tmp_path.glob("serving-smoke_*.csv")
    by = {(r["provider"], r["rows"]): r for r in common.read_csv(csv_path)}
    for name in serving.PROVIDERS[:-1]:
        for n in (1, *serving.SMOKE_REPS):
            r = by[(name, n)]
            assert r["status"] == "ok", (name, n, r["status"])
            assert r["max_abs_err"] <= serving.ATOL
            assert 0 < r["p50_us"] <= r["p99_us"] and math.isfinite(r["rows_per_s"])
    sklearn = by[("scikit-learn", 1)]["status"]
    assert sklearn == "ok" or sklearn.startswith("skipped: not installed")
    md = csv_path.with_suffix(".md").read_text()
    assert "| onnxruntime vs torch eager |" in md and "Measured on " in md
    assert "No serving numbers" in serving.readme_section(tmp_path)  # smoke CSVs stay out


def test_cpu_path_benchmark_refuses_the_interpreter(tmp_path, capsys):
    import triton_softmax as ts

    if ts.kernel_path(torch.empty(1)) == "torch":
        pytest.skip("this session runs the plain-torch path")
    assert cpu_path.main(["--smoke", "--out", str(tmp_path)]) == common.REFUSAL_EXIT
    assert "unset TRITON_INTERPRET" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow  # a whole benchmark run in smoke mode: 10-25 s on 2 cores
def test_cpu_path_smoke_checks_times_and_reports(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "benchmarks.cpu_path", "--smoke", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (csv_path,) = tmp_path.glob("cpu_path-smoke_*.csv")
    rows = common.read_csv(csv_path)
    options = {r["options"] for r in rows if r["op"] == "cross_entropy"}
    assert {"weight", "label_smoothing=0.1", "probability targets", "z_loss=1e-4"} <= options
    assert {(r["op"], r["mode"]) for r in rows} == {
        (op, mode) for op in ("softmax", "log_softmax", "cross_entropy") for mode in cpu_path.MODES
    }
    for r in rows:
        assert r["status"] == "ok" and r["kernel_path"] == "torch", r
        assert r["ours_us"] > 0 and r["torch_us"] > 0
        assert 0 < r["ratio"] < math.inf
        assert r["threads"] == common.cpu_count()
    md = csv_path.with_suffix(".md").read_text()
    assert "per-call overhead at 4x3" in md and "| cross_entropy | weight |" in md


def test_cpu_linear_ce_benchmark_refuses_the_interpreter(tmp_path, capsys):
    import triton_softmax as ts

    if ts.kernel_path(torch.empty(1)) == "torch":
        pytest.skip("this session runs the plain-torch path")
    assert cpu_linear_ce.main(["--smoke", "--out", str(tmp_path)]) == common.REFUSAL_EXIT
    assert "unset TRITON_INTERPRET" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow  # a whole benchmark run in smoke mode: 10-25 s on 2 cores
def test_cpu_linear_ce_smoke_checks_times_measures_and_reports(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "benchmarks.cpu_linear_ce", "--smoke", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (csv_path,) = tmp_path.glob("cpu_linear_ce-smoke_*.csv")
    rows = {r["provider"]: r for r in common.read_csv(csv_path)}
    assert list(rows) == list(cpu_linear_ce.PROVIDERS)
    n, h, v = cpu_linear_ce.SMOKE_SHAPE
    for name, r in rows.items():
        if name == "torch-chunked" and not TORCH_HAS_CHUNKED:
            assert r["status"].startswith("skipped: torch"), r["status"]
            continue
        assert r["status"] == "ok" and r["kernel_path"] == "torch", r
        assert (r["N"], r["H"], r["V"], r["threads"]) == (n, h, v, common.cpu_count())
        assert 0 < r["ms_min"] <= r["ms_median"] <= r["ms_max"] and r["ours_over_this"] > 0
        assert r["max_rel_err"] <= 1e-4 and r["logits_mib"] == pytest.approx(n * v * 4 / 2**20)
    assert rows["triton-softmax"]["ours_over_this"] == 1.0
    ours = rows["triton-softmax"]  # --smoke measures our peak only, in a process of its own
    assert ours["peak_extra_mib"] >= 0 and "hwm_after_kib=" in ours["peak_raw_kib"]
    assert math.isnan(rows["torch"]["peak_extra_mib"])
    md = csv_path.with_suffix(".md").read_text()
    assert "time ≤ torch's chunked op" in md or not TORCH_HAS_CHUNKED
    assert "peak extra memory ≤ 0.1× the fp32 logits" in md and "| triton-softmax |" in md
    assert "No numbers have been measured yet" in cpu_linear_ce.readme_section(tmp_path)
    shutil.copy(csv_path, tmp_path / "cpu_linear_ce_fake-cpu.csv")
    section = cpu_linear_ce.readme_section(tmp_path)
    assert "### 2 torch thread(s)" in section or common.cpu_count() != 2
    assert "| provider | ms (median) |" in section and "No numbers" not in section
