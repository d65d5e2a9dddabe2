"""Fused linear + cross-entropy against F.cross_entropy(F.linear(...)) in float64.

N = 37 rows, H = 70 features, V = 150 classes; ``batch_chunk_size=16`` makes three chunks, the
last one short. Both CPU paths: the cross-entropy of each chunk runs our Triton kernels (under
the interpreter, as the session sets it) or, with ``path="plain"``, the plain-torch math that CPU
tensors take without the interpreter (cross_entropy's ``kernel_path`` patched to "torch").
"""

import itertools
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE

import triton_softmax as ts
from triton_softmax.ops import cross_entropy as ce_ops
from triton_softmax.ops import linear_cross_entropy as lce_ops
from triton_softmax.ops.options import CEOptions

N, H, V = 37, 70, 150
CHUNKS = 16  # rows per chunk where a test asks for several chunks: 16 + 16 + 5


@pytest.fixture(params=["kernel", "plain"])
def path(request, monkeypatch):
    """The chunks' cross-entropy through our kernels, or through the plain-torch math."""
    if request.param == "plain":
        if DEVICE != "cpu":
            pytest.skip("the plain-torch path serves CPU tensors")
        monkeypatch.setattr(ce_ops, "kernel_path", lambda _: "torch")
    return request.param


def _chunked(rows=CHUNKS, **fields):
    return torch.nn.LinearCrossEntropyOptions(batch_chunk_size=rows, **fields)


def _problem(kind, bias=True, dtype=torch.float64, batch=(N,)):
    x = torch.randn(*batch, H, device=DEVICE, dtype=dtype)
    w = (torch.randn(V, H, device=DEVICE, dtype=dtype) / H**0.5 * 3).to(dtype)
    b = torch.randn(V, device=DEVICE, dtype=dtype) if bias else None
    if kind == "index":
        target = torch.randint(0, V, batch, device=DEVICE)
        target.view(-1)[::6] = -100  # some ignored rows
    else:
        target = torch.softmax(torch.randn(*batch, V, device=DEVICE) * 2, -1).to(dtype)
    return x, w, b, target


def _reference(x, w, b, target, softcap=None, z_loss=0.0, **options):
    """The unfused computation in torch: logits, (softcap), cross-entropy, (z-loss)."""
    logits = F.linear(x, w, b)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    reduction = options.pop("reduction", "mean")
    if logits.dim() > 2:  # (B, T, V): torch wants the classes in dim 1
        logits = logits.movedim(-1, 1)
        target = target.movedim(-1, 1) if target.is_floating_point() else target
    loss = F.cross_entropy(logits, target, reduction="none", **options)
    logits = logits.movedim(1, -1) if logits.dim() > 2 else logits
    lse = torch.logsumexp(logits, -1)
    counted = target != -100 if not target.is_floating_point() else torch.ones_like(lse) > 0
    loss = loss + z_loss * lse**2 * counted
    if reduction == "sum":
        return loss.sum(), lse
    if reduction == "mean":
        if target.is_floating_point():
            return loss.mean(), lse
        weight = options.get("weight")
        w_t = 1.0 if weight is None else weight[target.clamp(0)]
        return loss.sum() / (w_t * counted).sum(), lse
    return loss, lse


def _check(x, w, b, target, atol=1e-10, **options):
    """Loss and the gradients of input, weight and bias against the unfused reference."""
    ours = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    refs = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    loss = ts.linear_cross_entropy(ours[0], ours[1], target, linear_bias=ours[2], **options)
    options.pop("ignore_index", None)
    ref, _ = _reference(*refs, target, **options)
    assert loss.shape == ref.shape and loss.dtype == ref.dtype
    torch.testing.assert_close(loss, ref, atol=atol, rtol=atol, equal_nan=True)
    upstream = torch.rand_like(ref) + 0.5
    (loss * upstream).sum().backward()
    (ref * upstream).sum().backward()
    for ours_t, ref_t in zip(ours, refs, strict=True):
        if ours_t is not None:
            torch.testing.assert_close(ours_t.grad, ref_t.grad, atol=atol, rtol=atol)
    return ours


