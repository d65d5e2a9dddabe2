"""Vocab-parallel cross-entropy over ``torch.distributed``: the classes sharded across ranks.

Rank r of ``process_group`` holds classes [start_r, stop_r) of the head: contiguous, in rank
order, any sizes, 0 included (V need not divide by the world size, and may be smaller than
it). Targets are global class indices (or, for probability targets, the rank's slice of the
probabilities, like its logits); class ``weight`` is the full (V,) vector on every rank, as in
unsharded code.

Each rank runs the single-device op on its shard, which gives per row its local loss
``loss_r = sum_{j in r} w_j q_j (lse_r - x_j)``, log-sum-exp ``lse_r`` and target mass
``S_r = sum_{j in r} w_j q_j`` (the smoothing term already over the global class count; a
target on another rank contributes nothing here; a rank without classes has loss_r = S_r = 0,
lse_r = -inf). They merge exactly:

    lse  = log sum_r exp(lse_r)
    loss = sum_r [loss_r + S_r (lse - lse_r)]  (+ z_loss lse^2),     S = sum_r S_r

With ``return_entropy`` each rank also sends E_r[x] = lse_r - H_r, the mean of its (tempered)
logits under its own softmax: H = lse - sum_r exp(lse_r - lse) E_r[x] (one more float per row
in the same all_gather), so every rank gets the full-vocabulary entropy.

The op on a shard never sees the caller's ``ignore_index``, which may be one of its local
class indices: ignored rows reach it as ``LOCAL_IGNORED`` and another rank's class as
``HELD_ELSEWHERE``, two distinct negative indices.

Checked across ranks on every call (``check_ranks``, one all_gather of 22 int64 per rank):
the shard sizes (gathered every call: nothing is cached, so heads of any layout can share a
group), and that every rank passes the same function, row count, batch shape, feature count,
logits' and target's dtypes, ignore_index, reduction, label_smoothing, z_loss, softcap,
temperature, ``return_entropy``, class weights' shape and ``check_targets``; a counted class
index outside [0, V) on any rank raises IndexError on every rank. ``check_targets=True`` adds
checksums of the class-index targets and of the class weights' bits (O(N + V) work on the
device, no extra collective): targets that differ raise ValueError on every rank instead of
giving each rank a different, wrong loss. Probability targets are each rank's own slice, so
they are not compared. A disagreement raises the same error on every rank, and the group stays
usable.

Communication per call (world size P, N rows, 4-byte floats; 8 for fp64):
    forward:  one all_gather of 22 int64 (176 bytes from each rank, 176 P received), read on
              the host (one host synchronisation per call); one all_gather of (loss_r, lse_r,
              S_r): 3 N floats from each rank (12 N P bytes received per rank), 4 N with
              ``return_entropy``.
    backward: none for the logits' gradient (each rank's is its slice: p_j (g (S + 2 z lse) +
              g_lse) - g r_j from the merged lse and S); the fused linear version all-reduces
              its input gradient (N H floats).
The collectives are torch.distributed's eager ones: under torch.compile they are graph breaks.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import replace

import torch
import torch.distributed as dist

from triton_softmax.ops import _torch_math
from triton_softmax.ops._device import accumulator_dtype, class_dim_last
from triton_softmax.ops.options import CEOptions

#: What the single-device op on a shard sees for a row the caller ignores, and for a target
#: class held by another rank: both negative, so neither can be a local class index (the
#: caller's ``ignore_index`` may be one: pad id 0 is class 0 of rank 0's shard), and distinct.
LOCAL_IGNORED = -1
HELD_ELSEWHERE = -2

#: (prime p < 2**31, multiplier) per target checksum: sum_i (t_i mod p) c_i mod p with
#: c_i = 1 + (i a mod (p - 1)) in [1, p), so each product is below 2**62 and the sum of up to
#: 2**32 of them below 2**63: no int64 overflow. A single changed index changes both sums
#: unless it moved by a multiple of both primes (about 4.6e18).
_CHECKSUMS = ((2_147_483_647, 48_271), (2_147_483_629, 69_621))

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _encode_float(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _decode_float(code: int) -> float:
    return struct.unpack("<d", struct.pack("<q", code))[0]


def _encode_text(text: str) -> int:
    return zlib.crc32(text.encode())


def _show_dtype(code: int) -> str:
    """The torch dtype whose code (``_encode_text`` of its name) is ``code``."""
    dtypes = [d for d in vars(torch).values() if isinstance(d, torch.dtype)]
    return {_encode_text(str(d)): str(d) for d in dtypes}.get(code, "?")


def _choices(*texts: str):
    """Show a code of one of ``texts``."""
    return {_encode_text(t): t for t in texts}.get


def _checksum(values: torch.Tensor) -> list[torch.Tensor]:
    """Two int64 scalars (see ``_CHECKSUMS``) of a 1-D int64 tensor, on its device."""
    i = torch.arange(values.numel(), dtype=torch.int64, device=values.device)
    sums = []
    for prime, multiplier in _CHECKSUMS:
        coefficient = (i * multiplier) % (prime - 1) + 1
        sums.append(((values.remainder(prime) * coefficient) % prime).sum() % prime)
    return sums


def _bits(weight: torch.Tensor) -> torch.Tensor:
    """The class weights' bit patterns as int64 (equal bits, equal weights)."""
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[weight.element_size()]
    return weight.detach().contiguous().reshape(-1).view(as_int).to(torch.int64)


