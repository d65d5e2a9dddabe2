"""CPU path benchmark: triton_softmax's plain-torch path against ``torch.nn.functional``.

    python -m benchmarks.cpu_path                    # a couple of minutes on 2 cores
    python -m benchmarks.cpu_path --smoke --out DIR  # tiny shapes, seconds (the tests run it)

On a CPU without ``TRITON_INTERPRET`` our ops run a plain-torch implementation; docs/design.md wants
it within 1.3x of torch's own functions and its per-call overhead within 2x of torch's. This times
``triton_softmax.softmax / log_softmax / cross_entropy`` against ``F.softmax / F.log_softmax /
F.cross_entropy`` on fp32 inputs of 4x3 (per-call overhead), 256x1000, 4096x1000 and 1024x32000,
forward and forward+backward (a fresh leaf per call, ``torch.autograd.backward`` of the outputs),
for every cross-entropy option torch has (class indices, weight, ignore_index with a quarter of the
rows ignored, label_smoothing=0.1, probability targets, reduction none / sum / mean) and two of our
extras, for which torch's side is composed from torch ops: ``z_loss=1e-4`` as
``F.cross_entropy(x, t) + 1e-4 * logsumexp(x).square().mean()``, ``return_lse`` as
``(F.cross_entropy(x, t), logsumexp(x))``.

Each pair's outputs and gradients are compared (``assert_close``) before timing; a mismatch is
recorded and not timed. Timing: per case, ``--rounds`` rounds (7) in which our call and
torch's each run a block of calls of about ``--block`` seconds (30 ms; at least one call), back to
back, in an order that alternates; times are the medians of the blocks' per-call means, the ratio
the median of the rounds' ratios, so that a slow spell of a shared machine falls on both sides of
a pair. ``torch.set_num_threads`` is the logical CPU count (``--threads`` changes it: on a 2-core
machine that other processes kept busy we saw ``F.softmax`` of a 4x3 tensor take ~15 ms a call
with 2 threads and 3 µs with 1). Refuses to run unless our ops take
the plain-torch path (``kernel_path == "torch"``: no GPU, no ``TRITON_INTERPRET``).

Output: ``cpu_path_<cpu>.csv`` and ``.md`` (``--out``, default ``benchmarks/results``).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import common, targets

SHAPES = ((4, 3), (256, 1000), (4096, 1000), (1024, 32000))
SMOKE_SHAPES = ((4, 3), (16, 10))
MODES = ("forward", "forward+backward")
EXTRAS = ("z_loss", "return_lse")  # ours only; torch's side is composed from torch ops

Outputs = tuple[torch.Tensor, ...]


def cases(m: int, c: int) -> Iterator[tuple[str, str, Callable, Callable, Outputs]]:
    """(op, options, ours(x), torch(x), output gradients) at m x c; outputs are tuples."""
    import triton_softmax as ts

    for op in ("softmax", "log_softmax"):
        ours, ref, g = getattr(ts, op), getattr(F, op), torch.randn(m, c)
        yield op, "dim=-1", lambda x, f=ours: (f(x, -1),), lambda x, f=ref: (f(x, -1),), (g,)
    t, one, g = torch.randint(0, c, (m,)), torch.tensor(1.0), torch.randn(m)
    ignored = torch.where(torch.arange(m) % 4 == 0, -100, t)
    for options, target, kw, grads in (
        ("class indices", t, {}, (one,)),
        ("weight", t, {"weight": torch.rand(c) + 0.5}, (one,)),
        ("ignore_index (1/4 of rows)", ignored, {"ignore_index": -100}, (one,)),
        ("label_smoothing=0.1", t, {"label_smoothing": 0.1}, (one,)),
        ("probability targets", torch.randn(m, c).softmax(-1), {}, (one,)),
        ("reduction=none", t, {"reduction": "none"}, (g,)),
        ("reduction=sum", t, {"reduction": "sum"}, (one,)),
        ("z_loss=1e-4", t, {"z_loss": 1e-4}, (one,)),
        ("return_lse", t, {"return_lse": True}, (one, g)),
    ):

        def ours(x: torch.Tensor, t=target, kw=kw) -> Outputs:
            out = ts.cross_entropy(x, t, **kw)
            return out if isinstance(out, tuple) else (out,)

        def ref(x: torch.Tensor, t=target, kw=kw) -> Outputs:
            loss = F.cross_entropy(x, t, **{k: v for k, v in kw.items() if k not in EXTRAS})
            if "z_loss" in kw:  # composed: z * lse**2, averaged like the loss
                return (loss + kw["z_loss"] * torch.logsumexp(x, -1).square().mean(),)
            return (loss, torch.logsumexp(x, -1)) if "return_lse" in kw else (loss,)

        yield "cross_entropy", options, ours, ref, grads


def _step(fn: Callable, x: torch.Tensor, mode: str, grads: Outputs) -> Callable[[], object]:
    if mode == "forward":
        return lambda: fn(x)

    def forward_backward() -> torch.Tensor:
        leaf = x.detach().requires_grad_()
        torch.autograd.backward(fn(leaf), grads)
        return leaf.grad

    return forward_backward


def _results(fn: Callable, x: torch.Tensor, mode: str, grads: Outputs) -> Outputs:
    if mode == "forward":
        return tuple(fn(x))
    leaf = x.detach().requires_grad_()
    outs = fn(leaf)
    torch.autograd.backward(outs, grads)
    return (*(o.detach() for o in outs), leaf.grad)


def time_pair(a: Callable, b: Callable, rounds: int, block: float) -> tuple[float, float, float]:
    """(ours s, torch s, ours / torch): medians over ``rounds`` rounds (``common.time_rounds``)
    of the mean time of a block of calls of about ``block`` seconds (at least one call); the
    ratio is the median of the rounds' ratios."""
    calls = {}
    for name, fn in (("ours", a), ("torch", b)):
        fn()  # warm-up
        start = time.perf_counter()
        fn()
        calls[name] = max(1, round(block / max(time.perf_counter() - start, 1e-9)))
    times = common.time_rounds({"ours": a, "torch": b}, rounds, calls)
    ratios = [x / y for x, y in zip(times["ours"], times["torch"], strict=True)]
    return (
        statistics.median(times["ours"]),
        statistics.median(times["torch"]),
        statistics.median(ratios),
    )


