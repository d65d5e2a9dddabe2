"""temperature= and return_entropy= on cross_entropy and linear_cross_entropy (issue 20).

Every result and gradient is compared with a float64 torch reference that writes the math out:
u = softcap(logits) / T, loss = torch's cross_entropy of u (+ z_loss lse(u)^2), entropy
H = -sum softmax(u) log_softmax(u), 0 for ignored rows, reduced over the counted rows. The
gradients are those of one random per-row linear combination of loss and entropy (of the
loss and entropy themselves when reduced), so a wrong entropy gradient cannot hide behind
the loss's. Three paths: the kernels (interpreted on the CPU), the ops' plain-torch math, and
torch's own functions (the CPU path without the interpreter, and torch.func).
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, TOLERANCES

import triton_softmax as ts
from triton_softmax import functional as ts_functional
from triton_softmax.ops import cross_entropy as ce_ops
from triton_softmax.ops.options import CEOptions

F64 = TOLERANCES[torch.float64]


def _reference(x, target, *, weight=None, ignore_index=-100, label_smoothing=0.0, softcap=None,
               temperature=1.0, z_loss=0.0, reduction="mean"):  # fmt: skip
    """(loss, lse, entropy) in float64 with torch's functions, the class dimension 1 (or 0
    for (C,) logits)."""
    dim = 0 if x.dim() == 1 else 1
    u = x.double()
    if softcap:
        u = softcap * torch.tanh(u / softcap)
    u = u / temperature
    is_index = not target.is_floating_point()
    w = None if weight is None else weight.double()
    t = target if is_index else target.double()
    loss = F.cross_entropy(u, t, w, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)  # fmt: skip
    lse = u.logsumexp(dim)
    log_p = u.log_softmax(dim)
    entropy = -(log_p.exp() * log_p).sum(dim)
    counted = target != ignore_index if is_index else torch.ones_like(lse, dtype=torch.bool)
    loss = loss + torch.where(counted, z_loss * lse * lse, 0.0)
    entropy = torch.where(counted, entropy, 0.0)
    if reduction == "sum":
        return loss.sum(), lse, entropy.sum()
    if reduction == "mean":
        if not is_index:
            return loss.mean(), lse, entropy.mean()
        safe = target.clamp(0, x.shape[dim] - 1)
        denominator = counted.sum() if w is None else (w[safe] * counted).sum()
        return loss.sum() / denominator, lse, entropy.sum() / counted.sum()
    return loss, lse, entropy


@pytest.fixture(params=["kernels", "ops-torch", "torch"])
def path(request, monkeypatch):
    """kernels: the Triton kernels; ops-torch: the registered ops' plain-torch math; torch:
    torch's own functions (what the CPU takes without the interpreter)."""
    if request.param == "ops-torch":
        monkeypatch.setattr(ce_ops, "kernel_path", lambda _: "torch")
    elif request.param == "torch":
        monkeypatch.setattr(ts_functional, "_with_torch", lambda _: True)
    return request.param


def _problem(kind, n=6, c=7, weighted=False, dtype=torch.float64, batch=()):
    x = torch.randn(n, c, *batch, dtype=dtype, device=DEVICE) * 3
    if kind == "index":
        target = torch.randint(0, c, (n, *batch), device=DEVICE)
        target.view(-1)[1] = -100
    else:
        target = torch.softmax(torch.randn(n, c, *batch, dtype=dtype, device=DEVICE), 1)
    weight = torch.rand(c, dtype=dtype, device=DEVICE) + 0.5 if weighted else None
    return x, target, weight


def _check(out, ref, leaves, ref_leaves, reduction, tol=F64):
    """Values of (loss, [lse,] entropy), then the gradients of one random combination."""
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a.double(), b, **tol)
    loss, entropy = out[0], out[-1]
    a = torch.randn(loss.shape, dtype=torch.float64, device=loss.device)
    b = torch.randn(entropy.shape, dtype=torch.float64, device=loss.device)
    ((loss.double() * a).sum() + (entropy.double() * b).sum()).backward()
    ((ref[0] * a).sum() + (ref[-1] * b).sum()).backward()
    for leaf, ref_leaf in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, **tol)


