"""triton-softmax: online softmax, log-softmax and cross-entropy in Triton.

Drop-ins for ``torch.nn.functional.softmax / log_softmax / cross_entropy`` and the matching
``torch.nn`` modules. Which implementation a tensor takes is told by :func:`kernel_path`.

The public names are imported on first use (PEP 562), so ``import triton_softmax.export.runtime``
(the onnxruntime serving wrapper) imports neither torch nor triton. The ``torch.ops.triton_softmax``
ops are registered when ``triton_softmax.functional`` (or ``triton_softmax.ops``) is imported,
which the first use of any name below does.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_LAZY = {
    "softmax": "triton_softmax.functional",
    "log_softmax": "triton_softmax.functional",
    "cross_entropy": "triton_softmax.functional",
    "linear_cross_entropy": "triton_softmax.functional",
    "Softmax": "triton_softmax.nn",
    "LogSoftmax": "triton_softmax.nn",
    "CrossEntropyLoss": "triton_softmax.nn",
    "LinearCrossEntropyLoss": "triton_softmax.nn",
    "kernel_path": "triton_softmax.ops._device",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
