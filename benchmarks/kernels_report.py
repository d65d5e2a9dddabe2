"""The kernel benchmark's report: markdown tables, plots and RESULTS.md's section, from the CSVs
that ``benchmarks.kernels`` writes (``python -m benchmarks.report`` runs it on every CSV).

One table per (op, mode, dtype, M), a line per N (V) and a column per provider that ran:
softmax, log_softmax and cross-entropy in GB/s over the minimum bytes (and % of the copy
bandwidth, and over the bytes really moved where those differ); the fused linear cross-entropy and
the RL head in TFLOP/s with peak MiB, its GEMMs alone (the ceiling) and peak over Cut
Cross-Entropy's. 'ours vs X' is X's time over ours; ✗ marks what misses docs/design.md's targets
(``benchmarks.targets``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from benchmarks import common, targets
from benchmarks.kernels import (
    CEILING,
    DTYPES,
    GRID,
    HIDDEN,
    LCE,
    OPS,
    PROVIDERS,
    RL,
    RL_TEMPERATURE,
    STAGES,
)


def _num(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _groups(rows: list[dict]) -> list[tuple]:
    keys = {(r["op"], r["mode"], r["dtype"], r["M"]) for r in rows}
    return sorted(keys, key=lambda k: (OPS.index(k[0]), k[1], list(DTYPES).index(k[2]), k[3]))


def _ok(*rows: dict | None) -> bool:
    return all(r and r["status"] == "ok" for r in rows)


def _ratio(value: float, bad: bool) -> str:
    return f"{value:.2f}×" + (" ✗" if bad else "")


def _flops_cell(r: dict) -> str:
    """TFLOP/s (ms), and the peak MiB where measured."""
    cell = f"{_num(r['tflops'])} ({_num(r['ms_p50'])} ms)"
    return cell + (
        f", {r['peak_mem_mib']:.0f} MiB" if r["peak_mem_mib"] == r["peak_mem_mib"] else ""
    )


def _bandwidth_cell(r: dict) -> str:
    """GB/s over the minimum bytes (% of copy), % of copy over the bytes moved, peak in logits."""
    cell = f"{_num(r['gbps_min'])} ({_num(r['pct_copy_min'])} %)"
    if r["bytes_moved"] and r["bytes_moved"] != r["bytes_min"]:
        cell += f", moved {_num(r['pct_copy_moved'])} %"
    return cell + (
        f", peak +{r['peak_mem_x_logits']:.2f}× logits" if r["peak_mem_x_logits"] > 0 else ""
    )


def _flops_heading(sel: list[dict], op: str, mode: str, fb: bool, ceiling: bool, mem: bool) -> str:
    text = ""
    if op == RL:
        text = f"Per-token loss and entropy at temperature {RL_TEMPERATURE:g} (reduction='none')"
        text += (
            "; backward of Σ a·loss + b·entropy, a and b random per row. " if "+" in mode else ". "
        )
    text += f"TFLOP/s over {sel[0]['flops_formula']} (ms: median)"
    if mem:
        text += ", peak: MiB allocated beyond the inputs by one call (gradients included)"
    text += ". 'ours vs X': X's time / ours."
    if ceiling:
        text += (
            f" {CEILING}: the GEMMs alone ({'X Wᵀ, dZ W, dZᵀ X' if fb else 'X Wᵀ'}, torch.matmul,"
            f" same shapes and dtypes), the ceiling; 'ours / {CEILING}': our time over theirs"
            + (f" (✗ above {targets.LCE_OVER_GEMMS:g}×)" if fb else "")
            + "."
        )
    if fb:
        text += (
            " ✗: misses docs/design.md's target (no slower than torch eager, ≥ 1.2× torch-chunked "
            "and Liger, peak ≤ CCE's)."
        )
    return text


def _bandwidth_heading(sel: list[dict]) -> str:
    moved: dict[str, list[str]] = {}
    for r in sel:
        if r["bytes_moved"] and r["moved_formula"] != r["min_formula"]:
            moved.setdefault(r["moved_formula"], []).append(r["provider"])
    legend = "; ".join(f"{', '.join(dict.fromkeys(p))} move {f}" for f, p in moved.items())
    return (
        f"GB/s over the minimum bytes, {sel[0]['min_formula']} (% of copy bandwidth)"
        + (f'; "moved": % of copy over the bytes really moved: {legend}' if moved else "")
        + "."
    )


def table(rows: list[dict], op: str, mode: str, dtype: str, m: int, level: str = "###") -> list:
    """One case group's table: per N (V) and provider its cell, then ours vs each peer's time.
    Fused linear cross-entropy and the RL head also get the ceiling (the GEMMs alone) and our
    peak over CCE's; their forward+backward (linear CE only) marks with ✗ what misses
    docs/design.md's targets."""
    sel = [r for r in rows if (r["op"], r["mode"], r["dtype"], r["M"]) == (op, mode, dtype, m)]
    shown = [p for p in PROVIDERS if any(r["provider"] == p and r["status"] == "ok" for r in sel)]
    by, fused = {(r["N"], r["provider"]): r for r in sel}, op in (LCE, RL)
    fb = fused and op == LCE and mode == "forward+backward"
    ceiling = fused and any(r["provider"] == CEILING and r["status"] == "ok" for r in sel)
    mem = fused and any(r["peak_mem_mib"] == r["peak_mem_mib"] for r in sel if r["status"] == "ok")
    n_name = "V" if fused or op == "cross_entropy" else "N"
    if fused:
        peers = [p for p in shown if p != "triton-softmax"]
        heading = [f"{level} {op}, {mode}, {dtype}, M = {m}, H = {sel[0]['H']}", ""]
        heading += [_flops_heading(sel, op, mode, fb, ceiling, mem), ""]
    else:
        peers = [p for p in ("torch", "liger") if p in shown]
        heading = [f"{level} {op}, {mode}, {dtype}, M = {m}", "", _bandwidth_heading(sel), ""]
    cell = _flops_cell if fused else _bandwidth_cell

    def status(r: dict | None) -> str:
        return cell(r) if _ok(r) else r["status"].split(":")[0] if r else ""

    columns: list[tuple[str, Callable]] = [
        (p, lambda n, ours, p=p: status(by.get((n, p)))) for p in shown
    ]
    for p in peers:

        def versus(n: int, ours: dict | None, p: str = p) -> str:
            r = by.get((n, p))
            if not _ok(ours, r):
                return ""
            ratio = r["ms_p50"] / ours["ms_p50"]
            return _ratio(ratio, fb and ratio < targets.LCE_SPEEDUP_OVER.get(p, 0))

        columns.append((f"ours vs {p}", versus))
    if ceiling:

        def over_ceiling(n: int, ours: dict | None) -> str:
            r = by.get((n, CEILING))
            if not _ok(ours, r):
                return ""
            ratio = ours["ms_p50"] / r["ms_p50"]
            return _ratio(ratio, fb and ratio > targets.LCE_OVER_GEMMS)

        columns += [(CEILING, lambda n, ours: status(by.get((n, CEILING))))]
        columns += [(f"ours / {CEILING}", over_ceiling)]
    if mem and "cce" in shown:

        def peak_over_cce(n: int, ours: dict | None) -> str:
            r = by.get((n, "cce"))
            if not _ok(ours, r):
                return ""
            ratio = ours["peak_mem_mib"] / r["peak_mem_mib"]
            return _ratio(ratio, fb and ratio > targets.LCE_PEAK_OVER_CCE)

        columns.append(("peak ours / cce", peak_over_cce))
    body = []
    for n in sorted({r["N"] for r in sel}):
        ours = by.get((n, "triton-softmax"))
        body.append([n, *[value(n, ours) for _, value in columns]])
    listed = [*shown, CEILING] if ceiling else shown
    notes = {f"{r['provider']}: {r['status']}" for r in sel if r["provider"] not in listed}
    notes |= {
        f"{r['provider']} at {n_name} = {r['N']}: {r['status']}"
        for r in sel
        if r["provider"] in listed and r["status"] != "ok"
    }
    if fused:
        notes |= {f"{r['provider']}: {r['notes']}" for r in sel if r["notes"] and _ok(r)}
    return (
        heading + common.md_table([n_name, *(h for h, _ in columns)], body) + common.bullets(notes)
    )


