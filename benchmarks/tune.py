"""Sweep the launch tables' tiles on a GPU; write the best table found for that GPU.

    python -m benchmarks.tune --out DIR                    # needs CUDA; --time-budget 120 s
    python -m benchmarks.tune --out DIR --only softmax-forward --dtype bf16 --time-budget 300
    python -m benchmarks.tune --smoke --out DIR            # the pipeline on a CPU, seconds

Tables: "softmax.forward", "softmax.backward", "cross_entropy.forward" and
"cross_entropy.backward" of ``tiles.LAUNCHES`` (``triton_softmax/ops/tiles.py``), per element
size (bf16 stands for both 16-bit dtypes, fp32, fp64 on request).
For each rule, a few row lengths (its upper bound, an odd length in between; for the last,
unbounded rule fixed long rows) and candidates around the rule's tile: BLOCK_N halved / kept /
doubled, num_warps 4-32 (1 to 64 elements a thread, 32 in fp64), the BLOCK_M cap halved / kept /
doubled where rows are short. Each candidate is launched through the op's own launcher with a
one-rule table swapped in (``tiles.replaced``) and a kernel proxy that records the launch; its
outputs are filled with NaN first and checked against torch, a spilling kernel (ptxas, read from
the loaded binary) is rejected, then the recorded launch alone is timed. A rule's new tile is the
candidate with the least geometric-mean time over its lengths, if it beats the current one by
``--min-gain``. Measured ops: softmax (log-softmax shares the tables, not timed); cross-entropy
with int64 targets and no weight, smoothing, z-loss or softcap.

Compiles run ahead in ``--jobs`` worker processes (``JITFunction.warmup``, Triton's disk cache),
so the timing loop mostly loads binaries. ``--time-budget`` stops the sweep; rules not finished
keep their current tile. Output: ``tiles_<gpu>.json`` (rules in the tables' shape, the current
and best time per length, every candidate) and ``tiles_<gpu>.md`` (speed-ups, and the Python
to paste into ``triton_softmax/ops/tiles.py``: folding it in, with tests/test_tiles.py, is a
human step).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F

from benchmarks import common

NO_GPU_EXIT = 1
#: name -> (its key in ``tiles.LAUNCHES``, the kernel's outputs)
TABLES = {
    "softmax-forward": ("softmax.forward", ("y_ptr",)),
    "softmax-backward": ("softmax.backward", ("grad_x_ptr",)),
    "cross_entropy-forward": (
        "cross_entropy.forward",
        ("loss_ptr", "lse_ptr", "row_max_ptr", "log_sum_ptr", "target_mass_ptr"),
    ),
    "cross_entropy-backward": ("cross_entropy.backward", ("grad_logits_ptr",)),
}
#: Minimum DRAM bytes per element of the [M, N] input, times its element size s: softmax
#: forward reads x, writes y (2); backward reads y, dy, writes dx (3); cross-entropy forward
#: reads the logits (1; targets and per-row outputs are O(M)); backward reads them, writes dx (2).
BYTES_PER_ELEMENT = {
    "softmax-forward": 2,
    "softmax-backward": 3,
    "cross_entropy-forward": 1,
    "cross_entropy-backward": 2,
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
#: Relative tolerance by output dtype; the absolute one is rtol * max|ref| / 16.
RTOL = {torch.bfloat16: 1e-2, torch.float32: 2e-5, torch.float64: 1e-10}
#: Row lengths for a table's last (unbounded, streamed) rule. Softmax streams only rows past
#: the split kernels' 128 slices of 4096 (shorter ones are split, which this sweep does not time).
LONG_ROWS = {"softmax": (1048576, 1048577), "cross_entropy": (32000, 50257, 128256)}
WARPS = (4, 8, 16, 32)
SMOKE_LENGTHS, SMOKE_ROWS = (16, 64), 4


def family(name: str) -> str:
    """ "softmax" or "cross_entropy": the op module whose launcher runs the table's kernel."""
    return TABLES[name][0].split(".")[0]


def ops_module(name: str):
    return importlib.import_module(f"triton_softmax.ops.{family(name)}")


def launch_table(name: str):
    """The table's current rules (``tiles.LAUNCHES``)."""
    from triton_softmax.ops import tiles

    return tiles.table(TABLES[name][0])


