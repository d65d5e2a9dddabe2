"""Fused linear + cross-entropy: the loss of ``input @ linear_weight.T + linear_bias`` without
ever holding the [N, V] logits. Triton kernels, launchers, torch ops.

The math is the cross-entropy of ``triton_softmax.ops.cross_entropy`` (its docstring has the
formulas), on logits z = x W^T + b, optionally soft-capped: z' = c tanh(z / c) (Gemma 2), whose
derivative 1 - (z'/c)^2 multiplies the logits' gradient.

Forward: a grid of (row blocks) x (class splits). Each program walks its class tiles, forms each
[BLOCK_M, BLOCK_V] logits tile with ``tl.dot`` over BLOCK_K slices of the features (fp32
accumulation; fp32 inputs in full IEEE precision, not TF32), and keeps per row the online
log-sum-exp (running max m, sum d), the target logit and the smoothing / probability-target
sums (A, S). Each split writes those per-row partials; the launcher merges the splits (O(N)
per split) into loss, lse and the stats the backward needs, (m, log d, S), as cross_entropy.

Backward: a grid of (row blocks) x (class blocks). Each program recomputes its logits tile,
forms the gradient tile dL/dz in registers from the saved stats, and adds its contributions
    grad_input[rows]  += G @ W[classes],   grad_weight[classes] += G^T @ x[rows],
    grad_bias[classes] += sum_rows G
into fp32 buffers with atomic adds (no tile is skipped: the gradients are exact up to the order
of fp32 additions, which makes them not bitwise reproducible run to run).

Bytes and flops, N rows, H features, V classes (s bytes per element):
    forward:  2 N V H flops; reads W once per row block (V H s * N / BLOCK_M, mostly from L2)
    backward: 6 N V H flops (recompute, grad_input, grad_weight); fp32 atomics
              (N H + V H) * V / BLOCK_V ... * N / BLOCK_M (one add per tile)
    memory:   O(N * splits + V) beside the inputs and the fp32 gradient buffers; never N x V.

On the plain-torch CPU path the same ops run chunked over rows (``_CHUNK_ELEMENTS`` logits at a
time) through cross_entropy's plain-torch forward and backward, so they never hold N x V either.

Registered ops (input [N, H], linear_weight [V, H], linear_bias [V] or None):
    torch.ops.triton_softmax.linear_cross_entropy(input, linear_weight, linear_bias, target,
        weight, ignore_index, label_smoothing, z_loss, softcap)
        -> (loss [N], lse [N], stats [3, N]), fp32 (fp64 for fp64 inputs)
    torch.ops.triton_softmax.linear_cross_entropy_backward(...)
        -> (grad_input, grad_weight, grad_bias) ((0,)-shaped where not asked for)
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from triton_softmax.ops import cross_entropy as _ce
from triton_softmax.ops._common import (
    accumulator_dtype,
    check_floating,
    kernel_path,
    launching_on,
    online_logsumexp_update,
    tanh,
    triton_accumulator_dtype,
)

#: Logits elements per chunk on the plain-torch path (8 MiB in fp32 per temporary: at 8192 x
#: 256 x 32768 the forward+backward peaks near 0.08x the full logits, gradients included).
_CHUNK_ELEMENTS = 1 << 21


# --------------------------------------------------------------------------------------
# Kernels. x is [N, H] and W is [V, H], both with unit stride along H; row offsets int64.
# --------------------------------------------------------------------------------------


@triton.jit
def _logits_tile(
    x_ptr,
    w_ptr,
    b_ptr,
    rows,
    classes,
    x_row_stride,
    w_row_stride,
    n_rows,
    n_classes,
    n_features,
    SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """z = x[rows] W[classes]^T (+ b), soft-capped when SOFTCAP > 0: [BLOCK_M, BLOCK_V] in
    ACC_DTYPE. Also returns tanh(z / SOFTCAP) for the backward's chain rule (z itself if none)."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], ACC_DTYPE)
    ks = tl.arange(0, BLOCK_K)
    row_mask = rows < n_rows
    class_mask = classes < n_classes
    for k in range(0, n_features, BLOCK_K):
        k_mask = (k + ks) < n_features
        x = tl.load(
            x_ptr + rows[:, None] * x_row_stride + (k + ks)[None, :],
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + classes[:, None] * w_row_stride + (k + ks)[None, :],
            mask=class_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(
            x.to(DOT_DTYPE),
            tl.trans(w.to(DOT_DTYPE)),
            acc,
            input_precision=DOT_PRECISION,
            out_dtype=ACC_DTYPE,
        )
    if HAS_BIAS:
        acc += tl.load(b_ptr + classes, mask=class_mask, other=0.0).to(ACC_DTYPE)[None, :]
    if SOFTCAP > 0:
        t = tanh(acc / SOFTCAP)
        return SOFTCAP * t, t
    return acc, acc


@triton.jit
def _linear_cross_entropy_forward_kernel(
    row_max_ptr,
    sum_exp_ptr,
    shifted_target_sum_ptr,
    target_mass_ptr,
    target_logit_ptr,
    x_ptr,
    w_ptr,
    b_ptr,
    target_ptr,
    weight_ptr,
    x_row_stride,
    w_row_stride,
    target_row_stride,
    n_rows,
    n_classes,
    n_features,
    total_classes,
    # meta-parameters
    LABEL_SMOOTHING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    TARGET_IS_INDEX: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Per-row partials of split s (class tiles s, s + SPLITS, ...), stored at [s, row]:
    # m, d = sum exp(z - m_shift), A = sum r (z - m_shift), S = sum r, and z[target].
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    target_rows = target_ptr + rows[:, None] * target_row_stride
    if TARGET_IS_INDEX:
        target = tl.load(target_ptr + rows * target_row_stride, mask=row_mask, other=-1)
    cols = tl.arange(0, BLOCK_V)

    m = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    m_shift = tl.zeros([BLOCK_M], ACC_DTYPE)
    d = tl.zeros([BLOCK_M], ACC_DTYPE)
    a = tl.zeros([BLOCK_M], ACC_DTYPE)
    s = tl.zeros([BLOCK_M], ACC_DTYPE)
    z_target = tl.zeros([BLOCK_M], ACC_DTYPE)
    for start in range(split * BLOCK_V, n_classes, SPLITS * BLOCK_V):
        classes = start + cols
        mask = row_mask[:, None] & (classes[None, :] < n_classes)
        z, _ = _logits_tile(
            x_ptr, w_ptr, b_ptr, rows, classes, x_row_stride, w_row_stride,
            n_rows, n_classes, n_features,
            SOFTCAP, HAS_BIAS, DOT_DTYPE, DOT_PRECISION, ACC_DTYPE, BLOCK_M, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        z = tl.where(mask, z, float("-inf"))
        m_new, m_new_shift, d = online_logsumexp_update(m, d, z)
        if TARGET_IS_INDEX:
            picked = mask & (classes[None, :] == target[:, None])  # not a masked-off lane
            z_target += tl.sum(tl.where(picked, z, 0.0), axis=1)
        if LABEL_SMOOTHING > 0 or not TARGET_IS_INDEX:
            r = _ce._target_block(
                target_rows, weight_ptr, classes, mask, n_classes, total_classes,
                LABEL_SMOOTHING, TARGET_IS_INDEX, HAS_WEIGHT, ACC_DTYPE,
            )  # fmt: skip
            a += s * (m_shift - m_new_shift)
            a += tl.sum(tl.where(mask, r * (z - m_new_shift[:, None]), 0.0), axis=1)
            s += tl.sum(r, axis=1)
        m = m_new
        m_shift = m_new_shift
    out = split * n_rows + rows
    tl.store(row_max_ptr + out, m, mask=row_mask)
    tl.store(sum_exp_ptr + out, d, mask=row_mask)
    tl.store(shifted_target_sum_ptr + out, a, mask=row_mask)
    tl.store(target_mass_ptr + out, s, mask=row_mask)
    tl.store(target_logit_ptr + out, z_target, mask=row_mask)


@triton.jit
def _linear_cross_entropy_backward_kernel(
    grad_x_ptr,
    grad_w_ptr,
    grad_b_ptr,
    x_ptr,
    w_ptr,
    b_ptr,
    target_ptr,
    weight_ptr,
    row_max_ptr,
    log_sum_ptr,
    p_scale_ptr,
    g_ptr,
    g_hot_ptr,
    x_row_stride,
    w_row_stride,
    target_row_stride,
    n_rows,
    n_classes,
    n_features,
    total_classes,
    # meta-parameters
    LABEL_SMOOTHING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    TARGET_IS_INDEX: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GRAD_X: tl.constexpr,
    GRAD_W: tl.constexpr,
    GRAD_B: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # dL/dz = p * p_scale - g_hot [class == target] - g * r_smooth   (per-row factors from the
    # launcher: p_scale = g (S + 2 z_loss lse) + g_lse, g = upstream gradient, g_hot = g w_t
    # (1 - eps); r_smooth = eps / V w_j, or the smoothed probability target times w_j).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    classes = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < n_rows
    class_mask = classes < n_classes
    mask = row_mask[:, None] & class_mask[None, :]
    z, t = _logits_tile(
        x_ptr, w_ptr, b_ptr, rows, classes, x_row_stride, w_row_stride,
        n_rows, n_classes, n_features,
        SOFTCAP, HAS_BIAS, DOT_DTYPE, DOT_PRECISION, ACC_DTYPE, BLOCK_M, BLOCK_V, BLOCK_K,
    )  # fmt: skip
    m = tl.load(row_max_ptr + rows, mask=row_mask, other=0.0)
    log_d = tl.load(log_sum_ptr + rows, mask=row_mask, other=0.0)
    p_scale = tl.load(p_scale_ptr + rows, mask=row_mask, other=0.0)
    grad = tl.exp((z - m[:, None]) - log_d[:, None]) * p_scale[:, None]
    if TARGET_IS_INDEX:
        target = tl.load(target_ptr + rows * target_row_stride, mask=row_mask, other=-1)
        g_hot = tl.load(g_hot_ptr + rows, mask=row_mask, other=0.0)
        grad -= tl.where(classes[None, :] == target[:, None], g_hot[:, None], 0.0)
    if LABEL_SMOOTHING > 0 or not TARGET_IS_INDEX:
        g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
        r = _ce._target_block(
            target_ptr + rows[:, None] * target_row_stride, weight_ptr, classes, mask,
            n_classes, total_classes, LABEL_SMOOTHING, TARGET_IS_INDEX, HAS_WEIGHT, ACC_DTYPE,
        )  # fmt: skip
        grad -= g[:, None] * r
    if SOFTCAP > 0:
        grad *= 1.0 - t * t
    grad = tl.where(mask, grad, 0.0)

    if GRAD_B:
        tl.atomic_add(grad_b_ptr + classes, tl.sum(grad, axis=0), mask=class_mask)
    # Rounded to the input's dtype as torch's unfused backward would, then to DOT_DTYPE.
    grad_dot = grad.to(x_ptr.dtype.element_ty).to(DOT_DTYPE)
    ks = tl.arange(0, BLOCK_K)
    for k in range(0, n_features, BLOCK_K):
        k_mask = (k + ks) < n_features
        if GRAD_X:
            w = tl.load(
                w_ptr + classes[:, None] * w_row_stride + (k + ks)[None, :],
                mask=class_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            part = tl.dot(
                grad_dot, w.to(DOT_DTYPE), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE
            )
            tl.atomic_add(
                grad_x_ptr + rows[:, None] * n_features + (k + ks)[None, :],
                part,
                mask=row_mask[:, None] & k_mask[None, :],
            )
        if GRAD_W:
            x = tl.load(
                x_ptr + rows[:, None] * x_row_stride + (k + ks)[None, :],
                mask=row_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            part = tl.dot(
                tl.trans(grad_dot),
                x.to(DOT_DTYPE),
                input_precision=DOT_PRECISION,
                out_dtype=ACC_DTYPE,
            )
            tl.atomic_add(
                grad_w_ptr + classes[:, None] * n_features + (k + ks)[None, :],
                part,
                mask=class_mask[:, None] & k_mask[None, :],
            )


# --------------------------------------------------------------------------------------
# Launchers: validate, pick tiles, launch (or run the chunked plain-torch path).
# --------------------------------------------------------------------------------------


def _check_operands(input, linear_weight, linear_bias, target, weight) -> bool:
    """Validate the op's operands; return whether targets are class indices."""
    check_floating(input, "linear_cross_entropy input")
    if input.dim() != 2 or linear_weight.dim() != 2:
        raise ValueError(
            "linear_cross_entropy op expects input [N, H] and linear_weight [V, H], got "
            f"{tuple(input.shape)} and {tuple(linear_weight.shape)}"
        )
    n_rows, n_features = input.shape
    n_classes = linear_weight.shape[0]
    if linear_weight.shape[1] != n_features:
        raise ValueError(
            f"input has {n_features} features but linear_weight {tuple(linear_weight.shape)} "
            f"expects {linear_weight.shape[1]}"
        )
    for name, operand in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if operand is not None and operand.dtype != input.dtype:
            raise TypeError(
                f"linear_cross_entropy {name} must have the input's dtype {input.dtype}, "
                f"got {operand.dtype}"
            )
    if linear_bias is not None and linear_bias.shape != (n_classes,):
        raise ValueError(
            f"linear_bias must have shape ({n_classes},), got {tuple(linear_bias.shape)}"
        )
    for name, operand in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if operand is not None and operand.device != input.device:
            raise ValueError(
                f"linear_cross_entropy {name} is on {operand.device} but the input is on "
                f"{input.device}"
            )
    return _ce.check_targets(n_rows, n_classes, input.device, target, weight)


def _tiles(input: torch.Tensor, n_classes: int, tiles: tuple[int, int, int] | None):
    """(BLOCK_M, BLOCK_V, BLOCK_K, num_warps). Chosen so that both kernels compile for sm_90
    without spilling (ptxas: fp32 192 / 186 registers, bf16 and fp16 191 / 240, fp64 196 /
    194, forward / backward); not yet timed on a GPU, so a first guess for a sweep to rewrite.
    Smaller tiles under the interpreter, where each program instance costs ~5 ms."""
    if tiles is not None:
        return (*tiles, 4)
    if kernel_path(input) == "triton-interpreter":
        return 16, 64, 32, 4
    if input.dtype == torch.float64:
        return 32, 64, 32, 8
    if input.dtype == torch.float32:
        return 64, 64, 32, 8
    return 64, 128, 32, 8


def _dot_types(input: torch.Tensor):
    """(DOT_DTYPE, DOT_PRECISION): the input's dtype on a GPU (16-bit types on tensor cores,
    fp32 in full IEEE precision as torch's default matmul, not TF32). Triton's interpreter
    multiplies 16-bit operands wrongly, so there they go through fp32, which gives the same
    products (a bf16 or fp16 product is exact in fp32)."""
    dtype = input.dtype
    if dtype in (torch.float16, torch.bfloat16) and kernel_path(input) == "triton-interpreter":
        dtype = torch.float32
    dot_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(
        dtype, triton_accumulator_dtype(dtype)
    )
    return dot_dtype, ("ieee" if dtype in (torch.float32, torch.float64) else "tf32")


def _kernel_options(input, linear_bias, target, weight, label_smoothing, softcap, tiles):
    block_m, block_v, block_k, num_warps = tiles
    return dict(
        LABEL_SMOOTHING=label_smoothing,
        SOFTCAP=softcap,
        TARGET_IS_INDEX=target.dtype == torch.int64,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=linear_bias is not None,
        DOT_DTYPE=_dot_types(input)[0],
        DOT_PRECISION=_dot_types(input)[1],
        ACC_DTYPE=triton_accumulator_dtype(input.dtype),
        BLOCK_M=block_m,
        BLOCK_V=block_v,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )


def _index_target_terms(
    target, weight, n_classes, ignore_index, label_smoothing, dtype, sharded=False
):
    """Per row of class-index targets: counted (not ignored), bad (out of range: NaN loss and
    gradient, never an out-of-bounds read; when ``sharded``, another rank's class instead)
    and (1 - eps) w_t, 0 where not counted or not here."""
    counted = target != ignore_index
    outside = (target < 0) | (target >= n_classes)
    bad = counted & outside & (not sharded)
    if weight is None:
        w_target = torch.ones(target.shape, dtype=dtype, device=target.device)
    else:
        w_target = weight.to(dtype)[target.clamp(0, n_classes - 1)]
    hot = torch.where(counted & ~outside, (1.0 - label_smoothing) * w_target, 0.0)
    return counted, bad, hot


def _merge_splits(
    partials, target, weight, n_classes, ignore_index, label_smoothing, z_loss, sharded
):
    """Per-row loss, lse and stats [3, N] from the forward kernel's partials [5, splits, N]:
    the splits' online log-sum-exps merged, then cross_entropy's forward epilogue, in torch."""
    m, d, a, s, z_target = partials
    row_max = m.amax(dim=0)
    shift = torch.where(row_max == -math.inf, 0.0, row_max)
    log_d = (d * torch.exp(m - shift)).sum(dim=0).log()
    split_shift = torch.where(m == -math.inf, 0.0, m)
    loss = s.sum(dim=0) * log_d - (a + s * (split_shift - shift)).sum(dim=0)
    mass = s.sum(dim=0)
    lse = row_max + log_d
    if z_loss:
        loss = loss + z_loss * lse * lse
    if target.dtype == torch.int64:
        counted, bad, hot = _index_target_terms(
            target, weight, n_classes, ignore_index, label_smoothing, loss.dtype, sharded
        )
        loss = loss + hot * ((row_max - z_target.sum(dim=0)) + log_d)
        loss = torch.where(bad, math.nan, torch.where(counted, loss, 0.0))
        mass = torch.where(counted, mass + hot, 0.0)
    return loss, lse, torch.stack([row_max, log_d, mass])


def _row_chunks(n_rows: int, n_classes: int) -> list[slice]:
    """Row slices of the plain-torch path: about _CHUNK_ELEMENTS logits each."""
    step = max(1, _CHUNK_ELEMENTS // max(n_classes, 1))
    return [slice(start, start + step) for start in range(0, n_rows, step)]


def _chunk_logits(input, linear_weight, linear_bias, rows: slice, acc: torch.dtype):
    return torch.nn.functional.linear(input[rows], linear_weight, linear_bias).to(acc)


def linear_cross_entropy_forward(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    total_classes: int = 0,
    *,
    tiles: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy of ``input @ linear_weight.T + linear_bias`` (soft-capped when
    ``softcap > 0``), without holding the [N, V] logits.

    Args:
        input: [N, H] floating; linear_weight: [V, H] and linear_bias: [V] or None, same dtype.
        target: [N] int64 class indices, or [N, V] floating probabilities.
        weight, ignore_index, label_smoothing, z_loss: as cross_entropy's op.
        softcap: 0 for none, else c in c tanh(z / c).
        total_classes: 0, or the full problem's class count when ``linear_weight`` is one
            rank's shard of the head (as cross_entropy's op).
        tiles: override (BLOCK_M, BLOCK_V, BLOCK_K) (tests use it).
    Returns:
        loss [N], lse [N] and stats [3, N] (as cross_entropy's), fp32 (fp64 for fp64 input).
    """
    is_index = _check_operands(input, linear_weight, linear_bias, target, weight)
    n_rows, n_features = input.shape
    n_classes = linear_weight.shape[0]
    acc = accumulator_dtype(input.dtype)
    if n_rows == 0:
        return _ce.row_outputs(input)
    if is_index and target.device.type == "cpu" and not total_classes:
        _ce.check_class_indices(target, n_classes, ignore_index)

    if kernel_path(input) == "torch":
        loss, lse, stats = _ce.row_outputs(input)
        for rows in _row_chunks(n_rows, n_classes):
            logits = _chunk_logits(input, linear_weight, linear_bias, rows, acc)
            loss[rows], lse[rows], stats[:, rows] = _ce.cross_entropy_forward(
                logits, target[rows], weight, ignore_index, label_smoothing, z_loss, softcap,
                total_classes,
            )  # fmt: skip
        return loss, lse, stats

    options = _kernel_options(
        input, linear_bias, target, weight, label_smoothing, softcap,
        _tiles(input, n_classes, tiles),
    )  # fmt: skip
    row_blocks = triton.cdiv(n_rows, options["BLOCK_M"])
    class_tiles = triton.cdiv(n_classes, options["BLOCK_V"])
    splits = min(class_tiles, _splits_for(input, row_blocks))
    partials = input.new_empty(5, splits, n_rows, dtype=acc)
    x, w, b = _unit_column_stride(input), _unit_column_stride(linear_weight), linear_bias
    target_rows = target if is_index else _unit_column_stride(target)
    with launching_on(input):
        _linear_cross_entropy_forward_kernel[(row_blocks, splits)](
            row_max_ptr=partials[0],
            sum_exp_ptr=partials[1],
            shifted_target_sum_ptr=partials[2],
            target_mass_ptr=partials[3],
            target_logit_ptr=partials[4],
            x_ptr=x,
            w_ptr=w,
            b_ptr=w if b is None else b.contiguous(),  # unread without a bias
            target_ptr=target_rows,
            weight_ptr=w if weight is None else weight.contiguous(),  # unread without weight
            x_row_stride=x.stride(0),
            w_row_stride=w.stride(0),
            target_row_stride=target_rows.stride(0),
            n_rows=n_rows,
            n_classes=n_classes,
            n_features=n_features,
            total_classes=total_classes or n_classes,
            SPLITS=splits,
            **options,
        )
    return _merge_splits(
        partials, target, weight, n_classes, ignore_index, label_smoothing, z_loss,
        total_classes > 0,
    )  # fmt: skip


def _unit_column_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its rows are unit-stride (any row stride), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _splits_for(input: torch.Tensor, row_blocks: int) -> int:
    """Class splits so that row blocks x splits fill the GPU about twice (2 under the
    interpreter, so that the tests take the merge)."""
    if input.device.type != "cuda":
        return 2
    sms = torch.cuda.get_device_properties(input.device).multi_processor_count
    return max(1, triton.cdiv(2 * sms, row_blocks))


def linear_cross_entropy_backward(
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor | None,
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    stats: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    total_classes: int = 0,
    needs: tuple[bool, bool, bool] = (True, True, True),
    *,
    tiles: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the per-row losses (and of the returned lse) with respect to ``input``,
    ``linear_weight`` and ``linear_bias``, recomputing the logits tile by tile.

    Args:
        grad_loss: [N] upstream gradient of the per-row losses; grad_lse: [N] or None.
        stats: [3, N] from the forward; the rest as in the forward.
        needs: which of (input, linear_weight, linear_bias) gradients to compute; the others
            come back as empty (0,) tensors.
    Returns:
        (grad_input [N, H], grad_weight [V, H], grad_bias [V]) in the input's dtype.
    """
    is_index = _check_operands(input, linear_weight, linear_bias, target, weight)
    n_rows, n_features = input.shape
    n_classes = linear_weight.shape[0]
    acc = accumulator_dtype(input.dtype)
    if stats.shape != (3, n_rows) or stats.dtype != acc:
        raise ValueError(
            f"stats must be the forward's (3, {n_rows}) {acc} tensor, got "
            f"{tuple(stats.shape)} {stats.dtype}"
        )
    need_x, need_w, need_b = needs[0], needs[1], needs[2] and linear_bias is not None
    grad_x = input.new_zeros((n_rows, n_features) if need_x else (0,), dtype=acc)
    grad_w = input.new_zeros((n_classes, n_features) if need_w else (0,), dtype=acc)
    grad_b = input.new_zeros((n_classes,) if need_b else (0,), dtype=acc)
    if n_rows == 0 or not (need_x or need_w or need_b):
        return grad_x.to(input.dtype), grad_w.to(input.dtype), grad_b.to(input.dtype)

    if kernel_path(input) == "torch":
        for rows in _row_chunks(n_rows, n_classes):
            logits = _chunk_logits(input, linear_weight, linear_bias, rows, acc)
            grad = _ce.cross_entropy_backward(  # in place over the chunk's logits
                grad_loss[rows], None if grad_lse is None else grad_lse[rows], logits,
                target[rows], weight, stats[:, rows].contiguous(), ignore_index,
                label_smoothing, z_loss, softcap, total_classes, out=logits,
            )  # fmt: skip
            if need_x:
                grad_x[rows] = grad @ linear_weight.to(acc)
            if need_w:
                grad_w += grad.T @ input[rows].to(acc)
            if need_b:
                grad_b += grad.sum(dim=0)
        return grad_x.to(input.dtype), grad_w.to(input.dtype), grad_b.to(input.dtype)

    # Per-row factors of dL/dz (cross_entropy's backward kernel forms them in its prologue).
    row_max, log_sum, mass = stats
    g = grad_loss.to(acc)
    if is_index:
        counted, bad, hot = _index_target_terms(
            target, weight, n_classes, ignore_index, label_smoothing, acc, total_classes > 0
        )
        g = torch.where(bad, math.nan, torch.where(counted, g, 0.0))
        g_hot = g * hot
    else:
        counted, g_hot = torch.ones_like(g, dtype=torch.bool), g
    p_scale = torch.where(counted, g * (mass + 2.0 * z_loss * (row_max + log_sum)), 0.0)
    if grad_lse is not None:
        p_scale = p_scale + grad_lse.to(acc)

    options = _kernel_options(
        input, linear_bias, target, weight, label_smoothing, softcap,
        _tiles(input, n_classes, tiles),
    )  # fmt: skip
    x, w, b = _unit_column_stride(input), _unit_column_stride(linear_weight), linear_bias
    target_rows = target if is_index else _unit_column_stride(target)
    grid = (triton.cdiv(n_rows, options["BLOCK_M"]), triton.cdiv(n_classes, options["BLOCK_V"]))
    with launching_on(input):
        _linear_cross_entropy_backward_kernel[grid](
            grad_x_ptr=grad_x,
            grad_w_ptr=grad_w,
            grad_b_ptr=grad_b,
            x_ptr=x,
            w_ptr=w,
            b_ptr=w if b is None else b.contiguous(),
            target_ptr=target_rows,
            weight_ptr=w if weight is None else weight.contiguous(),
            row_max_ptr=row_max,
            log_sum_ptr=log_sum,
            p_scale_ptr=p_scale,
            g_ptr=g.contiguous(),
            g_hot_ptr=g_hot.contiguous(),
            x_row_stride=x.stride(0),
            w_row_stride=w.stride(0),
            target_row_stride=target_rows.stride(0),
            n_rows=n_rows,
            n_classes=n_classes,
            n_features=n_features,
            total_classes=total_classes or n_classes,
            GRAD_X=need_x,
            GRAD_W=need_w,
            GRAD_B=need_b,
            **options,
        )
    return grad_x.to(input.dtype), grad_w.to(input.dtype), grad_b.to(input.dtype)


# --------------------------------------------------------------------------------------
# Registered ops: schema, fake implementation, autograd.
# --------------------------------------------------------------------------------------


@torch.library.custom_op("triton_softmax::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    total_classes: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (loss, lse, stats) of the fused linear + cross-entropy; see the module docstring."""
    return linear_cross_entropy_forward(
        input, linear_weight, linear_bias, target, weight,
        ignore_index, label_smoothing, z_loss, softcap, total_classes,
    )  # fmt: skip


@linear_cross_entropy_op.register_fake
def _(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, z_loss,
      softcap, total_classes=0):  # fmt: skip
    _check_operands(input, linear_weight, linear_bias, target, weight)
    return _ce.row_outputs(input)


@torch.library.custom_op("triton_softmax::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward_op(
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor | None,
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    stats: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    total_classes: int,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight, grad_bias); (0,)-shaped where ``needs`` says no."""
    return linear_cross_entropy_backward(
        grad_loss, grad_lse, input, linear_weight, linear_bias, target, weight, stats,
        ignore_index, label_smoothing, z_loss, softcap, total_classes, tuple(needs),
    )  # fmt: skip


@linear_cross_entropy_backward_op.register_fake
def _(grad_loss, grad_lse, input, linear_weight, linear_bias, target, weight, stats,
      ignore_index, label_smoothing, z_loss, softcap, total_classes, needs):  # fmt: skip
    need_b = needs[2] and linear_bias is not None
    return (
        input.new_empty(input.shape if needs[0] else (0,)),
        input.new_empty(linear_weight.shape if needs[1] else (0,)),
        input.new_empty(linear_weight.shape[:1] if need_b else (0,)),
    )


def _setup_context(ctx, inputs, output) -> None:
    input, linear_weight, linear_bias, target, weight, *options = inputs
    ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, output[2])
    ctx.options = options
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, grad_lse, _grad_stats):
    input, linear_weight, linear_bias, target, weight, stats = ctx.saved_tensors
    if ctx.needs_input_grad[3]:
        raise NotImplementedError(
            "linear_cross_entropy has no gradient with respect to probability targets "
            "(it would need the [N, V] log-probabilities); detach the target"
        )
    if grad_loss is None:
        grad_loss = torch.zeros_like(stats[0])
    needs = list(ctx.needs_input_grad[:3])
    grad_input, grad_weight, grad_bias = linear_cross_entropy_backward_op(
        grad_loss, grad_lse, input, linear_weight, linear_bias, target, weight, stats,
        *ctx.options, needs,
    )  # fmt: skip
    return (
        grad_input if needs[0] else None,
        grad_weight if needs[1] else None,
        grad_bias if needs[2] else None,
        None, None, None, None, None, None, None,
    )  # fmt: skip


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)
