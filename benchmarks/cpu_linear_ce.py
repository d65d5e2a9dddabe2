"""Fused linear + cross-entropy on the CPU: our plain-torch path against torch's chunked
``F.linear_cross_entropy`` and the unfused eager computation.

    python -m benchmarks.cpu_linear_ce                    # N=8192, H=256, V=32768 fp32; minutes
    python -m benchmarks.cpu_linear_ce --smoke --out DIR  # tiny shape, seconds (the tests run it)

Providers, forward+backward of the mean loss (``torch.autograd.grad`` for input and weight, both
fp32 leaves; no bias), fp32:

    triton-softmax  triton_softmax.linear_cross_entropy(x, w, t) on its plain-torch path
    torch-chunked   F.linear_cross_entropy(x, w, t, options=torch.nn.LinearCrossEntropyOptions())
                    (torch >= 2.13; skipped where the installed torch lacks it)
    torch           F.cross_entropy(F.linear(x, w), t), which holds the [N, V] logits

docs/design.md's targets for our CPU path: time no more than torch's chunked op, peak extra memory
at most 0.1x the full fp32 logits (N * V * 4 bytes; 1 GiB at the default shape).

Loss and gradients are compared with torch eager's (``assert_close``, rtol 1e-4, atol 1e-5 of the
largest magnitude) before anything is timed. Time: ``--rounds`` rounds (7), one call per provider
in each, in an order that rotates round to round, garbage collection off; per provider the median
(and min, max) of its calls, and our time over each provider's as the median of the rounds'
ratios, so a slow spell of a shared machine falls on every provider of a round.

Peak memory: each provider in a fresh process (this module with ``--peak-of``; the processes run
side by side, after the checks and before the timing) builds the inputs, warms up on 64 rows,
resets its RSS high-water mark (``/proc/self/clear_refs``), then runs one full forward+backward;
peak extra = the high-water mark after the call (``VmHWM``) minus the RSS just before it
(``VmRSS``). The returned gradients count (they are the op's output: (N + V) * H * 4 bytes; also
reported alone). ``getrusage(RUSAGE_SELF).ru_maxrss`` is recorded too but cannot be used alone:
a process started by a large one inherits that one's mark through fork and exec (here, the
parent's 4 GB from torch eager's check), which hides the call's peak. Where the mark cannot be
reset, ``ru_maxrss`` is used and the figure is only an upper bound unless the call raised it
(``peak_exact`` False, "≤" in the tables). ``--smoke`` measures our peak only.

Refuses to run unless our op takes the plain-torch path (``kernel_path == "torch"``: no GPU, no
``TRITON_INTERPRET``). Output: ``cpu_linear_ce_<cpu>.csv`` and ``.md`` (``--out``, default
``benchmarks/results``), with the machine, torch's thread count and the 1-minute load average
before and after.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import common, targets

PROVIDERS = ("triton-softmax", "torch-chunked", "torch")
#: (N rows, H features, V classes): the issue's CPU shape; the smoke shape takes a second.
SHAPE, SMOKE_SHAPE = (8192, 256, 32768), (64, 16, 300)
WARMUP_ROWS = 64


def has_chunked() -> bool:
    return hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def build(provider: str) -> Callable | str:
    """``fn(x, w, t) -> mean loss``, or why the provider cannot run here."""
    if provider == "triton-softmax":
        import triton_softmax as ts

        return lambda x, w, t: ts.linear_cross_entropy(x, w, t)
    if provider == "torch-chunked":
        if not has_chunked():
            return f"skipped: torch {torch.__version__} has no F.linear_cross_entropy (2.13+)"
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda x, w, t: F.linear_cross_entropy(x, w, t, options=options)
    if provider == "torch":
        return lambda x, w, t: F.cross_entropy(F.linear(x, w), t)
    raise ValueError(f"unknown provider {provider!r}")


def inputs(n: int, h: int, v: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded x [N, H], w [V, H] scaled so that the logits are about N(0, 1), targets [N]."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, generator=gen)
    w = torch.randn(v, h, generator=gen) * h**-0.5
    return x, w, torch.randint(0, v, (n,), generator=gen)


def step(fn: Callable, x: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> tuple:
    """One forward+backward on fresh leaves: (loss, grad_x, grad_w)."""
    xl, wl = x.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fn(xl, wl, t)
    return (loss.detach(), *torch.autograd.grad(loss, (xl, wl)))


def peak_here(provider: str, n: int, h: int, v: int, threads: int) -> dict:
    """In this (fresh) process: the RSS just before one full forward+backward and the RSS
    high-water mark before and after it, in KiB.

    A process started by a large one inherits that one's high-water mark in ``ru_maxrss``
    (the kernel carries it over fork and exec), which would hide the call's peak; so the mark is
    reset through ``/proc/self/clear_refs`` and read as ``VmHWM``. Where that is impossible,
    ``ru_maxrss`` is used and the figure is exact only if the call raised it."""
    torch.set_num_threads(threads)
    fn = build(provider)
    x, w, t = inputs(n, h, v)
    step(fn, x[:WARMUP_ROWS], w, t[:WARMUP_ROWS])  # kernels, thread pool, lazy imports
    gc.collect()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reset = common.reset_high_water_mark()
    rss_before, hwm_before = common.status_kib("VmRSS"), common.status_kib("VmHWM")
    out = step(fn, x, w, t)
    hwm_after = common.status_kib("VmHWM")
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del out
    if not reset:
        hwm_before, hwm_after = maxrss_before, maxrss_after
    return dict(
        rss_before_kib=rss_before,
        hwm_before_kib=hwm_before,
        hwm_after_kib=hwm_after,
        hwm_reset=reset,
        ru_maxrss_before_kib=maxrss_before,
        ru_maxrss_after_kib=maxrss_after,
    )


def peaks(providers: list[str], n: int, h: int, v: int, threads: int) -> dict[str, dict]:
    """``peak_here`` for each provider, each in a fresh process without TRITON_INTERPRET or a
    visible GPU; the processes run side by side (RSS is per process, and this saves minutes)."""
    shape = ["--shape", str(n), str(h), str(v), "--threads", str(threads)]
    procs = {p: common.start_module(["cpu_linear_ce", "--peak-of", p, *shape]) for p in providers}
    return {p: common.json_result(proc, f"{p}: peak run") for p, proc in procs.items()}


def run(
    shape: tuple[int, int, int], rounds: int, threads: int, versions: str, smoke: bool = False
) -> list[dict]:
    """Check, time and measure every provider at ``shape`` with ``threads`` torch threads;
    ``versions`` as read when this process imported the code (a later commit must not relabel
    it); ``smoke``: our peak only (each process costs seconds of imports, and smoke numbers
    mean nothing)."""
    import triton_softmax as ts

    torch.set_num_threads(threads)
    n, h, v = shape
    logits_mib = n * v * 4 / 2**20
    base = dict(
        machine=common.cpu_description(),
        threads=torch.get_num_threads(),
        load_avg=round(common.load_average(), 2),
        versions=versions,
        kernel_path=ts.kernel_path(torch.empty(1)),
        N=n,
        H=h,
        V=v,
        dtype="fp32",
        mode="forward+backward",
        rounds=rounds,
        logits_mib=logits_mib,
        grads_mib=(n + v) * h * 4 / 2**20,
    )
    x, w, t = inputs(n, h, v)
    fns, rows, ref = {}, {}, None
    for name in ("torch", *[p for p in PROVIDERS if p != "torch"]):  # torch first: the reference
        row = base | dict(provider=name, status="ok", notes="", ms_rounds="", peak_raw_kib="")
        row |= dict.fromkeys(
            "ms_median ms_min ms_max ours_over_this peak_extra_mib peak_x_logits "
            "max_rel_err".split(),
            float("nan"),
        )
        row["peak_exact"] = ""
        if name == "torch-chunked" and has_chunked():
            row["notes"] = repr(torch.nn.LinearCrossEntropyOptions())
        rows[name] = row
        fn = build(name)
        if isinstance(fn, str):
            row["status"] = fn
            continue
        with warnings.catch_warnings(record=True) as caught:  # the chunked op's fallbacks
            warnings.simplefilter("always")
            out = step(fn, x, w, t)  # also the warm-up
        if caught:
            row["notes"] += "; warned: " + " | ".join(str(c.message)[:120] for c in caught)
        ref = out if ref is None else ref
        try:
            row["max_rel_err"] = common.assert_close(out, ref)
        except AssertionError as e:
            row["status"] = "mismatch: " + " ".join(str(e).split())[:200]
            continue
        fns[name] = lambda fn=fn: step(fn, x, w, t)
    del ref, out
    measured = [p for p in fns if p == "triton-softmax" or not smoke]
    for name, got in peaks(measured, n, h, v, threads).items():
        extra = (got["hwm_after_kib"] - got["rss_before_kib"]) / 1024
        rows[name] |= dict(peak_extra_mib=extra, peak_x_logits=extra / logits_mib)
        rows[name]["peak_exact"] = got["hwm_reset"] or got["hwm_after_kib"] > got["hwm_before_kib"]
        rows[name]["peak_raw_kib"] = " ".join(f"{k}={val}" for k, val in got.items())
    print(f"{threads} threads: timing {', '.join(fns)}, {rounds} rounds", flush=True)
    times = common.time_rounds(fns, rounds)
    for name, secs in times.items():
        rows[name] |= dict(ms_median=1e3 * statistics.median(secs), ms_min=1e3 * min(secs))
        rows[name]["ms_max"] = 1e3 * max(secs)
        rows[name]["ms_rounds"] = " ".join(f"{1e3 * s:.0f}" for s in secs)
        ours = times.get("triton-softmax")
        if ours:
            ratios = [a / b for a, b in zip(ours, secs, strict=True)]
            rows[name]["ours_over_this"] = statistics.median(ratios)
    end = round(common.load_average(), 2)
    out = [rows[p] | {"load_avg_end": end} for p in PROVIDERS]
    for r in out:
        result = r["status"]
        if result == "ok":
            result = (
                f"{r['ms_median']:9.1f} ms (ours/this {r['ours_over_this']:.2f}), peak "
                f"+{r['peak_extra_mib']:.0f} MiB = {r['peak_x_logits']:.3f}x logits"
            )
        print(f"{threads} threads {r['provider']:15s} {result}", flush=True)
    return out


# Report: markdown and the RESULTS.md section, from the CSV.


def verdicts(rows: list[dict]) -> list[str]:
    """docs/design.md's two CPU-path targets for the fused op, met or not."""
    by = {r["provider"]: r for r in rows}
    ours, chunked = by.get("triton-softmax"), by.get("torch-chunked")
    lines = []
    if ours and chunked and ours["status"] == chunked["status"] == "ok":
        ratio = chunked["ours_over_this"]
        verdict = "met" if ratio <= targets.CPU_LCE_OVER_CHUNKED else "NOT met"
        lines.append(
            f"- time ≤ torch's chunked op: **{verdict}** (ours / chunked {ratio:.2f}×, median of "
            f"the rounds' ratios; {ours['ms_median']:.0f} ms vs {chunked['ms_median']:.0f} ms)"
        )
    if ours and ours["status"] == "ok":
        frac = ours["peak_x_logits"]
        verdict = "met" if frac <= targets.CPU_LCE_PEAK_X_LOGITS else "NOT met"
        bound = "" if ours["peak_exact"] in (True, "True") else "at most "
        lines.append(
            f"- peak extra memory ≤ {targets.CPU_LCE_PEAK_X_LOGITS}× the fp32 logits "
            f"({ours['logits_mib']:.0f} MiB): **{verdict}** ({bound}{ours['peak_extra_mib']:.0f} "
            f"MiB = {frac:.3f}×, of "
            f"which {ours['grads_mib']:.0f} MiB are the returned gradients)"
        )
    return lines