def rows_for(n: int, smoke: bool) -> int:
    """At least 4096 rows and 2**22 elements (short rows still fill the GPU), at most 2**27
    elements (512 MiB of fp32 per tensor), a multiple of 16 (as the compile workers' 16 rows:
    Triton specialises integer arguments on divisibility by 16)."""
    if smoke:
        return SMOKE_ROWS
    return max(16, min(max(4096, 2**22 // n), 2**27 // n) // 16 * 16)


def rule_index(rules, n: int) -> int:
    """Which rule a contiguous row of ``n`` elements takes (16-aligned when n % 16 == 0)."""
    aligned = n % 16 == 0
    return next(
        i for i, r in enumerate(rules) if n <= r.max_cols and (aligned or not r.aligned_only)
    )


def lengths_for(rules, i: int, family: str) -> list[int]:
    """The rule's upper bound and a length in between (odd: an unaligned launch, unless the
    rule is for aligned launches only); fixed long rows for the unbounded last rule."""
    from triton_softmax.ops.tiles import UNBOUNDED

    rule, low = rules[i], rules[i - 1].max_cols if i else 0
    if rule.max_cols == UNBOUNDED:
        picks = [n for n in LONG_ROWS[family] if n > low] or [4 * low + 1]
    else:
        mid = (low + rule.max_cols) // 2
        picks = [rule.max_cols, mid - mid % 16 if rule.aligned_only else mid | 1]
    return [n for n in picks if rule_index(rules, n) == i]


def one_rule(table, size: int, rule):
    """``table`` with the rules for ``size`` replaced by ``rule`` for every row length."""
    from triton_softmax.ops.tiles import UNBOUNDED

    return {**table, size: (rule._replace(max_cols=UNBOUNDED, aligned_only=False),)}


def tiles(table, size: int, rule, lengths) -> tuple:
    """The tiles the launcher picks for ``lengths`` with ``rule`` alone."""
    from triton_softmax.ops._device import kernels_interpreted
    from triton_softmax.ops.tiles import pick_tile

    one = one_rule(table, size, rule)
    interpreted = kernels_interpreted()
    return tuple(
        pick_tile(one, n, size, aligned=n % 16 == 0, interpreted=interpreted) for n in lengths
    )


def candidates(table, size: int, i: int, lengths, smoke: bool) -> list:
    """The current rule first, then the others, one per distinct set of tiles over ``lengths``."""
    from triton_softmax.ops.tiles import TILE_ELEMENTS, UNBOUNDED

    rule = table[size][i]
    if smoke:  # a different warp count; on longer rows also 16-column blocks (streamed)
        options = [rule, rule._replace(block_n=16, num_warps=rule.num_warps * 2)]
    else:
        top = 32768 if rule.max_cols == UNBOUNDED else rule.max_cols
        per_thread = 32 if size == 8 else 64  # elements a thread holds, at most
        options = [rule]
        for block_n in (rule.block_n // 2, rule.block_n, rule.block_n * 2):
            room = min(128, TILE_ELEMENTS // max(block_n, 1))
            caps = {c for c in (rule.max_block_m // 2, rule.max_block_m, rule.max_block_m * 2)}
            for cap in sorted(c for c in caps if 1 <= c <= room) or [1]:
                for warps in WARPS:
                    option = rule._replace(block_n=block_n, num_warps=warps, max_block_m=cap)
                    if 16 <= block_n <= top:
                        most = max(
                            t.block_m * t.block_n for t in tiles(table, size, option, lengths)
                        )
                        if 32 * warps <= most <= 32 * warps * per_thread:
                            options.append(option)
    found = {}
    for option in options:
        found.setdefault(tiles(table, size, option, lengths), option)
    return list(found.values())


def problem(name: str, dtype: torch.dtype, rows: int, n: int, device: str):
    """(call, reference, x): ``call()`` runs the op through its launcher and returns its outputs,
    ``reference()`` torch's, in fp32 (fp64 for fp64), from the same rounded inputs."""
    ops = ops_module(name)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    torch.manual_seed(n)
    x = torch.randn(rows, n, device=device, dtype=dtype)
    xa = x.to(acc)
    if name == "softmax-forward":
        return (lambda: (ops.softmax_forward(x, False),)), lambda: (xa.softmax(-1),), x
    if name == "softmax-backward":
        y, dy = xa.softmax(-1).to(dtype), torch.randn_like(x)
        ya, dya = y.to(acc), dy.to(acc)
        ref = lambda: (ya * (dya - (ya * dya).sum(-1, keepdim=True)),)
        return (lambda: (ops.softmax_backward(y, dy, False),)), ref, y
    target = torch.randint(0, n, (rows,), device=device)
    if name == "cross_entropy-forward":
        call = lambda: ops.cross_entropy_forward(x, target, None)[:2]
        return call, lambda: (F.cross_entropy(xa, target, reduction="none"), xa.logsumexp(-1)), x
    # The backward's saved stats (row max, log-sum-exp - max, target mass 1), from torch.
    m = xa.amax(-1)
    stats = torch.stack([m, (xa - m[:, None]).logsumexp(-1), torch.ones_like(m)]).contiguous()
    grad_loss = torch.ones(rows, device=device, dtype=acc)
    args = (grad_loss, None, x, target, None, stats)
    call = lambda: (ops.cross_entropy_backward(*args),)
    return call, lambda: (xa.softmax(-1) - F.one_hot(target, n).to(acc),), x


def mismatch(outs, refs) -> str | None:
    for out, ref in zip(outs, refs, strict=True):
        rtol = RTOL[out.dtype]
        err = (out.to(ref.dtype) - ref).abs()
        bad = ~(err <= rtol * (ref.abs() + ref.abs().max() / 16))  # NaN (unwritten) is bad
        if bool(bad.any()):
            return f"mismatch: {int(bad.sum())} of {bad.numel()} values, max err {err.max():.3g}"
    return None


class Recorder:
    """Stands in for a kernel in the op's module: records each launch (arguments, compiled
    kernel) after filling the kernel's outputs with NaN, so that a tile that leaves values
    unwritten fails the check; with ``warmup``, only compiles (``JITFunction.warmup``)."""

    def __init__(self, kernel, outputs, warmup: bool) -> None:
        self.kernel, self.outputs, self.warmup, self.launches = kernel, outputs, warmup, []

    def __getitem__(self, grid):
        def launch(**kwargs):
            if self.warmup:
                return self.kernel.warmup(grid=grid, **kwargs)
            for name in self.outputs:
                kwargs[name].fill_(math.nan)
            self.launches.append((grid, kwargs, self.kernel[grid](**kwargs)))

        return launch


@contextlib.contextmanager
def patched(name: str, size: int, rule, warmup: bool = False):
    """The op's launch table holds only ``rule`` and its kernel is a Recorder; restored after."""
    from triton_softmax.ops import tiles

    key, outputs = TABLES[name]
    launch = tiles.LAUNCHES[key]
    module, function = importlib.import_module(launch.module), launch.function
    kernel = getattr(module, function)
    recorder = Recorder(kernel, outputs, warmup)
    setattr(module, function, recorder)
    try:
        with tiles.replaced(key, one_rule(launch_table(name), size, rule)):
            yield recorder
    finally:
        setattr(module, function, kernel)


def precompile(name: str, dtype_name: str, n: int, rule, device: str) -> str | None:
    """Worker process: compile one candidate (16 rows: the same specialisation as the timed
    launch) into Triton's disk cache; the error in a line if it does not compile."""
    call, _, _ = problem(name, DTYPES[dtype_name], 16, n, device)
    try:
        with patched(name, DTYPES[dtype_name].itemsize, rule, warmup=True):
            call()
    except Exception as e:  # noqa: BLE001  (any compiler error disqualifies the candidate)
        return f"compile error: {_error(e)}"
    return None


def _error(e: Exception) -> str:
    """An exception in one line of at most 200 characters after its type."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def make_timer(smoke: bool):
    if not smoke:
        from triton.testing import do_bench

        # Median and 20 % / 80 % quantiles in ms of the kernel launch alone, L2 flushed between.
        return lambda fn: do_bench(fn, warmup=5, rep=20, quantiles=[0.5, 0.2, 0.8])

    def perf_counter(fn) -> list[float]:  # smoke: proves the pipeline; the times mean nothing
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        low, median, high = sorted(times)
        return [median, low, high]

    return perf_counter


def measure(name, dtype, n, rule, call, reference, x, timer) -> dict:
    """Check one candidate through the launcher, then time its recorded launch."""
    from triton_softmax.ops._device import launching_on

    size = dtype.itemsize
    row = {"rule": list(rule)}
    try:
        with patched(name, size, rule) as recorder:
            outs = call()
        (grid, kwargs, compiled), *more = recorder.launches
        assert not more, "the launcher made more than one launch"
    except Exception as e:  # noqa: BLE001  (out of resources, compile errors: not a winner)
        return {**row, "status": f"error: {_error(e)}"}
    row["tile"] = [kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_warps"]]
    row["regs"] = getattr(compiled, "n_regs", None)
    row["spills"] = getattr(compiled, "n_spills", None)
    bad = mismatch(outs, reference)
    if bad:
        return {**row, "status": bad}
    with launching_on(x):
        ms = timer(lambda: recorder.kernel[grid](**kwargs))
    row.update(ms=ms[0], ms_p20=ms[1], ms_p80=ms[2])
    row["gbps_min"] = BYTES_PER_ELEMENT[name] * x.numel() * size / (ms[0] * 1e-3) / 1e9
    row["status"] = f"spills ({row['spills']})" if row["spills"] else "ok"
    return row


def choose(cands: list, results: dict, lengths, min_gain: float):
    """(new rule, geometric-mean speed-up over the current rule or None, status): the fastest
    candidate that passed at every length, if it beats the current rule by ``min_gain``."""

    def score(c, ok_only=True):  # mean log ms over the lengths
        rows = [results[(n, tuple(c))] for n in lengths]
        if any("ms" not in r or (ok_only and r["status"] != "ok") for r in rows):
            return math.inf
        return sum(math.log(r["ms"]) for r in rows) / len(rows)

    best, current = min(cands, key=score), score(cands[0], ok_only=False)
    if math.isinf(score(best)):
        return cands[0], None, "no candidate passed"
    if math.isinf(current):
        return best, None, "measured (the current tile failed)"
    gain = math.exp(current - score(best))
    return (best if gain > 1 + min_gain else cands[0]), gain, "measured"


def snippet(report: dict) -> str:
    """The new tables as Python, for ``triton_softmax/ops/tiles.py``."""
    from triton_softmax.ops.tiles import UNBOUNDED

    lines = []
    for name, tables in report["tables"].items():
        key = TABLES[name][0]
        lines.append(f'# triton_softmax/ops/tiles.py, LAUNCHES["{key}"] ({report["device"]}):')
        lines.append("TABLE: TileTable = {")
        for size, entry in sorted(tables.items()):
            lines.append(f"    {size}: (  # {entry['dtype']}: {entry['status']}")
            for r in entry["rules"]:
                cols = "UNBOUNDED" if r[0] == UNBOUNDED else str(r[0])
                tail = ", aligned_only=True" if r[4] else ""
                lines.append(f"        TileRule({cols}, {r[1]}, {r[2]}, {r[3]}{tail}),")
            lines.append("    ),")
        lines.append("}")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    from triton_softmax.ops.tiles import UNBOUNDED

    out = [
        f"# Launch-table sweep: {report['device']}",
        "",
        f"{report['versions']}; commit {report['commit']}; timer {report['timer']}; "
        f"{report['elapsed_s']:.0f} s, budget {report['time_budget_s'] or 'none'}"
        f"{'' if report['complete'] else ' (cut short: unmeasured rules keep their tiles)'}; "
        f"{report['precompiled']} kernels compiled ahead by {report['compile_workers']} workers.",
        "",
        report["measured"],
        "",
        "Folding the new tables into triton_softmax/ops/tiles.py is a human step: paste each "
        "table below as its LAUNCHES entry's table (the forward and backward cross-entropy "
        "tables share their rules there: give each its own tuple where they now differ), "
        "update tests/test_tiles.py, run tests/test_gpu_compile.py.",
    ]
    fmt = lambda r: f"{r[1]} / {r[2]} / {r[3]}"  # noqa: E731
    for name, tables in report["tables"].items():
        for size, entry in sorted(tables.items()):
            out += ["", f"## {name}, {entry['dtype']} ({size}-byte elements): {entry['status']}"]
            head = ["row length ≤", "current BLOCK_N / warps / BLOCK_M cap", "new", "M × N"]
            body = []
            per_rule = zip(entry["current_rules"], entry["rules"], entry["per_rule"], strict=True)
            for old, new, rule in per_rule:
                cols = f"{'∞' if old[0] == UNBOUNDED else old[0]}{' aligned' if old[4] else ''}"
                for m in rule["lengths"] or [{"rows": "–", "n": "–"}]:
                    cur, best = m.get("current_ms"), m.get("best_ms")
                    times = [f"{1e3 * t:.1f}" if t else "–" for t in (cur, best)]
                    gain = f"{cur / best:.2f}×" if cur and best else rule["status"]
                    body.append([cols, fmt(old), fmt(new), f"{m['rows']} × {m['n']}", *times, gain])
            out += common.md_table([*head, "current µs", "new µs", "speed-up"], body)
    return "\n".join(out + ["", "```python", snippet(report), "```", ""])


def plan(args) -> list[tuple]:
    """(table, dtype name, rule index, lengths, candidates) in sweep order: 16-bit first (what
    training uses), then by table and rule."""
    units = []
    for dtype_name in args.dtype:
        for name in args.only:
            table, size = launch_table(name), DTYPES[dtype_name].itemsize
            for i in range(len(table[size])):
                if args.smoke:
                    lengths = [n for n in SMOKE_LENGTHS if rule_index(table[size], n) == i]
                else:
                    lengths = lengths_for(table[size], i, family(name))
                if lengths:
                    cands = candidates(table, size, i, lengths, args.smoke)
                    units.append((name, dtype_name, i, lengths, cands))
    return units


def sweep(unit, args, futures: dict, timer, deadline: float) -> tuple[dict, int]:
    """{(length, rule): result} for one rule's lengths and candidates, until ``deadline``; and
    how many came compiled from the workers."""
    name, dtype_name, _, lengths, cands = unit
    results, precompiled = {}, 0
    for n in lengths:
        call, reference, x = problem(
            name, DTYPES[dtype_name], rows_for(n, args.smoke), n, args.device
        )
        refs = reference()
        for c in cands:
            if time.monotonic() > deadline:
                return results, precompiled
            error, future = None, futures.get((name, dtype_name, n, tuple(c)))
            if future is not None:
                with contextlib.suppress(Exception):  # a lost worker: compile here instead
                    wait = None if math.isinf(deadline) else max(1.0, deadline - time.monotonic())
                    error = future.result(timeout=wait)
                    precompiled += error is None
            results[(n, tuple(c))] = (
                {"rule": list(c), "status": error}
                if error
                else measure(name, DTYPES[dtype_name], n, c, call, refs, x, timer)
            )
    return results, precompiled


def record(entry: dict, unit, results: dict, min_gain: float, smoke: bool) -> bool:
    """Write one rule's results into its table's entry; False if the sweep was cut short."""
    _, _, i, lengths, cands = unit
    rule_report = entry["per_rule"][i]
    for n in lengths:
        tried = [r for (length, _), r in results.items() if length == n]
        if tried:  # tried[0]: the current rule
            rule_report["lengths"].append(
                {"n": n, "rows": rows_for(n, smoke), "current_ms": tried[0].get("ms"),
                 "candidates": tried}
            )  # fmt: skip
    done = len(results) == len(lengths) * len(cands)
    if done:
        new, gain, rule_report["status"] = choose(cands, results, lengths, min_gain)
        entry["rules"][i], rule_report["speedup"] = list(new), gain
        for m in rule_report["lengths"]:
            m["best_ms"] = results[(m["n"], tuple(new))].get("ms")
    else:
        rule_report["status"] = "not measured (time budget)"
    statuses = {r["status"].split(" (")[0] for r in entry["per_rule"]}
    entry["status"] = "measured" if statuses == {"measured"} else "partly measured"
    return done


def new_report(args, device: str, budget: float | None) -> dict:
    """The report before the sweep: every table as its current rules, nothing measured."""
    report = {
        "device": device,
        "versions": common.versions(["torch", "triton"]),
        "commit": common.git_commit(),
        "smoke": args.smoke,
        "timer": "perf_counter x 3 (smoke: the times mean nothing)"
        if args.smoke
        else "triton.testing.do_bench(warmup=5, rep=20), median",
        "measured": "softmax (LOG=False; log-softmax shares the tables); cross-entropy with int64 "
        "targets, no weight / smoothing / z-loss / softcap; bf16 stands for fp16 too. Rows: at "
        "least 4096 and 2**22 elements, at most 2**27 elements (smoke: 4). Rules as (max_cols, "
        "BLOCK_N, num_warps, max BLOCK_M, aligned_only), max_cols 2**62 = UNBOUNDED.",
        "time_budget_s": budget,
        "min_gain": args.min_gain,
        "compile_workers": args.jobs,
        "precompiled": 0,
        "tables": {},
    }
    for dtype_name in args.dtype:  # every table starts as the current one
        for name in args.only:
            size = DTYPES[dtype_name].itemsize
            current = [list(r) for r in launch_table(name)[size]]
            report["tables"].setdefault(name, {})[size] = {
                "dtype": dtype_name,
                "status": "not measured",
                "current_rules": current,
                "rules": [*current],
                "per_rule": [{"status": "not measured", "lengths": []} for _ in current],
            }
    return report


def main(argv: list[str] | None = None) -> int:
    ap = common.parser("tune", __doc__, smoke="CPU, interpreter, tiny rows, seconds")
    ap.add_argument("--only", nargs="+", choices=list(TABLES), default=list(TABLES))
    ap.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["bf16", "fp32"])
    ap.add_argument("--time-budget", type=float, help="seconds of sweeping (120; smoke: none)")
    ap.add_argument("--min-gain", type=float, default=0.03, help="to replace a tile (0.03)")
    ap.add_argument("--jobs", type=int, help="compile workers (CPUs - 4, at most 12; smoke: 1)")
    args = ap.parse_args(argv)
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if not args.smoke and (interpret or not torch.cuda.is_available()):
        print(
            "no CUDA device (or TRITON_INTERPRET is set): the tile sweep times compiled kernels "
            "on a GPU and reports no CPU timings.\n--smoke runs the pipeline end to end on this "
            "CPU through Triton's interpreter; its timings mean nothing.",
            file=sys.stderr,
        )
        return NO_GPU_EXIT
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (workers inherit it)
    from triton_softmax.ops._device import kernels_interpreted

    if kernels_interpreted() != args.smoke:
        print("--smoke needs a fresh process (triton was imported already)", file=sys.stderr)
        return NO_GPU_EXIT
    args.device = "cpu" if args.smoke else "cuda"
    budget = args.time_budget if args.time_budget is not None else (None if args.smoke else 120.0)
    if args.jobs is None:
        args.jobs = 1 if args.smoke else min(12, common.cpu_count() - 4)
    start = time.monotonic()
    deadline = math.inf if budget is None else start + budget
    where = f"{common.cpu_model()} (interpreter)" if args.smoke else torch.cuda.get_device_name()
    stem = common.stem("tiles", smoke=True) if args.smoke else f"tiles_{common.slug(where)}"
    args.out.mkdir(parents=True, exist_ok=True)

    units, pool, futures = plan(args), None, {}
    if args.jobs > 0:  # compiles run ahead of the timing loop, in the plan's order
        pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"))
        for name, dtype_name, _, lengths, cands in units:
            for n, c in ((n, c) for n in lengths for c in cands):
                futures[(name, dtype_name, n, tuple(c))] = pool.submit(
                    precompile, name, dtype_name, n, c, args.device
                )
    report = new_report(args, where, budget)
    paths = args.out / f"{stem}.json", args.out / f"{stem}.md"

    def write(complete: bool) -> None:
        report.update(complete=complete, elapsed_s=time.monotonic() - start)
        paths[0].write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        paths[1].write_text(markdown(report), encoding="utf-8")

    timer, complete = make_timer(args.smoke), True
    for unit in units:
        name, dtype_name, i, _, cands = unit
        results, precompiled = sweep(unit, args, futures, timer, deadline)
        report["precompiled"] += precompiled
        entry = report["tables"][name][DTYPES[dtype_name].itemsize]
        complete = record(entry, unit, results, args.min_gain, args.smoke)
        write(complete=False)  # a run killed from outside keeps what it measured
        if not complete:
            print(f"time budget of {budget:g} s used up: writing what was measured", flush=True)
            break
        gain = entry["per_rule"][i]["speedup"]
        print(
            f"{name} {dtype_name} rule {i} (≤ {cands[0].max_cols}): {tuple(cands[0])[1:4]} -> "
            f"{tuple(entry['rules'][i])[1:4]}, {gain or math.nan:.3f}x, {len(cands)} candidates",
            flush=True,
        )
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)
    write(complete)
    print(snippet(report))
    print(
        "\nFolding these tables into triton_softmax/ops/tiles.py is a human step (then "
        "tests/test_tiles.py)."
    )
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
