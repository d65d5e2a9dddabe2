"""Test setup: without a GPU the Triton kernels run through Triton's CPU interpreter.

`TRITON_INTERPRET=1` must be set before triton is imported, so this runs before any test module
imports triton_softmax. With a CUDA device present the same tests run on compiled kernels.
"""

import os
import zlib


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return torch.cuda.is_available()


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402  (after TRITON_INTERPRET is set)
import torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: One tolerance table per dtype, for results compared with a float64 torch reference
#: computed on the same (rounded) inputs.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),
}


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs per test, reproducible per test name (crc32: hash() is salted).
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
