"""The plain-torch math, in one place: what the kernels compute, written with torch's functions.

It serves the CPU without Triton's interpreter (``kernel_path(x) == "torch"``): the ops' plain
paths (:func:`softmax_forward`, :func:`softmax_backward`, :func:`cross_entropy_rows`,
:func:`cross_entropy_gradient`: the kernels' outputs, stats included, so that a model trained
on a GPU runs anywhere), and the functional API's :func:`cross_entropy`, torch's own
``F.cross_entropy`` with the extras (z-loss, softcap, temperature, lse, entropy) composed from
torch ops, which also computes under torch.func transforms and double backward. The formulas
are the kernels' (``cross_entropy_kernels``); torch's reductions (:func:`reduce`,
:func:`mean_denominator`) and its loss dtype (:func:`loss_dtype`) are written once here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from triton_softmax.ops._device import accumulator_dtype
from triton_softmax.ops.options import CEOptions

# --------------------------------------------------------------------------------------
# Softmax
# --------------------------------------------------------------------------------------


def softmax_forward(x: torch.Tensor, log: bool) -> torch.Tensor:
    """(Log-)softmax over the last dimension, accumulated in fp32 (fp64 for fp64)."""
    plain = torch.log_softmax if log else torch.softmax
    return plain(x, -1, dtype=accumulator_dtype(x.dtype)).to(x.dtype).contiguous()


def softmax_backward(y: torch.Tensor, grad_y: torch.Tensor, log: bool) -> torch.Tensor:
    """Input gradient of (log-)softmax from its output ``y``: y (dy - sum(y dy)), or
    dy - exp(y) sum(dy) for log-softmax."""
    acc = accumulator_dtype(y.dtype)
    y_acc, dy = y.to(acc), grad_y.to(acc)
    if log:
        grad_x = dy - y_acc.exp() * dy.sum(-1, keepdim=True)
    else:
        grad_x = y_acc * (dy - (y_acc * dy).sum(-1, keepdim=True))
    return grad_x.to(y.dtype).contiguous()


# --------------------------------------------------------------------------------------
# Cross-entropy rows, as the kernels: per-row loss, lse, stats (m, log d, S), entropy
# --------------------------------------------------------------------------------------


def transformed(logits: torch.Tensor, options: CEOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, tanh(z / c)): the logits z in the accumulator dtype, soft-capped (c tanh(z / c))
    and then tempered (/ T) as ``options`` say; the tanh for the cap's derivative, or None
    without a cap."""
    x = logits.to(accumulator_dtype(logits.dtype))
    t = None
    if options.softcap > 0:
        t = torch.tanh(x / options.softcap)
        x = options.softcap * t
    if options.temperature != 1.0:
        x = x / options.temperature
    return x, t


def target_terms(target, w, counted, n_classes, options: CEOptions, acc):
    """Class indices: (here = the target class is in these logits, the index clamped into
    them, (1 - eps) w_t where here else 0)."""
    here = counted & (target >= 0) & (target < n_classes)
    safe = target.clamp(0, n_classes - 1)
    w_target = torch.ones(target.shape, dtype=acc, device=target.device) if w is None else w[safe]
    return here, safe, torch.where(here, (1.0 - options.label_smoothing) * w_target, 0.0)


def _expected_shift(shifted: torch.Tensor, log_d: torch.Tensor) -> torch.Tensor:
    """E_p[x - m] per row, p = exp(shifted - log d); a -inf logit (p = 0) adds 0."""
    p = torch.exp(shifted - log_d[:, None])
    return torch.where(p == 0, 0.0, p * shifted).sum(1)


