"""Drop-ins for ``torch.nn.functional.softmax``, ``log_softmax`` and ``cross_entropy``.

Same signatures and results as torch; extras are keyword-only. These functions handle ``dim``,
``dtype``, shapes, validation and torch's autocast policy, then compute with

- the registered ops in ``triton_softmax.ops`` (Triton kernels, compiled or interpreted), which
  always work over the last dimension of 2-D rows; or
- torch's own functions, on the plain-torch CPU path (``kernel_path(x) == "torch"``: torch's
  results at torch's speed) and under the transforms the registered ops do not implement
  (``torch.func`` transforms and forward-mode AD, where a custom op would silently give a zero
  tangent): the same math, so ``grad``, ``vmap``, ``jvp``, ``jacrev`` and ``hessian`` work.
"""

from __future__ import annotations

import math
import operator
import warnings

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.nn import _reduction

from triton_softmax.ops import _torch_math
from triton_softmax.ops._checks import (
    check_class_indices,
    check_floating,
    checked_options,
    require_tensor,
    rows_writable,
)
from triton_softmax.ops._device import (
    accumulator_dtype,
    class_dim_last,
    kernel_path,
    kernels_interpreted,
)
from triton_softmax.ops.cross_entropy_reduced import ReducedInplace
from triton_softmax.ops.options import CEOptions

__all__ = ["softmax", "log_softmax", "cross_entropy", "linear_cross_entropy"]


def _with_torch(input: torch.Tensor) -> bool:
    """Whether torch's own functions compute this call instead of the registered ops: on the
    plain-torch CPU path, and under the transforms the registered ops do not implement."""
    if input.is_cpu and not kernels_interpreted():  # kernel_path(input) == "torch", quicker
        return True
    kernel_path(input)  # a clear error for devices no path serves
    return _under_transforms()


def _under_transforms() -> bool:
    """Whether a torch.func transform or forward-mode AD is active (also while torch.compile
    traces one): the registered ops would give a silent zero tangent there."""
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


def _checked_dim(name: str, dim, ndim: int, stacklevel: int) -> int:
    if dim is None:
        # torch's legacy rule for dim=None, with torch's warning (not while compiling, where
        # a warning would break the graph).
        if not torch.compiler.is_compiling():
            warnings.warn(
                f"Implicit dimension choice for {name} has been deprecated. "
                "Change the call to include dim=X as an argument.",
                stacklevel=stacklevel,
            )
        return 0 if ndim in (0, 1, 3) else 1
    if isinstance(dim, bool):
        raise TypeError(f"{name}(): argument 'dim' must be int, not bool")
    try:
        return operator.index(dim)
    except TypeError:
        raise TypeError(f"{name}(): argument 'dim' must be int, not {type(dim).__name__}") from None


def _over_dim(op, input: torch.Tensor, dim: int) -> torch.Tensor:
    """Apply a last-dimension op along ``dim``; the result is laid out like torch's."""
    if input.dim() == 0:
        if dim not in (0, -1):
            raise IndexError(f"Dimension out of range (expected to be in [-1, 0], got {dim})")
        return op(input.reshape(1)).reshape(())
    dim = dim % input.dim() if -input.dim() <= dim < input.dim() else dim
    if not 0 <= dim < input.dim():
        raise IndexError(
            f"Dimension out of range (expected to be in [{-input.dim()}, {input.dim() - 1}], "
            f"got {dim})"
        )
    if dim == input.dim() - 1:
        return op(input)
    return op(input.movedim(dim, -1)).movedim(-1, dim).contiguous()


def _softmax_like(name: str, log: bool, input, dim, stacklevel: int, dtype) -> torch.Tensor:
    require_tensor(input, name, "input")
    dim = _checked_dim(name, dim, input.dim(), stacklevel + 1)
    check_floating(dtype or input.dtype, f"{name} input")
    if _with_torch(input):
        return (torch.log_softmax if log else torch.softmax)(input, dim, dtype=dtype)
    input = input.to(dtype) if dtype is not None else _torch_math.autocast_float32(name, input)
    op = torch.ops.triton_softmax.log_softmax if log else torch.ops.triton_softmax.softmax
    return _over_dim(op.default, input, dim)


