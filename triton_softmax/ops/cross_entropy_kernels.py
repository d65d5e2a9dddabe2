"""Cross-entropy over rows of logits: the Triton kernels.

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

The launchers (``cross_entropy``, ``cross_entropy_reduced``) pick each launch's tile from
``tiles.LAUNCHES["cross_entropy.*"]``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from triton_softmax.ops._jit import (
    LOG2E,
    finite_or_zero,
    logsumexp_lanes_combine,
    online_logsumexp_lanes,
    tanh,
)

#: Elements per program of the in-place rescale (``cross_entropy_scale_kernel``).
SCALE_BLOCK = 4096

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
    LABEL_SMOOTHING: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SHARDED: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """Per row: target index (clamped), whether it counts, whether it is bad, w_t (0 unless
    the target class is in these logits) and the target's own weight in r, (1 - eps) w_t.
    SHARDED: the logits are one rank's shard of the classes, and an index outside it is
    another rank's class, not a bad one."""
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
    return safe_target, counted, bad, w_target, (1.0 - LABEL_SMOOTHING) * w_target


@triton.jit
def _row_scale(g, counted, target_mass, row_max, log_d, Z_LOSS: tl.constexpr):
    """The factor of p_k in a row's gradient, g (S + 2 z lse), 0 for rows that do not count
    (g may be inf or NaN there: a mean over no counted row, a bad class index)."""
    p_scale = target_mass
    if Z_LOSS != 0:
        p_scale += 2.0 * Z_LOSS * (row_max + log_d)
    return tl.where(counted, g * p_scale, 0.0)


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
def cross_entropy_forward_kernel(
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
        safe_target, counted, bad, w_target, hot = _load_index_target(
            target_ptr, weight_ptr, rows, row_mask, target_row_stride,
            n_classes, ignore_index, LABEL_SMOOTHING, HAS_WEIGHT, SHARDED, ACC_DTYPE,
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
        p_scale = _row_scale(g, counted, s_row, row_max, log_d, Z_LOSS)
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
def cross_entropy_backward_kernel(
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
        safe_target, counted, bad, _, hot = _load_index_target(
            target_ptr, weight_ptr, rows, row_mask, target_row_stride,
            n_classes, ignore_index, LABEL_SMOOTHING, HAS_WEIGHT, SHARDED, ACC_DTYPE,
        )  # fmt: skip
        # Ignored rows get exactly 0 from the loss, even when g is inf (mean over an
        # all-ignored batch) or the row is all -inf; a bad class index gets NaN.
        g = tl.where(counted, g, 0.0)
        g = tl.where(bad, float("nan"), g)
    else:
        counted = row_mask
        safe_target = rows
        hot = g
    p_scale = _row_scale(g, counted, target_mass, m, log_d, Z_LOSS)
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
def cross_entropy_scale_kernel(grad_ptr, scale_ptr, n_elements, BLOCK: tl.constexpr):
    # grad *= scale in place. Programs exit before touching the gradient when the scale is 1
    # (loss.backward() of a mean or a sum): decided on the device, no host synchronisation.
    scale = tl.load(scale_ptr)
    if scale != 1.0:
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_elements
        grad = tl.load(grad_ptr + offsets, mask=mask).to(scale.dtype) * scale
        tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=mask)
