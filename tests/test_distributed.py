"""Vocab-parallel cross-entropy and DistributedDataParallel over torch.distributed (gloo) on CPU.

Each test runs this file as a script in a subprocess, which spawns the ranks (processes on
127.0.0.1). Every rank builds the same full problem from one seed, takes its (uneven) shard of
the classes, and checks the sharded loss and gradients against the unsharded single-process op
in float64. Both CPU paths: the Triton interpreter (TRITON_INTERPRET=1, as the test session
sets it) and the plain-torch path (without it).
"""

import datetime
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


#: Each spawned run takes 10-40 s on 2 cores: the default run keeps one per test, the others are
#: @slow (CI runs them in a step of its own).
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    ("world", "interpreter"),
    [
        pytest.param(2, True, id="interpreter-2"),
        pytest.param(3, True, id="interpreter-3", marks=SLOW),
        pytest.param(2, False, id="torch-2", marks=SLOW),
        pytest.param(3, False, id="torch-3", marks=SLOW),
    ],
)
def test_vocab_parallel_matches_unsharded(world, interpreter):
    _run("vocab", world, interpreter)


@pytest.mark.parametrize(
    ("world", "interpreter"),
    [pytest.param(2, False, id="2-torch"), pytest.param(3, True, id="3-interp", marks=SLOW)],
)
def test_vocab_parallel_temperature_entropy(world, interpreter):
    """temperature= and return_entropy= (issue 20): the merged entropy and every gradient
    against the unsharded op, itself checked against torch in test_temperature_entropy.py."""
    _run("entropy", world, interpreter)


@pytest.mark.parametrize(
    "interpreter",
    [pytest.param(True, id="interpreter", marks=SLOW), pytest.param(False, id="torch")],
)
def test_vocab_parallel_hostile_inputs(interpreter):
    """Over 3 ranks: a non-negative ignore_index inside a shard, layouts changing between
    calls, empty shards, and ranks that disagree."""
    _run("hostile", 3, interpreter)


@SLOW
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
    import torch.distributed as dist

    for case in CASES:
        _check_case(rank, _shards(37, world), case)  # 37 classes: uneven shards
    dist.barrier()


#: (case as CASES, temperature, return_entropy): entropy with every reduction and target kind.
ENTROPY_CASES = [
    (("index", True, 0.1, "none", 5.0, 1e-3, True), 0.7, True),
    (("index", False, 0.0, "mean", None, 0.0, False), 1.5, True),
    (("index", True, 0.2, "sum", 10.0, 0.0, False), 0.9, False),
    (("probability", False, 0.1, "mean", None, 0.0, True), 1.2, True),
]


def _entropy_rank(rank: int, world: int) -> None:
    import torch.distributed as dist

    for case, temperature, return_entropy in ENTROPY_CASES:
        extra = dict(temperature=temperature, return_entropy=return_entropy)
        _check_case(rank, _shards(37, world), case, extra=extra)
    # a rank without classes: its share of the probability is 0
    sizes = [0, 20, 17][:world] if world == 3 else [0, 37]
    _check_case(rank, sizes, ENTROPY_CASES[0][0], extra=dict(temperature=0.7,
                return_entropy=True))  # fmt: skip
    _check_autocast_dtypes(rank, world)
    dist.barrier()