def cross_entropy_rows(logits, target, weight, options: CEOptions, loss, lse, stats, entropy=None):
    """The cross-entropy forward kernel's outputs for 2-D logits, written into loss, lse and
    stats (and the entropy into ``entropy`` when given)."""
    acc = loss.dtype
    n_classes = logits.shape[1]
    x, _ = transformed(logits, options)
    m = x.amax(dim=1)
    m_shift = torch.where(m == -math.inf, 0.0, m)
    shifted = x - m_shift[:, None]
    log_d = shifted.logsumexp(dim=1)
    lse.copy_(m_shift + log_d)
    is_index = target.dtype == torch.int64
    if entropy is not None:
        entropy.copy_(log_d - _expected_shift(shifted, log_d))
        if is_index:
            entropy.masked_fill_(target == options.ignore_index, 0.0)
    w = None if weight is None else weight.to(acc)
    smooth = options.smoothing_per_class(n_classes)
    if is_index:
        counted = target != options.ignore_index
        here, safe, hot = target_terms(target, w, counted, n_classes, options, acc)
        picked = log_d - shifted.gather(1, safe[:, None]).squeeze(1)
        per_row = torch.where(here, hot * picked, 0.0)  # a target on another shard: nothing
        mass = hot
        if options.label_smoothing > 0:
            minus_log_p = log_d[:, None] - shifted
            if w is None:
                per_row = per_row + smooth * minus_log_p.sum(1)
                mass = mass + smooth * n_classes
            else:
                per_row = per_row + smooth * (minus_log_p * w).sum(1)
                mass = mass + smooth * w.sum()
    else:
        counted = None
        r = target.to(acc) * (1.0 - options.label_smoothing) + smooth
        if w is not None:
            r = r * w
        # -sum_j r_j log p_j, with 0 * inf = NaN where torch has it.
        per_row = (r * (log_d[:, None] - shifted)).sum(1)
        mass = r.sum(1)
    if options.z_loss != 0:
        per_row = per_row + options.z_loss * lse * lse
    if counted is not None:
        per_row = torch.where(counted, per_row, 0.0)
        mass = torch.where(counted, mass, 0.0)
    loss.copy_(per_row)
    stats[0], stats[1], stats[2] = m, log_d, mass


def cross_entropy_gradient(
    grad_loss,
    grad_lse,
    logits,
    target,
    weight,
    stats,
    options: CEOptions,
    out,
    grad_entropy=None,
    entropy=None,
):
    """The cross-entropy backward kernel: the logits' gradient from the forward's stats,
    written into ``out``."""
    acc = stats.dtype
    if target.dtype == torch.int64 and out.dtype == acc and grad_entropy is None:
        # In place in ``out``, no [M, C] temporary: p = exp((u - m) - log d), then one scale.
        m, log_d, mass = stats
        u, t = transformed(logits, options)
        p = torch.sub(u, m[:, None], out=out).sub_(log_d[:, None]).exp_()
        counted = target != options.ignore_index
        g = torch.where(counted, grad_loss.to(acc), 0.0) / options.temperature
        factor = row_scale(g, counted, mass, m, log_d, options)
        if grad_lse is not None:
            factor = factor + grad_lse.to(acc) / options.temperature
        _index_gradient_in_place(
            p, factor, g, target, weight, options, t, zero_ignored=grad_lse is None
        )
        return
    n_classes = logits.shape[1]
    m, log_d, mass = stats
    w = None if weight is None else weight.to(acc)
    smooth = options.smoothing_per_class(n_classes)
    is_index = target.dtype == torch.int64
    counted = target != options.ignore_index if is_index else torch.ones_like(m, dtype=torch.bool)
    g = torch.where(counted, grad_loss.to(acc), 0.0)
    p_scale = row_scale(g, counted, mass, m, log_d, options)
    if grad_lse is not None:
        p_scale = p_scale + grad_lse.to(acc)
    x, t = transformed(logits, options)
    p = torch.exp((x - m[:, None]) - log_d[:, None])
    grad = p * p_scale[:, None]
    if is_index:
        _, safe, hot = target_terms(target, w, counted, n_classes, options, acc)
        grad.scatter_add_(1, safe[:, None], (-g * hot)[:, None])
        if options.label_smoothing > 0:
            grad -= g[:, None] * (smooth if w is None else smooth * w)
    else:
        r = target.to(acc) * (1.0 - options.label_smoothing) + smooth
        grad -= g[:, None] * (r if w is None else r * w)
    if grad_entropy is not None:  # dH/dx_k = -p_k (x_k - E[x]), E[x] - m = log d - H
        h_scale = torch.where(counted, grad_entropy.to(acc), 0.0)
        spread = p * ((x - m[:, None]) - (log_d - entropy)[:, None])
        grad -= h_scale[:, None] * torch.where(p == 0, 0.0, spread)
    if options.temperature != 1.0:
        grad /= options.temperature
    if t is not None:
        grad *= 1.0 - t * t
    if grad_lse is None:
        grad = torch.where(counted[:, None], grad, 0.0)
    out.copy_(grad)