def run(shapes, rounds: int, block: float, threads: int) -> list[dict]:
    import triton_softmax as ts

    torch.set_num_threads(threads)
    timer = f"median of {rounds} rounds of {block * 1e3:g} ms blocks, perf_counter"
    base = dict(
        machine=common.cpu_description(),
        threads=torch.get_num_threads(),
        versions=common.versions(("torch", "triton", "triton-softmax", "numpy"), commit=True),
        kernel_path=ts.kernel_path(torch.empty(1)),
        timer=timer,
        load_avg=round(common.load_average(), 2),
    )
    rows = []
    for m, c in shapes:
        x = torch.randn(m, c)
        for op, options, ours, ref, grads in cases(m, c):
            for mode in MODES:
                row = base | dict(op=op, shape=f"{m}x{c}", options=options, mode=mode, status="ok")
                row |= dict.fromkeys(("ours_us", "torch_us", "ratio"), float("nan"))
                try:
                    common.assert_close(
                        _results(ours, x, mode, grads), _results(ref, x, mode, grads)
                    )
                except AssertionError as e:
                    row["status"] = "mismatch: " + " ".join(str(e).split())[:200]
                else:
                    a, b = _step(ours, x, mode, grads), _step(ref, x, mode, grads)
                    t_ours, t_torch, ratio = time_pair(a, b, rounds, block)
                    row |= dict(ours_us=t_ours * 1e6, torch_us=t_torch * 1e6, ratio=ratio)
                rows.append(row)
                result = f"{row['ratio']:.2f}x" if row["status"] == "ok" else row["status"]
                print(f"{op:13s} {m}x{c:<6} {options:27s} {mode:16s} {result}", flush=True)
    return [row | {"load_avg_end": round(common.load_average(), 2)} for row in rows]


# Report: markdown and the RESULTS.md section, from the CSV.


def _target(shape: str) -> float:
    return targets.CPU_OVERHEAD if shape == "4x3" else targets.CPU_SPEED


def verdicts(rows: list[dict]) -> list[str]:
    """docs/design.md's two targets, met or not, with the cases that miss them."""
    lines = []
    for name, sel in (
        (f"per-call overhead at 4x3: ours ≤ {targets.CPU_OVERHEAD}× torch", "4x3"),
        (f"≥ 256 rows: ours ≤ {targets.CPU_SPEED}× torch", None),
    ):
        got = [r for r in rows if (r["shape"] == sel if sel else r["shape"] != "4x3")]
        if not got:
            continue
        bad = [r for r in got if not r["ratio"] <= _target(r["shape"])]
        worst = max(got, key=lambda r: r["ratio"] if r["status"] == "ok" else float("inf"))
        verdict = "met" if not bad else f"NOT met in {len(bad)} of {len(got)} cases"
        lines.append(
            f"- {name}: **{verdict}** (worst: {worst['ratio']:.2f}× — {worst['op']} "
            f"{worst['shape']} {worst['options']}, {worst['mode']})"
        )
        for r in sorted(bad, key=lambda r: -r["ratio"] if r["status"] == "ok" else -1e9)[:8]:
            lines.append(
                f"  - {r['op']} {r['shape']} {r['options']} {r['mode']}: "
                + (f"{r['ratio']:.2f}×" if r["status"] == "ok" else r["status"])
            )
        if len(bad) > 8:
            lines.append(f"  - … and {len(bad) - 8} more (see the full table)")
    return lines


