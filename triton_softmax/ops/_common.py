"""What every op shares: which path a tensor takes, how a launch is made, tiles, dtype rules,
and the online log-sum-exp update that softmax and cross-entropy both stream rows with."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Literal, NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

KernelPath = Literal["triton", "triton-interpreter", "torch"]

#: Floating dtypes the kernels accept; the kernels accumulate in fp32 (fp64 for fp64).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Elements in one program's [BLOCK_M, BLOCK_N] tile when a row is short enough to take
#: several rows per program (before a table's BLOCK_M cap).
TILE_ELEMENTS = 4096

#: Devices Triton compiles the kernels for.
TRITON_DEVICES = ("cuda",)


@triton.jit
def _probe_kernel():
    # Never launched. Whether triton made it an InterpretedFunction tells whether
    # TRITON_INTERPRET=1 was set when this package's kernels were defined.
    pass


def kernels_interpreted() -> bool:
    """True when this package's Triton kernels run through Triton's CPU interpreter."""
    return isinstance(_probe_kernel, InterpretedFunction)


def kernel_path(where: torch.Tensor | torch.device | str) -> KernelPath:
    """Which implementation the ops take for a tensor (or a device).

    Returns:
        ``"triton"``: compiled Triton kernels (CUDA devices, NVIDIA or AMD ROCm);
        ``"triton-interpreter"``: the same kernels through Triton's interpreter (set
        ``TRITON_INTERPRET=1`` before triton is first imported; slow, used by the tests);
        ``"torch"``: a CPU tensor without the interpreter, computed by torch's own functions
        (the functional API) or a plain-torch implementation of the same math (the ops), so a
        model trained on a GPU runs anywhere.
    Raises:
        ValueError: for a device no path serves (``meta`` tensors hold no data; ``mps`` and
            others have no Triton backend).
    """
    device = where.device if isinstance(where, torch.Tensor) else torch.device(where)
    if kernels_interpreted():
        if device.type in ("cpu", *TRITON_DEVICES):
            return "triton-interpreter"
    elif device.type == "cpu":
        return "torch"
    elif device.type in TRITON_DEVICES:
        return "triton"
    raise ValueError(
        f"no kernel path for device {device.type!r}: the kernels run on CUDA devices (Triton), "
        "on the CPU (plain torch, or Triton's interpreter with TRITON_INTERPRET=1)"
        + (" ; a meta tensor holds no data to run on" if device.type == "meta" else "")
    )


#: Triton's interpreter keeps global state: launches from several threads must take turns.
_INTERPRETER_LOCK = threading.Lock()


@contextlib.contextmanager
def launching_on(x: torch.Tensor) -> Iterator[None]:
    """Context for a kernel launch on ``x``'s device.

    Compiled kernels: make ``x``'s GPU the current device (Triton launches on the current one).
    Interpreter: one launch at a time, and numpy's warnings about masked-off lanes (the
    interpreter evaluates them too: ``-inf - -inf``, ``log 0``; the kernels never store them)
    silenced for this launch only.
    """
    if kernels_interpreted():
        with _INTERPRETER_LOCK, np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            yield
    elif x.device.type == "cuda":
        with torch.cuda.device(x.device):
            yield
    else:
        yield


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 accumulates in fp64; every other supported dtype in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def triton_accumulator_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def check_floating(x: torch.Tensor | torch.dtype, what: str) -> None:
    """TypeError naming the dtype unless ``x`` (a tensor or a dtype) is one the kernels take."""
    dtype = x if isinstance(x, torch.dtype) else x.dtype
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise TypeError(f"{what} must be a floating-point tensor ({names}), got {dtype}")


class TileRule(NamedTuple):
    """One row of a launch table: rows of up to ``max_cols`` elements (a power of two) take
    column blocks of up to ``block_n`` elements with ``num_warps`` warps, and up to
    ``max_block_m`` rows per program. A row that fits one block (``n_cols <= block_n``) is
    held in registers whole; a longer one is streamed in blocks of ``block_n``.
    ``aligned_only``: the rule applies only to launches that Triton specialises as 16-aligned
    (see :func:`triton_aligned`); other launches fall through to the next rule."""

    max_cols: int
    block_n: int
    num_warps: int
    max_block_m: int
    aligned_only: bool = False


#: A launch table: for each element size in bytes, rules in increasing ``max_cols``; the
#: last rule's ``max_cols`` is UNBOUNDED (it takes every longer row, streamed).
TileTable = dict[int, tuple[TileRule, ...]]

#: ``max_cols`` of a table's last rule.
UNBOUNDED = 1 << 62


class Tile(NamedTuple):
    """What a launch uses: BLOCK_M rows of BLOCK_N columns per program, ``num_warps`` warps;
    ``single_block`` when the whole row fits one block (read once)."""

    block_m: int
    block_n: int
    num_warps: int
    single_block: bool


def triton_aligned(n_cols: int, *rows: torch.Tensor) -> bool:
    """Whether Triton specialises a launch over ``rows`` as 16-aligned: every data pointer a
    multiple of 16 bytes, every row stride and the row length multiples of 16 elements
    (Triton marks such arguments ``tt.divisibility = 16``). Aligned launches load 16-byte
    vectors with one mask bit per vector; others load element by element with one mask bit
    each, which costs registers on long rows."""
    return n_cols % 16 == 0 and all(r.data_ptr() % 16 == 0 and r.stride(0) % 16 == 0 for r in rows)


def pick_tile(
    table: TileTable,
    n_cols: int,
    element_size: int,
    *,
    aligned: bool,
    interpreted: bool = False,
    block_n: int | None = None,
) -> Tile:
    """The tile for rows of ``n_cols`` elements of ``element_size`` bytes, from ``table``.

    BLOCK_N is the row length rounded up to a power of two (at least 16), capped at the rule's
    ``block_n``; BLOCK_M = TILE_ELEMENTS // BLOCK_N rows (at least 1), capped at the rule's
    ``max_block_m``. Under Triton's interpreter (``interpreted``) the cap is not applied:
    there are no registers to spare there, and each program instance costs ~5 ms whatever
    its size, so fewer, larger programs are faster; BLOCK_N and the single-block choice are
    the compiled kernels' own. ``block_n`` overrides BLOCK_N (tests use it to reach the
    streamed paths on short rows).
    """
    rules = table[element_size]
    rule = next(r for r in rules if n_cols <= r.max_cols and (aligned or not r.aligned_only))
    if block_n is None:
        block_n = min(triton.next_power_of_2(max(n_cols, 1)), rule.block_n)
    block_n = max(block_n, 16)
    block_m = max(1, min(128, TILE_ELEMENTS // block_n))
    if not interpreted:
        block_m = min(block_m, rule.max_block_m)
    return Tile(block_m, block_n, rule.num_warps, n_cols <= block_n)


def selectable_tiles(table: TileTable) -> list[tuple[int, Tile, bool]]:
    """Every (element size, tile, aligned) that :func:`pick_tile` can return for compiled
    kernels, ``aligned`` telling which of Triton's two specialisations (16-aligned or not,
    see :func:`triton_aligned`) the tile is launched with. Found by asking ``pick_tile``
    about rows of every power of two, one more, and 16 more (the rules' bounds are powers of
    two, so these reach every BLOCK_N), unaligned, and aligned where the length allows it."""
    found = {}
    for element_size, rules in table.items():
        longest = max(r.max_cols for r in rules if r.max_cols != UNBOUNDED)
        for exponent in range(2 * longest.bit_length()):
            for n_cols in (1 << exponent, (1 << exponent) + 1, (1 << exponent) + 16):
                for aligned in (False, True) if n_cols % 16 == 0 else (False,):
                    tile = pick_tile(table, n_cols, element_size, aligned=aligned)
                    found[(element_size, tile, aligned)] = None
    return list(found)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` as 2-D rows of its last dimension, unit column stride (copies only if needed)."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


@triton.jit
def online_logsumexp_update(m, d, x):
    """One block of the online log-sum-exp (arXiv 1805.02867, Alg. 3), per row of ``x``.

    ``m`` is the running max and ``d`` the running sum of ``exp(x - m)``; ``x`` is
    [BLOCK_M, BLOCK_N] with masked lanes at -inf. Returns ``(m_new, m_new_shift, d_new)``:
    ``m_new_shift`` is ``m_new``, or 0 while a row has seen only -inf, where shifting by
    ``m_new`` would give ``exp(-inf + inf)`` = NaN (``d`` is still 0 then, so 0 is exact).
    ``d_new`` is the sum of ``exp(x - m_new_shift)`` over the row so far.
    """
    m_new = tl.maximum(m, tl.max(x, axis=1))
    m_new_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    d = d * tl.exp(m - m_new_shift) + tl.sum(tl.exp(x - m_new_shift[:, None]), axis=1)
    return m_new, m_new_shift, d


#: log2(e): exp(x) = exp2(x * LOG2E), which compiles to one multiply and ex2.approx.ftz in fp32.
LOG2E = tl.constexpr(1.4426950408889634)
#: ln(2): log(x) = log2(x) * LN2.
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def online_logsumexp_lanes(m, d, x):
    """One step of the online log-sum-exp kept per lane: ``m``, ``d`` and ``x`` have one shape
    ([BLOCK_M, BLOCK_N] in a streamed loop), and each lane keeps its own running max ``m`` and
    sum ``d`` = sum exp(x - m) over the values it has seen. No reduction across lanes, hence no
    barrier inside the loop; :func:`logsumexp_lanes_combine` merges the lanes once after it.

    One exponential per element: of exp(m - m_new) and exp(x - m_new) one is 1, so
    e = exp(-|x - m|) and d_new = d e + 1 when x is the new max, d + e otherwise. A lane that
    has seen only -inf keeps m = -inf and d = 0 (-inf - -inf would be NaN). NaN in ``x``
    makes d NaN. fp32 uses exp2 with log2(e) folded into the scale (ex2.approx.ftz); fp64
    stays fp64.

    Returns:
        (m_new, d_new).
    """
    m_new = tl.maximum(m, x)
    e = tl.exp2(-tl.abs(x - m) * LOG2E)
    d_new = tl.where(x > m, d * e + 1.0, d + e)
    d_new = tl.where(m_new == float("-inf"), d, d_new)
    return m_new, d_new


@triton.jit
def finite_or_zero(m):
    """``m`` where finite-or-+inf, 0 where it is -inf: the shift of a lane or row that has seen
    only -inf (its sum is 0 then, so any shift is exact, and 0 avoids -inf - -inf)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def logsumexp_lanes_combine(m, d):
    """Merge per-lane (m, d) of :func:`online_logsumexp_lanes` over axis 1.

    Returns:
        (row max M, M or 0 for an all -inf row, the row's sum of exp(x - that shift)).
    """
    row_max = tl.max(m, axis=1)
    shift = finite_or_zero(row_max)
    row_sum = tl.sum(d * tl.exp2((m - shift[:, None]) * LOG2E), axis=1)
    return row_max, shift, row_sum