def check_ranks(
    group,
    *,
    function: str,
    batch_shape,
    features: int,
    dtype: torch.dtype,
    local_classes: int,
    target: torch.Tensor,
    weight,
    options: CEOptions,
    reduction: str,
    check_targets: bool,
    device: torch.device,
    return_entropy: bool = False,
) -> tuple[int, int]:
    """Gather what every rank must agree on, with its shard size, in one all_gather; raise
    the same error on every rank where they do not agree.

    Each rank sends 22 int64 (176 bytes; 176 P received): the shard size; the function, row
    count, batch shape, feature count (linear), logits' and target's dtypes, ignore_index,
    reduction, label_smoothing, z_loss, softcap, temperature, ``return_entropy``, class
    weights' shape and ``check_targets``,
    which must be equal on every rank; the smallest and largest counted class index (so a bad
    index on any rank is an IndexError on all); and, with ``check_targets``, two checksums of
    the class-index targets and two of the class weights' bits (else zeros). Reading the
    gathered values is one host synchronisation.

    Args:
        group: the process group the classes are sharded over.
        function: "cross_entropy" or "linear_cross_entropy".
        batch_shape: the shape of the unreduced loss (its product is the row count).
        features: the input's feature count (linear_cross_entropy), else 0.
        dtype: the logits' (linear_cross_entropy: the input's) dtype.
        local_classes: this rank's class count (0 allowed).
        target: global class indices (int64, one per row) or this rank's probabilities.
        weight, options, reduction, return_entropy: the options (``options.total_classes``
            is not read: it is what this call finds out).
        check_targets: also compare checksums of the targets and class weights.
        device: where the gathered tensor lives (the group's backend must accept it).
    Returns:
        (first class of this rank, total classes).
    Raises:
        ValueError: ranks that disagree (naming what and each rank's value), targets or
            class weights that differ under ``check_targets``, no class on any rank, a
            ``weight`` that is not (V,).
        IndexError: a counted class index outside [0, V) on any rank.
    """
    is_index = not target.is_floating_point()
    ignore_index = options.ignore_index
    rows = math.prod(batch_shape)
    weight_shape = "none" if weight is None else str(tuple(weight.shape))
    agreed = [  # (what, code, how to show a code)
        ("the function", _encode_text(function), _choices("cross_entropy", "linear_cross_entropy")),
        ("the row count", rows, str),
        ("the batch shape", _encode_text(str(tuple(batch_shape))), None),
        ("the feature count", features, str),
        ("the logits' dtype", _encode_text(str(dtype)), _show_dtype),
        ("the target's dtype", _encode_text(str(target.dtype)), _show_dtype),
        ("ignore_index", ignore_index, str),
        ("reduction", _encode_text(reduction), _choices("none", "mean", "sum")),
        ("label_smoothing", _encode_float(options.label_smoothing), _decode_float),
        ("z_loss", _encode_float(options.z_loss), _decode_float),
        ("softcap", _encode_float(options.softcap), _decode_float),
        ("temperature", _encode_float(options.temperature), _decode_float),
        ("return_entropy", int(return_entropy), lambda c: str(bool(c))),
        ("the class weights' shape", _encode_text(weight_shape), None),
        ("check_targets", int(check_targets), lambda c: str(bool(c))),
    ]  # fmt: skip
    host = torch.tensor([local_classes] + [code for _, code, _ in agreed], dtype=torch.int64)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    low, high = torch.full_like(zero, _INT64_MAX), torch.full_like(zero, _INT64_MIN)
    if is_index and target.numel():
        counted = target != ignore_index
        low = torch.where(counted, target, _INT64_MAX).amin().to(device)
        high = torch.where(counted, target, _INT64_MIN).amax().to(device)
    sums = [zero] * 4
    if check_targets and is_index:
        sums[:2] = [s.to(device) for s in _checksum(target.reshape(-1))]
    if check_targets and weight is not None:
        sums[2:] = [s.to(device) for s in _checksum(_bits(weight))]
    mine = torch.cat([host.to(device), torch.stack([low, high, *sums])])
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).tolist()  # [P][22], the same on every rank

    where = f"{function} with process_group"
    for column, (what, _, show) in enumerate(agreed, start=1):
        values = [row[column] for row in table]
        if any(v != values[0] for v in values):
            each = [f"rank {r} {show(v)}" for r, v in enumerate(values)] if show else []
            raise ValueError(
                f"{where}: the ranks disagree on {what}" + ": " * bool(each) + ", ".join(each)
            )
    sizes = [row[0] for row in table]
    rank, total = dist.get_rank(group), sum(sizes)
    if total == 0 and rows > 0:
        raise ValueError(f"{where} needs at least one class; every rank's shard is empty")
    if weight is not None and weight.shape != (total,):
        raise ValueError(
            f"with process_group, weight is the full (V,) = ({total},) vector of class weights "
            f"on every rank, got {tuple(weight.shape)}"
        )
    low = min(row[-6] for row in table)
    high = max(row[-5] for row in table)
    for value in (low, high) if low <= high else ():  # low > high: no row counted
        if not 0 <= value < total:
            raise IndexError(
                f"target {value} is out of bounds for {total} classes (expected 0 <= target "
                f"< {total} or target == ignore_index={ignore_index}; the classes are sharded "
                f"{sizes} over the ranks)"
            )
    for what, columns in (("targets", slice(-4, -2)), ("class weights", slice(-2, None))):
        if any(row[columns] != table[0][columns] for row in table):
            raise ValueError(
                f"{where}: the {what} differ across ranks (check_targets=True compares "
                f"checksums); every rank must pass the same {what}"
            )
    return sum(sizes[:rank]), total


