"""Cross-entropy over rows of logits: Triton kernels, launchers, torch ops.

For a row x of C logits, first soft-capped (x <- c tanh(x / c), ``softcap`` c > 0) and then
tempered (x <- x / T, ``temperature`` T), lse = log sum_j exp(x_j), p_j = exp(x_j - lse), and a
weighted target distribution r_j = w_j * q_j (w = class weights, 1 without them):

    loss  = sum_j r_j (lse - x_j)  +  z_loss * lse**2
    dloss/dx_k = p_k * (S + 2 * z_loss * lse) - r_k,        S = sum_j r_j  ("target mass")
    entropy H = lse - sum_j p_j x_j,   dH/dx_k = -p_k (x_k - sum_j p_j x_j)

(gradients with respect to the raw logits take the chain rule through 1 / T and the cap).
Class-index targets t with label smoothing eps have q_j = (1 - eps) [j == t] + eps / C, which is
torch's weighted label-smoothing formula: (1 - eps) w_t (lse - x_t) + eps/C sum_j w_j (lse - x_j).
Probability targets q (soft or one-hot labels) take q_j = (1 - eps) q_j + eps / C.
Rows whose class index equals ``ignore_index`` cost 0 and get a zero gradient (and entropy 0).

The forward's first pass streams the row in blocks with the online log-sum-exp (arXiv
1805.02867, Alg. 3), keeping per lane beside the running max m and sum d the sums
A = sum r_j (x_j - m) and S = sum r_j (and for the entropy B = sum exp(x - m) (x - m)),
rescaled when m grows, so the smoothing term never subtracts two large numbers. It writes the
per-row loss, lse, and per-row stats (m, log d, S): a backward recomputes
p = exp((x - m) - log d) from them, never storing softmax, and exactly even when |x| ~ 1e4 (an
fp32 lse would lose 1e-3 there).

The label smoothing, z-loss, softcap and 1 / temperature are compile-time constants of the
kernels: exact in fp64 (Triton would pass a runtime Python float as fp32), and a zero one (or
T = 1) costs nothing. Each distinct value compiles its own specialisation once.

Bytes moved per row of C logits of s bytes (class-index targets; R = a read of C * s, W = a
write of C * s; probability targets add a read of the row's targets in every pass that forms
r; class weights, C * s per program, come from L2):
    forward, no gradient (``cross_entropy``, ``cross_entropy_with_entropy``, no_grad): 1R.
    mean / sum with the gradient (``cross_entropy_reduced``, ``cross_entropy_reduced_``): the
        forward kernel also writes g * dloss/dx (WRITE_GRAD). A row held in one block
        (C <= 4096; 2048 in fp64) is still in registers: 1R + 1W. A longer row is streamed
        twice, pass 2 right after pass 1: 2R + 1W at worst, 1R + 1W from DRAM when pass 2's
        reads hit L2. Pass 1 loads with ``evict_last`` and pass 2 with ``evict_first`` (as the
        softmax's streamed path), but L2 holds the row only if the rows in flight fit it:
        rows in flight x row bytes = programs per SM x SMs x C s. At V = 128k bf16 a row is
        256 KB; the streamed forward (16 warps, 32-116 registers a thread on sm_90) keeps 1-4
        programs an SM, on an H100's 132 SMs 34-135 MB against its ~50 MB L2, so long rows may
        still come back from DRAM: plan for 2R + 1W. The backward (``cross_entropy_scale_``)
        reads and writes the gradient only when the upstream gradient is not the one applied
        (not for ``loss.backward()`` of that mean or sum): 0, else 1R + 1W.
    per-row upstream gradients (``reduction="none"``, a gradient through lse or entropy):
        forward 1R, then ``cross_entropy_backward`` 1R + 1W.
The launch tables ``FORWARD_TILES`` and ``BACKWARD_TILES`` pick the class block (both 4096
classes with 16 warps for 16- and 32-bit logits, 2048 with 8 warps in fp64), warps and rows
per program. They are a first guess from register counts (sm_90, no spills:
``benchmarks/results/registers_sm90.md``), not from timings, to be rewritten by a GPU sweep.

Registered ops (2-D logits [M, C]; targets int64 [M] or floating [M, C]; results fp32, fp64
for fp64 logits):
    torch.ops.triton_softmax.cross_entropy(logits, target, weight, ignore_index,
            label_smoothing, z_loss, softcap, inplace_backward, total_classes=0,
            temperature=1.0)
        -> (loss [M], lse [M], stats [3, M] = (row max, log-sum-exp - max, S))
    torch.ops.triton_softmax.cross_entropy_with_entropy(same arguments)
        -> (loss, lse, entropy [M], stats), the entropy from the same pass
    torch.ops.triton_softmax.cross_entropy_backward(grad_loss, grad_lse, logits, target,
            weight, stats, ignore_index, label_smoothing, z_loss, softcap, total_classes=0,
            temperature=1.0, grad_entropy=None, entropy=None) -> grad_logits (out of place)
    torch.ops.triton_softmax.cross_entropy_backward_(same arguments) -> None, writes the
        gradient into logits
    torch.ops.triton_softmax.cross_entropy_reduced(logits, target, weight, ignore_index,
            label_smoothing, z_loss, softcap, reduction, temperature=1.0)
        -> (loss [], gradient [M, C] of that loss, applied []: the upstream gradient the
            gradient is formed for, 1)
    torch.ops.triton_softmax.cross_entropy_reduced_(same arguments) -> (loss, applied), the
        gradient written over logits
    torch.ops.triton_softmax.cross_entropy_scale_(grad, applied, scale) -> None,
        grad *= scale / applied, applied = scale (the reduced ops' backward)
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from triton_softmax.ops._common import (
    LOG2E,
    UNBOUNDED,
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
    tanh,
    triton_accumulator_dtype,
    triton_aligned,
)

# --------------------------------------------------------------------------------------
# Launch tables: element size in bytes -> rules (max classes, BLOCK_N, num_warps, max BLOCK_M);
# see _common.pick_tile. Both kernels stream the classes, so a longer row only takes more loop
# trips. A first guess, not measured on a GPU: every tile compiles for sm_90 without spilling
# (tests/test_gpu_compile.py). The per-row state (running max and sum, target sums, target
# index and weight, ...) is kept once per row a thread holds, so short rows take few rows per
# program (2-8 elements a thread); long rows 8 elements a thread per block: 4096 classes a
# block with 16 warps in both kernels (2048 with 8 warps in fp64). A GPU sweep should rewrite
# these.
# --------------------------------------------------------------------------------------

_SHORT_32 = (
    TileRule(16, 16, 4, 32),
    TileRule(64, 64, 4, 8),
    TileRule(256, 256, 4, 2),
    TileRule(1024, 1024, 4, 1),
    TileRule(2048, 2048, 8, 1),
    TileRule(4096, 4096, 16, 1),
)
_TILES_64 = (
    TileRule(16, 16, 4, 16),
    TileRule(64, 64, 4, 4),
    TileRule(1024, 1024, 4, 1),
    TileRule(UNBOUNDED, 2048, 8, 1),
)
# The forward's per-lane state (max, sum, and the target sums) costs registers per element
# held: 8192 classes with 32 warps spilled at sm_90 (up to 164 B), so it stays at 4096 with 16
# warps, as the backward.
_FORWARD_32 = (*_SHORT_32, TileRule(UNBOUNDED, 4096, 16, 1))
_BACKWARD_32 = (*_SHORT_32, TileRule(UNBOUNDED, 4096, 16, 1))
#: Cross-entropy forward.
FORWARD_TILES: TileTable = {2: _FORWARD_32, 4: _FORWARD_32, 8: _TILES_64}
#: Cross-entropy backward.
BACKWARD_TILES: TileTable = {2: _BACKWARD_32, 4: _BACKWARD_32, 8: _TILES_64}


# --------------------------------------------------------------------------------------
# Kernels. Each program handles BLOCK_M rows of [n_rows, n_classes] logits with unit column
# stride. Row offsets are int64. A class index outside [0, C) that is not ignore_index is
# never dereferenced: its row gets a NaN loss and NaN gradient.
# --------------------------------------------------------------------------------------


@triton.jit
def _load_index_target(
    target_ptr,
    weight_ptr,
    rows,
    row_mask,
    target_stride,
    n_classes,
    ignore_index,
    HAS_WEIGHT: tl.constexpr,
    SHARDED: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """Per row: target index (clamped), whether it counts, whether it is bad, w_t (0 unless
    the target class is in this block of logits). SHARDED: the logits are one rank's shard of
    the classes, and an index outside it is another rank's class, not a bad one."""
    target = tl.load(target_ptr + rows * target_stride, mask=row_mask, other=0)
    counted = row_mask & (target != ignore_index)
    in_range = (target >= 0) & (target < n_classes)
    safe_target = tl.where(in_range, target, 0)
    here = counted & in_range
    if HAS_WEIGHT:
        w_target = tl.load(weight_ptr + safe_target, mask=here, other=0.0).to(ACC_DTYPE)
    else:
        w_target = tl.where(here, 1.0, 0.0).to(ACC_DTYPE)
    if SHARDED:
        bad = here & ~here
    else:
        bad = counted & ~in_range
    return safe_target, counted, bad, w_target


