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
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import common

PROVIDERS = ("triton-softmax", "torch-chunked", "torch")
#: (N rows, H features, V classes): the issue's CPU shape; the smoke shape takes a second.
SHAPE, SMOKE_SHAPE = (8192, 256, 32768), (64, 16, 300)
#: docs/design.md: our peak extra memory at most this fraction of the full fp32 logits.
PEAK_TARGET = 0.1
WARMUP_ROWS = 64
REFUSAL_EXIT, MISMATCH_EXIT = 2, 3


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


def check(out: tuple, ref: tuple) -> float:
    """assert_close per output (rtol 1e-4, atol 1e-5 of the reference's largest magnitude);
    returns max |out - ref| / max |ref| over them."""
    worst = 0.0
    for a, b in zip(out, ref, strict=True):
        scale = max(b.abs().max().item(), 1e-30)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)
        worst = max(worst, (a - b).abs().max().item() / scale)
    return worst


def time_rounds(fns: dict[str, Callable], rounds: int) -> dict[str, list[float]]:
    """Seconds per call, ``rounds`` calls per provider, one each per round in a rotating order."""
    names, times = list(fns), {name: [] for name in fns}
    gc.disable()
    try:
        for k in range(rounds):
            for name in names[k % len(names) :] + names[: k % len(names)]:
                start = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return times


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
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    repo, procs = Path(__file__).resolve().parent.parent, {}
    for provider in providers:
        cmd = [sys.executable, "-m", "benchmarks.cpu_linear_ce", "--peak-of", provider]
        cmd += ["--shape", str(n), str(h), str(v), "--threads", str(threads)]
        procs[provider] = subprocess.Popen(
            cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    got = {}
    for provider, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{provider}: peak run failed: {err.strip()[-300:]}")
        got[provider] = json.loads(out.strip().splitlines()[-1])
    return got


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
            row["max_rel_err"] = check(out, ref)
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
    times = time_rounds(fns, rounds)
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


# ----------------------------------------------------------------------------------------------
# Report: markdown and the RESULTS.md section, from the CSV
# ----------------------------------------------------------------------------------------------


def targets(rows: list[dict]) -> list[str]:
    """docs/design.md's two CPU-path targets for the fused op, met or not."""
    by = {r["provider"]: r for r in rows}
    ours, chunked = by.get("triton-softmax"), by.get("torch-chunked")
    lines = []
    if ours and chunked and ours["status"] == chunked["status"] == "ok":
        ratio = chunked["ours_over_this"]
        verdict = "met" if ratio <= 1 else "NOT met"
        lines.append(
            f"- time ≤ torch's chunked op: **{verdict}** (ours / chunked {ratio:.2f}×, median of "
            f"the rounds' ratios; {ours['ms_median']:.0f} ms vs {chunked['ms_median']:.0f} ms)"
        )
    if ours and ours["status"] == "ok":
        frac = ours["peak_x_logits"]
        verdict = "met" if frac <= PEAK_TARGET else "NOT met"
        bound = "" if ours["peak_exact"] in (True, "True") else "at most "
        lines.append(
            f"- peak extra memory ≤ {PEAK_TARGET}× the fp32 logits ({ours['logits_mib']:.0f} "
            f"MiB): **{verdict}** ({bound}{ours['peak_extra_mib']:.0f} MiB = {frac:.3f}×, of "
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


def _intro(rows: list[dict]) -> list[str]:
    r = rows[0]
    text = (
        f"Measured on {r['machine']}, torch threads {r['threads']} (1-minute load average "
        f"{r['load_avg']:.2f} at the start, {r['load_avg_end']:.2f} at the end; {r['versions']}; "
        f"our kernel path: `{r['kernel_path']}`). N = {r['N']}, H = {r['H']}, V = {r['V']}, "
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
    if max(r["load_avg"], r["load_avg_end"]) >= 1:
        text += (
            " Other processes were busy on the machine (load average ≥ 1): absolute times are "
            "inflated and noisy; the ratios compare calls of the same rounds."
        )
    return [text]


def _by_threads(rows: list[dict]) -> list[list[dict]]:
    return [
        [r for r in rows if r["threads"] == k] for k in dict.fromkeys(r["threads"] for r in rows)
    ]


def _body(rows: list[dict], level: str) -> list[str]:
    lines = []
    for group in _by_threads(rows):
        lines += [f"{level} {group[0]['threads']} torch thread(s)", "", *_intro(group), ""]
        lines += ["Targets (docs/design.md):", "", *targets(group), "", *_table(group), ""]
    return lines


def markdown(rows: list[dict]) -> str:
    lines = ["# Fused linear + cross-entropy on the CPU: ours vs torch", "", *_body(rows, "##")]
    return "\n".join(lines).rstrip() + "\n"


def write_report(csv_path: Path) -> list[Path]:
    md = csv_path.with_suffix(".md")
    md.write_text(markdown(common.read_csv(csv_path)), encoding="utf-8")
    return [md]


def readme_section(results_dir: Path = common.RESULTS_DIR) -> str:
    lines = [
        "## Benchmarks: fused linear + cross-entropy on the CPU",
        "",
        "`python -m benchmarks.cpu_linear_ce` times `triton_softmax.linear_cross_entropy` on its "
        "plain-torch CPU path against torch's chunked `F.linear_cross_entropy(..., "
        "options=torch.nn.LinearCrossEntropyOptions())` and the unfused `F.cross_entropy("
        "F.linear(x, w), t)`, forward+backward, and measures each one's peak memory in a process "
        "of its own. Details: [benchmarks/README.md](README.md).",
        "",
    ]
    csvs = sorted(results_dir.glob("cpu_linear_ce_*.csv"))
    if not csvs:
        return "\n".join([*lines, "No numbers have been measured yet."]) + "\n"
    for path in csvs:
        lines += _body(common.read_csv(path), "###")
        lines += [
            f"Files: {common.link(path, 'csv')}, {common.link(path.with_suffix('.md'), 'md')}.",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.cpu_linear_ce",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--smoke", action="store_true", help="tiny shape, one round, seconds")
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
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="output folder")
    ap.add_argument("--peak-of", choices=PROVIDERS, help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args(argv)
    import triton_softmax as ts

    path = ts.kernel_path(torch.empty(1))
    if path != "torch":
        print(
            f"our ops would run {path!r} here, not the plain-torch path: unset TRITON_INTERPRET "
            "(and run without a GPU) to measure the CPU path.",
            file=sys.stderr,
        )
        return REFUSAL_EXIT
    shape = tuple(args.shape or (SMOKE_SHAPE if args.smoke else SHAPE))
    if args.peak_of:
        print(json.dumps(peak_here(args.peak_of, *shape, args.threads[0])))
        return 0
    rounds = 1 if args.smoke else args.rounds
    versions = common.versions(("torch", "triton", "triton-softmax", "numpy"))
    versions += f" (commit {common.git_commit()})"
    rows = [r for k in args.threads for r in run(shape, rounds, k, versions, args.smoke)]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "cpu_linear_ce-smoke_" if args.smoke else "cpu_linear_ce_"
    csv_path = common.write_csv(args.out / f"{stem}{common.slug(common.cpu_model())}.csv", rows)
    for written in [csv_path, *write_report(csv_path)]:
        print(f"wrote {written}")
    print("\n".join(targets(rows)))
    return MISMATCH_EXIT if any(r["status"].startswith("mismatch") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
