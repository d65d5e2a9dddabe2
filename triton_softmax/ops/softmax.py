"""Softmax and log-softmax over the last dimension: Triton kernels, launchers, torch ops.

Three ways through a row of N elements of s bytes, chosen per launch:

* **One block** (N <= 32 768; 8192 in fp64): the row is loaded once into registers (up to 32
  warps), reduced and written once.
* **Split** (longer rows, up to ``MAX_SLICES`` slices and no more slices than half the GPU's
  SMs): each row is cut into P = ceil(N / S) slices of S = 4096 elements (fp64: 2048), one
  program of 8 warps per slice. A program loads its slice once and keeps it in registers; it
  writes the slice's partial statistics (forward: max m and sum d of exp(x - m); backward:
  sum(y dy), or sum(dy) for log-softmax) to a small workspace, counts itself in with a release
  atomic on its row's counter, waits (acquire) until the row's P slices are in, merges the P
  partials and writes its slice from registers. Only the partials cross programs. Programs take
  their (row, slice) from a ticket (an atomic counter), not from their program id, so that a
  program only ever waits for programs that have started or will start next: the P programs of
  a row hold consecutive tickets, a started program stays resident, and while a row is
  incomplete its waiting programs (at most P - 1) leave a slot free for the next ticket when P
  is at most the number of SMs (the launcher checks), so no schedule deadlocks. The launcher
  allows only half the SMs' worth of slices, so that other work holding SMs meanwhile (an NCCL
  kernel on another stream, a second split launch, other processes) still leaves room: with
  at least 2 programs of this kernel resident per SM, P - 1 waiting programs of each of two
  concurrent launches fit beside free slots. A GPU partitioned below half its SMs (MPS limits)
  is outside this argument. Triton's
  interpreter runs programs one after another, where a wait could never end: there the same
  kernel runs as two launches (PHASE 1: partials; PHASE 2: load the slice again, wait (already
  satisfied), merge, write), which shares every line of the single launch but the reload.
* **Streamed** (rows longer than ``MAX_SLICES`` slices, or than half the number of SMs, or when a
  test forces it): one program per row in blocks of 8192 (fp64 4096), two passes. Pass 1 keeps
  the online log-sum-exp (Milakov & Gimelshein, arXiv 1805.02867) per lane, [BLOCK_N] values of
  (m, d) updated with one exp2 per element and merged once after the loop, so no block-wide
  reduction (no barrier) runs inside the loop; the backward keeps per-lane sums likewise. Pass 2
  walks the blocks in reverse, so that it starts with the blocks pass 1 loaded last, the
  likeliest still in L2 (pass 1 loads with evict_last, pass 2 with evict_first).

fp32 and 16-bit rows are computed in fp32 with exp2 and log2(e) folded into the scale
(``ex2.approx.ftz``); fp64 in fp64.

Bytes to and from DRAM per row (the floor: forward 1 read + 1 write, 2 N s; backward 2 reads +
1 write, 3 N s), and why, for an H100 (3.35 TB/s, 50 MB L2, 132 SMs, 256 KB of registers an SM):

    one block, forward    read x, write y                                           2 N s
    one block, backward   read dy (and y), write dx; softmax reads y a second time,
                          after the row sum, from L1/L2 (only dy is held across the
                          sum, which is what lets 32 768 columns fit 64 registers)  3 N s
    split, forward        read x, write y                                           2 N s
    split, backward       read y and dy, write dx                                   3 N s
    streamed, forward     read x, read x again (L2 or DRAM), write y                2-3 N s
    streamed, backward    read y, dy; again (log-softmax: dy, then y and dy); dx    3-5 N s

Split: nothing depends on L2 holding a row; what is in flight is in registers. A program
holds 4096 values, 16 a thread (the backward y and dy, 2 x 16): 16 KB in fp32. An SM runs 2
(element-wise loads of rows whose length is not a multiple of 16: 80-103 registers a thread)
to 8 (16-byte vector loads: 32-48 registers) such programs (``registers_sm90.md``), so at most
132 x 8 x 16 KB = 17 MB forward, 132 x 5 x 32 KB = 21 MB backward, sits on chip at once,
whatever N. Besides the row, per row: P partials of 8 (forward) or 4 bytes written, P^2 read
back from L2 (``.cg``; P = 64 at N = 262 144: 32 KB against a 1 MB fp32 row, from L2 not
DRAM), one 4-byte counter (zeroed by a memset per launch) and one ticket per program.

Model of the split's time: the floor, plus what the other programs on an SM do not hide of
each program's two latencies, the ticket atomic before its loads (~1 us) and the release /
acquire round trip through L2 (1-2 us). Little's law asks 3.35 TB/s x ~0.7 us / 132 SMs =
18 KB in flight per SM to keep DRAM busy; one program issues its whole slice's loads at once
(16 KB fp32 and 8 KB 16-bit forward, twice that backward), so with vector loads (5 to 8
programs an SM) the waits cost bandwidth only in the last wave (4096 rows x 64 slices =
262 144 programs, 250+ waves at N = 262 144). Model: forward and backward within 1.05x of the
floor from 32 769 to 270 336 columns on an H100 (66 slices; 135 168 in fp64) when rows are
16-aligned (the
benchmark grid), against 1.35-1.75x for the streamed kernel that served these rows before
(2 programs x 132 SMs of rows in flight, 69-277 MB, did not fit L2). Rows that are not 16-aligned
run 2 programs an SM, 16 KB in flight in 16-bit forward at best, near Little's bound: that
case may stay short of the floor. Not measured on a GPU yet: a GPU run should check these.

Streamed (rows past the split): pass 2 finds in L2 what pass 1 loaded last. With R rows in
flight the L2 keeps about 50 MB / R of each, so the second read comes from DRAM when rows are
long: these rows (over 270 336 elements on an H100, 135 168 in fp64) are read 2 to 3 times.

Launch tables (``FORWARD_TILES``, ``BACKWARD_TILES``) pick, per row length and element size,
the column block, warps and rows per program of the one-block and streamed kernels;
``SPLIT_FORWARD`` / ``SPLIT_BACKWARD`` the split kernels' slices. The tables are a first guess
from register counts (sm_90, no spills: ``benchmarks/results/registers_sm90.md``), not from
timings: no GPU has run them yet, and a GPU sweep should rewrite them.

Registered ops (each over the last dim, output in the input's dtype):
    torch.ops.triton_softmax.softmax(x)
    torch.ops.triton_softmax.log_softmax(x)
    torch.ops.triton_softmax.softmax_backward(y, grad_y, log)
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import triton
import triton.language as tl

from triton_softmax.ops._common import (
    LN2,
    LOG2E,
    UNBOUNDED,
    Tile,
    TileRule,
    TileTable,
    accumulator_dtype,
    as_rows,
    check_floating,
    finite_or_zero,
    kernel_path,
    kernels_interpreted,
    launching_on,
    logsumexp_lanes_combine,
    online_logsumexp_lanes,
    pick_tile,
    triton_accumulator_dtype,
    triton_aligned,
)

# --------------------------------------------------------------------------------------
# Launch tables: element size in bytes -> rules (max columns, BLOCK_N, num_warps, max BLOCK_M
# [, aligned launches only]); see _common.pick_tile. A first guess, not measured on a GPU:
# each program holds about 8-32 elements per thread, and every tile compiles for sm_90
# without spilling (tests/test_gpu_compile.py). 16-bit rows are held as fp32 in registers, so
# they get fp32's limits (65 536 of them spill with 32 warps). A GPU sweep should rewrite these.
# The last rule (streamed) serves only rows the split kernels do not take (see SplitRule).
# --------------------------------------------------------------------------------------

_FORWARD_32 = (
    TileRule(32, 32, 4, 64),
    TileRule(128, 128, 4, 16),
    TileRule(512, 512, 4, 4),
    TileRule(2048, 2048, 8, 1),
    TileRule(8192, 8192, 16, 1),
    TileRule(32768, 32768, 32, 1),  # the longest row held whole: 32 fp32 per thread
    TileRule(UNBOUNDED, 8192, 32, 1),  # streamed, 8 per thread per block
)
_FORWARD_64 = (
    TileRule(32, 32, 4, 32),
    TileRule(128, 128, 4, 8),
    TileRule(512, 512, 4, 2),
    TileRule(2048, 2048, 8, 1),
    TileRule(8192, 8192, 16, 1),  # fp64 log-softmax spills at 16 384 with 32 warps
    TileRule(UNBOUNDED, 4096, 16, 1),
)
#: Softmax / log-softmax forward.
FORWARD_TILES: TileTable = {2: _FORWARD_32, 4: _FORWARD_32, 8: _FORWARD_64}

_BACKWARD_32 = (
    *_FORWARD_32[:5],
    TileRule(16384, 16384, 32, 1),
    # y and dy of a 32 768-column row fit 64 registers a thread only with 16-byte vector
    # loads (one mask bit per vector): element-wise loads spill, and stream instead.
    TileRule(32768, 32768, 32, 1, aligned_only=True),
    TileRule(UNBOUNDED, 8192, 32, 1),
)
#: Softmax / log-softmax backward.
BACKWARD_TILES: TileTable = {2: _BACKWARD_32, 4: _BACKWARD_32, 8: _FORWARD_64}


class SplitRule(NamedTuple):
    """Rows longer than ``above`` elements that the launch table does not hold in one block are
    cut into slices of ``block_n`` elements, one program of ``num_warps`` warps a slice, when a
    row needs at most ``MAX_SLICES`` slices and no more than the GPU has SMs (see ``plan``)."""

    above: int
    block_n: int
    num_warps: int


#: Most slices of one row: the width of the partials vector each program merges.
MAX_SLICES = 128

#: Split forward: 4096 values a program, 16 a thread (fp64: 2048, 8 a thread).
SPLIT_FORWARD: dict[int, SplitRule] = {
    2: SplitRule(32768, 4096, 8),
    4: SplitRule(32768, 4096, 8),
    8: SplitRule(8192, 2048, 8),
}
#: Split backward: y and dy held, 2 x 16 values a thread (fp64: 2 x 8).
SPLIT_BACKWARD: dict[int, SplitRule] = {
    2: SplitRule(32768, 4096, 8),
    4: SplitRule(32768, 4096, 8),
    8: SplitRule(8192, 2048, 8),
}

Path = Literal["one block", "split", "streamed"]


class Plan(NamedTuple):
    """How a launch runs: ``path``, the tile of the one-block / streamed kernels (for
    ``split``: BLOCK_N is the slice, one row a program) and the slices per row (split only)."""

    path: Path
    tile: Tile
    slices: int


# --------------------------------------------------------------------------------------
# Kernels. Rows of an [n_rows, n_cols] matrix with unit column stride; row offsets are int64
# so tensors over 2**31 elements do not wrap.
# --------------------------------------------------------------------------------------


@triton.jit
def _softmax_forward_kernel(
    y_ptr,
    x_ptr,
    y_row_stride,
    x_row_stride,
    n_rows,
    n_cols,
    # meta-parameters
    LOG: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One block or streamed: BLOCK_M rows a program.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    x_rows = x_ptr + rows[:, None] * x_row_stride
    y_rows = y_ptr + rows[:, None] * y_row_stride
    cols = tl.arange(0, BLOCK_N)

    if SINGLE_BLOCK:
        # The whole row is in registers: read once, write once.
        mask = row_mask[:, None] & (cols[None, :] < n_cols)
        x = tl.load(x_rows + cols[None, :], mask=mask, other=float("-inf")).to(ACC_DTYPE)
        # A row of all -inf gives m = -inf and x - m = NaN, as torch does.
        shifted = x - tl.max(x, axis=1)[:, None]
        if LOG:
            # log2(e) (x - m) is what stays live across the sum: holding x - m as well as
            # ex2's argument spilled 4 B at 32 768 unaligned fp32 columns (sm_90).
            shifted2 = shifted * LOG2E
            total = tl.sum(tl.exp2(shifted2), axis=1)
            y = shifted2 * LN2 - tl.log(total)[:, None]
        else:
            exps = tl.exp2(shifted * LOG2E)
            y = exps / tl.sum(exps, axis=1)[:, None]
        tl.store(y_rows + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # Pass 1: (m, d) per lane, merged once after the loop: no cross-lane reduction in it.
        # evict_last keeps the row in L2 for pass 2, which then lets it go (evict_first).
        m = tl.full([BLOCK_M, BLOCK_N], float("-inf"), ACC_DTYPE)
        d = tl.zeros([BLOCK_M, BLOCK_N], ACC_DTYPE)
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < n_cols)
            x = tl.load(
                x_rows + c[None, :], mask=mask, other=float("-inf"), eviction_policy="evict_last"
            ).to(ACC_DTYPE)
            m, d = online_logsumexp_lanes(m, d, x)
        row_max, _, total = logsumexp_lanes_combine(m, d)
        # Pass 2, last block first: those pass 1 loaded last are the likeliest still in L2.
        # An all -inf row has row_max = -inf, total = 0 and yields NaN, as torch does.
        log_total = tl.log(total)
        n_blocks = tl.cdiv(n_cols, BLOCK_N)
        for i in range(0, n_blocks):
            c = (n_blocks - 1 - i) * BLOCK_N + cols
            mask = row_mask[:, None] & (c[None, :] < n_cols)
            x = tl.load(
                x_rows + c[None, :], mask=mask, other=float("-inf"), eviction_policy="evict_first"
            ).to(ACC_DTYPE)
            shifted = x - row_max[:, None]
            if LOG:
                y = shifted - log_total[:, None]
            else:
                y = tl.exp2(shifted * LOG2E) / total[:, None]
            tl.store(y_rows + c[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_backward_kernel(
    grad_x_ptr,
    y_ptr,
    grad_y_ptr,
    grad_x_row_stride,
    y_row_stride,
    grad_y_row_stride,
    n_rows,
    n_cols,
    # meta-parameters
    LOG: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # softmax:      dx = y * (dy - sum(y * dy))
    # log-softmax:  dx = dy - exp(y) * sum(dy)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    y_rows = y_ptr + rows[:, None] * y_row_stride
    grad_y_rows = grad_y_ptr + rows[:, None] * grad_y_row_stride
    grad_x_rows = grad_x_ptr + rows[:, None] * grad_x_row_stride
    cols = tl.arange(0, BLOCK_N)

    if SINGLE_BLOCK:
        # Only dy is held across the row sum; y is loaded after it (softmax: again, from
        # L1/L2), which keeps a 32 768-column row of fp32 within 64 registers a thread.
        mask = row_mask[:, None] & (cols[None, :] < n_cols)
        dy = tl.load(grad_y_rows + cols[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        if LOG:
            total = tl.sum(dy, axis=1)
        else:
            y = tl.load(
                y_rows + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_last"
            ).to(ACC_DTYPE)
            total = tl.sum(y * dy, axis=1)
        y = tl.load(y_rows + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
        y = y.to(ACC_DTYPE)
        if LOG:
            dx = dy - tl.exp2(y * LOG2E) * total[:, None]
        else:
            dx = y * (dy - total[:, None])
        tl.store(grad_x_rows + cols[None, :], dx.to(grad_x_ptr.dtype.element_ty), mask=mask)
    else:
        # Pass 1: per-lane sums, reduced once after the loop; evict_last so that pass 2 can
        # find the row in L2.
        lanes = tl.zeros([BLOCK_M, BLOCK_N], ACC_DTYPE)
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < n_cols)
            dy = tl.load(
                grad_y_rows + c[None, :], mask=mask, other=0.0, eviction_policy="evict_last"
            ).to(ACC_DTYPE)
            if LOG:
                lanes += dy
            else:
                y = tl.load(
                    y_rows + c[None, :], mask=mask, other=0.0, eviction_policy="evict_last"
                ).to(ACC_DTYPE)
                lanes += y * dy
        total = tl.sum(lanes, axis=1)
        # Pass 2, last block first (see the forward).
        n_blocks = tl.cdiv(n_cols, BLOCK_N)
        for i in range(0, n_blocks):
            c = (n_blocks - 1 - i) * BLOCK_N + cols
            mask = row_mask[:, None] & (c[None, :] < n_cols)
            y = tl.load(
                y_rows + c[None, :], mask=mask, other=0.0, eviction_policy="evict_first"
            ).to(ACC_DTYPE)
            dy = tl.load(
                grad_y_rows + c[None, :], mask=mask, other=0.0, eviction_policy="evict_first"
            ).to(ACC_DTYPE)
            if LOG:
                dx = dy - tl.exp2(y * LOG2E) * total[:, None]
            else:
                dx = y * (dy - total[:, None])
            tl.store(grad_x_rows + c[None, :], dx.to(grad_x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _slice_of_ticket(ticket_ptr, n_slices):
    """(row, slice) of this program: its place in start order, from an atomic ticket, not its
    program id (see the module docstring: a program then waits only for started ones)."""
    ticket = tl.atomic_add(ticket_ptr, 1, sem="relaxed").to(tl.int64)
    row = ticket // n_slices
    return row, ticket - row * n_slices


@triton.jit
def _count_in(count_ptr):
    """Publish this program's partials (stored before the call) to its row: a CTA barrier,
    so that every thread's stores precede it, then a release increment of the row's count."""
    tl.debug_barrier()
    tl.atomic_add(count_ptr, 1, sem="release")


@triton.jit
def _wait_for_row(count_ptr, n_slices):
    """Spin until the row's ``n_slices`` programs have counted in (acquire: their partials
    are visible afterwards). Already true in the interpreter's second launch."""
    arrived = tl.atomic_add(count_ptr, 0, sem="acquire")
    while arrived < n_slices:
        arrived = tl.atomic_add(count_ptr, 0, sem="acquire")