OPTIONS = list(
    itertools.product(
        ["index", "probability"],
        [False, True],  # class weights
        [0.0, 0.2],  # label_smoothing
        ["none", "mean", "sum"],
        [None, 20.0],  # softcap
    )
)


@pytest.mark.parametrize("kind,weighted,smoothing,reduction,softcap", OPTIONS)
def test_options_match_unfused_torch(kind, weighted, smoothing, reduction, softcap):
    x, w, b, target = _problem(kind)
    weight = torch.rand(V, device=DEVICE, dtype=torch.float64) + 0.1 if weighted else None
    _check(
        x, w, b, target,
        weight=weight, label_smoothing=smoothing, reduction=reduction, softcap=softcap,
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["index", "probability"])
def test_z_loss_and_lse(kind):
    x, w, b, target = _problem(kind)
    options = dict(z_loss=1e-3, softcap=30.0, label_smoothing=0.1, reduction="none")
    _check(x, w, b, target, **options)
    loss, lse = ts.linear_cross_entropy(x, w, target, linear_bias=b, return_lse=True, **options)
    torch.testing.assert_close(lse, _reference(x, w, b, target, **options)[1])


@pytest.mark.parametrize("batch", [(), (2, 9)], ids=["unbatched", "B,T"])
@pytest.mark.parametrize("kind", ["index", "probability"])
def test_input_shapes(batch, kind):
    x, w, b, target = _problem(kind, batch=batch)
    if kind == "index" and batch == ():
        target = torch.tensor(5, device=DEVICE)
    _check(x, w, b, target, reduction="none")
    _check(x, w, b, target, reduction="mean")


def test_without_bias_and_with_a_frozen_head():
    x, w, _, target = _problem("index", bias=False)
    _check(x, w, None, target)
    x = x.clone().requires_grad_()
    ts.linear_cross_entropy(x, w, target).backward()  # no gradient asked for the weight
    x_ref = x.detach().clone().requires_grad_()
    F.cross_entropy(F.linear(x_ref, w), target).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_k_dimensional_loss_as_torch():
    # torch's out_features: linear_weight (V, d, H) gives logits (N, V, d).
    x = torch.randn(5, H, device=DEVICE, dtype=torch.float64)
    w = torch.randn(V, 3, H, device=DEVICE, dtype=torch.float64) / H**0.5
    b = torch.randn(V, 3, device=DEVICE, dtype=torch.float64)
    target = torch.randint(0, V, (5, 3), device=DEVICE)
    loss = ts.linear_cross_entropy(x, w, target, linear_bias=b, reduction="none")
    logits = torch.einsum("nh,vdh->nvd", x, w) + b
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, reduction="none"))


def test_matches_torchs_own_function_where_it_exists():
    if not hasattr(F, "linear_cross_entropy"):
        pytest.skip("this torch has no torch.nn.functional.linear_cross_entropy (< 2.13)")
    x, w, b, target = _problem("index")
    weight = torch.rand(V, device=DEVICE, dtype=torch.float64)
    for options in (dict(), dict(weight=weight, label_smoothing=0.1, reduction="sum")):
        torch.testing.assert_close(
            ts.linear_cross_entropy(x, w, target, linear_bias=b, **options),
            F.linear_cross_entropy(x, w, target, linear_bias=b, **options),
        )


def test_bf16_close_to_the_float64_reference():
    x, w, b, target = _problem("index", dtype=torch.bfloat16)
    loss = ts.linear_cross_entropy(x.requires_grad_(), w, target, linear_bias=b)
    ref, _ = _reference(x.double(), w.double(), b.double(), target)
    assert loss.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref, atol=2e-2, rtol=2e-2)
    loss.backward()
    x_ref = x.detach().double().requires_grad_()
    _reference(x_ref, w.double(), b.double(), target)[0].backward()
    torch.testing.assert_close(x.grad.double(), x_ref.grad, atol=1e-2, rtol=5e-2)


def test_ignored_rows_get_no_gradient_and_all_ignored_mean_is_nan():
    x, w, b, target = _problem("index")
    x.requires_grad_()
    ts.linear_cross_entropy(x, w, target, linear_bias=b).backward()
    assert (x.grad[target == -100] == 0).all()
    x.grad = None
    loss = ts.linear_cross_entropy(x, w, torch.full_like(target, -100), linear_bias=b)
    ref = F.cross_entropy(F.linear(x.detach(), w, b), torch.full_like(target, -100))
    assert torch.isnan(loss) and torch.isnan(ref)
    loss.backward()
    assert (x.grad == 0).all()


