"""Test setup: without a GPU the Triton kernels run through Triton's CPU interpreter.

`TRITON_INTERPRET=1` must be set before triton is imported, so this runs before any test module
imports triton_softmax. With a CUDA device present the same tests run on compiled kernels.
"""

import os


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return torch.cuda.is_available()


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
