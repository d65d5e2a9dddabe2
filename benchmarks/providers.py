"""The implementations the kernel benchmark compares, behind one calling convention.

Every provider turns an op name into a callable:

    softmax, log_softmax:  f(x [M, N]) -> y [M, N]             over the last dimension
    cross_entropy:         f(logits [M, V], target int64 [M]) -> scalar mean loss

Providers: ours (``triton-softmax``, and ``triton-softmax-inplace`` for cross-entropy with
``inplace_backward=True``), ``torch`` eager, ``torch.compile`` of the torch functions, and the peers
Liger-Kernel (``liger-kernel``) and quack (``quack-kernels``) when they are importable. The peers
are imported from their packages, never re-implemented here. A provider that cannot run a case
gives a reason (``skip_reason``) instead of raising; nothing is imported at import time.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F

from benchmarks.machine import package_version

OPS = ("softmax", "log_softmax", "cross_entropy")
MODES = ("forward", "backward", "forward+backward")

Fn = Callable[..., torch.Tensor]


class Provider:
    """One implementation of the ops.

    Attributes:
        name: the provider's name in CSVs, tables and plots.
        inplace: writes the logits' gradient into the logits (cross-entropy); the harness then
            gives it a private copy of the inputs so that it cannot corrupt anyone else's.
        package: the PyPI distribution it comes from, for the versions column.
    """

    name: str = ""
    inplace: bool = False
    package: str = "torch"

    def applies(self, op: str, mode: str) -> bool:
        """False for combinations that do not exist for this provider (no row is written)."""
        return True

    def skip_reason(self, op: str, mode: str, device: torch.device) -> str | None:
        """Why this provider cannot run ``op`` in ``mode`` on ``device``; None when it can."""
        return None

    def build(self, op: str) -> Fn:
        """The callable for ``op`` (called once per case: torch.compile compiles afresh)."""
        raise NotImplementedError

    def version(self) -> str | None:
        return package_version(self.package)


class Ours(Provider):
    """``triton_softmax``: the Triton kernels (or the interpreter / plain-torch path on a CPU)."""

    package = "triton-softmax"

    def __init__(self, inplace_backward: bool = False) -> None:
        self.inplace = inplace_backward
        self.name = "triton-softmax-inplace" if inplace_backward else "triton-softmax"

    def applies(self, op: str, mode: str) -> bool:
        # inplace_backward is a cross-entropy option that changes only forward+backward.
        return not self.inplace or (op, mode) == ("cross_entropy", "forward+backward")

    def build(self, op: str) -> Fn:
        import triton_softmax as ts

        if op == "softmax":
            return lambda x: ts.softmax(x, dim=-1)
        if op == "log_softmax":
            return lambda x: ts.log_softmax(x, dim=-1)
        inplace = self.inplace
        return lambda x, t: ts.cross_entropy(x, t, inplace_backward=inplace)


def _torch_fn(op: str) -> Fn:
    if op == "softmax":
        return lambda x: F.softmax(x, dim=-1)
    if op == "log_softmax":
        return lambda x: F.log_softmax(x, dim=-1)
    return lambda x, t: F.cross_entropy(x, t)


class TorchEager(Provider):
    """``torch.nn.functional`` in eager mode."""

    name = "torch"

    def build(self, op: str) -> Fn:
        return _torch_fn(op)


class TorchCompile(Provider):
    """``torch.compile(fullgraph=True, dynamic=False)`` of the ``torch.nn.functional`` call.

    Args:
        backend: the torch.compile backend; ``"inductor"`` for real numbers. Smoke runs use
            ``"eager"`` (Dynamo tracing only), because Inductor's C++ compile of every tiny CPU
            graph would take seconds each.
    """

    name = "torch.compile"

    def __init__(self, backend: str = "inductor") -> None:
        self.backend = backend

    def build(self, op: str) -> Fn:
        # A fresh Dynamo cache per case: every case is compiled for its static shape, and the
        # recompile limit can never make a later shape fall back to eager unnoticed.
        torch._dynamo.reset()
        return torch.compile(_torch_fn(op), fullgraph=True, dynamic=False, backend=self.backend)


@cache
def _import(module: str, package: str) -> object | str:
    """The module, or the reason it cannot be used ("skipped: not installed", import error)."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return f"skipped: not installed (pip install {package})"
    try:
        return importlib.import_module(module)
    except Exception as e:  # a peer that is installed but broken is reported, not fatal
        return f"skipped: import failed ({type(e).__name__}: {e})"


class Liger(Provider):
    """Liger-Kernel's ``liger_softmax`` and ``liger_cross_entropy``.

    Liger's cross-entropy computes the gradient during the forward and writes it into the
    logits in place; its backward only rescales it. So it has no separate backward to time.
    Liger has no log-softmax.
    """

    name = "liger"
    package = "liger-kernel"
    inplace = True
    _module = "liger_kernel.transformers.functional"

    def skip_reason(self, op: str, mode: str, device: torch.device) -> str | None:
        mod = _import(self._module, self.package)
        if isinstance(mod, str):
            return mod
        if op == "log_softmax":
            return "skipped: Liger-Kernel has no log_softmax"
        if op == "cross_entropy" and mode == "backward":
            return "skipped: Liger computes the gradient inside its forward"
        return None

    def build(self, op: str) -> Fn:
        mod = _import(self._module, self.package)
        if op == "softmax":
            return mod.liger_softmax
        return lambda x, t: mod.liger_cross_entropy(x, t, ignore_index=-100, reduction="mean")


class Quack(Provider):
    """quack's (CuTe-DSL, CUDA only) ``softmax`` and ``cross_entropy``; no log-softmax."""

    name = "quack"
    package = "quack-kernels"

    def skip_reason(self, op: str, mode: str, device: torch.device) -> str | None:
        if importlib.util.find_spec("quack") is None:
            return f"skipped: not installed (pip install {self.package})"
        if device.type != "cuda":
            return "skipped: quack needs a CUDA device"
        if op == "log_softmax":
            return "skipped: quack has no log_softmax"
        mod = _import(f"quack.{op}", self.package)
        return mod if isinstance(mod, str) else None

    def build(self, op: str) -> Fn:
        mod = _import(f"quack.{op}", self.package)
        if op == "softmax":
            return mod.softmax

        def cross_entropy(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            # Older quack releases return per-row losses, newer ones reduce to the mean.
            loss = mod.cross_entropy(x, t, inplace_backward=False)
            return loss.mean() if loss.dim() else loss

        return cross_entropy


def all_providers(compile_backend: str = "inductor") -> list[Provider]:
    """Every provider, ours first (ours is the reference every other output is checked against)."""
    return [
        Ours(),
        Ours(inplace_backward=True),
        TorchEager(),
        TorchCompile(compile_backend),
        Liger(),
        Quack(),
    ]