def cross_entropy_rows_and_gradient(
    logits, target, weight, options: CEOptions, loss, lse, stats, grad_out, grad_scale
):
    """:func:`cross_entropy_rows`, and the gradient of ``grad_scale * sum(loss)`` (a 0-d
    tensor) written into ``grad_out``, which may be ``logits`` itself: the forward kernel with
    WRITE_GRAD.

    Class indices into an accumulator-dtype ``grad_out`` (what the fused linear chunks and
    fp32 / fp64 logits give) take five passes over the logits and no [M, C] temporary: the row
    max, exp(u - m) written into ``grad_out``, its row sums, one scale by g S / d, and the
    smoothing's subtraction (only with smoothing); the target's -g w_t is one element a row.
    The general forward then backward reads and writes the rows about a dozen times;
    everything else takes it.
    """
    n_rows, n_classes = logits.shape
    acc = loss.dtype
    general = target.dtype != torch.int64 or grad_out.dtype != acc
    # An infinite class weight meets a 0 of u - m in the smoothing's sum here: inf * 0 = NaN
    # where torch's per-class form gives inf.
    if general or (weight is not None and not bool(weight.isfinite().all())):
        cross_entropy_rows(logits, target, weight, options, loss, lse, stats)
        upstream = grad_scale.reshape(()).expand(n_rows)
        cross_entropy_gradient(upstream, None, logits, target, weight, stats, options, grad_out)
        return
    u, t = transformed(logits, options)
    counted = target != options.ignore_index
    w = None if weight is None else weight.to(acc)
    here, safe, hot = target_terms(target, w, counted, n_classes, options, acc)
    m = u.amax(dim=1)
    m_shift = torch.where(m == -math.inf, 0.0, m)
    u_target = u.gather(1, safe[:, None]).squeeze(1)
    smooth = options.smoothing_per_class(n_classes)
    shifted = torch.sub(u, m_shift[:, None], out=grad_out)  # grad_out may be u itself
    if smooth:  # sum_j w_j (u_j - m) (no large terms cancel) and sum_j w_j
        shifted_sum = shifted.sum(1) if w is None else torch.mv(shifted, w)
        w_sum = torch.tensor(float(n_classes), dtype=acc) if w is None else w.sum()
    e = shifted.exp_()
    d = e.sum(1)
    log_d = d.log()
    lse.copy_(m_shift + log_d)
    per_row = torch.where(here, hot * (log_d - (u_target - m_shift)), 0.0)
    mass = hot
    if smooth:  # smooth * sum_j w_j (lse - u_j) = smooth (W log d - sum_j w_j (u_j - m))
        per_row = per_row + smooth * (w_sum * log_d - shifted_sum)
        mass = mass + smooth * w_sum
    if options.z_loss != 0:
        per_row = per_row + options.z_loss * lse * lse
    loss.copy_(torch.where(counted, per_row, 0.0))
    mass = torch.where(counted, mass, 0.0)
    stats[0], stats[1], stats[2] = m, log_d, mass
    g = torch.where(counted, grad_scale.reshape(()).to(acc), 0.0) / options.temperature
    factor = row_scale(g, counted, mass, m, log_d, options) / d  # p = e / d
    _index_gradient_in_place(e, factor, g, target, weight, options, t, zero_ignored=True)


def _index_gradient_in_place(p, factor, g, target, weight, options: CEOptions, t, zero_ignored):
    """Class indices: the gradient dL/dz = (p factor - g r) (1 - t^2) written over ``p``
    ([M, C], the probabilities up to a per-row factor), r = (1 - eps) w_t [j == t] + eps / C w_j;
    ``factor`` and ``g`` per row, with 1 / T folded in; ``t`` the cap's tanh or None; rows whose
    target is ignore_index exactly 0 with ``zero_ignored`` (even where the row gives NaN)."""
    n_classes = p.shape[1]
    w = None if weight is None else weight.to(p.dtype)
    counted = target != options.ignore_index
    _, safe, hot = target_terms(target, w, counted, n_classes, options, p.dtype)
    p.mul_(factor[:, None])
    p.scatter_add_(1, safe[:, None], (-g * hot)[:, None])
    smooth = options.smoothing_per_class(n_classes)
    if smooth and w is None:
        p.sub_(g[:, None] * smooth)
    elif smooth:
        p.addcmul_(g[:, None], w[None, :], value=-smooth)
    if t is not None:
        p.mul_(1.0 - t * t)
    ignored = ~counted
    if zero_ignored and bool(ignored.any()):
        p[ignored] = 0.0


