"""Vocab-parallel cross-entropy over ``torch.distributed``: the classes sharded across ranks.

Rank r of ``process_group`` holds classes [start_r, stop_r) of the head: contiguous, in rank
order, any sizes (V need not divide by the world size). Targets are global class indices (or,
for probability targets, the rank's slice of the probabilities, like its logits); class
``weight`` is the full (V,) vector on every rank, as in unsharded code.

Each rank runs the single-device op on its shard, which gives per row its local loss
``loss_r = sum_{j in r} w_j q_j (lse_r - x_j)``, log-sum-exp ``lse_r`` and target mass
``S_r = sum_{j in r} w_j q_j`` (the smoothing term already over the global class count; a
target on another rank contributes nothing here). They merge exactly:

    lse  = log sum_r exp(lse_r)
    loss = sum_r [loss_r + S_r (lse - lse_r)]  (+ z_loss lse^2),     S = sum_r S_r

Communication per call (world size P, N rows, 4-byte floats; 8 for fp64):
    forward:  one all_gather of (loss_r, lse_r, S_r): 3 N floats from each rank (12 N P bytes
              received per rank), plus, the first time a group and shard size are seen, one
              all_gather of the shard sizes (P int64, read on the host and cached).
    backward: none for the logits' gradient (each rank's is its slice: p_j (g (S + 2 z lse) +
              g_lse) - g r_j from the merged lse and S); the fused linear version all-reduces
              its input gradient (N H floats).
No other host synchronisation. The collectives are torch.distributed's eager ones: under
torch.compile they are graph breaks.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

#: (process group, rank, local class count) -> (start, total classes), from one all_gather.
_LAYOUTS: dict[tuple[object, int, int], tuple[int, int]] = {}


def shard_layout(group, local_classes: int, device: torch.device) -> tuple[int, int]:
    """(first class of this rank, total classes) of a head sharded over ``group`` in rank order.

    The shard sizes are gathered once per (group, local size) and cached: a head's shards do
    not change size between calls.
    """
    key = (group, dist.get_rank(group), local_classes)
    if key not in _LAYOUTS:
        world = dist.get_world_size(group)
        mine = torch.tensor([local_classes], dtype=torch.int64, device=device)
        sizes = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(sizes, mine, group=group)
        sizes = [int(s) for s in sizes]
        rank = dist.get_rank(group)
        _LAYOUTS[key] = (sum(sizes[:rank]), sum(sizes))
    return _LAYOUTS[key]


def merge_shards(local: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge every rank's (loss_r, lse_r, S_r) [3, N] into the full problem's per-row
    (loss without z-loss, lse, S); one all_gather."""
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local.contiguous(), group=group)
    loss_r, lse_r, mass_r = torch.stack(gathered, dim=1)  # [3, P, N]
    lse = torch.logsumexp(lse_r, dim=0)
    # S_r = 0 (nothing of the row's target here, no smoothing) must not meet lse - lse_r = nan.
    shift = torch.where(mass_r == 0, 0.0, mass_r * (lse - lse_r))
    return (loss_r + shift).sum(dim=0), lse, mass_r.sum(dim=0)


def finish_rows(loss, lse, target, total_classes, ignore_index, z_loss) -> torch.Tensor:
    """z-loss on the merged lse, zero for ignored rows, NaN for class indices outside the full
    problem's [0, V) (no rank holds them, so no rank saw them as bad)."""
    if target.is_floating_point():
        return loss + z_loss * lse * lse if z_loss else loss
    counted = target != ignore_index
    bad = counted & ((target < 0) | (target >= total_classes))
    if z_loss:
        loss = loss + z_loss * lse * lse
    return torch.where(bad, math.nan, torch.where(counted, loss, 0.0))


