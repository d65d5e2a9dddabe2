"""What the benchmarks share: machine and version names, the kernel-path refusal, timers, child
processes, the Iris model, CSV in and out, markdown and the RESULTS.md sections."""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: The repository root (git runs there).
REPO = Path(__file__).resolve().parent.parent
#: The page of generated results: one section per benchmark, between markers.
RESULTS_PAGE = REPO / "benchmarks" / "RESULTS.md"
#: Exit statuses: our ops would not take the plain-torch path; a provider disagrees with ours.
REFUSAL_EXIT, MISMATCH_EXIT = 2, 3


def parser(
    module: str, doc: str, smoke: str | None = None, out: bool = True
) -> argparse.ArgumentParser:
    """``python -m benchmarks.<module>``'s parser, ``doc`` as its help, with ``--out`` (default
    ``benchmarks/results``) unless ``out`` is False and, where ``smoke`` gives its help,
    ``--smoke``."""
    ap = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{module}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if smoke:
        ap.add_argument("--smoke", action="store_true", help=smoke)
    if out:
        ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder")
    return ap


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions(names: Iterable[str], commit: bool = False) -> str:
    """``"python 3.11.7; torch 2.13.0+cpu; ..."`` for the installed ones among ``names``, and
    `` (commit abc1234)`` when ``commit``."""
    found = [f"{n} {package_version(n)}" for n in names if package_version(n)]
    text = "; ".join([f"python {platform.python_version()}", *found])
    return text + (f" (commit {git_commit()})" if commit else "")


def git_commit() -> str:
    """The clone's commit, ``+dirty`` when ``triton_softmax/`` has uncommitted changes."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    return sha + ("+dirty" if git("status", "--porcelain", "--", "triton_softmax") else "")


def cpu_model() -> str:
    """The CPU model as ``/proc/cpuinfo`` names it (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_count() -> int:
    """Logical CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_description() -> str:
    """For example ``"AMD EPYC, 2 logical CPUs, Linux x86_64"``."""
    return f"{cpu_model()}, {cpu_count()} logical CPUs, {platform.system()} {platform.machine()}"


def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan


def measured_on(row: dict, threads: bool = False, extra: Sequence[str] = ()) -> str:
    """The "measured on" preamble of a result: the machine (and torch's thread count), the load
    average at the start and end, the versions and ``extra`` facts; no final period."""
    load = f"1-minute load average {row['load_avg']:.2f} at the start, "
    facts = "; ".join([load + f"{row['load_avg_end']:.2f} at the end", row["versions"], *extra])
    if threads:
        return f"Measured on {row['machine']}, torch threads {row['threads']} ({facts})"
    return f"Measured on {row['machine']}; {facts}"


def busy_note(row: dict, what_holds: str) -> str:
    """A warning when other processes kept the machine busy (load average >= 1), else ""."""
    if max(row["load_avg"], row["load_avg_end"]) < 1:
        return ""
    return (
        " Other processes were busy on the machine (load average ≥ 1): absolute times are "
        f"inflated and noisy; {what_holds}."
    )


def refuses_kernel_path() -> bool:
    """True, and why on stderr, when our ops would not take their plain-torch path here (a GPU,
    or ``TRITON_INTERPRET``): a CPU-path benchmark must not time anything else."""
    import torch

    import triton_softmax as ts

    path = ts.kernel_path(torch.empty(1))
    if path != "torch":
        print(
            f"our ops would run {path!r} here, not the plain-torch path: unset TRITON_INTERPRET "
            "(and run without a GPU) to measure the CPU path.",
            file=sys.stderr,
        )
    return path != "torch"


def assert_close(out: Sequence, ref: Sequence) -> float:
    """``torch.testing.assert_close`` per output (rtol 1e-4, atol 1e-5 of the reference's largest
    magnitude; AssertionError on a mismatch or a different count); max |out - ref| / max |ref|."""
    import torch

    assert len(out) == len(ref), f"{len(out)} outputs, the reference gives {len(ref)}"
    worst = 0.0
    for a, b in zip(out, ref, strict=True):
        scale = max(b.abs().max().item() if b.numel() else 0.0, 1e-30)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)
        worst = max(worst, (a - b).abs().max().item() / scale if b.numel() else 0.0)
    return worst


def time_rounds(
    fns: dict[str, Callable], rounds: int, calls: dict[str, int] | None = None
) -> dict[str, list[float]]:
    """Seconds per call of each function, one block of ``calls[name]`` calls (default 1) per
    function and round, in an order that rotates round to round (so that a slow spell of a
    shared machine falls on every function of a round), garbage collection off."""
    names, times = list(fns), {name: [] for name in fns}
    gc.disable()
    try:
        for k in range(rounds):
            for name in names[k % len(names) :] + names[: k % len(names)]:
                n = (calls or {}).get(name, 1)
                start = time.perf_counter()
                for _ in range(n):
                    fns[name]()
                times[name].append((time.perf_counter() - start) / n)
    finally:
        gc.enable()
    return times


def start_module(args: Sequence[str], cpu_only: bool = True, **env: str) -> subprocess.Popen:
    """``python -m benchmarks.<args>`` from the repository root, output piped; ``cpu_only``:
    without ``TRITON_INTERPRET`` and a visible GPU (our CPU path); ``env``: more variables."""
    environ = {k: v for k, v in os.environ.items() if not (cpu_only and k == "TRITON_INTERPRET")}
    environ |= {"CUDA_VISIBLE_DEVICES": ""} if cpu_only else {}
    cmd = [sys.executable, "-m", f"benchmarks.{args[0]}", *args[1:]]
    return subprocess.Popen(
        cmd, cwd=REPO, env=environ | env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def json_result(process: subprocess.Popen, what: str, timeout: float = 900) -> object:
    """The JSON that ``process`` printed on its last line; RuntimeError with the end of its
    stderr when it failed."""
    out, err = process.communicate(timeout=timeout)
    if process.returncode != 0 or not out.strip():
        raise RuntimeError(f"{what} failed: {err.strip()[-400:] or 'no output'}")
    return json.loads(out.strip().splitlines()[-1])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def iris_model(workdir: Path, epochs: int | None = None) -> tuple[object, object]:
    """Train the Iris model on the CPU with the project's API, export ``workdir/model.onnx``
    (verified against the model) and save ``workdir/model.safetensors``: (the data, the model)."""
    from triton_softmax.export.onnx_export import export_and_verify
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
    return data, model


def iris_like_rows(mean, std, n: int, seed: int):
    """``n`` float32 rows drawn per feature from a normal with the Iris features' ``mean`` and
    ``std`` (numpy arrays)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.normal(mean, std, size=(n, mean.shape[0])).astype(np.float32)


def slug(text: str) -> str:
    """File-name-safe lower case: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "unknown"


def stem(name: str, smoke: bool) -> str:
    """A result's file stem: ``cpu_path_<cpu>``, or ``cpu_path-smoke_<cpu>`` (kept out of
    RESULTS.md, whose sections read ``<name>_*.csv``)."""
    return f"{name}{'-smoke' if smoke else ''}_{slug(cpu_model())}"


def write_results(csv_path: Path, rows: Sequence[dict], write_report: Callable) -> Path:
    """The CSV, then ``write_report(csv_path)``'s files; each one's path printed."""
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    for written in [write_csv(csv_path, rows), *write_report(csv_path)]:
        print(f"wrote {written}")
    return csv_path


def write_csv(path: Path, rows: Sequence[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict]:
    """A benchmark CSV as dicts: integers and floats parsed ("nan" too), the rest as text."""

    def parse(value: str) -> object:
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
        return value

    with open(path, newline="", encoding="utf-8") as f:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def md_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """A markdown table, first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def bullets(notes: Iterable[str]) -> list[str]:
    """A blank line and the sorted notes as a markdown list; nothing without notes."""
    notes = sorted(set(notes))
    return ["", *[f"- {s}" for s in notes]] if notes else []


def write_markdown(path: Path, lines: Sequence[str]) -> Path:
    """``lines`` joined into ``path``, one final newline."""
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None (and a note) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install -e '.[bench]')")
        return None
    return plt


