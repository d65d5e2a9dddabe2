"""Cross-entropy over rows of logits, per row: launchers and torch ops.

The math, the kernels and the bytes each path moves are in ``cross_entropy_kernels``; the
plain-torch path (a CPU without Triton's interpreter) in ``_torch_math``; a loss reduced to a
scalar, with its gradient formed in the forward, in ``cross_entropy_reduced``. Options are one
:class:`~triton_softmax.ops.options.CEOptions` in Python and six flat arguments in the schemas
(``*options.flat()``: ignore_index, label_smoothing, z_loss, softcap, temperature,
total_classes).

Registered ops (2-D logits [M, C]; targets int64 [M] or floating [M, C]; results fp32, fp64
for fp64 logits):
    torch.ops.triton_softmax.cross_entropy(logits, target, weight, *options,
            inplace_backward=False)
        -> (loss [M], lse [M], stats [3, M] = (row max, log-sum-exp - max, S))
    torch.ops.triton_softmax.cross_entropy_with_entropy(same arguments)
        -> (loss, lse, entropy [M], stats), the entropy from the same pass
    torch.ops.triton_softmax.cross_entropy_backward(grad_loss, grad_lse, logits, target,
            weight, stats, *options, grad_entropy=None, entropy=None)
        -> grad_logits (out of place)
    torch.ops.triton_softmax.cross_entropy_backward_(same arguments) -> None, writes the
        gradient into logits
"""

from __future__ import annotations

import torch
import triton

from triton_softmax.ops import _torch_math, tiles
from triton_softmax.ops import cross_entropy_kernels as _kernels
from triton_softmax.ops._checks import (
    check_class_indices,
    check_cross_entropy_operands,
    check_row_vector,
    check_rows_writable,
)
from triton_softmax.ops._device import (
    accumulator_dtype,
    as_rows,
    kernel_path,
    kernels_interpreted,
    launching_on,
    triton_accumulator_dtype,
)
from triton_softmax.ops.options import CEOptions

#: torch's options: no smoothing, z-loss, cap or temperature, ignore_index -100.
DEFAULTS = CEOptions()

# --------------------------------------------------------------------------------------
# Launchers: validate, allocate, pick tiles, launch (or take the plain-torch path).
# --------------------------------------------------------------------------------------


