"""The ops as torch sees them: torch.export, the mutating op, and the path without Triton."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DEVICE

import triton_softmax as ts


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
    exported = torch.export.export(
        model, (x, target), dynamic_shapes={"x": {0: batch}, "target": {0: batch}}
    )
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "triton_softmax.softmax.default" in targets
    assert "triton_softmax.cross_entropy.default" in targets
    x9, t9 = torch.randn(9, 4, device=DEVICE), torch.randint(0, 3, (9,), device=DEVICE)
    for ours, theirs in zip(exported.module()(x9, t9), model(x9, t9), strict=True):
        torch.testing.assert_close(ours, theirs)


def test_opcheck_inplace_backward_op():
    x = torch.randn(5, 8, device=DEVICE)
    target = torch.tensor([0, 7, -100, 2, 2], device=DEVICE)
    _, _, stats = torch.ops.triton_softmax.cross_entropy.default(
        x, target, None, -100, 0.1, 0.0, False
    )
    args = (torch.rand(5, device=DEVICE), None, x.clone(), target, None, stats, -100, 0.1, 0.0)
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
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
