"""Serving benchmark on a CPU: the trained Iris model through onnxruntime, torch eager and numpy.

    python -m benchmarks.serving                     # about 3 minutes on 2 cores
    python -m benchmarks.serving --smoke --out DIR   # tiny sizes, seconds (the tests run it)

The model is trained on the embedded Iris data and exported with the project's own API, then
served by: ``onnxruntime`` (a plain ``InferenceSession.run``, CPU provider); ``OnnxClassifier``
(the project's wrapper, which also validates every input); ``torch eager`` (the trained
``SoftmaxRegression`` under ``inference_mode``: our op's plain-torch CPU path); ``torch eager
(F.softmax)`` (the same Linear layer with ``torch.softmax``); ``numpy`` (normalisation folded
into the weights, matmul + stable softmax); ``scikit-learn`` (``LogisticRegression.predict_proba``
with the same weights, when installed). All take and return numpy arrays, and every provider's
probabilities are checked against torch eager (1e-5) before timing.

Each provider runs in a process of its own that imports only what it serves with, as a server
would: in one process the idle-spinning thread pools of onnxruntime, torch's OpenMP and numpy's
BLAS slow each other down on a small machine. Batch 1: p50 / p99 of single-row calls. 1e3 ... 1e6
rows: p50 / p99 of whole-batch calls, rows per second from the p50. The workers run in 5 rounds
over all providers in a rotated order, and each provider's timings are pooled over the rounds;
the lowest and highest single-round p50 are kept too. Refuses ``TRITON_INTERPRET=1`` (torch eager
would then be the interpreter). Output: ``serving_<cpu>.csv``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks import common, targets

PROVIDERS = ("onnxruntime", "OnnxClassifier", "torch eager", "torch eager (F.softmax)")
PROVIDERS += ("numpy", "scikit-learn")
#: Whole-batch calls per round at each size; batch 1 gets BATCH1_CALLS single-row calls.
REPS = {1_000: 400, 10_000: 100, 100_000: 24, 1_000_000: 8}
SMOKE_REPS = {1_000: 3}
BATCH1_CALLS, SMOKE_BATCH1_CALLS = 4000, 24
ATOL = 1e-5  # largest |p - p_torch| accepted
CHECK_ROWS = 1000

Predict = Callable[[np.ndarray], np.ndarray]


def prepare(workdir: Path, epochs: int | None) -> str:
    """Train, export ``model.onnx`` and ``model.safetensors``, save ``inputs.npz`` (check rows,
    torch eager's probabilities on them, folded weights, feature statistics) into ``workdir``;
    returns the model's name."""
    import torch

    from triton_softmax.export.onnx_export import fold_standardisation

    data, model = common.iris_model(workdir, epochs)
    mean, std = data.features.mean(axis=0), data.features.std(axis=0)
    check = common.iris_like_rows(mean, std, CHECK_ROWS, seed=1)
    with torch.inference_mode():
        reference = model(torch.from_numpy(check)).numpy()
    w, b = (t.numpy() for t in fold_standardisation(model))
    np.savez(workdir / "inputs.npz", check=check, reference=reference, w=w, b=b, mean=mean, std=std)
    model_name = f"Iris softmax regression ({data.n_features} features → {data.n_classes} classes)"
    return model_name + ", ONNX"


def build(name: str, workdir: Path, inputs: dict) -> tuple[Predict, str, str] | str:
    """(predict_proba, threads, notes) of one provider, importing only what it serves with; or
    the reason it cannot run."""
    ort_threads = f"onnxruntime default ({common.cpu_count()} logical CPUs)"
    if name == "onnxruntime":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(workdir / "model.onnx"), providers=["CPUExecutionProvider"])
        return lambda x: sess.run(["probabilities"], {"features": x})[0], ort_threads, ""
    if name == "OnnxClassifier":
        from triton_softmax.export.runtime import OnnxClassifier

        clf = OnnxClassifier(workdir / "model.onnx", providers=["CPUExecutionProvider"])
        return clf.predict_proba, ort_threads, "validates the input on every call"
    if name.startswith("torch eager"):
        import torch

        import triton_softmax as ts
        from triton_softmax.regression import load_checkpoint

        model = load_checkpoint(workdir / "model.safetensors").model
        threads, path = f"torch {torch.get_num_threads()}", ts.kernel_path(torch.empty(1))

        def eager(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(x)).numpy()

        def plain(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                z = model.linear((torch.from_numpy(x) - model.feature_mean) / model.feature_std)
                return torch.softmax(z, dim=-1).numpy()

        if name == "torch eager":
            return eager, threads, f"kernel path: {path}"
        return plain, threads, ""
    w, b = inputs["w"], inputs["b"]
    if name == "numpy":
        wt = np.ascontiguousarray(w.T)

        def numpy_softmax(x: np.ndarray) -> np.ndarray:
            z = x @ wt + b
            z -= z.max(axis=1, keepdims=True)
            np.exp(z, out=z)
            z /= z.sum(axis=1, keepdims=True)
            return z

        return numpy_softmax, "BLAS default", ""
    if common.package_version("scikit-learn") is None:
        return "skipped: not installed (pip install scikit-learn)"
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression()  # the fitted state predict_proba reads: softmax(x @ coef_.T + b)
    lr.coef_, lr.intercept_ = w.astype(np.float64), b.astype(np.float64)
    lr.classes_, lr.n_features_in_, lr.n_iter_ = np.arange(w.shape[0]), w.shape[1], np.array([0])
    return lr.predict_proba, "BLAS default", ""


def measure(name: str, workdir: Path, smoke: bool) -> list[dict]:
    """Worker side: check one provider against torch eager, then time batch 1 and each size."""
    inputs = dict(np.load(workdir / "inputs.npz"))
    reps = SMOKE_REPS if smoke else REPS
    built = build(name, workdir, inputs)
    if isinstance(built, str):
        return [dict(provider=name, rows=n, status=built) for n in (1, *reps)]
    predict, threads, notes = built
    err = float(np.abs(predict(inputs["check"]).astype(np.float64) - inputs["reference"]).max())
    base = dict(provider=name, threads=threads, notes=notes, max_abs_err=err)
    if not err <= ATOL:
        status = f"mismatch: max abs err {err:.3g} > {ATOL:g} vs torch eager"
        return [dict(base, rows=n, status=status) for n in (1, *reps)]
    results = []
    for n in (1, *reps):
        x = common.iris_like_rows(inputs["mean"], inputs["std"], n, seed=n)
        calls = (SMOKE_BATCH1_CALLS if smoke else BATCH1_CALLS) if n == 1 else reps[n]
        times = []
        for _ in range(calls + max(2, calls // 10)):  # the first tenth is warm-up
            start = time.perf_counter_ns()
            predict(x)
            times.append(time.perf_counter_ns() - start)
        results.append(dict(base, rows=n, status="ok", times_ns=times[-calls:]))
    return results


def summarize(rounds: list[dict]) -> dict:
    """One provider and size: the rounds' timings pooled into p50 / p99 / mean µs, and the
    lowest and highest p50 of a single round (how much the machine drifted)."""
    row = {k: v for k, v in rounds[0].items() if k != "times_ns"}
    if row["status"] != "ok":
        return row
    us = [np.asarray(r["times_ns"], dtype=np.float64) / 1e3 for r in rounds]
    pooled, p50s = np.concatenate(us), [float(np.percentile(t, 50)) for t in us]
    p50 = float(np.percentile(pooled, 50))
    return row | dict(
        p50_us=p50,
        p99_us=float(np.percentile(pooled, 99)),
        mean_us=float(pooled.mean()),
        p50_round_min_us=min(p50s),
        p50_round_max_us=max(p50s),
        rows_per_s=row["rows"] / (p50 * 1e-6),
        calls=int(pooled.size),
    )


def run_worker(name: str, workdir: Path, smoke: bool) -> list[dict]:
    """``measure`` in a fresh process (this module with ``--worker``), its rows printed as JSON."""
    args = ["serving", "--worker", name, "--dir", str(workdir), *(["--smoke"] if smoke else [])]
    try:
        return common.json_result(common.start_module(args, cpu_only=False), name, timeout=600)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        last = str(e).strip().splitlines()[-1][:200]
        return [dict(provider=name, rows=1, status=f"error: worker failed: {last}")]


# Report: markdown, plot and the RESULTS.md section, from the CSV.


def _size(n: int) -> str:
    return "batch 1" if n == 1 else f"{n:.0e}".replace("e+0", "e") + " rows"


def _speedup(by: dict, fast: str, slow: str, n: int) -> float:
    a, b = by.get((fast, n)), by.get((slow, n))
    ok = a and b and a["status"] == b["status"] == "ok"
    return b["p50_us"] / a["p50_us"] if ok else math.nan


def tables(rows: list[dict]) -> list[str]:
    """Latency / throughput per provider, onnxruntime's speed-ups, docs/design.md's targets."""
    by = {(r["provider"], r["rows"]): r for r in rows}
    names = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    sizes = sorted({r["rows"] for r in rows if r["rows"] > 1})
    body = []
    for p in names:
        one, cells = by.get((p, 1)), [p]
        if one and one["status"] == "ok":
            spread = f"{one['p50_round_min_us']:.1f}–{one['p50_round_max_us']:.1f}"
            cells += [f"{one['p50_us']:.1f}", spread, f"{one['p99_us']:.1f}"]
        else:
            cells += [one["status"].split(":")[0] if one else "", "", ""]
        for n in sizes:
            r = by.get((p, n))
            ok = r and r["status"] == "ok"
            cells.append(
                f"{r['rows_per_s'] / 1e6:.2f} M" if ok else r["status"].split(":")[0] if r else ""
            )
        body.append(cells)
    header = ["provider", "batch 1 p50 µs", "rounds' p50 µs", "batch 1 p99 µs"]
    lines = common.md_table(header + [f"{_size(n)}/s" for n in sizes], body)
    ok_sizes = {r["rows"] for r in rows if r["status"] == "ok" and r["rows"] > 1}
    if ok_sizes:
        big = 100_000 if 100_000 in ok_sizes else max(ok_sizes)
        present = {r["provider"] for r in rows if r["status"] == "ok"}
        pairs = [(f, s) for f in PROVIDERS[:2] for s in PROVIDERS[2:] if {f, s} <= present]
        lines += [
            "",
            "Speed-up of onnxruntime (p50 time of the other / p50 time of onnxruntime; "
            "above 1: onnxruntime is faster):",
            "",
        ]
        lines += common.md_table(
            ["", "batch 1", _size(big)],
            [
                [f"{f} vs {s}", f"{_speedup(by, f, s, 1):.2f}×", f"{_speedup(by, f, s, big):.2f}×"]
                for f, s in pairs
            ],
        )
        verdicts = []
        for f in PROVIDERS[:2]:
            s1, s5 = _speedup(by, f, "torch eager", 1), _speedup(by, f, "torch eager", big)
            if big == 100_000 and not math.isnan(s1 + s5):
                met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
                verdicts.append(
                    f"- {f}: ≥ {targets.SERVING_SPEEDUP_1E5:g}× torch eager at 1e5 rows: "
                    f"{met(s5 >= targets.SERVING_SPEEDUP_1E5)} ({s5:.2f}×); no slower at batch 1: "
                    f"{met(s1 >= targets.SERVING_SPEEDUP_BATCH1)} ({s1:.2f}×)"
                )
        if verdicts:
            lines += [
                "",
                "Targets (docs/design.md, torch eager = the trained model):",
                "",
                *verdicts,
            ]
    skipped = sorted({f"{r['provider']}: {r['status']}" for r in rows if r["status"] != "ok"})
    return lines + (["", *[f"- {s}" for s in skipped]] if skipped else [])


def plot(rows: list[dict], path: Path) -> Path | None:
    """Rows per second against rows per call (batch 1 included), one line per provider."""
    plt = common.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for p in PROVIDERS:
        pts = sorted((r["rows"], r["rows_per_s"]) for r in rows if r["provider"] == p
                     and r["status"] == "ok")  # fmt: skip
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=p)
    ax.set(xscale="log", yscale="log", xlabel="rows per call", ylabel="rows / s (from the p50)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"{rows[0]['model']} — {rows[0]['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(csv_path: Path) -> list[Path]:
    """``<stem>.md`` (how it was measured, the tables) and ``<stem>.png`` next to a CSV."""
    rows = common.read_csv(csv_path)
    lines = [
        f"# Serving benchmark: {rows[0]['model']}",
        "",
        f"{common.measured_on(rows[0])}.",
        "",
        "Batch 1: latency of single-row calls (p50 / p99 over all calls of all rounds; \"rounds' "
        'p50": the lowest and highest p50 of a single round). Larger batches: rows per second '
        "from the p50 time of one call on the whole batch. Each provider ran in a process of its "
        "own; every provider's probabilities were checked against torch eager before timing.",
        "",
        *tables(rows),
    ]
    md = common.write_markdown(csv_path.with_suffix(".md"), lines)
    return [p for p in (md, plot(rows, csv_path.with_suffix(".png"))) if p]


def readme_section(results_dir: Path = common.RESULTS_DIR) -> str:
    """RESULTS.md's section: per CSV, the tables and the targets."""

    def body(path: Path) -> list[str]:
        rows = common.read_csv(path)
        return [f"{common.measured_on(rows[0])}:", "", *tables(rows)]

    return common.results_section(
        "Benchmarks: serving on a CPU",
        "`python -m benchmarks.serving` trains the Iris model, exports it to ONNX and times "
        "batch-1 latency and throughput up to 1e6 rows through onnxruntime (the raw session and "
        "the `OnnxClassifier` wrapper), torch eager, numpy and scikit-learn (when installed).",
        results_dir.glob("serving_*.csv"),
        body,
        "No serving numbers have been measured yet.",
    )


def main(argv: list[str] | None = None) -> int:
    """Run (every provider in worker processes) or, with ``--worker``, be one worker."""
    ap = common.parser("serving", __doc__, smoke="tiny sizes, one round, seconds")
    ap.add_argument("--rounds", type=int, default=5, help="rounds over all providers (default 5)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker, args.dir, args.smoke)))
        return 0
    if not args.smoke and common.refuses_kernel_path():  # torch eager would not be plain torch
        return common.REFUSAL_EXIT
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        base = dict(
            machine=common.cpu_description(),
            model=prepare(workdir, epochs=3 if args.smoke else None),
            versions=common.versions(("onnxruntime", "torch", "numpy", "scikit-learn", "onnx")),
            load_avg=common.load_average(),
        )
        print(f"machine: {base['machine']}; load average {base['load_avg']:.2f}", flush=True)
        rounds = 1 if args.smoke else args.rounds
        got: dict[tuple[str, int], list[dict]] = {}
        for k in range(rounds):  # a rotated order: a slow spell does not land on one provider
            for name in [*PROVIDERS[k:], *PROVIDERS[:k]]:
                for r in run_worker(name, workdir, args.smoke):
                    got.setdefault((name, r["rows"]), []).append(r)
            print(f"round {k + 1}/{rounds} done", flush=True)
    columns = (
        "provider rows status p50_us p99_us mean_us p50_round_min_us p50_round_max_us "
        "rows_per_s calls max_abs_err threads load_avg load_avg_end machine model "
        "versions notes"
    ).split()
    base = dict.fromkeys(columns, math.nan) | dict(threads="", notes="") | base
    base["load_avg_end"] = common.load_average()
    order = sorted(got, key=lambda key: (PROVIDERS.index(key[0]), key[1]))
    rows = [base | summarize(got[key]) for key in order]
    print("\n".join(tables(rows)))
    common.write_results(args.out / f"{common.stem('serving', args.smoke)}.csv", rows, write_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