def merge_shards(local: torch.Tensor, group) -> tuple[torch.Tensor, ...]:
    """Merge every rank's (loss_r, lse_r, S_r) [3, N] into the full problem's per-row
    (loss without z-loss, lse, S); one all_gather. With a fourth row E_r[x] = lse_r - H_r
    ([4, N]), also the full problem's entropy H = lse - sum_r exp(lse_r - lse) E_r[x]."""
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local.contiguous(), group=group)
    stacked = torch.stack(gathered, dim=1)  # [3 or 4, P, N]
    loss_r, lse_r, mass_r = stacked[:3]
    lse = torch.logsumexp(lse_r, dim=0)
    # S_r = 0 (nothing of the row's target here, no smoothing, no classes) must not meet
    # lse - lse_r = nan (lse_r = -inf on an empty shard, or with every logit -inf).
    shift = torch.where(mass_r == 0, 0.0, mass_r * (lse - lse_r))
    merged = ((loss_r + shift).sum(dim=0), lse, mass_r.sum(dim=0))
    if local.shape[0] == 4:
        share = torch.exp(lse_r - lse)  # rank r's share of the probability; 0 on an empty one
        mean = torch.where(share == 0, 0.0, share * stacked[3]).sum(dim=0)
        merged += (lse - mean,)
    return merged


