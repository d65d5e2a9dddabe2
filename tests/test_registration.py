"""The ops as torch sees them: torch.export, torch.func and forward-mode AD, autocast, threads,
torch.compile corners, the mutating op, and the path without Triton."""

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from conftest import DEVICE

import triton_softmax as ts
from triton_softmax.ops.options import CEOptions


class _Classifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x, target):
        logits = self.linear(x)
        return ts.softmax(logits, dim=-1), ts.cross_entropy(logits, target, label_smoothing=0.1)


def test_torch_export():
    model = _Classifier().to(DEVICE)
    x = torch.randn(6, 4, device=DEVICE)
    target = torch.randint(0, 3, (6,), device=DEVICE)
    batch = torch.export.Dim("batch", min=2)
    x9, t9 = torch.randn(9, 4, device=DEVICE), torch.randint(0, 3, (9,), device=DEVICE)
    # With grad enabled the mean loss of logits that require grad takes the op that writes the
    # gradient in the forward; under no_grad the forward-only op.
    for grad, loss_op in ((True, "cross_entropy_reduced"), (False, "cross_entropy")):
        with torch.set_grad_enabled(grad):
            exported = torch.export.export(
                model, (x, target), dynamic_shapes={"x": {0: batch}, "target": {0: batch}}
            )
            nodes = exported.graph.nodes
            targets = {str(node.target) for node in nodes if node.op == "call_function"}
            assert "triton_softmax.softmax.default" in targets
            assert f"triton_softmax.{loss_op}.default" in targets, targets
            for ours, theirs in zip(exported.module()(x9, t9), model(x9, t9), strict=True):
                torch.testing.assert_close(ours, theirs)


def test_opcheck_inplace_backward_op():
    x = torch.randn(5, 8, device=DEVICE)
    target = torch.tensor([0, 7, -100, 2, 2], device=DEVICE)
    options = CEOptions(label_smoothing=0.1).flat()
    _, _, stats = torch.ops.triton_softmax.cross_entropy.default(x, target, None, *options)
    args = (torch.rand(5, device=DEVICE), None, x.clone(), target, None, stats, *options)
    torch.library.opcheck(torch.ops.triton_softmax.cross_entropy_backward_.default, args)


