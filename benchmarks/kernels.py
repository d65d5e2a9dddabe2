"""Kernel benchmark: ours against torch eager, torch.compile, Liger-Kernel and quack.

    python -m benchmarks.kernels                      # the default grid below (needs a CUDA GPU)
    python -m benchmarks.kernels --quick              # a subset, for a first look
    python -m benchmarks.kernels --op cross_entropy --mode forward+backward --dtype bf16
    python -m benchmarks.kernels --smoke --out DIR    # tiny shapes, any machine, seconds

Every provider runs in this process on the same device and inputs. Each provider's output (and
gradient) is checked against ours before it is timed; a mismatch is recorded and not timed.
Times are ``triton.testing.do_bench`` medians with 20 % / 80 % quantiles (a perf_counter timer on
a CPU, where there is no driver for do_bench; those numbers only prove that the harness works).
Bandwidth is
counted from the bytes the op must move (``bytes_moved``), and compared with the device-to-device
copy bandwidth measured at the start of the same run. For cross-entropy forward+backward on CUDA,
the peak memory the call allocates is reported as a multiple of the logits' size.

Output (``--out``, default ``benchmarks/results``): ``kernels_<device>_torch<v>_triton<v>.csv``
(rows are written as they are measured, so an interrupted run keeps what it measured), a markdown
table and PNG plots of the same name (``benchmarks.report``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

import torch

from benchmarks.machine import cpu_description, slug
from benchmarks.providers import MODES, OPS, Provider, all_providers

RESULTS_DIR = Path(__file__).resolve().parent / "results"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Default grid. softmax / log_softmax: M rows x N columns; cross_entropy: M = BT rows x N = V.
DEFAULT_ROWS = (4096, 16384)
DEFAULT_COLS = (256, 1024, 4096, 16384, 32768, 65536, 131072, 262144)
CE_ROWS = (8192,)
CE_VOCABS = (32000, 50257, 128256, 151936, 262144)
DEFAULT_DTYPES = ("fp32", "bf16")
DEFAULT_MODES = ("forward", "forward+backward")
# --quick: the shapes the targets of DESIGN.md section 4 name, one row count.
QUICK_ROWS = (4096,)
QUICK_COLS = (1024, 4096, 32768, 65536, 262144)
QUICK_VOCABS = (32000, 128256, 262144)
# --smoke: tiny shapes the Triton interpreter runs in seconds (both cases fit one block).
SMOKE_ROWS = (16,)
SMOKE_COLS = (40, 300)
SMOKE_CE_ROWS = (8,)
SMOKE_VOCABS = (100, 700)

#: Order in which (op, mode) stages run, the ones DESIGN.md's targets name first, so that a run
#: cut short by --time-budget keeps the numbers that matter most.
STAGE_PRIORITY = (
    ("softmax", "forward"),
    ("cross_entropy", "forward+backward"),
    ("softmax", "forward+backward"),
    ("log_softmax", "forward"),
    ("cross_entropy", "forward"),
    ("log_softmax", "forward+backward"),
    ("softmax", "backward"),
    ("log_softmax", "backward"),
    ("cross_entropy", "backward"),
)

#: Largest max|out - ref| / max|ref| accepted when a provider is checked against ours.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}

#: Memory a case needs, in units of one input tensor, with a little slack: the input, dy, our
#: reference outputs, the provider's outputs and what autograd saves (torch eager cross-entropy
#: keeps log-softmax and its gradient).
MEMORY_FACTOR = {
    ("softmax", "forward"): 4,
    ("softmax", "backward"): 7,
    ("softmax", "forward+backward"): 7,
    ("cross_entropy", "forward"): 4,
    ("cross_entropy", "backward"): 7,
    ("cross_entropy", "forward+backward"): 7,
}

NO_GPU_EXIT = 1
MISMATCH_EXIT = 3
NO_GPU_MESSAGE = (
    "no CUDA device: the kernel benchmark needs a GPU (torch.cuda.is_available() is False).\n"
    "Use --smoke to run the harness end to end on tiny shapes on this CPU (Triton interpreter); "
    "its timings mean nothing."
)


def bytes_moved(op: str, mode: str, rows: int, cols: int, itemsize: int) -> tuple[int, str]:
    """The bytes ``op`` must move at least, and the formula (s = bytes per element).

    softmax / log_softmax over M x N:
        forward           read x, write y                          2*M*N*s
        backward          read y, read dy, write dx                3*M*N*s
        forward+backward  the two above                            5*M*N*s
    cross_entropy over M x V logits (int64 targets and fp32 per-row values are O(M), not counted):
        forward           read logits                              M*V*s
        backward          read logits, write grad                  2*M*V*s
        forward+backward  read logits once, write grad once        2*M*V*s
    """
    n = rows * cols * itemsize
    if op == "cross_entropy":
        if mode == "forward":
            return n, "M*V*s (read logits)"
        return 2 * n, "2*M*V*s (read logits once, write grad once)"
    if mode == "forward":
        return 2 * n, "2*M*N*s (read x, write y)"
    if mode == "backward":
        return 3 * n, "3*M*N*s (read y, read dy, write dx)"
    return 5 * n, "5*M*N*s (read x, write y; read y, read dy, write dx)"


@dataclasses.dataclass
class Row:
    """One CSV row: one provider on one case."""

    op: str
    mode: str
    dtype: str
    M: int
    N: int
    provider: str
    status: str = "ok"
    ms_p50: float = math.nan
    ms_p20: float = math.nan
    ms_p80: float = math.nan
    gbps: float = math.nan
    pct_copy_bw: float = math.nan
    bytes: int = 0
    bytes_formula: str = ""
    max_rel_err: float = math.nan
    peak_mem_x_logits: float = math.nan
    copy_gbps: float = math.nan
    kernel_path: str = ""
    timer: str = ""
    device: str = ""
    versions: str = ""
    notes: str = ""


CSV_COLUMNS = [f.name for f in dataclasses.fields(Row)]

Timer = Callable[[Callable[[], object]], tuple[float, float, float]]


def do_bench_timer(warmup_ms: int, rep_ms: int) -> Timer:
    """``triton.testing.do_bench`` (CUDA events, L2 flushed between calls): (p50, p20, p80) ms."""
    from triton.testing import do_bench

    def timer(fn: Callable[[], object]) -> tuple[float, float, float]:
        p50, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return p50, p20, p80

    return timer


def perf_counter_timer(reps: int, warmup: int = 1) -> Timer:
    """Wall-clock timer for CPU smoke runs: (p50, p20, p80) ms of ``reps`` calls."""

    def timer(fn: Callable[[], object]) -> tuple[float, float, float]:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        q = torch.quantile(
            torch.tensor(times, dtype=torch.float64),
            torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64),
        )
        return tuple(q.tolist())

    return timer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, timer: Timer, n_bytes: int) -> tuple[float, float]:
    """Device-to-device copy ``dst.copy_(src)`` of ``n_bytes``: (GB/s, ms); bytes = 2 * n_bytes
    (read src, write dst)."""
    src = torch.ones(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))[0]
    return 2 * n_bytes / (ms * 1e-3) / 1e9, ms


def max_rel_err(out: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    """max |out - ref| / max |ref| over each pair, computed in row chunks (no full-size fp32
    temporaries for huge tensors); inf when shapes differ or NaN appears where ref has none."""
    worst = 0.0
    for a, b in zip(out, ref, strict=True):
        if a.shape != b.shape:
            return math.inf
        a2 = a.detach().reshape(-1, a.shape[-1] if a.dim() else 1)
        b2 = b.detach().reshape(a2.shape)
        step = max(1, (1 << 26) // a2.shape[1])
        diff, scale = 0.0, 0.0
        for i in range(0, a2.shape[0], step):
            ai, bi = a2[i : i + step].float(), b2[i : i + step].float()
            d = torch.where(torch.isnan(ai) & torch.isnan(bi), 0.0, (ai - bi).abs())
            diff = max(diff, d.max().item())
            scale = max(scale, bi.abs().nan_to_num(nan=0.0).max().item())
        err = diff / max(scale, 1e-30)
        worst = math.inf if math.isnan(err) else max(worst, err)
    return worst


class Case:
    """Inputs of one (op, dtype, M, N) and the closures each mode times."""

    def __init__(
        self,
        op: str,
        dtype: torch.dtype,
        rows: int,
        cols: int,
        device: torch.device,
        *,
        with_grad_output: bool = True,
    ) -> None:
        self.op, self.dtype, self.rows, self.cols, self.device = op, dtype, rows, cols, device
        self.x = torch.randn(rows, cols, dtype=dtype, device=device)
        self.target = self.dy = None
        if op == "cross_entropy":
            self.target = torch.randint(0, cols, (rows,), device=device)
        elif with_grad_output:
            self.dy = torch.randn_like(self.x)

    def closures(
        self, mode: str, fn: Callable[..., torch.Tensor], inplace: bool
    ) -> tuple[Callable[[], tuple[torch.Tensor, ...]], Callable[[], object], Callable[[], None]]:
        """(check, timed, reset) for ``mode``.

        ``check`` returns the outputs compared with ours: (y,) or (loss,) for forward; (dx,) for
        backward; (y or loss, dx) for forward+backward. ``timed`` is what is timed; ``reset``
        restores an in-place provider's private logits after the check.
        """
        x, t, dy = self.x, self.target, self.dy
        args = (lambda v: (v, t)) if t is not None else (lambda v: (v,))
        grad_out = (dy,) if dy is not None else None
        # In-place providers get a private copy of the logits: whatever they write into it
        # (the gradient) never reaches `self.x`, which every provider reads.
        own = x.clone() if inplace else x.detach()

        def reset() -> None:
            if inplace:
                with torch.no_grad():
                    own.copy_(x)

        if mode == "forward":

            def forward() -> tuple[torch.Tensor, ...]:
                with torch.no_grad():
                    return (fn(*args(own)),)

            return forward, forward, reset

        leaf = own.requires_grad_(True)

        if mode == "backward":
            out = fn(*args(leaf))

            def backward() -> tuple[torch.Tensor, ...]:
                return torch.autograd.grad(out, leaf, grad_out, retain_graph=True)

            return backward, backward, reset

        def check() -> tuple[torch.Tensor, ...]:
            out = fn(*args(leaf))
            (dx,) = torch.autograd.grad(out, leaf, grad_out)
            return out.detach(), dx

        return check, lambda: torch.autograd.grad(fn(*args(leaf)), leaf, grad_out), reset


def _grid(op: str, args: argparse.Namespace) -> list[tuple[int, int]]:
    ce = op == "cross_entropy"
    if args.shapes:
        return [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    if args.smoke:
        rows, cols = (SMOKE_CE_ROWS, SMOKE_VOCABS) if ce else (SMOKE_ROWS, SMOKE_COLS)
    elif args.quick:
        rows, cols = (CE_ROWS, QUICK_VOCABS) if ce else (QUICK_ROWS, QUICK_COLS)
    else:
        rows, cols = (CE_ROWS, CE_VOCABS) if ce else (DEFAULT_ROWS, DEFAULT_COLS)
    rows = args.rows or rows
    cols = (args.vocab if ce else args.cols) or cols
    return [(m, n) for m in rows for n in cols]


def _versions(providers: Sequence[Provider]) -> str:
    import triton

    import triton_softmax

    parts = [f"torch {torch.__version__}", f"triton {triton.__version__}"]
    parts.append(f"triton-softmax {triton_softmax.__version__}")
    for p in providers:
        if p.package not in ("torch", "triton-softmax"):
            parts.append(f"{p.package} {p.version() or 'not installed'}")
    return "; ".join(dict.fromkeys(parts))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_description()}"


def result_stem(device_name: str, smoke: bool) -> str:
    """``kernels_<device>_torch<v>_triton<v>`` (``kernels-smoke_...`` for smoke runs)."""
    import triton

    kind = "kernels-smoke" if smoke else "kernels"
    versions = f"torch{slug(torch.__version__)}_triton{slug(triton.__version__)}"
    return f"{kind}_{slug(device_name.split(',')[0])}_{versions}"


def _free_bytes(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _peak_extra(device: torch.device, timed: Callable[[], object]) -> int:
    """Bytes allocated at the peak of one call beyond what was allocated before it (the returned
    gradient counts: it is memory the op needs)."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = timed()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak


class Harness:
    """Runs the cases, writes rows as they are measured."""

    def __init__(self, args: argparse.Namespace, device: torch.device, file: TextIO) -> None:
        self.args, self.device, self.file = args, device, file
        self.writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS)
        self.writer.writeheader()
        self.providers = [
            p for p in all_providers("eager" if args.smoke else "inductor") if _wanted(p, args)
        ]
        if device.type == "cuda":
            warmup, rep = (1, 5) if args.smoke else (args.warmup, args.rep)
            self.timer, self.timer_name = do_bench_timer(warmup, rep), f"do_bench({warmup},{rep})"
        else:
            # The correctness check just before each timing is the warm-up call.
            self.timer, self.timer_name = perf_counter_timer(3, warmup=0), "perf_counter(3)"
        self.device_name = _device_name(device)
        self.versions = _versions(self.providers)
        self.start = time.monotonic()
        self.copy_gbps = math.nan
        self.rows: list[Row] = []

    def out_of_time(self) -> bool:
        budget = self.args.time_budget
        return budget is not None and time.monotonic() - self.start > budget

    def emit(self, row: Row) -> None:
        row.device, row.versions, row.timer = self.device_name, self.versions, self.timer_name
        row.copy_gbps = self.copy_gbps
        self.rows.append(row)
        self.writer.writerow(dataclasses.asdict(row))
        self.file.flush()
        line = (
            f"{row.op:13s} {row.mode:16s} {row.dtype:4s} {row.M:>6}x{row.N:<7} {row.provider:23s}"
        )
        if row.status == "ok":
            line += f" {row.ms_p50:9.4f} ms {row.gbps:8.1f} GB/s {row.pct_copy_bw:6.1f}% of copy"
            if not math.isnan(row.peak_mem_x_logits):
                line += f"  peak +{row.peak_mem_x_logits:.2f}x logits"
        else:
            line += f" {row.status}"
        print(line, flush=True)

    def run(self) -> None:
        n_copy = (1 << 30) if self.device.type == "cuda" else (1 << 24)
        if self.args.smoke:
            n_copy = 1 << 22
        self.copy_gbps, _ = copy_bandwidth(self.device, self.timer, n_copy)
        print(f"device: {self.device_name}\nversions: {self.versions}")
        print(f"device-to-device copy: {self.copy_gbps:.1f} GB/s ({n_copy >> 20} MiB buffer)")
        for op, mode in STAGE_PRIORITY:
            if op in self.args.op and mode in self.args.mode:
                for dtype_name in self.args.dtype:
                    for rows, cols in _grid(op, self.args):
                        self.run_case(op, mode, dtype_name, rows, cols)

    def run_case(self, op: str, mode: str, dtype_name: str, rows: int, cols: int) -> None:
        """Inputs for one (op, dtype, M, N), then every provider on them in ``mode``."""
        row = Row(op, mode, dtype_name, rows, cols, "")
        if self.out_of_time():
            return self.skip_all(
                row, f"skipped: time budget of {self.args.time_budget:.0f} s spent"
            )
        dtype = DTYPES[dtype_name]
        itemsize = torch.empty((), dtype=dtype).element_size()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            free = _free_bytes(self.device)
            need = MEMORY_FACTOR[(op if op == "cross_entropy" else "softmax", mode)]
            need *= rows * cols * itemsize
            if need > 0.92 * free:
                status = f"skipped: needs about {need / 2**30:.0f} GiB, {free / 2**30:.0f} free"
                return self.skip_all(row, status)
        case = Case(op, dtype, rows, cols, self.device, with_grad_output=mode != "forward")
        self.run_mode(case, mode, dtype_name, itemsize)
        del case
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def skip_all(self, row: Row, status: str) -> None:
        for p in self.providers:
            if p.applies(row.op, row.mode):
                self.emit(dataclasses.replace(row, provider=p.name, status=status))

    def run_mode(self, case: Case, mode: str, dtype_name: str, itemsize: int) -> None:
        op, rows, cols = case.op, case.rows, case.cols
        n_bytes, formula = bytes_moved(op, mode, rows, cols, itemsize)
        reference: tuple[torch.Tensor, ...] | None = None
        for p in self.providers:
            if not p.applies(op, mode):
                continue
            row = Row(
                op, mode, dtype_name, rows, cols, p.name, bytes=n_bytes, bytes_formula=formula
            )
            if p.inplace and op == "cross_entropy":
                row.notes = "writes the gradient into (a private copy of) the logits"
            if p.name == "torch.compile":
                row.notes = f"backend={p.backend}" + (" (smoke)" if self.args.smoke else "")
            reason = p.skip_reason(op, mode, self.device)
            if reason is None and reference is None and p.name != "triton-softmax":
                reason = "skipped: no reference (triton-softmax failed on this case)"
            if reason is not None:
                row.status = reason
                self.emit(row)
                continue
            try:
                reference = self.measure(p, case, mode, row, reference)
            except torch.cuda.OutOfMemoryError:
                row.status = "skipped: out of memory"
            except Exception as e:  # a provider's failure is a result, not the end of the run
                row.status = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            if row.status != "ok" and p.name == "triton-softmax":
                reference = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.emit(row)

    def measure(
        self,
        p: Provider,
        case: Case,
        mode: str,
        row: Row,
        reference: tuple[torch.Tensor, ...] | None,
    ) -> tuple[torch.Tensor, ...] | None:
        """Check ``p`` against ``reference`` (ours), then time it; returns the reference."""
        fn = p.build(case.op)
        # Only cross-entropy providers write into their input (Liger's softmax does not).
        check, timed, reset = case.closures(mode, fn, p.inplace and case.op == "cross_entropy")
        out = tuple(t.detach() for t in check())
        synchronize(self.device)
        if p.name == "triton-softmax":
            import triton_softmax as ts

            row.kernel_path = ts.kernel_path(case.x)
            reference, row.max_rel_err = out, 0.0
        else:
            row.max_rel_err = max_rel_err(out, reference)
            tolerance = TOLERANCE[case.dtype]
            if not row.max_rel_err <= tolerance:
                row.status = f"mismatch: max rel err {row.max_rel_err:.3g} > {tolerance:g}"
                return reference
        del out
        reset()
        row.ms_p50, row.ms_p20, row.ms_p80 = self.timer(timed)
        row.gbps = row.bytes / (row.ms_p50 * 1e-3) / 1e9
        row.pct_copy_bw = 100.0 * row.gbps / self.copy_gbps
        if case.op == "cross_entropy" and mode == "forward+backward" and self.device.type == "cuda":
            row.peak_mem_x_logits = _peak_extra(self.device, timed) / (
                case.x.numel() * case.x.element_size()
            )
        return reference