def _launch(name, logits, target, weight, options: CEOptions, block_n, **rest):
    """Launch the cross-entropy kernel ``name`` ("forward" or "backward") over the rows of
    2-D ``logits``; ``rest`` holds the kernel's own operands by name (pointers, their strides,
    flags). The kernel is looked up at each call (benchmarks/tune.py stands in for it)."""
    is_index = target.dtype == torch.int64
    rows = as_rows(logits)
    target_rows = target if is_index else as_rows(target)
    grad_rows = rest.get("grad_logits_ptr")
    others = (() if is_index else (target_rows,)) + (() if grad_rows is None else (grad_rows,))
    tile = tiles.pick_tile(
        tiles.table(f"cross_entropy.{name}"),
        rows.shape[1],
        rows.element_size(),
        aligned=tiles.triton_aligned(rows.shape[1], rows, *others),
        interpreted=kernels_interpreted(),
        block_n=block_n,
    )
    if name == "forward":
        rest["SINGLE_BLOCK"] = tile.single_block
    kernel = getattr(_kernels, f"cross_entropy_{name}_kernel")
    with launching_on(logits):
        kernel[(triton.cdiv(rows.shape[0], tile.block_m),)](
            logits_ptr=rows,
            target_ptr=target_rows,
            weight_ptr=rows if weight is None else weight.contiguous(),  # unread without weight
            logits_row_stride=rows.stride(0),
            target_row_stride=target_rows.stride(0),
            n_rows=rows.shape[0],
            n_classes=rows.shape[1],
            ignore_index=options.ignore_index,
            total_classes=options.total_classes or rows.shape[1],
            SHARDED=options.total_classes > 0,
            LABEL_SMOOTHING=options.label_smoothing,
            Z_LOSS=options.z_loss,
            SOFTCAP=options.softcap,
            INV_TEMPERATURE=options.inv_temperature,
            TARGET_IS_INDEX=is_index,
            HAS_WEIGHT=weight is not None,
            ACC_DTYPE=triton_accumulator_dtype(logits.dtype),
            BLOCK_M=tile.block_m,
            BLOCK_N=tile.block_n,
            num_warps=tile.num_warps,
            **rest,
        )


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
    options: CEOptions = DEFAULTS,
    *,
    grad_out: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    block_n: int | None = None,
    entropy_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy of 2-D logits, and optionally its gradient in the same pass.

    Args:
        logits: [M, C] floating.
        target: [M] int64 class indices, or [M, C] floating probabilities.
        weight: [C] class weights or None.
        options: ignore_index, label smoothing, z-loss, softcap, temperature and the sharded
            class count (see :class:`CEOptions`); everything (loss, lse, stats, entropy) is
            taken on the tempered logits u = softcap(logits) / T.
        grad_out: None, or an [M, C] tensor (``logits`` itself for in place) with unit column
            stride and non-overlapping rows: the kernel also writes into it the gradient of
            ``grad_scale * sum(loss)`` with respect to the logits, in ``grad_out``'s dtype,
            in the same launch (a row held in one block is read once; a streamed row twice,
            the second time right after the first, from L2). Ignored rows get 0.
        grad_scale: with ``grad_out``, a one-element tensor on the logits' device, the
            upstream gradient of every row's loss (1 for a sum, 1 / denominator for a mean),
            read on the device; None means 1.
        block_n: override the class block (a power of two; tests use it).
        entropy_out: None, or a contiguous [M] tensor of the loss's dtype: the entropy
            H = lse - sum_j p_j u_j of softmax(u) is written into it in the same pass (one
            more per-lane running sum); 0 for ignored rows. Not with ``grad_out``.
    Returns:
        loss [M], lse [M] and stats [3, M] = (row max m, lse - m, target mass S) for the
        backward (of the tempered logits); fp32 (fp64 for fp64 logits).
    """
    is_index = check_cross_entropy_operands(logits, target, weight)
    n_rows, n_classes = logits.shape
    loss, lse, stats = row_outputs(logits)
    if entropy_out is not None:
        if grad_out is not None:
            raise ValueError("cross_entropy_forward writes entropy_out or grad_out, not both")
        check_row_vector(entropy_out, "entropy_out", n_rows, loss.dtype, logits.device)
    if grad_out is not None:
        if grad_out.shape != logits.shape or grad_out.device != logits.device:
            raise ValueError(
                f"grad_out must have the logits' shape {tuple(logits.shape)} on "
                f"{logits.device}, got {tuple(grad_out.shape)} on {grad_out.device}"
            )
        check_rows_writable(grad_out)
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
        if not options.total_classes:  # sharded: the caller checks against the full problem
            check_class_indices(target, n_classes, options.ignore_index)
    if kernel_path(logits) == "torch":
        if grad_out is None:
            _torch_math.cross_entropy_rows(
                logits, target, weight, options, loss, lse, stats, entropy_out
            )
        else:
            _torch_math.cross_entropy_rows_and_gradient(
                logits, target, weight, options, loss, lse, stats, grad_out, grad_scale
            )
        return loss, lse, stats
    row_max, log_sum, target_mass = stats
    _launch(
        "forward",
        logits,
        target,
        weight,
        options,
        block_n,
        loss_ptr=loss,
        lse_ptr=lse,
        row_max_ptr=row_max,
        log_sum_ptr=log_sum,
        target_mass_ptr=target_mass,
        entropy_ptr=loss if entropy_out is None else entropy_out,  # unused without ENTROPY
        ENTROPY=entropy_out is not None,
        grad_logits_ptr=loss if grad_out is None else grad_out,  # unused without WRITE_GRAD
        grad_scale_ptr=loss if grad_scale is None else grad_scale,
        grad_logits_row_stride=0 if grad_out is None else grad_out.stride(0),
        WRITE_GRAD=grad_out is not None,
    )
    return loss, lse, stats


def cross_entropy_backward(
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor | None,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    stats: torch.Tensor,
    options: CEOptions = DEFAULTS,
    *,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    grad_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient with respect to the logits of the per-row losses (and of the returned lse
    and entropy).

    Args:
        grad_loss: [M] upstream gradient of the per-row losses (any stride, 0 included).
        grad_lse: [M] upstream gradient of the forward's lse, or None when it is unused.
        logits, target, weight, options: as in the forward.
        stats: [3, M], saved by the forward.
        out: [M, C] tensor to write into (``logits`` itself for the in-place mode);
            a new tensor when None.
        block_n: override the class block (a power of two; tests use it).
        grad_entropy: [M] upstream gradient of the entropy, or None when it is unused.
        entropy: with ``grad_entropy``, the forward's contiguous [M] entropy.
    Returns:
        ``out``, holding the gradient in the logits' dtype.
    """
    check_cross_entropy_operands(logits, target, weight)
    n_rows = logits.shape[0]
    acc = accumulator_dtype(logits.dtype)
    if grad_entropy is not None:
        if entropy is None:
            raise ValueError("cross_entropy_backward: grad_entropy needs the forward's entropy")
        check_row_vector(entropy, "entropy", n_rows, acc, logits.device)
    for name, vector in (
        ("grad_loss", grad_loss),
        ("grad_lse", grad_lse),
        ("grad_entropy", grad_entropy),
    ):
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
        check_rows_writable(out)
    if n_rows == 0:
        return out
    if kernel_path(logits) == "torch":
        _torch_math.cross_entropy_gradient(
            grad_loss,
            grad_lse,
            logits,
            target,
            weight,
            stats,
            options,
            out,
            grad_entropy,
            entropy,
        )
        return out
    lse_pointer = grad_loss if grad_lse is None else grad_lse  # unread without grad_lse
    h_pointer = grad_loss if grad_entropy is None else grad_entropy  # unread without it
    row_max, log_sum, target_mass = stats
    _launch(
        "backward",
        logits,
        target,
        weight,
        options,
        block_n,
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
    )
    return out