def _mib(value: float) -> str:
    return "" if value != value else f"{value:.0f}" if abs(value) >= 10 else f"{value:.2g}"


def _table(rows: list[dict]) -> list[str]:
    body = []
    for r in rows:
        if r["status"] != "ok":
            body.append([r["provider"], r["status"], "", "", "", ""])
            continue
        peak = _mib(r["peak_extra_mib"])
        bound = "≤ " if peak and r["peak_exact"] not in (True, "True") else ""
        body.append(
            [
                r["provider"],
                f"{r['ms_median']:.0f}",
                f"{r['ms_min']:.0f} – {r['ms_max']:.0f}",
                f"{r['ours_over_this']:.2f}×",
                bound + peak,
                f"{r['peak_x_logits']:.3f}×" if peak else "",
            ]
        )
    header = ["provider", "ms (median)", "min – max", "ours / this", "peak MiB", "× logits"]
    return common.md_table(header, body)


def _intro(rows: list[dict]) -> str:
    r = rows[0]
    path = f"our kernel path: `{r['kernel_path']}`"
    text = (
        f"{common.measured_on(r, threads=True, extra=[path])}. "
        f"N = {r['N']}, H = {r['H']}, V = {r['V']}, "
        f"{r['dtype']}, {r['mode']} of the mean loss (gradients for input and weight). Time: "
        f"{r['rounds']} rounds, one call per provider each, rotating order; 'ours / this': the "
        "median of the rounds' ratios of our time to the provider's (below 1: ours is faster). "
        "Peak: RSS high-water mark of one call in a fresh process minus the RSS before it, the "
        f"returned gradients ({r['grads_mib']:.0f} MiB) included; × logits: over the full fp32 "
        f"logits, N·V·4 bytes = {r['logits_mib']:.0f} MiB. Loss and gradients were checked "
        "against torch eager before timing."
    )
    chunked = next((x for x in rows if x["provider"] == "torch-chunked"), None)
    if chunked and chunked["status"] == "ok":
        text += f" torch-chunked ran with `{chunked['notes']}`."
    return text + common.busy_note(r, "the ratios compare calls of the same rounds")