@triton.jit
def _weight_rows(weight_ptr, row_mask, logits_row_stride):
    """The class weights as a [BLOCK_M, 1] column of row pointers, each row's the weight vector
    itself (rows past n_rows, whose lanes are masked off and never read, are offset by the
    logits' row stride instead). Read as one [BLOCK_M, BLOCK_N] block with the logits' layout
    (no layout conversion in a loop), and this offset gives the weight loads the logits'
    alignment: a 16-byte-aligned weight vector beside rows that are not would have Triton
    widen the logits loads to the weights' vectors while the gradient stores stay narrow,
    a conversion through shared memory (block-wide barriers) on every block."""
    if row_mask.shape[0] == 1:
        return weight_ptr + tl.where(row_mask, 0, logits_row_stride)[:, None]
    # Several rows a program: Triton's analysis loses the weights' contiguity through a
    # per-row select (scalar weight loads in aligned launches), so the plain broadcast.
    return weight_ptr + tl.zeros_like(row_mask.to(tl.int32))[:, None]


@triton.jit
def _target_block(
    target_rows,
    weight_rows,
    c,
    mask,
    total_classes,
    LABEL_SMOOTHING: tl.constexpr,
    TARGET_IS_INDEX: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """r_j = w_j * q_j on one [BLOCK_M, BLOCK_N] block, without the (1 - eps) [j == t] part
    of class-index targets (each row adds that through its own target logit). Smoothing
    spreads eps over ``total_classes`` (n_classes, or the full problem's when sharded)."""
    smooth = LABEL_SMOOTHING / total_classes.to(ACC_DTYPE)
    if TARGET_IS_INDEX:
        r = tl.where(mask, smooth, 0.0).to(ACC_DTYPE)
    else:
        q = tl.load(target_rows + c[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        r = tl.where(mask, q * (1.0 - LABEL_SMOOTHING) + smooth, 0.0)
    if HAS_WEIGHT:
        # Loaded as the [BLOCK_M, BLOCK_N] block itself (each row re-reads the same weights,
        # from L1): a 1-D [BLOCK_N] load takes a layout of its own, and w[None, :] is then a
        # conversion through shared memory (barriers) every block, and a narrower load.
        w = tl.load(weight_rows + c[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        r = r * w
    return r


@triton.jit
def _lanes_block(
    x,
    c,
    mask,
    m,
    d,
    a,
    s,
    b,
    block,
    target_rows,
    weight_rows,
    total_classes,
    LABEL_SMOOTHING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    INV_TEMPERATURE: tl.constexpr,
    ENTROPY: tl.constexpr,
    TARGET_IS_INDEX: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """Fold one [BLOCK_M, BLOCK_N] block of raw logits ``x`` (block number ``block``) into the
    per-lane state: running max m, sum d of exp(x - m), and for the smoothing / probability
    sums a = sum r_j (x_j - m') and s = sum r_j, m' = m or 0 while the lane saw only -inf
    (a is rescaled when m grows, so it never subtracts two large numbers). Every operation
    is lane-wise: no reduction, so no barrier in the loop. Class-index targets without class
    weights take s in closed form (each lane of a counted row has seen ``block`` classes of
    r = eps / C before this one) and carry no s. The logits are soft-capped, then tempered
    (times 1 / T) as they are loaded; ENTROPY also keeps b = sum exp(x - m) (x - m)."""
    if SOFTCAP > 0:
        x = SOFTCAP * tanh(x / SOFTCAP)
    if INV_TEMPERATURE != 1.0:
        x = x * INV_TEMPERATURE
    x = tl.where(mask, x, float("-inf"))
    if ENTROPY:
        m_new, d_new, b = _online_entropy_lanes(m, d, b, x)
    else:
        m_new, d_new = online_logsumexp_lanes(m, d, x)
    if LABEL_SMOOTHING > 0 or not TARGET_IS_INDEX:
        shift_new = finite_or_zero(m_new)
        if TARGET_IS_INDEX and not HAS_WEIGHT:
            smooth = LABEL_SMOOTHING / total_classes.to(ACC_DTYPE)
            a += (block * smooth) * (finite_or_zero(m) - shift_new)
            a += tl.where(mask, smooth * (x - shift_new), 0.0)
        else:
            r = _target_block(
                target_rows, weight_rows, c, mask, total_classes,
                LABEL_SMOOTHING, TARGET_IS_INDEX, HAS_WEIGHT, ACC_DTYPE,
            )  # fmt: skip
            a += s * (finite_or_zero(m) - shift_new)
            a += tl.where(mask, r * (x - shift_new), 0.0)
            s += r
    return m_new, d_new, a, s, b


@triton.jit
def _online_entropy_lanes(m, d, b, x):
    """:func:`online_logsumexp_lanes` (the same m, d, one exponential) that also keeps per lane
    b = sum exp(x - m) (x - m) <= 0, rescaled when m grows: b' = e (b + (m - x) d) with
    e = exp(m - x). A -inf logit (p = 0) adds nothing, as p log p -> 0."""
    m_new = tl.maximum(m, x)
    e = tl.exp2(-tl.abs(x - m) * LOG2E)
    grow = x > m
    d_new = tl.where(grow, d * e + 1.0, d + e)
    d_new = tl.where(m_new == float("-inf"), d, d_new)
    b_grown = e * (b + (finite_or_zero(m) - x) * d)
    b_kept = b + tl.where(e > 0, e * (x - m), 0.0)
    b_new = tl.where(grow, b_grown, b_kept)
    return m_new, d_new, b_new


@triton.jit
def _entropy_lanes_combine(m, d, b, shift, row_sum, log_d):
    """The row's entropy H = lse - E[x] = log d - B / d from the per-lane (m, d, b) of
    :func:`_online_entropy_lanes`, B = sum exp(x - M) (x - M) over the row (M = ``shift``):
    each lane's b moved to M as its sum is, b + (m - M) d, times exp(m - M)."""
    alpha = tl.exp2((m - shift[:, None]) * LOG2E)
    b_row = tl.sum(alpha * (b + (finite_or_zero(m) - shift[:, None]) * d), axis=1)
    return log_d - b_row / row_sum


@triton.jit
def _grad_block(
    x,
    c,
    mask,
    m,
    log_d,
    p_scale,
    g,
    counted,
    safe_target,
    hot,
    h_scale,
    centre,
    target_rows,
    weight_rows,
    total_classes,
    LABEL_SMOOTHING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    INV_TEMPERATURE: tl.constexpr,
    ENTROPY_GRAD: tl.constexpr,
    TARGET_IS_INDEX: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    ZERO_UNCOUNTED: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dx_k = p_k * p_scale - g r_k (times d(c tanh(z / c))/dz with a softcap) on one block of
    raw logits ``x``; p = exp((x - m) - log d) from the row's stats. The true class's
    p_t - hot is formed in ACC_DTYPE before the caller's cast (bf16 keeps p = 0.999).
    Tempered logits u = x / T: the gradient with respect to u is divided by T. ENTROPY_GRAD
    adds h_scale * dH/du_k = -h_scale p_k (u_k - E[u]), ``centre`` = E[u] - m per row."""
    if SOFTCAP > 0:
        t = tanh(x / SOFTCAP)
        x = SOFTCAP * t
    if INV_TEMPERATURE != 1.0:
        x = x * INV_TEMPERATURE
    p = tl.exp2(((x - m[:, None]) - log_d[:, None]) * LOG2E)
    r = tl.zeros([BLOCK_M, BLOCK_N], ACC_DTYPE)
    if TARGET_IS_INDEX:
        r = tl.where(c[None, :] == safe_target[:, None], hot[:, None], 0.0)
    if LABEL_SMOOTHING > 0 or not TARGET_IS_INDEX:
        r += _target_block(
            target_rows, weight_rows, c, mask, total_classes,
            LABEL_SMOOTHING, TARGET_IS_INDEX, HAS_WEIGHT, ACC_DTYPE,
        )  # fmt: skip
    grad = p * p_scale[:, None] - g[:, None] * r
    if ENTROPY_GRAD:
        spread = p * ((x - m[:, None]) - centre[:, None])
        grad -= h_scale[:, None] * tl.where(p == 0, 0.0, spread)  # p = 0 at x = -inf
    if INV_TEMPERATURE != 1.0:
        grad *= INV_TEMPERATURE
    if SOFTCAP > 0:
        grad *= 1.0 - t * t  # d(c tanh(z / c))/dz
    if ZERO_UNCOUNTED:
        grad = tl.where(counted[:, None], grad, 0.0)  # an ignored all -inf row has p = NaN
    return grad


@triton.jit
def _cross_entropy_forward_kernel(
    loss_ptr,
    lse_ptr,
    row_max_ptr,
    log_sum_ptr,
    target_mass_ptr,
    entropy_ptr,
    grad_logits_ptr,
    grad_scale_ptr,
    logits_ptr,
    target_ptr,
    weight_ptr,
    logits_row_stride,
    target_row_stride,
    grad_logits_row_stride,
    n_rows,
    n_classes,
    ignore_index,
    total_classes,
    # meta-parameters
    LABEL_SMOOTHING: tl.constexpr,
    Z_LOSS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    INV_TEMPERATURE: tl.constexpr,
    ENTROPY: tl.constexpr,
    TARGET_IS_INDEX: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SHARDED: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Pass 1 reads each logit once into per-lane online log-sum-exp state, merged across
    # lanes once after the loop. WRITE_GRAD: pass 2 writes g * dloss/dx (g = *grad_scale_ptr,
    # the reduction's factor) into grad_logits, which may be the logits themselves; a row held
    # in one block (SINGLE_BLOCK) is still in registers, a streamed row is read again right
    # after its first pass: pass 1 loads it evict_last so that pass 2 may find it in L2, and
    # pass 2 evict_first, done with it (L2 holds it only while the rows in flight fit: see the
    # module docstring).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    logits_rows = logits_ptr + rows[:, None] * logits_row_stride
    target_rows = target_ptr + rows[:, None] * target_row_stride
    if SINGLE_BLOCK:
        # No loop to keep free of layout conversions; the weights' own alignment, which
        # widens the layout of unaligned rows, leaves the held row more registers (sm_90a,
        # bf16 [1, 4096] x 16 warps, probabilities and every option, unaligned: 110
        # registers, against 128 and 12 bytes of spills at the logits' alignment).
        weight_rows = weight_ptr + tl.zeros([BLOCK_M, 1], tl.int32)
    else:
        weight_rows = _weight_rows(weight_ptr, row_mask, logits_row_stride)
    cols = tl.arange(0, BLOCK_N)

    m = tl.full([BLOCK_M, BLOCK_N], float("-inf"), ACC_DTYPE)  # per-lane running max
    d = tl.zeros([BLOCK_M, BLOCK_N], ACC_DTYPE)  # per-lane sum exp(x - m)
    a = tl.zeros([BLOCK_M, BLOCK_N], ACC_DTYPE)  # per-lane sum r_j (x_j - m')
    s = tl.zeros([BLOCK_M, BLOCK_N], ACC_DTYPE)  # per-lane sum r_j
    b = tl.zeros([BLOCK_M, BLOCK_N], ACC_DTYPE)  # per-lane sum exp(x - m) (x - m) (ENTROPY)
    if SINGLE_BLOCK:
        held_mask = row_mask[:, None] & (cols[None, :] < n_classes)
        held = tl.load(logits_rows + cols[None, :], mask=held_mask, other=0.0).to(ACC_DTYPE)
        m, d, a, s, b = _lanes_block(
            held, cols, held_mask, m, d, a, s, b, 0, target_rows, weight_rows,
            total_classes, LABEL_SMOOTHING, SOFTCAP, INV_TEMPERATURE, ENTROPY, TARGET_IS_INDEX,
            HAS_WEIGHT, ACC_DTYPE,
        )  # fmt: skip
    else:
        for start in range(0, n_classes, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < n_classes)
            if WRITE_GRAD:
                x = tl.load(
                    logits_rows + c[None, :], mask=mask, other=0.0, eviction_policy="evict_last"
                ).to(ACC_DTYPE)
            else:
                x = tl.load(logits_rows + c[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
            m, d, a, s, b = _lanes_block(
                x, c, mask, m, d, a, s, b, start // BLOCK_N, target_rows, weight_rows,
                total_classes, LABEL_SMOOTHING, SOFTCAP, INV_TEMPERATURE, ENTROPY,
                TARGET_IS_INDEX, HAS_WEIGHT, ACC_DTYPE,
            )  # fmt: skip
    row_max, shift, row_sum = logsumexp_lanes_combine(m, d)
    if LABEL_SMOOTHING > 0 or not TARGET_IS_INDEX:
        if TARGET_IS_INDEX and not HAS_WEIGHT:
            # Lane j of a counted row saw the classes j, j + BLOCK_N, ... below n_classes.
            seen = tl.maximum(n_classes - cols + (BLOCK_N - 1), 0) // BLOCK_N
            smooth = LABEL_SMOOTHING / total_classes.to(ACC_DTYPE)
            s = tl.zeros([BLOCK_M, BLOCK_N], ACC_DTYPE) + (seen * smooth)[None, :]
        a_row = tl.sum(a + s * (finite_or_zero(m) - shift[:, None]), axis=1)
        s_row = tl.sum(s, axis=1)
    else:
        a_row = tl.zeros([BLOCK_M], ACC_DTYPE)
        s_row = tl.zeros([BLOCK_M], ACC_DTYPE)
    # lse - x = (m - x) + log d keeps |x| ~ 1e4 exact in the subtraction. An all -inf row has
    # m = -inf, d = 0, lse = -inf and a NaN loss, as in torch.
    log_d = tl.log(row_sum)
    lse = row_max + log_d
    loss = s_row * log_d - a_row  # sum_j r_j (lse - x_j) = S log d - sum_j r_j (x_j - m)

    if TARGET_IS_INDEX:
        safe_target, counted, bad, w_target = _load_index_target(
            target_ptr, weight_ptr, rows, row_mask, target_row_stride,
            n_classes, ignore_index, HAS_WEIGHT, SHARDED, ACC_DTYPE,
        )  # fmt: skip
        x_target = tl.load(
            logits_ptr + rows * logits_row_stride + safe_target,
            mask=counted & ~bad & (w_target != 0),
            other=0.0,
        ).to(ACC_DTYPE)
        if SOFTCAP > 0:
            x_target = SOFTCAP * tanh(x_target / SOFTCAP)
        if INV_TEMPERATURE != 1.0:
            x_target = x_target * INV_TEMPERATURE
        hot = (1.0 - LABEL_SMOOTHING) * w_target
        loss += hot * ((row_max - x_target) + log_d)
        s_row += hot
        if Z_LOSS != 0:
            loss += Z_LOSS * lse * lse
        loss = tl.where(counted, loss, 0.0)
        loss = tl.where(bad, float("nan"), loss)
        s_row = tl.where(counted, s_row, 0.0)
    else:
        counted = row_mask
        safe_target = rows
        hot = s_row
        if Z_LOSS != 0:
            loss += Z_LOSS * lse * lse
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(row_max_ptr + rows, row_max, mask=row_mask)
    tl.store(log_sum_ptr + rows, log_d, mask=row_mask)
    tl.store(target_mass_ptr + rows, s_row, mask=row_mask)
    if ENTROPY:
        entropy = _entropy_lanes_combine(m, d, b, shift, row_sum, log_d)
        tl.store(entropy_ptr + rows, tl.where(counted, entropy, 0.0), mask=row_mask)

    if WRITE_GRAD:
        g = tl.full([BLOCK_M], 0.0, ACC_DTYPE) + tl.load(grad_scale_ptr).to(ACC_DTYPE)
        if TARGET_IS_INDEX:
            g = tl.where(counted, g, 0.0)
            g = tl.where(bad, float("nan"), g)
        p_scale = s_row
        if Z_LOSS != 0:
            p_scale += 2.0 * Z_LOSS * (row_max + log_d)
        p_scale = tl.where(counted, g * p_scale, 0.0)
        grad_rows = grad_logits_ptr + rows[:, None] * grad_logits_row_stride
        if SINGLE_BLOCK:
            grad = _grad_block(
                held, cols, held_mask, row_max, log_d, p_scale, g, counted, safe_target, hot,
                g, g, target_rows, weight_rows, total_classes, LABEL_SMOOTHING,
                SOFTCAP, INV_TEMPERATURE, False, TARGET_IS_INDEX, HAS_WEIGHT, True, ACC_DTYPE,
                BLOCK_M, BLOCK_N,
            )  # fmt: skip
            grad = grad.to(grad_logits_ptr.dtype.element_ty)
            tl.store(grad_rows + cols[None, :], grad, mask=held_mask)
        else:
            for start in range(0, n_classes, BLOCK_N):
                c = start + cols
                mask = row_mask[:, None] & (c[None, :] < n_classes)
                x = tl.load(
                    logits_rows + c[None, :], mask=mask, other=0.0, eviction_policy="evict_first"
                ).to(ACC_DTYPE)
                grad = _grad_block(
                    x, c, mask, row_max, log_d, p_scale, g, counted, safe_target, hot, g, g,
                    target_rows, weight_rows, total_classes, LABEL_SMOOTHING, SOFTCAP,
                    INV_TEMPERATURE, False, TARGET_IS_INDEX, HAS_WEIGHT, True, ACC_DTYPE,
                    BLOCK_M, BLOCK_N,
                )  # fmt: skip
                grad = grad.to(grad_logits_ptr.dtype.element_ty)
                tl.store(grad_rows + c[None, :], grad, mask=mask)


@triton.jit
def _cross_entropy_backward_kernel(
    grad_logits_ptr,
    grad_loss_ptr,
    grad_lse_ptr,
    grad_entropy_ptr,
    entropy_ptr,
    logits_ptr,
    target_ptr,
    weight_ptr,
    row_max_ptr,
    log_sum_ptr,
    target_mass_ptr,
    grad_logits_row_stride,
    grad_loss_stride,
    grad_lse_stride,
    grad_entropy_stride,
    logits_row_stride,
    target_row_stride,
    n_rows,
    n_classes,
    ignore_index,
    total_classes,
    # meta-parameters
    LABEL_SMOOTHING: tl.constexpr,
    Z_LOSS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    INV_TEMPERATURE: tl.constexpr,
    TARGET_IS_INDEX: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SHARDED: tl.constexpr,
    HAS_GRAD_LSE: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # dx_k = p_k * (g (S + 2 z lse) + g_lse) - g r_k: one read of the logits, one write.
    # g is the upstream gradient of the row's loss, g_lse that of the returned lse (if used),
    # g_H that of the entropy: - g_H p_k (x_k - E[x]) more, E[x] - m = log d - H. With a
    # temperature, x is the tempered logit and the whole is divided by T.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    logits_rows = logits_ptr + rows[:, None] * logits_row_stride
    target_rows = target_ptr + rows[:, None] * target_row_stride
    weight_rows = _weight_rows(weight_ptr, row_mask, logits_row_stride)
    grad_rows = grad_logits_ptr + rows[:, None] * grad_logits_row_stride
    cols = tl.arange(0, BLOCK_N)

    m = tl.load(row_max_ptr + rows, mask=row_mask, other=0.0)
    log_d = tl.load(log_sum_ptr + rows, mask=row_mask, other=0.0)
    target_mass = tl.load(target_mass_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(grad_loss_ptr + rows * grad_loss_stride, mask=row_mask, other=0.0)
    g = g.to(ACC_DTYPE)
    if TARGET_IS_INDEX:
        safe_target, counted, bad, w_target = _load_index_target(
            target_ptr, weight_ptr, rows, row_mask, target_row_stride,
            n_classes, ignore_index, HAS_WEIGHT, SHARDED, ACC_DTYPE,
        )  # fmt: skip
        hot = (1.0 - LABEL_SMOOTHING) * w_target
        # Ignored rows get exactly 0 from the loss, even when g is inf (mean over an
        # all-ignored batch) or the row is all -inf; a bad class index gets NaN.
        g = tl.where(counted, g, 0.0)
        g = tl.where(bad, float("nan"), g)
    else:
        counted = row_mask
        safe_target = rows
        hot = g
    p_scale = target_mass
    if Z_LOSS != 0:
        p_scale += 2.0 * Z_LOSS * (m + log_d)
    p_scale = tl.where(counted, g * p_scale, 0.0)
    if HAS_GRAD_LSE:
        g_lse = tl.load(grad_lse_ptr + rows * grad_lse_stride, mask=row_mask, other=0.0)
        p_scale += g_lse.to(ACC_DTYPE)
    h_scale = g
    centre = g
    if HAS_GRAD_ENTROPY:
        g_h = tl.load(grad_entropy_ptr + rows * grad_entropy_stride, mask=row_mask, other=0.0)
        h_scale = tl.where(counted, g_h.to(ACC_DTYPE), 0.0)  # ignored rows: H = 0, constant
        entropy = tl.load(entropy_ptr + rows, mask=row_mask, other=0.0).to(ACC_DTYPE)
        centre = log_d - entropy

    for start in range(0, n_classes, BLOCK_N):
        c = start + cols
        mask = row_mask[:, None] & (c[None, :] < n_classes)
        x = tl.load(logits_rows + c[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        grad = _grad_block(
            x, c, mask, m, log_d, p_scale, g, counted, safe_target, hot, h_scale, centre,
            target_rows, weight_rows, total_classes, LABEL_SMOOTHING, SOFTCAP,
            INV_TEMPERATURE, HAS_GRAD_ENTROPY, TARGET_IS_INDEX, HAS_WEIGHT, not HAS_GRAD_LSE,
            ACC_DTYPE, BLOCK_M, BLOCK_N,
        )  # fmt: skip
        tl.store(grad_rows + c[None, :], grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(grad_ptr, scale_ptr, n_elements, BLOCK: tl.constexpr):
    # grad *= scale in place. Programs exit before touching the gradient when the scale is 1
    # (loss.backward() of a mean or a sum): decided on the device, no host synchronisation.
    scale = tl.load(scale_ptr)
    if scale != 1.0:
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_elements
        grad = tl.load(grad_ptr + offsets, mask=mask).to(scale.dtype) * scale
        tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------
# Launchers: validate, allocate, pick tiles, launch (or take the plain-torch path).
# --------------------------------------------------------------------------------------


def _check_operands(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None
) -> bool:
    """Validate the op's 2-D operands; return whether targets are class indices."""
    check_floating(logits, "cross_entropy input")
    if logits.dim() != 2:
        raise ValueError(f"cross_entropy op expects 2-D logits [M, C], got {tuple(logits.shape)}")
    return check_targets(*logits.shape, logits.device, target, weight)


def check_targets(
    n_rows: int,
    n_classes: int,
    device: torch.device,
    target: torch.Tensor,
    weight: torch.Tensor | None,
) -> bool:
    """Validate targets and class weights for [n_rows, n_classes] logits on ``device``;
    return whether the targets are class indices."""
    logits_shape = (n_rows, n_classes)
    if n_classes == 0 and n_rows > 0:
        raise ValueError("cross_entropy needs at least one class, got logits of shape (M, 0)")
    if target.dtype == torch.int64:
        if target.shape != (n_rows,):
            raise ValueError(
                f"class-index target must have shape ({n_rows},) for logits "
                f"{logits_shape}, got {tuple(target.shape)}"
            )
        is_index = True
    elif target.is_floating_point():
        if target.shape != logits_shape:
            raise ValueError(
                f"probability target must have the logits' shape {logits_shape}, "
                f"got {tuple(target.shape)}"
            )
        is_index = False
    else:
        raise TypeError(
            f"cross_entropy target must be int64 class indices or floating probabilities, "
            f"got {target.dtype}"
        )
    for name, operand in (("target", target), ("weight", weight)):
        if operand is not None and operand.device != device:
            raise ValueError(
                f"cross_entropy {name} is on {operand.device} but the logits are on {device}"
            )
    if weight is not None:
        check_floating(weight, "cross_entropy weight")
        if weight.shape != (n_classes,):
            raise ValueError(
                f"weight must have shape ({n_classes},) for {n_classes} classes, "
                f"got {tuple(weight.shape)}"
            )
    return is_index


def check_class_indices(target: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """IndexError naming the first class index outside [0, C) that is not ignore_index.

    Reads the targets on the host: free for CPU tensors, a device synchronisation otherwise.
    """
    bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise IndexError(
            f"target {value} is out of bounds for {n_classes} classes "
            f"(expected 0 <= target < {n_classes} or target == ignore_index={ignore_index})"
        )


def _launch(
    kernel,
    table,
    logits,
    target,
    weight,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    total_classes,
    block_n,
    **rest,
):
    """Launch a cross-entropy kernel over the rows of 2-D ``logits``; ``rest`` holds the
    kernel's own operands by name (pointers, their strides, flags). ``total_classes`` > 0:
    the logits are one rank's shard of that many classes (see triton_softmax.distributed)."""
    is_index = target.dtype == torch.int64
    rows = as_rows(logits)
    target_rows = target if is_index else as_rows(target)
    grad_rows = rest.get("grad_logits_ptr")
    others = (() if is_index else (target_rows,)) + (() if grad_rows is None else (grad_rows,))
    tile = pick_tile(
        table,
        rows.shape[1],
        rows.element_size(),
        aligned=triton_aligned(rows.shape[1], rows, *others),
        interpreted=kernels_interpreted(),
        block_n=block_n,
    )
    if kernel is _cross_entropy_forward_kernel:
        rest["SINGLE_BLOCK"] = tile.single_block
    with launching_on(logits):
        kernel[(triton.cdiv(rows.shape[0], tile.block_m),)](
            logits_ptr=rows,
            target_ptr=target_rows,
            weight_ptr=rows if weight is None else weight.contiguous(),  # unread without weight
            logits_row_stride=rows.stride(0),
            target_row_stride=target_rows.stride(0),
            n_rows=rows.shape[0],
            n_classes=rows.shape[1],
            ignore_index=ignore_index,
            total_classes=total_classes or rows.shape[1],
            SHARDED=total_classes > 0,
            LABEL_SMOOTHING=label_smoothing,
            Z_LOSS=z_loss,
            SOFTCAP=softcap,
            TARGET_IS_INDEX=is_index,
            HAS_WEIGHT=weight is not None,
            ACC_DTYPE=triton_accumulator_dtype(logits.dtype),
            BLOCK_M=tile.block_m,
            BLOCK_N=tile.block_n,
            num_warps=tile.num_warps,
            **rest,
        )


def _softcapped(logits: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch path: (c tanh(z / c), tanh(z / c)), or (z, None) without a softcap."""
    if softcap > 0:
        t = torch.tanh(logits / softcap)
        return softcap * t, t
    return logits, None


def _plain_forward(
    logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, total_classes,
    loss, lse, stats, temperature=1.0, entropy=None,
):  # fmt: skip
    """Plain-torch forward of the same math as the kernel, writing loss, lse and stats (and
    the entropy into ``entropy`` when given)."""
    acc = loss.dtype
    n_classes = logits.shape[1]
    x = _tempered(_softcapped(logits.to(acc), softcap)[0], temperature)
    m = x.amax(dim=1)
    m_shift = torch.where(m == -math.inf, 0.0, m)
    shifted = x - m_shift[:, None]
    log_d = shifted.logsumexp(dim=1)
    lse.copy_(m_shift + log_d)
    if entropy is not None:
        entropy.copy_(log_d - _expected_shift(shifted, log_d))
        if target.dtype == torch.int64:
            entropy.masked_fill_(target == ignore_index, 0.0)
    w = None if weight is None else weight.to(acc)
    smooth = label_smoothing / (total_classes or n_classes)
    if target.dtype == torch.int64:
        counted = target != ignore_index
        here, safe, hot = _target_terms(target, w, counted, n_classes, label_smoothing, acc)
        picked = log_d - shifted.gather(1, safe[:, None]).squeeze(1)
        per_row = torch.where(here, hot * picked, 0.0)  # a target on another shard: nothing
        mass = hot
        if label_smoothing > 0:
            minus_log_p = log_d[:, None] - shifted
            if w is None:
                per_row = per_row + smooth * minus_log_p.sum(1)
                mass = mass + smooth * n_classes
            else:
                per_row = per_row + smooth * (minus_log_p * w).sum(1)
                mass = mass + smooth * w.sum()
        if z_loss != 0:
            per_row = per_row + z_loss * lse * lse
        loss.copy_(torch.where(counted, per_row, 0.0))
        mass = torch.where(counted, mass, 0.0)
    else:
        r = target.to(acc) * (1.0 - label_smoothing) + smooth
        if w is not None:
            r = r * w
        # -sum_j r_j log p_j, with 0 * inf = NaN where torch has it.
        per_row = (r * (log_d[:, None] - shifted)).sum(1)
        if z_loss != 0:
            per_row = per_row + z_loss * lse * lse
        loss.copy_(per_row)
        mass = r.sum(1)
    stats[0], stats[1], stats[2] = m, log_d, mass


def _tempered(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """Plain-torch path: the tempered logits x / T."""
    return x if temperature == 1.0 else x / temperature


def _expected_shift(shifted: torch.Tensor, log_d: torch.Tensor) -> torch.Tensor:
    """Plain-torch path: E_p[x - m] per row, p = exp(shifted - log d); a -inf logit (p = 0)
    adds 0 (p log p -> 0)."""
    p = torch.exp(shifted - log_d[:, None])
    return torch.where(p == 0, 0.0, p * shifted).sum(1)


def row_outputs(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialised (loss [M], lse [M], stats [3, M]) for the M rows of ``rows``, in the
    accumulator dtype: what the cross-entropy ops (and the fused linear ones) return."""
    acc = accumulator_dtype(rows.dtype)
    n_rows = rows.shape[0]
    return (
        rows.new_empty(n_rows, dtype=acc),
        rows.new_empty(n_rows, dtype=acc),
        rows.new_empty(3, n_rows, dtype=acc),
    )


def cross_entropy_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float = 0.0,
    total_classes: int = 0,
    *,
    grad_out: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    block_n: int | None = None,
    temperature: float = 1.0,
    entropy_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy of 2-D logits, and optionally its gradient in the same pass.

    Args:
        logits: [M, C] floating.
        target: [M] int64 class indices, or [M, C] floating probabilities.
        weight: [C] class weights or None.
        ignore_index: class index whose rows cost 0 (class-index targets only).
        label_smoothing: eps in [0, 1]. On the kernel paths, each distinct value of
            ``label_smoothing`` and ``z_loss`` compiles its own kernel specialisation once
            (they are compile-time constants, exact in fp64).
        z_loss: coefficient of lse**2 added per counted row.
        softcap: 0 for none, else c: the loss is taken on c tanh(logits / c) (Gemma 2).
        total_classes: 0, or the full problem's class count when ``logits`` are one rank's
            shard of the classes (``triton_softmax.distributed``): smoothing spreads over
            it, and class indices outside the shard belong to other ranks (not bad ones).
        grad_out: None, or an [M, C] tensor (``logits`` itself for in place) with unit column
            stride and non-overlapping rows: the kernel also writes into it the gradient of
            ``grad_scale * sum(loss)`` with respect to the logits, in ``grad_out``'s dtype,
            in the same launch (a row held in one block is read once; a streamed row twice,
            the second time right after the first, from L2). Ignored rows get 0.
        grad_scale: with ``grad_out``, a one-element tensor on the logits' device, the
            upstream gradient of every row's loss (1 for a sum, 1 / denominator for a mean,
            see :func:`reduced_scale`), read on the device; None means 1.
        block_n: override the class block (a power of two; tests use it).
        temperature: T > 0; everything (loss, lse, stats, entropy) is taken on the tempered
            logits u = softcap(logits) / T. Each distinct value compiles once, as above.
        entropy_out: None, or a contiguous [M] tensor of the loss's dtype: the entropy
            H = lse - sum_j p_j u_j of softmax(u) is written into it in the same pass (one
            more per-lane running sum); 0 for ignored rows. Not with ``grad_out``.
    Returns:
        loss [M], lse [M] and stats [3, M] = (row max m, lse - m, target mass S) for the
        backward (of the tempered logits); fp32 (fp64 for fp64 logits).
    """
    is_index = _check_operands(logits, target, weight)
    n_rows, n_classes = logits.shape
    loss, lse, stats = row_outputs(logits)
    if entropy_out is not None:
        if grad_out is not None:
            raise ValueError("cross_entropy_forward writes entropy_out or grad_out, not both")
        _check_row_vector(entropy_out, "entropy_out", n_rows, loss.dtype, logits.device)
    if grad_out is not None:
        if grad_out.shape != logits.shape or grad_out.device != logits.device:
            raise ValueError(
                f"grad_out must have the logits' shape {tuple(logits.shape)} on "
                f"{logits.device}, got {tuple(grad_out.shape)} on {grad_out.device}"
            )
        _check_rows_writable(grad_out)
        if grad_scale is None:
            grad_scale = torch.ones((), dtype=loss.dtype, device=logits.device)
        elif grad_scale.numel() != 1 or grad_scale.device != logits.device:
            raise ValueError(
                f"grad_scale must be a one-element tensor on {logits.device}, got shape "
                f"{tuple(grad_scale.shape)} on {grad_scale.device}"
            )
    if n_rows == 0:
        return loss, lse, stats
    if is_index and target.device.type == "cpu":
        if not total_classes:  # sharded: the caller checks against the full problem
            check_class_indices(target, n_classes, ignore_index)
    if kernel_path(logits) == "torch":
        _plain_forward(
            logits,
            target,
            weight,
            ignore_index,
            label_smoothing,
            z_loss,
            softcap,
            total_classes,
            loss,
            lse,
            stats,
            temperature,
            entropy_out,
        )
        if grad_out is not None:
            _plain_backward(
                grad_scale.reshape(()).expand(n_rows), None, logits, target, weight, stats,
                ignore_index, label_smoothing, z_loss, softcap, total_classes, grad_out,
                temperature,
            )  # fmt: skip
        return loss, lse, stats
    row_max, log_sum, target_mass = stats
    _launch(
        _cross_entropy_forward_kernel, FORWARD_TILES,
        logits, target, weight, ignore_index, label_smoothing, z_loss, softcap,
        total_classes, block_n,
        loss_ptr=loss,
        lse_ptr=lse,
        row_max_ptr=row_max,
        log_sum_ptr=log_sum,
        target_mass_ptr=target_mass,
        entropy_ptr=loss if entropy_out is None else entropy_out,  # unused without ENTROPY
        ENTROPY=entropy_out is not None,
        INV_TEMPERATURE=_inverse(temperature),
        grad_logits_ptr=loss if grad_out is None else grad_out,  # unused without WRITE_GRAD
        grad_scale_ptr=loss if grad_scale is None else grad_scale,
        grad_logits_row_stride=0 if grad_out is None else grad_out.stride(0),
        WRITE_GRAD=grad_out is not None,
    )  # fmt: skip
    return loss, lse, stats


def _inverse(temperature: float) -> float:
    """1 / T for the kernels (a compile-time constant; exactly 1.0 when T = 1)."""
    temperature = float(temperature)
    if not 0.0 < temperature < math.inf:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return 1.0 / temperature


def _check_row_vector(vector, name, n_rows, dtype, device) -> None:
    """ValueError unless ``vector`` is a contiguous [n_rows] tensor of ``dtype`` on ``device``."""
    if (
        vector.shape != (n_rows,)
        or vector.dtype != dtype
        or vector.device != device
        or not vector.is_contiguous()
    ):
        raise ValueError(
            f"{name} must be a contiguous ({n_rows},) {dtype} tensor on {device}, got "
            f"{tuple(vector.shape)} {vector.dtype} on {vector.device}"
        )


def _check_rows_writable(logits: torch.Tensor) -> None:
    """ValueError unless every logit has its own memory cell with unit column stride."""
    n_rows, n_classes = logits.shape
    if logits.stride(1) != 1 or (n_rows > 1 and logits.stride(0) < n_classes):
        raise ValueError(
            "in-place cross_entropy backward needs logits whose rows do not overlap, with unit "
            f"column stride; got strides {tuple(logits.stride())} for shape {tuple(logits.shape)}"
        )


def rows_writable(logits: torch.Tensor) -> bool:
    """Whether the in-place backward can write the gradient over ``logits``."""
    try:
        _check_rows_writable(logits)
    except ValueError:
        return False
    return True


def _target_terms(target, w, counted, n_classes, label_smoothing, acc):
    """Plain-torch path, class indices: (here = the target class is in these logits, the
    index clamped into them, (1 - eps) w_t where here else 0)."""
    here = counted & (target >= 0) & (target < n_classes)
    safe = target.clamp(0, n_classes - 1)
    w_target = torch.ones(target.shape, dtype=acc, device=target.device) if w is None else w[safe]
    return here, safe, torch.where(here, (1.0 - label_smoothing) * w_target, 0.0)


def _plain_backward(
    grad_loss,
    grad_lse,
    logits,
    target,
    weight,
    stats,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    total_classes,
    out,
    temperature=1.0,
    grad_entropy=None,
    entropy=None,
):
    """Plain-torch backward of the same math as the kernel, written into ``out``."""
    acc = stats.dtype
    n_classes = logits.shape[1]
    m, log_d, mass = stats
    w = None if weight is None else weight.to(acc)
    smooth = label_smoothing / (total_classes or n_classes)
    is_index = target.dtype == torch.int64
    counted = target != ignore_index if is_index else torch.ones_like(m, dtype=torch.bool)
    g = torch.where(counted, grad_loss.to(acc), 0.0)
    p_scale = torch.where(counted, g * (mass + 2.0 * z_loss * (m + log_d)), 0.0)
    if grad_lse is not None:
        p_scale = p_scale + grad_lse.to(acc)
    x, t = _softcapped(logits.to(acc), softcap)
    x = _tempered(x, temperature)
    p = torch.exp((x - m[:, None]) - log_d[:, None])
    grad = p * p_scale[:, None]
    if is_index:
        _, safe, hot = _target_terms(target, w, counted, n_classes, label_smoothing, acc)
        grad.scatter_add_(1, safe[:, None], (-g * hot)[:, None])
        if label_smoothing > 0:
            grad -= g[:, None] * (smooth if w is None else smooth * w)
    else:
        r = target.to(acc) * (1.0 - label_smoothing) + smooth
        grad -= g[:, None] * (r if w is None else r * w)
    if grad_entropy is not None:  # dH/dx_k = -p_k (x_k - E[x]), E[x] - m = log d - H
        h_scale = torch.where(counted, grad_entropy.to(acc), 0.0)
        spread = p * ((x - m[:, None]) - (log_d - entropy)[:, None])
        grad -= h_scale[:, None] * torch.where(p == 0, 0.0, spread)
    if temperature != 1.0:
        grad /= temperature
    if softcap > 0:
        grad *= 1.0 - t * t
    if grad_lse is None:
        grad = torch.where(counted[:, None], grad, 0.0)
    out.copy_(grad)


def cross_entropy_backward(
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor | None,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    stats: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float = 0.0,
    total_classes: int = 0,
    *,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    temperature: float = 1.0,
    grad_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient with respect to the logits of the per-row losses (and of the returned lse
    and entropy).

    Args:
        grad_loss: [M] upstream gradient of the per-row losses (any stride, 0 included).
        grad_lse: [M] upstream gradient of the forward's lse, or None when it is unused.
        logits, target, weight, ignore_index, label_smoothing, z_loss: as in the forward.
        stats: [3, M], saved by the forward.
        out: [M, C] tensor to write into (``logits`` itself for the in-place mode);
            a new tensor when None.
        block_n: override the class block (a power of two; tests use it).
        temperature: as the forward's.
        grad_entropy: [M] upstream gradient of the entropy, or None when it is unused.
        entropy: with ``grad_entropy``, the forward's contiguous [M] entropy.
    Returns:
        ``out``, holding the gradient in the logits' dtype.
    """
    _check_operands(logits, target, weight)
    n_rows = logits.shape[0]
    acc = accumulator_dtype(logits.dtype)
    inv_temperature = _inverse(temperature)
    if grad_entropy is not None:
        if entropy is None:
            raise ValueError("cross_entropy_backward: grad_entropy needs the forward's entropy")
        _check_row_vector(entropy, "entropy", n_rows, acc, logits.device)
    for name, vector in (
        ("grad_loss", grad_loss), ("grad_lse", grad_lse), ("grad_entropy", grad_entropy)
    ):  # fmt: skip
        if vector is not None and (vector.shape != (n_rows,) or vector.device != logits.device):
            raise ValueError(
                f"{name} must have shape ({n_rows},) on {logits.device}, got "
                f"{tuple(vector.shape)} on {vector.device}"
            )
    if stats.shape != (3, n_rows) or stats.dtype != acc or not stats.is_contiguous():
        raise ValueError(
            f"stats must be the forward's contiguous (3, {n_rows}) {acc} tensor, got "
            f"{tuple(stats.shape)} {stats.dtype}"
        )
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    elif out.shape != logits.shape:
        raise ValueError(f"out must have the logits' shape {tuple(logits.shape)}")
    else:
        _check_rows_writable(out)
    if n_rows == 0:
        return out
    if kernel_path(logits) == "torch":
        _plain_backward(
            grad_loss, grad_lse, logits, target, weight, stats,
            ignore_index, label_smoothing, z_loss, softcap, total_classes, out, temperature,
            grad_entropy, entropy,
        )  # fmt: skip
        return out
    lse_pointer = grad_loss if grad_lse is None else grad_lse  # unread without grad_lse
    h_pointer = grad_loss if grad_entropy is None else grad_entropy  # unread without it
    row_max, log_sum, target_mass = stats
    _launch(
        _cross_entropy_backward_kernel, BACKWARD_TILES,
        logits, target, weight, ignore_index, label_smoothing, z_loss, softcap,
        total_classes, block_n,
        grad_logits_ptr=out,
        grad_loss_ptr=grad_loss,
        grad_lse_ptr=lse_pointer,
        row_max_ptr=row_max,
        log_sum_ptr=log_sum,
        target_mass_ptr=target_mass,
        grad_logits_row_stride=out.stride(0),
        grad_loss_stride=grad_loss.stride(0),
        grad_lse_stride=lse_pointer.stride(0),
        HAS_GRAD_LSE=grad_lse is not None,
        grad_entropy_ptr=h_pointer,
        entropy_ptr=h_pointer if entropy is None else entropy,
        grad_entropy_stride=h_pointer.stride(0),
        HAS_GRAD_ENTROPY=grad_entropy is not None,
        INV_TEMPERATURE=inv_temperature,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------
# Registered ops: schema, fake implementation, autograd.
# --------------------------------------------------------------------------------------


def _rows(
    logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, total_classes,
    temperature, entropy: bool,
):  # fmt: skip
    """``cross_entropy`` and, with ``entropy``, ``cross_entropy_with_entropy``: per-row
    (loss, lse, stats), or (loss, lse, entropy, stats) with the entropy formed in the same
    pass."""
    entropy_out = None
    if entropy:
        entropy_out = logits.new_empty(logits.shape[0], dtype=accumulator_dtype(logits.dtype))
    loss, lse, stats = cross_entropy_forward(
        logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, total_classes,
        temperature=temperature, entropy_out=entropy_out,
    )  # fmt: skip
    return (loss, lse, stats) if entropy_out is None else (loss, lse, entropy_out, stats)


def fake_rows(entropy: bool, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The per-row outputs of ``cross_entropy`` (``entropy`` False) or of
    ``cross_entropy_with_entropy`` (True) for [M, C] logits, uninitialised: the fake
    implementations of those ops and of the fused linear ones."""
    loss, lse, stats = row_outputs(logits)
    return (loss, lse, torch.empty_like(lse), stats) if entropy else (loss, lse, stats)


@torch.library.custom_op("triton_softmax::cross_entropy", mutates_args=())
def cross_entropy_op(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    inplace_backward: bool,
    total_classes: int = 0,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (loss, lse, stats) of 2-D logits; see the module docstring.

    ``inplace_backward`` makes the backward write the gradient into ``logits``' memory, which
    must then have non-overlapping rows with unit column stride.
    """
    return _rows(
        logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, total_classes,
        temperature, entropy=False,
    )  # fmt: skip


@torch.library.custom_op("triton_softmax::cross_entropy_with_entropy", mutates_args=())
def cross_entropy_with_entropy_op(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    inplace_backward: bool,
    total_classes: int = 0,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (loss, lse, entropy, stats) of 2-D logits, as ``cross_entropy`` plus the
    entropy of softmax(softcap(logits) / temperature), formed in the same pass; all three
    differentiable, the backward one kernel."""
    return _rows(
        logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, total_classes,
        temperature, entropy=True,
    )  # fmt: skip


@cross_entropy_op.register_fake
def _(logits, target, weight, *options):
    _check_operands(logits, target, weight)
    return fake_rows(False, logits)


@cross_entropy_with_entropy_op.register_fake
def _(logits, target, weight, *options):
    _check_operands(logits, target, weight)
    return fake_rows(True, logits)


@torch.library.custom_op("triton_softmax::cross_entropy_backward", mutates_args=())
def cross_entropy_backward_op(
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor | None,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    stats: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    total_classes: int = 0,
    temperature: float = 1.0,
    grad_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> torch.Tensor:
    """The logits' gradient as a new tensor."""
    return cross_entropy_backward(
        grad_loss, grad_lse, logits, target, weight, stats,
        ignore_index, label_smoothing, z_loss, softcap, total_classes,
        temperature=temperature, grad_entropy=grad_entropy, entropy=entropy,
    )  # fmt: skip


@cross_entropy_backward_op.register_fake
def _(grad_loss, grad_lse, logits, target, weight, stats, *options):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("triton_softmax::cross_entropy_backward_", mutates_args=("logits",))
def cross_entropy_backward_inplace_op(
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor | None,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    stats: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    total_classes: int = 0,
    temperature: float = 1.0,
    grad_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> None:
    """The logits' gradient written over ``logits``. Declared as mutating ``logits``, so
    autograd bumps its version counter: any other use of those logits saved for backward raises
    instead of silently reading the gradient."""
    cross_entropy_backward(
        grad_loss,
        grad_lse,
        logits,
        target,
        weight,
        stats,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        total_classes,
        out=logits,
        temperature=temperature,
        grad_entropy=grad_entropy,
        entropy=entropy,
    )


def _setup_context(ctx, inputs, output) -> None:
    logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, inplace, *rest = inputs
    total, temperature = rest
    stats = output[-1]
    entropy = output[2] if len(output) == 4 else None
    ctx.save_for_backward(logits, target, weight, stats, entropy)
    ctx.options = (ignore_index, label_smoothing, z_loss, softcap, total, temperature)
    ctx.inplace_backward = inplace
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)


def composite_gradients(
    inputs, needs, logits, target, weight, options, grad_loss, grad_lse, grad_entropy, what
):  # fmt: skip
    """Gradients by torch's own functions, as a differentiable graph: the double-backward path
    (``create_graph=True``) of the cross-entropy ops and of the fused linear ones.

    Args:
        inputs: the saved tensors to differentiate with respect to; needs: which of them.
        logits: [M, C] logits, ``inputs[0]`` itself or computed from ``inputs`` under grad mode.
        target, weight: as the forward's.
        options: (ignore_index, label_smoothing, z_loss, softcap, total_classes, temperature).
        grad_loss, grad_lse, grad_entropy: [M] upstream gradients of the per-row loss, lse and
            entropy (the last two None when unused).
        what: the op, for the error with sharded classes (double backward is not supported
            there: the other ranks' logits are not here).
    Returns:
        One per input: its gradient, zeros where needed but unused by the loss, None where
        not needed.
    """
    from triton_softmax.functional import _torch_cross_entropy

    ignore_index, label_smoothing, z_loss, softcap, total, temperature = options
    if total:
        raise NotImplementedError(
            f"double backward (create_graph=True) through {what} (process_group) is not supported"
        )
    wanted = [t for t, need in zip(inputs, needs, strict=True) if need]
    loss, lse, entropy = _torch_cross_entropy(
        logits, target, weight, ignore_index, "none", label_smoothing, z_loss, softcap, True,
        temperature, True,
    )  # fmt: skip
    outputs, upstream = [loss], [grad_loss.to(loss.dtype)]
    if grad_lse is not None:
        outputs.append(lse)
        upstream.append(grad_lse.to(lse.dtype))
    if grad_entropy is not None:
        outputs.append(entropy)
        upstream.append(grad_entropy.to(entropy.dtype))
    got = iter(torch.autograd.grad(outputs, wanted, upstream, create_graph=True, allow_unused=True))
    grads = [next(got) if need else None for need in needs]
    return [
        torch.zeros_like(t) if g is None and need else g
        for t, g, need in zip(inputs, grads, needs, strict=True)
    ]


def _backward(ctx, grad_loss, grad_lse, *grads):
    grad_entropy = grads[0] if len(grads) == 2 else None  # (entropy, stats) or (stats,)
    logits, target, weight, stats, entropy = ctx.saved_tensors
    ignore_index, label_smoothing, z_loss, softcap, _, temperature = ctx.options
    if grad_loss is None:
        grad_loss = torch.zeros_like(stats[0])
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # create_graph=True
        grads = composite_gradients(
            (logits, target), ctx.needs_input_grad[:2], logits, target, weight, ctx.options,
            grad_loss, grad_lse, grad_entropy, "cross_entropy with sharded classes",
        )  # fmt: skip
        return (*grads, *[None] * 8)

    grad_target = None
    if ctx.needs_input_grad[1]:
        # Probability targets only: d/dq_j of -sum_j w_j q'_j log p_j.
        row_max, log_sum = stats[0, :, None], stats[1, :, None]
        capped = _softcapped(logits.to(stats.dtype), softcap)[0]
        log_p = (_tempered(capped, temperature) - row_max) - log_sum
        w = 1.0 if weight is None else weight.to(stats.dtype)
        grad_target = (-(1.0 - label_smoothing) * w * log_p * grad_loss[:, None]).to(target.dtype)

    args = (grad_loss, grad_lse, logits, target, weight, stats, *ctx.options)
    if grad_entropy is not None:
        args = (*args, grad_entropy, entropy)
    if ctx.inplace_backward:
        cross_entropy_backward_inplace_op(*args)
        grad_logits = logits
    else:
        grad_logits = cross_entropy_backward_op(*args)
    return grad_logits, grad_target, None, None, None, None, None, None, None, None


cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)
cross_entropy_with_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# Two passes for a loss reduced to a scalar: the forward writes the gradient of the reduced
# loss (its own buffer, or the logits in place), the backward only rescales it by the upstream
# gradient, on the device and not at all when that is 1.
# --------------------------------------------------------------------------------------


def reduced_scale(
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    z_loss: float,
    n_classes: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The upstream gradient every row's loss gets from torch's reduction, as a 0-d tensor on
    the targets' device (no host synchronisation): 1 for "sum"; for "mean", 1 / the number of
    rows (probabilities) or 1 / the summed class weight of the counted targets (class indices;
    inf when that is 0, as torch's mean; NaN with a z-loss, whose mean is then NaN)."""
    device = target.device
    if reduction == "sum":
        return torch.ones((), dtype=dtype, device=device)
    if reduction != "mean":
        raise ValueError(
            f"reduced cross_entropy takes reduction 'mean' or 'sum', got {reduction!r}"
        )
    if target.dtype != torch.int64:  # no rows: torch's mean is NaN, and so is its gradient
        rows = target.shape[0]
        return torch.full((), 1.0 / rows if rows else math.nan, dtype=dtype, device=device)
    return 1.0 / _mean_denominator(target, weight, ignore_index, n_classes, dtype)


def _mean_denominator(target, weight, ignore_index, n_classes, dtype):
    """torch's mean denominator for class indices: the summed weight of counted targets."""
    counted = target != ignore_index
    if weight is None:
        return counted.sum().to(dtype)
    safe = target.clamp(0, max(n_classes - 1, 0))
    return (weight.to(dtype)[safe] * counted).sum()


def _reduced(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, reduction,
             grad_out, temperature=1.0):  # fmt: skip
    """The reduced loss (0-d, accumulator dtype), its gradient written into ``grad_out``."""
    acc = accumulator_dtype(logits.dtype)
    is_index = _check_operands(logits, target, weight)
    scale = reduced_scale(target, weight, ignore_index, reduction, z_loss, logits.shape[1], acc)
    if reduction == "mean" and is_index and z_loss:
        # torch's mean with a z-loss is NaN without counted weight: so is its gradient.
        denominator = _mean_denominator(target, weight, ignore_index, logits.shape[1], acc)
        scale = torch.where(denominator != 0, scale, math.nan)
    loss, _, _ = cross_entropy_forward(
        logits, target, weight, ignore_index, label_smoothing, z_loss, softcap,
        grad_out=grad_out, grad_scale=scale, temperature=temperature,
    )  # fmt: skip
    if reduction == "sum":
        return loss.sum()
    if not is_index:
        return loss.mean()
    mean = loss.sum() / _mean_denominator(target, weight, ignore_index, logits.shape[1], acc)
    if z_loss:
        mean = torch.where(scale == scale, mean, math.nan)
    return mean


@torch.library.custom_op("triton_softmax::cross_entropy_reduced", mutates_args=())
def cross_entropy_reduced_op(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    reduction: str,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad, applied): the cross-entropy of 2-D logits reduced by ``reduction``
    ("mean" or "sum", as torch), 0-d in the accumulator dtype; its gradient with respect to
    the logits (logits' dtype), both from one kernel launch; and the upstream gradient the
    buffer holds the gradient for (1, 0-d). Autograd rescales the buffer in place by the
    upstream gradient over ``applied`` (skipped on the device when that is 1) and returns it."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    loss = _reduced(
        logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, reduction, grad,
        temperature,
    )  # fmt: skip
    return loss, grad, torch.ones_like(loss)


@cross_entropy_reduced_op.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, *options):
    _check_operands(logits, target, weight)
    loss = logits.new_empty((), dtype=accumulator_dtype(logits.dtype))
    return loss, torch.empty_like(logits), torch.empty_like(loss)


@torch.library.custom_op("triton_softmax::cross_entropy_reduced_", mutates_args=("logits",))
def cross_entropy_reduced_inplace_op(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    reduction: str,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``cross_entropy_reduced``, the gradient written over ``logits``; returns
    (loss, applied)."""
    loss = _reduced(
        logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, reduction, logits,
        temperature,
    )  # fmt: skip
    return loss, torch.ones_like(loss)


@cross_entropy_reduced_inplace_op.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, *options):
    _check_operands(logits, target, weight)
    loss = logits.new_empty((), dtype=accumulator_dtype(logits.dtype))
    return loss, torch.empty_like(loss)


#: Elements per program of the in-place rescale.
_SCALE_BLOCK = 4096


@torch.library.custom_op("triton_softmax::cross_entropy_scale_", mutates_args=("grad", "applied"))
def cross_entropy_scale_op(grad: torch.Tensor, applied: torch.Tensor, scale: torch.Tensor) -> None:
    """``grad *= scale / applied`` in place, then ``applied = scale``: ``grad`` (contiguous)
    holds a gradient for the upstream gradient ``applied`` and is made to hold it for
    ``scale`` (both one element on its device). On the kernel paths decided on the device:
    nothing is read or written when the factor is 1."""
    if (
        not grad.is_contiguous()
        or scale.numel() != 1
        or applied.numel() != 1
        or scale.device != grad.device
        or applied.device != grad.device
    ):
        raise ValueError(
            "cross_entropy_scale_ takes a contiguous grad and one-element scale and applied "
            "on its device"
        )
    factor = (scale.to(applied.dtype) / applied).reshape(())
    if grad.numel() > 0:
        if kernel_path(grad) == "torch":
            grad.copy_(grad.to(factor.dtype) * factor)
        else:
            with launching_on(grad):
                _scale_kernel[(triton.cdiv(grad.numel(), _SCALE_BLOCK),)](
                    grad, factor, grad.numel(), BLOCK=_SCALE_BLOCK, num_warps=8
                )
    applied.copy_(scale.reshape(applied.shape))


@cross_entropy_scale_op.register_fake
def _(grad, applied, scale):
    return None


def _rescaled(ctx, grad_loss):
    """The logits' gradient for upstream ``grad_loss`` from the forward's buffer (saved as
    ``(grad, applied)``). Rescaled in place only by the last backward through the graph (no
    ``retain_graph``, which frees the buffer's other uses): a backward that keeps the graph
    (``retain_graph=True``, ``create_graph``, gradcheck) gets a new tensor and leaves the
    buffer as formed, so that any later upstream gradient (0 included) scales it exactly, and
    a gradient already handed out (which autograd may have made ``.grad``) never changes.
    Unpacked every time: after the last backward autograd has freed it, and a second one
    raises torch's own "backward through the graph a second time" error."""
    _refuse_create_graph()
    grad, applied = ctx.saved_tensors
    if grad_loss is None:  # the loss is unused: no gradient
        return None
    # Under torch.compile (which cannot trace the query) the functional form, out of place; so
    # too where this torch lacks the query (private: "keep the graph" is the safe answer).
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", lambda: True)
    if not torch.compiler.is_compiling() and not keep_graph():
        cross_entropy_scale_op(grad, applied, grad_loss)
        return grad
    factor = grad_loss.to(applied.dtype) / applied
    return (grad.to(factor.dtype) * factor).to(grad.dtype)


def _refuse_create_graph() -> None:
    """The reduced ops' backward only rescales a gradient formed by the forward, which has no
    graph of its own: under ``create_graph=True`` a gradient penalty would silently see none."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            "cross_entropy with reduction 'mean' or 'sum' forms its gradient in the forward "
            "and cannot be differentiated twice (create_graph=True): pass reduction='none' "
            "and reduce the per-row losses yourself (e.g. .mean()), without inplace_backward"
        )


def _reduced_setup_context(ctx, inputs, output) -> None:
    _, grad, applied = output
    ctx.save_for_backward(grad, applied)
    ctx.mark_non_differentiable(grad, applied)
    ctx.set_materialize_grads(False)


def _reduced_backward(ctx, grad_loss, _grad_grad, _grad_applied):
    return _rescaled(ctx, grad_loss), None, None, None, None, None, None, None, None


cross_entropy_reduced_op.register_autograd(_reduced_backward, setup_context=_reduced_setup_context)


class ReducedInplace(torch.autograd.Function):
    """``cross_entropy_reduced_`` under autograd: the forward overwrites the logits with the
    gradient (marked dirty, so autograd's version check catches any other saved use of them),
    the backward rescales them in place and hands them back as the logits' gradient."""

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                reduction, temperature=1.0):  # fmt: skip
        loss, applied = cross_entropy_reduced_inplace_op(
            logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, reduction,
            temperature,
        )  # fmt: skip
        ctx.mark_dirty(logits)
        ctx.mark_non_differentiable(applied)
        ctx.save_for_backward(logits, applied)
        return loss, logits, applied

    @staticmethod
    def backward(ctx, grad_loss, _grad_logits, _grad_applied):
        return _rescaled(ctx, grad_loss), None, None, None, None, None, None, None, None
