"""Serving benchmark on a CPU: the trained Iris model through onnxruntime, torch eager and numpy.

    python -m benchmarks.serving                     # about 3 minutes, into benchmarks/results
    python -m benchmarks.serving --smoke --out DIR   # tiny sizes, seconds (the test suite runs it)

The model is trained on the embedded Iris data and exported with the project's own API
(``triton_softmax.regression.train`` and ``save_checkpoint``,
``export.onnx_export.export_and_verify``), then served by:

- ``onnxruntime``: a plain ``InferenceSession.run`` of the exported file (CPU provider);
- ``OnnxClassifier``: the project's serving wrapper (``export.runtime``), which also validates the
  input (shape, dtype, NaN/inf) on every call;
- ``torch eager``: the trained ``SoftmaxRegression`` loaded with ``load_checkpoint`` (its softmax
  is ``triton_softmax``'s op, which on a CPU without the interpreter is the op's plain-torch path),
  under ``inference_mode``;
- ``torch eager (F.softmax)``: the same Linear layer with ``torch.softmax``, without our op;
- ``numpy``: the same weights, normalisation folded in, matmul + stable softmax;
- ``scikit-learn``: ``LogisticRegression.predict_proba`` with the same weights, when installed.

Each provider runs in a process of its own that imports only what it serves with (onnxruntime and
numpy need no torch), as it would in production: in one process, the idle-spinning thread pools
of onnxruntime, torch's OpenMP and numpy's BLAS slow each other down on a small machine. All take
and return numpy arrays (conversions count). Before timing, every provider's probabilities are
checked against torch eager. Batch 1: p50 / p99 latency of single-row calls. Larger batches
(1e3 ... 1e6 rows): p50 / p99 of whole-batch calls, rows per second from the p50. The workers run
in 5 rounds over all providers, in a rotated order each round, and each provider's timings are
pooled over the rounds.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from benchmarks.machine import cpu_count, cpu_description, cpu_model, package_version, slug

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROVIDERS = (
    "onnxruntime",
    "OnnxClassifier",
    "torch eager",
    "torch eager (F.softmax)",
    "numpy",
    "scikit-learn",
)
SIZES = (1_000, 10_000, 100_000, 1_000_000)
#: Whole-batch calls timed per size and provider.
REPS = {1_000: 400, 10_000: 100, 100_000: 24, 1_000_000: 8}
BATCH1_CALLS = 4000
SMOKE_SIZES = (1_000,)
SMOKE_REPS = {1_000: 3}
SMOKE_BATCH1_CALLS = 24
#: Largest |p - p_torch| accepted (fp32 probabilities of a 4 -> 3 model).
ATOL = 1e-5
CHECK_ROWS = 1000

Predict = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass
class Row:
    """One CSV row: one provider at one batch size."""

    provider: str
    rows: int
    status: str = "ok"
    p50_us: float = math.nan
    p99_us: float = math.nan
    mean_us: float = math.nan
    p50_round_min_us: float = math.nan
    p50_round_max_us: float = math.nan
    rows_per_s: float = math.nan
    calls: int = 0
    max_abs_err: float = math.nan
    threads: str = ""
    load_avg: float = math.nan
    load_avg_end: float = math.nan
    machine: str = ""
    model: str = ""
    versions: str = ""
    notes: str = ""


CSV_COLUMNS = [f.name for f in dataclasses.fields(Row)]


class Unavailable(Exception):
    """The provider cannot run here; the message is the row's status."""


def prepare(workdir: Path, epochs: int | None = None) -> dict[str, object]:
    """Train on Iris, export ``model.onnx``, save ``model.safetensors`` and the shared inputs
    (``inputs.npz``: check rows, torch eager's probabilities on them, folded weights, feature
    statistics) into ``workdir``, with the project's API.

    Returns:
        Facts for the CSV: number of features and classes, and the torch kernel path.
    """
    import torch

    import triton_softmax as ts
    from triton_softmax.export.onnx_export import export_and_verify, fold_standardisation
    from triton_softmax.regression import TrainConfig, load_iris, save_checkpoint, train

    data = load_iris()
    config = TrainConfig() if epochs is None else TrainConfig(epochs=epochs)
    run = train(data, config, device="cpu", reference=False)
    model = run.model.cpu().eval()
    names = {"feature_names": data.feature_names, "class_names": data.class_names}
    export_and_verify(model, workdir / "model.onnx", run.test.features, **names)
    save_checkpoint(
        workdir / "model.safetensors", model, config=config, metrics=run.metrics, **names
    )
    mean, std = data.features.mean(axis=0), data.features.std(axis=0)
    check = synthetic_rows(mean, std, CHECK_ROWS, seed=1)
    with torch.inference_mode():
        reference = model(torch.from_numpy(check)).numpy()
    w, b = (t.numpy() for t in fold_standardisation(model))
    np.savez(workdir / "inputs.npz", check=check, reference=reference, w=w, b=b, mean=mean, std=std)
    return {
        "features": data.n_features,
        "classes": data.n_classes,
        "kernel_path": ts.kernel_path(torch.empty(1)),
    }