# --------------------------------------------------------------------------------------
# Registered ops: schema, fake implementation, autograd.
# --------------------------------------------------------------------------------------


def _rows(logits, target, weight, options: CEOptions, entropy: bool):
    """``cross_entropy`` and, with ``entropy``, ``cross_entropy_with_entropy``: per-row
    (loss, lse, stats), or (loss, lse, entropy, stats) with the entropy formed in the same
    pass."""
    entropy_out = None
    if entropy:
        entropy_out = logits.new_empty(logits.shape[0], dtype=accumulator_dtype(logits.dtype))
    loss, lse, stats = cross_entropy_forward(
        logits, target, weight, options, entropy_out=entropy_out
    )
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
    temperature: float,
    total_classes: int,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (loss, lse, stats) of 2-D logits; see the module docstring.

    ``inplace_backward`` makes the backward write the gradient into ``logits``' memory, which
    must then have non-overlapping rows with unit column stride.
    """
    options = CEOptions(ignore_index, label_smoothing, z_loss, softcap, temperature, total_classes)
    return _rows(logits, target, weight, options, entropy=False)


@torch.library.custom_op("triton_softmax::cross_entropy_with_entropy", mutates_args=())
def cross_entropy_with_entropy_op(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    temperature: float,
    total_classes: int,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (loss, lse, entropy, stats) of 2-D logits, as ``cross_entropy`` plus the
    entropy of softmax(softcap(logits) / temperature), formed in the same pass; all three
    differentiable, the backward one kernel."""
    options = CEOptions(ignore_index, label_smoothing, z_loss, softcap, temperature, total_classes)
    return _rows(logits, target, weight, options, entropy=True)


