"""Test setup: the device the kernel tests run on.

Kernel tests make their tensors on ``conftest.DEVICE`` (or the ``device`` fixture): ``cuda``
when torch sees a GPU, else ``cpu``; ``pytest --device cpu|cuda`` (or the environment variable
TRITON_SOFTMAX_TEST_DEVICE) chooses. So on a GPU machine a bare ``pytest`` runs every kernel
test on CUDA tensors through the compiled kernels, and ``pytest --device cpu`` runs the same
cases through Triton's CPU interpreter, as CI does without a GPU.

On ``cpu`` this sets ``TRITON_INTERPRET=1`` (unless the environment sets it) before any test
module imports triton_softmax, hence triton: Triton reads it when the kernels are defined.
"""

import os
import sys
import zlib

import pytest
import torch

#: The environment variable that chooses the device when ``--device`` is not given.
DEVICE_VARIABLE = "TRITON_SOFTMAX_TEST_DEVICE"

#: Where the kernel tests run; set by pytest_configure from --device (read it after that,
#: at test module import, as ``from conftest import DEVICE``).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: One tolerance table per dtype, for results compared with a float64 torch reference
#: computed on the same (rounded) inputs.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),
}


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help=f"device for the kernel tests (default: ${DEVICE_VARIABLE}, else cuda when "
        "available, else cpu through Triton's interpreter)",
    )


def pytest_configure(config):
    global DEVICE
    chosen = config.getoption("device") or os.environ.get(DEVICE_VARIABLE) or DEVICE
    if chosen not in ("cpu", "cuda"):
        raise pytest.UsageError(f"{DEVICE_VARIABLE}={chosen!r}: expected 'cpu' or 'cuda'")
    if chosen == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: torch sees no CUDA device")
    if chosen == "cpu" and "TRITON_INTERPRET" not in os.environ:
        if any(name.startswith("triton_softmax") for name in sys.modules):
            raise pytest.UsageError(
                "--device cpu needs TRITON_INTERPRET=1 before triton_softmax is imported; "
                "set it in the environment"
            )
        os.environ["TRITON_INTERPRET"] = "1"
    DEVICE = chosen


def pytest_report_header(config):
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    how = "Triton's interpreter" if interpret else "compiled Triton kernels"
    where = torch.cuda.get_device_name() if DEVICE == "cuda" else "the CPU"
    return f"triton-softmax kernel tests: {DEVICE} tensors, {how} ({where})"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs per test, reproducible per test name (crc32: hash() is salted).
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
