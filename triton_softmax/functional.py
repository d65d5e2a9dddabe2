"""Drop-ins for ``torch.nn.functional.softmax``, ``log_softmax`` and ``cross_entropy``.

Same signatures and results as torch; extras are keyword-only. These functions handle ``dim``,
``dtype``, shapes and validation, then call the registered ops in ``triton_softmax.ops``,
which always work over the last dimension of 2-D rows.
"""

from __future__ import annotations

import warnings

import torch
from torch.nn import _reduction

from triton_softmax.ops import cross_entropy as _ce
from triton_softmax.ops._common import check_floating

__all__ = ["softmax", "log_softmax", "cross_entropy"]

_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _implicit_dim(name: str, ndim: int, stacklevel: int) -> int:
    # torch's legacy rule for dim=None, with torch's warning.
    warnings.warn(
        f"Implicit dimension choice for {name} has been deprecated. "
        "Change the call to include dim=X as an argument.",
        stacklevel=stacklevel,
    )
    return 0 if ndim in (0, 1, 3) else 1


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


def _softmax_like(name: str, op, input, dim, stacklevel, dtype) -> torch.Tensor:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{name}(): input must be a Tensor, got {type(input).__name__}")
    if dim is None:
        dim = _implicit_dim(name, input.dim(), stacklevel + 1)
    if dtype is not None:
        input = input.to(dtype)
    check_floating(input, f"{name} input")
    return _over_dim(op, input, dim)


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
    """
    return _softmax_like(
        "softmax", torch.ops.triton_softmax.softmax.default, input, dim, _stacklevel, dtype
    )


def log_softmax(
    input: torch.Tensor,
    dim: int | None = None,
    _stacklevel: int = 3,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Log-softmax along ``dim``: ``x_i - log sum_j exp(x_j)``, as torch's ``log_softmax``.

    Args and Returns as :func:`softmax`.
    """
    return _softmax_like(
        "log_softmax", torch.ops.triton_softmax.log_softmax.default, input, dim, _stacklevel, dtype
    )


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
    z_loss: float = 0.0,
    return_lse: bool = False,
    inplace_backward: bool = False,
    check_targets: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy between logits and targets, as ``torch.nn.functional.cross_entropy``.

    Args:
        input: logits of shape (C,), (N, C) or (N, C, d1, ..., dk); floating.
        target: class indices of shape (), (N) or (N, d1, ..., dk), any integer dtype
            (torch wants int64; other integer dtypes are converted); or class probabilities
            of the input's shape (soft or one-hot labels), floating.
        weight: (C,) class weights.
        size_average, reduce: deprecated, as in torch (they override ``reduction``).
        ignore_index: class-index targets equal to it cost 0 and get no gradient; any integer.
        reduction: "none" | "mean" | "sum". "mean" divides by the summed weights of counted
            targets (class indices) or by the number of rows (probabilities), as torch.
        label_smoothing: in [0, 1]; torch's formula, weighted classes included.
        z_loss: keyword-only; adds ``z_loss * lse**2`` to each counted row's loss (PaLM's
            z-loss), reduced with it: under "mean" with class weights it is divided by the
            summed weights like the rest.
        return_lse: keyword-only; also return the log-sum-exp per row, shaped like
            the unreduced loss, in float32 (float64 for float64 logits).
        inplace_backward: keyword-only; the backward writes the gradient into ``input``'s
            memory instead of a new tensor (saves one logits-sized buffer). After
            ``backward()`` the tensor holds the gradient, not the logits: do not read it again
            (e.g. for accuracy). Another op that saved it for its own backward is caught by
            torch's in-place version check, which raises. Logits whose rows overlap or are
            not contiguous along the class dimension fall back to the out-of-place backward;
            (N, C, d1, ..., dk) inputs are copied to rows first, so they gain nothing.
        check_targets: keyword-only; check class indices on the host even for GPU tensors
            (one device synchronisation). CPU tensors are always checked. Unchecked
            out-of-range indices give a NaN loss, never an out-of-bounds access.
    Returns:
        The loss: a scalar for "mean"/"sum", else the target's batch shape; in the input's
        dtype. With ``return_lse``, ``(loss, lse)``.
    Raises:
        TypeError: non-floating logits, or a target that is neither integer nor floating.
        ValueError: shapes that do not fit (both named), bad weight, reduction or smoothing.
        IndexError: a class index outside [0, C) that is not ``ignore_index``.
    """
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    check_floating(input, "cross_entropy input")
    if input.dim() == 0:
        raise ValueError("cross_entropy input must have a class dimension, got a 0-d tensor")

    n_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    batch_shape = () if input.dim() == 1 else (input.shape[0], *input.shape[2:])
    logits = _class_dim_last(input)

    if target.is_floating_point():
        if ignore_index >= 0:
            raise ValueError(
                f"ignore_index={ignore_index} is not supported for probability (floating) "
                "targets; as in torch, only a negative ignore_index (which does nothing) is"
            )
        if target.shape != input.shape:
            raise ValueError(
                f"probability target shape {tuple(target.shape)} does not match "
                f"input shape {tuple(input.shape)}"
            )
        target_rows = _class_dim_last(target)
    elif target.dtype in _INTEGER_DTYPES:
        if target.shape != batch_shape:
            raise ValueError(
                f"class-index target shape {tuple(target.shape)} does not fit input shape "
                f"{tuple(input.shape)} (expected {tuple(batch_shape)})"
            )
        target_rows = target.reshape(-1).to(torch.int64)
        if check_targets:
            _ce.check_class_indices(target_rows, n_classes, ignore_index)
    else:
        raise TypeError(
            "cross_entropy target must hold class indices (an integer dtype) or class "
            f"probabilities (a floating dtype), got {target.dtype}"
        )

    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "cross_entropy is not differentiable with respect to weight (as in torch); "
            "pass weight.detach()"
        )

    loss, lse, _ = torch.ops.triton_softmax.cross_entropy.default(
        logits,
        target_rows,
        weight,
        ignore_index,
        float(label_smoothing),
        float(z_loss),
        inplace_backward and _ce.rows_writable(logits),
    )

    if reduction == "none":
        out = loss.reshape(batch_shape)
    elif reduction == "sum":
        out = loss.sum()
    elif target_rows.is_floating_point():
        out = loss.mean()
    else:
        counted = target_rows != ignore_index
        if weight is None:
            denominator = counted.sum()
        else:
            safe = target_rows.clamp(0, n_classes - 1)
            denominator = (weight.to(loss.dtype)[safe] * counted).sum()
        out = loss.sum() / denominator
    out = out.to(input.dtype)
    if return_lse:
        return out, lse.reshape(batch_shape)
    return out


def _class_dim_last(t: torch.Tensor) -> torch.Tensor:
    """(C,) -> (1, C); (N, C) as is; (N, C, d1, ..., dk) -> (N*d1*...*dk, C)."""
    if t.dim() == 1:
        return t.unsqueeze(0)
    if t.dim() == 2:
        return t
    return t.movedim(1, -1).reshape(-1, t.shape[1])
