"""Serving benchmark on a CPU: the trained Iris model through onnxruntime, torch eager and numpy.

    python -m benchmarks.serving                     # about a minute; results in benchmarks/results
    python -m benchmarks.serving --smoke --out DIR   # tiny sizes, seconds (the test suite runs it)

The model is trained on the embedded Iris data and exported with the project's own API
(``triton_softmax.regression.train``, ``export.onnx_export.export_and_verify``), then served by:

- ``onnxruntime``: a plain ``InferenceSession.run`` of the exported file (CPU provider);
- ``OnnxClassifier``: the project's serving wrapper (``export.runtime``), which also validates the
  input (shape, dtype, NaN/inf) on every call;
- ``torch eager``: the trained ``SoftmaxRegression`` itself (its softmax is ``triton_softmax``'s op,
  which on a CPU without the interpreter is the op's plain-torch path), under ``inference_mode``;
- ``torch eager (F.softmax)``: the same Linear layer with ``torch.softmax``, without our op;
- ``numpy``: the same weights, normalisation folded in, matmul + stable softmax;
- ``scikit-learn``: ``LogisticRegression.predict_proba`` with the same weights, when installed.

All take and return numpy arrays (conversions count). Before timing, every provider's
probabilities are checked against torch eager. Batch 1: p50 / p99 latency of single-row calls.
Larger batches (1e3 ... 1e6 rows): p50 / p99 of whole-batch calls and rows per second from the p50.
Providers are timed in rounds of consecutive calls, so that slow drifts in background load hit
them alike.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from benchmarks.machine import cpu_description, cpu_model, package_version, slug

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SIZES = (1_000, 10_000, 100_000, 1_000_000)
#: Whole-batch calls timed per size and provider.
REPS = {1_000: 400, 10_000: 100, 100_000: 24, 1_000_000: 8}
BATCH1_CALLS = 4000
ROUNDS = 4
SMOKE_SIZES = (1_000,)
SMOKE_REPS = 3
SMOKE_BATCH1_CALLS = 24
#: Largest |p - p_torch| accepted (fp32 probabilities of a 4 -> 3 model).
ATOL = 1e-5

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


@dataclasses.dataclass
class Served:
    """A provider: its name, its predict_proba, its thread count, and why it cannot run."""

    name: str
    predict: Predict | None
    threads: str = ""
    skip: str = ""
    notes: str = ""


def train_and_export(workdir: Path, epochs: int | None = None):
    """Train on Iris and export to ``workdir/model.onnx`` with the project's API.

    Returns:
        (model on the CPU in eval mode, path of the ONNX file, the Dataset).
    """
    from export.onnx_export import export_and_verify
    from triton_softmax.regression import TrainConfig, load_iris, train

    data = load_iris()
    config = TrainConfig() if epochs is None else TrainConfig(epochs=epochs)
    run = train(data, config, device="cpu", reference=False)
    path = workdir / "model.onnx"
    export_and_verify(
        run.model,
        path,
        run.test.features,
        feature_names=data.feature_names,
        class_names=data.class_names,
    )
    return run.model.cpu().eval(), path, data


def folded_weights(model) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) with the standardisation folded in: ``softmax(x @ W.T + b)`` is the model.

    ``linear((x - mean) / std) = x @ (W / std).T + (b - (W / std) @ mean)``.
    """
    w = model.linear.weight.detach().double() / model.feature_std.double()
    b = model.linear.bias.detach().double() - w @ model.feature_mean.double()
    return w.float().numpy(), b.float().numpy()