def ratio_table(rows: list[dict]) -> list[str]:
    """ours / torch, one line per (op, options), one column per (shape, mode)."""
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    cols = [(s, m) for s in shapes for m in MODES]
    by = {(r["op"], r["options"], r["shape"], r["mode"]): r for r in rows}
    header = ["op", "options", *[f"{s} {'fwd' if m == 'forward' else 'fwd+bwd'}" for s, m in cols]]
    body = []
    for op, options in dict.fromkeys((r["op"], r["options"]) for r in rows):
        cells = []
        for s, m in cols:
            r = by.get((op, options, s, m))
            if r is None:
                cells.append("")
            elif r["status"] != "ok":
                cells.append(r["status"].split(":")[0])
            else:
                mark = "" if r["ratio"] <= _target(s) else " ✗"
                cells.append(f"{r['ratio']:.2f}×{mark}")
        body.append([op, options, *cells])
    return common.md_table(header, body)


def _intro(rows: list[dict]) -> str:
    r = rows[0]
    extra = (f"our kernel path: `{r['kernel_path']}`", f"timer: {r['timer']}")
    return (
        f"{common.measured_on(r, threads=True, extra=extra)}. Cells: the median of the rounds' "
        "ratios of our time to torch's (below 1: ours is faster); ✗ misses the target "
        f"(≤ {targets.CPU_OVERHEAD}× at 4x3, ≤ {targets.CPU_SPEED}× from 256 rows). Outputs and "
        "gradients were checked against torch before timing. Torch's side of `z_loss` and "
        "`return_lse` is composed from torch ops."
        + common.busy_note(r, "each ratio compares blocks run back to back")
    )


def _summary(rows: list[dict]) -> list[str]:
    return [_intro(rows), "", *verdicts(rows), "", *ratio_table(rows)]


def write_report(csv_path: Path) -> list[Path]:
    """``<stem>.md`` next to a CSV: the targets, the ratio table and every row's times."""
    rows = common.read_csv(csv_path)
    header = ["op", "shape", "options", "mode", "ours µs", "torch µs", "ours / torch"]
    full = [
        [
            r["op"],
            r["shape"],
            r["options"],
            r["mode"],
            f"{r['ours_us']:.1f}",
            f"{r['torch_us']:.1f}",
        ]
        + [f"{r['ratio']:.2f}×" if r["status"] == "ok" else r["status"]]
        for r in rows
    ]
    lines = ["# CPU path benchmark: triton_softmax (plain-torch path) vs torch", ""]
    lines += [_intro(rows), "", "Targets (docs/design.md):", "", *verdicts(rows), ""]
    lines += [*ratio_table(rows), "", *common.md_table(header, full)]
    return [common.write_markdown(csv_path.with_suffix(".md"), lines)]


def readme_section(results_dir: Path = common.RESULTS_DIR) -> str:
    """RESULTS.md's section: per CSV, the targets and the ratio table."""
    return common.results_section(
        "Benchmarks: the CPU path",
        "`python -m benchmarks.cpu_path` times our ops' plain-torch CPU path (no GPU, no "
        "`TRITON_INTERPRET`) against `torch.nn.functional` at 4x3 (per-call overhead), 256x1000, "
        "4096x1000 and 1024x32000, forward and forward+backward, softmax, log_softmax and every "
        "cross-entropy option (plus our `z_loss` and `return_lse`).",
        results_dir.glob("cpu_path_*.csv"),
        lambda path: _summary(common.read_csv(path)),
        "No CPU-path numbers have been measured yet.",
    )


def main(argv: list[str] | None = None) -> int:
    """Run; exit status 2 off the plain-torch path, 3 when a pair disagrees."""
    ap = common.parser("cpu_path", __doc__, smoke="tiny shapes, 3 calls each, seconds")
    ap.add_argument("--rounds", type=int, default=7, help="timing rounds per case (default 7)")
    ap.add_argument("--block", type=float, default=0.03, help="seconds per timed block")
    ap.add_argument(
        "--threads",
        type=int,
        default=common.cpu_count(),
        help="torch threads (default: the logical CPUs; 1 on a machine others are using)",
    )
    args = ap.parse_args(argv)
    if common.refuses_kernel_path():
        return common.REFUSAL_EXIT
    torch.manual_seed(0)
    if args.smoke:
        args.rounds, args.block = 1, 0.0
    rows = run(SMOKE_SHAPES if args.smoke else SHAPES, args.rounds, args.block, args.threads)
    csv_path = args.out / f"{common.stem('cpu_path', args.smoke)}.csv"
    common.write_results(csv_path, rows, write_report)
    print("\n".join(verdicts(rows)))
    return common.MISMATCH_EXIT if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