@triton.jit
def _softmax_split_forward_kernel(
    y_ptr,
    x_ptr,
    partial_ptr,
    count_ptr,
    ticket_ptr,
    y_row_stride,
    x_row_stride,
    n_cols,
    n_slices,
    # meta-parameters
    LOG: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PHASE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MAX_SLICES: tl.constexpr,
):
    # One slice of BLOCK_N columns of one row a program. PHASE 0: the whole op in one launch
    # (compiled kernels); 1 then 2: two launches (the interpreter), 1 writing the partials,
    # 2 loading the slice again to write it.
    row, part = _slice_of_ticket(ticket_ptr, n_slices)
    cols = part * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=float("-inf"))
    x = x.to(ACC_DTYPE)
    # Partials of a row: n_slices maxima, then n_slices sums.
    stats = partial_ptr + row * 2 * n_slices
    if PHASE != 2:
        m = tl.max(x, axis=0)
        d = tl.sum(tl.exp2((x - finite_or_zero(m)) * LOG2E), axis=0)
        tl.store(stats + part, m)
        tl.store(stats + n_slices + part, d)
        _count_in(count_ptr + row)
    if PHASE != 1:
        _wait_for_row(count_ptr + row, n_slices)
        # Merge the row's partials (.cg: from L2, where the other programs' stores are).
        s = tl.arange(0, MAX_SLICES)
        ms = tl.load(stats + s, mask=s < n_slices, other=float("-inf"), cache_modifier=".cg")
        ds = tl.load(stats + n_slices + s, mask=s < n_slices, other=0.0, cache_modifier=".cg")
        row_max = tl.max(ms, axis=0)
        total = tl.sum(ds * tl.exp2((ms - finite_or_zero(row_max)) * LOG2E), axis=0)
        # An all -inf row: row_max = -inf, x - row_max = NaN, as torch gives.
        shifted = x - row_max
        if LOG:
            y = shifted - tl.log(total)
        else:
            y = tl.exp2(shifted * LOG2E) / total
        tl.store(y_ptr + row * y_row_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_split_backward_kernel(
    grad_x_ptr,
    y_ptr,
    grad_y_ptr,
    partial_ptr,
    count_ptr,
    ticket_ptr,
    grad_x_row_stride,
    y_row_stride,
    grad_y_row_stride,
    n_cols,
    n_slices,
    # meta-parameters
    LOG: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PHASE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MAX_SLICES: tl.constexpr,
):
    # softmax:      dx = y * (dy - sum(y * dy))
    # log-softmax:  dx = dy - exp(y) * sum(dy)
    # One slice a program; PHASE as in the split forward.
    row, part = _slice_of_ticket(ticket_ptr, n_slices)
    cols = part * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    y_at = y_ptr + row * y_row_stride + cols
    dy = tl.load(grad_y_ptr + row * grad_y_row_stride + cols, mask=mask, other=0.0)
    dy = dy.to(ACC_DTYPE)
    if not LOG:
        y = tl.load(y_at, mask=mask, other=0.0).to(ACC_DTYPE)
    sums = partial_ptr + row * n_slices
    if PHASE != 2:
        if LOG:
            tl.store(sums + part, tl.sum(dy, axis=0))
        else:
            tl.store(sums + part, tl.sum(y * dy, axis=0))
        _count_in(count_ptr + row)
    if PHASE != 1:
        _wait_for_row(count_ptr + row, n_slices)
        s = tl.arange(0, MAX_SLICES)
        total = tl.sum(tl.load(sums + s, mask=s < n_slices, other=0.0, cache_modifier=".cg"), 0)
        if LOG:
            # Log-softmax needs y only now: read once, after the wait.
            y = tl.load(y_at, mask=mask, other=0.0).to(ACC_DTYPE)
            dx = dy - tl.exp2(y * LOG2E) * total
        else:
            dx = y * (dy - total)
        grad_x_at = grad_x_ptr + row * grad_x_row_stride + cols
        tl.store(grad_x_at, dx.to(grad_x_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------
# Launchers: validate, flatten to rows, allocate, plan, launch (or take the torch path).
# --------------------------------------------------------------------------------------


def slices_allowed(device: torch.device) -> int:
    """Most slices a row may be split into on ``device``: ``MAX_SLICES``, and on a GPU no more
    than half its SMs (a row's programs wait for one another, so all of them must fit at once,
    with room to spare for other work holding SMs meanwhile: see the module docstring)."""
    if device.type == "cuda" and not kernels_interpreted():
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(MAX_SLICES, sms // 2))
    return MAX_SLICES


def plan(
    n_cols: int,
    element_size: int,
    *,
    backward: bool,
    aligned: bool,
    interpreted: bool = False,
    max_slices: int = MAX_SLICES,
    block_n: int | None = None,
    split: bool | None = None,
) -> Plan:
    """How a softmax launch over rows of ``n_cols`` elements of ``element_size`` bytes runs.

    Args:
        n_cols: row length.
        element_size: bytes per element (2, 4 or 8).
        backward: plan the backward (``BACKWARD_TILES``, ``SPLIT_BACKWARD``).
        aligned: whether Triton specialises the launch as 16-aligned (see triton_aligned).
        interpreted: under Triton's interpreter (several rows a program; see pick_tile).
        max_slices: most slices a row may take (``slices_allowed`` of the device).
        block_n: override the column block, or the slice when split (tests use it).
        split: None chooses; True splits (block_n, or the rule's slice) and False never does.
    Returns:
        The Plan.
    Raises:
        ValueError: ``split=True`` for a row that needs more than ``max_slices`` slices.
    """
    rule = (SPLIT_BACKWARD if backward else SPLIT_FORWARD)[element_size]
    table = BACKWARD_TILES if backward else FORWARD_TILES
    tile = pick_tile(
        table, n_cols, element_size, aligned=aligned, interpreted=interpreted, block_n=block_n
    )
    if split is None:
        split = n_cols > rule.above and not tile.single_block
        split = split and triton.cdiv(n_cols, block_n or rule.block_n) <= max_slices
    if not split:
        return Plan("one block" if tile.single_block else "streamed", tile, 0)
    slice_n = max(16, block_n or rule.block_n)
    slices = triton.cdiv(max(n_cols, 1), slice_n)
    if slices > max_slices:
        raise ValueError(
            f"a row of {n_cols} elements needs {slices} slices of {slice_n}; at most "
            f"{max_slices} are allowed here"
        )
    return Plan("split", Tile(1, slice_n, rule.num_warps, slices == 1), slices)


def _launch_over_rows(
    kernels, *, backward: bool, log: bool, block_n: int | None, split: bool | None, **operands
) -> None:
    """Launch a softmax kernel over rows of the last dimension, as ``plan`` says.

    ``kernels`` is (one-block/streamed kernel, split kernel). ``operands`` are the kernels'
    tensors by name (``y=`` for ``y_ptr`` and ``y_row_stride``), the output first
    (contiguous), then inputs of its shape with any strides.
    """
    rows = {name: as_rows(t) for name, t in operands.items()}
    out = next(iter(operands.values()))
    n_rows, n_cols = out.numel() // out.shape[-1], out.shape[-1]
    interpreted = kernels_interpreted()
    how = plan(
        n_cols,
        out.element_size(),
        backward=backward,
        aligned=triton_aligned(n_cols, *rows.values()),
        interpreted=interpreted,
        max_slices=slices_allowed(out.device),
        block_n=block_n,
        split=split,
    )
    pointers = {f"{name}_ptr": r for name, r in rows.items()}
    strides = {f"{name}_row_stride": r.stride(0) for name, r in rows.items()}
    acc = accumulator_dtype(out.dtype)
    meta = dict(LOG=log, ACC_DTYPE=triton_accumulator_dtype(out.dtype))
    tile = how.tile
    with launching_on(out):
        if how.path != "split":
            kernels[0][(triton.cdiv(n_rows, tile.block_m),)](
                **pointers,
                **strides,
                n_rows=n_rows,
                n_cols=n_cols,
                **meta,
                SINGLE_BLOCK=tile.single_block,
                BLOCK_M=tile.block_m,
                BLOCK_N=tile.block_n,
                num_warps=tile.num_warps,
            )
            return
        # Counters: two tickets (one a launch), then one count a row. Partials: per row,
        # (max, sum) of each slice forward, sum of each slice backward.
        counters = torch.zeros(2 + n_rows, dtype=torch.int32, device=out.device)
        partials = torch.empty(
            (n_rows, 1 if backward else 2, how.slices), dtype=acc, device=out.device
        )
        args = dict(
            **pointers,
            partial_ptr=partials,
            count_ptr=counters[2:],
            **strides,
            n_cols=n_cols,
            n_slices=how.slices,
            **meta,
            BLOCK_N=tile.block_n,
            MAX_SLICES=MAX_SLICES,
            num_warps=tile.num_warps,
        )
        grid = (n_rows * how.slices,)
        if interpreted:  # programs run one after another there: a wait would never end
            kernels[1][grid](**args, ticket_ptr=counters[0:], PHASE=1)
            kernels[1][grid](**args, ticket_ptr=counters[1:], PHASE=2)
        else:
            kernels[1][grid](**args, ticket_ptr=counters, PHASE=0)


def softmax_forward(
    x: torch.Tensor, log: bool, *, block_n: int | None = None, split: bool | None = None
) -> torch.Tensor:
    """Softmax (or log-softmax when ``log``) of ``x`` over its last dimension.

    Args:
        x: floating tensor of shape (..., N), any strides.
        log: compute log-softmax instead of softmax.
        block_n: override the column block or slice (a power of two; tests use it).
        split: force the split kernel (True) or keep out of it (False); None: ``plan``.
    Returns:
        A contiguous tensor of ``x``'s shape and dtype.
    """
    check_floating(x, "softmax input")
    if x.dim() == 0:
        raise ValueError("softmax op needs at least one dimension; the functional API takes 0-d")
    if kernel_path(x) == "torch":
        plain = torch.log_softmax if log else torch.softmax
        return plain(x, -1, dtype=accumulator_dtype(x.dtype)).to(x.dtype).contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    _launch_over_rows(
        # The kernels are looked up at each call (benchmarks/tune.py stands in for them).
        (_softmax_forward_kernel, _softmax_split_forward_kernel),
        backward=False,
        log=log,
        block_n=block_n,
        split=split,
        y=out,
        x=x,
    )
    return out


def softmax_backward(
    y: torch.Tensor,
    grad_y: torch.Tensor,
    log: bool,
    *,
    block_n: int | None = None,
    split: bool | None = None,
) -> torch.Tensor:
    """Input gradient of softmax (or log-softmax) from its output ``y`` and ``grad_y``.

    Args:
        y: the forward's output, shape (..., N).
        grad_y: gradient with respect to ``y``, same shape.
        log: ``y`` is a log-softmax.
        block_n: override the column block or slice (tests).
        split: as in :func:`softmax_forward`.
    Returns:
        A contiguous tensor of ``y``'s shape and dtype.
    """
    check_floating(y, "softmax output")
    if grad_y.shape != y.shape:
        raise ValueError(f"grad shape {tuple(grad_y.shape)} != output shape {tuple(y.shape)}")
    if kernel_path(y) == "torch":
        acc = accumulator_dtype(y.dtype)
        y_acc, dy = y.to(acc), grad_y.to(acc)
        if log:
            grad_x = dy - y_acc.exp() * dy.sum(-1, keepdim=True)
        else:
            grad_x = y_acc * (dy - (y_acc * dy).sum(-1, keepdim=True))
        return grad_x.to(y.dtype).contiguous()
    grad_x = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if y.numel() == 0:
        return grad_x
    _launch_over_rows(
        (_softmax_backward_kernel, _softmax_split_backward_kernel),
        backward=True,
        log=log,
        block_n=block_n,
        split=split,
        grad_x=grad_x,
        y=y,
        grad_y=grad_y.to(y.dtype),
    )
    return grad_x


# --------------------------------------------------------------------------------------
# Registered ops: schema, fake implementation (shapes only), autograd.
# --------------------------------------------------------------------------------------


@torch.library.custom_op("triton_softmax::softmax", mutates_args=())
def softmax_op(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension of ``x``."""
    return softmax_forward(x, log=False)


@torch.library.custom_op("triton_softmax::log_softmax", mutates_args=())
def log_softmax_op(x: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the last dimension of ``x``."""
    return softmax_forward(x, log=True)


@torch.library.custom_op("triton_softmax::softmax_backward", mutates_args=())
def softmax_backward_op(y: torch.Tensor, grad_y: torch.Tensor, log: bool) -> torch.Tensor:
    """Input gradient of (log-)softmax over the last dimension."""
    return softmax_backward(y, grad_y, log)


def _fake_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


softmax_op.register_fake(_fake_like)
log_softmax_op.register_fake(_fake_like)
softmax_backward_op.register_fake(lambda y, grad_y, log: _fake_like(y))


def _save_output(ctx, inputs, output) -> None:
    ctx.save_for_backward(output)


def _softmax_grad(ctx, grad_y):
    (y,) = ctx.saved_tensors
    return softmax_backward_op(y, grad_y, False)


def _log_softmax_grad(ctx, grad_y):
    (y,) = ctx.saved_tensors
    return softmax_backward_op(y, grad_y, True)


softmax_op.register_autograd(_softmax_grad, setup_context=_save_output)
log_softmax_op.register_autograd(_log_softmax_grad, setup_context=_save_output)


def _save_backward_inputs(ctx, inputs, output) -> None:
    y, grad_y, log = inputs
    ctx.save_for_backward(y, grad_y)
    ctx.log = log


def _softmax_double_grad(ctx, grad_dx):
    """Gradients of the backward's output dx with respect to y and grad_y (double backward).

    softmax:      dx = y (dy - s), s = sum(y dy)
                  d/d dy = y (G - sum(y G));   d/dy = G (dy - s) - dy sum(G y)
    log-softmax:  dx = dy - exp(y) S, S = sum(dy)
                  d/d dy = G - sum(G exp(y));  d/dy = -G exp(y) S
    """
    y, dy = ctx.saved_tensors
    acc = accumulator_dtype(y.dtype)
    y_acc, dy_acc, g = y.to(acc), dy.to(acc), grad_dx.to(acc)
    if ctx.log:
        e = y_acc.exp()
        grad_dy = g - (g * e).sum(-1, keepdim=True)
        grad_y = -g * e * dy_acc.sum(-1, keepdim=True)
    else:
        grad_dy = y_acc * (g - (y_acc * g).sum(-1, keepdim=True))
        s = (y_acc * dy_acc).sum(-1, keepdim=True)
        grad_y = g * (dy_acc - s) - dy_acc * (g * y_acc).sum(-1, keepdim=True)
    return grad_y.to(y.dtype), grad_dy.to(dy.dtype), None


softmax_backward_op.register_autograd(_softmax_double_grad, setup_context=_save_backward_inputs)
