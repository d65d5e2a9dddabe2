"""triton-softmax: online softmax, log-softmax and cross-entropy in Triton.

Drop-ins for ``torch.nn.functional.softmax / log_softmax / cross_entropy`` and the matching
``torch.nn`` modules. Importing the package registers the ``torch.ops.triton_softmax`` ops.
Which implementation a tensor takes is told by :func:`kernel_path`.
"""

from triton_softmax import ops  # noqa: F401  (registers torch.ops.triton_softmax.*)
from triton_softmax.functional import cross_entropy, log_softmax, softmax
from triton_softmax.nn import CrossEntropyLoss, LogSoftmax, Softmax
from triton_softmax.ops._common import kernel_path

__version__ = "0.1.0"

__all__ = [
    "softmax",
    "log_softmax",
    "cross_entropy",
    "Softmax",
    "LogSoftmax",
    "CrossEntropyLoss",
    "kernel_path",
    "__version__",
]
