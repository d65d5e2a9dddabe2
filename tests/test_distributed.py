"""Vocab-parallel cross-entropy and DistributedDataParallel over torch.distributed (gloo) on CPU.

Each test runs this file as a script in a subprocess, which spawns the ranks (processes on
127.0.0.1). Every rank builds the same full problem from one seed, takes its (uneven) shard of
the classes, and checks the sharded loss and gradients against the unsharded single-process op
in float64. Both CPU paths: the Triton interpreter (TRITON_INTERPRET=1, as the test session
sets it) and the plain-torch path (without it).
"""

import os
import socket
import subprocess
import sys

import pytest

# Every option, in few combinations: (kind, weighted, label_smoothing, reduction, softcap,
# z_loss, return_lse).
CASES = [
    ("index", False, 0.0, "mean", None, 0.0, False),
    ("index", True, 0.2, "mean", 10.0, 1e-3, True),
    ("index", True, 0.0, "sum", None, 0.0, False),
    ("index", False, 0.1, "none", 5.0, 0.0, True),
    ("probability", False, 0.0, "mean", None, 1e-3, False),
    ("probability", True, 0.2, "none", 10.0, 0.0, True),
    ("probability", False, 0.1, "sum", None, 0.0, False),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(mode: str, world: int, interpreter: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpreter:
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run(
        [sys.executable, __file__, mode, str(world), str(_free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.strip().endswith("ok"), result.stdout[-2000:]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("interpreter", [True, False], ids=["interpreter", "torch"])
def test_vocab_parallel_matches_unsharded(world, interpreter):
    _run("vocab", world, interpreter)


def test_data_parallel_gradients_match_one_process():
    _run("ddp", 2, interpreter=False)


# ----------------------------------------------------------------------------------------
# What the spawned ranks run.
# ----------------------------------------------------------------------------------------


def _shards(total: int, world: int) -> list[int]:
    """Uneven, in rank order: the last rank takes the remainder plus one more class."""
    base = max(1, total // world - 1)
    sizes = [base] * (world - 1)
    return [*sizes, total - sum(sizes)]


def _vocab_rank(rank: int, world: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import triton_softmax as ts

    group = dist.group.WORLD
    n, h, v = 7, 9, 37  # v odd: uneven shards
    sizes = _shards(v, world)
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    for case in CASES:
        kind, weighted, smoothing, reduction, softcap, z_loss, return_lse = case
        g = torch.Generator().manual_seed(1)
        x = torch.randn(n, h, dtype=torch.float64, generator=g)
        head = torch.randn(v, h, dtype=torch.float64, generator=g) / 3
        bias = torch.randn(v, dtype=torch.float64, generator=g)
        if kind == "index":
            target = torch.randint(0, v, (n,), generator=g)
            target[1] = -100
        else:
            target = torch.softmax(torch.randn(n, v, dtype=torch.float64, generator=g), 1)
        weight = torch.rand(v, dtype=torch.float64, generator=g) + 0.5 if weighted else None
        local_target = target if kind == "index" else target[:, start:stop]
        options = dict(
            weight=weight,
            reduction=reduction,
            label_smoothing=smoothing,
            softcap=softcap,
            z_loss=z_loss,
            return_lse=return_lse,
        )
        # cross_entropy on logits sharded by class
        logits = F.linear(x, head, bias)
        full = logits.clone().requires_grad_()
        mine = logits[:, start:stop].clone().requires_grad_()
        ref = ts.cross_entropy(full, target, **options)
        out = ts.cross_entropy(mine, local_target, process_group=group, **options)
        shard = (slice(None), slice(start, stop))
        _compare(case, "cross_entropy", out, ref, [(mine, full, shard)])
        # linear_cross_entropy with the head sharded by class
        xs = [x.clone().requires_grad_() for _ in range(2)]
        w_full, b_full = head.clone().requires_grad_(), bias.clone().requires_grad_()
        w_mine = head[start:stop].clone().requires_grad_()
        b_mine = bias[start:stop].clone().requires_grad_()
        ref = ts.linear_cross_entropy(xs[0], w_full, target, linear_bias=b_full, **options)
        out = ts.linear_cross_entropy(
            xs[1], w_mine, local_target, linear_bias=b_mine, process_group=group, **options
        )
        rows = (slice(start, stop),)
        pairs = [(xs[1], xs[0], ()), (w_mine, w_full, rows), (b_mine, b_full, rows)]
        _compare(case, "linear_cross_entropy", out, ref, pairs)
    dist.barrier()


def _compare(case, name, out, ref, pairs) -> None:
    """Results, then the gradients of one weighted sum of them: each sharded tensor's gradient
    is its shard of the full one (``index``), the input's is the full one."""
    import torch

    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    for a, b in zip(outs, refs, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name} {case}: {m}")
    total = sum((o * (1.0 + torch.arange(o.numel()).reshape(o.shape))).sum() for o in outs)
    total_ref = sum((o * (1.0 + torch.arange(o.numel()).reshape(o.shape))).sum() for o in refs)
    total.backward()
    total_ref.backward()
    for mine, full, index in pairs:
        expected = full.grad[index]
        torch.testing.assert_close(
            mine.grad, expected, msg=lambda m: f"{name} {case} gradient: {m}"
        )


def _ddp_rank(rank: int, world: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import triton_softmax as ts

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8 * world, 6, dtype=torch.float64, generator=g)
    target = torch.randint(0, 5, (8 * world,), generator=g)
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 5).double()
    single = torch.nn.Linear(6, 5).double()
    single.load_state_dict(model.state_dict())
    ddp = DistributedDataParallel(model)
    rows = slice(8 * rank, 8 * (rank + 1))
    ts.cross_entropy(ddp(x[rows]), target[rows], label_smoothing=0.1).backward()
    # One process, the whole batch: DDP averages the ranks' gradients of their means.
    ts.cross_entropy(single(x), target, label_smoothing=0.1).backward()
    for ours, ref in zip(model.parameters(), single.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, ref.grad)
    dist.barrier()


def _rank_main(rank: int, mode: str, world: int, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        (_vocab_rank if mode == "vocab" else _ddp_rank)(rank, world)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    mode, world, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    mp.spawn(_rank_main, args=(mode, world, port), nprocs=world, join=True)
    print("ok")
