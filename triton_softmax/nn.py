"""``torch.nn`` modules over the functional API: same constructor arguments as torch's."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import _reduction

from triton_softmax import functional as F

__all__ = ["Softmax", "LogSoftmax", "CrossEntropyLoss"]


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

    Takes torch's constructor arguments, plus keyword-only ``z_loss``, ``return_lse``,
    ``inplace_backward`` and ``check_targets`` (see :func:`triton_softmax.cross_entropy`);
    with ``return_lse=True`` the module returns ``(loss, lse)``.
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
        z_loss: float = 0.0,
        return_lse: bool = False,
        inplace_backward: bool = False,
        check_targets: bool = False,
    ) -> None:
        if size_average is not None or reduce is not None:
            reduction = _reduction.legacy_get_string(size_average, reduce)
        super().__init__(weight, None, ignore_index, None, reduction, label_smoothing)
        self.z_loss = z_loss
        self.return_lse = return_lse
        self.inplace_backward = inplace_backward
        self.check_targets = check_targets

    def forward(
        self, input: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return F.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            return_lse=self.return_lse,
            inplace_backward=self.inplace_backward,
            check_targets=self.check_targets,
        )
