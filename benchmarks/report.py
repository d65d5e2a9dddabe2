"""Tables, plots and README sections generated from the benchmark CSVs (never typed by hand).

    python -m benchmarks.report                    # markdown + PNG for every CSV in results/
    python -m benchmarks.report --update-readme    # and the README's two benchmark sections

Kernel CSVs (``kernels_*.csv``) give one markdown file with a table per (op, mode, dtype, M) and
one PNG per (op, mode): GB/s against N, one line per provider, the copy bandwidth as a dashed line.
Serving CSVs (``serving_*.csv``) give a latency / throughput table, the ratio table and a PNG.
Plots need matplotlib (the ``bench`` extra); without it the tables are still written.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from benchmarks import serving

RESULTS_DIR = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"
PROVIDER_ORDER = (
    "triton-softmax",
    "triton-softmax-inplace",
    "torch",
    "torch.compile",
    "liger",
    "quack",
)
MODE_ORDER = ("forward", "backward", "forward+backward")
OP_ORDER = ("softmax", "log_softmax", "cross_entropy")
DTYPE_ORDER = ("fp32", "bf16", "fp16")
SERVING_ORDER = serving.PROVIDERS
SERVING_SIZES = (1, *serving.SIZES)  # batch 1, then the throughput sizes

Row = dict[str, object]

_INT_COLUMNS = {"M", "N", "bytes", "rows", "calls"}
_TEXT_COLUMNS = {
    "op", "mode", "dtype", "provider", "status", "bytes_formula", "kernel_path", "timer",
    "device", "versions", "notes", "machine", "model", "threads",
}  # fmt: skip


def read_csv(path: str | Path) -> list[Row]:
    """A benchmark CSV as dicts: integer and float columns parsed, empty floats as NaN."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for raw in csv.DictReader(f):
            row: Row = {}
            for key, value in raw.items():
                if key in _TEXT_COLUMNS:
                    row[key] = value
                elif key in _INT_COLUMNS:
                    row[key] = int(value) if value else 0
                else:
                    try:
                        row[key] = float(value) if value else math.nan
                    except ValueError:
                        row[key] = value
            rows.append(row)
    return rows


def _ordered(values: Iterable[str], order: Sequence[str]) -> list[str]:
    seen = list(dict.fromkeys(values))
    return sorted(seen, key=lambda v: (order.index(v) if v in order else len(order), v))


