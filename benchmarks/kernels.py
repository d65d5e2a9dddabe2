"""Kernel benchmark on a GPU: ours against torch eager, torch.compile, torch's chunked linear
cross-entropy, Liger-Kernel, Cut Cross-Entropy and quack.

    python -m benchmarks.kernels                         # the default grid (needs a CUDA GPU)
    python -m benchmarks.kernels --op cross_entropy --dtype bf16 -N 128256
    python -m benchmarks.kernels --op linear_cross_entropy -M 8192 -N 128256 -H 4096
    python -m benchmarks.kernels --smoke --out DIR       # tiny shapes, any machine, seconds

Grid (``GRID``): softmax, log_softmax at M in {4096, 16384} x N in {256 ... 262144}, fp32 and
bf16; cross_entropy at BT = 8192 x V in {32000, 50257, 128256, 151936, 262144}, fp32 and bf16;
linear_cross_entropy and its RL head at N in {8192, 4096, 16384} rows x H = 4096 x V in {32000,
128256, 262144}, bf16; forward and forward+backward.

Every provider (``PROVIDERS``; the peers imported from their packages, a missing one recorded as
``skipped: not installed (pip install ...)``; Liger and quack have no log_softmax) runs in this
process on the same device and inputs, and is checked against ours (output, and gradient for
forward+backward: max |out - ours| / max |ours| within ``TOLERANCE``) before it is timed; a
mismatch is recorded, not timed, and torch eager disagreeing makes the exit status 3. In-place
providers (Liger's cross-entropy, ours with ``inplace_backward``) get a private copy of the
logits. Times: ``triton.testing.do_bench(warmup=10, rep=50)`` median and 20 %/80 % quantiles, L2
flushed (under ``--smoke`` on a CPU, 3 ``perf_counter`` calls through Triton's interpreter and
``torch.compile`` on the ``eager`` backend, which only prove the harness runs). Bandwidth twice:
over the minimum bytes any implementation must move and over the bytes the provider really moves
(``bytes_min``, ``bytes_moved``, their formulas in every row), each also as % of the
device-to-device copy bandwidth (1 GiB ``dst.copy_(src)``) measured in the same run.
Cross-entropy forward+backward on CUDA also gets its peak extra memory, in logits.

The fused linear + cross-entropy (``linear_cross_entropy``: M rows of H features, V = N classes,
no bias, mean loss; forward+backward = gradients for input and weight) is counted in TFLOP/s
instead (forward 2*M*V*H, forward+backward 6*M*V*H), with its peak extra memory on CUDA in MiB,
against torch eager (``F.linear`` + ``F.cross_entropy``), ``torch.compile`` of that, torch's
chunked ``F.linear_cross_entropy`` (torch >= 2.13), Liger's fused linear CE and Cut Cross-Entropy
(exact, and with its default gradient filtering), and against its ceiling measured in the same
run: the GEMMs alone (provider ``gemms``: ``torch.matmul`` of X Wᵀ forward, and dZ W, dZᵀ X
forward+backward, same shapes and dtypes), with ours reported as a ratio to it.

The head for RL (``linear_cross_entropy_rl``: the same shapes) is the per-token loss and entropy
at a sampling temperature, ``linear_cross_entropy(x, w, t, reduction="none",
temperature=RL_TEMPERATURE, return_entropy=True)``; forward+backward = gradients for input and
weight of a fixed random per-row combination a * loss + b * entropy (the loss and entropy terms of
a PPO/GRPO objective). Against the unfused torch computation (``logp = log_softmax(F.linear(x, w)
/ T)`` in fp32, the gathered -logp as loss, entropy ``-(exp(logp) * logp).sum(-1)``),
``torch.compile`` of that and Liger's ``LigerFusedLinearScaledCrossEntropyFunction`` (on
CUDA only), in TFLOP/s with peak memory like the fused linear rows. It runs after everything
else, in ``--rl-budget`` seconds added to ``--time-budget``.

Limits: a case or provider that runs out of memory is ``skipped: out of memory``. After
``--time-budget`` seconds (480) no case or provider starts (``skipped: time budget``); the stages
docs/design.md's targets name run first (``STAGES``), linear_cross_entropy last with
``--lce-budget`` seconds (150) of the budget kept for it, rows first (N = 8192 both modes, then
4096, then 16384), then the RL head in ``--rl-budget`` seconds (60) more. Without a GPU the command
exits with status 1 (``--smoke`` runs anywhere). Not yet run on a GPU: ``do_bench``, the CUDA
peaks, Inductor and the peers on CUDA are written against their documented APIs but unmeasured;
under the interpreter Liger's fused linear CE agrees with ours and Cut Cross-Entropy's kernels fail
(``error: ...`` rows). Output (``--out``, default ``benchmarks/results``):
``kernels_<gpu>_torch<v>_triton<v>.csv`` (``COLUMNS``, written row by row: a cut-short run keeps
what it measured), and from ``benchmarks.kernels_report`` a ``.md`` with one table per (op, mode,
dtype, M) and a PNG per (op, mode); smoke runs are named ``kernels-smoke_...``.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import common

OPS = ("softmax", "log_softmax", "cross_entropy", "linear_cross_entropy", "linear_cross_entropy_rl")
LCE = "linear_cross_entropy"
#: The head for RL: per-token loss and entropy at a temperature, at linear_cross_entropy's shapes.
RL = "linear_cross_entropy_rl"
#: The sampling temperature of the RL rows (logits divided by it before the softmax).
RL_TEMPERATURE = 0.7
#: Seconds added to --time-budget for linear_cross_entropy_rl, which runs after all else.
RL_BUDGET = 60.0
MODES = ("forward", "forward+backward")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The grid: (rows, columns) for softmax / log_softmax, (BT, V) for cross-entropy.
GRID = {
    "softmax": ((4096, 16384), (256, 1024, 4096, 16384, 32768, 65536, 131072, 262144)),
    "cross_entropy": ((8192,), (32000, 50257, 128256, 151936, 262144)),
    # (rows, V) at H = HIDDEN, bf16; rows in run order: 8192 first (docs/design.md's target row).
    LCE: ((8192, 4096, 16384), (32000, 128256, 262144)),
}
# --smoke: what Triton's interpreter runs in seconds; N = 300 puts 2 rows in a block.
SMOKE_GRID = {
    "softmax": ((16,), (40, 300)),
    "cross_entropy": ((8,), (100, 700)),
    LCE: ((8,), (100, 700)),
}
#: Features of the linear layer in linear_cross_entropy (-H changes it).
HIDDEN, SMOKE_HIDDEN = 4096, 32
#: Seconds of --time-budget kept for linear_cross_entropy, which runs last (--lce-budget).
LCE_BUDGET = 150.0
#: Run order, the stages docs/design.md's targets name first, so that a run cut short keeps them.
STAGES = [
    ("softmax", "forward"),
    ("cross_entropy", "forward+backward"),
    ("softmax", "forward+backward"),
    ("log_softmax", "forward"),
    ("cross_entropy", "forward"),
    ("log_softmax", "forward+backward"),
    (LCE, "forward+backward"),  # last, with LCE_BUDGET seconds kept for it; see plan()
    (LCE, "forward"),
    (RL, "forward+backward"),  # after everything, in its own RL_BUDGET seconds
    (RL, "forward"),
]
#: Largest max|out - ours| / max|ours| accepted before a provider is timed.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}
NO_GPU_EXIT = 1
COLUMNS = (
    "op mode dtype M N H provider status ms_p50 ms_p20 ms_p80 tflops gbps_min pct_copy_min "
    "gbps_moved pct_copy_moved bytes_min bytes_moved min_formula moved_formula flops flops_formula "
    "max_rel_err peak_mem_x_logits peak_mem_mib copy_gbps kernel_path timer device versions notes"
).split()


def _bytes(k: int, op: str, m: int, n: int, s: int, what: str) -> tuple[int, str]:
    factor = f"{k}*" if k > 1 else ""
    return k * m * n * s, f"{factor}M*{'V' if op == 'cross_entropy' else 'N'}*s ({what})"


def bytes_min(op: str, mode: str, m: int, n: int, s: int) -> tuple[int, str]:
    """The least any implementation moves over M x N (V) elements of s bytes (docs/design.md;
    int64 targets and per-row statistics are O(M), not counted):

    softmax, log_softmax: forward 2*M*N*s (read x, write y);
                          forward+backward 5*M*N*s (and read y, read dy, write dx)
    cross_entropy:        forward M*V*s (read logits);
                          forward+backward 2*M*V*s (read logits once, write grad once)
    """
    k, what = {
        ("softmax", "forward"): (2, "read x, write y"),
        ("softmax", "forward+backward"): (5, "read x, write y; read y, dy, write dx"),
        ("cross_entropy", "forward"): (1, "read logits"),
        ("cross_entropy", "forward+backward"): (2, "read logits once, write grad once"),
    }[("cross_entropy" if op == "cross_entropy" else "softmax", mode)]
    return _bytes(k, op, m, n, s, what)


def bytes_moved(provider: str, op: str, mode: str, m: int, n: int, s: int) -> tuple[int, str]:
    """What ``provider`` really moves, read off its source; (0, "not modelled") for torch's.

    cross_entropy forward+backward, ours (both), Liger and quack: 3*M*V*s. The forward reads
        the logits; the gradient needs them read again and written (ours and quack: in the
        backward kernel; Liger: in a second pass of its forward, its backward a no-op for a
        scalar loss). Forward alone: M*V*s, the minimum.
    softmax / log_softmax, ours (``our_softmax_passes``): rows held whole (up to 32768
        elements, 8192 in fp64) and rows split over programs that each hold a slice (up to
        half the SMs' worth: 270336 elements on an H100, 135168 in fp64) move the minimum;
        longer rows are
        streamed, read twice in the forward (online max/sum pass, then the write pass):
        3*M*N*s, and the streamed backward reads y and dy twice (log_softmax: dy twice, y once)
        and writes dx: 5*M*N*s (4). The second reads may come from L2; counted as DRAM here.
    softmax, Liger (one block per row, errors above 65536) and quack (the row stays on chip,
        clusters for long rows): the minimum.
    torch, torch.compile: not modelled (their kernels and passes depend on the size).
    """
    if provider in ("torch", "torch.compile"):
        return 0, "not modelled"
    if op == "cross_entropy" and mode == "forward+backward":
        return _bytes(3, op, m, n, s, "read logits twice, write grad")
    if op != "cross_entropy" and provider.startswith("triton-softmax"):
        forward, backward = our_softmax_passes(op, n, s)
        if mode == "forward" and forward > 2:
            return _bytes(forward, op, m, n, s, "streamed: read x twice, write y")
        if mode != "forward" and forward + backward > 5:
            return _bytes(forward + backward, op, m, n, s, "streamed rows: x, y, dy read again")
    return bytes_min(op, mode, m, n, s)


def our_softmax_passes(op: str, n: int, s: int) -> tuple[int, int]:
    """Row transfers (reads + writes, in units of N*s) of our softmax forward and backward for
    rows of n elements of s bytes, from ``softmax.plan``, which the launchers follow (a GPU
    with at least MAX_SLICES SMs: fewer SMs stream rows of more slices than SMs)."""
    from triton_softmax.ops import softmax

    where = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    how = dict(aligned=n % 16 == 0, max_slices=softmax.slices_allowed(where))
    forward = softmax.plan(n, s, backward=False, **how).path != "streamed"
    backward = softmax.plan(n, s, backward=True, **how).path != "streamed"
    return (2 if forward else 3), (3 if backward else 4 if op == "log_softmax" else 5)


def flops(mode: str, m: int, v: int, h: int) -> tuple[int, str]:
    """linear_cross_entropy's useful flops, M rows, H features, V classes: forward 2*M*V*H (the
    logits matmul); forward+backward 6*M*V*H (and grad_input = G W, grad_weight = G^T x). Ours,
    like Liger's, forms the mean loss's gradients in the forward (6*M*V*H done; 8*M*V*H for
    per-row losses, whose backward recomputes the logits); the count is the same for every
    provider, so TFLOP/s compare as inverse times."""
    if mode == "forward":
        return 2 * m * v * h, "2*M*V*H (logits)"
    return 6 * m * v * h, "6*M*V*H (logits, grad_input, grad_weight; recomputation not counted)"


#: The row of linear_cross_entropy's ceiling: its GEMMs alone (not an implementation of the op).
CEILING = "gemms"


def gemms(x: torch.Tensor, w: torch.Tensor, mode: str) -> Callable:
    """linear_cross_entropy's ceiling: the GEMMs the op cannot avoid, ``torch.matmul`` (cuBLAS on
    CUDA) on the same shapes and dtypes, into buffers allocated once: forward the logits
    Z = X Wᵀ ([M, H] x [H, V]); forward+backward also grad_input = dZ W and grad_weight = dZᵀ X,
    the logits buffer standing in for dZ. Whole-batch GEMMs: a chunked op runs smaller ones."""
    z = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    if mode == "forward":
        return lambda: torch.matmul(x, w.t(), out=z)
    grad_x, grad_w = torch.empty_like(x), torch.empty_like(w)

    def three() -> None:
        torch.matmul(x, w.t(), out=z)
        torch.matmul(z, w, out=grad_x)
        torch.matmul(z.t(), x, out=grad_w)

    return three


# Providers: build(op) -> the function, or why it cannot run. Conventions: softmax / log_softmax
# f(x [M, N]) over the last dim; cross_entropy f(logits [M, V], target [M]) -> mean loss;
# linear_cross_entropy f(x [M, H], w [V, H], target [M]) -> mean loss;
# linear_cross_entropy_rl f(x, w, target) -> (per-row loss [M], per-row entropy [M]) at
# temperature RL_TEMPERATURE.
# The peers are imported from their packages, never re-implemented.


def _torch_rl(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The unfused head for RL, as trainers write it: the tempered log-probs over the whole
    vocabulary (the [M, V] logits, and log-probs in fp32, held), the target's, and the entropy.
    The softmax runs in fp32: bf16 log-probs are too coarse (spacing 1/16 near -10) for the
    entropy, off by 1.6 % of its value at V = 32000 against float64 (ours: 0.3 %, its rounding
    to bf16)."""
    logp = torch.log_softmax(F.linear(x, w).float() / RL_TEMPERATURE, dim=-1)
    return -logp.gather(-1, t[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def _torch(op: str) -> Callable:
    if op == RL:
        return _torch_rl
    if op == LCE:
        return lambda x, w, t: F.cross_entropy(F.linear(x, w), t)
    return F.cross_entropy if op == "cross_entropy" else lambda x: getattr(F, op)(x, dim=-1)


def _ours(op: str, inplace: bool = False) -> Callable:
    import triton_softmax as ts

    if op == RL:
        return lambda x, w, t: ts.linear_cross_entropy(
            x, w, t, reduction="none", temperature=RL_TEMPERATURE, return_entropy=True
        )
    if op == LCE:
        return lambda x, w, t: ts.linear_cross_entropy(x, w, t)
    if op == "cross_entropy":
        return lambda x, t: ts.cross_entropy(x, t, inplace_backward=inplace)
    return lambda x: getattr(ts, op)(x, dim=-1)


def _ours_sharded(op: str) -> Callable | str:
    """Ours with ``process_group=`` over a world of one rank: the vocab-parallel code path
    (shard layout, one all_gather of 3 floats per row, the merge) against the unsharded one."""
    import torch.distributed as dist

    import triton_softmax as ts

    if op not in ("cross_entropy", LCE):
        return "skipped: process_group is for cross-entropy"
    if not dist.is_initialized():
        backend, address = "nccl" if torch.cuda.is_available() else "gloo", "tcp://127.0.0.1"
        dist.init_process_group(
            backend, init_method=f"{address}:{common.free_port()}", rank=0, world_size=1
        )
    group = dist.group.WORLD
    if op == LCE:
        return lambda x, w, t: ts.linear_cross_entropy(x, w, t, process_group=group)
    return lambda x, t: ts.cross_entropy(x, t, process_group=group)


def _torch_chunked(op: str) -> Callable | str:
    """torch's own fused op, chunked over rows (torch >= 2.13), with its automatic options."""
    if not (hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")):
        return f"skipped: torch {torch.__version__} has no F.linear_cross_entropy (2.13+)"
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda x, w, t: F.linear_cross_entropy(x, w, t, options=options)


def _compiled(op: str, backend: str = "inductor") -> Callable:
    torch._dynamo.reset()  # compiled afresh for each static shape: no silent fallback to eager
    return torch.compile(_torch(op), fullgraph=True, dynamic=False, backend=backend)


def _peer(module: str, package: str, op: str) -> object | str:
    if op == "log_softmax":
        return f"skipped: {package} has no log_softmax"
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        return f"skipped: not installed (pip install {package})"
    except Exception as e:  # installed but broken: a result, not the end of the run
        return f"skipped: import failed ({type(e).__name__}: {e})"


def _liger_rl() -> Callable | str:
    """Liger's ``LigerFusedLinearScaledCrossEntropyFunction.apply(x, w, t, temperature, ...,
    return_entropy=True)`` -> (nll, entropy), on CUDA only. It dispatches on the device: its
    Hopper CuTe DSL kernel on sm90 (bf16; needs ``nvidia-cutlass-dsl``), elsewhere a torch
    fallback in 512-row chunks (verl's formulas). Where the sm90 kernel does not import, the
    fallback is called directly (what Liger runs on other GPUs); the row's notes say which."""
    name = "liger_kernel.ops.fused_linear_scaled_cross_entropy"
    mod = _peer(name, "liger-kernel", RL)
    if isinstance(mod, str):
        return mod
    if not hasattr(mod, "LigerFusedLinearScaledCrossEntropyFunction"):
        return "skipped: this liger-kernel has no LigerFusedLinearScaledCrossEntropyFunction"
    if not torch.cuda.is_available():
        return "skipped: benchmarked on CUDA only (on a CPU Liger runs a torch fallback)"
    public = mod.LigerFusedLinearScaledCrossEntropyFunction.apply
    resolve = getattr(mod, "_resolve_implementation", None)
    fallback = getattr(mod, "_FusedLinearPPOFallbackFunction", None)
    apply, note = public, "Liger's own dispatch (which code path: not identified)"
    if resolve and fallback:
        try:
            sm90 = resolve(torch.device("cuda")) is not fallback
            path = "its sm90 CuTe DSL kernel" if sm90 else "its torch fallback"
            note = f"Liger's dispatch here: {path}"
        except Exception as e:  # the sm90 kernel's imports (nvidia-cutlass-dsl) are missing
            why = f"{type(e).__name__}: {e}"
            note = f"Liger's torch fallback, called directly: its sm90 dispatch failed ({why})"

            def apply(x, w, t, temperature, ignore_index, _tiles, entropy):
                return fallback.apply(x, w, t, temperature, ignore_index, entropy)

    def liger(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return apply(x, w, t, RL_TEMPERATURE, -100, 1, True)

    liger.bench_note = note  # type: ignore[attr-defined]
    return liger


def _liger(op: str) -> Callable | str:
    if op == RL:
        return _liger_rl()
    mod = _peer("liger_kernel.transformers.functional", "liger-kernel", op)
    if isinstance(mod, str):
        return mod
    if op == LCE:  # (input, weight, target); accumulates grad_weight in the weight's dtype
        return mod.liger_fused_linear_cross_entropy
    return mod.liger_softmax if op == "softmax" else mod.liger_cross_entropy


def _cce(op: str, filter_eps: str | None = None) -> Callable | str:
    """Cut Cross-Entropy's ``linear_cross_entropy(e, c, targets)``; ``filter_eps=None`` is exact,
    its default "high" skips gradient blocks whose softmax values are all below eps/32."""
    mod = _peer("cut_cross_entropy", "cut-cross-entropy", op)
    if isinstance(mod, str):
        return mod
    return lambda x, w, t: mod.linear_cross_entropy(x, w, t, filter_eps=filter_eps)


def _quack(op: str) -> Callable | str:
    mod = _peer(f"quack.{op}", "quack-kernels", op)
    if isinstance(mod, str) or not torch.cuda.is_available():
        return mod if isinstance(mod, str) else "skipped: quack needs a CUDA device"
    if op == "softmax":
        return mod.softmax
    # Older quack releases return per-row losses, newer ones the mean.
    return lambda x, t: (lambda loss: loss.mean() if loss.dim() else loss)(mod.cross_entropy(x, t))


#: name -> (PyPI package, build, writes the gradient into its logits). Ours first: the reference.
PROVIDERS = {
    "triton-softmax": ("triton-softmax", _ours, False),
    "triton-softmax-inplace": ("triton-softmax", lambda op: _ours(op, inplace=True), True),
    "triton-softmax-tp1": ("triton-softmax", _ours_sharded, False),
    "torch": ("torch", _torch, False),
    "torch.compile": ("torch", _compiled, False),
    "torch-chunked": ("torch", _torch_chunked, False),
    "liger": ("liger-kernel", _liger, True),
    "cce": ("cut-cross-entropy", _cce, False),
    "cce-filtered": ("cut-cross-entropy", lambda op: _cce(op, filter_eps="high"), False),
    "quack": ("quack-kernels", _quack, False),
}
#: Providers checked on the loss only (their gradients are approximate by design), and why.
LOSS_ONLY = {
    "cce-filtered": "CCE's default filter_eps='high' skips gradient blocks below eps/32: "
    "only the loss is checked",
}


def runs_on(provider: str, op: str, mode: str) -> bool:
    """Whether ``provider`` has a row for (op, mode): inplace_backward changes only cross-entropy
    forward+backward; torch-chunked and CCE exist for linear_cross_entropy only; quack has no
    linear cross-entropy here."""
    if provider == "triton-softmax-inplace":
        return (op, mode) == STAGES[1]
    if provider == "triton-softmax-tp1":
        return op in ("cross_entropy", LCE)
    if op == RL:  # the peers with temperature and entropy
        return provider in ("triton-softmax", "torch", "torch.compile", "liger")
    if provider in ("torch-chunked", "cce", "cce-filtered"):
        return op == LCE
    return op != LCE if provider == "quack" else True


def max_rel_err(out: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...]) -> float:
    """max |out - ref| / max |ref| over each pair, in row chunks (no full-size fp32 copies of
    huge tensors); inf when shapes differ or NaN appears where ref has none."""
    worst = 0.0
    for a, b in zip(out, ref, strict=True):
        if a.shape != b.shape:
            return math.inf
        a, b = (t.detach().reshape(-1, t.shape[-1] if t.dim() else 1) for t in (a, b))
        step, diff, scale = max(1, (1 << 26) // a.shape[1]), 0.0, 0.0
        for i in range(0, a.shape[0], step):
            ai, bi = a[i : i + step].float(), b[i : i + step].float()
            d = torch.where(ai.isnan() & bi.isnan(), 0.0, (ai - bi).abs())
            diff = max(diff, d.nan_to_num(nan=math.inf).max().item())
            scale = max(scale, bi.abs().nan_to_num(nan=0.0).max().item())
        worst = max(worst, diff / max(scale, 1e-30))
    return worst


def make_timer(smoke: bool) -> tuple[Callable, str]:
    """(timer(fn) -> (p50, p20, p80) ms, its name): do_bench on CUDA, 3 perf_counter calls else."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        warmup, rep = (1, 5) if smoke else (10, 50)
        timer = lambda fn: do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])  # noqa: E731
        return timer, f"do_bench(warmup={warmup}, rep={rep})"

    def perf_counter(fn: Callable) -> list[float]:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return [sorted(times)[i] for i in (1, 0, 2)]

    return perf_counter, "perf_counter x 3 (smoke: the times mean nothing)"


def closures(fn: Callable, x: torch.Tensor, other, mode: str, inplace: bool):
    """(check, timed, reset) for one provider; ``other`` is the target or, for softmax, dy.
    ``check`` returns what is compared with ours: (y or loss,) and for forward+backward dx.

    An in-place provider gets a private copy of the logits, which ``reset`` restores after the
    check, so that the gradient it writes never reaches the inputs of the others. The copy is an
    intermediate of the graph (our ``inplace_backward`` refuses a leaf: it would be a parameter).
    """
    ce = other is not None and not other.is_floating_point()
    args, dy = ((other,), None) if ce else ((), other)
    own = x.detach().requires_grad_(mode != "forward")
    own = own.clone() if inplace else own

    def reset() -> None:
        with torch.no_grad():
            own.copy_(x)

    def forward() -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return (fn(own, *args),)

    def check() -> tuple[torch.Tensor, ...]:
        out = fn(own, *args)
        return out.detach(), *torch.autograd.grad(out, own, dy)

    timed = forward if mode == "forward" else lambda: torch.autograd.grad(fn(own, *args), own, dy)
    return (forward if mode == "forward" else check), timed, (reset if inplace else lambda: None)


def fused_closures(fn: Callable, x: torch.Tensor, w: torch.Tensor, target: torch.Tensor, mode: str):
    """(check, timed, reset) for linear_cross_entropy (``fn`` returns the mean loss) and the RL
    head (``fn`` returns per-row loss and entropy): forward under ``no_grad`` on inputs that do
    not require grad; forward+backward ``torch.autograd.grad(outputs, (x, w), upstream)``, the
    RL head's upstream fixed random per-row a, b (the gradients of sum(a * loss + b * entropy),
    from a seeded generator, the same for every provider); ``check`` returns the outputs and
    grad_x, grad_w."""
    fb = mode != "forward"
    xl, wl = x.detach().requires_grad_(fb), w.detach().requires_grad_(fb)
    seeded = torch.Generator(device=x.device).manual_seed(0)
    a, b = torch.randn(2, x.shape[0], generator=seeded, device=x.device, dtype=torch.float32)

    def outputs() -> tuple[torch.Tensor, ...]:
        out = fn(xl, wl, target)
        return tuple(out) if isinstance(out, tuple | list) else (out,)

    def forward() -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return outputs()

    def backward() -> tuple[torch.Tensor, ...]:
        outs = outputs()
        ups = None if len(outs) == 1 else [u.to(o.dtype) for u, o in zip((a, b), outs, strict=True)]
        return *(o.detach() for o in outs), *torch.autograd.grad(outs, (xl, wl), ups)

    timed = lambda: backward()[-2:]  # noqa: E731
    return (backward, timed, lambda: None) if fb else (forward, forward, lambda: None)


def _peak_extra(timed: Callable) -> int:
    """Bytes allocated at the peak of one call beyond what was allocated before it (the returned
    gradient counts: the op needs it)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = timed()
    torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated() - base


class Run:
    """One run: the timer, the providers, the copy bandwidth, the rows written so far."""

    def __init__(self, args: argparse.Namespace, writer: csv.DictWriter) -> None:
        self.args, self.writer, self.rows, self.start = args, writer, [], time.monotonic()
        self.current: str | None = None  # the op of the case being run
        self.cuda = torch.cuda.is_available()
        self.where = "cuda" if self.cuda else "cpu"
        self.timer, timer_name = make_timer(args.smoke)
        self.providers = dict(PROVIDERS)
        if args.smoke:  # Inductor's C++ compile of each tiny CPU graph would take seconds
            self.providers["torch.compile"] = ("torch", lambda op: _compiled(op, "eager"), False)
        packages = dict.fromkeys(["torch", "triton", *(p[0] for p in PROVIDERS.values())])
        versions = (
            "; ".join(f"{p} {common.package_version(p) or 'not installed'}" for p in packages)
            + f"; triton-softmax commit {common.git_commit()}"
        )
        self.device = torch.cuda.get_device_name() if self.cuda else common.cpu_description()
        src = torch.ones(1 << (22 if args.smoke else 30), dtype=torch.uint8, device=self.where)
        dst = torch.empty_like(src)
        ms = self.timer(lambda: dst.copy_(src))[0]
        copy_gbps = 2 * src.numel() / (ms * 1e-3) / 1e9  # read src, write dst
        self.common = dict(copy_gbps=copy_gbps, timer=timer_name, device=self.device)
        self.common["versions"] = versions

    def emit(self, row: dict) -> None:
        row.update(self.common)
        self.rows.append(row)
        self.writer.writerow(row)
        result = row["status"]
        if result == "ok" and row["op"] in (LCE, RL):
            result = f"{row['ms_p50']:9.4f} ms {row['tflops']:8.1f} TFLOP/s"
            if row["peak_mem_mib"] == row["peak_mem_mib"]:  # not NaN: measured on CUDA
                result += f" peak +{row['peak_mem_mib']:.0f} MiB"
        elif result == "ok":
            result = f"{row['ms_p50']:9.4f} ms {row['gbps_min']:8.1f} GB/s"
        print(
            f"{row['op']:13s} {row['mode']:16s} {row['dtype']} {row['M']:>6}x{row['N']:<7} "
            f"{row['provider']:23s} {result}",
            flush=True,
        )

    def over_budget(self, op: str | None = None) -> str | None:
        """Why a new case of ``op`` (None: a new provider of the current case) may not start:
        --time-budget spent, or for other ops than linear_cross_entropy, all of it but the
        seconds kept for linear_cross_entropy (--lce-budget) when that op is in the run;
        linear_cross_entropy_rl, which runs last, has --rl-budget seconds more."""
        budget = self.args.time_budget
        if budget is None:
            return None
        spent = time.monotonic() - self.start
        if op == RL or (op is None and self.current == RL):
            budget += self.args.rl_budget
            return f"skipped: time budget of {budget:.0f} s spent" if spent > budget else None
        if spent > budget:
            return f"skipped: time budget of {budget:.0f} s spent"
        keep = min(self.args.lce_budget, budget) if LCE in self.args.op else 0.0
        if op not in (None, LCE) and spent > budget - keep:
            return (
                f"skipped: time budget ({budget - keep:.0f} s of {budget:.0f} s spent; the rest "
                f"is kept for {LCE})"
            )
        return None

    def inputs(self, op: str, mode: str, dtype: str, m: int, n: int) -> tuple:
        """(x, other): logits or x and dy; linear_cross_entropy: ((x [M, H], w [V, H]), target),
        w scaled by H**-0.5 so that the logits are about N(0, 1)."""
        dt, where = DTYPES[dtype], self.where
        if op in (LCE, RL):
            h = self.args.hidden
            x = torch.randn(m, h, dtype=dt, device=where)
            w = torch.randn(n, h, dtype=dt, device=where).mul_(h**-0.5)
            return (x, w), torch.randint(0, n, (m,), device=where)
        x = torch.randn(m, n, dtype=dt, device=where)
        if op == "cross_entropy":
            return x, torch.randint(0, n, (m,), device=where)
        return x, (torch.randn_like(x) if mode != "forward" else None)  # dy

    def case(self, op: str, mode: str, dtype: str, m: int, n: int) -> None:
        """Inputs for one (op, mode, dtype, M, N), then every provider on them."""
        s = DTYPES[dtype].itemsize
        base = dict.fromkeys(COLUMNS, math.nan) | dict(op=op, mode=mode, dtype=dtype, M=m, N=n)
        base |= dict(status="ok", kernel_path="", notes="")
        self.current = op
        if op in (LCE, RL):
            base |= dict(H=self.args.hidden, bytes_min=0, min_formula="", bytes_moved=0)
            base["moved_formula"] = ""
            base["flops"], base["flops_formula"] = flops(mode, m, n, self.args.hidden)
        else:
            base["bytes_min"], base["min_formula"] = bytes_min(op, mode, m, n, s)
        skip, x, other = self.over_budget(op), None, None
        if skip is None:
            try:
                x, other = self.inputs(op, mode, dtype, m, n)
            except torch.OutOfMemoryError:
                skip = "skipped: out of memory (inputs)"
        reference = None
        for name, (_, build, inplace) in self.providers.items():
            if not runs_on(name, op, mode):
                continue
            row = dict(base, provider=name)
            if op not in (LCE, RL):
                row["bytes_moved"], row["moved_formula"] = bytes_moved(name, op, mode, m, n, s)
            if inplace and op == "cross_entropy":
                row["notes"] = "writes the gradient into (a private copy of) the logits"
            if name in LOSS_ONLY and mode != "forward":
                row["notes"] = LOSS_ONLY[name]
            fn = skip or self.over_budget() or build(op)
            row["notes"] = getattr(fn, "bench_note", row["notes"])  # which code path a peer ran
            if not isinstance(fn, str) and reference is None and name != "triton-softmax":
                fn = "skipped: no reference (triton-softmax failed on this case)"
            if isinstance(fn, str):
                row["status"] = fn
            else:
                try:
                    reference = self.measure(row, fn, x, other, inplace, reference)
                except torch.OutOfMemoryError:
                    row["status"] = "skipped: out of memory"
                except Exception as e:  # a provider's failure is a result, not the end of the run
                    row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
                if self.cuda:
                    torch.cuda.empty_cache()
            self.emit(row)
        if op == LCE:
            self.emit(self.ceiling(dict(base, provider=CEILING), x, skip or self.over_budget()))

    def ceiling(self, row: dict, x, skip: str | None) -> dict:
        """Time linear_cross_entropy's GEMMs alone (``gemms``) on the case's inputs."""
        row["notes"] = "ceiling: the GEMMs alone (torch.matmul), not checked against ours"
        if skip:
            row["status"] = skip
            return row
        try:
            timed = gemms(*x, row["mode"])
            row["ms_p50"], row["ms_p20"], row["ms_p80"] = self.timer(timed)
            row["tflops"] = row["flops"] / (row["ms_p50"] * 1e-3) / 1e12
        except torch.OutOfMemoryError:
            row["status"] = "skipped: out of memory"
        finally:
            if self.cuda:
                torch.cuda.empty_cache()
        return row

    def measure(self, row: dict, fn: Callable, x, other, inplace: bool, reference):
        """Check ``fn`` against ``reference`` (None: ``fn`` is ours and becomes it), then time
        it; returns the reference."""
        op, fb = row["op"], row["mode"] == "forward+backward"
        if op in (LCE, RL):
            check, timed, reset = fused_closures(fn, *x, other, row["mode"])
            lead, logits = x[0], row["M"] * row["N"] * x[0].element_size()
        else:
            ce = op == "cross_entropy"
            check, timed, reset = closures(fn, x, other, row["mode"], inplace and ce)
            lead, logits = x, x.numel() * x.element_size()
        out = tuple(t.detach() for t in check())
        if reference is None:
            import triton_softmax as ts

            reference, row["kernel_path"], row["max_rel_err"] = out, ts.kernel_path(lead), 0.0
        else:
            loss_only = row["provider"] in LOSS_ONLY and len(out) > 1
            row["max_rel_err"] = err = (
                max_rel_err(out[:1], reference[:1]) if loss_only else max_rel_err(out, reference)
            )
            if loss_only:
                grads = max_rel_err(out[1:], reference[1:])
                row["notes"] += f"; gradients' max rel err {grads:.3g} (not checked)"
            if not err <= TOLERANCE[lead.dtype]:
                row["status"] = f"mismatch: max rel err {err:.3g} > {TOLERANCE[lead.dtype]:g}"
                return reference
        del out
        reset()
        row["ms_p50"], row["ms_p20"], row["ms_p80"] = self.timer(timed)
        for kind in ("min", "moved"):
            if row[f"bytes_{kind}"]:
                row[f"gbps_{kind}"] = row[f"bytes_{kind}"] / (row["ms_p50"] * 1e-3) / 1e9
                row[f"pct_copy_{kind}"] = 100 * row[f"gbps_{kind}"] / self.common["copy_gbps"]
        if op in (LCE, RL):
            row["tflops"] = row["flops"] / (row["ms_p50"] * 1e-3) / 1e12
        if self.cuda and (op in (LCE, RL) or (op == "cross_entropy" and fb)):
            peak = _peak_extra(timed)
            row["peak_mem_x_logits"], row["peak_mem_mib"] = peak / logits, peak / 2**20
        return reference


def plan(args: argparse.Namespace) -> list[tuple[str, str, str, int, int]]:
    """The cases (op, mode, dtype, M, N) in run order: STAGES in order, over dtypes, rows, columns;
    linear_cross_entropy last and by rows first (both modes of its first row, 8192, before the
    next), in bf16 unless --dtype says otherwise (fp32 under --smoke)."""
    grid, cases = SMOKE_GRID if args.smoke else GRID, []
    for op, mode in (
        s for s in STAGES if s[0] in args.op and s[1] in args.mode and s[0] not in (LCE, RL)
    ):
        rows, cols = grid[op.replace("log_", "")]
        default = ["fp32"] if args.smoke else ["fp32", "bf16"]
        for dtype in args.dtype or default:
            cases += [(op, mode, dtype, m, n) for m in args.rows or rows for n in args.cols or cols]
    for fused in (o for o in (LCE, RL) if o in args.op):  # the RL head last, at LCE's shapes
        rows, cols = grid[LCE]
        modes = [mode for op, mode in STAGES if op == fused and mode in args.mode]
        for m in args.rows or rows:
            for mode in modes:
                for dtype in args.dtype or (["fp32"] if args.smoke else ["bf16"]):
                    cases += [(fused, mode, dtype, m, n) for n in args.cols or cols]
    return cases


def main(argv: list[str] | None = None) -> int:
    """Run; exit status 1 without CUDA (unless --smoke), 3 when torch eager disagrees with ours."""
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.kernels",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--op", nargs="+", choices=OPS, default=list(OPS))
    ap.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument(
        "--dtype", nargs="+", choices=list(DTYPES), help="default: fp32 bf16 (linear CE: bf16)"
    )
    ap.add_argument("-M", "--rows", nargs="+", type=int, help="rows (BT for cross_entropy)")
    ap.add_argument(
        "-N", "--cols", nargs="+", type=int, help="columns (V for cross_entropy, linear CE)"
    )
    ap.add_argument("-H", "--hidden", type=int, help=f"linear CE features ({HIDDEN}; smoke: 32)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, any machine, seconds")
    ap.add_argument("--time-budget", type=float, help="then skip the rest (s; 480, smoke: none)")
    ap.add_argument(
        "--lce-budget",
        type=float,
        default=LCE_BUDGET,
        help=f"seconds of --time-budget kept for linear_cross_entropy, run last ({LCE_BUDGET:g})",
    )
    ap.add_argument(
        "--rl-budget",
        type=float,
        default=RL_BUDGET,
        help=f"seconds added to --time-budget for {RL}, run after all else ({RL_BUDGET:g})",
    )
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="output folder")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        if not args.smoke:
            print(
                "no CUDA device: the kernel benchmark needs a GPU and reports no CPU timings.\n"
                "--smoke runs the harness end to end on tiny shapes on this CPU (Triton "
                "interpreter); its timings mean nothing.",
                file=sys.stderr,
            )
            return NO_GPU_EXIT
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    args.hidden = args.hidden or (SMOKE_HIDDEN if args.smoke else HIDDEN)
    if args.time_budget is None and not args.smoke:
        args.time_budget = 480.0
    torch.manual_seed(0)
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else common.cpu_model()
    name = f"{common.slug(gpu)}_torch{common.slug(torch.__version__)}_triton{triton.__version__}"
    path = args.out / f"kernels{'-smoke' if args.smoke else ''}_{name}.csv"
    args.out.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        run = Run(args, writer)
        print(f"{run.device}: copy {run.common['copy_gbps']:.1f} GB/s; {run.common['versions']}")
        for case in plan(args):
            run.case(*case)
            f.flush()
    from benchmarks.kernels_report import write_report

    for written in [path, *write_report(path)]:
        print(f"wrote {written}")
    bad = [r for r in run.rows if r["status"].startswith(("mismatch", "error"))]
    for r in bad:
        print(
            f"  {r['op']} {r['mode']} {r['dtype']} {r['M']}x{r['N']} {r['provider']}: {r['status']}"
        )
    torch_disagrees = any(r["provider"] == "torch" and "mismatch" in r["status"] for r in bad)
    return common.MISMATCH_EXIT if torch_disagrees else 0


if __name__ == "__main__":
    sys.exit(main())
