"""Softmax and log-softmax against torch in float64, through the functional API and the ops."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, TOLERANCES

import triton_softmax as ts
from triton_softmax.ops import softmax as softmax_ops

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
FUNCS = {"softmax": (ts.softmax, torch.softmax), "log_softmax": (ts.log_softmax, torch.log_softmax)}


def _check(ours_fn, torch_fn, x: torch.Tensor, dim: int = -1) -> None:
    """Output and x.grad against torch in float64 on the same (rounded) input.

    fp16/bf16 gradients are computed from the stored low-precision output, as torch's are, so
    their reference is torch's own backward in float64 applied to that same output.
    """
    tol = TOLERANCES[x.dtype]
    x_ours = x.detach().clone().requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    y = ours_fn(x_ours, dim=dim)
    y_ref = torch_fn(x_ref, dim)
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), y_ref, **tol, equal_nan=True)
    grad = torch.randn_like(y_ref).to(x.dtype).double()  # representable in x's dtype
    y.backward(grad.to(y.dtype))
    if x.dtype in (torch.float16, torch.bfloat16):
        backward = (
            torch.ops.aten._log_softmax_backward_data
            if torch_fn is torch.log_softmax
            else torch.ops.aten._softmax_backward_data
        )
        grad_ref = backward(grad, y.detach().double(), dim, torch.float64)
    else:
        y_ref.backward(grad)
        grad_ref = x_ref.grad
    torch.testing.assert_close(x_ours.grad.double(), grad_ref, **tol, equal_nan=True)


# Shapes through the launch tables of triton_softmax/ops/tiles.py (rows held whole up to
# 32768 columns, 8192 in fp64, longer ones streamed; several short rows per program);
# tests/test_tiles.py covers the tables' own boundaries.
SHAPES = [
    (1, 1),  # smallest row
    (3, 5),  # short rows, one partial program
    (129, 33),  # BLOCK_N = 64, 64 rows per program: 3 programs, the last holding one row
    (2, 8192),  # longest row read in one block
    (2, 8193),  # first streamed length: three blocks, the last with one element
    (1, 70_000),  # longer than 65 536, where a peer errors
]


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_torch_fp32(name, shape):
    ours, ref = FUNCS[name]
    _check(ours, ref, torch.randn(shape, device=DEVICE) * 3)


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 100), (2, 9000)], ids=str)
def test_matches_torch_per_dtype(name, dtype, shape):
    ours, ref = FUNCS[name]
    _check(ours, ref, (torch.randn(shape, device=DEVICE) * 3).to(dtype))


# Block boundaries of the streamed path (split=False) and slice boundaries of the split path
# (split=True), reached on short rows by forcing blocks / slices of 16 columns.
@pytest.mark.parametrize("split", [False, True], ids=["streamed", "split"])
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("n_cols", [1, 15, 16, 17, 31, 32, 33, 100])
def test_block_boundaries(log, n_cols, split):
    x = torch.randn(5, n_cols, device=DEVICE, dtype=torch.float64) * 4
    y = softmax_ops.softmax_forward(x, log, block_n=16, split=split)
    ref = torch.log_softmax(x, -1) if log else torch.softmax(x, -1)
    torch.testing.assert_close(y, ref, **TOLERANCES[torch.float64])
    dy = torch.randn_like(x)
    dx = softmax_ops.softmax_backward(y, dy, log, block_n=16, split=split)
    x_ref = x.clone().requires_grad_()
    (torch.log_softmax if log else torch.softmax)(x_ref, -1).backward(dy)
    torch.testing.assert_close(dx, x_ref.grad, **TOLERANCES[torch.float64])


def test_worked_examples():
    expected = torch.tensor([0.0900, 0.2447, 0.6652])
    for row in ([1.0, 2.0, 3.0], [1000.0, 1001.0, 1002.0]):
        y = ts.softmax(torch.tensor(row, device=DEVICE), dim=0)
        torch.testing.assert_close(y.cpu(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("dim", [0, 1, 2, -1, -3])
def test_any_dim(name, dim):
    ours, ref = FUNCS[name]
    _check(ours, ref, torch.randn(4, 5, 6, device=DEVICE), dim=dim)


@pytest.mark.parametrize("name", FUNCS)
def test_zero_and_one_dim(name):
    ours, ref = FUNCS[name]
    _check(ours, ref, torch.tensor(2.5, device=DEVICE), dim=0)
    _check(ours, ref, torch.randn(9, device=DEVICE), dim=0)


@pytest.mark.parametrize("name", FUNCS)
def test_implicit_dim_follows_torch(name):
    ours = FUNCS[name][0]
    for shape in [(5,), (3, 4), (2, 3, 4), (2, 3, 4, 5)]:
        x = torch.randn(shape, device=DEVICE)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            y = ours(x)
        assert any("Implicit dimension" in str(w.message) for w in caught)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(y, getattr(F, name)(x))


@pytest.mark.parametrize("name", FUNCS)
def test_non_contiguous(name):
    ours, ref = FUNCS[name]
    base = torch.randn(40, 30, device=DEVICE)
    _check(ours, ref, base.t())  # column stride 40
    _check(ours, ref, base[::3, 1::2])  # strided rows and columns
    _check(ours, ref, base.t(), dim=0)
    expanded = torch.randn(1, 17, device=DEVICE).expand(6, 17)  # row stride 0
    _check(ours, ref, expanded)


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0,), (2, 0, 4)], ids=str)
def test_empty(name, shape):
    ours, ref = FUNCS[name]
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    y = ours(x, dim=-1)
    assert y.shape == ref(x, -1).shape
    y.sum().backward()
    assert x.grad.shape == x.shape


# One-block, streamed and split paths.
@pytest.mark.parametrize("block_n,split", [(None, None), (16, False), (16, True)], ids=str)
@pytest.mark.parametrize("log", [False, True])
def test_minus_inf(block_n, split, log):
    inf = float("inf")
    x = torch.randn(4, 40, device=DEVICE, dtype=torch.float64)
    x[0] = -inf  # all -inf: NaN, as torch
    x[1, :20] = -inf  # the first block(s) all -inf, then finite values
    x[2, ::2] = -inf  # scattered
    x[3, -1] = -inf  # last element only
    y = softmax_ops.softmax_forward(x, log, block_n=block_n, split=split)
    ref = torch.log_softmax(x, -1) if log else torch.softmax(x, -1)
    torch.testing.assert_close(y, ref, equal_nan=True)
    assert torch.isnan(y[0]).all() and not torch.isnan(y[1:]).any()


@pytest.mark.parametrize("name", FUNCS)
def test_huge_offsets(name):
    ours, ref = FUNCS[name]
    _check(ours, ref, torch.randn(6, 50, device=DEVICE) + 1e4)
    _check(ours, ref, torch.randn(6, 50, device=DEVICE) - 1e4)


def test_invariants():
    x = torch.randn(20, 300, device=DEVICE)
    y = ts.softmax(x, dim=-1)
    torch.testing.assert_close(y.sum(-1), torch.ones(20, device=DEVICE))
    assert (y >= 0).all()
    torch.testing.assert_close(ts.softmax(x + 123.0, dim=-1), y)
    torch.testing.assert_close(ts.log_softmax(x, dim=-1).exp(), y)


def test_dtype_argument():
    x = torch.randint(-5, 5, (4, 6), device=DEVICE)
    for name, (ours, _) in FUNCS.items():
        y = ours(x, dim=1, dtype=torch.float64)
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, getattr(F, name)(x, dim=1, dtype=torch.float64))
    y = ts.softmax(torch.randn(3, 4, device=DEVICE), dim=1, dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_floating_input_raises(dtype):
    x = torch.zeros(3, 4, device=DEVICE, dtype=dtype)
    with pytest.raises(TypeError, match=str(dtype).removeprefix("torch.")):
        ts.softmax(x, dim=-1)
    with pytest.raises(TypeError, match=str(dtype).removeprefix("torch.")):
        ts.log_softmax(x, dim=-1)


def test_bad_dim_raises():
    with pytest.raises(IndexError, match="Dimension out of range"):
        ts.softmax(torch.randn(3, 4, device=DEVICE), dim=2)


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("dim", [(1,), 1.0, True], ids=["tuple", "float", "bool"])
def test_dim_of_the_wrong_type_raises_as_torch(name, dim):
    x = torch.randn(3, 4, device=DEVICE)
    with pytest.raises(TypeError, match=f"must be int, not {type(dim).__name__}"):
        getattr(F, name)(x, dim=dim)  # torch's own error, for comparison
    with pytest.raises(TypeError, match=f"must be int, not {type(dim).__name__}"):
        getattr(ts, name)(x, dim=dim)


@pytest.mark.parametrize("name", FUNCS)
def test_non_tensor_input_raises_type_error(name):
    with pytest.raises(TypeError, match="must be a torch.Tensor, got list"):
        getattr(ts, name)([1.0, 2.0], dim=0)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_gradcheck_fp64(name):
    fn = FUNCS[name][0]
    x = torch.randn(3, 21, device=DEVICE, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fn(t, dim=-1), (x,))
    assert torch.autograd.gradcheck(lambda t: fn(t, dim=0), (x,))


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_gradgradcheck_fp64(name):
    fn = FUNCS[name][0]
    x = torch.randn(3, 7, device=DEVICE, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: fn(t, dim=-1), (x,))
    assert torch.autograd.gradgradcheck(lambda t: fn(t, dim=0), (x,))


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_opcheck(name):
    op = getattr(torch.ops.triton_softmax, name).default
    x = torch.randn(5, 19, device=DEVICE, requires_grad=True)
    torch.library.opcheck(op, (x,))
    y = op(x).detach()
    bwd = torch.ops.triton_softmax.softmax_backward.default
    torch.library.opcheck(bwd, (y, torch.randn_like(y), name == "log_softmax"))


def test_compile_fullgraph_no_graph_breaks():
    def f(x):
        return ts.softmax(x, dim=-1) * ts.log_softmax(x, dim=0)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 10, device=DEVICE, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out = compiled(x)
    torch.testing.assert_close(out, f(x_ref))
    out.sum().backward()
    f(x_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_modules():
    x = torch.randn(3, 4, 5, device=DEVICE)
    torch.testing.assert_close(ts.Softmax(dim=1)(x), torch.nn.Softmax(dim=1)(x))
    torch.testing.assert_close(ts.LogSoftmax(dim=-1)(x), torch.nn.LogSoftmax(dim=-1)(x))
    assert repr(ts.Softmax(dim=1)) == "Softmax(dim=1)"


@pytest.mark.skipif(DEVICE != "cpu", reason="the torch path serves CPU tensors")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_torch_path_matches_kernels(monkeypatch, dtype):
    x = (torch.randn(9, 77) * 3).to(dtype)
    dy = torch.randn_like(x)
    for log in (False, True):
        y_kernel = softmax_ops.softmax_forward(x, log)
        dx_kernel = softmax_ops.softmax_backward(y_kernel, dy, log)
        with monkeypatch.context() as m:
            m.setattr(softmax_ops, "kernel_path", lambda _: "torch")
            y_torch = softmax_ops.softmax_forward(x, log)
            dx_torch = softmax_ops.softmax_backward(y_kernel, dy, log)
        torch.testing.assert_close(y_torch, y_kernel, **TOLERANCES[dtype])
        torch.testing.assert_close(dx_torch, dx_kernel, **TOLERANCES[dtype])


def test_kernel_path_is_reported():
    expected = "triton" if DEVICE == "cuda" else "triton-interpreter"
    assert ts.kernel_path(torch.zeros(1, device=DEVICE)) == expected
    assert ts.kernel_path(DEVICE) == expected


def test_row_offsets_beyond_int32():
    # Two rows 2**31 elements apart in one (lazily allocated, mostly untouched) buffer.
    storage = torch.empty(2**31 + 64, dtype=torch.float16, device=DEVICE)
    x = storage.as_strided((2, 64), (2**31, 1))
    x.copy_(torch.randn(2, 64, device=DEVICE).half())
    y = ts.softmax(x, dim=-1)
    torch.testing.assert_close(y.double(), torch.softmax(x.double(), -1), **TOLERANCES[x.dtype])


def test_row_of_a_million_columns():
    # 2**20 + 1 columns: 257 streamed blocks, the last holding one element.
    _check(ts.log_softmax, torch.log_softmax, torch.randn(1, 2**20 + 1, device=DEVICE))


# The split kernels: rows past the longest block (32 768 columns, 8192 in fp64) cut into
# slices, one program a slice, the slices' partials merged per row. Forced slices of 16 columns
# reach their boundaries on short rows; under the interpreter they run as two launches.
SPLIT_DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def _ops_against_float64(x: torch.Tensor, log: bool, **launch) -> None:
    """The forward op and the backward op (x.grad) on ``x`` against torch in float64 on the same
    rounded input; 16-bit gradients against torch's float64 backward applied to our output."""
    tol = TOLERANCES[x.dtype]
    x_ref = x.double().requires_grad_()
    y_ref = (torch.log_softmax if log else torch.softmax)(x_ref, -1)
    y = softmax_ops.softmax_forward(x, log, **launch)
    torch.testing.assert_close(y.double(), y_ref, **tol, equal_nan=True)
    dy = torch.randn_like(y_ref).to(x.dtype)
    dx = softmax_ops.softmax_backward(y, dy, log, **launch)
    if x.dtype in (torch.float16, torch.bfloat16):
        aten = torch.ops.aten
        backward = aten._log_softmax_backward_data if log else aten._softmax_backward_data
        dx_ref = backward(dy.double(), y.double(), -1, torch.float64)
    else:
        y_ref.backward(dy.double())
        dx_ref = x_ref.grad
    torch.testing.assert_close(dx.double(), dx_ref, **tol, equal_nan=True)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", SPLIT_DTYPES, ids=str)