def _num(value: float) -> str:
    """Three significant digits, no exponent for the magnitudes tables show."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _tick(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _short_status(status: str) -> str:
    if status.startswith("skipped: not installed"):
        return "not installed"
    if "out of memory" in status or "needs about" in status:
        return "no memory"
    if status.startswith("skipped: time budget"):
        return "no time"
    return status.split(":")[0]


# ------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------


def _kernel_groups(rows: Sequence[Row]) -> list[tuple[str, str, str, int]]:
    keys = {(r["op"], r["mode"], r["dtype"], r["M"]) for r in rows}
    return sorted(
        keys,
        key=lambda k: (OP_ORDER.index(k[0]), MODE_ORDER.index(k[1]), DTYPE_ORDER.index(k[2]), k[3]),
    )


def _kernel_table(rows: Sequence[Row], op: str, mode: str, dtype: str, m: int) -> list[str]:
    sel = [r for r in rows if (r["op"], r["mode"], r["dtype"], r["M"]) == (op, mode, dtype, m)]
    providers = _ordered((r["provider"] for r in sel), PROVIDER_ORDER)
    shown = [p for p in providers if any(r["provider"] == p and r["status"] == "ok" for r in sel)]
    absent = [p for p in providers if p not in shown]
    cols = sorted({r["N"] for r in sel})
    by = {(r["N"], r["provider"]): r for r in sel}
    n_name = "V" if op == "cross_entropy" else "N"
    peers = [p for p in ("torch", "liger") if p in shown and p != "triton-softmax"]
    header = [n_name, *[f"{p} GB/s (% copy)" for p in shown], *[f"ours vs {p}" for p in peers]]
    lines = [f"### {op}, {mode}, {dtype}, M = {m}", ""]
    if sel[0]["bytes_formula"]:
        lines += [f"Bytes counted: {sel[0]['bytes_formula']}.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for n in cols:
        cells = [str(n)]
        for p in shown:
            r = by.get((n, p))
            if r is None:
                cells.append("")
            elif r["status"] == "ok":
                cells.append(f"{_num(r['gbps'])} ({_num(r['pct_copy_bw'])} %)")
            else:
                cells.append(_short_status(str(r["status"])))
        ours = by.get((n, "triton-softmax"))
        for p in peers:
            r = by.get((n, p))
            ok = ours and r and ours["status"] == "ok" and r["status"] == "ok"
            cells.append(f"{r['ms_p50'] / ours['ms_p50']:.2f}×" if ok else "")
        lines.append("| " + " | ".join(cells) + " |")
    peak = [r for r in sel if r["status"] == "ok" and not math.isnan(r["peak_mem_x_logits"])]
    if peak:
        mem_providers = _ordered((r["provider"] for r in peak), PROVIDER_ORDER)
        lines += [
            "",
            "Peak extra memory of one forward+backward, as a multiple of the logits' size:",
            "",
            "| V | " + " | ".join(mem_providers) + " |",
            "|" + "---:|" * (len(mem_providers) + 1),
        ]
        for n in cols:
            cells = [str(n)]
            for p in mem_providers:
                r = by.get((n, p))
                ok = r and r["status"] == "ok" and not math.isnan(r["peak_mem_x_logits"])
                cells.append(f"{r['peak_mem_x_logits']:.2f}×" if ok else "")
            lines.append("| " + " | ".join(cells) + " |")
    notes = sorted({f"{r['provider']}: {r['status']}" for r in sel if r["provider"] in absent})
    notes += sorted({f"{r['provider']} at {n_name} = {r['N']}: {r['status']}" for r in sel
                     if r["provider"] in shown and r["status"] != "ok"})  # fmt: skip
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return lines


def _kernel_header(rows: Sequence[Row], title: str) -> list[str]:
    first = rows[0]
    statuses = [r["status"] for r in rows]
    ok = sum(s == "ok" for s in statuses)
    mismatched = sum(str(s).startswith("mismatch") for s in statuses)
    return [
        f"{title}: {first['device']}",
        "",
        f"Versions: {first['versions']}. Timer: {first['timer']} (ms; median of the calls, "
        "20 %/80 % quantiles in the CSV).",
        f"Device-to-device copy bandwidth measured in the same run: {first['copy_gbps']:.0f} GB/s; "
        "each result's GB/s is also given as a percentage of it. GB/s counts the bytes the op "
        "must move (formula above each table), not what an implementation happens to move.",
        f"Every provider's output was checked against triton-softmax before it was timed: {ok} "
        f"rows timed, {mismatched} mismatched, {len(rows) - ok - mismatched} skipped or failed. "
        "'ours vs X' is X's time divided by ours (above 1: ours is faster).",
    ]


def kernel_markdown(rows: Sequence[Row], *, title: str = "# Kernel benchmark") -> str:
    """The full markdown report of one kernels CSV."""
    lines = _kernel_header(rows, title)
    for group in _kernel_groups(rows):
        lines += ["", *_kernel_table(rows, *group)]
    return "\n".join(lines) + "\n"


def kernel_plots(rows: Sequence[Row], out_dir: Path, stem: str) -> list[Path]:
    """One PNG per (op, mode): GB/s against N, a panel per (dtype, M); [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install -e '.[bench]')")
        return []
    written = []
    copy_gbps = rows[0]["copy_gbps"]
    for op in _ordered((r["op"] for r in rows), OP_ORDER):
        for mode in _ordered((r["mode"] for r in rows if r["op"] == op), MODE_ORDER):
            sel = [r for r in rows if r["op"] == op and r["mode"] == mode]
            panels = sorted({(r["dtype"], r["M"]) for r in sel},
                            key=lambda k: (DTYPE_ORDER.index(k[0]), k[1]))  # fmt: skip
            if not any(r["status"] == "ok" for r in sel):
                continue
            fig, axes = plt.subplots(
                1, len(panels), figsize=(max(6.5, 4.6 * len(panels)), 4.4), squeeze=False
            )
            for ax, (dtype, m) in zip(axes[0], panels, strict=True):
                for p in _ordered((r["provider"] for r in sel), PROVIDER_ORDER):
                    pts = sorted(
                        (r["N"], r["gbps"])
                        for r in sel
                        if (r["provider"], r["dtype"], r["M"]) == (p, dtype, m)
                        and r["status"] == "ok"
                    )
                    if pts:
                        ax.plot(*zip(*pts, strict=True), marker="o", label=p)
                if not math.isnan(copy_gbps):
                    ax.axhline(copy_gbps, color="gray", ls="--", lw=1, label="copy bandwidth")
                ax.set_xscale("log", base=2)
                ticks = sorted({r["N"] for r in sel})
                ax.set_xticks(ticks, [_tick(n) for n in ticks], fontsize=7, rotation=45)
                ax.minorticks_off()
                ax.set_xlabel("V (classes)" if op == "cross_entropy" else "N (columns)")
                ax.set_title(f"{dtype}, M = {m}")
                ax.grid(True, alpha=0.3)
            axes[0][0].set_ylabel("GB/s (bytes the op must move / median time)")
            axes[0][-1].legend(fontsize=8)
            fig.suptitle(f"{op} {mode} — {rows[0]['device']}", fontsize=9)
            fig.tight_layout()
            path = out_dir / f"{stem}_{op}_{mode.replace('+', '_')}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def write_kernel_report(csv_path: str | Path, *, plots: bool = True) -> list[Path]:
    """Write ``<stem>.md`` and the PNGs next to a kernels CSV; returns the paths written."""
    csv_path = Path(csv_path)
    rows = read_csv(csv_path)
    if not rows:
        return []
    md = csv_path.with_suffix(".md")
    md.write_text(kernel_markdown(rows), encoding="utf-8")
    written = [md]
    if plots:
        written += kernel_plots(rows, csv_path.parent, csv_path.stem)
    return written