def _header(rows: list[dict], title: str) -> list[str]:
    r, ok = rows[0], sum(r["status"] == "ok" for r in rows)
    bad = sum(r["status"].startswith("mismatch") for r in rows)
    return [
        f"{title}: {r['device']}",
        "",
        f"Versions: {r['versions']}. Timer: {r['timer']}, ms: median, 20 %/80 % quantiles in the "
        f"CSV. Device-to-device copy bandwidth in the same run: {r['copy_gbps']:.0f} GB/s. Each "
        f"provider was checked against triton-softmax before timing: {ok} rows timed, {bad} "
        f"mismatched, {len(rows) - ok - bad} skipped or failed. 'ours vs X': X's time / ours "
        "(above 1: ours is faster). Peak: extra memory of one call (cross-entropy "
        "forward+backward, in logits; linear cross-entropy, in MiB).",
    ]


def plots(rows: list[dict], out_dir: Path, stem: str) -> list[Path]:
    """One PNG per (op, mode): GB/s over the minimum bytes against N, a panel per (dtype, M);
    linear_cross_entropy: TFLOP/s against V."""
    plt, written = common.pyplot(), []
    for op, mode in sorted(
        {(r["op"], r["mode"]) for r in rows if r["status"] == "ok"} if plt else ()
    ):
        sel = [r for r in rows if (r["op"], r["mode"]) == (op, mode)]
        panels = list(dict.fromkeys(g[2:] for g in _groups(sel)))
        fig, axes = plt.subplots(1, len(panels), figsize=(max(6.5, 4.6 * len(panels)), 4.4))
        metric = "tflops" if op in (LCE, RL) else "gbps_min"
        for ax, (dtype, m) in zip(getattr(axes, "flat", [axes]), panels, strict=True):
            for p in [*PROVIDERS, CEILING]:  # the ceiling: linear_cross_entropy's GEMMs
                pts = sorted(
                    (r["N"], r[metric])
                    for r in sel
                    if r["status"] == "ok" and (r["provider"], r["dtype"], r["M"]) == (p, dtype, m)
                )
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=p)
            if op not in (LCE, RL):
                ax.axhline(
                    rows[0]["copy_gbps"], color="gray", ls="--", lw=1, label="copy bandwidth"
                )
            ns = sorted({r["N"] for r in sel})
            ax.set_xscale("log", base=2)
            ax.set_xticks(ns, [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in ns])
            ax.set(
                title=f"{dtype}, M = {m}" + (f", H = {sel[0]['H']}" if op in (LCE, RL) else ""),
                ylabel=f"TFLOP/s ({sel[0]['flops_formula'].split()[0]} / time)"
                if op in (LCE, RL)
                else "GB/s (minimum bytes / time)",
                xlabel="V (classes)" if "cross_entropy" in op else "N (columns)",
            )
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{op} {mode} — {rows[0]['device']}", fontsize=9)
        fig.tight_layout()
        written.append(out_dir / f"{stem}_{op}_{mode.replace('+', '_')}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def write_report(csv_path: Path) -> list[Path]:
    """``<stem>.md`` and the PNGs next to a kernels CSV."""
    rows = common.read_csv(csv_path)
    lines = _header(rows, "# Kernel benchmark")
    for group in _groups(rows):
        lines += ["", *table(rows, *group)]
    md = common.write_markdown(csv_path.with_suffix(".md"), lines)
    return [md, *plots(rows, csv_path.parent, csv_path.stem)]


def readme_section(results_dir: Path = common.RESULTS_DIR) -> str:
    """RESULTS.md's kernel section: the grid; per GPU, softmax forward at the smallest M,
    cross-entropy forward+backward, linear cross-entropy and the RL head forward+backward."""
    (rows, cols), (bt, vocabs) = GRID["softmax"], GRID["cross_entropy"]
    lce_rows, lce_vocabs = GRID[LCE]
    set_ = lambda v: "{" + ", ".join(map(str, v)) + "}"  # noqa: E731
    lines = [
        "## Benchmarks: kernels",
        "",
        "`python -m benchmarks.kernels` times our kernels against torch eager, `torch.compile`, "
        "Liger-Kernel and quack (when installed) in one process on one GPU, after checking each "
        f"output against ours: softmax and log_softmax over M ∈ {set_(rows)} rows × N ∈ "
        f"{set_(cols)}; cross-entropy over BT = {bt[0]} rows × V ∈ {set_(vocabs)}; fp32 and bf16, "
        "forward and forward+backward; and the fused linear + cross-entropy, bf16, N ∈ "
        f"{set_(lce_rows)} rows × H = {HIDDEN} × V ∈ {set_(lce_vocabs)}, against torch eager "
        "(`F.linear` + `F.cross_entropy`), its `torch.compile`, torch's chunked "
        "`F.linear_cross_entropy` (torch ≥ 2.13), Liger's fused linear CE and Cut Cross-Entropy, "
        "in TFLOP/s (forward 2·N·V·H flops, forward+backward 6·N·V·H) with peak memory. For the "
        "other ops, GB/s is counted over the minimum bytes (1 read + 1 write "
        "for softmax forward and for cross-entropy forward+backward) and, where it differs, over "
        "the bytes a provider really moves (our cross-entropy forward+backward reads the logits "
        "twice, as Liger's does; our softmax reads twice only rows longer than half the "
        "GPU's SMs in 4096-element slices: 270 336 elements on an H100), each also as % of "
        "the copy bandwidth of the same run; the fused linear "
        "cross-entropy also as a ratio to its GEMMs alone (`torch.matmul`, same shapes), timed "
        "in the same run. The head for RL, per-token loss and entropy at a temperature "
        '(`linear_cross_entropy(..., reduction="none", temperature=T, return_entropy=True)`), '
        "forward+backward at the fused linear shapes, against the unfused torch computation "
        "(`log_softmax(F.linear(x, w).float() / T)`, gather, entropy), its `torch.compile` and "
        "Liger's `LigerFusedLinearScaledCrossEntropyFunction`, in TFLOP/s with peak memory. "
        "A CSV per GPU, markdown and plots go to "
        "`benchmarks/results/`; `python -m benchmarks.report --update-readme` regenerates this "
        "section. Details: [benchmarks/README.md](README.md).",
        "",
    ]
    csvs = sorted(results_dir.glob("kernels_*.csv"))
    if not csvs:
        lines.append(
            "**No GPU numbers have been measured yet**: no session so far had a GPU, and the "
            "benchmark refuses to report CPU timings as kernel results (without CUDA it exits "
            "with an error; `--smoke` checks the harness itself on tiny shapes under the Triton "
            "interpreter)."
        )
    for path in csvs:
        rows = common.read_csv(path)
        lines += _header(rows, "### Measured on")
        small = min((r["M"] for r in rows if r["op"] == "softmax"), default=None)
        shown = (STAGES[1], (LCE, "forward+backward"), (RL, "forward+backward"))
        for op, mode, dtype, m in _groups(rows):
            if (op, mode) in shown or (op, mode, m) == (*STAGES[0], small):
                lines += ["", *table(rows, op, mode, dtype, m, level="####")]
        pngs = sorted(path.parent.glob(f"{path.stem}_*.png"))
        links = [common.link(path.with_suffix(".md"), "full table")]
        links += [common.link(p, p.stem.removeprefix(path.stem + "_")) for p in pngs]
        lines += ["", f"All ops, modes and shapes: {', '.join(links)}.", ""]
    return "\n".join(lines).rstrip() + "\n"
