"""Cross-entropy reduced to a scalar (a mean or a sum) in two passes over the logits: the
forward writes the reduced loss's gradient (its own buffer, or the logits in place) in the same
kernel launch as the loss, and the backward only rescales it by the upstream gradient, on the
device and not at all when that is 1 (``loss.backward()``). The kernel's bytes are in
``cross_entropy_kernels`` (mean / sum with the gradient).

Registered ops (2-D logits [M, C]; ``*options`` the six of ``CEOptions.flat()``, with
total_classes 0: the vocab-parallel path reduces its per-row losses itself):
    torch.ops.triton_softmax.cross_entropy_reduced(logits, target, weight, *options, reduction)
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

from triton_softmax.ops import cross_entropy as _ce
from triton_softmax.ops import cross_entropy_kernels as _kernels
from triton_softmax.ops._checks import check_cross_entropy_operands
from triton_softmax.ops._device import accumulator_dtype, kernel_path, launching_on
from triton_softmax.ops._torch_math import mean_denominator
from triton_softmax.ops.options import CEOptions


def _reduced(logits, target, weight, options: CEOptions, reduction: str, grad_out):
    """The reduced loss (0-d, accumulator dtype), its gradient written into ``grad_out``.

    Every row's upstream gradient is torch's reduction's, a 0-d tensor on the device (no host
    synchronisation): 1 for "sum"; for "mean", 1 / the number of rows (probabilities) or 1 /
    the summed class weight of the counted targets (class indices; inf when that is 0, as
    torch's mean; NaN with a z-loss, whose mean is then NaN)."""
    acc = accumulator_dtype(logits.dtype)
    is_index = check_cross_entropy_operands(logits, target, weight)
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"reduced cross_entropy takes reduction 'mean' or 'sum', got {reduction!r}"
        )
    if options.total_classes:
        raise ValueError(
            "reduced cross_entropy does not take sharded classes (total_classes > 0): the "
            "vocab-parallel path reduces the merged per-row losses"
        )
    denominator = None
    if reduction == "sum":
        scale = torch.ones((), dtype=acc, device=target.device)
    elif not is_index:  # no rows: torch's mean is NaN, and so is its gradient
        rows = target.shape[0]
        scale = torch.full((), 1.0 / rows if rows else math.nan, dtype=acc, device=target.device)
    else:
        denominator = mean_denominator(target, weight, options.ignore_index, logits.shape[1], acc)
        scale = 1.0 / denominator
        if options.z_loss:  # torch's mean with a z-loss is NaN without counted weight
            scale = torch.where(denominator != 0, scale, math.nan)
    loss, _, _ = _ce.cross_entropy_forward(
        logits, target, weight, options, grad_out=grad_out, grad_scale=scale
    )
    if reduction == "sum":
        return loss.sum()
    if denominator is None:
        return loss.mean()
    mean = loss.sum() / denominator
    if options.z_loss:
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
    temperature: float,
    total_classes: int,
    reduction: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad, applied): the cross-entropy of 2-D logits reduced by ``reduction``
    ("mean" or "sum", as torch), 0-d in the accumulator dtype; its gradient with respect to
    the logits (logits' dtype), both from one kernel launch; and the upstream gradient the
    buffer holds the gradient for (1, 0-d). Autograd rescales the buffer in place by the
    upstream gradient over ``applied`` (skipped on the device when that is 1) and returns it."""
    options = CEOptions(ignore_index, label_smoothing, z_loss, softcap, temperature, total_classes)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    loss = _reduced(logits, target, weight, options, reduction, grad)
    return loss, grad, torch.ones_like(loss)


@cross_entropy_reduced_op.register_fake
def _(logits, target, weight, *options):
    check_cross_entropy_operands(logits, target, weight)
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
    temperature: float,
    total_classes: int,
    reduction: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``cross_entropy_reduced``, the gradient written over ``logits``; returns
    (loss, applied)."""
    options = CEOptions(ignore_index, label_smoothing, z_loss, softcap, temperature, total_classes)
    loss = _reduced(logits, target, weight, options, reduction, logits)
    return loss, torch.ones_like(loss)


@cross_entropy_reduced_inplace_op.register_fake
def _(logits, target, weight, *options):
    check_cross_entropy_operands(logits, target, weight)
    loss = logits.new_empty((), dtype=accumulator_dtype(logits.dtype))
    return loss, torch.empty_like(loss)


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
            if bool(factor != 1.0):  # a CPU tensor: read on the host for free
                grad.copy_(grad.to(factor.dtype) * factor)
        else:
            block = _kernels.SCALE_BLOCK
            with launching_on(grad):
                _kernels.cross_entropy_scale_kernel[(triton.cdiv(grad.numel(), block),)](
                    grad, factor, grad.numel(), BLOCK=block, num_warps=8
                )
    applied.copy_(scale.reshape(applied.shape))


@cross_entropy_scale_op.register_fake
def _(grad, applied, scale):
    return None


def rescaled(formed, applied: torch.Tensor, grad_loss: torch.Tensor, *, copy: bool = False):
    """Gradients for the upstream gradient ``grad_loss`` from gradients ``formed`` (a list,
    None where not formed) for the upstream gradient ``applied``: the backward of every op that
    forms its gradients in the forward (this module's, and ``linear_cross_entropy_reduced``).

    In place (``cross_entropy_scale_``: nothing read or written when the factor is 1, decided
    on the device) only by the last backward through the graph, which frees the buffers' other
    uses. A backward that keeps the graph (``retain_graph=True``, ``create_graph``, gradcheck),
    ``copy``, or torch.compile (which cannot trace the query; nor can a torch without it,
    where "keep the graph" is the safe answer) gets new tensors and leaves the buffers as
    formed, so that any later upstream gradient (0 included) scales them exactly, and a
    gradient already handed out (which autograd may have made ``.grad``) never changes."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", lambda: True)
    if copy or torch.compiler.is_compiling() or keep_graph():
        factor = grad_loss.to(applied.dtype) / applied
        return [None if g is None else (g.to(factor.dtype) * factor).to(g.dtype) for g in formed]
    for g in formed:
        if g is not None:  # each buffer its own applied: the op sets it to grad_loss
            cross_entropy_scale_op(g, applied.clone(), grad_loss)
    return list(formed)


def _rescaled(ctx, grad_loss):
    """The logits' gradient for upstream ``grad_loss`` from the forward's buffer (saved as
    ``(grad, applied)``), by :func:`rescaled`. Unpacked every time: after the last backward
    autograd has freed it, and a second one raises torch's own "backward through the graph a
    second time" error."""
    _refuse_create_graph()
    if ctx.needs_input_grad[1]:  # the functional API takes the per-row op there
        raise NotImplementedError(
            "cross_entropy_reduced forms only the logits' gradient: probability targets that "
            "require grad need the per-row op (torch.ops.triton_softmax.cross_entropy)"
        )
    grad, applied = ctx.saved_tensors
    if grad_loss is None:  # the loss is unused: no gradient
        return None
    return rescaled([grad], applied, grad_loss)[0]


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
    return _rescaled(ctx, grad_loss), *[None] * 9


cross_entropy_reduced_op.register_autograd(_reduced_backward, setup_context=_reduced_setup_context)


class ReducedInplace(torch.autograd.Function):
    """``cross_entropy_reduced_`` under autograd: the forward overwrites the logits with the
    gradient (marked dirty, so autograd's version check catches any other saved use of them),
    the backward rescales them in place and hands them back as the logits' gradient."""

    @staticmethod
    def forward(ctx, logits, target, weight, options: CEOptions, reduction):
        loss, applied = cross_entropy_reduced_inplace_op(
            logits, target, weight, *options.flat(), reduction
        )
        ctx.mark_dirty(logits)
        ctx.mark_non_differentiable(applied)
        ctx.save_for_backward(logits, applied)
        return loss, logits, applied

    @staticmethod
    def backward(ctx, grad_loss, _grad_logits, _grad_applied):
        return _rescaled(ctx, grad_loss), None, None, None, None