# ------------------------------------------------------------------------------------------
# Serving
# ------------------------------------------------------------------------------------------


def _serving_by(rows: Sequence[Row]) -> dict[tuple[str, int], Row]:
    return {(r["provider"], r["rows"]): r for r in rows}


def _size_name(n: int) -> str:
    return "batch 1" if n == 1 else f"{n:.0e}".replace("e+0", "e") + " rows"


def serving_tables(rows: Sequence[Row]) -> list[str]:
    """Latency / throughput table and the ratio table of one serving CSV."""
    by = _serving_by(rows)
    providers = _ordered((r["provider"] for r in rows), SERVING_ORDER)
    sizes = sorted({r["rows"] for r in rows if r["rows"] > 1})
    header = [
        "provider",
        "batch 1 p50 µs",
        "rounds' p50 µs",
        "batch 1 p99 µs",
        *[f"{_size_name(n)}/s" for n in sizes],
    ]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for p in providers:
        one = by.get((p, 1))
        cells = [p]
        if one and one["status"] == "ok":
            spread = f"{one['p50_round_min_us']:.1f}–{one['p50_round_max_us']:.1f}"
            cells += [f"{one['p50_us']:.1f}", spread, f"{one['p99_us']:.1f}"]
        else:
            cells += [_short_status(str(one["status"])) if one else "", "", ""]
        for n in sizes:
            r = by.get((p, n))
            if r and r["status"] == "ok":
                cells.append(f"{r['rows_per_s'] / 1e6:.2f} M")
            else:
                cells.append(_short_status(str(r["status"])) if r else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *ratio_table(rows)]
    skipped = sorted({f"{r['provider']}: {r['status']}" for r in rows if r["status"] != "ok"})
    if skipped:
        lines += ["", *[f"- {s}" for s in skipped]]
    return lines


