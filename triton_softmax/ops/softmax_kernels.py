"""Softmax and log-softmax over the last dimension: the Triton kernels.

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
"""

from __future__ import annotations

import triton
import triton.language as tl

from triton_softmax.ops._jit import (
    LN2,
    LOG2E,
    finite_or_zero,
    logsumexp_lanes_combine,
    online_logsumexp_lanes,
)

#: Most slices of one row: the width of the partials vector each split program merges.
MAX_SLICES = 128

# --------------------------------------------------------------------------------------
# Kernels. Rows of an [n_rows, n_cols] matrix with unit column stride; row offsets are int64
# so tensors over 2**31 elements do not wrap.
# --------------------------------------------------------------------------------------


@triton.jit
def softmax_forward_kernel(
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
def softmax_backward_kernel(
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
def softmax_split_forward_kernel(
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
def softmax_split_backward_kernel(
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
