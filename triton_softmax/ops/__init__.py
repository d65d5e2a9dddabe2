"""Registered torch ops (namespace ``triton_softmax``): one file per op.

Importing this package registers ``torch.ops.triton_softmax.*``.
"""

from triton_softmax.ops import (  # noqa: F401  (registers the ops)
    cross_entropy,
    linear_cross_entropy,
    softmax,
)