def _speedup(by: dict, fast: str, slow: str, n: int) -> float:
    a, b = by.get((fast, n)), by.get((slow, n))
    if not (a and b and a["status"] == "ok" and b["status"] == "ok"):
        return math.nan
    return b["p50_us"] / a["p50_us"]


def ratio_table(rows: Sequence[Row]) -> list[str]:
    """How many times faster onnxruntime (raw and through OnnxClassifier) is than the others,
    at batch 1 (p50 latency) and at 1e5 rows (p50 time of the batch; the largest size measured
    when 1e5 was not), with DESIGN.md's targets."""
    by = _serving_by(rows)
    present = {r["provider"] for r in rows if r["status"] == "ok"}
    sizes = {r["rows"] for r in rows if r["status"] == "ok" and r["rows"] > 1}
    if not sizes:
        return []
    big = 100_000 if 100_000 in sizes else max(sizes)
    lines = [
        "Speed-up of onnxruntime (p50 time of the other / p50 time of onnxruntime; above 1: "
        "onnxruntime is faster):",
        "",
        f"| | batch 1 | {_size_name(big)} |",
        "|---|---:|---:|",
    ]
    for fast in ("onnxruntime", "OnnxClassifier"):
        for slow in ("torch eager", "torch eager (F.softmax)", "numpy", "scikit-learn"):
            if fast in present and slow in present:
                s1, s5 = _speedup(by, fast, slow, 1), _speedup(by, fast, slow, big)
                lines.append(f"| {fast} vs {slow} | {s1:.2f}× | {s5:.2f}× |")
    targets = []
    for fast in ("onnxruntime", "OnnxClassifier"):
        s1, s5 = _speedup(by, fast, "torch eager", 1), _speedup(by, fast, "torch eager", big)
        if big == 100_000 and not (math.isnan(s1) or math.isnan(s5)):
            met5 = "met" if s5 >= 2.0 else "NOT met"
            met1 = "met" if s1 >= 1.0 else "NOT met"
            targets.append(
                f"- {fast}: ≥ 2× torch eager at 1e5 rows: {met5} ({s5:.2f}×); "
                f"no slower at batch 1: {met1} ({s1:.2f}×)"
            )
    if targets:
        lines += ["", "Targets (DESIGN.md §4, torch eager = the trained model):", "", *targets]
    return lines


def serving_markdown(rows: Sequence[Row]) -> str:
    """The full markdown report of one serving CSV."""
    first = rows[0]
    lines = [
        f"# Serving benchmark: {first['model']}",
        "",
        f"Machine: {first['machine']}; 1-minute load average {first['load_avg']:.2f} at the "
        f"start, {first['load_avg_end']:.2f} at the end. Versions: {first['versions']}.",
        "",
        "Batch 1: latency of single-row calls (p50 / p99 over all calls of all rounds; "
        '"rounds\' p50": the lowest and highest p50 of a single round, i.e. how much the '
        "machine drifted). Larger batches: rows per second from the p50 time of one call on the "
        "whole batch. Each provider ran in a process of its own; every provider's "
        "probabilities were checked against torch eager before timing.",
        "",
        *serving_tables(rows),
    ]
    return "\n".join(lines) + "\n"


