"""Softmax and log-softmax over the last dimension: Triton kernels, launchers, torch ops.

Forward is the block-wise online softmax (Milakov & Gimelshein, arXiv 1805.02867, Alg. 3):
one pass keeps a running max ``m`` and a running sum ``d`` rescaled by ``exp(m_old - m_new)``
whenever the max grows, a second pass writes ``exp(x - m) / d`` (or ``x - m - log d``).
A row that fits one block is read once instead.

Launch tables (``FORWARD_TILES``, ``BACKWARD_TILES``) pick, per row length and element size,
the column block, warps and rows per program. Rows of up to 32 768 elements (fp32, fp16, bf16;
8192 for fp64) are held in registers whole, with up to 32 warps; longer rows are streamed.
The tables are a first guess from register counts (sm_90, no spills:
``benchmarks/results/registers_sm90.md``), not from timings: no GPU has run them yet, and a
GPU sweep should rewrite them.

Bytes moved to and from DRAM per row of N elements of s bytes (the floor is 2 N s forward,
3 N s backward):
    forward, one block:   read N s, write N s                               = 2 N s
    forward, streamed:    read N s twice, write N s                         = 3 N s
                          (2 N s when the second read hits L2: the first pass loads with
                          evict_last, the second with evict_first)
    backward, one block:  read y and dy, write dx                           = 3 N s
                          (softmax reads y again after the row sum, from L1/L2: holding only
                          dy across the reduction is what lets 32 768 columns fit)
    backward, streamed:   read y and dy twice (log-softmax: dy, then y and dy), write dx
                          = 5 N s (4 N s), or 3 N s when the second pass hits L2 (same hints)

Registered ops (each over the last dim, output in the input's dtype):
    torch.ops.triton_softmax.softmax(x)
    torch.ops.triton_softmax.log_softmax(x)
    torch.ops.triton_softmax.softmax_backward(y, grad_y, log)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_softmax.ops._common import (
    UNBOUNDED,
    TileRule,
    TileTable,
    accumulator_dtype,
    as_rows,
    check_floating,
    kernel_path,
    kernels_interpreted,
    launching_on,
    online_logsumexp_update,
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


# --------------------------------------------------------------------------------------
# Kernels. Each program handles BLOCK_M rows of an [n_rows, n_cols] matrix with unit column
# stride; row offsets are int64 so tensors over 2**31 elements do not wrap.
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
        exps = tl.exp(shifted)
        total = tl.sum(exps, axis=1)
        if LOG:
            y = shifted - tl.log(total)[:, None]
        else:
            y = exps / total[:, None]
        tl.store(y_rows + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # Pass 1: running max m and running sum d of exp(x - m).
        m = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
        d = tl.zeros([BLOCK_M], ACC_DTYPE)
        # evict_last keeps the row in L2 for pass 2, which then lets it go (evict_first).
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < n_cols)
            x = tl.load(
                x_rows + c[None, :], mask=mask, other=float("-inf"), eviction_policy="evict_last"
            ).to(ACC_DTYPE)
            m, _, d = online_logsumexp_update(m, d, x)
        # Pass 2: write. An all -inf row has m = -inf, d = 0 and yields NaN, as torch does.
        log_total = tl.log(d)
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < n_cols)
            x = tl.load(
                x_rows + c[None, :], mask=mask, other=float("-inf"), eviction_policy="evict_first"
            ).to(ACC_DTYPE)
            shifted = x - m[:, None]
            if LOG:
                y = shifted - log_total[:, None]
            else:
                y = tl.exp(shifted - log_total[:, None])
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
            dx = dy - tl.exp(y) * total[:, None]
        else:
            dx = y * (dy - total[:, None])
        tl.store(grad_x_rows + cols[None, :], dx.to(grad_x_ptr.dtype.element_ty), mask=mask)
    else:
        # Pass 1: the row sum, loading with evict_last so that pass 2 can find the row in L2.
        total = tl.zeros([BLOCK_M], ACC_DTYPE)
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < n_cols)
            dy = tl.load(
                grad_y_rows + c[None, :], mask=mask, other=0.0, eviction_policy="evict_last"
            ).to(ACC_DTYPE)
            if LOG:
                total += tl.sum(dy, axis=1)
            else:
                y = tl.load(
                    y_rows + c[None, :], mask=mask, other=0.0, eviction_policy="evict_last"
                ).to(ACC_DTYPE)
                total += tl.sum(y * dy, axis=1)
        # Pass 2: write dx.
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < n_cols)
            y = tl.load(
                y_rows + c[None, :], mask=mask, other=0.0, eviction_policy="evict_first"
            ).to(ACC_DTYPE)
            dy = tl.load(
                grad_y_rows + c[None, :], mask=mask, other=0.0, eviction_policy="evict_first"
            ).to(ACC_DTYPE)
            if LOG:
                dx = dy - tl.exp(y) * total[:, None]
            else:
                dx = y * (dy - total[:, None])
            tl.store(grad_x_rows + c[None, :], dx.to(grad_x_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------
# Launchers: validate, flatten to rows, allocate, pick tiles, launch (or take the torch path).
# --------------------------------------------------------------------------------------


def _launch_over_rows(kernel, table, *, log: bool, block_n: int | None, **operands) -> None:
    """Launch a softmax kernel over rows of the last dimension, with a tile from ``table``.

    ``operands`` are the kernel's tensors by name (``y=`` for ``y_ptr`` and ``y_row_stride``),
    the output first (contiguous), then inputs of its shape with any strides.
    """
    rows = {name: as_rows(t) for name, t in operands.items()}
    out = next(iter(operands.values()))
    n_rows, n_cols = out.numel() // out.shape[-1], out.shape[-1]
    tile = pick_tile(
        table,
        n_cols,
        out.element_size(),
        aligned=triton_aligned(n_cols, *rows.values()),
        interpreted=kernels_interpreted(),
        block_n=block_n,
    )
    with launching_on(out):
        kernel[(triton.cdiv(n_rows, tile.block_m),)](
            **{f"{name}_ptr": r for name, r in rows.items()},
            **{f"{name}_row_stride": r.stride(0) for name, r in rows.items()},
            n_rows=n_rows,
            n_cols=n_cols,
            LOG=log,
            ACC_DTYPE=triton_accumulator_dtype(out.dtype),
            SINGLE_BLOCK=tile.single_block,
            BLOCK_M=tile.block_m,
            BLOCK_N=tile.block_n,
            num_warps=tile.num_warps,
        )


def softmax_forward(x: torch.Tensor, log: bool, *, block_n: int | None = None) -> torch.Tensor:
    """Softmax (or log-softmax when ``log``) of ``x`` over its last dimension.

    Args:
        x: floating tensor of shape (..., N), any strides.
        log: compute log-softmax instead of softmax.
        block_n: override the column block (a power of two; tests use it).
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
    _launch_over_rows(_softmax_forward_kernel, FORWARD_TILES, log=log, block_n=block_n, y=out, x=x)
    return out


def softmax_backward(
    y: torch.Tensor, grad_y: torch.Tensor, log: bool, *, block_n: int | None = None
) -> torch.Tensor:
    """Input gradient of softmax (or log-softmax) from its output ``y`` and ``grad_y``.

    Returns a contiguous tensor of ``y``'s shape and dtype.
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
        _softmax_backward_kernel,
        BACKWARD_TILES,
        log=log,
        block_n=block_n,
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