CASES = [  # kind, weighted, label_smoothing, softcap, z_loss, temperature, reduction
    ("index", False, 0.0, None, 0.0, 0.7, "none"),
    ("index", True, 0.1, 5.0, 1e-3, 1.6, "none"),
    ("index", True, 0.0, None, 0.0, 2.0, "mean"),
    ("index", False, 0.2, 3.0, 0.0, 0.5, "sum"),
    ("probability", False, 0.0, None, 1e-3, 1.3, "none"),
    ("probability", True, 0.1, 4.0, 0.0, 0.8, "mean"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cross_entropy_loss_and_entropy(path, case):
    kind, weighted, smoothing, softcap, z_loss, temperature, reduction = case
    x, target, weight = _problem(kind, weighted=weighted)
    options = dict(weight=weight, label_smoothing=smoothing, softcap=softcap, z_loss=z_loss,
                   temperature=temperature, reduction=reduction)  # fmt: skip
    mine, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = ts.cross_entropy(mine, target, return_entropy=True, **options)
    loss, _, entropy = _reference(ref_x, target, **options)
    _check(out, (loss, entropy), [mine], [ref_x], reduction)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_cross_entropy_lse_and_k_dimensional(path, reduction):
    """(N, C, d) logits, all three outputs, lse's gradient included through the loss's."""
    x, target, _ = _problem("index", n=3, c=5, batch=(2,))
    options = dict(softcap=6.0, temperature=0.6, reduction=reduction, label_smoothing=0.1)
    mine, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss, lse, entropy = ts.cross_entropy(
        mine, target, return_lse=True, return_entropy=True, **options
    )
    ref_loss, ref_lse, ref_entropy = _reference(ref_x, target, **options)
    torch.testing.assert_close(lse, ref_lse, **F64)
    _check((loss + 0 * lse.sum(), entropy), (ref_loss, ref_entropy), [mine], [ref_x], reduction)


def test_temperature_alone_matches_tempered_logits(path):
    """Without entropy: the reduced two-pass op (gradient written in the forward) and the
    per-row op both take the temperature."""
    x, target, _ = _problem("index")
    for reduction in ("mean", "none"):
        mine, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        loss = ts.cross_entropy(mine, target, temperature=0.3, reduction=reduction)
        ref = _reference(ref_x, target, temperature=0.3, reduction=reduction)[0]
        torch.testing.assert_close(loss, ref, **F64)
        (loss * torch.arange(loss.numel(), dtype=loss.dtype).reshape(loss.shape)).sum().backward()
        (ref * torch.arange(ref.numel(), dtype=ref.dtype).reshape(ref.shape)).sum().backward()
        torch.testing.assert_close(mine.grad, ref_x.grad, **F64)


def test_entropy_only_gradient_and_float32():
    """Only the entropy is differentiated (the loss's gradient is None); fp32 logits."""
    x, target, _ = _problem("index", n=5, c=40, dtype=torch.float32)
    mine, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    _, entropy = ts.cross_entropy(mine, target, reduction="none", temperature=1.7,
                                  return_entropy=True)  # fmt: skip
    ref = _reference(ref_x, target, temperature=1.7, reduction="none")[2]
    torch.testing.assert_close(entropy.double(), ref, **TOLERANCES[torch.float32])
    entropy.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(mine.grad, ref_x.grad, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("block_n", [4, None])
def test_ops_streamed_rows_and_masked_logits(block_n):
    """The per-lane entropy sums across blocks (block_n=4: 7 blocks of a 27-class row) and
    -inf logits (p = 0 adds nothing, as p log p -> 0), forward and backward, kernels and the
    ops' plain-torch math."""
    x = torch.randn(4, 27, dtype=torch.float64, device=DEVICE) * 4
    x[0, :20] = float("-inf")
    x[2, 5] = float("-inf")
    target = torch.tensor([22, 3, -100, 26], device=DEVICE)
    entropy = torch.empty(4, dtype=torch.float64, device=DEVICE)
    options = CEOptions(softcap=2.5, temperature=0.9)
    loss, lse, stats = ce_ops.cross_entropy_forward(
        x, target, None, options, entropy_out=entropy, block_n=block_n
    )
    ref_x = x.clone().requires_grad_()
    u = 2.5 * torch.tanh(ref_x / 2.5) / 0.9
    p, log_p = u.softmax(1), u.log_softmax(1)
    ref_entropy = -torch.where(p == 0, 0.0, p * log_p).sum(1) * (target != -100)
    torch.testing.assert_close(entropy, ref_entropy, **F64)
    torch.testing.assert_close(lse, u.logsumexp(1), **F64)
    g_h = torch.randn(4, dtype=torch.float64, device=DEVICE)
    zero = torch.zeros(4, dtype=torch.float64, device=DEVICE)
    grad = ce_ops.cross_entropy_backward(
        zero, None, x, target, None, stats, options, grad_entropy=g_h, entropy=entropy,
        block_n=block_n,
    )  # fmt: skip
    (ref_entropy * g_h).sum().backward()
    torch.testing.assert_close(grad, ref_x.grad, **F64)
    assert grad.isfinite().all()


@pytest.mark.parametrize("case", [("none", False, True), ("mean", True, False)], ids=str)
def test_linear_cross_entropy(path, case):
    """Fused linear: values and the gradients of input, weight and bias; a K-dimensional
    head (two positions) in the second case."""
    reduction, k_dim, bias = case
    n, h, v = 5, 4, 6
    x = torch.randn(n, h, dtype=torch.float64, device=DEVICE)
    shape = (v, 2, h) if k_dim else (v, h)
    w = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    b = torch.randn(shape[:-1], dtype=torch.float64, device=DEVICE) if bias else None
    target = torch.randint(0, v, (n, 2) if k_dim else (n,), device=DEVICE)
    target.view(-1)[0] = -100
    options = dict(label_smoothing=0.1, softcap=4.0, temperature=0.8, reduction=reduction,
                   z_loss=1e-3)  # fmt: skip
    leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
    out = ts.linear_cross_entropy(
        leaves[0], leaves[1], target, linear_bias=leaves[2] if bias else None,
        return_entropy=True, **options,
    )  # fmt: skip
    logits = torch.einsum("nh,vph->nvp" if k_dim else "nh,vh->nv", *ref_leaves[:2])
    if bias:
        logits = logits + ref_leaves[2]
    loss, _, entropy = _reference(logits, target, **options)
    _check(out, (loss, entropy), leaves, ref_leaves, reduction)


def test_modules_and_return_order():
    x, target, _ = _problem("index")
    loss, lse, entropy = ts.CrossEntropyLoss(temperature=0.5, return_lse=True, return_entropy=True)(
        x, target
    )
    ref = _reference(x, target, temperature=0.5)
    torch.testing.assert_close((loss, lse, entropy), ref, **F64)
    module = ts.LinearCrossEntropyLoss(3, 7, dtype=torch.float64, device=DEVICE,
                                       temperature=2.0, return_entropy=True)  # fmt: skip
    features = torch.randn(6, 3, dtype=torch.float64, device=DEVICE)
    loss, entropy = module(features, target)
    ref = _reference(module.linear(features), target, temperature=2.0)
    torch.testing.assert_close((loss, entropy), (ref[0], ref[2]), **F64)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "2", True, None])
def test_bad_temperature_is_a_value_error(bad):
    x, target, _ = _problem("index")
    w = torch.randn(7, 3, dtype=torch.float64, device=DEVICE)
    calls = [
        lambda: ts.cross_entropy(x, target, temperature=bad),
        lambda: ts.linear_cross_entropy(x[:, :3], w, target, temperature=bad),
        lambda: ts.CrossEntropyLoss(temperature=bad),
        lambda: ts.LinearCrossEntropyLoss(3, 7, temperature=bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="temperature"):
            call()


def test_torch_compile_fullgraph():
    x, target, _ = _problem("index")

    def head(logits, target):
        loss, entropy = ts.cross_entropy(logits, target, reduction="none", temperature=0.7,
                                         return_entropy=True)  # fmt: skip
        return loss.sum() + 0.3 * entropy.sum()

    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    mine, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = compiled(mine, target)
    ref_loss, _, ref_entropy = _reference(ref_x, target, temperature=0.7, reduction="none")
    ref = ref_loss.sum() + 0.3 * ref_entropy.sum()
    torch.testing.assert_close(out, ref, **F64)
    out.backward()
    ref.backward()
    torch.testing.assert_close(mine.grad, ref_x.grad, **F64)


def test_torch_func_through_the_fallback():
    """torch.func.grad and vmap take torch's functions (a custom op would give zero tangents)."""
    x, target, _ = _problem("index")

    def entropy_of(logits):
        return ts.cross_entropy(logits, target, temperature=1.4, return_entropy=True)[1]

    grad = torch.func.grad(entropy_of)(x)
    ref_x = x.clone().requires_grad_()
    _reference(ref_x, target, temperature=1.4)[2].backward()
    torch.testing.assert_close(grad, ref_x.grad, **F64)
    rows = torch.func.vmap(
        lambda row, t: ts.cross_entropy(row, t, temperature=1.4, return_entropy=True)[1]
    )(x, target)
    ref_rows = _reference(x, target, temperature=1.4, reduction="none")[2]
    counted = target != -100  # a (C,) row with target -100 is an ignored row: entropy 0
    torch.testing.assert_close(rows[counted], ref_rows[counted], **F64)


# ---- opcheck: schema, fake tensors, autograd registration, AOT dispatch ----------------------


@pytest.mark.parametrize("kind", ["index", "probability"])
def test_opcheck_cross_entropy_ops_with_temperature_and_entropy(kind):
    """Every cross-entropy op at a temperature other than 1, the entropy op and the backward
    ops with the entropy's upstream gradient: every opcheck test, except where stated."""
    x, target, weight = _problem(kind, weighted=True)
    options = CEOptions(label_smoothing=0.1, z_loss=1e-3, softcap=4.0, temperature=0.7).flat()
    x.requires_grad_()
    for name in ("cross_entropy", "cross_entropy_with_entropy"):
        op = getattr(torch.ops.triton_softmax, name).default
        torch.library.opcheck(op, (x, target, weight, *options, False))
    loss, lse, entropy, stats = torch.ops.triton_softmax.cross_entropy_with_entropy(
        x.detach(), target, weight, *options, False
    )
    grads = (torch.rand(6, dtype=torch.float64, device=DEVICE), torch.randn_like(lse))
    extra = (torch.randn_like(entropy), entropy)  # grad_H, H
    torch.library.opcheck(
        torch.ops.triton_softmax.cross_entropy_backward.default,
        (*grads, x.detach(), target, weight, stats, *options, *extra),
    )
    torch.library.opcheck(
        torch.ops.triton_softmax.cross_entropy_backward_.default,
        (*grads, x.detach().clone(), target, weight, stats, *options, *extra),
    )
    # Not test_aot_dispatch_dynamic for the reduced op: its backward rescales the forward's
    # gradient output in place, which AOT's partitioner refuses when the caller also receives
    # that output (opcheck returns every output; tests/test_cross_entropy.py
    # test_reduced_compiles_fullgraph compiles the functional API over it instead).
    torch.library.opcheck(
        torch.ops.triton_softmax.cross_entropy_reduced.default,
        (x, target, weight, *options, "mean"),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    torch.library.opcheck(
        torch.ops.triton_softmax.cross_entropy_reduced_.default,
        (x.detach().clone(), target, weight, *options, "sum"),
    )


def test_opcheck_linear_cross_entropy_ops_with_temperature_and_entropy():
    """The fused linear ops at a temperature other than 1, the entropy op, and the backward
    with the entropy's upstream gradient."""
    n, h, v = 5, 4, 6
    x = torch.randn(n, h, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(v, h, dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.randn(v, dtype=torch.float64, device=DEVICE, requires_grad=True)
    target = torch.tensor([0, 5, -100, 3, 3], device=DEVICE)
    weight = torch.rand(v, dtype=torch.float64, device=DEVICE) + 0.5
    options = CEOptions(label_smoothing=0.1, z_loss=1e-3, softcap=4.0, temperature=0.7).flat()
    chunk_rows = 2
    for name in ("linear_cross_entropy", "linear_cross_entropy_with_entropy"):
        op = getattr(torch.ops.triton_softmax, name).default
        torch.library.opcheck(op, (x, w, b, target, weight, *options, chunk_rows))
    tensors = (x.detach(), w.detach(), b.detach(), target, weight)
    _, lse, entropy, stats = torch.ops.triton_softmax.linear_cross_entropy_with_entropy(
        *tensors, *options, chunk_rows
    )
    grads = (torch.rand(n, dtype=torch.float64, device=DEVICE), torch.randn_like(lse))
    torch.library.opcheck(
        torch.ops.triton_softmax.linear_cross_entropy_backward.default,
        (*grads, *tensors, stats, *options, [True, True, True], chunk_rows,
         torch.randn_like(entropy), entropy),
    )  # fmt: skip
    # As cross_entropy_reduced: without keep_gradients the backward scales the gradients the
    # forward returns in place, which AOT's partitioner refuses ("Node mul was invalid, but
    # is output"), so not test_aot_dispatch_dynamic there.
    denominator = torch.tensor(4.0, dtype=torch.float64, device=DEVICE)
    reduced = torch.ops.triton_softmax.linear_cross_entropy_reduced.default
    args = (x, w, b, target, weight, *options, denominator, [True, True, True], chunk_rows)
    torch.library.opcheck(
        reduced,
        (*args, False),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    torch.library.opcheck(reduced, (*args, True))


def test_double_backward_with_sharded_classes_raises():
    """The double-backward path recomputes the loss from the logits it holds: with one rank's
    shard of the classes (total_classes > 0) it would be another problem, so it raises."""
    x = torch.randn(3, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(5, 5, dtype=torch.float64, device=DEVICE)  # 5 of 8 classes, 5 features
    target = torch.tensor([0, 4, 7], device=DEVICE)  # 7: a class of another shard
    ops = torch.ops.triton_softmax
    sharded = CEOptions(label_smoothing=0.1, temperature=0.7, total_classes=8).flat()
    for call, what in (
        (lambda: ops.cross_entropy(x, target, None, *sharded, False),
         "cross_entropy with sharded classes"),
        (lambda: ops.linear_cross_entropy(x, w, None, target, None, *sharded),
         "linear_cross_entropy with a sharded head"),
    ):  # fmt: skip
        loss = call()[0].sum()
        with pytest.raises(NotImplementedError, match=f"through {what} \\(process_group\\)"):
            torch.autograd.grad(loss, x, create_graph=True)