def serving_plot(rows: Sequence[Row], path: Path) -> Path | None:
    """Batch-1 latency bars and throughput against batch size; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install -e '.[bench]')")
        return None
    providers = _ordered((r["provider"] for r in rows if r["status"] == "ok"), SERVING_ORDER)
    by = _serving_by(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    one = [(p, by[(p, 1)]) for p in providers if (p, 1) in by and by[(p, 1)]["status"] == "ok"]
    left.bar([p for p, _ in one], [r["p50_us"] for _, r in one], label="p50")
    left.scatter([p for p, _ in one], [r["p99_us"] for _, r in one], color="k", marker="_",
                 s=400, label="p99", zorder=3)  # fmt: skip
    left.set_yscale("log")
    left.set_ylabel("µs per single-row call (log scale)")
    left.set_title("batch-1 latency (lower is better)")
    left.tick_params(axis="x", labelrotation=20, labelsize=8)
    left.legend(fontsize=8)
    for p in providers:
        pts = sorted((r["rows"], r["rows_per_s"]) for r in rows
                     if r["provider"] == p and r["rows"] > 1 and r["status"] == "ok")  # fmt: skip
        if pts:
            right.plot(*zip(*pts, strict=True), marker="o", label=p)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("rows per call")
    right.set_ylabel("rows / s")
    right.set_title("throughput (higher is better)")
    right.grid(True, alpha=0.3, which="both")
    right.legend(fontsize=8)
    fig.suptitle(f"{rows[0]['model']} — {rows[0]['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_serving_report(csv_path: str | Path, *, plots: bool = True) -> list[Path]:
    """Write ``<stem>.md`` and ``<stem>.png`` next to a serving CSV; returns the paths written."""
    csv_path = Path(csv_path)
    rows = read_csv(csv_path)
    if not rows:
        return []
    md = csv_path.with_suffix(".md")
    md.write_text(serving_markdown(rows), encoding="utf-8")
    written = [md]
    if plots and (png := serving_plot(rows, csv_path.with_suffix(".png"))):
        written.append(png)
    return written


# ------------------------------------------------------------------------------------------
# README sections
# ------------------------------------------------------------------------------------------


def kernel_csvs(results_dir: Path = RESULTS_DIR) -> list[Path]:
    """Full-run kernel CSVs (smoke runs excluded)."""
    return sorted(results_dir.glob("kernels_*.csv"))


def serving_csvs(results_dir: Path = RESULTS_DIR) -> list[Path]:
    return sorted(results_dir.glob("serving_*.csv"))


def _rel(path: Path, readme: Path) -> str:
    try:
        return path.resolve().relative_to(readme.resolve().parent).as_posix()
    except ValueError:
        return path.as_posix()


def readme_kernels_section(results_dir: Path = RESULTS_DIR, readme: Path = README) -> str:
    """The README's kernel-benchmark section, from the kernel CSVs in ``results_dir``."""
    from benchmarks import kernels

    grid = (
        f"softmax and log_softmax over M ∈ {{{', '.join(map(str, kernels.DEFAULT_ROWS))}}} rows × "
        f"N ∈ {{{', '.join(map(str, kernels.DEFAULT_COLS))}}}; cross-entropy over "
        f"BT = {kernels.CE_ROWS[0]} rows × V ∈ {{{', '.join(map(str, kernels.CE_VOCABS))}}}; "
        f"{' and '.join(kernels.DEFAULT_DTYPES)}, {' and '.join(kernels.DEFAULT_MODES)}"
    )
    lines = [
        "## Benchmarks: kernels",
        "",
        "`python -m benchmarks.kernels` times our kernels against torch eager, `torch.compile`, "
        "Liger-Kernel and quack (when installed) in one process on one GPU, after checking each "
        f"output against ours: {grid}. It writes a CSV named after the GPU and library versions "
        "to `benchmarks/results/`, a markdown table and plots; `python -m benchmarks.report "
        "--update-readme` regenerates this section from the CSVs. Details: "
        "[benchmarks/README.md](benchmarks/README.md).",
        "",
    ]
    csvs = kernel_csvs(results_dir)
    if not csvs:
        lines.append(
            "**No GPU numbers have been measured yet**: no session so far had a GPU, and the "
            "benchmark refuses to report CPU timings as kernel results (without CUDA it exits "
            "with an error; `--smoke` checks the harness itself on tiny shapes under the Triton "
            "interpreter)."
        )
        return "\n".join(lines) + "\n"
    for path in csvs:
        rows = read_csv(path)
        if not rows:
            continue
        lines += _kernel_header(rows, "### Measured on")
        m_small = (
            min(r["M"] for r in rows if r["op"] != "cross_entropy")
            if any(r["op"] != "cross_entropy" for r in rows)
            else None
        )
        for group in _kernel_groups(rows):
            op, mode, _, m = group
            if (op == "softmax" and mode == "forward" and m == m_small) or (
                op == "cross_entropy" and mode == "forward+backward"
            ):
                table = _kernel_table(rows, *group)
                table[0] = "#" + table[0]
                lines += ["", *table]
        md = path.with_suffix(".md")
        pngs = sorted(path.parent.glob(f"{path.stem}_*.png"))
        links = [f"[full table]({_rel(md, readme)})"] if md.exists() else []
        links += [f"[{p.stem.removeprefix(path.stem + '_')}]({_rel(p, readme)})" for p in pngs]
        lines += ["", f"All ops, modes and shapes: {', '.join(links)}.", ""]
    return "\n".join(lines).rstrip() + "\n"