def empty_shard(n_rows: int, dtype: torch.dtype, device: torch.device, rows: int = 3):
    """(loss_r, lse_r, S_r) [3, N] of a rank that holds no class: 0, -inf, 0; ``rows`` = 4
    adds E_r[x] = 0 (its share of the probability is 0)."""
    zeros = torch.zeros(n_rows, dtype=accumulator_dtype(dtype), device=device)
    return torch.stack([zeros, torch.full_like(zeros, -math.inf), *[zeros] * (rows - 2)])


def finish_rows(loss, lse, target, ignore_index, z_loss) -> torch.Tensor:
    """z-loss on the merged lse, zero for ignored rows (class indices were range-checked by
    ``check_ranks``)."""
    if z_loss:
        loss = loss + z_loss * lse * lse
    if target.is_floating_point():
        return loss
    return torch.where(target != ignore_index, loss, 0.0)


def finish_entropy(entropy: list[torch.Tensor], target, ignore_index):
    """The merged entropy (in a list of one, as ``merge_shards`` leaves it), 0 for ignored
    rows; None without it."""
    if not entropy:
        return None
    if target.is_floating_point():
        return entropy[0]
    return torch.where(target != ignore_index, entropy[0], 0.0)


def merged_rows(ops, args, local_classes, rows, target, options: CEOptions, group, return_entropy):
    """The full problem's per-row (loss, lse, S, entropy or None) from this rank's shard.

    Args:
        ops: (the per-row op, its ``_with_entropy`` twin), e.g. ``cross_entropy``'s.
        args: their arguments for this rank's shard (z-loss 0: it is added on the merged lse).
        local_classes: the classes this rank holds; 0 runs no op (``empty_shard``).
        rows: a tensor with the problem's rows in dim 0, in the logits' dtype and device.
        target, options: the full problem's.
        group: the process group to merge over (one ``all_gather``).
        return_entropy: whether to form and merge the entropy too.
    Returns:
        (loss [N], lse [N], S [N], entropy [N] or None), as :func:`merge_shards`,
        :func:`finish_rows` and :func:`finish_entropy` leave them.
    """
    if not local_classes:
        local = empty_shard(rows.shape[0], rows.dtype, rows.device, 3 + return_entropy)
    elif return_entropy:
        loss_r, lse_r, entropy_r, stats_r = ops[1].default(*args)
        local = torch.stack([loss_r, lse_r, stats_r[2], lse_r - entropy_r])
    else:
        loss_r, lse_r, stats_r = ops[0].default(*args)
        local = torch.stack([loss_r, lse_r, stats_r[2]])
    loss, lse, mass, *entropy = merge_shards(local, group)
    loss = finish_rows(loss, lse, target, options.ignore_index, options.z_loss)
    return loss, lse, mass, finish_entropy(entropy, target, options.ignore_index)