#: tanh's odd Taylor coefficients, tanh y = y (1 + c1 y^2 + c2 y^4 + ...): below
#: TANH_SERIES_BELOW, 5 of them (fp32) or 10 (fp64) leave a truncation error under one unit in
#: the last place (at most 0.6 ulp in fp32, 0.98 ulp in fp64 at |y| = 0.25, checked against
#: mpmath).
_TANH_C1 = tl.constexpr(-1.0 / 3.0)
_TANH_C2 = tl.constexpr(2.0 / 15.0)
_TANH_C3 = tl.constexpr(-17.0 / 315.0)
_TANH_C4 = tl.constexpr(62.0 / 2835.0)
_TANH_C5 = tl.constexpr(-1382.0 / 155925.0)
_TANH_C6 = tl.constexpr(21844.0 / 6081075.0)
_TANH_C7 = tl.constexpr(-929569.0 / 638512875.0)
_TANH_C8 = tl.constexpr(6404582.0 / 10854718875.0)
_TANH_C9 = tl.constexpr(-443861162.0 / 1856156927625.0)
TANH_SERIES_BELOW = tl.constexpr(0.25)


@triton.jit
def tanh(y):
    """tanh of fp32 or fp64 ``y`` (the interpreter has no libdevice), accurate to a few units
    in the last place for every y; used for logit soft-capping, c tanh(z / c).

    |y| >= 0.25: (1 - e) / (1 + e) with e = exp(-2|y|) <= 0.61, so 1 - e cancels at most
    1.3 bits, and large |y| saturates to +-1 without inf / inf. |y| < 0.25: the odd Taylor
    series in Horner form, where 1 - e would cancel without bound (a relative error of
    eps / |y|: 0.36 on the fp32 loss at a cap of 1e8).

    e = exp2(-2 log2(e) |y|), as the other kernels take exponentials: fp32 compiles to one
    ex2.approx.ftz.f32 (tl.exp's ex2.approx.f32 adds a denormal fix-up; a flushed e only
    occurs at |y| > 43, where t rounds to 1 either way); fp64 stays fp64 (libdevice exp2).
    """
    a = tl.abs(y)
    e = tl.exp2(a * (-2.0 * LOG2E))
    t = (1.0 - e) / (1.0 + e)
    y2 = y * y
    if y.dtype == tl.float64:
        p = _TANH_C9 * y2 + _TANH_C8
        p = p * y2 + _TANH_C7
        p = p * y2 + _TANH_C6
        p = p * y2 + _TANH_C5
    else:
        p = tl.full(y.shape, _TANH_C5, y.dtype)
    p = p * y2 + _TANH_C4
    p = p * y2 + _TANH_C3
    p = p * y2 + _TANH_C2
    p = p * y2 + _TANH_C1
    series = y + y * (y2 * p)
    return tl.where(a < TANH_SERIES_BELOW, series, tl.where(y < 0, -t, t))