@cross_entropy_op.register_fake
def _(logits, target, weight, *options):
    check_cross_entropy_operands(logits, target, weight)
    return fake_rows(False, logits)


@cross_entropy_with_entropy_op.register_fake
def _(logits, target, weight, *options):
    check_cross_entropy_operands(logits, target, weight)
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
    temperature: float,
    total_classes: int,
    grad_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> torch.Tensor:
    """The logits' gradient as a new tensor."""
    options = CEOptions(ignore_index, label_smoothing, z_loss, softcap, temperature, total_classes)
    return cross_entropy_backward(
        grad_loss,
        grad_lse,
        logits,
        target,
        weight,
        stats,
        options,
        grad_entropy=grad_entropy,
        entropy=entropy,
    )


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
    temperature: float,
    total_classes: int,
    grad_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> None:
    """The logits' gradient written over ``logits``. Declared as mutating ``logits``, so
    autograd bumps its version counter: any other use of those logits saved for backward raises
    instead of silently reading the gradient."""
    options = CEOptions(ignore_index, label_smoothing, z_loss, softcap, temperature, total_classes)
    cross_entropy_backward(
        grad_loss,
        grad_lse,
        logits,
        target,
        weight,
        stats,
        options,
        out=logits,
        grad_entropy=grad_entropy,
        entropy=entropy,
    )


def _setup_context(ctx, inputs, output) -> None:
    logits, target, weight, *flat, inplace = inputs
    stats = output[-1]
    entropy = output[2] if len(output) == 4 else None
    ctx.save_for_backward(logits, target, weight, stats, entropy)
    ctx.options = CEOptions(*flat)
    ctx.inplace_backward = inplace
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)


def composite_gradients(
    inputs,
    needs,
    logits,
    target,
    weight,
    options: CEOptions,
    grad_loss,
    grad_lse,
    grad_entropy,
    what,
):
    """Gradients by torch's own functions, as a differentiable graph: the double-backward path
    (``create_graph=True``) of the cross-entropy ops and of the fused linear ones.

    Args:
        inputs: the saved tensors to differentiate with respect to; needs: which of them.
        logits: [M, C] logits, ``inputs[0]`` itself or computed from ``inputs`` under grad mode.
        target, weight, options: as the forward's.
        grad_loss, grad_lse, grad_entropy: [M] upstream gradients of the per-row loss, lse and
            entropy (the last two None when unused).
        what: the op, for the error with sharded classes (double backward is not supported
            there: the other ranks' logits are not here).
    Returns:
        One per input: its gradient, zeros where needed but unused by the loss, None where
        not needed.
    """
    if options.total_classes:
        raise NotImplementedError(
            f"double backward (create_graph=True) through {what} (process_group) is not supported"
        )
    wanted = [t for t, need in zip(inputs, needs, strict=True) if need]
    loss, lse, entropy = _torch_math.cross_entropy(
        logits, target, weight, "none", options, return_lse=True, return_entropy=True
    )
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
    if grad_loss is None:
        grad_loss = torch.zeros_like(stats[0])
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # create_graph=True
        grads = composite_gradients(
            (logits, target),
            ctx.needs_input_grad[:2],
            logits,
            target,
            weight,
            ctx.options,
            grad_loss,
            grad_lse,
            grad_entropy,
            "cross_entropy with sharded classes",
        )
        return (*grads, *[None] * 8)

    grad_target = None
    if ctx.needs_input_grad[1]:  # probability targets only
        grad_target = _torch_math.target_gradient(
            logits, target, weight, stats, ctx.options, grad_loss
        )
    args = (grad_loss, grad_lse, logits, target, weight, stats, *ctx.options.flat())
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