def test_split_slice_boundaries(log, dtype):
    # One slice, exactly one, one more (the last slice holding one column), then three.
    for n_cols in (15, 16, 17, 47, 48, 49):
        x = (torch.randn(2, n_cols, device=DEVICE) * 4).to(dtype)
        _ops_against_float64(x, log, block_n=16, split=True)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", SPLIT_DTYPES, ids=str)
def test_split_special_values(log, dtype):
    inf = float("inf")
    x = torch.randn(7, 49, device=DEVICE) * 4  # 4 slices of 16: the last holds one column
    x[0] = -inf  # all -inf: NaN, as torch
    x[1, :20] = -inf  # the first slice all -inf, the second in part
    x[2, ::2] = -inf  # scattered
    x[3] += 1e4
    x[4] -= 1e4
    x[5, :-1] = -inf  # only the last slice's one column is finite: y = 1 there
    x = x.to(dtype)
    y = softmax_ops.softmax_forward(x, log, block_n=16, split=True)
    assert torch.isnan(y[0]).all() and not torch.isnan(y[1:]).any()
    assert y[5, -1].item() == (0.0 if log else 1.0)
    _ops_against_float64(x, log, block_n=16, split=True)


def test_split_rows_of_262144_columns():
    # The default split: 64 slices of 4096 a row; through the functional API and autograd.
    _check(ts.log_softmax, torch.log_softmax, torch.randn(1, 262144, device=DEVICE) * 3)
    x = (torch.randn(1, 262144, device=DEVICE) * 3).to(torch.bfloat16)
    _check(ts.softmax, torch.softmax, x)


_TWO_STREAMS = """
import torch, triton_softmax as ts
from triton_softmax.ops import softmax as ops
n = 4096 * ops.slices_allowed(torch.device("cuda"))
xs = [torch.randn(512, n, device="cuda") * 3 for _ in range(2)]
streams = [torch.cuda.Stream() for _ in xs]
outs = [None, None]
for _ in range(5):  # two split launches at once, each with up to P - 1 programs waiting
    for i, (x, s) in enumerate(zip(xs, streams)):
        with torch.cuda.stream(s):
            outs[i] = ts.softmax(x, dim=-1)
    torch.cuda.synchronize()
for x, y in zip(xs, outs):
    torch.testing.assert_close(y, torch.softmax(x, -1), atol=1e-6, rtol=1e-5)
print("ok")
"""


@pytest.mark.skipif(DEVICE != "cuda", reason="the single-launch split path runs on a GPU only")
def test_split_launches_on_two_streams_finish():
    # The compiled split kernel's programs wait for one another: two launches at once on two
    # streams, rows as long as the launcher allows, must finish (a hang is killed by the
    # timeout) and be right.
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _TWO_STREAMS], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