def readme_serving_section(results_dir: Path = RESULTS_DIR, readme: Path = README) -> str:
    """The README's serving-benchmark section, from the serving CSVs in ``results_dir``."""
    lines = [
        "## Benchmarks: serving on a CPU",
        "",
        "`python -m benchmarks.serving` trains the Iris model, exports it to ONNX and times "
        "batch-1 latency and throughput up to 1e6 rows through onnxruntime (the raw session and "
        "the `OnnxClassifier` wrapper), torch eager, numpy and scikit-learn (when installed).",
        "",
    ]
    csvs = serving_csvs(results_dir)
    if not csvs:
        lines.append("No serving numbers have been measured yet.")
        return "\n".join(lines) + "\n"
    for path in csvs:
        rows = read_csv(path)
        if not rows:
            continue
        first = rows[0]
        lines += [
            f"Measured on {first['machine']} (1-minute load average {first['load_avg']:.2f} at "
            f"the start, {first['load_avg_end']:.2f} at the end; {first['versions']}):",
            "",
        ]
        lines += serving_tables(rows)
        extra = [path.with_suffix(".md"), path.with_suffix(".png")]
        links = [f"[{p.suffix[1:]}]({_rel(p, readme)})" for p in [path, *extra] if p.exists()]
        lines += ["", f"Files: {', '.join(links)}.", ""]
    return "\n".join(lines).rstrip() + "\n"


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with the content between ``<!-- name:start -->`` and ``<!-- name:end -->``
    replaced by ``body``; ValueError when the markers are missing."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"markers {start} / {end} not found")
    return pattern.sub(lambda _: f"{start}\n{body.rstrip()}\n{end}", text, count=1)


def update_readme(readme: Path = README, results_dir: Path = RESULTS_DIR) -> Path:
    """Regenerate the README's ``bench:kernels`` and ``bench:serving`` sections."""
    text = readme.read_text(encoding="utf-8")
    text = replace_section(text, "bench:kernels", readme_kernels_section(results_dir, readme))
    text = replace_section(text, "bench:serving", readme_serving_section(results_dir, readme))
    readme.write_text(text, encoding="utf-8")
    return readme


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    ap.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder with the CSVs")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--update-readme", action="store_true", help=f"rewrite sections of {README}")
    args = ap.parse_args(argv)
    for path in kernel_csvs(args.results):
        for written in write_kernel_report(path, plots=not args.no_plots):
            print(f"wrote {written}")
    for path in serving_csvs(args.results):
        for written in write_serving_report(path, plots=not args.no_plots):
            print(f"wrote {written}")
    if args.update_readme:
        print(f"updated {update_readme(README, args.results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
