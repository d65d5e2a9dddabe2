"""Launch tables: which tile each kernel launches with, in one registry.

A launch picks, from its kernel's table and the row length, BLOCK_N columns (a row that fits one
block is held in registers whole, a longer one streamed in blocks), BLOCK_M rows per program and
the warps (:func:`pick_tile`); the split softmax kernels take a slice per program instead
(:class:`SplitRule`). :data:`LAUNCHES` names every table with the kernel it sizes: the launchers
read it at each call, ``benchmarks/tune.py`` swaps tables in it (:func:`replaced`) and
``benchmarks/compiled_code.py`` compiles every tile it can select.

Every table here is a first guess from register counts (sm_90, no spills:
``benchmarks/results/registers_sm90.md``, asserted by ``tests/test_gpu_compile.py``), not from
timings: no GPU has run them yet, and a GPU sweep (``python -m benchmarks.tune``) should rewrite
them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
import triton

#: Elements in one program's [BLOCK_M, BLOCK_N] tile when a row is short enough to take
#: several rows per program (before a table's BLOCK_M cap).
TILE_ELEMENTS = 4096


class TileRule(NamedTuple):
    """One row of a launch table: rows of up to ``max_cols`` elements (a power of two) take
    column blocks of up to ``block_n`` elements with ``num_warps`` warps, and up to
    ``max_block_m`` rows per program. A row that fits one block (``n_cols <= block_n``) is
    held in registers whole; a longer one is streamed in blocks of ``block_n``.
    ``aligned_only``: the rule applies only to launches that Triton specialises as 16-aligned
    (see :func:`triton_aligned`); other launches fall through to the next rule."""

    max_cols: int
    block_n: int
    num_warps: int
    max_block_m: int
    aligned_only: bool = False


#: A launch table: for each element size in bytes, rules in increasing ``max_cols``; the
#: last rule's ``max_cols`` is UNBOUNDED (it takes every longer row, streamed).
TileTable = dict[int, tuple[TileRule, ...]]

#: ``max_cols`` of a table's last rule.
UNBOUNDED = 1 << 62


class Tile(NamedTuple):
    """What a launch uses: BLOCK_M rows of BLOCK_N columns per program, ``num_warps`` warps;
    ``single_block`` when the whole row fits one block (read once)."""

    block_m: int
    block_n: int
    num_warps: int
    single_block: bool


def triton_aligned(n_cols: int, *rows: torch.Tensor) -> bool:
    """Whether Triton specialises a launch over ``rows`` as 16-aligned: every data pointer a
    multiple of 16 bytes, every row stride and the row length multiples of 16 elements
    (Triton marks such arguments ``tt.divisibility = 16``). Aligned launches load 16-byte
    vectors with one mask bit per vector; others load element by element with one mask bit
    each, which costs registers on long rows."""
    return n_cols % 16 == 0 and all(r.data_ptr() % 16 == 0 and r.stride(0) % 16 == 0 for r in rows)


def pick_tile(
    table: TileTable,
    n_cols: int,
    element_size: int,
    *,
    aligned: bool,
    interpreted: bool = False,
    block_n: int | None = None,
) -> Tile:
    """The tile for rows of ``n_cols`` elements of ``element_size`` bytes, from ``table``.

    BLOCK_N is the row length rounded up to a power of two (at least 16), capped at the rule's
    ``block_n``; BLOCK_M = TILE_ELEMENTS // BLOCK_N rows (at least 1), capped at the rule's
    ``max_block_m``. Under Triton's interpreter (``interpreted``) the cap is not applied:
    there are no registers to spare there, and each program instance costs ~5 ms whatever
    its size, so fewer, larger programs are faster; BLOCK_N and the single-block choice are
    the compiled kernels' own. ``block_n`` overrides BLOCK_N (tests use it to reach the
    streamed paths on short rows).
    """
    rules = table[element_size]
    rule = next(r for r in rules if n_cols <= r.max_cols and (aligned or not r.aligned_only))
    if block_n is None:
        block_n = min(triton.next_power_of_2(max(n_cols, 1)), rule.block_n)
    block_n = max(block_n, 16)
    block_m = max(1, min(128, TILE_ELEMENTS // block_n))
    if not interpreted:
        block_m = min(block_m, rule.max_block_m)
    return Tile(block_m, block_n, rule.num_warps, n_cols <= block_n)


def selectable_tiles(table: TileTable) -> list[tuple[int, Tile, bool]]:
    """Every (element size, tile, aligned) that :func:`pick_tile` can return for compiled
    kernels, ``aligned`` telling which of Triton's two specialisations (16-aligned or not,
    see :func:`triton_aligned`) the tile is launched with. Found by asking ``pick_tile``
    about rows of every power of two, one more, and 16 more (the rules' bounds are powers of
    two, so these reach every BLOCK_N), unaligned, and aligned where the length allows it."""
    found = {}
    for element_size, rules in table.items():
        longest = max(r.max_cols for r in rules if r.max_cols != UNBOUNDED)
        for exponent in range(2 * longest.bit_length()):
            for n_cols in (1 << exponent, (1 << exponent) + 1, (1 << exponent) + 16):
                for aligned in (False, True) if n_cols % 16 == 0 else (False,):
                    tile = pick_tile(table, n_cols, element_size, aligned=aligned)
                    found[(element_size, tile, aligned)] = None
    return list(found)


class SplitRule(NamedTuple):
    """Softmax rows longer than ``above`` elements that the launch table does not hold in one
    block are cut into slices of ``block_n`` elements, one program of ``num_warps`` warps a
    slice, when a row needs at most ``MAX_SLICES`` slices and no more than half the GPU's SMs
    (see ``softmax.plan``)."""

    above: int
    block_n: int
    num_warps: int


# --------------------------------------------------------------------------------------
# Softmax / log-softmax. Each program holds about 8-32 elements per thread. 16-bit rows are
# held as fp32 in registers, so they get fp32's limits (65 536 of them spill with 32 warps).
# The last rule (streamed) serves only rows the split kernels do not take.
# --------------------------------------------------------------------------------------

_SOFTMAX_FORWARD_32 = (
    TileRule(32, 32, 4, 64),
    TileRule(128, 128, 4, 16),
    TileRule(512, 512, 4, 4),
    TileRule(2048, 2048, 8, 1),
    TileRule(8192, 8192, 16, 1),
    TileRule(32768, 32768, 32, 1),  # the longest row held whole: 32 fp32 per thread
    TileRule(UNBOUNDED, 8192, 32, 1),  # streamed, 8 per thread per block
)
_SOFTMAX_64 = (
    TileRule(32, 32, 4, 32),
    TileRule(128, 128, 4, 8),
    TileRule(512, 512, 4, 2),
    TileRule(2048, 2048, 8, 1),
    TileRule(8192, 8192, 16, 1),  # fp64 log-softmax spills at 16 384 with 32 warps
    TileRule(UNBOUNDED, 4096, 16, 1),
)
_SOFTMAX_BACKWARD_32 = (
    *_SOFTMAX_FORWARD_32[:5],
    TileRule(16384, 16384, 32, 1),
    # y and dy of a 32 768-column row fit 64 registers a thread only with 16-byte vector
    # loads (one mask bit per vector): element-wise loads spill, and stream instead.
    TileRule(32768, 32768, 32, 1, aligned_only=True),
    TileRule(UNBOUNDED, 8192, 32, 1),
)
#: Split forward: 4096 values a program, 16 a thread (fp64: 2048, 8 a thread).
_SPLIT_FORWARD = {
    2: SplitRule(32768, 4096, 8),
    4: SplitRule(32768, 4096, 8),
    8: SplitRule(8192, 2048, 8),
}
#: Split backward: y and dy held, 2 x 16 values a thread (fp64: 2 x 8).
_SPLIT_BACKWARD = dict(_SPLIT_FORWARD)

# --------------------------------------------------------------------------------------
# Cross-entropy. Both kernels stream the classes, so a longer row only takes more loop trips.
# The per-row state (running max and sum, target sums, target index and weight, ...) is kept
# once per row a thread holds, so short rows take few rows per program (2-8 elements a
# thread); long rows 8 elements a thread per block: 4096 classes a block with 16 warps in both
# kernels (2048 with 8 warps in fp64). The forward's per-lane state (max, sum and the target
# sums) costs registers per element held: 8192 classes with 32 warps spilled at sm_90 (up to
# 164 B), so it stays at 4096 with 16 warps, as the backward.
# --------------------------------------------------------------------------------------

_CROSS_ENTROPY_32 = (
    TileRule(16, 16, 4, 32),
    TileRule(64, 64, 4, 8),
    TileRule(256, 256, 4, 2),
    TileRule(1024, 1024, 4, 1),
    TileRule(2048, 2048, 8, 1),
    TileRule(4096, 4096, 16, 1),
    TileRule(UNBOUNDED, 4096, 16, 1),
)
_CROSS_ENTROPY_64 = (
    TileRule(16, 16, 4, 16),
    TileRule(64, 64, 4, 4),
    TileRule(1024, 1024, 4, 1),
    TileRule(UNBOUNDED, 2048, 8, 1),
)


class Launch(NamedTuple):
    """A kernel and the table its launcher sizes it from: a :data:`TileTable`, or one
    :class:`SplitRule` per element size (a split kernel)."""

    module: str
    function: str
    table: TileTable | dict[int, SplitRule]


#: Every launch table, by "<op family>.<kernel>": the launchers look a table up here at each
#: call (so a tuning run can swap it, :func:`replaced`).
LAUNCHES: dict[str, Launch] = {
    "softmax.forward": Launch(
        "triton_softmax.ops.softmax_kernels",
        "softmax_forward_kernel",
        {2: _SOFTMAX_FORWARD_32, 4: _SOFTMAX_FORWARD_32, 8: _SOFTMAX_64},
    ),
    "softmax.backward": Launch(
        "triton_softmax.ops.softmax_kernels",
        "softmax_backward_kernel",
        {2: _SOFTMAX_BACKWARD_32, 4: _SOFTMAX_BACKWARD_32, 8: _SOFTMAX_64},
    ),
    "softmax.split_forward": Launch(
        "triton_softmax.ops.softmax_kernels", "softmax_split_forward_kernel", _SPLIT_FORWARD
    ),
    "softmax.split_backward": Launch(
        "triton_softmax.ops.softmax_kernels", "softmax_split_backward_kernel", _SPLIT_BACKWARD
    ),
    "cross_entropy.forward": Launch(
        "triton_softmax.ops.cross_entropy_kernels",
        "cross_entropy_forward_kernel",
        {2: _CROSS_ENTROPY_32, 4: _CROSS_ENTROPY_32, 8: _CROSS_ENTROPY_64},
    ),
    "cross_entropy.backward": Launch(
        "triton_softmax.ops.cross_entropy_kernels",
        "cross_entropy_backward_kernel",
        {2: _CROSS_ENTROPY_32, 4: _CROSS_ENTROPY_32, 8: _CROSS_ENTROPY_64},
    ),
}


def table(name: str):
    """The launch table of kernel ``name`` (a key of :data:`LAUNCHES`), as it is now."""
    return LAUNCHES[name].table


@contextlib.contextmanager
def replaced(name: str, new_table) -> Iterator[None]:
    """Launches of kernel ``name`` use ``new_table`` inside the block (benchmarks/tune.py)."""
    launch = LAUNCHES[name]
    LAUNCHES[name] = launch._replace(table=new_table)
    try:
        yield
    finally:
        LAUNCHES[name] = launch
