"""Launch tables: their shape, the tiles they pick, and results on their block boundaries.

The boundaries: the longest row held in one block and one more (streamed), for softmax and
log-softmax forward and backward in each element size, the backward's aligned-only rule (a
32 768-column row held whole only when Triton can load it in 16-byte vectors), and the
cross-entropy class blocks. A few rows each, so that the interpreter stays fast.
"""

import pytest
import torch
from conftest import DEVICE, TOLERANCES

from triton_softmax.ops import cross_entropy as ce_ops
from triton_softmax.ops import softmax as softmax_ops
from triton_softmax.ops import tiles
from triton_softmax.ops.options import CEOptions
from triton_softmax.ops.tiles import (
    TILE_ELEMENTS,
    UNBOUNDED,
    SplitRule,
    Tile,
    pick_tile,
    selectable_tiles,
    triton_aligned,
)

#: The launch tables of TileRules (the split kernels' tables hold one SplitRule a size).
TABLES = [name for name, launch in tiles.LAUNCHES.items() if "split" not in name]
SOFTMAX_FORWARD = tiles.table("softmax.forward")
SOFTMAX_BACKWARD = tiles.table("softmax.backward")
CE_FORWARD = tiles.table("cross_entropy.forward")
CE_BACKWARD = tiles.table("cross_entropy.backward")


def test_the_registry_names_each_kernel_it_sizes():
    for name, launch in tiles.LAUNCHES.items():
        module = __import__(launch.module, fromlist=[launch.function])
        assert hasattr(module, launch.function), name
        split = "split" in name
        assert all(isinstance(rule, SplitRule) == split for rule in launch.table.values()), name


def test_replaced_swaps_a_table_for_the_block_only():
    one_rule = {size: rules[-1:] for size, rules in CE_FORWARD.items()}
    with tiles.replaced("cross_entropy.forward", one_rule):
        assert tiles.table("cross_entropy.forward") is one_rule
    assert tiles.table("cross_entropy.forward") is CE_FORWARD


@pytest.mark.parametrize("name", TABLES)
def test_tables_are_well_formed(name):
    for size, rules in tiles.table(name).items():
        assert size in (2, 4, 8)
        bounds = [r.max_cols for r in rules]
        assert bounds == sorted(bounds) and bounds[-1] == UNBOUNDED, (size, bounds)
        for rule in rules:
            for power in (rule.max_cols, rule.block_n, rule.num_warps, rule.max_block_m):
                assert power == UNBOUNDED or power & (power - 1) == 0, (size, rule)
            assert rule.block_n <= rule.max_cols and 16 <= rule.block_n <= 32768, (size, rule)
            assert 1 <= rule.num_warps <= 32, (size, rule)
        # One rule at each bound (aligned-only rules have an unaligned one after them).
        plain = [r.max_cols for r in rules if not r.aligned_only]
        assert len(plain) == len(set(plain)), (size, rules)


def _tile(table, n_cols, size=4, aligned=True, interpreted=False):
    return pick_tile(table, n_cols, size, aligned=aligned, interpreted=interpreted)


def test_rows_up_to_32768_columns_are_held_in_one_block_with_32_warps():
    fwd, bwd = SOFTMAX_FORWARD, SOFTMAX_BACKWARD
    for size in (2, 4):
        assert _tile(fwd, 32768, size) == Tile(1, 32768, 32, True)
        assert _tile(fwd, 32768, size, aligned=False) == Tile(1, 32768, 32, True)
        assert _tile(fwd, 32769, size) == Tile(1, 8192, 32, False)
        assert _tile(bwd, 32768, size) == Tile(1, 32768, 32, True)
        assert _tile(bwd, 16384, size, aligned=False) == Tile(1, 16384, 32, True)
        # Element-wise loads of y and dy spill at 32 768 columns: streamed instead.
        assert _tile(bwd, 32768, size, aligned=False) == Tile(1, 8192, 32, False)
        assert _tile(bwd, 32769, size) == Tile(1, 8192, 32, False)
    for table in (fwd, bwd):
        assert _tile(table, 8192, 8) == Tile(1, 8192, 16, True)
        assert _tile(table, 8193, 8) == Tile(1, 4096, 16, False)