def _body(rows: list[dict], level: str) -> list[str]:
    """Per thread count: a heading, the preamble, the targets and the table."""
    lines = []
    for k in dict.fromkeys(r["threads"] for r in rows):
        group = [r for r in rows if r["threads"] == k]
        lines += [f"{level} {k} torch thread(s)", "", _intro(group), ""]
        lines += ["Targets (docs/design.md):", "", *verdicts(group), "", *_table(group), ""]
    return lines


def write_report(csv_path: Path) -> list[Path]:
    """``<stem>.md`` next to a CSV."""
    lines = ["# Fused linear + cross-entropy on the CPU: ours vs torch", ""]
    lines += _body(common.read_csv(csv_path), "##")
    return [common.write_markdown(csv_path.with_suffix(".md"), lines)]


def readme_section(results_dir: Path = common.RESULTS_DIR) -> str:
    """RESULTS.md's section: per CSV and thread count, the targets and the table."""
    return common.results_section(
        "Benchmarks: fused linear + cross-entropy on the CPU",
        "`python -m benchmarks.cpu_linear_ce` times `triton_softmax.linear_cross_entropy` on its "
        "plain-torch CPU path against torch's chunked `F.linear_cross_entropy(..., "
        "options=torch.nn.LinearCrossEntropyOptions())` and the unfused `F.cross_entropy("
        "F.linear(x, w), t)`, forward+backward, and measures each one's peak memory in a process "
        "of its own. Details: [benchmarks/README.md](README.md).",
        results_dir.glob("cpu_linear_ce_*.csv"),
        lambda path: _body(common.read_csv(path), "###")[:-1],
        "No numbers have been measured yet.",
    )