def global_stats(lse: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """The single-device backward's stats (m, log d, S) for the merged problem: p = exp(x - lse)
    with m = lse, log d = 0."""
    return torch.stack([lse, torch.zeros_like(lse), mass]).contiguous()


def local_target(target: torch.Tensor, start: int, stop: int, ignore_index: int):
    """Class indices relative to this rank's first class; ``ignore_index`` as
    ``LOCAL_IGNORED``; another rank's class as ``HELD_ELSEWHERE`` (outside the shard, so the
    sharded ops count the row but find no target logit here). Probabilities as they are."""
    if target.is_floating_point():
        return target
    local = torch.where((target >= start) & (target < stop), target - start, HELD_ELSEWHERE)
    return torch.where(target == ignore_index, LOCAL_IGNORED, local)


def local_weight(weight, start: int, local_classes: int):
    """This rank's slice of the full (V,) class weights (shape checked by ``check_ranks``)."""
    return None if weight is None else weight[start : start + local_classes]


def _shard_options(options: CEOptions, total: int) -> CEOptions:
    """The options of the op on a shard: the shard's view of ignored rows and the full class
    count. Its forward runs without the z-loss (``replace(..., z_loss=0.0)``): that is added on
    the merged lse, and the backward takes it on the merged lse too."""
    return replace(options, ignore_index=LOCAL_IGNORED, total_classes=total)


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-row (loss, lse, entropy or None) of logits sharded by class over ``group``;
    gradients for the local logits only, with no collective in the backward. ``layout`` =
    (start, total) from ``check_ranks``."""

    @staticmethod
    def forward(ctx, logits, target, weight, options: CEOptions, group, layout, return_entropy):
        start, total = layout
        local_classes = logits.shape[1]
        local_t = local_target(target, start, start + local_classes, options.ignore_index)
        local_w = local_weight(weight, start, local_classes)
        shard = _shard_options(options, total)
        args = (logits, local_t, local_w, *replace(shard, z_loss=0.0).flat(), False)
        ops = (
            torch.ops.triton_softmax.cross_entropy,
            torch.ops.triton_softmax.cross_entropy_with_entropy,
        )
        loss, lse, mass, entropy = merged_rows(
            ops, args, local_classes, logits, target, options, group, return_entropy
        )
        ctx.save_for_backward(logits, local_t, local_w, global_stats(lse, mass), entropy)
        ctx.options = shard
        ctx.set_materialize_grads(False)
        return loss, lse, entropy

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_entropy):
        logits, local_t, local_w, stats, entropy = ctx.saved_tensors
        if logits.shape[1] == 0:
            grad = torch.zeros_like(logits)
        else:
            if grad_loss is None:
                grad_loss = torch.zeros_like(stats[0])
            extra = () if grad_entropy is None else (grad_entropy, entropy)
            grad = torch.ops.triton_softmax.cross_entropy_backward.default(
                grad_loss, grad_lse, logits, local_t, local_w, stats, *ctx.options.flat(), *extra
            )
        return grad, None, None, None, None, None, None


class VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """Per-row (loss, lse, entropy or None) of ``input @ linear_weight.T + linear_bias`` with
    the head sharded by class over ``group``; the input's gradient is all-reduced, the head's
    stays local."""

    @staticmethod
    def forward(
        ctx,
        input,
        linear_weight,
        linear_bias,
        target,
        weight,
        options: CEOptions,
        group,
        layout,
        return_entropy,
    ):
        start, total = layout
        local_classes = linear_weight.shape[0]
        local_t = local_target(target, start, start + local_classes, options.ignore_index)
        local_w = local_weight(weight, start, local_classes)
        shard = _shard_options(options, total)
        args = (input, linear_weight, linear_bias, local_t, local_w)
        args = (*args, *replace(shard, z_loss=0.0).flat(), 0)
        ops = (
            torch.ops.triton_softmax.linear_cross_entropy,
            torch.ops.triton_softmax.linear_cross_entropy_with_entropy,
        )
        loss, lse, mass, entropy = merged_rows(
            ops, args, local_classes, input, target, options, group, return_entropy
        )
        ctx.save_for_backward(
            input, linear_weight, linear_bias, local_t, local_w, global_stats(lse, mass), entropy
        )
        ctx.options = shard
        ctx.group = group
        ctx.set_materialize_grads(False)
        return loss, lse, entropy

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_entropy):
        input, linear_weight, linear_bias, local_t, local_w, stats, entropy = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:3])
        if linear_weight.shape[0] == 0:  # no class here: nothing to add to the input's gradient
            grad_input = torch.zeros_like(input)
            grad_weight = torch.zeros_like(linear_weight)
            grad_bias = None if linear_bias is None else torch.zeros_like(linear_bias)
        else:
            if grad_loss is None:
                grad_loss = torch.zeros_like(stats[0])
            needs[0] = True  # every rank takes part in the all-reduce below
            grad_input, grad_weight, grad_bias = (
                torch.ops.triton_softmax.linear_cross_entropy_backward.default(
                    grad_loss,
                    grad_lse,
                    input,
                    linear_weight,
                    linear_bias,
                    local_t,
                    local_w,
                    stats,
                    *ctx.options.flat(),
                    needs,
                    0,
                    grad_entropy,
                    None if grad_entropy is None else entropy,
                )
            )
        dist.all_reduce(grad_input, group=ctx.group)
        return (
            grad_input if ctx.needs_input_grad[0] else None,
            grad_weight if needs[1] else None,
            grad_bias if needs[2] else None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


# --------------------------------------------------------------------------------------
# Entry points of the functional API (``process_group=``): check the ranks, run the shard,
# reduce the merged per-row losses as torch would.
# --------------------------------------------------------------------------------------


def cross_entropy(
    input,
    target,
    weight,
    reduction: str,
    options: CEOptions,
    group,
    check_targets: bool,
    return_lse: bool,
    return_entropy: bool,
):
    """``triton_softmax.cross_entropy(..., process_group=group)`` on validated arguments:
    ``input`` is this rank's logits in any of torch's layouts."""
    is_index = not target.is_floating_point()
    batch_shape = () if input.dim() == 1 else (input.shape[0], *input.shape[2:])
    out_dtype = _torch_math.loss_dtype(input, target)
    input = _torch_math.autocast_float32("cross_entropy", input)
    if not is_index:
        target = _torch_math.autocast_float32("cross_entropy", target)
    logits = class_dim_last(input)
    target = target.reshape(-1) if is_index else class_dim_last(target)
    layout = check_ranks(
        group,
        function="cross_entropy",
        batch_shape=batch_shape,
        features=0,
        dtype=logits.dtype,
        local_classes=logits.shape[1],
        target=target,
        weight=weight,
        options=options,
        reduction=reduction,
        check_targets=check_targets,
        device=logits.device,
        return_entropy=return_entropy,
    )
    loss, lse, entropy = VocabParallelCrossEntropy.apply(
        logits, target, weight, options, group, layout, return_entropy
    )
    if not target.is_floating_point():
        target = target.reshape(batch_shape)
    return _torch_math.reduced_outputs(
        loss, lse, entropy, target, weight, reduction, layout[1], options, batch_shape,
        out_dtype, return_lse,
    )  # fmt: skip


def linear_cross_entropy(
    x,
    linear_weight,
    linear_bias,
    target,
    weight,
    reduction: str,
    options: CEOptions,
    group,
    check_targets: bool,
    return_lse: bool,
    return_entropy: bool,
    batch_shape,
    out_dtype,
):
    """``triton_softmax.linear_cross_entropy(..., process_group=group)`` on validated
    arguments: ``x`` [N, H], this rank's ``linear_weight`` [V_r, H] (and bias), ``target`` [N]
    or this rank's [N, V_r] probabilities."""
    layout = check_ranks(
        group,
        function="linear_cross_entropy",
        batch_shape=batch_shape,
        features=x.shape[1],
        dtype=x.dtype,
        local_classes=linear_weight.shape[0],
        target=target,
        weight=weight,
        options=options,
        reduction=reduction,
        check_targets=check_targets,
        device=x.device,
        return_entropy=return_entropy,
    )
    loss, lse, entropy = VocabParallelLinearCrossEntropy.apply(
        x, linear_weight, linear_bias, target, weight, options, group, layout, return_entropy
    )
    if not target.is_floating_point():
        target = target.reshape(batch_shape)
    return _torch_math.reduced_outputs(
        loss, lse, entropy, target, weight, reduction, layout[1], options, batch_shape,
        out_dtype, return_lse,
    )  # fmt: skip
