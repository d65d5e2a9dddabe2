"""Where an op runs and how a launch is made: the kernel path a tensor takes (compiled Triton,
Triton's interpreter, or plain torch), the launch context, dtype rules, 2-D rows."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

KernelPath = Literal["triton", "triton-interpreter", "torch"]

#: Floating dtypes the kernels accept; the kernels accumulate in fp32 (fp64 for fp64).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Devices Triton compiles the kernels for.
TRITON_DEVICES = ("cuda",)


@triton.jit
def _probe_kernel():
    # Never launched. Whether triton made it an InterpretedFunction tells whether
    # TRITON_INTERPRET=1 was set when this package's kernels were defined.
    pass


def kernels_interpreted() -> bool:
    """True when this package's Triton kernels run through Triton's CPU interpreter."""
    return isinstance(_probe_kernel, InterpretedFunction)


def kernel_path(where: torch.Tensor | torch.device | str) -> KernelPath:
    """Which implementation the ops take for a tensor (or a device).

    Returns:
        ``"triton"``: compiled Triton kernels (CUDA devices, NVIDIA or AMD ROCm);
        ``"triton-interpreter"``: the same kernels through Triton's interpreter (set
        ``TRITON_INTERPRET=1`` before triton is first imported; slow, used by the tests);
        ``"torch"``: a CPU tensor without the interpreter, computed by torch's own functions
        (the functional API) or a plain-torch implementation of the same math (the ops), so a
        model trained on a GPU runs anywhere.
    Raises:
        ValueError: for a device no path serves (``meta`` tensors hold no data; ``mps`` and
            others have no Triton backend).
    """
    device = where.device if isinstance(where, torch.Tensor) else torch.device(where)
    if kernels_interpreted():
        if device.type in ("cpu", *TRITON_DEVICES):
            return "triton-interpreter"
    elif device.type == "cpu":
        return "torch"
    elif device.type in TRITON_DEVICES:
        return "triton"
    raise ValueError(
        f"no kernel path for device {device.type!r}: the kernels run on CUDA devices (Triton), "
        "on the CPU (plain torch, or Triton's interpreter with TRITON_INTERPRET=1)"
        + (" ; a meta tensor holds no data to run on" if device.type == "meta" else "")
    )


#: Triton's interpreter keeps global state: launches from several threads must take turns.
_INTERPRETER_LOCK = threading.Lock()


@contextlib.contextmanager
def launching_on(x: torch.Tensor) -> Iterator[None]:
    """Context for a kernel launch on ``x``'s device.

    Compiled kernels: make ``x``'s GPU the current device (Triton launches on the current one).
    Interpreter: one launch at a time, and numpy's warnings about masked-off lanes (the
    interpreter evaluates them too: ``-inf - -inf``, ``log 0``; the kernels never store them)
    silenced for this launch only.
    """
    if kernels_interpreted():
        with _INTERPRETER_LOCK, np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            yield
    elif x.device.type == "cuda":
        with torch.cuda.device(x.device):
            yield
    else:
        yield


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 accumulates in fp64; every other supported dtype in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def triton_accumulator_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` as 2-D rows of its last dimension, unit column stride (copies only if needed)."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


def class_dim_last(t: torch.Tensor) -> torch.Tensor:
    """torch's cross-entropy layouts as rows of classes: (C,) -> (1, C); (N, C) as is;
    (N, C, d1, ..., dk) -> (N*d1*...*dk, C)."""
    if t.dim() == 1:
        return t.unsqueeze(0)
    if t.dim() == 2:
        return t
    return t.movedim(1, -1).reshape(-1, t.shape[1])
