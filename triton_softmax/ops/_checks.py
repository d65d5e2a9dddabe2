"""Validation, in one place: what the ops accept (dtypes, shapes, devices, class indices,
writable rows) and what the functional API normalises from torch-style arguments (tensors,
reduction, smoothing, ignore_index, softcap, z_loss, temperature). Each check raises an error
that names the argument and the value."""

from __future__ import annotations

import math
import numbers
import operator

import torch

from triton_softmax.ops._device import SUPPORTED_DTYPES
from triton_softmax.ops.options import CEOptions

#: Integer dtypes of class-index targets (torch wants int64; the others are converted).
INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_floating(x: torch.Tensor | torch.dtype, what: str) -> None:
    """TypeError naming the dtype unless ``x`` (a tensor or a dtype) is one the kernels take."""
    dtype = x if isinstance(x, torch.dtype) else x.dtype
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise TypeError(f"{what} must be a floating-point tensor ({names}), got {dtype}")


def check_cross_entropy_operands(
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


def check_row_vector(vector, name, n_rows, dtype, device) -> None:
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


def check_rows_writable(logits: torch.Tensor) -> None:
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
        check_rows_writable(logits)
    except ValueError:
        return False
    return True


def check_linear_operands(input, linear_weight, linear_bias, target, weight) -> bool:
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
    return check_targets(n_rows, n_classes, input.device, target, weight)


def require_tensor(value, function: str, argument: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{function}(): argument '{argument}' must be a torch.Tensor, got "
            f"{type(value).__name__} (convert it with torch.as_tensor)"
        )


def checked_temperature(temperature) -> float:
    """``temperature`` as a float.

    Raises:
        ValueError: unless it is a positive finite real number (not a bool): 0 or a negative
            value would divide by 0 or flip the distribution, NaN / inf make every loss NaN.
    """
    return checked_number(
        temperature,
        "temperature must be a positive finite real number (the logits are divided by it)",
        zero_allowed=False,
        type_error=ValueError,
    )


def checked_number(value, requirement: str, *, zero_allowed: bool, type_error) -> float:
    """``value`` as a float if it is a finite real number (not a bool) above 0, or at least 0
    with ``zero_allowed``; else ``type_error`` (not a real number) or ValueError, each with
    ``requirement`` ("NAME must be ...") and the value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise type_error(f"{requirement}, got {type(value).__name__} {value!r}")
    number = float(value)
    if not ((number >= 0.0 if zero_allowed else number > 0.0) and number < math.inf):
        raise ValueError(f"{requirement}, got {value!r}")  # NaN fails both comparisons
    return number


def checked_options(
    function,
    target,
    weight,
    reduction,
    label_smoothing,
    ignore_index,
    softcap,
    z_loss,
    temperature,
    batch_shape,
    logits_shape,
) -> tuple[torch.Tensor, torch.Tensor | None, str, CEOptions]:
    """Validate what cross_entropy and linear_cross_entropy share, in torch's terms.

    Returns (target, weight, reduction, options) normalised: class indices as int64 of
    ``batch_shape``, or probabilities of ``logits_shape``; label_smoothing 0.0 when not > 0
    (torch ignores negative and NaN values); softcap 0.0 for none.
    """
    require_tensor(target, function, "target")
    if weight is not None:
        require_tensor(weight, function, "weight")
        check_floating(weight, f"{function} weight")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if label_smoothing > 1.0:
        raise ValueError(f"label_smoothing must be at most 1, got {label_smoothing}")
    label_smoothing = float(label_smoothing) if label_smoothing > 0.0 else 0.0
    try:
        if isinstance(ignore_index, bool):
            raise TypeError
        ignore_index = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}") from None
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index={ignore_index} does not fit in int64")
    softcap = checked_softcap(softcap)
    if target.is_floating_point():
        if ignore_index >= 0:
            raise ValueError(
                f"ignore_index={ignore_index} is not supported for probability (floating) "
                "targets; as in torch, only a negative ignore_index (which does nothing) is"
            )
        if target.shape != logits_shape:
            raise ValueError(
                f"probability target shape {tuple(target.shape)} does not match the logits' "
                f"shape {tuple(logits_shape)}"
            )
    elif target.dtype in INTEGER_DTYPES:
        if target.shape != batch_shape:
            raise ValueError(
                f"class-index target shape {tuple(target.shape)} does not fit logits of shape "
                f"{tuple(logits_shape)} (expected {tuple(batch_shape)})"
            )
        if target.dtype != torch.int64:
            target = target.long()
    else:
        raise TypeError(
            f"{function} target must hold class indices (an integer dtype) or class "
            f"probabilities (a floating dtype), got {target.dtype}"
        )
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{function} is not differentiable with respect to weight (as in torch); "
            "pass weight.detach()"
        )
    options = CEOptions(
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=checked_z_loss(z_loss),
        softcap=softcap,
        temperature=checked_temperature(temperature),
    )
    return target, weight, reduction, options


def checked_softcap(softcap) -> float:
    """``softcap`` as a float, 0.0 for None.

    Raises:
        TypeError: unless it is None or a real number (a bool is not: ``True`` would mean 1.0).
        ValueError: unless the number is positive and finite (0 would divide by 0; None, not
            0, turns capping off).
    """
    if softcap is None:
        return 0.0
    return checked_number(
        softcap,
        "softcap must be a positive finite real number (the cap c in c * tanh(x / c)) or None "
        "for no capping",
        zero_allowed=False,
        type_error=TypeError,
    )


def checked_z_loss(z_loss) -> float:
    """``z_loss`` as a float.

    Raises:
        TypeError: unless it is a real number (not a bool).
        ValueError: unless it is finite and >= 0 (a negative coefficient rewards a large lse;
            NaN or inf would make every loss NaN or inf).
    """
    return checked_number(
        z_loss,
        "z_loss must be a finite real number >= 0 (the coefficient of lse**2)",
        zero_allowed=True,
        type_error=TypeError,
    )