def link(path: Path, text: str) -> str:
    """A markdown link to ``path`` relative to RESULTS.md."""
    try:
        rel = path.resolve().relative_to(RESULTS_PAGE.parent).as_posix()
    except ValueError:
        rel = path.as_posix()
    return f"[{text}]({rel})"


def files_line(csv_path: Path) -> str:
    """``Files: [csv](…), [md](…)[, [png](…)].``: a result's files, linked from RESULTS.md."""
    files = [csv_path, csv_path.with_suffix(".md"), csv_path.with_suffix(".png")]
    links = [link(p, p.suffix[1:]) for p in files if p.suffix != ".png" or p.exists()]
    return f"Files: {', '.join(links)}."


def results_section(
    title: str, intro: str, csvs: Iterable[Path], body: Callable, none_yet: str
) -> str:
    """A RESULTS.md section: ``## title``, ``intro``, then per CSV ``body(path)``'s lines and its
    files; ``none_yet`` without CSVs."""
    lines, csvs = [f"## {title}", "", intro, ""], sorted(csvs)
    for path in csvs:
        lines += [*body(path), "", files_line(path), ""]
    return "\n".join(lines if csvs else [*lines, none_yet]) + "\n"


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with what lies between ``<!-- name:start -->`` and ``<!-- name:end -->`` replaced
    by ``body``; ValueError when the markers are missing."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"markers {start} / {end} not found")
    return pattern.sub(lambda _: f"{start}\n{body.rstrip()}\n{end}", text, count=1)


def status_kib(key: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process from ``/proc/self/status``, in KiB."""
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def reset_high_water_mark() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True
