"""What the benchmarks share: machine and version names, CSV in and out, RESULTS.md sections."""

from __future__ import annotations

import csv
import math
import os
import platform
import re
import subprocess
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: The repository root (git runs there).
REPO = Path(__file__).resolve().parent.parent
#: The page of generated results: one section per benchmark, between markers.
RESULTS_PAGE = REPO / "benchmarks" / "RESULTS.md"


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions(names: Iterable[str]) -> str:
    """``"python 3.11.7; torch 2.13.0+cpu; ..."`` for the installed ones among ``names``."""
    found = [f"{n} {package_version(n)}" for n in names if package_version(n)]
    return "; ".join([f"python {platform.python_version()}", *found])


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
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan


def slug(text: str) -> str:
    """File-name-safe lower case: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "unknown"


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