def test_errors_name_the_problem():
    x, w, b, target = _problem("index")
    with pytest.raises(ValueError, match="features"):
        ts.linear_cross_entropy(x, w[:, :-1], target)
    with pytest.raises(ValueError, match="linear_bias"):
        ts.linear_cross_entropy(x, w, target, linear_bias=b[:-1])
    with pytest.raises(ValueError, match="class-index target shape"):
        ts.linear_cross_entropy(x, w, target[:-1])
    with pytest.raises(IndexError, match=str(V)):
        ts.linear_cross_entropy(x, w, torch.full_like(target, V))
    with pytest.raises(TypeError, match="dtype"):
        ts.linear_cross_entropy(x, w.float(), target)
    with pytest.raises(ValueError, match="ignore_index"):
        ts.linear_cross_entropy(x, w, _problem("probability")[3], ignore_index=-100)
    q = _problem("probability")[3].requires_grad_()
    loss = ts.linear_cross_entropy(x, w.clone().requires_grad_(), q)
    with pytest.raises(NotImplementedError, match="probability targets"):
        loss.backward()


def test_module_as_torchs():
    torch.manual_seed(0)
    crit = ts.LinearCrossEntropyLoss(H, V, bias=True, label_smoothing=0.1, dtype=torch.float64)
    crit = crit.to(DEVICE)
    x, _, _, target = _problem("index")
    loss = crit(x, target)
    ref = F.cross_entropy(crit.linear(x), target, label_smoothing=0.1)
    torch.testing.assert_close(loss, ref)
    assert set(crit.state_dict()) == {"linear.weight", "linear.bias"}
    if hasattr(torch.nn, "LinearCrossEntropyLoss"):
        theirs = torch.nn.LinearCrossEntropyLoss(H, V, bias=True, label_smoothing=0.1)
        assert set(theirs.state_dict()) == set(crit.state_dict())
    loss, lse = ts.LinearCrossEntropyLoss(H, V, return_lse=True, dtype=torch.float64).to(DEVICE)(
        x, target
    )
    assert lse.shape == (N,)


def test_opcheck():
    x, w, b, target = _problem("index")
    x, w = x[:20, :40].clone(), w[:70, :40].clone()
    b, target = b[:70].clone(), target[:20].clamp(max=69)
    weight = torch.rand(70, device=DEVICE, dtype=torch.float64)
    op = torch.ops.triton_softmax.linear_cross_entropy.default
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), target, weight)
    options = CEOptions(label_smoothing=0.1, z_loss=1e-3, softcap=10.0).flat()
    torch.library.opcheck(op, (*args, *options))
    _, _, stats = op(x.detach(), w.detach(), b.detach(), target, weight, *options)
    backward = torch.ops.triton_softmax.linear_cross_entropy_backward.default
    grads = (torch.rand(20, device=DEVICE, dtype=torch.float64), None)
    tensors = (x.detach(), w.detach(), b.detach(), target, weight, stats)
    torch.library.opcheck(backward, (*grads, *tensors, *options, [True, True, True]))


def test_compile_fullgraph_and_export():
    x, w, b, target = _problem("index")

    def f(x, w, b, t):
        return ts.linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=0.1)

    torch._dynamo.reset()
    x = x.requires_grad_()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, w, b, target)
    loss.backward()
    x_ref = x.detach().clone().requires_grad_()
    ref = F.cross_entropy(F.linear(x_ref, w, b), target, label_smoothing=0.1)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(x.grad, x_ref.grad)

    class Head(torch.nn.Module):
        def forward(self, x, t):
            return f(x, w, b, t)

    exported = torch.export.export(Head(), (x.detach(), target))
    torch.testing.assert_close(exported.module()(x.detach(), target), ref)


