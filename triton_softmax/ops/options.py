"""What a cross-entropy computes beyond its tensors (logits, targets, class weights), as one
value passed through the Python layers: the functional API builds it once from torch-style
arguments, and the launchers, the plain-torch math, the fused linear chunks and the
vocab-parallel code take it whole.

The registered ops keep flat schemas (torch.library infers them from Python signatures, and
a schema holds scalars, not objects): every cross-entropy op takes the six fields right after
its tensors, in the order below, as ``*options.flat()``, and rebuilds the value with
``CEOptions(*those six)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class CEOptions:
    """Options of a cross-entropy over rows of logits; the defaults are torch's.

    Attributes:
        ignore_index: rows whose class index equals it cost 0 and get no gradient (class-index
            targets; any int64).
        label_smoothing: eps in [0, 1], torch's formula (weighted classes included).
        z_loss: coefficient >= 0 of lse**2 added to each counted row's loss.
        softcap: 0 for none, else c > 0: the loss is taken on c tanh(logits / c).
        temperature: T > 0: the (capped) logits are divided by T before everything else.
        total_classes: 0, or the full problem's class count when the logits are one rank's
            shard of the classes (``triton_softmax.distributed``): smoothing spreads over it,
            and class indices outside the shard belong to other ranks.

    On the kernel paths label_smoothing, z_loss, softcap and 1 / temperature are compile-time
    constants (exact in fp64; a zero one, or T = 1, costs nothing): each distinct value compiles
    its own kernel specialisation once.

    Raises:
        ValueError: a value outside the ranges above (the functional API checks the user's
            arguments first, in torch's terms; this guards direct calls of the ops).
    """

    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float = 0.0
    temperature: float = 1.0
    total_classes: int = 0

    def __post_init__(self) -> None:
        for name, low, zero in (
            ("label_smoothing", 0.0, True),
            ("z_loss", 0.0, True),
            ("softcap", 0.0, True),
            ("temperature", 0.0, False),
        ):
            value = getattr(self, name)
            if not ((value >= low if zero else value > low) and value < math.inf):
                raise ValueError(f"CEOptions.{name} is out of range: {value!r}")
        if self.label_smoothing > 1.0:
            raise ValueError(f"CEOptions.label_smoothing must be at most 1: {self.label_smoothing}")
        if self.total_classes < 0:
            raise ValueError(f"CEOptions.total_classes must be >= 0: {self.total_classes}")

    def flat(self) -> tuple[int, float, float, float, float, int]:
        """The fields in order: the registered ops' six option arguments."""
        return tuple(getattr(self, f.name) for f in fields(self))

    @property
    def inv_temperature(self) -> float:
        """1 / T for the kernels (exactly 1.0 when T = 1)."""
        return 1.0 / self.temperature

    def smoothing_per_class(self, n_classes: int) -> float:
        """eps / C, with C the full problem's class count when sharded."""
        return self.label_smoothing / (self.total_classes or n_classes)