def _check_autocast_dtypes(rank: int, world: int) -> None:
    """Under torch.autocast, 16-bit logits give a float32 loss and entropy, sharded or not, as
    torch's cross_entropy does."""
    import torch
    import torch.distributed as dist

    import triton_softmax as ts

    sizes = _shards(37, world)
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 37, generator=g).bfloat16()
    target = torch.randint(0, 37, (7,), generator=g)
    options = dict(reduction="sum", label_smoothing=0.1, temperature=0.5, return_entropy=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = ts.cross_entropy(x, target, **options)
        out = ts.cross_entropy(x[:, start:stop], target, process_group=dist.group.WORLD, **options)
    assert [t.dtype for t in ref] == [torch.float32] * 2, [t.dtype for t in ref]
    assert [t.dtype for t in out] == [torch.float32] * 2, [t.dtype for t in out]
    for ours, theirs in zip(out, ref, strict=True):
        torch.testing.assert_close(ours, theirs)


def _check_case(rank, sizes, case, *, n=7, h=9, target=None, ignore_index=-100, extra=None) -> None:
    """cross_entropy and linear_cross_entropy with the classes sharded as ``sizes`` (one per
    rank, in rank order) against the unsharded ops in float64: results and gradients.
    ``target``: these class indices instead of random ones."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import triton_softmax as ts

    group = dist.group.WORLD
    v = sum(sizes)
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    kind, weighted, smoothing, reduction, softcap, z_loss, return_lse = case
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, h, dtype=torch.float64, generator=g)
    head = torch.randn(v, h, dtype=torch.float64, generator=g) / 3
    bias = torch.randn(v, dtype=torch.float64, generator=g)
    if kind == "index" and target is None:
        target = torch.randint(0, v, (n,), generator=g)
        target[1] = ignore_index
    elif kind != "index":
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
        **(extra or {}),
    )
    if kind == "index":
        options["ignore_index"] = ignore_index
    case = (*case, sizes, ignore_index, extra)
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


def _hostile_rank(rank: int, world: int) -> None:
    """What gave wrong numbers, aborts or hangs (issue 17), over 3 ranks: a non-negative
    ignore_index that is some rank's local class index, heads whose shards have the same
    size on some ranks, ranks that disagree, and ranks that hold no class."""
    import torch
    import torch.distributed as dist

    assert world == 3
    plain = ("index", False, 0.0, "none", None, 0.0, False)
    options = ("index", True, 0.1, "mean", 5.0, 1e-3, True)
    target = torch.tensor([0, 3, 4, 0, 1, 5])
    for ignore_index in (0, 4):  # class 3 (4) is local index 0 (1) of rank 1
        for case in (plain, options):
            _check_case(rank, [3, 3, 0], case, n=6, target=target, ignore_index=ignore_index)
    # Ranks 0 and 2 see the same shard sizes as in the call before, rank 1 does not.
    for sizes in ([5, 5, 0], [5, 6, 0], [3, 4, 5], [6, 7, 8], [3, 7, 5]):
        _check_case(rank, sizes, options if sizes[2] else plain)
    for sizes in ([1, 1, 0], [0, 1, 1], [1, 0, 1]):  # V = 2 over 3 ranks
        for case in (plain, options, CASES[5]):
            _check_case(rank, sizes, case)
    _disagreeing(rank)
    _check_case(rank, [3, 0, 4], options)  # the group still works after those errors
    dist.barrier()


def _disagreeing(rank: int) -> None:
    """Calls whose ranks disagree raise the same error on every rank (no hang, no abort)."""
    import re

    import torch
    import torch.distributed as dist

    import triton_softmax as ts

    group = dist.group.WORLD
    g = torch.Generator().manual_seed(2)
    target = torch.randint(0, 12, (6,), generator=g)  # 12 classes: 3, 4 and 5 on ranks 0-2
    other = target.clone()
    other[2] = (target[2] + 1) % 12
    x = torch.randn(6, 4, dtype=torch.float64, generator=g)
    weight = torch.rand(12, dtype=torch.float64, generator=g) + 0.5
    logits = torch.randn(6, 3 + rank, dtype=torch.float64, generator=g)
    head = torch.randn(3 + rank, 4, dtype=torch.float64, generator=g)
    mine = other if rank == 1 else target
    dtype = (torch.float64, torch.float32, torch.float64)[rank]
    bad = target.clone()
    bad[0] = 12 if rank == 1 else 0  # out of range on rank 1 only

    def ce(logits=logits, target=target, **options):
        return lambda: ts.cross_entropy(logits, target, process_group=group, **options)

    def lce(x=x, head=head, target=target, **options):
        return lambda: ts.linear_cross_entropy(x, head, target, process_group=group, **options)

    calls = [
        ("targets differ", ce(target=mine, check_targets=True)),
        ("targets differ", lce(target=mine, check_targets=True)),
        ("class weights differ", ce(weight=weight + rank, check_targets=True)),
        ("disagree on label_smoothing", ce(label_smoothing=0.1 * rank)),
        ("disagree on reduction", lce(reduction=("mean", "sum", "mean")[rank])),
        ("disagree on check_targets", ce(check_targets=bool(rank))),
        ("disagree on the class weights' shape", ce(weight=weight if rank else None)),
        ("disagree on the function: rank 0 cross_entropy, rank 1 linear", (ce, lce, ce)[rank]()),
        ("target 12 is out of bounds", ce(target=bad)),
        (
            "disagree on the logits' dtype: rank 0 torch.float64, rank 1 torch.float32, rank 2",
            ce(logits=logits.to(dtype)),
        ),
        ("disagree on the row count", ce(logits=logits[: 5 + rank], target=target[: 5 + rank])),
        ("disagree on the row count", lce(x=x[: 5 + rank], target=target[: 5 + rank])),
        ("disagree on the feature count", lce(x=x[:, : 3 + rank], head=head[:, : 3 + rank])),
    ]
    for expected, call in calls:
        try:
            call()
        except (ValueError, IndexError) as error:
            assert re.search(expected, str(error)), f"{expected!r} not in {error}"
        else:
            raise AssertionError(f"rank {rank}: no error for {expected!r}")


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

    # A short timeout: a collective that falls out of step fails the test instead of hanging.
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        modes = {"vocab": _vocab_rank, "hostile": _hostile_rank, "ddp": _ddp_rank,
                 "entropy": _entropy_rank}  # fmt: skip
        modes[mode](rank, world)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    mode, world, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    mp.spawn(_rank_main, args=(mode, world, port), nprocs=world, join=True)
    print("ok")
