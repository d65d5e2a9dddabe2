"""Softmax and log-softmax over the last dimension: launchers and torch ops.

The kernels, their three paths through a row (one block, split across programs, streamed) and
the bytes each moves are in ``softmax_kernels``; :func:`plan` picks the path and the tile for a
launch from the launch tables (``tiles.LAUNCHES["softmax.*"]``).

Registered ops (each over the last dim, output in the input's dtype):
    torch.ops.triton_softmax.softmax(x)
    torch.ops.triton_softmax.log_softmax(x)
    torch.ops.triton_softmax.softmax_backward(y, grad_y, log)
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import triton

from triton_softmax.ops import _torch_math, tiles
from triton_softmax.ops import softmax_kernels as _kernels
from triton_softmax.ops._checks import check_floating
from triton_softmax.ops._device import (
    accumulator_dtype,
    as_rows,
    kernel_path,
    kernels_interpreted,
    launching_on,
    triton_accumulator_dtype,
)
from triton_softmax.ops.softmax_kernels import MAX_SLICES
from triton_softmax.ops.tiles import Tile, pick_tile, triton_aligned

Path = Literal["one block", "split", "streamed"]


class Plan(NamedTuple):
    """How a launch runs: ``path``, the tile of the one-block / streamed kernels (for
    ``split``: BLOCK_N is the slice, one row a program) and the slices per row (split only)."""

    path: Path
    tile: Tile
    slices: int


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
        backward: plan the backward (the "softmax.backward" and "softmax.split_backward"
            launch tables; else the forward's).
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
    kind = "backward" if backward else "forward"
    rule = tiles.table(f"softmax.split_{kind}")[element_size]
    table = tiles.table(f"softmax.{kind}")
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
        return _torch_math.softmax_forward(x, log)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    _launch_over_rows(
        # The kernels are looked up at each call (benchmarks/tune.py stands in for them).
        (_kernels.softmax_forward_kernel, _kernels.softmax_split_forward_kernel),
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
        return _torch_math.softmax_backward(y, grad_y, log)
    grad_x = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if y.numel() == 0:
        return grad_x
    _launch_over_rows(
        (_kernels.softmax_backward_kernel, _kernels.softmax_split_backward_kernel),
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