def target_gradient(logits, target, weight, stats, options: CEOptions, grad_loss):
    """Probability targets: d loss / d q_j = -(1 - eps) w_j log p_j times each row's upstream
    gradient, from the forward's stats, in the target's dtype."""
    log_p = (transformed(logits, options)[0] - stats[0, :, None]) - stats[1, :, None]
    w = 1.0 if weight is None else weight.to(stats.dtype)
    grad = -(1.0 - options.label_smoothing) * w * log_p * grad_loss[:, None]
    return grad.to(target.dtype)


# --------------------------------------------------------------------------------------
# torch's reductions and dtypes
# --------------------------------------------------------------------------------------


#: Ops that torch's autocast runs in float32, by device type (torch's autocast op lists:
#: CUDA runs softmax, log_softmax and cross_entropy in float32; the CPU only cross_entropy).
AUTOCAST_FLOAT32 = {"cuda": ("softmax", "log_softmax", "cross_entropy"), "cpu": ("cross_entropy",)}


def runs_in_float32(name: str, dtype: torch.dtype, device_type: str) -> bool:
    """Whether torch's autocast (enabled now on ``device_type``) computes op ``name`` of a
    16-bit ``dtype`` in float32."""
    return (
        dtype in (torch.float16, torch.bfloat16)
        and name in AUTOCAST_FLOAT32.get(device_type, ())
        and torch.is_autocast_enabled(device_type)
    )