def test_forward_mode_ad_and_torch_func():
    x, w, b, target = _problem("index")
    v = torch.randn_like(x)

    def ours(a):
        return ts.linear_cross_entropy(a, w, target, linear_bias=b, softcap=10.0)

    def theirs(a):
        return _reference(a, w, b, target, softcap=10.0)[0]

    for transform in (
        lambda f: torch.func.jvp(f, (x,), (v,)),
        lambda f: torch.func.grad(f)(x),
    ):
        torch.testing.assert_close(transform(ours), transform(theirs))


@pytest.mark.slow  # 50 GFLOP and 0.27 G logits on the plain-torch path: minutes when loaded
@pytest.mark.skipif(DEVICE != "cpu", reason="the plain-torch path serves CPU tensors")
def test_cpu_path_never_holds_the_logits():
    # N x V fp32 logits would be 1 GiB; the chunked path must stay far below that.
    script = textwrap.dedent(
        """
        import torch
        import triton_softmax as ts

        def peak_kib():  # this process's own high-water mark (ru_maxrss inherits the parent's)
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))

        assert ts.kernel_path(torch.zeros(1)) == "torch"
        n, h, v = 8192, 32, 32768
        x = torch.randn(n, h, requires_grad=True)
        w = (torch.randn(v, h) / h**0.5).requires_grad_()
        t = torch.randint(0, v, (n,))
        ts.linear_cross_entropy(x[:64], w, t[:64]).backward()  # warm up allocator, kernels
        x.grad = w.grad = None
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = peak_kib()
        ts.linear_cross_entropy(x, w, t, label_smoothing=0.1).backward()
        print((peak_kib() - before) // 1024)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    extra_mib = int(result.stdout.strip().splitlines()[-1])
    assert extra_mib < 0.1 * 1024, f"peak RSS grew by {extra_mib} MiB (full logits: 1024 MiB)"


def test_degenerate_shapes_and_arguments_as_torch():
    target = torch.tensor([0, 1, 2], device=DEVICE)
    no_features = ts.linear_cross_entropy(
        torch.randn(3, 0, device=DEVICE), torch.randn(5, 0, device=DEVICE), target
    )
    torch.testing.assert_close(no_features, torch.tensor(5.0, device=DEVICE).log())
    x, w = torch.randn(4, device=DEVICE), torch.randn(5, 4, device=DEVICE)
    one = torch.tensor([1], device=DEVICE)
    torch.testing.assert_close(
        ts.linear_cross_entropy(x, w, one), F.cross_entropy(F.linear(x, w)[None], one)
    )
    with pytest.raises(ValueError, match="label_smoothing"):
        ts.LinearCrossEntropyLoss(4, 5, label_smoothing=1.1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["index", "probability"])
def test_every_option_over_chunks_on_both_paths(path, kind, reduction):
    # Loss, lse and the gradients of input, weight and bias, with the lse's gradient too, in
    # three chunks: class weights, ignored rows, smoothing, z-loss and soft-capping at once.
    x, w, b, target = _problem(kind)
    options = dict(
        weight=torch.rand(V, device=DEVICE, dtype=torch.float64) + 0.1,
        label_smoothing=0.1,
        z_loss=1e-3,
        softcap=20.0,
        reduction=reduction,
    )
    ours = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    refs = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    loss, lse = ts.linear_cross_entropy(
        ours[0], ours[1], target, linear_bias=ours[2], return_lse=True, options=_chunked(),
        **options,
    )  # fmt: skip
    ref, ref_lse = _reference(*refs, target, **options)
    torch.testing.assert_close(loss, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)
    up, up_lse = torch.rand_like(ref) + 0.5, torch.randn_like(ref_lse)
    ((loss * up).sum() + (lse * up_lse).sum()).backward()
    ((ref * up).sum() + (ref_lse * up_lse).sum()).backward()
    for ours_t, ref_t in zip(ours, refs, strict=True):
        torch.testing.assert_close(ours_t.grad, ref_t.grad, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradients_bitwise_reproducible(path, reduction):
    x, w, b, target = _problem("index", dtype=torch.float32)
    runs = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        loss = ts.linear_cross_entropy(
            leaves[0], leaves[1], target, linear_bias=leaves[2], reduction=reduction,
            options=_chunked(),
        )  # fmt: skip
        loss.sum().backward()
        runs.append([loss.detach(), *(t.grad for t in leaves)])
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


def test_the_fused_path_has_no_atomics():
    # The chunk loop is the vendor's GEMMs and cross_entropy's kernels; none may use atomics
    # (gradients bitwise reproducible, no fences). No Triton kernel of its own.
    import inspect
    import re

    from triton.runtime import JITFunction
    from triton.runtime.interpreter import InterpretedFunction

    from triton_softmax.ops import cross_entropy_kernels as ce_kernels

    def kernels(module):
        kinds = (JITFunction, InterpretedFunction)
        return [v for v in vars(module).values() if isinstance(v, kinds)]

    atomic = re.compile(r"atomic_\w*\(")  # tl.atomic_add(...), tl.atomic_cas(...), ...
    assert not kernels(lce_ops) and not atomic.search(inspect.getsource(lce_ops))
    assert kernels(ce_kernels)
    for kernel in kernels(ce_kernels):
        assert not atomic.search(inspect.getsource(kernel.fn)), kernel.fn.__name__


def test_chunk_size_from_torchs_options(monkeypatch):
    seen = []
    original = ce_ops.cross_entropy_forward

    def spy(*args, **kwargs):
        seen.append(args[0].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(ce_ops, "cross_entropy_forward", spy)
    x, w, b, target = _problem("index")
    for options, rows in (
        (_chunked(5), [5] * 7 + [2]),
        (torch.nn.LinearCrossEntropyOptions(chunking_method="aspect_ratio"), [16, 16, 5]),
        (torch.nn.LinearCrossEntropyOptions(chunking_method="aspect_ratio:2"), [8] * 4 + [5]),
        (torch.nn.LinearCrossEntropyOptions(chunking_method=None), [N]),
    ):
        seen.clear()
        ts.linear_cross_entropy(x, w, target, linear_bias=b, options=options)
        assert seen == rows, options
        seen.clear()  # the reduced op with gradients chunks the same way
        ts.linear_cross_entropy(x.requires_grad_(), w, target, options=options).backward()
        assert seen == rows, options
        x = x.detach()
    monkeypatch.setitem(lce_ops.CHUNK_BYTES, DEVICE, 40 * V * 8)  # default: fit the budget
    seen.clear()
    ts.linear_cross_entropy(x, w, target, linear_bias=b)
    assert seen == [37]
    monkeypatch.setitem(lce_ops.CHUNK_BYTES, DEVICE, 20 * V * 8)
    seen.clear()
    ts.linear_cross_entropy(x, w, target, linear_bias=b)
    assert seen == [20, 17]
    with pytest.raises(ValueError, match="chunk sizes"):
        ts.linear_cross_entropy(x, w, target, options=_chunked(3, chunking_method="aspect_ratio"))
    with pytest.raises(TypeError, match="LinearCrossEntropyOptions"):
        ts.linear_cross_entropy(x, w, target, options={"batch_chunk_size": 4})


@pytest.mark.parametrize("allow_retain_graph", [False, True])
def test_backward_twice_through_a_retained_graph(allow_retain_graph):
    # The first backward keeps the graph: it scales copies, leaving the formed gradients for
    # the second, which (the graph then freed) scales them in place, by another upstream
    # gradient; allow_retain_graph=True makes both scale copies. Either way: torch's results.
    x, w, b, target = _problem("index")
    x.requires_grad_()
    w.requires_grad_()
    options = _chunked(allow_retain_graph=allow_retain_graph)
    loss = ts.linear_cross_entropy(x, w, target, linear_bias=b, options=options)
    loss.backward(retain_graph=True)
    once = x.grad.clone(), w.grad.clone()
    (3.0 * loss).backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    F.cross_entropy(F.linear(x_ref, w_ref, b), target).backward()
    for ours, first, ref in zip((x.grad, w.grad), once, (x_ref.grad, w_ref.grad), strict=True):
        torch.testing.assert_close(first, ref)
        torch.testing.assert_close(ours, 4 * ref)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()  # the graph was freed by the last backward, as torch's


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_as_torch(path, reduction):
    # Hessian-vector products through the input and the head (create_graph=True), which the
    # backward serves with torch's own functions; the first-order gradients still match.
    x, w, b, target = _problem("index")
    options = dict(reduction=reduction, label_smoothing=0.1, softcap=20.0, z_loss=1e-3)
    results = []
    for fused in (True, False):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        if fused:
            loss = ts.linear_cross_entropy(
                leaves[0], leaves[1], target, linear_bias=leaves[2], options=_chunked(),
                **options,
            )  # fmt: skip
        else:
            loss = _reference(*leaves, target, **options)[0]
        grads = torch.autograd.grad(loss.sum(), leaves, create_graph=True)
        penalty = sum((g * g).sum() for g in grads)
        results.append([*grads, *torch.autograd.grad(penalty, leaves)])
    for ours, ref in zip(*results, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)


def test_empty_positions_and_rows_as_torch(path):
    # torch's K-dimensional loss with no positions (linear_weight (V, 0, H)), and no rows.
    x = torch.randn(3, H, device=DEVICE, dtype=torch.float64)
    cases = [
        (x, torch.randn(V, 0, H, device=DEVICE, dtype=torch.float64), (3, 0), torch.randn(V, 0)),
        (x[:0], torch.randn(V, H, device=DEVICE, dtype=torch.float64), (0,), torch.randn(V)),
        (x[:0], torch.randn(V, 2, H, device=DEVICE, dtype=torch.float64), (0, 2), None),
    ]
    for inputs, w, batch, b in cases:
        b = None if b is None else b.to(DEVICE, torch.float64)
        target = torch.zeros(batch, dtype=torch.long, device=DEVICE)
        for reduction in ("mean", "sum", "none"):
            ours_leaves = [t.clone().requires_grad_() for t in (inputs, w)]
            ref_leaves = [t.clone().requires_grad_() for t in (inputs, w)]
            ours = ts.linear_cross_entropy(*ours_leaves, target, linear_bias=b, reduction=reduction)
            ref = F.linear_cross_entropy(*ref_leaves, target, linear_bias=b, reduction=reduction)
            assert ours.shape == ref.shape and ours.dtype == ref.dtype
            torch.testing.assert_close(ours, ref, equal_nan=True)
            assert ours.grad_fn is not None and ref.grad_fn is not None
            ours.sum().backward()
            ref.sum().backward()
            for a, r in zip(ours_leaves, ref_leaves, strict=True):
                torch.testing.assert_close(a.grad, r.grad, equal_nan=True)


def test_module_label_smoothing_nan_as_torch():
    # torch's constructor accepts NaN (it means no smoothing in F.cross_entropy).
    torch.manual_seed(0)
    ours = ts.LinearCrossEntropyLoss(H, V, label_smoothing=math.nan, dtype=torch.float64)
    torch.manual_seed(0)
    theirs = torch.nn.LinearCrossEntropyLoss(H, V, label_smoothing=math.nan, dtype=torch.float64)
    x, _, _, target = _problem("index")
    ours, theirs = ours.to(DEVICE), theirs.to(DEVICE)
    torch.testing.assert_close(ours(x, target), theirs(x, target))
    for bad in (-0.1, 1.1):
        with pytest.raises(ValueError, match="label_smoothing"):
            ts.LinearCrossEntropyLoss(H, V, label_smoothing=bad)


def test_opcheck_reduced():
    x, w, b, target = _problem("index")
    x, w = x[:20, :40].clone(), w[:70, :40].clone()
    b, target = b[:70].clone(), target[:20].clamp(max=69)
    weight = torch.rand(70, device=DEVICE, dtype=torch.float64)
    op = torch.ops.triton_softmax.linear_cross_entropy_reduced.default
    denominator = torch.tensor(7.0, device=DEVICE, dtype=torch.float64)
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), target, weight)
    flat = CEOptions(label_smoothing=0.1, z_loss=1e-3, softcap=10.0).flat()
    options = (*flat, denominator, [True, True, True], 8)
    # Without keep_gradients the backward scales the gradients the forward returns in place,
    # which AOT's partitioner refuses ("Node mul was invalid, but is output"): not
    # test_aot_dispatch_dynamic there (keep_gradients=True passes every test).
    torch.library.opcheck(
        op,
        (*args, *options),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    torch.library.opcheck(op, (*args, *options, True))