def main(argv: list[str] | None = None) -> int:
    """Run; exit status 2 off the plain-torch path, 3 when a provider disagrees."""
    ap = common.parser("cpu_linear_ce", __doc__, smoke="tiny shape, one round, seconds")
    ap.add_argument("--rounds", type=int, default=7, help="timing rounds (default 7)")
    ap.add_argument(
        "--shape", type=int, nargs=3, metavar=("N", "H", "V"), help="default 8192 256 32768"
    )
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[common.cpu_count()],
        help="torch thread counts, each measured in turn (default: the logical CPUs)",
    )
    ap.add_argument("--peak-of", choices=PROVIDERS, help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args(argv)
    if common.refuses_kernel_path():
        return common.REFUSAL_EXIT
    shape = tuple(args.shape or (SMOKE_SHAPE if args.smoke else SHAPE))
    if args.peak_of:
        print(json.dumps(peak_here(args.peak_of, *shape, args.threads[0])))
        return 0
    rounds = 1 if args.smoke else args.rounds
    versions = common.versions(("torch", "triton", "triton-softmax", "numpy"), commit=True)
    rows = [r for k in args.threads for r in run(shape, rounds, k, versions, args.smoke)]
    csv_path = args.out / f"{common.stem('cpu_linear_ce', args.smoke)}.csv"
    common.write_results(csv_path, rows, write_report)
    print("\n".join(verdicts(rows)))
    return common.MISMATCH_EXIT if any(r["status"].startswith("mismatch") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
