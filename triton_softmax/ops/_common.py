"""What every op shares: which path a tensor takes, launch tiles, dtype rules."""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

KernelPath = Literal["triton", "triton-interpreter", "torch"]

#: Floating dtypes the kernels accept; the kernels accumulate in fp32 (fp64 for fp64).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Elements in one program's [BLOCK_M, BLOCK_N] tile when a row is short enough to take
#: several rows per program.
TILE_ELEMENTS = 4096


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
        ``"triton"``: compiled Triton kernels (CUDA, or any device Triton compiles for);
        ``"triton-interpreter"``: the same kernels through Triton's interpreter (set
        ``TRITON_INTERPRET=1`` before triton is first imported; slow, used by the tests);
        ``"torch"``: a CPU tensor without the interpreter, computed by a plain-torch
        implementation of the same math, so a model trained on a GPU runs anywhere.
    """
    device = where.device if isinstance(where, torch.Tensor) else torch.device(where)
    if kernels_interpreted():
        return "triton-interpreter"
    if device.type == "cpu":
        return "torch"
    return "triton"


def device_of(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``x``'s GPU the current device for a launch (Triton launches on the current one)."""
    if x.device.type == "cuda":
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 accumulates in fp64; every other supported dtype in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def triton_accumulator_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def check_floating(x: torch.Tensor, what: str) -> None:
    """TypeError naming the dtype unless ``x`` is a floating dtype the kernels take."""
    if x.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise TypeError(f"{what} must be a floating-point tensor ({names}), got {x.dtype}")


def row_tiles(n_cols: int, max_block_n: int, block_n: int | None = None) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for rows of ``n_cols`` elements.

    BLOCK_N is the row length rounded up to a power of two, capped at ``max_block_n``
    (longer rows are streamed block by block); short rows share a program, BLOCK_M of them,
    so that one program still touches about TILE_ELEMENTS elements. ``block_n`` overrides
    BLOCK_N (tests use it to reach the multi-block paths on small rows).
    """
    if block_n is None:
        block_n = min(triton.next_power_of_2(max(n_cols, 1)), max_block_n)
    block_n = max(block_n, 16)
    block_m = max(1, min(128, TILE_ELEMENTS // block_n))
    return block_m, block_n


def num_warps_for(tile_elements: int) -> int:
    return 4 if tile_elements <= 2048 else 8


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` as 2-D rows of its last dimension, unit column stride (copies only if needed)."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows
