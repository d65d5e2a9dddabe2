"""Fused linear + cross-entropy: the loss of ``input @ linear_weight.T + linear_bias`` without
ever holding the [N, V] logits, on the vendor's GEMMs. Launchers and torch ops.

One algorithm on every device. The rows go in chunks of R rows; for each chunk c:

    Z_c = X_c W^T (+ b)                      torch.mm / addmm: cuBLAS on CUDA, the CPU's BLAS
    loss, lse, stats of Z_c                  cross_entropy's forward (its Triton kernel on CUDA
                                             and under the interpreter, its plain-torch math on
                                             the plain-torch CPU path)
    Z_c <- dL/dZ_c  (in place)               a mean / sum: the same forward pass, with
                                             ``grad_out=Z_c``; per-row upstream gradients:
                                             cross_entropy's backward with ``out=Z_c``
    grad_input[c]  = Z_c W                   torch.mm
    grad_weight   += Z_c^T X_c               addmm_
    grad_bias     += sum over the rows of Z_c

The cross-entropy math (and its formulas: see ``triton_softmax.ops.cross_entropy``) is that
module's, run on the chunk; soft-capping (z' = c tanh(z / c)) happens inside it. No atomics and no
split reductions anywhere: each output element is written by one GEMM, and the chunks add into
``grad_weight`` in a fixed order, so the gradients are bitwise reproducible run to run on the
same device (with the same chunk size).

Flops, N rows, H features, V classes (the three GEMMs are all the arithmetic that counts):
    mean / sum loss with gradients  6 N V H   (the gradient is formed in the forward, scaled by
                                               the upstream gradient in the backward)
    per-row losses with gradients   8 N V H   (forward 2 N V H; the backward recomputes Z_c)
    forward only                    2 N V H
Bytes beside the inputs and the returned gradients: the chunk buffer, R V s (s = bytes per
element of the input's dtype), reused by every chunk, plus O(N) per-row floats. The
cross-entropy reads the chunk's logits and writes their gradient over them, R V s each (a mean /
sum: one kernel, a read and a write, plus a second read of rows longer than one block that
misses L2, see cross_entropy's byte accounting; per-row: a forward read, then in the backward a
read and a write); the GEMMs read X_c and W and write Z_c and the gradients.

Chunk size R: ``batch_chunk_size`` when the caller gives one (torch's
``LinearCrossEntropyOptions``), else as many rows as fit ``CHUNK_BYTES[device]`` of logits in the
input's dtype, capped at N: 256 MiB on CUDA, which keeps R >= 1024 rows (each GEMM near peak) up to
V = 131072 classes in 16-bit and 65536 in fp32; 32 MiB on the CPU (256 rows at V = 32768 fp32),
where every chunk's GEMMs read all of W and read and write all of grad_weight (V H each): fewer,
larger chunks move less, and the plain-torch cross-entropy of a mean / sum makes five passes over
a chunk (``_torch_math.cross_entropy_rows_and_gradient``), so it gains little from a chunk that
fits a cache. Measured at 8192 x 256 x 32768 fp32 on 2 vCPUs (AMD EPYC): 4 MiB chunks took 1.4x
as long as 32 MiB ones.

``grad_weight`` accumulates in the input's dtype: each chunk's product Z_c^T X_c is formed with
fp32 accumulation inside the GEMM (fp64 for fp64) and rounded once when added, so a 16-bit
``grad_weight`` takes ceil(N / R) roundings (a relative error near sqrt(N / R) * 2^-9 in bf16).
An fp32 accumulator would cost V H 4 more bytes (2.1 GB at V = 128256, H = 4096: as much as the
whole bf16 logits), which is what the chunking exists to avoid; torch's chunked op ("compact")
and Liger (by default) make the same choice. fp32 and fp64 inputs accumulate in their own dtype.
``grad_bias`` accumulates in fp32 (V floats).

Registered ops (input [N, H], linear_weight [V, H], linear_bias [V] or None; ``*options`` the
six of ``CEOptions.flat()``: ignore_index, label_smoothing, z_loss, softcap, temperature,
total_classes):
    torch.ops.triton_softmax.linear_cross_entropy(input, linear_weight, linear_bias, target,
        weight, *options, chunk_rows=0)
        -> (loss [N], lse [N], stats [3, N]), fp32 (fp64 for fp64 inputs); its backward
        recomputes each chunk:
    torch.ops.triton_softmax.linear_cross_entropy_with_entropy(same arguments)
        -> (loss, lse, entropy [N], stats), the entropy of softmax(tempered logits) from the
        same pass over each chunk; differentiable, through the same backward
    torch.ops.triton_softmax.linear_cross_entropy_backward(grad_loss, grad_lse, input,
        linear_weight, linear_bias, target, weight, stats, *options, needs, chunk_rows=0,
        grad_entropy=None, entropy=None)
        -> (grad_input, grad_weight, grad_bias) ((0,)-shaped where not asked for)
    torch.ops.triton_softmax.linear_cross_entropy_reduced(input, linear_weight, linear_bias,
        target, weight, *options, denominator, needs, chunk_rows=0, keep_gradients=False)
        -> (loss [] = sum of the per-row losses / denominator, lse [N], stats [3, N],
            grad_input, grad_weight, grad_bias): the gradients of that loss, formed in the
        forward; its backward scales them by the upstream gradient as cross_entropy_reduced's
        does (``cross_entropy_reduced.rescaled``: in place, and not at all when it is 1, on the
        last backward through the graph; copies when the graph is kept or ``keep_gradients``),
        and recomputes the chunks only for a gradient through the returned lse.
The logits of every op are soft-capped (``softcap`` > 0), then divided by ``temperature``.
Double backward (``create_graph=True``) is supported by recomputing the loss unfused with torch's
own functions inside the backward (it holds the [N, V] logits, as torch's reference does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from triton_softmax.ops import cross_entropy as _ce
from triton_softmax.ops import cross_entropy_reduced as _ce_reduced
from triton_softmax.ops._checks import check_class_indices, check_linear_operands
from triton_softmax.ops._device import accumulator_dtype
from triton_softmax.ops.options import CEOptions

#: Bytes of one chunk's logits (input dtype) by device type; "cpu" for any other device.
CHUNK_BYTES = {"cuda": 256 << 20, "cpu": 32 << 20}


def chunk_rows(
    n_rows: int, n_classes: int, dtype: torch.dtype, device: torch.device, requested: int = 0
) -> int:
    """Rows per chunk: ``requested`` when positive, else as many as fit ``CHUNK_BYTES`` of
    logits; at least 1 and at most ``n_rows`` (1 when there are none)."""
    if requested > 0:
        rows = requested
    else:
        budget = CHUNK_BYTES.get(torch.device(device).type, CHUNK_BYTES["cpu"])
        rows = budget // max(1, n_classes * torch.empty((), dtype=dtype).element_size())
    return max(1, min(rows, n_rows))


class _Chunks:
    """The chunk loop's shared state: the problem, the chunk buffer, and the three GEMMs."""

    def __init__(
        self, input, linear_weight, linear_bias, target, weight, options: CEOptions, rows: int
    ):
        self.input, self.linear_weight, self.linear_bias = input, linear_weight, linear_bias
        self.target, self.weight, self.options = target, weight, options
        n_rows, n_classes = input.shape[0], linear_weight.shape[0]
        self.step = chunk_rows(n_rows, n_classes, input.dtype, input.device, rows)
        self.buffer = input.new_empty(self.step, n_classes)  # reused by every chunk
        self.slices = [slice(i, min(i + self.step, n_rows)) for i in range(0, n_rows, self.step)]

    def logits(self, rows: slice) -> torch.Tensor:
        """Z_c = X_c W^T (+ b) into the chunk buffer, in the input's dtype."""
        out = self.buffer[: rows.stop - rows.start]
        x = self.input[rows]
        if self.linear_bias is None:
            return torch.mm(x, self.linear_weight.t(), out=out)
        return torch.addmm(self.linear_bias, x, self.linear_weight.t(), out=out)

    def forward(self, logits: torch.Tensor, rows: slice, grad_scale=None, entropy=None):
        """(loss, lse, stats) of the chunk; with ``grad_scale`` (each row's upstream gradient,
        0-d), also dL/dZ_c written over ``logits`` in the same pass; with ``entropy`` (the
        chunk's rows of an [N] vector), the entropy written into it in the same pass."""
        return _ce.cross_entropy_forward(
            logits,
            self.target[rows],
            self.weight,
            self.options,
            grad_out=None if grad_scale is None else logits,
            grad_scale=grad_scale,
            entropy_out=entropy,
        )

    def gradient(
        self, logits, rows: slice, grad_loss, grad_lse, stats, grad_entropy=None, entropy=None
    ) -> torch.Tensor:
        """dL/dZ_c written over ``logits`` (cross_entropy's in-place backward)."""
        return _ce.cross_entropy_backward(
            grad_loss,
            grad_lse,
            logits,
            self.target[rows],
            self.weight,
            stats,
            self.options,
            out=logits,
            grad_entropy=grad_entropy,
            entropy=entropy,
        )

    def gradients(self, needs) -> list[torch.Tensor | None]:
        """Buffers for [grad_input, grad_weight, grad_bias], None where not needed; the GEMMs
        write grad_input and the first chunk's grad_weight, so no zero fill there."""
        x, w, b = self.input, self.linear_weight, self.linear_bias
        return [
            x.new_empty(x.shape) if needs[0] else None,
            x.new_empty(w.shape) if needs[1] else None,
            x.new_zeros(w.shape[:1], dtype=accumulator_dtype(x.dtype))
            if needs[2] and b is not None
            else None,
        ]

    def accumulate(self, grad_z, rows: slice, grads, first: bool) -> None:
        """grad_input[c] = dZ W, grad_weight (+)= dZ^T X_c, grad_bias += sum_rows dZ."""
        grad_x, grad_w, grad_b = grads
        if grad_x is not None:
            torch.mm(grad_z, self.linear_weight, out=grad_x[rows])
        if grad_w is not None:
            if first:
                torch.mm(grad_z.t(), self.input[rows], out=grad_w)
            else:
                grad_w.addmm_(grad_z.t(), self.input[rows])
        if grad_b is not None:
            grad_b += grad_z.sum(dim=0, dtype=grad_b.dtype)


def _finish(grads, input) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's gradient outputs: in the input's dtype, (0,)-shaped where not asked for, zero
    when there are no rows (no chunk wrote them)."""
    grad_x, grad_w, grad_b = grads
    if input.shape[0] == 0 and grad_w is not None:
        grad_w.zero_()
    if grad_b is not None:
        grad_b = grad_b.to(input.dtype)
    return tuple(input.new_empty(0) if g is None else g for g in (grad_x, grad_w, grad_b))


def _prepare(input, linear_weight, linear_bias, target, weight, options: CEOptions):
    is_index = check_linear_operands(input, linear_weight, linear_bias, target, weight)
    if is_index and target.device.type == "cpu" and not options.total_classes and input.shape[0]:
        check_class_indices(target, linear_weight.shape[0], options.ignore_index)


def linear_cross_entropy_forward(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    options: CEOptions,
    chunk_rows: int = 0,
    entropy_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy of ``input @ linear_weight.T + linear_bias`` (soft-capped when
    ``softcap > 0``, then divided by ``temperature``), chunk by chunk: one GEMM per chunk, no
    gradient.

    Args:
        input: [N, H] floating; linear_weight: [V, H] and linear_bias: [V] or None, same dtype.
        target: [N] int64 class indices, or [N, V] floating probabilities.
        weight: [V] class weights or None.
        options: as cross_entropy's (:class:`CEOptions`); ``total_classes`` > 0 when
            ``linear_weight`` is one rank's shard of the head.
        chunk_rows: rows per chunk; 0 picks them from ``CHUNK_BYTES``.
        entropy_out: None, or a contiguous [N] tensor of the loss's dtype to write the entropy
            of softmax(tempered logits) into, formed in the same pass as the loss.
    Returns:
        loss [N], lse [N] and stats [3, N] (as cross_entropy's), fp32 (fp64 for fp64 input).
    """
    _prepare(input, linear_weight, linear_bias, target, weight, options)
    loss, lse, stats = _ce.row_outputs(input)
    chunks = _Chunks(input, linear_weight, linear_bias, target, weight, options, chunk_rows)
    for rows in chunks.slices:
        entropy = None if entropy_out is None else entropy_out[rows]
        loss[rows], lse[rows], stats[:, rows] = chunks.forward(
            chunks.logits(rows), rows, entropy=entropy
        )
    return loss, lse, stats


def linear_cross_entropy_backward(
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor | None,
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    stats: torch.Tensor,
    options: CEOptions,
    needs: tuple[bool, bool, bool] = (True, True, True),
    chunk_rows: int = 0,
    grad_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the per-row losses (and of the returned lse and entropy) with respect to
    ``input``,
    ``linear_weight`` and ``linear_bias``, recomputing each chunk's logits (three GEMMs).

    Args:
        grad_loss: [N] upstream gradient of the per-row losses; grad_lse: [N] or None.
        stats: [3, N] from the forward; the rest as in the forward.
        needs: which of (input, linear_weight, linear_bias) gradients to compute; the others
            come back as empty (0,) tensors.
        grad_entropy: [N] upstream gradient of the entropy, or None; entropy: then the
            forward's [N] entropy.
    Returns:
        (grad_input [N, H], grad_weight [V, H], grad_bias [V]) in the input's dtype.
    """
    check_linear_operands(input, linear_weight, linear_bias, target, weight)
    n_rows = input.shape[0]
    acc = accumulator_dtype(input.dtype)
    if stats.shape != (3, n_rows) or stats.dtype != acc:
        raise ValueError(
            f"stats must be the forward's (3, {n_rows}) {acc} tensor, got "
            f"{tuple(stats.shape)} {stats.dtype}"
        )
    chunks = _Chunks(input, linear_weight, linear_bias, target, weight, options, chunk_rows)
    grads = chunks.gradients(needs)
    if grad_entropy is not None and entropy is None:
        raise ValueError("linear_cross_entropy_backward: grad_entropy needs the forward's entropy")
    if any(g is not None for g in grads):
        for k, rows in enumerate(chunks.slices):
            grad_z = chunks.gradient(
                chunks.logits(rows),
                rows,
                grad_loss[rows],
                None if grad_lse is None else grad_lse[rows],
                stats[:, rows].contiguous(),
                None if grad_entropy is None else grad_entropy[rows],
                None if grad_entropy is None else entropy[rows].contiguous(),
            )
            chunks.accumulate(grad_z, rows, grads, first=k == 0)
    return _finish(grads, input)


def linear_cross_entropy_reduced(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    options: CEOptions,
    denominator: torch.Tensor,
    needs: tuple[bool, bool, bool] = (True, True, True),
    chunk_rows: int = 0,
) -> tuple[torch.Tensor, ...]:
    """The summed per-row losses over ``denominator`` (a mean or a sum) and its gradients, in
    one pass over the chunks: three GEMMs per chunk.

    Args:
        options: as :func:`linear_cross_entropy_forward`'s, with ``total_classes`` 0 (the
            vocab-parallel path reduces its merged per-row losses itself).
        denominator: a 0-d tensor: the mean's (summed weights of the counted targets, or the
            row count), or 1 for a sum. Each row's upstream gradient is 1 / denominator.
        needs: which of (input, linear_weight, linear_bias) gradients to form.
        The rest as :func:`linear_cross_entropy_forward`.
    Returns:
        (loss [], lse [N], stats [3, N], grad_input, grad_weight, grad_bias); loss, lse and
        stats in fp32 (fp64 for fp64 input), the gradients in the input's dtype and (0,)-shaped
        where not asked for.
    """
    if options.total_classes:
        raise ValueError("linear_cross_entropy_reduced does not take sharded classes")
    _prepare(input, linear_weight, linear_bias, target, weight, options)
    if denominator.dim() != 0:
        raise ValueError(f"denominator must be a 0-d tensor, got {tuple(denominator.shape)}")
    loss, lse, stats = _ce.row_outputs(input)
    chunks = _Chunks(input, linear_weight, linear_bias, target, weight, options, chunk_rows)
    grads = chunks.gradients(needs)
    # Every row's upstream gradient; the chunk's gradient is written in its forward pass.
    scale = 1.0 / denominator.to(loss.dtype) if any(g is not None for g in grads) else None
    for k, rows in enumerate(chunks.slices):
        logits = chunks.logits(rows)
        loss[rows], lse[rows], stats[:, rows] = chunks.forward(logits, rows, scale)
        if scale is not None:
            chunks.accumulate(logits, rows, grads, first=k == 0)
    total = loss.sum() / denominator.to(loss.dtype)  # torch's: 0/0 is NaN, x/0 is inf
    return (total, lse, stats, *_finish(grads, input))


# --------------------------------------------------------------------------------------
# Registered ops: schema, fake implementation, autograd.
# --------------------------------------------------------------------------------------


def _rows(input, linear_weight, linear_bias, target, weight, options, chunk_rows, entropy):
    """``linear_cross_entropy`` and, with ``entropy``, ``linear_cross_entropy_with_entropy``:
    per-row (loss, lse, stats), or (loss, lse, entropy, stats) with the entropy formed in the
    same pass over each chunk."""
    entropy_out = None
    if entropy:
        entropy_out = input.new_empty(input.shape[0], dtype=accumulator_dtype(input.dtype))
    loss, lse, stats = linear_cross_entropy_forward(
        input, linear_weight, linear_bias, target, weight, options, chunk_rows, entropy_out
    )
    return (loss, lse, stats) if entropy_out is None else (loss, lse, entropy_out, stats)


@torch.library.custom_op("triton_softmax::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    temperature: float,
    total_classes: int,
    chunk_rows: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (loss, lse, stats) of the fused linear + cross-entropy; see the module docstring."""
    options = CEOptions(ignore_index, label_smoothing, z_loss, softcap, temperature, total_classes)
    return _rows(input, linear_weight, linear_bias, target, weight, options, chunk_rows, False)


@torch.library.custom_op("triton_softmax::linear_cross_entropy_with_entropy", mutates_args=())
def linear_cross_entropy_with_entropy_op(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    temperature: float,
    total_classes: int,
    chunk_rows: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (loss, lse, entropy, stats): ``linear_cross_entropy`` plus the entropy of
    softmax(tempered logits), formed in the same pass over each chunk, differentiable."""
    options = CEOptions(ignore_index, label_smoothing, z_loss, softcap, temperature, total_classes)
    return _rows(input, linear_weight, linear_bias, target, weight, options, chunk_rows, True)


@linear_cross_entropy_op.register_fake
def _(input, linear_weight, linear_bias, target, weight, *options):
    check_linear_operands(input, linear_weight, linear_bias, target, weight)
    return _ce.fake_rows(False, input)


@linear_cross_entropy_with_entropy_op.register_fake
def _(input, linear_weight, linear_bias, target, weight, *options):
    check_linear_operands(input, linear_weight, linear_bias, target, weight)
    return _ce.fake_rows(True, input)


@torch.library.custom_op("triton_softmax::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward_op(
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor | None,
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    stats: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    temperature: float,
    total_classes: int,
    needs: list[bool],
    chunk_rows: int = 0,
    grad_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight, grad_bias); (0,)-shaped where ``needs`` says no."""
    options = CEOptions(ignore_index, label_smoothing, z_loss, softcap, temperature, total_classes)
    return linear_cross_entropy_backward(
        grad_loss,
        grad_lse,
        input,
        linear_weight,
        linear_bias,
        target,
        weight,
        stats,
        options,
        tuple(needs),
        chunk_rows,
        grad_entropy,
        entropy,
    )


def _fake_gradients(input, linear_weight, linear_bias, needs):
    need_b = needs[2] and linear_bias is not None
    return (
        input.new_empty(input.shape if needs[0] else (0,)),
        input.new_empty(linear_weight.shape if needs[1] else (0,)),
        input.new_empty(linear_weight.shape[:1] if need_b else (0,)),
    )


@linear_cross_entropy_backward_op.register_fake
def _(grad_loss, grad_lse, input, linear_weight, linear_bias, target, weight, stats, *rest):
    needs = rest[6]  # after the six options
    return _fake_gradients(input, linear_weight, linear_bias, needs)


@torch.library.custom_op("triton_softmax::linear_cross_entropy_reduced", mutates_args=())
def linear_cross_entropy_reduced_op(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    temperature: float,
    total_classes: int,
    denominator: torch.Tensor,
    needs: list[bool],
    chunk_rows: int = 0,
    keep_gradients: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [], lse, stats, grad_input, grad_weight, grad_bias) of a mean or sum; see the module
    docstring. ``keep_gradients``: the backward scales copies (a second backward works)."""
    options = CEOptions(ignore_index, label_smoothing, z_loss, softcap, temperature, total_classes)
    return linear_cross_entropy_reduced(
        input,
        linear_weight,
        linear_bias,
        target,
        weight,
        options,
        denominator,
        tuple(needs),
        chunk_rows,
    )


@linear_cross_entropy_reduced_op.register_fake
def _(input, linear_weight, linear_bias, target, weight, *rest):
    check_linear_operands(input, linear_weight, linear_bias, target, weight)
    needs = rest[7]  # after the six options and the denominator
    loss, lse, stats = _ce.row_outputs(input)
    return (
        loss.new_empty(()),
        lse,
        stats,
        *_fake_gradients(input, linear_weight, linear_bias, needs),
    )


def _creating_graph() -> bool:
    """Whether this backward runs under ``create_graph=True`` (a double backward may follow);
    torch.compile traces backwards with grad mode off, and does not support double backward."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _refuse_target_gradient(ctx) -> None:
    if ctx.needs_input_grad[3]:
        raise NotImplementedError(
            "linear_cross_entropy has no gradient with respect to probability targets "
            "(it would need the [N, V] log-probabilities); detach the target"
        )


def _unfused_gradients(ctx, tensors, grad_rows, grad_lse, grad_entropy=None):
    """(input, linear_weight, linear_bias) gradients by torch's own functions on the full
    logits (cross_entropy's :func:`composite_gradients`), as a differentiable graph: the
    double-backward path (``create_graph=True``), which holds the [N, V] logits."""
    input, linear_weight, linear_bias, target, weight = tensors
    return _ce.composite_gradients(
        tensors[:3],
        ctx.needs_input_grad[:3],
        F.linear(input, linear_weight, linear_bias),
        target,
        weight,
        ctx.options,
        grad_rows,
        grad_lse,
        grad_entropy,
        "linear_cross_entropy with a sharded head",
    )


def _setup_context(ctx, inputs, output) -> None:
    input, linear_weight, linear_bias, target, weight, *flat, chunk_rows = inputs
    stats = output[-1]
    entropy = output[2] if len(output) == 4 else None  # linear_cross_entropy_with_entropy
    ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, stats, entropy)
    ctx.options = CEOptions(*flat)
    ctx.chunk_rows = chunk_rows
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, grad_lse, *grads):
    grad_entropy = grads[0] if len(grads) == 2 else None  # (entropy, stats) or (stats,)
    input, linear_weight, linear_bias, target, weight, stats, entropy = ctx.saved_tensors
    _refuse_target_gradient(ctx)
    if grad_loss is None:
        grad_loss = torch.zeros_like(stats[0])
    if _creating_graph():
        grads = _unfused_gradients(
            ctx,
            (input, linear_weight, linear_bias, target, weight),
            grad_loss,
            grad_lse,
            grad_entropy,
        )
        return (*grads, *[None] * 9)
    needs = list(ctx.needs_input_grad[:3])
    grad_input, grad_weight, grad_bias = linear_cross_entropy_backward_op(
        grad_loss,
        grad_lse,
        input,
        linear_weight,
        linear_bias,
        target,
        weight,
        stats,
        *ctx.options.flat(),
        needs,
        ctx.chunk_rows,
        grad_entropy,
        None if grad_entropy is None else entropy,
    )
    return (
        grad_input if needs[0] else None,
        grad_weight if needs[1] else None,
        grad_bias if needs[2] else None,
        *[None] * 9,
    )


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)
linear_cross_entropy_with_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def _reduced_setup_context(ctx, inputs, output) -> None:
    input, linear_weight, linear_bias, target, weight = inputs[:5]
    *flat, denominator, _, chunk_rows, keep = inputs[5:]
    _, _, stats, *grads = output
    ctx.save_for_backward(
        input, linear_weight, linear_bias, target, weight, stats, denominator, *grads
    )
    ctx.options = CEOptions(*flat)
    ctx.chunk_rows = chunk_rows
    ctx.keep_gradients = keep
    ctx.mark_non_differentiable(stats, *grads)
    ctx.set_materialize_grads(False)


def _reduced_backward(ctx, grad_loss, grad_lse, *_unused):
    input, linear_weight, linear_bias, target, weight, stats, denominator, *formed = (
        ctx.saved_tensors
    )
    _refuse_target_gradient(ctx)
    needs = ctx.needs_input_grad[:3]
    if _creating_graph():
        if grad_loss is None:
            grad_loss = stats.new_zeros(())
        grad_rows = (grad_loss / denominator.to(stats.dtype)).expand(input.shape[0])
        grads = _unfused_gradients(
            ctx, (input, linear_weight, linear_bias, target, weight), grad_rows, grad_lse
        )
        return (*grads, *[None] * 12)
    operands = (input, linear_weight, linear_bias)
    for need, formed_grad, like in zip(needs, formed, operands, strict=True):
        if need and like is not None and formed_grad.shape != like.shape:
            raise RuntimeError(
                "linear_cross_entropy_reduced: a gradient is required that its forward was not "
                "asked to form (needs); pass needs matching the operands' requires_grad"
            )
    grads = [None, None, None]
    if grad_loss is not None:  # the forward formed them for an upstream gradient of 1
        wanted = [g if need else None for need, g in zip(needs, formed, strict=True)]
        applied = torch.ones((), dtype=stats.dtype, device=stats.device)
        grads = _ce_reduced.rescaled(wanted, applied, grad_loss, copy=ctx.keep_gradients)
    if grad_lse is not None:  # a per-row upstream gradient: recompute the chunks for it
        extra = linear_cross_entropy_backward_op(
            torch.zeros_like(stats[0]),
            grad_lse,
            input,
            linear_weight,
            linear_bias,
            target,
            weight,
            stats,
            *ctx.options.flat(),
            list(needs),
            ctx.chunk_rows,
        )
        grads = [
            None if not need else e if g is None else g + e
            for need, g, e in zip(needs, grads, extra, strict=True)
        ]
    return (*grads, *[None] * 12)


linear_cross_entropy_reduced_op.register_autograd(
    _reduced_backward, setup_context=_reduced_setup_context
)