def global_stats(lse: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """The single-device backward's stats (m, log d, S) for the merged problem: p = exp(x - lse)
    with m = lse, log d = 0."""
    return torch.stack([lse, torch.zeros_like(lse), mass]).contiguous()


def local_target(target: torch.Tensor, start: int, stop: int, ignore_index: int):
    """Class indices relative to this rank's first class; ``ignore_index`` as it is; another
    rank's class as an index outside this shard that is not ``ignore_index`` (the sharded ops
    read it as "held elsewhere"). Probabilities as they are."""
    if target.is_floating_point():
        return target
    elsewhere = -1 if ignore_index != -1 else -2
    local = torch.where((target >= start) & (target < stop), target - start, elsewhere)
    return torch.where(target == ignore_index, target, local)


def local_weight(weight, start: int, local_classes: int, total_classes: int):
    if weight is None:
        return None
    if weight.shape != (total_classes,):
        raise ValueError(
            f"with process_group, weight is the full (V,) = ({total_classes},) vector of "
            f"class weights on every rank, got {tuple(weight.shape)}"
        )
    return weight[start : start + local_classes]


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-row (loss, lse) of logits sharded by class over ``group``; gradients for the
    local logits only, with no collective in the backward."""

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, group):
        start, total = shard_layout(group, logits.shape[1], logits.device)
        local_t = local_target(target, start, start + logits.shape[1], ignore_index)
        local_w = local_weight(weight, start, logits.shape[1], total)
        loss_r, lse_r, stats_r = torch.ops.triton_softmax.cross_entropy.default(
            logits, local_t, local_w, ignore_index, label_smoothing, 0.0, softcap, False, total
        )
        loss, lse, mass = merge_shards(torch.stack([loss_r, lse_r, stats_r[2]]), group)
        loss = finish_rows(loss, lse, target, total, ignore_index, z_loss)
        ctx.save_for_backward(logits, local_t, local_w, global_stats(lse, mass))
        ctx.options = (ignore_index, label_smoothing, z_loss, softcap, total)
        ctx.set_materialize_grads(False)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        logits, local_t, local_w, stats = ctx.saved_tensors
        if grad_loss is None:
            grad_loss = torch.zeros_like(stats[0])
        grad = torch.ops.triton_softmax.cross_entropy_backward.default(
            grad_loss, grad_lse, logits, local_t, local_w, stats, *ctx.options
        )
        return grad, None, None, None, None, None, None, None


class VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """Per-row (loss, lse) of ``input @ linear_weight.T + linear_bias`` with the head sharded by
    class over ``group``; the input's gradient is all-reduced, the head's stays local."""

    @staticmethod
    def forward(
        ctx, input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing,
        z_loss, softcap, group,
    ):  # fmt: skip
        start, total = shard_layout(group, linear_weight.shape[0], input.device)
        local_t = local_target(target, start, start + linear_weight.shape[0], ignore_index)
        local_w = local_weight(weight, start, linear_weight.shape[0], total)
        loss_r, lse_r, stats_r = torch.ops.triton_softmax.linear_cross_entropy.default(
            input, linear_weight, linear_bias, local_t, local_w, ignore_index, label_smoothing,
            0.0, softcap, total,
        )  # fmt: skip
        loss, lse, mass = merge_shards(torch.stack([loss_r, lse_r, stats_r[2]]), group)
        loss = finish_rows(loss, lse, target, total, ignore_index, z_loss)
        ctx.save_for_backward(
            input, linear_weight, linear_bias, local_t, local_w, global_stats(lse, mass)
        )
        ctx.options = (ignore_index, label_smoothing, z_loss, softcap, total)
        ctx.group = group
        ctx.set_materialize_grads(False)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        input, linear_weight, linear_bias, local_t, local_w, stats = ctx.saved_tensors
        if grad_loss is None:
            grad_loss = torch.zeros_like(stats[0])
        needs = list(ctx.needs_input_grad[:3])
        needs[0] = True  # every rank takes part in the all-reduce below
        grad_input, grad_weight, grad_bias = (
            torch.ops.triton_softmax.linear_cross_entropy_backward.default(
                grad_loss, grad_lse, input, linear_weight, linear_bias, local_t, local_w,
                stats, *ctx.options, needs,
            )
        )  # fmt: skip
        dist.all_reduce(grad_input, group=ctx.group)
        return (
            grad_input if ctx.needs_input_grad[0] else None,
            grad_weight if needs[1] else None,
            grad_bias if needs[2] else None,
            None, None, None, None, None, None, None,
        )  # fmt: skip
