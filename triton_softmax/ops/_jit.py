"""Triton helpers the kernels share: the online log-sum-exp kept per lane (arXiv 1805.02867,
Alg. 3, one exponential per element) and its merge across lanes, and tanh for soft-capping
(the interpreter has no libdevice)."""

from __future__ import annotations

import triton
import triton.language as tl

#: log2(e): exp(x) = exp2(x * LOG2E), which compiles to one multiply and ex2.approx.ftz in fp32.
LOG2E = tl.constexpr(1.4426950408889634)
#: ln(2): log(x) = log2(x) * LN2.
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def online_logsumexp_lanes(m, d, x):
    """One step of the online log-sum-exp kept per lane: ``m``, ``d`` and ``x`` have one shape
    ([BLOCK_M, BLOCK_N] in a streamed loop), and each lane keeps its own running max ``m`` and
    sum ``d`` = sum exp(x - m) over the values it has seen. No reduction across lanes, hence no
    barrier inside the loop; :func:`logsumexp_lanes_combine` merges the lanes once after it.

    One exponential per element: of exp(m - m_new) and exp(x - m_new) one is 1, so
    e = exp(-|x - m|) and d_new = d e + 1 when x is the new max, d + e otherwise. A lane that
    has seen only -inf keeps m = -inf and d = 0 (-inf - -inf would be NaN). NaN in ``x``
    makes d NaN. fp32 uses exp2 with log2(e) folded into the scale (ex2.approx.ftz); fp64
    stays fp64.

    Returns:
        (m_new, d_new).
    """
    m_new = tl.maximum(m, x)
    e = tl.exp2(-tl.abs(x - m) * LOG2E)
    d_new = tl.where(x > m, d * e + 1.0, d + e)
    d_new = tl.where(m_new == float("-inf"), d, d_new)
    return m_new, d_new


@triton.jit
def finite_or_zero(m):
    """``m`` where finite-or-+inf, 0 where it is -inf: the shift of a lane or row that has seen
    only -inf (its sum is 0 then, so any shift is exact, and 0 avoids -inf - -inf)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def logsumexp_lanes_combine(m, d):
    """Merge per-lane (m, d) of :func:`online_logsumexp_lanes` over axis 1.

    Returns:
        (row max M, M or 0 for an all -inf row, the row's sum of exp(x - that shift)).
    """
    row_max = tl.max(m, axis=1)
    shift = finite_or_zero(row_max)
    row_sum = tl.sum(d * tl.exp2((m - shift[:, None]) * LOG2E), axis=1)
    return row_max, shift, row_sum


#: tanh's odd Taylor coefficients, tanh y = y (1 + c1 y^2 + c2 y^4 + ...): below
#: TANH_SERIES_BELOW, 5 of them (fp32) or 10 (fp64) leave a truncation error under one unit in
#: the last place (at most 0.6 ulp in fp32, 0.98 ulp in fp64 at |y| = 0.25, checked against
#: mpmath).
_TANH_C1 = tl.constexpr(-1.0 / 3.0)
_TANH_C2 = tl.constexpr(2.0 / 15.0)
_TANH_C3 = tl.constexpr(-17.0 / 315.0)
_TANH_C4 = tl.constexpr(62.0 / 2835.0)
_TANH_C5 = tl.constexpr(-1382.0 / 155925.0)
_TANH_C6 = tl.constexpr(21844.0 / 6081075.0)
_TANH_C7 = tl.constexpr(-929569.0 / 638512875.0)
_TANH_C8 = tl.constexpr(6404582.0 / 10854718875.0)
_TANH_C9 = tl.constexpr(-443861162.0 / 1856156927625.0)
TANH_SERIES_BELOW = tl.constexpr(0.25)


@triton.jit
def tanh(y):
    """tanh of fp32 or fp64 ``y`` (the interpreter has no libdevice), accurate to a few units
    in the last place for every y; used for logit soft-capping, c tanh(z / c).

    |y| >= 0.25: (1 - e) / (1 + e) with e = exp(-2|y|) <= 0.61, so 1 - e cancels at most
    1.3 bits, and large |y| saturates to +-1 without inf / inf. |y| < 0.25: the odd Taylor
    series in Horner form, where 1 - e would cancel without bound (a relative error of
    eps / |y|: 0.36 on the fp32 loss at a cap of 1e8).

    e = exp2(-2 log2(e) |y|), as the other kernels take exponentials: fp32 compiles to one
    ex2.approx.ftz.f32 (tl.exp's ex2.approx.f32 adds a denormal fix-up; a flushed e only
    occurs at |y| > 43, where t rounds to 1 either way); fp64 stays fp64 (libdevice exp2).
    """
    a = tl.abs(y)
    e = tl.exp2(a * (-2.0 * LOG2E))
    t = (1.0 - e) / (1.0 + e)
    y2 = y * y
    if y.dtype == tl.float64:
        p = _TANH_C9 * y2 + _TANH_C8
        p = p * y2 + _TANH_C7
        p = p * y2 + _TANH_C6
        p = p * y2 + _TANH_C5
    else:
        p = tl.full(y.shape, _TANH_C5, y.dtype)
    p = p * y2 + _TANH_C4
    p = p * y2 + _TANH_C3
    p = p * y2 + _TANH_C2
    p = p * y2 + _TANH_C1
    series = y + y * (y2 * p)
    return tl.where(a < TANH_SERIES_BELOW, series, tl.where(y < 0, -t, t))
