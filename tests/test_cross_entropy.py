"""Cross-entropy against torch.nn.functional.cross_entropy in float64."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, TOLERANCES

import triton_softmax as ts
from triton_softmax.ops import cross_entropy as ce_ops
from triton_softmax.ops.options import CEOptions


def _probabilities(shape, class_dim=1):
    return torch.softmax(torch.randn(shape, device=DEVICE) * 2, dim=class_dim)


def _fp64_problem(n_classes, kind, n):
    """fp64 logits, targets (class indices with row 0 ignored, or probabilities) and class
    weights for the kernel-level tests."""
    x = torch.randn(n, n_classes, device=DEVICE, dtype=torch.float64) * 3
    if kind == "index":
        target = torch.randint(0, n_classes, (n,), device=DEVICE)
        target[0] = -100
    else:
        target = _probabilities((n, n_classes)).double()
    weight = torch.rand(n_classes, device=DEVICE, dtype=torch.float64) + 0.5
    return x, target, weight


def _check(x, target, grad_tol=None, **kwargs):
    """Loss and x.grad against torch in float64 on the same (rounded) logits."""
    tol = TOLERANCES[x.dtype]
    x_ours = x.detach().clone().requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    ref_kwargs = dict(kwargs)
    if ref_kwargs.get("weight") is not None:
        ref_kwargs["weight"] = ref_kwargs["weight"].double()
    ref_target = target.double() if target.is_floating_point() else target
    loss = ts.cross_entropy(x_ours, target, **kwargs)
    loss_ref = F.cross_entropy(x_ref, ref_target, **ref_kwargs)
    assert loss.dtype == x.dtype and loss.shape == loss_ref.shape
    torch.testing.assert_close(loss.double(), loss_ref, **tol, equal_nan=True)
    upstream = (torch.rand_like(loss_ref) + 0.5).to(x.dtype).double()  # representable in x's dtype
    loss.backward(upstream.to(loss.dtype))
    loss_ref.backward(upstream)
    torch.testing.assert_close(x_ours.grad.double(), x_ref.grad, **(grad_tol or tol))


# Every option and their combinations, for class-index and probability targets.
OPTIONS = list(
    itertools.product(
        ["index", "probability"],
        [False, True],  # weight
        [0.0, 0.2],  # label_smoothing
        ["none", "mean", "sum"],
        [-100, -1, 2],  # ignore_index: torch's default, another negative, a real class
    )
)


@pytest.mark.parametrize("kind,weighted,smoothing,reduction,ignore_index", OPTIONS)
def test_options_match_torch(kind, weighted, smoothing, reduction, ignore_index):
    if kind == "probability" and ignore_index >= 0:
        pytest.skip("torch refuses ignore_index >= 0 with probability targets (tested below)")
    n, c = 37, 300
    x = torch.randn(n, c, device=DEVICE) * 2
    if kind == "index":
        target = torch.randint(0, c, (n,), device=DEVICE)
        target[::5] = ignore_index  # some ignored rows
    else:
        target = _probabilities((n, c))
    weight = torch.rand(c, device=DEVICE) + 0.1 if weighted else None
    _check(
        x,
        target,
        weight=weight,
        label_smoothing=smoothing,
        reduction=reduction,
        ignore_index=ignore_index,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["index", "probability"])
def test_dtypes(dtype, kind):
    x = (torch.randn(16, 50, device=DEVICE) * 2).to(dtype)
    target = torch.randint(0, 50, (16,), device=DEVICE) if kind == "index" else None
    if target is None:
        target = _probabilities((16, 50)).to(dtype)
    # Low-precision gradients are rounded once on store: within half a unit in the last place,
    # or one unit for bf16 under Triton's interpreter, which truncates fp32 -> bf16 stores.
    bf16_rtol = 8e-3 if ts.kernel_path(x) == "triton-interpreter" else 4e-3
    grad_tol = {
        torch.bfloat16: dict(atol=1e-3, rtol=bf16_rtol),
        torch.float16: dict(atol=1e-4, rtol=5e-4),
    }.get(dtype)
    _check(x, target, grad_tol=grad_tol, label_smoothing=0.1, reduction="sum")


@pytest.mark.parametrize(
    "shape",
    [(11,), (5, 11), (3, 11, 4), (2, 11, 3, 2)],
    ids=["(C,)", "(N,C)", "(N,C,d1)", "(N,C,d1,d2)"],
)
@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_shapes(shape, kind, reduction):
    x = torch.randn(shape, device=DEVICE)
    if kind == "index":
        batch = () if len(shape) == 1 else (shape[0], *shape[2:])
        target = torch.randint(0, 11, batch, device=DEVICE)
    else:
        target = _probabilities(shape, class_dim=0 if len(shape) == 1 else 1)
    weight = torch.rand(11, device=DEVICE) + 0.5
    _check(x, target, reduction=reduction, label_smoothing=0.05, weight=weight)


# Block boundaries of the streamed loop, reached on short rows by forcing BLOCK_N = 16.
@pytest.mark.parametrize("n_classes", [1, 15, 16, 17, 33, 100])
@pytest.mark.parametrize("kind", ["index", "probability"])
def test_block_boundaries(n_classes, kind):
    n = 9
    x, target, weight = _fp64_problem(n_classes, kind, n)
    options = CEOptions(ignore_index=-100, label_smoothing=0.15, z_loss=0.01)
    loss, lse, stats = ce_ops.cross_entropy_forward(x, target, weight, options, block_n=16)
    x_ref = x.clone().requires_grad_()
    loss_ref = F.cross_entropy(x_ref, target, weight=weight, reduction="none", label_smoothing=0.15)
    lse_ref = torch.logsumexp(x_ref, -1)
    counted = (
        (target != -100) if kind == "index" else torch.ones(n, dtype=torch.bool, device=DEVICE)
    )
    loss_ref = loss_ref + 0.01 * lse_ref**2 * counted
    torch.testing.assert_close(loss, loss_ref.detach())
    torch.testing.assert_close(lse, lse_ref.detach())
    upstream = torch.rand(n, device=DEVICE, dtype=torch.float64)
    upstream_lse = torch.randn(n, device=DEVICE, dtype=torch.float64)
    grad = ce_ops.cross_entropy_backward(
        upstream, upstream_lse, x, target, weight, stats, options, block_n=16
    )
    torch.autograd.backward((loss_ref, lse_ref), (upstream, upstream_lse))
    torch.testing.assert_close(grad, x_ref.grad)


def test_worked_examples():
    # A one-hot target predicted with probability 1 costs -1 * log 1 = 0.
    x = torch.tensor([[0.0, -math.inf, -math.inf]], device=DEVICE)
    assert ts.cross_entropy(x, torch.tensor([0], device=DEVICE)).item() == 0.0
    confident = torch.tensor([[60.0, -60.0, -60.0]], device=DEVICE)
    one_hot = torch.tensor([[1.0, 0.0, 0.0]], device=DEVICE)
    assert abs(ts.cross_entropy(confident, one_hot).item()) < 1e-6
    # Uniform logits over C classes cost log C.
    torch.testing.assert_close(
        ts.cross_entropy(torch.zeros(4, 10, device=DEVICE), torch.arange(4, device=DEVICE)),
        torch.tensor(math.log(10), device=DEVICE),
    )


def test_all_ignored_batch():
    x = torch.randn(6, 9, device=DEVICE, requires_grad=True)
    target = torch.full((6,), -100, device=DEVICE)
    loss = ts.cross_entropy(x, target)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(x.detach(), target))
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert ts.cross_entropy(x, target, reduction="sum").item() == 0.0


def test_minus_inf_logits():
    inf = math.inf
    x = torch.randn(4, 40, device=DEVICE)
    x[0, 5:] = -inf  # other classes impossible: finite loss
    x[1, ::3] = -inf
    x[2] = -inf  # all -inf: NaN, as torch
    target = torch.tensor([2, 1, 0, 7], device=DEVICE)
    ours = ts.cross_entropy(x, target, reduction="none")
    torch.testing.assert_close(ours, F.cross_entropy(x, target, reduction="none"), equal_nan=True)
    assert torch.isfinite(ours[[0, 1, 3]]).all() and torch.isnan(ours[2])
    # The target on a -inf logit costs +inf.
    assert ts.cross_entropy(x[1:2], torch.tensor([0], device=DEVICE)).item() == inf
    # Gradients of the finite rows match.
    _check(x[[0, 1, 3]], target[[0, 1, 3]])


@pytest.mark.parametrize("offset", [1e4, -1e4])
@pytest.mark.parametrize("kind", ["index", "probability"])
def test_huge_offsets(offset, kind):
    x = torch.randn(8, 200, device=DEVICE) + offset
    target = torch.randint(0, 200, (8,), device=DEVICE) if kind == "index" else None
    if target is None:
        target = _probabilities((8, 200))
    _check(x, target, label_smoothing=0.1, weight=torch.rand(200, device=DEVICE) + 0.5)


def test_long_rows():
    # More classes than one block (4096), than 65 536 (where a peer errors), and than 2**20.
    x = torch.randn(2, 70_000, device=DEVICE)
    _check(x, torch.tensor([3, 69_999], device=DEVICE), label_smoothing=0.1)
    x = torch.randn(1, 2**20 + 1, device=DEVICE)
    _check(x, torch.tensor([2**20], device=DEVICE))


def test_non_contiguous_logits():
    base = torch.randn(30, 20, device=DEVICE)
    _check(base.t(), torch.randint(0, 30, (20,), device=DEVICE))
    _check(base[::2, ::2], torch.randint(0, 10, (15,), device=DEVICE))


def test_empty_batch():
    x = torch.randn(0, 5, device=DEVICE, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=DEVICE)
    assert torch.isnan(ts.cross_entropy(x, target))
    assert ts.cross_entropy(x, target, reduction="sum").item() == 0.0
    assert ts.cross_entropy(x, target, reduction="none").shape == (0,)
    ts.cross_entropy(x, target, reduction="sum").backward()
    assert x.grad.shape == (0, 5)


def test_bf16_gradient_at_p_0999():
    # p(true class) = 0.999: the gradient p - 1 = -0.001 must survive bf16.
    n_classes, true_class = 8, 3
    x = torch.zeros(1, n_classes)
    x[0, true_class] = math.log(0.999 * (n_classes - 1) / 0.001)
    x = x.bfloat16().to(DEVICE).requires_grad_()
    target = torch.tensor([true_class], device=DEVICE)
    ts.cross_entropy(x, target).backward()
    x64 = x.detach().double().requires_grad_()  # same rounded logits
    F.cross_entropy(x64, target).backward()
    ours, ref = x.grad[0, true_class].double(), x64.grad[0, true_class]
    assert abs(ref + 0.001) < 5e-5
    assert abs(ours - ref) <= 0.01 * abs(ref)


@pytest.mark.parametrize("kind", ["index", "probability"])
def test_z_loss_and_lse(kind):
    x = torch.randn(12, 30, device=DEVICE, dtype=torch.float64, requires_grad=True)
    if kind == "index":
        target = torch.randint(0, 30, (12,), device=DEVICE)
        target[:3] = -100
        counted = target != -100
    else:
        target = _probabilities((12, 30)).double()
        counted = torch.ones(12, dtype=torch.bool, device=DEVICE)
    loss, lse = ts.cross_entropy(x, target, z_loss=1e-2, return_lse=True)
    x_ref = x.detach().clone().requires_grad_()
    lse_ref = torch.logsumexp(x_ref, -1)
    per_row = F.cross_entropy(x_ref, target, reduction="none") + 1e-2 * lse_ref**2 * counted
    loss_ref = per_row.sum() / counted.sum()
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(lse, lse_ref)
    # Gradients through both the loss and the returned lse.
    (loss + lse.sum()).backward()
    (loss_ref + lse_ref.sum()).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_gradcheck_fp64():
    x = torch.randn(5, 7, device=DEVICE, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(7, device=DEVICE, dtype=torch.float64) + 0.5
    target = torch.tensor([0, 6, -100, 3, 3], device=DEVICE)

    def index_loss(t):
        return ts.cross_entropy(t, target, weight=weight, label_smoothing=0.3, z_loss=0.1)

    assert torch.autograd.gradcheck(index_loss, (x,))
    soft = _probabilities((5, 7)).double().requires_grad_()

    def soft_loss(t, q):
        return ts.cross_entropy(t, q, weight=weight, label_smoothing=0.3, reduction="none")

    assert torch.autograd.gradcheck(soft_loss, (x, soft))  # gradients to the targets too


def test_inplace_backward():
    x = torch.randn(6, 10, device=DEVICE, requires_grad=True)
    target = torch.randint(0, 10, (6,), device=DEVICE)
    logits = x * 2.0  # a non-leaf buffer, as the output of an lm_head would be
    before = logits.detach().clone()
    ts.cross_entropy(logits, target, label_smoothing=0.1, inplace_backward=True).backward()
    x_ref = x.detach().clone().requires_grad_()
    F.cross_entropy(x_ref * 2.0, target, label_smoothing=0.1).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert not torch.equal(logits.detach(), before)  # the logits' memory now holds the gradient


def test_inplace_backward_under_compile():
    def f(x, target):
        return ts.cross_entropy(x * 2.0, target, inplace_backward=True)

    torch._dynamo.reset()
    x = torch.randn(6, 10, device=DEVICE, requires_grad=True)
    target = torch.randint(0, 10, (6,), device=DEVICE)
    torch.compile(f, fullgraph=True, backend="aot_eager")(x, target).backward()
    x_ref = x.detach().clone().requires_grad_()
    F.cross_entropy(x_ref * 2.0, target).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("layout", ["expanded", "transposed"])
def test_inplace_backward_falls_back_when_rows_overlap(layout):
    # Rows sharing memory (stride 0) or a strided class dimension cannot take the gradient in
    # place: the out-of-place backward runs instead, with correct gradients.
    x = torch.randn(1, 5, device=DEVICE, requires_grad=True)
    y = torch.randn(5, 4, device=DEVICE, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3], device=DEVICE)
    logits = {"expanded": lambda a, b: (a * 2).expand(4, 5), "transposed": lambda a, b: b.t() * 1}
    x_ref, y_ref = (t.detach().clone().requires_grad_() for t in (x, y))
    ts.cross_entropy(
        logits[layout](x, y), target, inplace_backward=True, reduction="sum"
    ).backward()
    F.cross_entropy(logits[layout](x_ref, y_ref), target, reduction="sum").backward()
    grad, grad_ref = (x.grad, x_ref.grad) if layout == "expanded" else (y.grad, y_ref.grad)
    torch.testing.assert_close(grad, grad_ref)


def test_inplace_backward_with_lse_gradient():
    x = torch.randn(6, 10, device=DEVICE, requires_grad=True)
    target = torch.randint(0, 10, (6,), device=DEVICE)
    loss, lse = ts.cross_entropy(x * 1.0, target, return_lse=True, inplace_backward=True)
    (loss + 0.5 * lse.sum()).backward()
    x_ref = x.detach().clone().requires_grad_()
    (F.cross_entropy(x_ref, target) + 0.5 * torch.logsumexp(x_ref, -1).sum()).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_default_backward_leaves_logits_alone():
    x = torch.randn(6, 10, device=DEVICE, requires_grad=True)
    logits = x * 2.0
    before = logits.detach().clone()
    ts.cross_entropy(logits, torch.randint(0, 10, (6,), device=DEVICE)).backward()
    assert torch.equal(logits.detach(), before)


def test_inplace_backward_refuses_to_corrupt_saved_logits():
    x = torch.randn(6, 10, device=DEVICE, requires_grad=True)
    logits = x.exp()  # exp saves its output for its own backward
    loss = ts.cross_entropy(
        logits, torch.randint(0, 10, (6,), device=DEVICE), inplace_backward=True
    )
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("view", [False, True])
def test_inplace_backward_refuses_a_leaf_that_requires_grad(view):
    # Writing the gradient over a parameter (or a view of one) would corrupt the parameter.
    weight = torch.nn.Parameter(torch.randn(6, 10, device=DEVICE))
    logits = weight[:, :] if view else weight
    with pytest.raises(ValueError, match="leaf tensor that requires grad"):
        ts.cross_entropy(logits, torch.randint(0, 10, (6,), device=DEVICE), inplace_backward=True)
    assert torch.equal(weight, weight.detach().clone())


@pytest.mark.parametrize("extra", [dict(label_smoothing=0.1), dict(z_loss=1e-3), {}])
def test_zero_summed_weight_gives_nan_as_torch(extra):
    # "mean" over class-index targets divides by the summed weights: with none, torch's 0/0
    # is NaN, and so is ours, whatever the smoothing or z-loss terms add to the numerator.
    x = torch.randn(4, 3, device=DEVICE, requires_grad=True)
    target = torch.tensor([0, 1, 2, 1], device=DEVICE)
    loss = ts.cross_entropy(x, target, weight=torch.zeros(3, device=DEVICE), **extra)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.isnan(x.grad).all()  # torch's gradient is NaN there too


def test_infinite_class_weight_leaves_other_rows_finite():
    x = torch.randn(3, 3, device=DEVICE, dtype=torch.float64)
    target = torch.tensor([0, 1, 2], device=DEVICE)
    weight = torch.tensor([1.0, math.inf, 1.0], device=DEVICE, dtype=torch.float64)
    loss = ts.cross_entropy(x, target, weight=weight, reduction="none")
    torch.testing.assert_close(loss, F.cross_entropy(x, target, weight=weight, reduction="none"))
    assert torch.isfinite(loss[[0, 2]]).all()


@pytest.mark.parametrize(
    "logits_dtype,target_dtype",
    [
        (torch.float32, torch.float64),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
    ],
)
def test_probability_target_dtype_promotes_as_torch(logits_dtype, target_dtype):
    x = torch.randn(5, 6, device=DEVICE).to(logits_dtype)
    q = _probabilities((5, 6)).to(target_dtype)
    loss, ref = ts.cross_entropy(x, q), F.cross_entropy(x, q)
    assert loss.dtype == ref.dtype
    torch.testing.assert_close(loss.double(), ref.double(), atol=2e-2, rtol=2e-2)


def test_one_d_input_with_a_one_element_target():
    x = torch.randn(5, device=DEVICE)
    target = torch.tensor([3], device=DEVICE)
    for reduction in ("none", "mean", "sum"):
        loss = ts.cross_entropy(x, target, reduction=reduction)
        ref = F.cross_entropy(x, target, reduction=reduction)
        assert loss.shape == ref.shape
        torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("kind", ["index", "probability"])
def test_no_classes_and_no_rows(reduction, kind):
    x = torch.randn(0, 0, device=DEVICE)
    target = torch.zeros(0, dtype=torch.long, device=DEVICE) if kind == "index" else x.clone()
    loss = ts.cross_entropy(x, target, reduction=reduction)
    ref = F.cross_entropy(x, target, reduction=reduction)
    assert loss.shape == ref.shape
    torch.testing.assert_close(loss, ref, equal_nan=True)


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], (1.0, 2.0)])
def test_non_tensor_input_raises_type_error(bad):
    with pytest.raises(TypeError, match="must be a torch.Tensor, got"):
        ts.cross_entropy(bad, torch.tensor([0]))
    np = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match="got ndarray"):
        ts.cross_entropy(np.zeros((1, 2)), torch.tensor([0]))
    with pytest.raises(TypeError, match="'target' must be a torch.Tensor"):
        ts.cross_entropy(torch.zeros(1, 2), [0])


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 2**70])
def test_ignore_index_outside_int64_raises(value):
    with pytest.raises(ValueError, match="does not fit in int64"):
        ts.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), ignore_index=value)


def test_module_returns_lse_when_asked():
    x = torch.randn(4, 6, device=DEVICE)
    target = torch.randint(0, 6, (4,), device=DEVICE)
    loss, lse = ts.CrossEntropyLoss(return_lse=True, label_smoothing=0.1)(x, target)
    torch.testing.assert_close(loss, F.cross_entropy(x, target, label_smoothing=0.1))
    torch.testing.assert_close(lse, torch.logsumexp(x, 1))


@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("block_n", [None, 16])  # one block, and streamed over several
def test_softcap_matches_torch(kind, block_n):
    # Gemma 2's soft-capping: the loss of softcap * tanh(x / softcap), inside the kernels.
    x = (torch.randn(9, 40, device=DEVICE, dtype=torch.float64) * 20).requires_grad_()
    target = torch.randint(0, 40, (9,), device=DEVICE) if kind == "index" else None
    if target is None:
        target = _probabilities((9, 40)).double()
    else:
        target[2] = -100
    weight = torch.rand(40, device=DEVICE, dtype=torch.float64) + 0.5
    options = dict(weight=weight, label_smoothing=0.1, reduction="none")
    loss, lse = ts.cross_entropy(x, target, softcap=15.0, z_loss=1e-3, return_lse=True, **options)
    x_ref = x.detach().clone().requires_grad_()
    capped = 15.0 * torch.tanh(x_ref / 15.0)
    ref_lse = torch.logsumexp(capped, 1)
    counted = (target != -100) if kind == "index" else torch.ones(9, dtype=torch.bool)
    ref = F.cross_entropy(capped, target, **options) + 1e-3 * ref_lse**2 * counted
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(lse, ref_lse)
    upstream = torch.rand(9, device=DEVICE, dtype=torch.float64)
    (loss * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    if block_n is not None:  # the same through the op's launcher, streamed over 16-class blocks
        options = CEOptions(label_smoothing=0.1, z_loss=1e-3, softcap=15.0)
        rows = ce_ops.cross_entropy_forward(x.detach(), target, weight, options, block_n=block_n)
        torch.testing.assert_close(rows[0], ref.detach())


@pytest.mark.parametrize("cap", [30.0, 1e4, 1e8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softcap_precision_at_large_caps(cap, dtype):
    # tanh(y) from exp loses eps / |y| relatively for small y = z / cap: at cap 1e8 that was a
    # fp32 loss error of 0.36. The loss and the gradient, whose derivative 1 - tanh**2 rides on
    # the same tanh, must stay at the dtype's rounding whatever the cap.
    x = torch.randn(6, 40, device=DEVICE, dtype=torch.float64) * 3
    x[0, :5] = torch.tensor([1e-3, -1e-6, 0.0, 0.75 * cap, -2.0 * cap])  # both sides of 0.25
    x = x.to(dtype).requires_grad_()
    target = torch.randint(0, 40, (6,), device=DEVICE)
    x_ref = x.detach().double().requires_grad_()
    capped = cap * torch.tanh(x_ref / cap)
    ref = F.cross_entropy(capped, target, reduction="none")
    loss = ts.cross_entropy(x, target, softcap=cap, reduction="none")
    upstream = torch.rand(6, device=DEVICE, dtype=torch.float64) + 0.5
    (loss * upstream.to(dtype)).sum().backward()
    (ref * upstream).sum().backward()
    tight = dict(rtol=2e-6, atol=1e-6) if dtype == torch.float32 else TOLERANCES[dtype]
    torch.testing.assert_close(loss.double(), ref.detach(), **tight)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, **tight)


@pytest.mark.parametrize(
    "softcap,error",
    [
        (0.0, ValueError),
        (0, ValueError),
        (-1.0, ValueError),
        (math.inf, ValueError),
        (math.nan, ValueError),
        (True, TypeError),  # would have meant a cap of 1.0
        (False, TypeError),
        ("30", TypeError),
    ],
)
def test_bad_softcap_raises(softcap, error):
    message = "softcap must be a positive finite real number"
    with pytest.raises(error, match=message):
        ts.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), softcap=softcap)
    with pytest.raises(error, match=message):
        ts.CrossEntropyLoss(softcap=softcap)


@pytest.mark.parametrize(
    "z_loss,error",
    [(-1e-4, ValueError), (math.nan, ValueError), (math.inf, ValueError), (True, TypeError)],
)
def test_bad_z_loss_raises(z_loss, error):
    message = r"z_loss must be a finite real number >= 0"
    with pytest.raises(error, match=message):
        ts.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), z_loss=z_loss)
    with pytest.raises(error, match=message):
        ts.CrossEntropyLoss(z_loss=z_loss)


def test_module_softcap_matches_functional():
    x = torch.randn(4, 6, device=DEVICE, dtype=torch.float64)
    target = torch.randint(0, 6, (4,), device=DEVICE)
    module = ts.CrossEntropyLoss(softcap=2, z_loss=0)  # ints are real numbers
    torch.testing.assert_close(module(x, target), ts.cross_entropy(x, target, softcap=2.0))
    ref = F.cross_entropy(2.0 * torch.tanh(x / 2.0), target)
    torch.testing.assert_close(module(x, target), ref)


def test_int32_targets_are_accepted():
    x = torch.randn(5, 4, device=DEVICE)
    target = torch.randint(0, 4, (5,), device=DEVICE)
    torch.testing.assert_close(ts.cross_entropy(x, target.int()), F.cross_entropy(x, target))


def test_legacy_reduction_arguments():
    x = torch.randn(5, 4, device=DEVICE)
    target = torch.randint(0, 4, (5,), device=DEVICE)
    with pytest.warns(UserWarning):
        ours = ts.cross_entropy(x, target, size_average=False)
    torch.testing.assert_close(ours, F.cross_entropy(x, target, reduction="sum"))


def test_module_matches_torch():
    weight = torch.rand(6, device=DEVICE) + 0.5
    x = torch.randn(8, 6, device=DEVICE)
    target = torch.randint(0, 6, (8,), device=DEVICE)
    ours = ts.CrossEntropyLoss(weight=weight, label_smoothing=0.1, ignore_index=1)
    theirs = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1, ignore_index=1)
    torch.testing.assert_close(ours(x, target), theirs(x, target))
    assert ts.CrossEntropyLoss(reduction="none")(x, target).shape == (8,)


# ---- bad input -----------------------------------------------------------------------------


def test_integer_logits_raise_type_error():
    with pytest.raises(TypeError, match="int64"):
        ts.cross_entropy(torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long))


def test_bool_target_raises_type_error():
    with pytest.raises(TypeError, match="bool"):
        ts.cross_entropy(torch.randn(3, 4), torch.zeros(3, dtype=torch.bool))


@pytest.mark.parametrize(
    "target", [torch.zeros(4, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long)], ids=str
)
def test_index_target_shape_raises(target):
    with pytest.raises(ValueError, match=r"\(3, 5\).*\(3,\)|\(3,\).*\(3, 5\)"):
        ts.cross_entropy(torch.randn(3, 5), target)


def test_probability_target_shape_raises():
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(3, 5\)"):
        ts.cross_entropy(torch.randn(3, 5), torch.rand(3, 4))


@pytest.mark.parametrize("bad", [5, 7, -1, -100])
def test_out_of_range_class_raises_index_error(bad):
    target = torch.tensor([0, bad, 2])
    with pytest.raises(IndexError, match=str(bad)):
        ts.cross_entropy(torch.randn(3, 5), target, ignore_index=-7 if bad == -100 else -100)


def test_checked_mode_raises_before_launch():
    with pytest.raises(IndexError, match="9"):
        ts.cross_entropy(
            torch.randn(2, 5, device=DEVICE),
            torch.tensor([9, 0], device=DEVICE),
            check_targets=True,
        )


def test_unchecked_out_of_range_class_gives_nan_not_out_of_bounds(monkeypatch):
    # What a GPU run without check_targets does: the kernel never dereferences the bad index.
    monkeypatch.setattr(ce_ops, "check_class_indices", lambda *args: None)
    x = torch.randn(3, 5, device=DEVICE, requires_grad=True)
    loss = ts.cross_entropy(x, torch.tensor([1, 5, -3], device=DEVICE), reduction="none")
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1:]).all()
    loss.sum().backward()
    assert torch.isfinite(x.grad[0]).all() and torch.isnan(x.grad[1:]).all()


def test_operands_on_another_device_raise():
    with pytest.raises(ValueError, match="weight is on meta"):
        ts.cross_entropy(
            torch.randn(3, 5), torch.zeros(3, dtype=torch.long), weight=torch.ones(5, device="meta")
        )


def test_weight_length_raises():
    with pytest.raises(ValueError, match=r"weight.*\(5,\).*\(4,\)"):
        ts.cross_entropy(torch.randn(3, 5), torch.zeros(3, dtype=torch.long), weight=torch.ones(4))


def test_label_smoothing_above_one_raises():
    with pytest.raises(ValueError, match="label_smoothing"):
        ts.cross_entropy(torch.randn(3, 5), torch.zeros(3, dtype=torch.long), label_smoothing=1.5)


@pytest.mark.parametrize("smoothing", [-0.1, float("nan")])
@pytest.mark.parametrize("kind", ["index", "probability"])
def test_label_smoothing_negative_or_nan_means_none(smoothing, kind):
    # torch takes its unsmoothed branch for any label_smoothing that is not > 0.
    x = torch.randn(6, 5, device=DEVICE)
    target = torch.randint(0, 5, (6,), device=DEVICE) if kind == "index" else _probabilities((6, 5))
    _check(x, target, label_smoothing=smoothing)


def test_ignore_index_with_probabilities_raises():
    with pytest.raises(ValueError, match="ignore_index"):
        ts.cross_entropy(torch.randn(3, 5), torch.rand(3, 5), ignore_index=1)


def test_weight_requiring_grad_raises():
    weight = torch.ones(5, requires_grad=True)
    with pytest.raises(ValueError, match="not differentiable with respect to weight"):
        ts.cross_entropy(torch.randn(3, 5), torch.zeros(3, dtype=torch.long), weight=weight)
    with torch.no_grad():
        ts.cross_entropy(torch.randn(3, 5), torch.zeros(3, dtype=torch.long), weight=weight)


def test_backward_op_validates_its_operands():
    x = torch.randn(5, 8, device=DEVICE)
    target = torch.zeros(5, dtype=torch.long, device=DEVICE)
    _, _, stats = ce_ops.cross_entropy_forward(x, target, None)
    with pytest.raises(ValueError, match=r"grad_loss must have shape \(5,\)"):
        ce_ops.cross_entropy_backward(torch.ones(2, device=DEVICE), None, x, target, None, stats)
    with pytest.raises(ValueError, match=r"stats must be"):
        ce_ops.cross_entropy_backward(
            torch.ones(5, device=DEVICE), None, x, target, None, stats[:2]
        )
    with pytest.raises(ValueError, match="rows do not overlap"):
        ce_ops.cross_entropy_backward(
            torch.ones(5, device=DEVICE), None, x, target, None, stats, out=x[:1].expand(5, 8)
        )


def test_reduction_name_raises():
    with pytest.raises(ValueError, match="reduction"):
        ts.cross_entropy(torch.randn(3, 5), torch.zeros(3, dtype=torch.long), reduction="avg")


# ---- registration, compilation, paths -------------------------------------------------------


@pytest.mark.parametrize("kind", ["index", "probability"])
def test_opcheck(kind):
    x = torch.randn(6, 9, device=DEVICE, requires_grad=True)
    if kind == "index":
        target = torch.tensor([0, 8, -100, 3, 3, 1], device=DEVICE)
    else:
        target = _probabilities((6, 9))
    weight = torch.rand(9, device=DEVICE)
    op = torch.ops.triton_softmax.cross_entropy.default
    options = CEOptions(label_smoothing=0.2, z_loss=1e-3, softcap=4.0).flat()
    for args in [
        (x, target, None, *CEOptions().flat(), False),
        (x, target, weight, *options, False),
    ]:
        torch.library.opcheck(op, args)
    _, _, stats = op(x.detach(), target, weight, *options, False)
    backward_args = (
        torch.rand(6, device=DEVICE),
        torch.randn(6, device=DEVICE),
        x.detach(),
        target,
        weight,
        stats,
        *options,
    )
    torch.library.opcheck(torch.ops.triton_softmax.cross_entropy_backward.default, backward_args)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_no_graph_breaks(backend):
    def f(x, target, weight):
        return ts.cross_entropy(x, target, weight=weight, label_smoothing=0.1, ignore_index=2)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    weight = torch.rand(7, device=DEVICE) + 0.5
    target = torch.randint(0, 7, (10,), device=DEVICE)
    x = torch.randn(10, 7, device=DEVICE, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    loss = compiled(x, target, weight)
    loss.backward()
    F.cross_entropy(x_ref, target, weight=weight, label_smoothing=0.1, ignore_index=2).backward()
    torch.testing.assert_close(loss, f(x_ref.detach(), target, weight))
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.skipif(DEVICE != "cpu", reason="the torch path serves CPU tensors")
@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("smoothing,softcap", [(0.0, 0.0), (0.2, 3.0)])
def test_torch_path_matches_kernels(monkeypatch, kind, smoothing, softcap):
    x = torch.randn(10, 33) * 2
    x[0, 4] = -math.inf
    if kind == "index":
        target = torch.randint(0, 33, (10,))
        target[1] = -100
    else:
        target = _probabilities((10, 33))
    weight = torch.rand(33) + 0.5
    options = CEOptions(label_smoothing=smoothing, z_loss=1e-3, softcap=softcap)
    upstream = (torch.rand(10), None)
    kernel = ce_ops.cross_entropy_forward(x, target, weight, options)
    kernel_grad = ce_ops.cross_entropy_backward(*upstream, x, target, weight, kernel[2], options)
    with_lse = (upstream[0], torch.randn(10))
    kernel_lse_grad = ce_ops.cross_entropy_backward(
        *with_lse, x, target, weight, kernel[2], options
    )
    monkeypatch.setattr(ce_ops, "kernel_path", lambda _: "torch")
    plain = ce_ops.cross_entropy_forward(x, target, weight, options)
    plain_grad = ce_ops.cross_entropy_backward(*upstream, x, target, weight, plain[2], options)
    plain_lse_grad = ce_ops.cross_entropy_backward(*with_lse, x, target, weight, plain[2], options)
    for a, b in zip(kernel, plain, strict=True):
        torch.testing.assert_close(a, b, equal_nan=True)
    torch.testing.assert_close(kernel_grad, plain_grad)
    torch.testing.assert_close(kernel_lse_grad, plain_lse_grad, equal_nan=True)


def test_row_offsets_beyond_int32():
    storage = torch.empty(2**31 + 64, dtype=torch.float16, device=DEVICE)
    x = storage.as_strided((2, 64), (2**31, 1))
    x.copy_(torch.randn(2, 64, device=DEVICE).half())
    target = torch.tensor([5, 60], device=DEVICE)
    ours = ts.cross_entropy(x, target, reduction="none")
    torch.testing.assert_close(
        ours.double(),
        F.cross_entropy(x.double(), target, reduction="none"),
        **TOLERANCES[torch.float16],
    )


def test_ignore_index_takes_any_integer_like():
    np = pytest.importorskip("numpy")
    x = torch.randn(4, 5, device=DEVICE)
    t = torch.tensor([0, -100, 2, 3], device=DEVICE)
    ref = F.cross_entropy(x, t)
    for ignore_index in (np.int64(-100), torch.tensor(-100)):
        torch.testing.assert_close(ts.cross_entropy(x, t, ignore_index=ignore_index), ref)


def test_zero_sum_weights_give_torchs_inf():
    x = torch.randn(2, 5, device=DEVICE, dtype=torch.float64)
    t = torch.tensor([0, 1], device=DEVICE)
    weight = torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0], device=DEVICE, dtype=torch.float64)
    torch.testing.assert_close(
        ts.cross_entropy(x, t, weight=weight), F.cross_entropy(x, t, weight=weight)
    )


def test_integer_class_weight_raises():
    with pytest.raises(TypeError, match="weight"):
        ts.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), weight=torch.ones(3).long())


# The two-pass path: a reduced loss's gradient formed in the forward (cross_entropy_forward's
# grad_out / grad_scale, the cross_entropy_reduced ops), only rescaled in the backward.
@pytest.mark.parametrize("n_classes", [1, 16, 33])  # with block_n 16: 1, 1 and 3 blocks
@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("block_n", [None, 16])  # held in one block, streamed over several
@pytest.mark.parametrize("in_place", [False, True])
def test_forward_writes_the_gradient(n_classes, kind, block_n, in_place):
    n = 9
    x, target, weight = _fp64_problem(n_classes, kind, n)
    options = CEOptions(ignore_index=-100, label_smoothing=0.15, z_loss=0.01, softcap=4.0)
    scale = torch.tensor(0.37, device=DEVICE, dtype=torch.float64)
    logits = x.clone()
    grad_out = logits if in_place else torch.full_like(x, math.nan)
    loss, lse, _ = ce_ops.cross_entropy_forward(
        logits, target, weight, options, grad_out=grad_out, grad_scale=scale, block_n=block_n
    )
    x_ref = x.clone().requires_grad_()
    capped = 4.0 * torch.tanh(x_ref / 4.0)
    loss_ref = F.cross_entropy(
        capped, target, weight=weight, reduction="none", label_smoothing=0.15
    )
    counted = (target != -100) if kind == "index" else torch.ones(n, dtype=torch.bool)
    loss_ref = loss_ref + 0.01 * torch.logsumexp(capped, -1) ** 2 * counted.to(DEVICE)
    torch.testing.assert_close(loss, loss_ref.detach())
    (loss_ref.sum() * scale).backward()
    torch.testing.assert_close(grad_out, x_ref.grad)


# The plain-torch path's loss with its gradient (class indices into an fp32 / fp64 buffer take
# a path of their own, five passes over the rows; probabilities the general one): options on
# and off, an ignored row holding +inf (its gradient exactly 0), -inf logits, in place or not.
@pytest.mark.parametrize(
    "weighted,smoothing,z_loss,softcap,temperature",
    [
        (False, 0.0, 0.0, None, 1.0),  # the common case
        (False, 0.1, 0.0, None, 1.0),
        (True, 0.0, 0.01, None, 1.0),
        (True, 0.15, 0.01, 4.0, 0.7),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("kind", ["index", "probability"])
def test_plain_path_forms_the_gradient(
    monkeypatch, weighted, smoothing, z_loss, softcap, temperature, dtype, in_place, kind
):
    monkeypatch.setattr(ce_ops, "kernel_path", lambda _: "torch")
    n, c = 6, 11
    x = torch.randn(n, c, dtype=torch.float64) * 3
    x[1, :4] = -math.inf
    target = torch.randint(0, c, (n,))
    target[0], target[1] = -100, 7
    if kind == "probability":  # no ignored row: its +inf would be counted
        x[0, 3] = 0.0
        target = torch.softmax(torch.randn(n, c, dtype=torch.float64), 1)
    weight = torch.rand(c, dtype=torch.float64) + 0.5 if weighted else None
    options = CEOptions(label_smoothing=smoothing, z_loss=z_loss, softcap=softcap or 0.0,
                        temperature=temperature)  # fmt: skip
    logits = x.to(dtype, copy=True)
    if kind == "index":
        logits[0, 3] = math.inf  # ignored: the loss and the gradient of its row are 0
    grad_out = logits if in_place else torch.full_like(logits, math.nan)
    scale = torch.tensor(0.37, dtype=dtype)
    loss, lse, _ = ce_ops.cross_entropy_forward(
        logits, target, weight, options, grad_out=grad_out, grad_scale=scale
    )
    x_ref = x.to(dtype).double().requires_grad_()
    u = x_ref if softcap is None else softcap * torch.tanh(x_ref / softcap)
    u = u / temperature
    loss_ref = F.cross_entropy(
        u, target, weight=weight, reduction="none", label_smoothing=smoothing
    )
    counted = (target != -100) if kind == "index" else torch.ones(n, dtype=torch.bool)
    loss_ref = loss_ref + z_loss * u.logsumexp(1) ** 2 * counted
    (loss_ref.sum() * 0.37).backward()
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(loss.double(), loss_ref.detach(), **tol)
    torch.testing.assert_close(lse[1:].double(), u.logsumexp(1)[1:].detach(), **tol)
    torch.testing.assert_close(grad_out.double(), x_ref.grad, **tol)
    assert kind == "probability" or (grad_out[0] == 0).all()


def test_plain_path_infinite_class_weight_with_smoothing_as_torch(monkeypatch):
    # The in-place path sums w_j (u_j - m), where an infinite weight on the row's largest
    # logit would meet a 0 (NaN); torch's per-class form gives inf, and so must the loss here.
    monkeypatch.setattr(ce_ops, "kernel_path", lambda _: "torch")
    z = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.5, 0.0]])
    target, weight = torch.tensor([0, 2]), torch.tensor([1.0, math.inf, 1.0])
    options = CEOptions(label_smoothing=0.1)
    loss, _, _ = ce_ops.cross_entropy_forward(
        z.clone(), target, weight, options, grad_out=torch.empty_like(z), grad_scale=torch.ones(())
    )
    ref = F.cross_entropy(z, target, weight=weight, reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize("inplace_backward", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["index", "probability"])
def test_reduced_loss_upstream_gradients(inplace_backward, reduction, kind):
    # loss.backward() (upstream 1: the buffer is returned as is), a scaled loss, and a second
    # backward through the same graph with another scale, which must not see the first one's.
    x = torch.randn(7, 20, device=DEVICE, dtype=torch.float64) * 2
    if kind == "index":
        target = torch.randint(0, 20, (7,), device=DEVICE)
        target[3] = -100
    else:
        target = _probabilities((7, 20)).double()
    weight = torch.rand(20, device=DEVICE, dtype=torch.float64) + 0.5
    options = dict(weight=weight, reduction=reduction, label_smoothing=0.1)
    for scales in ([1.0], [3.0], [2.5, -0.5]):
        leaf = x.clone().requires_grad_()
        logits = leaf * 1.0  # not a leaf: inplace_backward may overwrite it
        loss = ts.cross_entropy(logits, target, inplace_backward=inplace_backward, **options)
        x_ref = x.clone().requires_grad_()
        ref = F.cross_entropy(x_ref, target, **options)
        torch.testing.assert_close(loss, ref)
        for i, scale in enumerate(scales):
            last = i == len(scales) - 1
            grad = torch.autograd.grad(loss * scale, leaf, retain_graph=not last)[0]
            grad_ref = torch.autograd.grad(ref * scale, x_ref, retain_graph=not last)[0]
            torch.testing.assert_close(grad, grad_ref)


def test_reduced_loss_gradient_accumulates_into_a_leaf_twice():
    # The first backward may hand the forward's buffer to .grad; the second must not change it.
    x = torch.randn(5, 8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 8, (5,), device=DEVICE)
    loss = ts.cross_entropy(x, target)
    (loss * 2.0).backward(retain_graph=True)
    (loss * 5.0).backward()
    x_ref = x.detach().clone().requires_grad_()
    (F.cross_entropy(x_ref, target) * 7.0).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("shape", [(2, 3, 11), (11,)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduced_inplace_on_a_view_of_the_logits(shape, reduction):
    # (B, T, V).view(-1, V), and (C,) logits (taken as a (1, C) view): a Function that
    # overwrites a view may return one tensor only; these must still get torch's gradient.
    h = torch.randn(*shape[:-1], 8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 8, device=DEVICE, dtype=torch.float64)
    n = math.prod(shape[:-1])
    target = torch.randint(0, 11, (n,) if n > 1 or len(shape) > 1 else (), device=DEVICE)
    grads = []
    for ce, kwargs in ((F.cross_entropy, {}), (ts.cross_entropy, dict(inplace_backward=True))):
        logits = h @ w.T
        logits = logits.view(-1, 11) if len(shape) > 1 else logits
        loss = ce(logits, target, reduction=reduction, label_smoothing=0.1, **kwargs)
        grads.append(torch.autograd.grad(loss * 1.5, h)[0])
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("inplace_backward", [False, True])
def test_reduced_retained_graph_after_a_zero_or_tiny_upstream(inplace_backward):
    # The first backward's upstream gradient (0, 1e-300, inf) must not destroy the formed
    # gradient that a later backward through the retained graph rescales (was NaN / 0).
    x = torch.randn(4, 7, device=DEVICE, dtype=torch.float64)
    target = torch.randint(0, 7, (4,), device=DEVICE)
    x_ref = x.clone().requires_grad_()
    grad_ref = torch.autograd.grad(F.cross_entropy(x_ref, target) * 2.0, x_ref)[0]
    for first in (0.0, 1e-300, math.inf):
        leaf = x.clone().requires_grad_()
        loss = ts.cross_entropy(leaf * 1.0, target, inplace_backward=inplace_backward)
        torch.autograd.grad(loss * first, leaf, retain_graph=True)
        grad = torch.autograd.grad(loss * 2.0, leaf)[0]
        torch.testing.assert_close(grad, grad_ref)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_second_backward_without_retain_graph_raises(reduction):
    x = torch.randn(4, 7, device=DEVICE, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 7, (4,), device=DEVICE)
    loss = ts.cross_entropy(x, target, reduction=reduction).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


@pytest.mark.parametrize("inplace_backward", [False, True])
def test_reduced_double_backward_raises(inplace_backward):
    # A gradient penalty through the reduced ops would silently see no graph: it raises.
    x = torch.randn(4, 6, device=DEVICE, dtype=torch.float64)
    target = torch.randint(0, 5, (4,), device=DEVICE)
    w = torch.randn(5, 6, device=DEVICE, dtype=torch.float64, requires_grad=True)
    loss = ts.cross_entropy(x @ w.T, target, inplace_backward=inplace_backward)
    with pytest.raises(RuntimeError, match="reduction='none'"):
        torch.autograd.grad(loss, w, create_graph=True)


@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_per_row_double_backward_matches_torch(kind, inplace_backward):
    # reduction="none": a gradient penalty (loss + |dloss/dW|^2) as torch's.
    x = torch.randn(4, 6, device=DEVICE, dtype=torch.float64)
    if kind == "index":
        target = torch.tensor([0, 4, -100, 2], device=DEVICE)
    else:
        target = _probabilities((4, 5)).double()
    w0 = torch.randn(5, 6, device=DEVICE, dtype=torch.float64)
    options = dict(reduction="none", label_smoothing=0.1)
    grads = []
    for ce, extra in (
        (F.cross_entropy, {}),
        (ts.cross_entropy, dict(inplace_backward=inplace_backward)),
    ):
        w = w0.clone().requires_grad_()
        loss = ce(x @ w.T, target, **options, **extra).mean()
        (g,) = torch.autograd.grad(loss, w, create_graph=True)
        (loss + g.pow(2).sum()).backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[1], grads[0])


def test_per_row_gradgradcheck_with_extras():
    x = torch.randn(3, 5, device=DEVICE, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 2, 4], device=DEVICE)

    def f(x):
        return ts.cross_entropy(
            x, target, reduction="none", z_loss=0.1, softcap=3.0, return_lse=True,
            return_entropy=True,
        )  # fmt: skip

    assert torch.autograd.gradgradcheck(f, (x,))


def test_reduced_mean_of_no_probability_rows_is_nan():
    x = torch.randn(0, 5, device=DEVICE, requires_grad=True)
    target = torch.rand(0, 5, device=DEVICE)
    loss = ts.cross_entropy(x, target)
    assert loss.isnan()
    loss.backward()
    assert x.grad.shape == (0, 5)


def test_torch_path_z_loss_gradient_at_large_logits():
    # The plain-torch path's lse in fp32 at |x| ~ 1e4 lost 1e-4 in the z-loss's gradient.
    from triton_softmax.ops import _torch_math

    x = (torch.randn(5, 7, dtype=torch.float64) - 1e4).float()
    target = torch.randint(0, 7, (5,))
    x_ours = x.clone().requires_grad_()
    _torch_math.cross_entropy(x_ours, target, None, "mean", CEOptions(z_loss=0.1)).backward()
    x_ref = x.double().requires_grad_()
    lse = x_ref.logsumexp(1)
    (F.cross_entropy(x_ref, target) + 0.1 * (lse**2).mean()).backward()
    err = (x_ours.grad.double() - x_ref.grad).abs().max() / x_ref.grad.abs().max()
    assert err < 1e-6


def test_reduced_inplace_overwrites_the_logits_in_the_forward():
    x = torch.randn(4, 6, device=DEVICE, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 6, (4,), device=DEVICE)
    logits = x * 1.0
    loss = ts.cross_entropy(logits, target, inplace_backward=True)
    expected = torch.softmax(x.detach(), 1) - F.one_hot(target, 6).double()
    torch.testing.assert_close(logits.detach(), expected / 4)  # the mean's gradient, already
    loss.backward()
    torch.testing.assert_close(x.grad, expected / 4)


def test_no_grad_forward_takes_the_one_pass_op(monkeypatch):
    x = torch.randn(4, 6, device=DEVICE, requires_grad=True)
    target = torch.randint(0, 6, (4,), device=DEVICE)
    calls = []
    original = ce_ops.cross_entropy_forward

    def spy(*args, **kwargs):
        calls.append(kwargs.get("grad_out") is not None)
        return original(*args, **kwargs)

    monkeypatch.setattr(ce_ops, "cross_entropy_forward", spy)
    with torch.no_grad():
        ts.cross_entropy(x, target)
    ts.cross_entropy(x.detach(), target)
    ts.cross_entropy(x, target, reduction="none")
    assert calls == [False, False, False]
    ts.cross_entropy(x, target)
    assert calls[-1] is True


@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_opcheck_reduced(kind, reduction):
    x = torch.randn(5, 7, device=DEVICE)
    if kind == "index":
        target = torch.tensor([0, 6, -100, 3, 3], device=DEVICE)
    else:
        target = _probabilities((5, 7))
    weight = torch.rand(7, device=DEVICE) + 0.5
    options = CEOptions(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    args = (target, weight, *options.flat(), reduction)
    # Not test_aot_dispatch_dynamic: the backward rescales the forward's gradient output in
    # place, and AOT's partitioner refuses that when the caller also receives that output
    # (opcheck returns every output; the functional API drops it, and torch.compile over the
    # functional API is tested below).
    torch.library.opcheck(
        torch.ops.triton_softmax.cross_entropy_reduced.default,
        (x.requires_grad_(), *args),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    torch.library.opcheck(
        torch.ops.triton_softmax.cross_entropy_reduced_.default, (x.detach().clone(), *args)
    )
    grad, applied = torch.randn(5, 7, device=DEVICE), torch.ones((), device=DEVICE)
    torch.library.opcheck(
        torch.ops.triton_softmax.cross_entropy_scale_.default,
        (grad, applied, torch.tensor(2.0, device=DEVICE)),
    )


@pytest.mark.parametrize("inplace_backward", [False, True])
def test_reduced_compiles_fullgraph(inplace_backward):
    x = torch.randn(6, 10, device=DEVICE, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 10, (6,), device=DEVICE)

    def f(x):
        return 3.0 * ts.cross_entropy(x * 1.0, target, inplace_backward=inplace_backward)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    compiled(x).backward()
    x_ref = x.detach().clone().requires_grad_()
    (3.0 * F.cross_entropy(x_ref, target)).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_reduced_op_refuses_a_target_that_requires_grad():
    # Its backward forms only the logits' gradient: a target's would be silently missing.
    x = torch.randn(4, 6, device=DEVICE, requires_grad=True)
    q = _probabilities((4, 6)).requires_grad_()
    loss, _, _ = torch.ops.triton_softmax.cross_entropy_reduced(
        x, q, None, *CEOptions().flat(), "mean"
    )
    with pytest.raises(NotImplementedError, match="per-row op"):
        loss.backward()
    loss = ts.cross_entropy(x, q)  # the functional API routes it to the per-row op
    loss.backward()
    x_ref, q_ref = x.detach().clone().requires_grad_(), q.detach().clone().requires_grad_()
    F.cross_entropy(x_ref, q_ref).backward()
    torch.testing.assert_close(q.grad, q_ref.grad)


def test_scale_op_rescales_by_the_ratio():
    grad = torch.randn(3, 5, device=DEVICE, dtype=torch.float64)
    original = grad.clone()
    applied = torch.tensor(2.0, device=DEVICE, dtype=torch.float64)
    torch.ops.triton_softmax.cross_entropy_scale_(grad, applied, applied.clone())
    assert torch.equal(grad, original)  # factor 1: untouched
    torch.ops.triton_softmax.cross_entropy_scale_(grad, applied, torch.tensor(6.0).double())
    torch.testing.assert_close(grad, original * 3.0)
    assert applied.item() == 6.0