def test_short_rows_share_a_program_up_to_the_cap_compiled_and_more_interpreted():
    # Compiled: the rule's BLOCK_M cap (per-row state costs registers); interpreted: up to
    # TILE_ELEMENTS per program, as each program instance costs ~5 ms there.
    assert _tile(CE_FORWARD, 10) == Tile(32, 16, 4, True)
    assert _tile(CE_FORWARD, 10, interpreted=True) == Tile(128, 16, 4, True)
    assert _tile(CE_FORWARD, 300, interpreted=True).block_m == TILE_ELEMENTS // 512
    assert _tile(SOFTMAX_FORWARD, 100) == Tile(16, 128, 4, True)
    forced = pick_tile(CE_FORWARD, 100, 4, aligned=True, block_n=16)
    assert forced == Tile(2, 16, 4, False)  # the tests' block_n=16: the rule's warps and cap
    # Cross-entropy streams long rows in 4096-class blocks forward (the per-lane online state
    # spills at 8192 x 32 warps on sm_90) and backward.
    assert _tile(CE_FORWARD, 50257) == Tile(1, 4096, 16, False)
    assert _tile(CE_BACKWARD, 50257) == Tile(1, 4096, 16, False)


def test_selectable_tiles_cover_what_launches_pick():
    found = set(selectable_tiles(SOFTMAX_BACKWARD))
    assert (4, Tile(1, 32768, 32, True), True) in found
    assert (4, Tile(1, 32768, 32, True), False) not in found
    for n_cols in (1, 15, 16, 17, 100, 1000, 5000, 20000, 32768, 40000, 10**6):
        for size in (2, 4, 8):
            for aligned in (False, True) if n_cols % 16 == 0 else (False,):
                tile = _tile(SOFTMAX_BACKWARD, n_cols, size, aligned)
                assert (size, tile, aligned) in found, (n_cols, size, aligned)


def test_triton_aligned():
    x = torch.empty(2, 48, device=DEVICE)
    assert triton_aligned(48, x)
    assert not triton_aligned(47, x[:, :47])  # row length
    assert not triton_aligned(47, x[:, 1:])  # and its data pointer, 4 bytes in
    assert not triton_aligned(32, x[:, 1:33])  # the pointer alone


def _softmax_both_ways(x: torch.Tensor, log: bool) -> None:
    """Forward and backward kernels on ``x`` against torch in float64."""
    tol = TOLERANCES[x.dtype]
    y = softmax_ops.softmax_forward(x, log)
    x_ref = x.double().requires_grad_()
    y_ref = (torch.log_softmax if log else torch.softmax)(x_ref, -1)
    torch.testing.assert_close(y.double(), y_ref, **tol)
    dy = torch.randn_like(y)
    dx = softmax_ops.softmax_backward(y, dy, log)
    # The reference backward from our own output, in float64 (as torch does for 16-bit).
    y64 = y.double()
    if log:
        dx_ref = dy.double() - y64.exp() * dy.double().sum(-1, keepdim=True)
    else:
        dx_ref = y64 * (dy.double() - (y64 * dy.double()).sum(-1, keepdim=True))
    torch.testing.assert_close(dx.double(), dx_ref, **tol)


# Rows of exactly the longest single block, and one more (the first split length: full
# slices then a slice holding one element).
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize(
    "dtype,n_cols",
    [
        (torch.float32, 32768),  # held whole, forward and backward
        (torch.float32, 32769),  # split: 9 slices of 4096, the last with one element
        (torch.bfloat16, 32768),
        (torch.float64, 8192),  # fp64's longest single block
        (torch.float64, 8193),  # split: 5 slices of 2048
    ],
    ids=str,
)
def test_single_block_limits(log, dtype, n_cols):
    _softmax_both_ways((torch.randn(2, n_cols, device=DEVICE) * 3).to(dtype), log)


