"""``torch.nn`` modules over the functional API: same constructor arguments as torch's."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import _reduction

from triton_softmax import functional as F
from triton_softmax.ops._checks import checked_softcap, checked_temperature, checked_z_loss

__all__ = ["Softmax", "LogSoftmax", "CrossEntropyLoss", "LinearCrossEntropyLoss"]


class Softmax(nn.Softmax):
    """Drop-in for :class:`torch.nn.Softmax` computed by :func:`triton_softmax.softmax`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.softmax(input, self.dim, _stacklevel=5)


class LogSoftmax(nn.LogSoftmax):
    """Drop-in for :class:`torch.nn.LogSoftmax` computed by :func:`triton_softmax.log_softmax`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(input, self.dim, _stacklevel=5)


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """Drop-in for :class:`torch.nn.CrossEntropyLoss` computed by
    :func:`triton_softmax.cross_entropy`.

    Takes torch's constructor arguments, plus keyword-only ``softcap``, ``z_loss``,
    ``return_lse``, ``inplace_backward``, ``check_targets``, ``process_group``, ``temperature``
    and ``return_entropy`` (see :func:`triton_softmax.cross_entropy`; ``softcap``, ``z_loss``
    and ``temperature`` are checked here); with ``return_lse=True`` the module returns
    ``(loss, lse)``, with ``return_entropy=True`` ``(loss, entropy)``, with both
    ``(loss, lse, entropy)``.
    """

    def __init__(
        self,
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
    ) -> None:
        if size_average is not None or reduce is not None:
            reduction = _reduction.legacy_get_string(size_average, reduce)
        super().__init__(weight, None, ignore_index, None, reduction, label_smoothing)
        checked_softcap(softcap)
        self.softcap = softcap
        self.z_loss = checked_z_loss(z_loss)
        self.return_lse = return_lse
        self.inplace_backward = inplace_backward
        self.check_targets = check_targets
        self.process_group = process_group
        self.temperature = checked_temperature(temperature)
        self.return_entropy = return_entropy

    def forward(
        self, input: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return F.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            softcap=self.softcap,
            z_loss=self.z_loss,
            return_lse=self.return_lse,
            inplace_backward=self.inplace_backward,
            check_targets=self.check_targets,
            process_group=self.process_group,
            temperature=self.temperature,
            return_entropy=self.return_entropy,
        )


class LinearCrossEntropyLoss(nn.Module):
    """Drop-in for :class:`torch.nn.LinearCrossEntropyLoss` (torch >= 2.13) computed by
    :func:`triton_softmax.linear_cross_entropy`: a classifier head and its loss in one, never
    holding the logits.

    Same constructor arguments and parameters as torch's (``self.linear`` holds the head as an
    ``nn.Linear`` of ``num_classes * prod(out_features)`` outputs; ``self.weight`` the class
    weights), plus keyword-only ``softcap``, ``z_loss``, ``return_lse``, ``process_group``
    (this rank's shard of the head: ``num_classes`` is then the local class count),
    ``temperature`` and ``return_entropy`` (as :class:`CrossEntropyLoss`'s).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: torch.Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        options=None,
        softcap: float | None = None,
        z_loss: float = 0.0,
        return_lse: bool = False,
        process_group=None,
        temperature: float = 1.0,
        return_entropy: bool = False,
    ) -> None:
        super().__init__()
        if label_smoothing < 0.0 or label_smoothing > 1.0:  # as torch's: NaN passes (no smoothing)
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        if weight is not None and process_group is None and weight.shape != (num_classes,):
            raise ValueError(f"weight must have shape ({num_classes},), got {tuple(weight.shape)}")
        self.register_buffer("weight", weight)
        self.num_classes = num_classes
        self.out_features = tuple(out_features)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.options = options
        self.softcap = softcap
        self.z_loss = z_loss
        self.return_lse = return_lse
        self.process_group = process_group
        self.temperature = checked_temperature(temperature)
        self.return_entropy = return_entropy
        self.linear = nn.Linear(
            in_features,
            math.prod(self.out_features, start=num_classes),
            bias=bias,
            device=device,
            dtype=dtype,
        )

    def forward(
        self, input: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        shape = (self.num_classes, *self.out_features)
        bias = self.linear.bias
        return F.linear_cross_entropy(
            input,
            self.linear.weight.reshape(*shape, self.linear.in_features),
            target,
            linear_bias=None if bias is None else bias.reshape(shape),
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            options=self.options,
            softcap=self.softcap,
            z_loss=self.z_loss,
            return_lse=self.return_lse,
            process_group=self.process_group,
            temperature=self.temperature,
            return_entropy=self.return_entropy,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
            f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
            f"reduction={self.reduction}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, options={self.options}, "
            f"softcap={self.softcap}, z_loss={self.z_loss}, temperature={self.temperature}"
        )