@pytest.mark.skipif(DEVICE != "cpu", reason="the plain-torch path serves CPU tensors")
def test_cpu_without_interpreter_takes_the_torch_path():
    script = textwrap.dedent(
        """
        import torch, torch.nn.functional as F
        import triton_softmax as ts
        assert ts.kernel_path(torch.zeros(1)) == "torch", ts.kernel_path(torch.zeros(1))
        x = torch.randn(7, 33, dtype=torch.float64, requires_grad=True)
        t = torch.randint(0, 33, (7,)); t[0] = -100
        w = torch.rand(33, dtype=torch.float64)
        y = ts.softmax(x, dim=0) + ts.log_softmax(x, dim=1)
        loss = ts.cross_entropy(x, t, weight=w, label_smoothing=0.2) + y.sum()
        loss.backward()
        ref = x.detach().clone().requires_grad_()
        ref_y = torch.softmax(ref, 0) + torch.log_softmax(ref, 1)
        (F.cross_entropy(ref, t, weight=w, label_smoothing=0.2) + ref_y.sum()).backward()
        torch.testing.assert_close(loss, F.cross_entropy(ref, t, weight=w, label_smoothing=0.2)
                                   + ref_y.sum())
        torch.testing.assert_close(x.grad, ref.grad)
        assert torch.autograd.gradcheck(
            lambda a: ts.cross_entropy(a, t, weight=w, label_smoothing=0.2, z_loss=0.1), (x,))

        # torch's own functions compute every torch option here: bit-for-bit torch's results
        # (speed: python -m benchmarks.cpu_path).
        x32 = torch.randn(64, 10, 3)
        q = torch.softmax(torch.randn(64, 10, 3), 1)
        t32 = torch.randint(0, 10, (64, 3)); t32[::7] = 4
        w32 = torch.rand(10)
        for reduction in ("none", "mean", "sum"):
            for target, extra in ((t32, dict(ignore_index=4)), (q, {})):
                for options in (extra, dict(extra, weight=w32, label_smoothing=0.1)):
                    a = x32.clone().requires_grad_()
                    b = x32.clone().requires_grad_()
                    ours = ts.cross_entropy(a, target, reduction=reduction, **options)
                    ref = F.cross_entropy(b, target, reduction=reduction, **options)
                    assert torch.equal(ours, ref), (reduction, options)
                    ours.sum().backward(); ref.sum().backward()
                    assert torch.equal(a.grad, b.grad), (reduction, options)
        for dim in (0, 1, 2):
            assert torch.equal(ts.softmax(x32, dim), torch.softmax(x32, dim))
            assert torch.equal(ts.log_softmax(x32, dim), torch.log_softmax(x32, dim))
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


# torch.func transforms and forward-mode AD: torch's composite functions compute these calls
# (the registered ops implement neither), so they must give torch's numbers, never a silent zero.
def _ce_smoothed(ce):
    return lambda x, t: ce(x, t, label_smoothing=0.1)


TRANSFORM_CASES = {
    "softmax": (lambda x, t: ts.softmax(x, -1), lambda x, t: F.softmax(x, -1)),
    "log_softmax": (lambda x, t: ts.log_softmax(x, 0), lambda x, t: F.log_softmax(x, 0)),
    "cross_entropy": (_ce_smoothed(ts.cross_entropy), _ce_smoothed(F.cross_entropy)),
}


@pytest.mark.parametrize("case", TRANSFORM_CASES)
def test_torch_func_transforms_match_torch(case):
    ours, theirs = TRANSFORM_CASES[case]
    x = torch.randn(4, 5, dtype=torch.float64, device=DEVICE)
    v = torch.randn_like(x)
    t = torch.randint(0, 5, (4,), device=DEVICE)
    for transform in (
        lambda f: torch.func.jvp(lambda a: f(a, t), (x,), (v,)),
        lambda f: torch.func.jacrev(lambda a: f(a, t))(x),
        lambda f: torch.func.jacfwd(lambda a: f(a, t))(x),
        lambda f: torch.func.vmap(lambda a, b: f(a[None], b[None]))(x, t),
    ):
        torch.testing.assert_close(transform(ours), transform(theirs))
    if case == "cross_entropy":
        for transform in (
            lambda f: torch.func.grad(lambda a: f(a, t))(x),
            lambda f: torch.func.hessian(lambda a: f(a, t))(x),
            lambda f: torch.func.vmap(torch.func.grad(lambda a, b: f(a[None], b[None])))(x, t),
        ):
            torch.testing.assert_close(transform(ours), transform(theirs))


def test_forward_mode_ad_matches_torch():
    x = torch.randn(6, 7, dtype=torch.float64, device=DEVICE)
    v = torch.randn_like(x)
    t = torch.randint(0, 7, (6,), device=DEVICE)
    t[0] = -100
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, v)
        cases = [
            (ts.softmax(dual, 1), F.softmax(dual, 1)),
            (ts.log_softmax(dual, 0), F.log_softmax(dual, 0)),
            (
                ts.cross_entropy(dual, t, z_loss=1e-2),
                F.cross_entropy(dual, t)
                + 1e-2 * (torch.logsumexp(dual, 1)[1:] ** 2).sum() / (t != -100).sum(),
            ),
        ]
        for ours, theirs in cases:
            ours_tangent = fwAD.unpack_dual(ours).tangent
            assert ours_tangent is not None
            torch.testing.assert_close(ours_tangent, fwAD.unpack_dual(theirs).tangent)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_follows_torch(dtype):
    # torch's autocast runs cross_entropy in float32 on CPU and CUDA, softmax and log_softmax
    # in float32 on CUDA only: our results take the dtypes torch's do, with torch's values.
    x = torch.randn(8, 33, device=DEVICE).to(dtype)
    t = torch.randint(0, 33, (8,), device=DEVICE)
    with torch.autocast(DEVICE, dtype=dtype):
        pairs = [
            (ts.softmax(x, -1), F.softmax(x, -1)),
            (ts.log_softmax(x, -1), F.log_softmax(x, -1)),
            (ts.cross_entropy(x, t), F.cross_entropy(x, t)),
            (
                ts.cross_entropy(x, torch.softmax(x.float(), -1)),
                F.cross_entropy(x, torch.softmax(x.float(), -1)),
            ),
        ]
    for ours, theirs in pairs:
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours.float(), theirs.float(), atol=2e-2, rtol=2e-2)


def test_concurrent_calls_from_threads():
    # Triton's interpreter keeps global state; our launches take turns on a lock.
    errors = []

    def work(seed):
        try:
            g = torch.Generator().manual_seed(seed)
            for _ in range(3):
                x = torch.randn(5, 17 + seed, generator=g, dtype=torch.float64).to(DEVICE)
                t = torch.randint(0, 17 + seed, (5,), generator=g).to(DEVICE)
                torch.testing.assert_close(ts.softmax(x, -1), F.softmax(x, -1))
                torch.testing.assert_close(ts.cross_entropy(x, t), F.cross_entropy(x, t))
        except Exception as error:  # noqa: BLE001 - reported below with its thread
            errors.append((seed, error))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def test_compile_fullgraph_with_implicit_dim():
    x = torch.randn(3, 4, device=DEVICE)
    compiled = torch.compile(lambda a: ts.softmax(a), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), F.softmax(x, 1))


def test_check_targets_under_compile():
    x = torch.randn(4, 5, device=DEVICE)
    good = torch.tensor([0, 1, 4, -100], device=DEVICE)
    compiled = torch.compile(
        lambda a, t: ts.cross_entropy(a, t, check_targets=True), backend="aot_eager"
    )
    torch.testing.assert_close(compiled(x, good), F.cross_entropy(x, good))
    with pytest.raises(IndexError, match="5"):
        compiled(x, torch.tensor([0, 1, 5, 2], device=DEVICE))


def test_kernel_path_of_a_meta_tensor_raises():
    with pytest.raises(ValueError, match="meta"):
        ts.kernel_path(torch.empty(2, device="meta"))


def test_transforms_inside_torch_compile():
    # torch.compile traces torch.func transforms too: the composite must be taken there as well.
    x = torch.randn(4, 5, dtype=torch.float64, device=DEVICE)
    v = torch.randn_like(x)
    t = torch.randint(0, 5, (4,), device=DEVICE)
    w = torch.randn(5, 5, dtype=torch.float64, device=DEVICE)

    def jvp_of(ce):
        return lambda a: torch.func.jvp(lambda q: ce(q, t), (a,), (v,))[1]

    def grad_of_linear(ce):
        return lambda a: torch.func.grad(lambda q: ce(x, q, t))(a)

    for make, ours, theirs, arg in (
        (jvp_of, ts.cross_entropy, F.cross_entropy, x),
        (
            jvp_of,
            lambda q, t: ts.log_softmax(q, 1).sum(),
            lambda q, t: F.log_softmax(q, 1).sum(),
            x,
        ),
        (grad_of_linear, ts.linear_cross_entropy, F.linear_cross_entropy, w),
    ):
        if theirs is F.linear_cross_entropy and not hasattr(F, "linear_cross_entropy"):
            continue
        torch._dynamo.reset()
        compiled = torch.compile(make(ours), backend="aot_eager")
        torch.testing.assert_close(compiled(arg), make(theirs)(arg))


def test_compile_fullgraph_with_probability_targets():
    x = torch.randn(4, 5, device=DEVICE)
    q = torch.softmax(torch.randn(4, 5, device=DEVICE), 1)
    w = torch.randn(5, 5, device=DEVICE)
    for f, ref in (
        (lambda: ts.cross_entropy(x, q), F.cross_entropy(x, q)),
        (lambda: ts.cross_entropy(x, q, return_lse=True)[0], F.cross_entropy(x, q)),
        (lambda: ts.linear_cross_entropy(x, w, q), F.cross_entropy(x @ w.T, q)),
    ):
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(), ref)


@pytest.mark.parametrize("extra", [dict(z_loss=1e-4), dict(return_lse=True), dict(softcap=5.0)])
def test_autocast_dtype_with_extras(extra):
    x = torch.randn(4, 6, device=DEVICE).bfloat16()
    t = torch.randint(0, 6, (4,), device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = ts.cross_entropy(x, t, **extra)
    out = out[0] if isinstance(out, tuple) else out
    assert out.dtype == torch.float32  # torch's autocast runs cross_entropy in float32
    h64 = torch.randn(3, 4, dtype=torch.float64, device=DEVICE)
    w64 = torch.randn(6, 4, dtype=torch.float64, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):  # float64 is not autocast's business
        assert ts.linear_cross_entropy(h64, w64, t[:3]).dtype == torch.float64