def synthetic_rows(mean: np.ndarray, std: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` float32 rows drawn per feature from a normal with the Iris features' mean and std."""
    rng = np.random.default_rng(seed)
    return rng.normal(mean, std, size=(n, mean.shape[0])).astype(np.float32)


def build(name: str, workdir: Path, inputs: dict[str, np.ndarray]) -> tuple[Predict, str, str]:
    """(predict_proba, threads, notes) of one provider; imports only what it serves with.

    Raises:
        Unavailable: the provider's package is not installed.
    """
    ort_threads = f"onnxruntime default ({cpu_count()} logical CPUs)"
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
        threads = f"torch {torch.get_num_threads()}"
        if name == "torch eager":

            def eager(x: np.ndarray) -> np.ndarray:
                with torch.inference_mode():
                    return model(torch.from_numpy(x)).numpy()

            return eager, threads, f"kernel path: {ts.kernel_path(torch.empty(1))}"
        linear, mean, std = model.linear, model.feature_mean, model.feature_std

        def plain(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return torch.softmax(linear((torch.from_numpy(x) - mean) / std), dim=-1).numpy()

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
    if name == "scikit-learn":
        if package_version("scikit-learn") is None:
            raise Unavailable("skipped: not installed (pip install scikit-learn)")
        from sklearn.linear_model import LogisticRegression

        lr = LogisticRegression()
        # The fitted state predict_proba reads: multinomial softmax of x @ coef_.T + intercept_.
        lr.coef_, lr.intercept_ = w.astype(np.float64), b.astype(np.float64)
        lr.classes_ = np.arange(w.shape[0])
        lr.n_features_in_ = w.shape[1]
        lr.n_iter_ = np.array([0])
        return lr.predict_proba, "BLAS default", ""
    raise ValueError(f"unknown provider {name!r}")


def _timings(predict: Predict, x: np.ndarray, calls: int) -> list[int]:
    times = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        predict(x)
        times.append(time.perf_counter_ns() - start)
    return times


def measure(name: str, workdir: Path, smoke: bool) -> list[dict[str, object]]:
    """One provider: check against torch eager, then batch 1 and every size (worker side)."""
    inputs = dict(np.load(workdir / "inputs.npz"))
    sizes = SMOKE_SIZES if smoke else SIZES
    reps = SMOKE_REPS if smoke else REPS
    try:
        predict, threads, notes = build(name, workdir, inputs)
    except Unavailable as e:
        return [dict(provider=name, rows=n, status=str(e)) for n in (1, *sizes)]
    err = float(np.abs(predict(inputs["check"]).astype(np.float64) - inputs["reference"]).max())
    base = dict(provider=name, threads=threads, notes=notes, max_abs_err=err)
    if not err <= ATOL:
        status = f"mismatch: max abs err {err:.3g} > {ATOL:g} vs torch eager"
        return [dict(base, rows=n, status=status) for n in (1, *sizes)]
    results = []
    for n in (1, *sizes):
        x = synthetic_rows(inputs["mean"], inputs["std"], n, seed=n)
        calls = (SMOKE_BATCH1_CALLS if smoke else BATCH1_CALLS) if n == 1 else reps[n]
        _timings(predict, x, max(2, calls // 10))  # warm-up
        results.append(dict(base, rows=n, times_ns=_timings(predict, x, calls)))
    return results


def summarize(rows: Sequence[dict[str, object]]) -> dict[str, object]:
    """One provider and size over all rounds: the rounds' timings pooled into p50 / p99 / mean,
    and the lowest and highest p50 of a single round (how much the machine drifted)."""
    row = {k: v for k, v in rows[0].items() if k != "times_ns"}
    if row.get("status", "ok") != "ok":
        return row
    rounds = [np.asarray(r["times_ns"], dtype=np.float64) / 1e3 for r in rows]
    us = np.concatenate(rounds)
    p50 = float(np.percentile(us, 50))
    round_p50 = [float(np.percentile(t, 50)) for t in rounds]
    row.update(
        p50_us=p50,
        p99_us=float(np.percentile(us, 99)),
        mean_us=float(us.mean()),
        p50_round_min_us=min(round_p50),
        p50_round_max_us=max(round_p50),
        calls=int(us.size),
        rows_per_s=row["rows"] / (p50 * 1e-6),
    )
    return row


def run_worker(name: str, workdir: Path, smoke: bool) -> list[dict[str, object]]:
    """``measure`` in a fresh process (``--worker``); its rows come back through a JSON file."""
    out = workdir / f"worker-{slug(name)}.json"
    cmd = [sys.executable, "-m", "benchmarks.serving", "--worker", name, "--dir", str(workdir)]
    done = subprocess.run(
        [*cmd, *(["--smoke"] if smoke else [])],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0 or not out.exists():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return [dict(provider=name, rows=1, status=f"error: worker failed: {last}")]
    return json.loads(out.read_text())


def _versions() -> str:
    names = ("onnxruntime", "torch", "numpy", "scikit-learn", "onnx")
    parts = [f"python {platform.python_version()}"]
    parts += [f"{n} {package_version(n)}" for n in names if package_version(n)]
    return "; ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the serving benchmark; returns the exit code."""
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.serving",
        description=__doc__.split("\n\n")[0],
    )
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder")
    ap.add_argument("--no-report", action="store_true", help="CSV only")
    ap.add_argument("--update-readme", action="store_true", help="regenerate the README section")
    ap.add_argument("--provider", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    ap.add_argument("--rounds", type=int, default=5, help="rounds over all providers (default 5)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        rows = measure(args.worker, args.dir, args.smoke)
        (args.dir / f"worker-{slug(args.worker)}.json").write_text(json.dumps(rows))
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        facts = prepare(workdir, epochs=3 if args.smoke else None)
        if facts["kernel_path"] != "torch" and not args.smoke:
            print(
                f"torch eager would run {facts['kernel_path']!r} on the CPU (TRITON_INTERPRET=1?): "
                "its timings would not be torch's. Unset TRITON_INTERPRET and run again.",
                file=sys.stderr,
            )
            return 2
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
        machine = cpu_description()
        print(f"machine: {machine}; 1-minute load average at the start: {load:.2f}", flush=True)
        base = Row(
            provider="",
            rows=0,
            machine=machine,
            model=f"Iris softmax regression ({facts['features']} features → {facts['classes']} "
            "classes), ONNX",
            versions=_versions(),
            load_avg=load,
        )
        # Rounds rotate the provider order, so that a slow spell of the machine does not land
        # on one provider only; each round's timings are pooled.
        rounds = 1 if args.smoke else args.rounds
        got: dict[tuple[str, int], list[dict[str, object]]] = {}
        for k in range(rounds):
            order = [*args.provider[k:], *args.provider[:k]]
            for name in order:
                for r in run_worker(name, workdir, args.smoke):
                    got.setdefault((name, r["rows"]), []).append(r)
            print(f"round {k + 1}/{rounds} done", flush=True)
        rows = [
            dataclasses.replace(base, **summarize(got[key]))
            for key in sorted(got, key=lambda key: (args.provider.index(key[0]), key[1]))
        ]
        for name in args.provider:
            print(
                f"{name:24s} "
                + ", ".join(
                    f"{_size(r.rows)} {r.p50_us:.1f} µs" if r.status == "ok" else r.status
                    for r in rows
                    if r.provider == name
                ),
                flush=True,
            )
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    print(f"1-minute load average at the end: {load_end:.2f}")
    for r in rows:
        r.load_avg_end = load_end
    stem = ("serving-smoke_" if args.smoke else "serving_") + slug(cpu_model())
    csv_path = args.out / f"{stem}.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in rows)
    print(f"wrote {csv_path}")
    from benchmarks import report

    if not args.no_report:
        for written in report.write_serving_report(csv_path):
            print(f"wrote {written}")
    if args.update_readme:
        print(f"updated {report.update_readme()}")
    return 0


def _size(n: int) -> str:
    return "batch 1" if n == 1 else f"{n:.0e}".replace("e+0", "e")


if __name__ == "__main__":
    sys.exit(main())