def softmax(
    input: torch.Tensor,
    dim: int | None = None,
    _stacklevel: int = 3,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Softmax along ``dim``: ``exp(x_i) / sum_j exp(x_j)``, as ``torch.nn.functional.softmax``.

    Args:
        input: floating tensor (float16, bfloat16, float32, float64) of any shape and strides.
        dim: the dimension to normalise; None takes torch's legacy choice, with its warning.
        dtype: cast the input to this dtype first (how to pass integer tensors).
    Returns:
        A tensor of the input's shape and (cast) dtype; rows of all -inf give NaN, as torch.
        Under ``torch.autocast`` on CUDA, float16/bfloat16 inputs give float32, as torch.
    """
    return _softmax_like("softmax", False, input, dim, _stacklevel, dtype)


def log_softmax(
    input: torch.Tensor,
    dim: int | None = None,
    _stacklevel: int = 3,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Log-softmax along ``dim``: ``x_i - log sum_j exp(x_j)``, as torch's ``log_softmax``.

    Args and Returns as :func:`softmax`.
    """
    return _softmax_like("log_softmax", True, input, dim, _stacklevel, dtype)


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    softcap: float | None = None,
    z_loss: float = 0.0,
    return_lse: bool = False,
    inplace_backward: bool = False,
    check_targets: bool = False,
    process_group=None,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Cross-entropy between logits and targets, as ``torch.nn.functional.cross_entropy``.

    Args:
        input: logits of shape (C,), (N, C) or (N, C, d1, ..., dk); floating.
        target: class indices of shape (), (N) or (N, d1, ..., dk), any integer dtype
            (torch wants int64; other integer dtypes are converted); or class probabilities
            of the input's shape (soft or one-hot labels), floating.
        weight: (C,) class weights.
        size_average, reduce: deprecated, as in torch (they override ``reduction``).
        ignore_index: class-index targets equal to it cost 0 and get no gradient; any int64.
        reduction: "none" | "mean" | "sum". "mean" divides by the summed weights of counted
            targets (class indices) or by the number of rows (probabilities), as torch.
        label_smoothing: at most 1; as in torch, a value <= 0 (or NaN) means none. Torch's
            formula, weighted classes included. On the kernel paths each distinct value
            compiles its own kernel specialisation once (exact in fp64).
        softcap: keyword-only; the loss is taken on ``softcap * tanh(input / softcap)``
            (Gemma 2's logit soft-capping), computed inside the kernels; a positive finite
            real number (not a bool), or None for none.
        z_loss: keyword-only, a finite real number >= 0 (not a bool); adds
            ``z_loss * lse**2`` to each counted row's loss (PaLM's
            z-loss), reduced with it: under "mean" with class weights it is divided by the
            summed weights like the rest. Each distinct value compiles once, as above.
        return_lse: keyword-only; also return the log-sum-exp per row, shaped like
            the unreduced loss, in float32 (float64 for float64 logits); differentiable.
        inplace_backward: keyword-only; the gradient is written into ``input``'s memory instead of a
            new tensor (saves one logits-sized buffer). With a "mean" or "sum" loss whose input
            requires grad (and no ``return_lse``) it is written by the forward itself: the tensor
            holds the gradient, not the logits, as soon as this call returns; otherwise after
            ``backward()``. Do not read it again (e.g. for accuracy: compute that before the loss).
            Another op that saved it for its own backward is caught by torch's in-place version
            check, which raises. A leaf that requires grad (a parameter) is refused. Logits whose
            rows overlap or are not contiguous along the class dimension fall back to the out-of-
            place backward; (N, C, d1, ..., dk) inputs are copied to rows first, so they gain
            nothing. Logits that are a view (``x.view(-1, C)``, or (C,) logits) get their
            gradient written by the backward (one more read of the logits), not the forward.
            Without effect on the plain-torch path, where torch's own backward runs.
        check_targets: keyword-only; check class indices on the host even for GPU tensors
            (one device synchronisation; under torch.compile a graph break, so
            ``fullgraph=True`` refuses it). CPU tensors are always checked. Unchecked
            out-of-range indices give a NaN loss, never an out-of-bounds access. With
            ``process_group`` (where class indices are always checked), it compares checksums
            of the class-index targets and of the class weights across the ranks instead.
        process_group: keyword-only; a ``torch.distributed`` group over which the classes
            are sharded (vocab / tensor parallelism): this rank's ``input`` holds classes
            [start, stop) of the full problem, contiguous and in rank order (sizes may
            differ, and be 0); ``target`` holds global class indices (or this rank's slice of
            the probabilities), ``weight`` the full (V,) class weights. Every rank gets the
            full problem's loss; the input's gradient is this rank's slice of the full one.
            Per call, one all_gather of 22 int64 (the shard sizes and what the ranks must
            agree on: ranks that disagree get the same ValueError) and one of 3 floats per
            row in the forward, none in the backward (see ``triton_softmax.distributed``).
            Not with ``inplace_backward`` or torch.func.
        temperature: keyword-only, a positive finite real number T (default 1): the logits
            are soft-capped first (with ``softcap``), then divided by T, and everything (loss,
            lse, z-loss, smoothing, entropy) is taken on those tempered logits (vLLM's
            sampling order). Per-token log-probs at temperature T are
            ``-cross_entropy(logits, tokens, reduction="none", temperature=T)``. Each distinct
            value compiles its own kernel specialisation once.
        return_entropy: keyword-only; also return the entropy ``H = -sum_j p_j log p_j`` of
            softmax(tempered logits), formed in the same pass as the loss and differentiable,
            reduced like the loss over the counted rows: "none" per row (0 where the target is
            ``ignore_index``), "sum" their sum, "mean" that sum over the number of counted rows
            (class weights do not enter it); in the loss's dtype.
    Returns:
        The loss: a scalar for "mean"/"sum", else the target's batch shape; in the input's
        dtype (probability targets: the promoted dtype of input and target, as torch; under
        ``torch.autocast``, float32 as torch). With ``return_lse``, ``(loss, lse)``; with
        ``return_entropy``, ``(loss, entropy)``; with both, ``(loss, lse, entropy)``.
    Raises:
        TypeError: non-tensor arguments, non-floating logits, or a target that is neither
            integer nor floating.
        ValueError: shapes that do not fit (both named), bad weight, reduction, smoothing,
            softcap, z_loss, temperature or ignore_index; ``inplace_backward`` on a leaf that
            requires grad.
        IndexError: a class index outside [0, C) that is not ``ignore_index``.
    """
    require_tensor(input, "cross_entropy", "input")
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    check_floating(input, "cross_entropy input")
    if input.dim() == 0:
        raise ValueError("cross_entropy input must have a class dimension, got a 0-d tensor")
    batch_shape = () if input.dim() == 1 else (input.shape[0], *input.shape[2:])
    if input.dim() == 1 and isinstance(target, torch.Tensor) and target.shape == (1,):
        if not target.is_floating_point():
            target = target.reshape(())  # torch accepts (C,) logits with a (1,) target
    target, weight, reduction, options = checked_options(
        "cross_entropy",
        target,
        weight,
        reduction,
        label_smoothing,
        ignore_index,
        softcap,
        z_loss,
        temperature,
        batch_shape,
        input.shape,
    )
    return_entropy = bool(return_entropy)
    if inplace_backward and _is_leaf_requiring_grad(input):
        raise ValueError(
            "inplace_backward=True would write the gradient over the input, which is (a view "
            "of) a leaf tensor that requires grad, such as a parameter; only intermediate "
            "logits (a layer's output) can be consumed. Pass inplace_backward=False."
        )
    if process_group is not None:
        if inplace_backward:
            raise ValueError("inplace_backward is not supported with process_group")
        if _under_transforms():
            raise NotImplementedError(
                "cross_entropy with process_group under torch.func transforms"
            )
        return _vocab_parallel().cross_entropy(
            input,
            target,
            weight,
            reduction,
            options,
            process_group,
            check_targets,
            return_lse,
            return_entropy,
        )
    if _with_torch(input):
        return _torch_math.cross_entropy(
            input, target, weight, reduction, options, return_lse, return_entropy
        )
    return _kernel_cross_entropy(
        input,
        target,
        weight,
        reduction,
        options,
        return_lse,
        inplace_backward,
        check_targets,
        return_entropy,
    )


def _kernel_cross_entropy(
    input,
    target,
    weight,
    reduction: str,
    options: CEOptions,
    return_lse,
    inplace_backward,
    check_targets,
    return_entropy,
):
    """cross_entropy on the registered ops (compiled or interpreted kernels)."""
    out_dtype = _torch_math.loss_dtype(input, target)
    is_index = not target.is_floating_point()
    n_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    batch_shape = () if input.dim() == 1 else (input.shape[0], *input.shape[2:])
    input = _torch_math.autocast_float32("cross_entropy", input)
    if not is_index:
        target = _torch_math.autocast_float32("cross_entropy", target)
    if is_index and check_targets and target.device.type != "cpu":  # CPU: always checked
        _check_targets_eagerly(target, n_classes, options.ignore_index)
    logits = class_dim_last(input)
    target_rows = target.reshape(-1) if is_index else class_dim_last(target)
    in_place = inplace_backward and rows_writable(logits)
    if (
        reduction != "none"
        and not return_lse
        and not return_entropy
        and torch.is_grad_enabled()
        and logits.requires_grad
        and not target_rows.requires_grad
        # Logits that are a view ((B, T, V).view(-1, V), or (C,) made (1, C)) cannot be
        # overwritten by the forward of a Function with several outputs: the per-row op
        # below writes their gradient in its backward instead.
        and not (in_place and logits._base is not None)
    ):
        # Two passes: the forward forms the reduced loss's gradient, the backward rescales it.
        if in_place:
            out, _, _ = ReducedInplace.apply(logits, target_rows, weight, options, reduction)
        else:
            out, _, _ = torch.ops.triton_softmax.cross_entropy_reduced.default(
                logits, target_rows, weight, *options.flat(), reduction
            )
        return out.to(out_dtype)
    args = (logits, target_rows, weight, *options.flat(), in_place)
    entropy = None
    if return_entropy:
        loss, lse, entropy, _ = torch.ops.triton_softmax.cross_entropy_with_entropy.default(*args)
    else:
        loss, lse, _ = torch.ops.triton_softmax.cross_entropy.default(*args)
    return _torch_math.reduced_outputs(
        loss, lse, entropy, target, weight, reduction, n_classes, options, batch_shape,
        out_dtype, return_lse,
    )  # fmt: skip


def _vocab_parallel():
    """``triton_softmax.distributed``, imported on first use (torch.distributed is not needed
    otherwise)."""
    from triton_softmax import distributed

    return distributed


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options=None,
    softcap: float | None = None,
    z_loss: float = 0.0,
    return_lse: bool = False,
    check_targets: bool = False,
    process_group=None,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``cross_entropy(linear(input, linear_weight, linear_bias), target)`` without ever
    holding the logits, as ``torch.nn.functional.linear_cross_entropy`` (torch >= 2.13).

    Args:
        input: (H,), (N, H) or (*, H) features (language models pass (B, T, H)); floating.
        linear_weight: (V, H) classifier weight of the input's dtype; (V, d1, ..., dk, H) for
            torch's K-dimensional loss over logits (N, V, d1, ..., dk) (computed as one fused
            call per position).
        target: class indices of shape (), (*) or (N, d1, ..., dk); or class probabilities of
            the logits' shape (*, V) or (N, V, d1, ..., dk).
        linear_bias: (V,) (or (V, d1, ..., dk)) bias, or None.
        weight, reduction, label_smoothing, softcap, z_loss, return_lse, temperature,
            return_entropy: as :func:`cross_entropy` (the entropy differentiable with respect
            to input, linear_weight and linear_bias, formed in the same pass over each chunk).
        ignore_index: as in torch: None means -100 for class indices; with probability
            targets it must stay None.
        check_targets: keyword-only; as :func:`cross_entropy`'s (with ``process_group``,
            also compares checksums of the targets and class weights across ranks).
        process_group: keyword-only; the head sharded by class over a ``torch.distributed``
            group, as :func:`cross_entropy`'s: this rank's ``linear_weight`` (and bias) hold
            classes [start, stop), possibly none; the input's gradient is all-reduced over
            the group.
        options: torch's ``LinearCrossEntropyOptions`` or None. Its ``batch_chunk_size``
            (or an explicit ``chunking_method="aspect_ratio[:k]"``, torch's formula) sets the
            rows per chunk; ``allow_retain_graph=True`` has every backward of a mean / sum
            scale copies of the gradients formed in the forward (without it, only a backward
            that keeps the graph does: a second backward through the same graph works either
            way). Without ``batch_chunk_size`` (or with ``None``) the chunks hold about
            256 MiB of logits on CUDA (>= 1024 rows up to 131072 classes in 16-bit) and 32 MiB
            on the CPU. ``acc_policy`` and ``acc_dtype`` are not read: ``grad_weight``
            always accumulates in the input's dtype (``triton_softmax.ops.linear_cross_entropy``
            says why).
    Returns:
        The loss (a scalar for "mean"/"sum", else the target's batch shape), in the input's
        dtype (float32 under ``torch.autocast``, as torch); with ``return_lse``, also the
        log-sum-exp per row in float32 (float64 for float64 input); with ``return_entropy``,
        also the entropy reduced as :func:`cross_entropy`'s, last.
    Raises:
        TypeError, ValueError, IndexError: as :func:`cross_entropy`, plus shapes of
            ``linear_weight`` and ``linear_bias`` that do not fit the input.
        NotImplementedError (at backward): a probability target that requires grad.

    Rows go in chunks through the vendor's GEMMs (cuBLAS, the CPU's BLAS) and our
    cross-entropy; no atomics, so the gradients are bitwise reproducible run to run. A mean or
    sum with gradients forms them in the forward (three GEMMs) and the backward only scales
    them, in place on the last backward through the graph (not at all when the upstream
    gradient is 1), on copies when the graph is kept (``retain_graph=True``). Per-row losses
    (``reduction="none"``) or a gradient through the returned lse recompute the chunks in the
    backward (four GEMMs). Double backward (``create_graph=True``) works: that backward
    recomputes the loss with torch's unfused functions, holding the [N, V] logits as they do.
    """
    require_tensor(input, "linear_cross_entropy", "input")
    require_tensor(linear_weight, "linear_cross_entropy", "linear_weight")
    require_tensor(target, "linear_cross_entropy", "target")
    check_floating(input, "linear_cross_entropy input")
    kernel_path(input)  # a clear error for devices no path serves (meta, mps, ...)
    if input.dim() == 0 or linear_weight.dim() < 2:
        raise ValueError(
            "linear_cross_entropy expects input (H,), (N, H) or (*, H) and linear_weight "
            f"(V, H), got {tuple(input.shape)} and {tuple(linear_weight.shape)}"
        )
    n_features, n_classes = input.shape[-1], linear_weight.shape[0]
    positions = tuple(linear_weight.shape[1:-1])  # torch's K-dimensional loss: (d1, ..., dk)
    if linear_weight.shape[-1] != n_features:
        raise ValueError(
            f"input has {n_features} features but linear_weight "
            f"{tuple(linear_weight.shape)} expects {linear_weight.shape[-1]}"
        )
    if positions and input.dim() != 2:
        raise ValueError(
            f"a K-dimensional loss (linear_weight {tuple(linear_weight.shape)}) needs input "
            f"(N, {n_features}), got {tuple(input.shape)}"
        )
    if linear_bias is not None:
        require_tensor(linear_bias, "linear_cross_entropy", "linear_bias")
        if linear_bias.shape != (n_classes, *positions):
            raise ValueError(
                f"linear_bias must have shape {(n_classes, *positions)}, "
                f"got {tuple(linear_bias.shape)}"
            )
    batch_shape = (*input.shape[:-1], *positions)
    logits_shape = (*input.shape[:-1], n_classes, *positions)
    if input.dim() == 1 and target.shape == (1,) and not target.is_floating_point():
        target = target.reshape(())  # as torch, (H,) input with a (1,) target
    if target.is_floating_point() and ignore_index is not None:
        raise ValueError(
            "ignore_index cannot be given when target contains probabilities (as in torch)"
        )
    target, weight, reduction, ce_options = checked_options(
        "linear_cross_entropy",
        target,
        weight,
        reduction,
        label_smoothing,
        -100 if ignore_index is None else ignore_index,
        softcap,
        z_loss,
        temperature,
        batch_shape,
        logits_shape,
    )
    return_entropy = bool(return_entropy)
    out_dtype = _torch_math.loss_dtype(input, target)
    if input.dtype != torch.float64 and torch.is_autocast_enabled(input.device.type):
        # torch's linear runs in the autocast dtype, its cross_entropy returns float32.
        low = torch.get_autocast_dtype(input.device.type)
        input, linear_weight, linear_bias = (
            None if t is None else t.to(low) for t in (input, linear_weight, linear_bias)
        )
    x = input.reshape(math.prod(input.shape[:-1]), n_features)
    if process_group is not None:
        if positions:
            raise ValueError("a K-dimensional loss is not supported with process_group")
        if _under_transforms():
            raise NotImplementedError(
                "linear_cross_entropy with process_group under torch.func transforms"
            )
        target = target.reshape(x.shape[0], *target.shape[input.dim() - 1 :])
        return _vocab_parallel().linear_cross_entropy(
            x,
            linear_weight,
            linear_bias,
            target,
            weight,
            reduction,
            ce_options,
            process_group,
            check_targets,
            return_lse,
            return_entropy,
            batch_shape,
            out_dtype,
        )
    return _kernel_linear_cross_entropy(
        x,
        linear_weight,
        linear_bias,
        target,
        weight,
        reduction,
        ce_options,
        positions,
        batch_shape,
        out_dtype,
        options,
        check_targets,
        return_lse,
        return_entropy,
    )


def _kernel_linear_cross_entropy(
    x,
    linear_weight,
    linear_bias,
    target,
    weight,
    reduction: str,
    ce_options: CEOptions,
    positions,
    batch_shape,
    out_dtype,
    options,
    check_targets,
    return_lse,
    return_entropy,
):
    """linear_cross_entropy on the registered ops (every device: the chunks' GEMMs are the
    vendor's, their cross-entropy the kernels or the plain-torch math), one fused call per
    position of a K-dimensional loss; ``x`` is [N, H]."""
    n_classes, n_features = linear_weight.shape[0], x.shape[1]
    is_index = not target.is_floating_point()
    if is_index and check_targets and target.device.type != "cpu":  # CPU: always checked
        _check_targets_eagerly(target, n_classes, ce_options.ignore_index)
    n_positions = math.prod(positions)
    weights = linear_weight.reshape(n_classes, n_positions, n_features)
    biases = None if linear_bias is None else linear_bias.reshape(n_classes, n_positions)
    if is_index:
        targets = target.reshape(x.shape[0], n_positions)
    else:
        targets = target.reshape(x.shape[0], n_classes, n_positions)
    use_composite = _under_transforms()
    rows, keep = _linear_chunking(options, x.shape[0], n_features, n_classes)
    needs = [t is not None and t.requires_grad for t in (x, linear_weight, linear_bias)]
    reduced = reduction != "none" and torch.is_grad_enabled() and any(needs) and n_positions > 0
    reduced = reduced and not return_entropy  # per-row entropy gradients: the per-row op
    flat = ce_options.flat()
    if reduced and not use_composite:  # gradients formed in the forward, scaled in backward
        denominator = _linear_denominator(target, weight, reduction, n_classes, x, ce_options)
        total, lses = 0.0, []
        for p in range(n_positions):
            w_p, b_p = weights[:, p], None if biases is None else biases[:, p]
            t_p = targets[:, p] if is_index else targets[:, :, p]
            part, lse, *_ = torch.ops.triton_softmax.linear_cross_entropy_reduced.default(
                x, w_p, b_p, t_p, weight, *flat, denominator, needs, rows, keep
            )
            total = total + part
            lses.append(lse)
        if ce_options.z_loss and reduction == "mean":  # as reduce: no counted weight is NaN
            total = torch.where(denominator != 0, total, math.nan)
        lse = (lses[0] if n_positions == 1 else torch.stack(lses, 1)).reshape(batch_shape)
        return (total.to(out_dtype), lse) if return_lse else total.to(out_dtype)
    losses, lses, entropies = [], [], []
    for p in range(n_positions):
        w_p, b_p = weights[:, p], None if biases is None else biases[:, p]
        t_p = targets[:, p] if is_index else targets[:, :, p]
        if use_composite:  # the same math with torch's functions, for torch.func / forward AD
            loss, lse, *entropy = _torch_math.cross_entropy(
                F.linear(x, w_p, b_p), t_p, weight, "none", ce_options, True, return_entropy
            )
        elif return_entropy:
            op = torch.ops.triton_softmax.linear_cross_entropy_with_entropy.default
            loss, lse, *entropy, _ = op(x, w_p, b_p, t_p, weight, *flat, rows)
        else:
            op = torch.ops.triton_softmax.linear_cross_entropy.default
            loss, lse, _ = op(x, w_p, b_p, t_p, weight, *flat, rows)
            entropy = []
        losses.append(loss)
        lses.append(lse)
        entropies += entropy
    if n_positions == 0:  # a K-dimensional loss with an empty position dimension: (N, 0),
        # from the (empty) logits, so that the result has a grad_fn as torch's
        bias = None if biases is None else biases.reshape(0)
        empty = F.linear(x, weights.reshape(0, n_features), bias)
        losses = lses = entropies = [empty.to(accumulator_dtype(x.dtype))]

    def joined(rows):  # the positions of a K-dimensional loss side by side
        return rows[0] if n_positions == 1 else torch.stack(rows, 1)

    entropy = joined(entropies) if return_entropy else None
    return _torch_math.reduced_outputs(
        joined(losses), joined(lses), entropy, target, weight, reduction, n_classes, ce_options,
        batch_shape, out_dtype, return_lse,
    )  # fmt: skip


def _linear_chunking(options, n_rows: int, n_features: int, n_classes: int) -> tuple[int, bool]:
    """(rows per chunk, 0 for the op's own choice; keep the gradients formed in the forward)
    from torch's ``LinearCrossEntropyOptions`` (its batch_chunk_size, or its documented
    aspect-ratio rule when chunking_method is given explicitly)."""
    if options is None:
        return 0, False
    options_type = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options_type is None or not isinstance(options, options_type):
        raise TypeError(
            "options must be a torch.nn.LinearCrossEntropyOptions or None, got "
            f"{type(options).__name__}"
        )
    rows = options.batch_chunk_size or 0
    method = options.chunking_method
    if method is None and not rows:  # torch: neither a size nor a rule means one chunk
        rows = n_rows
    elif method not in (None, "auto"):
        factor = int(method.partition(":")[2] or 1)
        per_row = -(-n_classes // max(n_features, 1))  # ceil(V / H)
        target = -(-n_rows // max(per_row, 1))
        by_rule = max(1, min((1 << max(target - 1, 0).bit_length()) // factor, n_rows))
        if rows and rows != by_rule:
            raise ValueError(
                f"batch_chunk_size (={rows}) and chunking_method ({method!r}) give different "
                f"chunk sizes ({rows} vs {by_rule}); pass only one (as torch)"
            )
        rows = by_rule
    return rows, bool(options.allow_retain_graph)


def _linear_denominator(target, weight, reduction, n_classes, x, options) -> torch.Tensor:
    """The divisor of the fused op's summed losses, as ``_torch_math.reduce`` forms it: 1 for
    "sum"; for "mean" the counted targets' summed class weights, or the element count of
    probability targets' batch."""
    acc = accumulator_dtype(x.dtype)
    if reduction == "sum":
        return torch.ones((), dtype=acc, device=x.device)
    if target.is_floating_point():
        rows = target.numel() // max(n_classes, 1)
        return torch.full((), rows, dtype=acc, device=x.device)
    return _torch_math.mean_denominator(target, weight, options.ignore_index, n_classes, acc)


@torch.compiler.disable
def _check_targets_eagerly(target: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """The host-side check of ``check_targets``; under torch.compile a graph break (it reads
    the targets on the host), which ``fullgraph=True`` refuses."""
    check_class_indices(target, n_classes, ignore_index)


def _is_leaf_requiring_grad(t: torch.Tensor) -> bool:
    """Whether ``t`` or the tensor it is a view of is a leaf that requires grad."""
    base = t if t._base is None else t._base
    return base.is_leaf and base.requires_grad