def _wanted(p: Provider, args: argparse.Namespace) -> bool:
    return not args.provider or p.name in args.provider


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.kernels",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--op", nargs="+", choices=OPS, default=list(OPS))
    ap.add_argument(
        "--mode",
        nargs="+",
        choices=(*MODES, "all"),
        default=None,
        help=f"default: {' '.join(DEFAULT_MODES)} (--smoke: all)",
    )
    ap.add_argument(
        "--dtype",
        nargs="+",
        choices=tuple(DTYPES),
        default=None,
        help=f"default: {' '.join(DEFAULT_DTYPES)} (--smoke: fp32)",
    )
    ap.add_argument("--rows", "-M", nargs="+", type=int, help="row counts M (BT for cross_entropy)")
    ap.add_argument("--cols", "-N", nargs="+", type=int, help="softmax / log_softmax columns N")
    ap.add_argument("--vocab", "-V", nargs="+", type=int, help="cross_entropy classes V")
    ap.add_argument("--shapes", nargs="+", metavar="MxN", help="explicit shapes for every op")
    ap.add_argument("--provider", nargs="+", help="only these providers (ours always runs)")
    ap.add_argument("--quick", action="store_true", help="a subset of the grid, for a first look")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, runs anywhere in seconds")
    ap.add_argument("--warmup", type=int, default=10, help="do_bench warmup, ms (default 10)")
    ap.add_argument("--rep", type=int, default=None, help="do_bench rep, ms (50; --quick 25)")
    ap.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds after which the remaining cases are recorded as skipped "
        "(default 480, none with --smoke)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder")
    ap.add_argument("--no-report", action="store_true", help="CSV only: no markdown, no plots")
    ap.add_argument(
        "--update-readme", action="store_true", help="regenerate the README's kernel section"
    )
    return ap


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    if args.mode is None:
        args.mode = list(MODES) if args.smoke else list(DEFAULT_MODES)
    elif "all" in args.mode:
        args.mode = list(MODES)
    args.mode = [m for m in MODES if m in args.mode]
    args.dtype = args.dtype or (["fp32"] if args.smoke else list(DEFAULT_DTYPES))
    if args.rep is None:
        args.rep = 25 if args.quick else 50
    if args.time_budget is None and not args.smoke:
        args.time_budget = 480.0
    if args.provider:
        args.provider = sorted({*args.provider, "triton-softmax"})
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit code (1 without CUDA unless --smoke, 3 when torch
    eager disagrees with ours)."""
    args = _resolve(_parser().parse_args(argv))
    if not torch.cuda.is_available():
        if not args.smoke:
            print(NO_GPU_MESSAGE, file=sys.stderr)
            return NO_GPU_EXIT
        # The kernels then run through Triton's interpreter; this must precede triton's import.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)

    args.out.mkdir(parents=True, exist_ok=True)
    from benchmarks import report

    path = args.out / f"{result_stem(_device_name(device), args.smoke)}.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        harness = Harness(args, device, f)
        harness.run()
    rows = harness.rows
    print(f"\nwrote {path}")
    if not args.no_report:
        for written in report.write_kernel_report(path):
            print(f"wrote {written}")
    if args.update_readme:
        print(f"updated {report.update_readme()}")
    return _summarize(rows)


def _summarize(rows: Sequence[Row]) -> int:
    counts: dict[str, int] = {}
    for r in rows:
        key = r.status.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    print("rows: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    for reason in sorted({r.status for r in rows if r.status.startswith("skipped")}):
        print(f"  {reason}")
    bad = [r for r in rows if r.status.startswith(("mismatch", "error"))]
    for r in bad:
        print(f"  {r.op} {r.mode} {r.dtype} {r.M}x{r.N} {r.provider}: {r.status}")
    if any(r.provider == "torch" and r.status.startswith("mismatch") for r in rows):
        print("torch eager disagrees with triton-softmax: see the mismatch rows", file=sys.stderr)
        return MISMATCH_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