def test_softmax_plan_splits_rows_past_the_longest_block():
    plan = softmax_ops.plan
    for backward in (False, True):
        for size in (2, 4):
            assert plan(32768, size, backward=backward, aligned=True).path == "one block"
            first = plan(32769, size, backward=backward, aligned=False)
            assert first == ("split", Tile(1, 4096, 8, False), 9)
            assert plan(262144, size, backward=backward, aligned=True).slices == 64
            assert plan(524288, size, backward=backward, aligned=True).slices == 128
            # Past MAX_SLICES, or past the GPU's SMs: streamed.
            assert plan(524289, size, backward=backward, aligned=False).path == "streamed"
            fewer_sms = plan(262144, size, backward=backward, aligned=True, max_slices=63)
            assert fewer_sms.path == "streamed"
        assert plan(8192, 8, backward=backward, aligned=True).path == "one block"
        assert plan(8193, 8, backward=backward, aligned=False) == (
            "split",
            Tile(1, 2048, 8, False),
            5,
        )
        assert plan(262145, 8, backward=backward, aligned=False).path == "streamed"
    # The backward's 32 768 unaligned columns stream (the table's aligned-only rule).
    assert plan(32768, 4, backward=True, aligned=False).path == "streamed"
    # Tests force the paths on short rows.
    assert plan(100, 4, backward=False, aligned=False, block_n=16).path == "streamed"
    assert plan(100, 4, backward=False, aligned=False, block_n=16, split=True).slices == 7
    with pytest.raises(ValueError, match="needs 19 slices of 16"):
        plan(300, 4, backward=False, aligned=False, block_n=16, split=True, max_slices=8)
    assert softmax_ops.slices_allowed(torch.device("cpu")) == softmax_ops.MAX_SLICES


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_backward_at_32768_columns_aligned_or_not(log):
    # The same 32 768 columns, once 16-aligned (held whole) and once 4 bytes off (streamed).
    base = torch.randn(2, 32768 + 16, device=DEVICE) * 3
    aligned, offset = base[:, :32768], base[:, 1:32769]
    for x in (aligned, offset):
        tile = pick_tile(SOFTMAX_BACKWARD, 32768, 4, aligned=triton_aligned(32768, x))
        assert tile.single_block == (x is aligned)
        _softmax_both_ways(x, log)


@pytest.mark.parametrize(
    "dtype,n_classes",
    [
        (torch.float32, 4096),  # the longest row in one block, forward and backward
        (torch.float32, 4097),  # streamed: one block of 8192 forward, 4096 + 1 backward
        (torch.float32, 8193),  # 8192 + 1 forward
        (torch.float64, 2049),  # fp64: blocks of 2048, the second with one class
    ],
    ids=str,
)
@pytest.mark.parametrize("kind", ["index", "probability"])
def test_cross_entropy_class_blocks(dtype, n_classes, kind):
    n = 3
    x = (torch.randn(n, n_classes, device=DEVICE) * 3).to(dtype)
    if kind == "index":
        target = torch.tensor([0, n_classes - 1, -100], device=DEVICE)
    else:
        target = torch.softmax(torch.randn(n, n_classes, device=DEVICE), -1).to(dtype)
    options = CEOptions(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3)
    loss, lse, stats = ce_ops.cross_entropy_forward(x, target, None, options)
    x_ref = x.double().requires_grad_()
    ref_target = target if kind == "index" else target.double()
    loss_ref = torch.nn.functional.cross_entropy(
        x_ref, ref_target, reduction="none", label_smoothing=0.1
    )
    lse_ref = torch.logsumexp(x_ref, -1)
    counted = (
        (target != -100) if kind == "index" else torch.ones(n, dtype=torch.bool, device=DEVICE)
    )
    loss_ref = loss_ref + 1e-3 * lse_ref**2 * counted
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(loss.double(), loss_ref.detach(), **tol)
    torch.testing.assert_close(lse.double(), lse_ref.detach(), **tol)
    upstream = torch.rand(n, device=DEVICE, dtype=loss.dtype)
    grad = ce_ops.cross_entropy_backward(upstream, None, x, target, None, stats, options)
    loss_ref.backward(upstream.double())
    torch.testing.assert_close(grad.double(), x_ref.grad, **tol)