def providers(model, onnx_path: Path) -> list[Served]:
    """The serving paths compared, each with numpy in and numpy out."""
    import onnxruntime as ort
    import torch

    from export.runtime import OnnxClassifier

    served = []
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ort_threads = f"default ({os.cpu_count()} cores)"
    served.append(
        Served(
            "onnxruntime", lambda x: sess.run(["probabilities"], {"features": x})[0], ort_threads
        )
    )
    clf = OnnxClassifier(onnx_path, providers=["CPUExecutionProvider"])
    served.append(Served("OnnxClassifier", clf.predict_proba, ort_threads, notes="validates input"))

    torch_threads = str(torch.get_num_threads())

    def torch_model(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    import triton_softmax as ts

    path = ts.kernel_path(torch.empty(1))
    served.append(Served("torch eager", torch_model, torch_threads, notes=f"kernel path: {path}"))

    linear, mean, std = model.linear, model.feature_mean, model.feature_std

    def torch_plain(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.softmax(linear((torch.from_numpy(x) - mean) / std), dim=-1).numpy()

    served.append(Served("torch eager (F.softmax)", torch_plain, torch_threads))

    w, b = folded_weights(model)
    wt = np.ascontiguousarray(w.T)

    def numpy_softmax(x: np.ndarray) -> np.ndarray:
        z = x @ wt + b
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        return z

    served.append(Served("numpy", numpy_softmax, "BLAS default"))
    served.append(_sklearn(w, b))
    return served


def _sklearn(w: np.ndarray, b: np.ndarray) -> Served:
    if package_version("scikit-learn") is None:
        return Served(
            "scikit-learn", None, skip="skipped: not installed (pip install scikit-learn)"
        )
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression()
    # The fitted state predict_proba reads: multinomial softmax of x @ coef_.T + intercept_.
    lr.coef_, lr.intercept_ = w.astype(np.float64), b.astype(np.float64)
    lr.classes_ = np.arange(w.shape[0])
    lr.n_features_in_ = w.shape[1]
    lr.n_iter_ = np.array([0])
    return Served("scikit-learn", lr.predict_proba, "BLAS default")


def synthetic_rows(data, n: int, seed: int = 0) -> np.ndarray:
    """``n`` float32 rows drawn per feature from a normal fitted to the Iris features."""
    rng = np.random.default_rng(seed)
    mean, std = data.features.mean(axis=0), data.features.std(axis=0)
    return rng.normal(mean, std, size=(n, data.n_features)).astype(np.float32)


def _percentiles(times_ns: Sequence[int]) -> tuple[float, float, float]:
    us = np.asarray(times_ns, dtype=np.float64) / 1e3
    return float(np.percentile(us, 50)), float(np.percentile(us, 99)), float(us.mean())


def time_rounds(
    served: Sequence[Served], x: np.ndarray, calls: int, rounds: int
) -> dict[str, list[int]]:
    """Per provider, about ``calls`` timings (ns) of ``predict(x)``, taken in ``rounds`` rounds;
    each round gives every provider one block of consecutive calls after a pause and a warm-up
    call. Blocks keep one provider's thread pool (onnxruntime's spins after each run) from
    slowing the next provider's calls; rounds spread slow drifts in background load over all."""
    times: dict[str, list[int]] = {s.name: [] for s in served}
    per_round = max(1, math.ceil(calls / rounds))
    for _ in range(rounds):
        for s in served:
            time.sleep(0.02)
            s.predict(x)
            out = times[s.name]
            for _ in range(per_round):
                start = time.perf_counter_ns()
                s.predict(x)
                out.append(time.perf_counter_ns() - start)
    return times


def run(
    served: Sequence[Served],
    data,
    sizes: Sequence[int],
    batch1_calls: int,
    reps: dict[int, int] | int,
    base: Row,
) -> list[Row]:
    """Check every provider against torch eager, then time batch 1 and every size."""
    rows: list[Row] = []
    check_x = synthetic_rows(data, 1000, seed=1)
    reference = next(s for s in served if s.name == "torch eager").predict(check_x)
    ready = []
    errors: dict[str, float] = {}
    for s in served:
        if s.predict is None:
            continue
        err = float(np.abs(np.asarray(s.predict(check_x), dtype=np.float64) - reference).max())
        errors[s.name] = err
        if err <= ATOL:
            ready.append(s)

    def row(s: Served, n: int, **kw) -> Row:
        return dataclasses.replace(
            base, provider=s.name, rows=n, threads=s.threads, notes=s.notes,
            max_abs_err=errors.get(s.name, math.nan), **kw,
        )  # fmt: skip

    one = np.ascontiguousarray(check_x[:1])
    for s in ready:  # warm-up
        for _ in range(max(10, batch1_calls // 20)):
            s.predict(one)
    for n in (1, *sizes):
        if n == 1:
            times = time_rounds(ready, one, batch1_calls, ROUNDS)
        else:
            x = synthetic_rows(data, n, seed=n)
            for s in ready:
                s.predict(x)
            count = reps if isinstance(reps, int) else reps[n]
            times = time_rounds(ready, x, count, ROUNDS)
        for s in served:
            if s.predict is None:
                rows.append(row(s, n, status=s.skip))
            elif s not in ready:
                status = f"mismatch: max abs err {errors[s.name]:.3g} > {ATOL:g} vs torch eager"
                rows.append(row(s, n, status=status))
            else:
                p50, p99, mean = _percentiles(times[s.name])
                rows.append(
                    row(
                        s,
                        n,
                        p50_us=p50,
                        p99_us=p99,
                        mean_us=mean,
                        calls=len(times[s.name]),
                        rows_per_s=n / (p50 * 1e-6),
                    )  # fmt: skip
                )
        done = {r.provider: r for r in rows if r.rows == n and r.status == "ok"}
        print(
            f"{n:>9} rows: " + ", ".join(f"{k} {v.p50_us:.1f} µs" for k, v in done.items()),
            flush=True,
        )
    return rows


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
    args = ap.parse_args(argv)

    import torch

    import triton_softmax as ts

    path = ts.kernel_path(torch.empty(1))
    if path != "torch" and not args.smoke:
        print(
            f"torch eager would run {path!r} on the CPU (TRITON_INTERPRET=1?): its timings would "
            "not be torch's. Unset TRITON_INTERPRET and run again.",
            file=sys.stderr,
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model, onnx_path, data = train_and_export(Path(tmp), epochs=3 if args.smoke else None)
        served = providers(model, onnx_path)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
        base = Row(
            provider="",
            rows=0,
            machine=cpu_description(),
            model=f"Iris softmax regression ({data.n_features} features → {data.n_classes} "
            "classes), ONNX",
            versions=_versions(),
            load_avg=load,
        )
        print(f"machine: {base.machine}; 1-minute load average at start: {load:.2f}")
        if args.smoke:
            rows = run(served, data, SMOKE_SIZES, SMOKE_BATCH1_CALLS, SMOKE_REPS, base)
        else:
            rows = run(served, data, SIZES, BATCH1_CALLS, REPS, base)
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


if __name__ == "__main__":
    sys.exit(main())
