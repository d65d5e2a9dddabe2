"""Registered torch ops (namespace ``triton_softmax``) and what they are made of.

Importing this package registers ``torch.ops.triton_softmax.*``. One op family per module
(``softmax``, ``cross_entropy``, ``cross_entropy_reduced``, ``linear_cross_entropy``: launchers
and registered ops), its Triton kernels beside it (``softmax_kernels``,
``cross_entropy_kernels``), and one module per shared role: ``tiles`` (the launch tables),
``options`` (``CEOptions``), ``_jit`` (shared jit helpers), ``_checks`` (validation),
``_torch_math`` (the plain-torch math), ``_device`` (which path a tensor takes).
"""

from triton_softmax.ops import (  # noqa: F401  (registers the ops)
    cross_entropy,
    cross_entropy_reduced,
    linear_cross_entropy,
    softmax,
)