def autocast_float32(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 where torch's autocast would compute op ``name`` in float32."""
    return t.float() if runs_in_float32(name, t.dtype, t.device.type) else t


def loss_dtype(input: torch.Tensor, target: torch.Tensor) -> torch.dtype:
    """torch's dtype for a cross-entropy's loss: the logits' (class indices) or the promoted
    dtype of logits and probabilities; float32 for 16-bit ones under torch.autocast."""
    dtype = input.dtype
    if target.is_floating_point():
        dtype = torch.promote_types(dtype, target.dtype)
    return torch.float32 if runs_in_float32("cross_entropy", dtype, input.device.type) else dtype


def row_scale(g, counted, mass, m, log_d, options: CEOptions) -> torch.Tensor:
    """The factor of p in a row's gradient, g (S + 2 z lse), 0 for rows that do not count
    (the kernels' ``_row_scale``)."""
    return torch.where(counted, g * (mass + 2.0 * options.z_loss * (m + log_d)), 0.0)


def mean_denominator(target, weight, ignore_index: int, n_classes: int, dtype) -> torch.Tensor:
    """torch's divisor for a mean over class-index targets: the summed class weights of the
    counted targets (their count without weights), 0-d in ``dtype``."""
    counted = target != ignore_index
    if weight is None:
        return counted.sum().to(dtype)
    safe = target.clamp(0, max(n_classes - 1, 0))
    return (weight.to(dtype)[safe] * counted).sum()


def reduce(per_row, target, weight, reduction: str, n_classes: int, options: CEOptions):
    """torch's reduction of per-row losses (already weighted by the target's class weight).
    A mean with a z-loss and no counted weight is NaN (undefined), not the z-loss over 0."""
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if target.is_floating_point():
        return per_row.mean()
    denominator = mean_denominator(target, weight, options.ignore_index, n_classes, per_row.dtype)
    mean = per_row.sum() / denominator  # torch's: 0/0 is NaN, x/0 is inf
    if options.z_loss:
        mean = torch.where(denominator != 0, mean, math.nan)
    return mean


def reduce_entropy(entropy, target, ignore_index: int, reduction: str):
    """Per-row entropies (0 for ignored rows) reduced over the counted rows, unweighted."""
    if reduction == "none":
        return entropy
    if reduction == "sum":
        return entropy.sum()
    if target.is_floating_point():
        return entropy.mean()
    return entropy.sum() / (target != ignore_index).sum()


def reduced_outputs(
    loss, lse, entropy, target, weight, reduction, n_classes, options, batch_shape, out_dtype,
    return_lse,
):  # fmt: skip
    """Per-row (loss, lse, entropy or None) shaped to ``batch_shape``, the loss and entropy
    reduced as torch would and cast to ``out_dtype``: what the functional API returns.
    ``target`` has the batch shape (class indices) or the logits' (probabilities)."""
    out = reduce(loss.reshape(batch_shape), target, weight, reduction, n_classes, options)
    if entropy is not None:
        entropy = reduce_entropy(
            entropy.reshape(batch_shape), target, options.ignore_index, reduction
        ).to(out_dtype)
    return outputs(out.to(out_dtype), lse.reshape(batch_shape), entropy, return_lse)


def outputs(loss, lse, entropy, return_lse: bool):
    """loss, (loss, lse), (loss, entropy) or (loss, lse, entropy): what was asked for."""
    if entropy is None:
        return (loss, lse) if return_lse else loss
    return (loss, lse, entropy) if return_lse else (loss, entropy)


# --------------------------------------------------------------------------------------
# The functional API's cross-entropy on torch's functions
# --------------------------------------------------------------------------------------


def cross_entropy(
    input,
    target,
    weight,
    reduction: str,
    options: CEOptions,
    return_lse: bool = False,
    return_entropy: bool = False,
):
    """``F.cross_entropy`` in torch's layouts ((C,), (N, C), (N, C, d1, ...)), with the
    extras composed from torch ops; differentiable to any order and under torch.func."""
    out_dtype = loss_dtype(input, target)
    ignore_index, label_smoothing = options.ignore_index, options.label_smoothing
    if options.softcap or options.temperature != 1.0:  # in fp32 at least, as the kernels
        wide = input.to(accumulator_dtype(input.dtype))
        if options.softcap:
            wide = options.softcap * torch.tanh(wide / options.softcap)
        input = wide / options.temperature if options.temperature != 1.0 else wide
    if weight is not None and weight.dtype != input.dtype:
        weight = weight.to(input.dtype)  # torch wants them alike; the kernels take any
    # Positional, in F.cross_entropy's order (weight, size_average, ignore_index, reduce,
    # reduction, label_smoothing): keyword passing costs a measurable share at 4 x 3.
    if not options.z_loss and not return_lse and not return_entropy:
        out = F.cross_entropy(
            input, target, weight, None, ignore_index, None, reduction, label_smoothing
        )
        return out if out.dtype == out_dtype else out.to(out_dtype)
    is_index = not target.is_floating_point()
    class_dim = 0 if input.dim() == 1 else 1
    wide = input.to(accumulator_dtype(input.dtype))
    if wide.shape[class_dim] > 0:
        # lse = m + lse(x - m), m the row max without a gradient: its backward then takes
        # exp((x - m) - lse(x - m)) of small numbers, where exp(x - lse) would lose the fp32
        # ulp of lse (1e-3 at |x| ~ 1e4) in every probability (the z-loss's gradient).
        shift = wide.detach().amax(dim=class_dim, keepdim=True)
        shift = torch.where(shift.isfinite(), shift, 0.0)
        lse = (wide - shift).logsumexp(dim=class_dim) + shift.squeeze(class_dim)
    else:
        lse = wide.logsumexp(dim=class_dim)
    loss = F.cross_entropy(input, target, weight, None, ignore_index, None, "none", label_smoothing)
    if options.z_loss and not is_index:
        loss = loss + options.z_loss * lse * lse
    elif options.z_loss:
        loss = loss + torch.where(target != ignore_index, options.z_loss * lse * lse, 0.0)
    out = reduce(loss, target, weight, reduction, input.shape[class_dim], options)
    entropy = None
    if return_entropy:
        log_p = input.to(lse.dtype).log_softmax(dim=class_dim)
        p = log_p.exp()
        # -sum p log p with 0 log 0 = 0; the where keeps the gradient of a p = 0 class finite.
        entropy = -(p * torch.where(p == 0, 0.0, log_p)).sum(dim=class_dim)
        if is_index:
            entropy = torch.where(target != ignore_index, entropy, 0.0)
        entropy = reduce_entropy(entropy, target, ignore_index, reduction).to(out_dtype)
    return outputs(out.to(out_dtype), lse, entropy, return_lse)
