"""Every kernel configuration the launchers can choose compiles for an NVIDIA GPU (sm_90)
without spilling registers, on a machine without a GPU.

The tests elsewhere run the kernels through Triton's interpreter, which accepts code that the
GPU compiler may reject (types, constexpr use, fp64 math) and has no registers to run out of.
This compiles, with Triton's own compiler and ptxas, in processes without TRITON_INTERPRET,
and reads the registers and spill bytes from ptxas's report:

- softmax / log-softmax forward and backward: every tile that the launch tables
  (``softmax.FORWARD_TILES``, ``BACKWARD_TILES``) can select, in each dtype, for softmax and
  log-softmax;
- cross-entropy forward and backward: every tile of ``cross_entropy.FORWARD_TILES`` and
  ``BACKWARD_TILES`` in each dtype, for class-index and probability targets with every option
  on (weight, label smoothing, z-loss, softcap, sharded classes where the kernels have them,
  and the lse gradient in the backward);
- fused linear + cross-entropy: the tile ``linear_cross_entropy._tiles`` picks for each dtype
  (16-aligned), class-index targets with every option on, 2 class splits.

Each tile is compiled in the specialisation Triton gives a launch whose row length is not a
multiple of 16 (element-wise loads, one mask bit per element: the costlier in registers on
long rows), or the 16-aligned one for tiles that only aligned launches use. The test fails on
any spill. ``--complete`` (and ``--table``) also compiles every tile in the other
specialisation, the cross-entropy kernels with every option off, and the fused linear kernels
with probability targets and with every option off:

    python tests/test_gpu_compile.py                  # one JSON line per kernel, then a count
    python tests/test_gpu_compile.py --table benchmarks/results/registers_sm90.md
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parent.parent
DTYPES_BY_SIZE = {2: ("fp16", "bf16"), 4: ("fp32",), 8: ("fp64",)}
TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64"}
#: Processes compiling in parallel (ptxas and Triton's passes are single-threaded).
DEFAULT_JOBS = 2
#: Families whose spills fail the test (all of them; a family left out is reported with a
#: warning instead).
GATED = ("softmax", "cross_entropy", "linear_cross_entropy")


class Job(NamedTuple):
    """One kernel specialisation to compile."""

    family: str  # softmax | cross_entropy | linear_cross_entropy
    kernel: str  # forward | backward
    module: str  # where the @triton.jit function lives
    function: str
    dtype: str  # fp16 | bf16 | fp32 | fp64
    variant: str  # the flags, in words
    aligned: bool  # Triton's 16-divisibility on strides and sizes (pointers always aligned)
    block_m: int
    block_n: int
    num_warps: int
    single_block: bool
    pointers: tuple[tuple[str, str], ...]  # name -> Triton pointer type
    constexprs: tuple[tuple[str, object], ...]  # tl dtypes as "tl.<name>"


def _acc(dtype: str) -> tuple[str, str]:
    """(ACC_DTYPE as 'tl.<name>', accumulator pointer type) for a storage dtype."""
    return ("tl.float64", "*fp64") if dtype == "fp64" else ("tl.float32", "*fp32")


def _specialisations(table, complete: bool) -> list[tuple[int, object, bool]]:
    """(element size, tile, aligned) to compile for a table: with ``complete``, each tile in
    every specialisation a launch can give it; otherwise each tile once, not aligned (element-
    wise loads, one mask bit per element: the costlier in registers for long rows) unless only
    aligned launches use it."""
    from triton_softmax.ops._common import selectable_tiles

    found = selectable_tiles(table)
    if complete:
        return found
    unaligned = {(size, tile) for size, tile, aligned in found if not aligned}
    return [
        (size, tile, aligned)
        for size, tile, aligned in found
        if not aligned or (size, tile) not in unaligned
    ]


def jobs(complete: bool = False) -> list[Job]:
    """Every specialisation to compile (see the module docstring). ``complete`` adds the
    aligned specialisation of tiles that unaligned launches use too, and the cross-entropy
    kernels with every option off (the table is generated with it)."""
    from triton_softmax.ops import cross_entropy, softmax

    found: list[Job] = []
    for kernel, table, function in (
        ("forward", softmax.FORWARD_TILES, "_softmax_forward_kernel"),
        ("backward", softmax.BACKWARD_TILES, "_softmax_backward_kernel"),
    ):
        names = getattr(softmax, function).arg_names
        for size, tile, aligned in _specialisations(table, complete):
            for dtype in DTYPES_BY_SIZE[size]:
                pointers = tuple((n, f"*{dtype}") for n in names if n.endswith("_ptr"))
                for log in (False, True):
                    meta = dict(
                        LOG=log,
                        ACC_DTYPE=_acc(dtype)[0],
                        SINGLE_BLOCK=tile.single_block,
                        BLOCK_M=tile.block_m,
                        BLOCK_N=tile.block_n,
                    )
                    found.append(
                        Job(
                            "softmax",
                            kernel,
                            softmax.__name__,
                            function,
                            dtype,
                            "log-softmax" if log else "softmax",
                            aligned,
                            *tile,
                            pointers,
                            tuple(meta.items()),
                        )
                    )

    for kernel, table, function in (
        ("forward", cross_entropy.FORWARD_TILES, "_cross_entropy_forward_kernel"),
        ("backward", cross_entropy.BACKWARD_TILES, "_cross_entropy_backward_kernel"),
    ):
        names = getattr(cross_entropy, function).arg_names
        # The backward always loops over class blocks; the forward holds a row that fits.
        tiles = {
            (size, tile._replace(single_block=tile.single_block and kernel == "forward"), aligned)
            for size, tile, aligned in _specialisations(table, complete)
        }
        for size, tile, aligned in sorted(tiles):
            for dtype in DTYPES_BY_SIZE[size]:
                acc, acc_pointer = _acc(dtype)
                for is_index in (True, False):
                    pointers = {
                        "logits_ptr": f"*{dtype}",
                        "grad_logits_ptr": f"*{dtype}",
                        "weight_ptr": f"*{dtype}",
                        "target_ptr": "*i64" if is_index else f"*{dtype}",
                    }
                    ptrs = {n: pointers.get(n, acc_pointer) for n in names if n.endswith("_ptr")}
                    for full in (False, True) if complete else (True,):
                        meta = dict(
                            LABEL_SMOOTHING=0.1 if full else 0.0,
                            Z_LOSS=1e-4 if full else 0.0,
                            SOFTCAP=30.0 if full else 0.0,
                            TARGET_IS_INDEX=is_index,
                            HAS_WEIGHT=full,
                            ACC_DTYPE=acc,
                            BLOCK_M=tile.block_m,
                            BLOCK_N=tile.block_n,
                        )
                        if kernel == "backward":
                            meta["HAS_GRAD_LSE"] = full
                        else:  # the gradient written in the forward (reduced losses)
                            meta["WRITE_GRAD"] = full
                            meta["SINGLE_BLOCK"] = tile.single_block
                        if "SHARDED" in names:  # one rank's shard of the classes
                            meta["SHARDED"] = full
                        variant = ("class index" if is_index else "probabilities") + (
                            ", all options" if full else ""
                        )
                        found.append(
                            Job(
                                "cross_entropy",
                                kernel,
                                cross_entropy.__name__,
                                function,
                                dtype,
                                variant,
                                aligned,
                                *tile,
                                tuple(ptrs.items()),
                                tuple(meta.items()),
                            )
                        )
    found += _linear_jobs(complete)
    return found


def _linear_jobs(complete: bool) -> list[Job]:
    """The fused linear + cross-entropy kernels at the tiles their launcher picks."""
    import torch

    from triton_softmax.ops import linear_cross_entropy as lce

    found = []
    for dtype, torch_name in TORCH_DTYPES.items():
        example = torch.empty(0, dtype=getattr(torch, torch_name))
        block_m, block_v, block_k, num_warps = lce._tiles(example, 0, None)
        acc, acc_pointer = _acc(dtype)
        dot_dtype = {"bf16": "tl.bfloat16", "fp16": "tl.float16"}.get(dtype, acc)
        for is_index in (True, False) if complete else (True,):
            for full in (False, True) if complete else (True,):
                meta = dict(
                    LABEL_SMOOTHING=0.1 if full else 0.0,
                    SOFTCAP=30.0 if full else 0.0,
                    TARGET_IS_INDEX=is_index,
                    HAS_WEIGHT=full,
                    HAS_BIAS=full,
                    DOT_DTYPE=dot_dtype,
                    DOT_PRECISION="ieee" if dtype in ("fp32", "fp64") else "tf32",
                    ACC_DTYPE=acc,
                    BLOCK_M=block_m,
                    BLOCK_V=block_v,
                    BLOCK_K=block_k,
                )
                pointers = {
                    **{p: f"*{dtype}" for p in ("x_ptr", "w_ptr", "b_ptr", "weight_ptr")},
                    "target_ptr": "*i64" if is_index else f"*{dtype}",
                }
                variant = (
                    ("class index" if is_index else "probabilities")
                    + (", all options" if full else "")
                    + f", BLOCK_K={block_k}"
                )
                for kernel, function, extra in (
                    ("forward", "_linear_cross_entropy_forward_kernel", {"SPLITS": 2}),
                    (
                        "backward",
                        "_linear_cross_entropy_backward_kernel",
                        {"GRAD_X": True, "GRAD_W": True, "GRAD_B": full},
                    ),
                ):
                    names = getattr(lce, function).arg_names
                    ptrs = {n: pointers.get(n, acc_pointer) for n in names if n.endswith("_ptr")}
                    found.append(
                        Job(
                            "linear_cross_entropy",
                            kernel,
                            lce.__name__,
                            function,
                            dtype,
                            variant,
                            True,
                            block_m,
                            block_v,
                            num_warps,
                            False,
                            tuple(ptrs.items()),
                            tuple({**meta, **extra}.items()),
                        )
                    )
    return found


def compile_job(job: Job) -> dict:
    """Compile one job for sm_90; return it with ptxas's registers and spill bytes.

    Needs TRITON_DUMP_PTXAS_LOG=1 and a fresh TRITON_CACHE_DIR in the environment (ptxas
    does not run, and prints nothing, for a cached kernel); the script's main sets both.
    """
    import importlib

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(job.module), job.function)
    constexprs = {
        k: getattr(tl, v[3:]) if isinstance(v, str) and v.startswith("tl.") else v
        for k, v in job.constexprs
    }
    pointers = dict(job.pointers)
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = pointers.get(name, "i32")  # strides and sizes: i32 below 2**31
        if name in pointers or (job.aligned and (name.endswith("stride") or name.startswith("n_"))):
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()},
        attrs=attrs,
    )
    log = io.StringIO()
    cpu = time.process_time() + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    with contextlib.redirect_stdout(log):
        triton.compile(
            source, target=GPUTarget("cuda", 90, 32), options={"num_warps": job.num_warps}
        )
    text = log.getvalue()
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if registers is None or spills is None:
        raise RuntimeError(f"no ptxas report for {job}: {text[-2000:]}")
    return {
        **{k: v for k, v in job._asdict().items() if k not in ("pointers", "constexprs")},
        "registers": int(registers.group(1)),
        "spill_stores": int(spills.group(1)),
        "spill_loads": int(spills.group(2)),
        "cpu_s": round(
            time.process_time() + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - cpu, 2
        ),
    }


def compile_all(n_jobs: int = DEFAULT_JOBS, complete: bool = False) -> list[dict]:
    """Compile every job in ``n_jobs`` processes; results in the order of :func:`jobs`."""
    import multiprocessing

    todo = jobs(complete)
    # Largest tiles first, so that the last ones to finish are short.
    order = sorted(range(len(todo)), key=lambda i: -todo[i].block_m * todo[i].block_n)
    with multiprocessing.get_context("fork").Pool(n_jobs) as pool:
        done = pool.map(compile_job, [todo[i] for i in order], chunksize=1)
    results = [None] * len(todo)
    for i, result in zip(order, done, strict=True):
        results[i] = result
    return results


def spilled(results: list[dict]) -> list[dict]:
    return [r for r in results if r["spill_stores"] or r["spill_loads"]]


def _versions() -> str:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas_version

    ptxas = get_ptxas_version(90).strip().splitlines()[-1]
    return f"triton {triton.__version__}, target sm_90a (GPUTarget('cuda', 90, 32)), ptxas: {ptxas}"


def _one_block(r: dict) -> str:
    """Whether a softmax row is held whole; the other kernels always loop over blocks."""
    if r["family"] != "softmax":
        return "-"
    return "yes" if r["single_block"] else "no"


def markdown(results: list[dict], seconds: float) -> str:
    """The register table: a summary per kernel and dtype, then every compiled kernel."""
    lines = [
        "# Registers and spills per kernel configuration, sm_90 (no GPU needed)",
        "",
        "Generated by `python tests/test_gpu_compile.py --table benchmarks/results/"
        "registers_sm90.md`: every tile the launch tables can select (softmax.py "
        "`FORWARD_TILES`, `BACKWARD_TILES`; cross_entropy.py `FORWARD_TILES`, "
        "`BACKWARD_TILES`) in every dtype and in both of Triton's alignment specialisations, "
        "compiled with Triton for sm_90 and assembled by ptxas, whose report gives the "
        "registers per thread and the spill bytes; the fused linear + cross-entropy kernels "
        "at the tiles `linear_cross_entropy._tiles` picks. The test in the same file compiles "
        "a subset in CI (each tile once, in the unaligned specialisation unless only aligned "
        "launches use it; the cross-entropy kernels with all options on) and fails on any "
        "spill. No GPU ran these kernels; registers say nothing "
        "about speed. A thread has at most 255 registers, and 65 536 / (32 x num_warps) with "
        "more than 8 warps (64 at 32 warps). For the fused linear kernels BLOCK_N is "
        "BLOCK_V (classes), and the variant names BLOCK_K.",
        "",
        f"{_versions()}; {len(results)} kernels compiled in {seconds:.0f} s on "
        f"{os.cpu_count()} cores.",
        "",
        "aligned: Triton's specialisation for 16-aligned strides and row length (16-byte "
        "vector loads, one mask bit per vector); not aligned: element-wise loads (a row length "
        "that is not a multiple of 16). Pointers are 16-byte aligned in both, as torch "
        "allocates them.",
        "",
        "## Summary",
        "",
        "| kernel | dtype | kernels | registers (min-max) | kernels that spill |",
        "|---|---|---:|---:|---:|",
    ]
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["family"], r["kernel"], r["dtype"]), []).append(r)
    for (family, kernel, dtype), rows in groups.items():
        regs = [r["registers"] for r in rows]
        lines.append(
            f"| {family} {kernel} | {dtype} | {len(rows)} | {min(regs)}-{max(regs)} | "
            f"{len(spilled(rows))} |"
        )
    lines += [
        "",
        "## Every kernel",
        "",
        "| kernel | dtype | variant | aligned | BLOCK_M | BLOCK_N | num_warps | one block "
        "| registers | spill stores (B) | spill loads (B) |",
        "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in sorted(
        results,
        key=lambda r: (
            r["family"],
            r["kernel"],
            r["dtype"],
            r["block_n"],
            r["block_m"],
            r["variant"],
            r["aligned"],
        ),
    ):
        lines.append(
            f"| {r['family']} {r['kernel']} | {r['dtype']} | {r['variant']} | "
            f"{'yes' if r['aligned'] else 'no'} | {r['block_m']} | {r['block_n']} | "
            f"{r['num_warps']} | {_one_block(r)} | {r['registers']} | "
            f"{r['spill_stores']} | {r['spill_loads']} |"
        )
    return "\n".join(lines) + "\n"


def test_every_configuration_compiles_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, __file__, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    if "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("Triton's ptxas is not available on this machine")
    assert result.returncode == 0, result.stderr[-4000:]
    results = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(results) == len(jobs()) > 0
    assert {(r["family"], r["kernel"], r["dtype"]) for r in results} == {
        (f, k, d)
        for f in ("softmax", "cross_entropy", "linear_cross_entropy")
        for k in ("forward", "backward")
        for d in TORCH_DTYPES
    }
    bad = [_describe(r) for r in spilled(results) if r["family"] in GATED]
    assert not bad, "register spills:\n" + "\n".join(bad)
    others = [_describe(r) for r in spilled(results) if r["family"] not in GATED]
    if others:
        warnings.warn("register spills (not gated):\n" + "\n".join(others), stacklevel=1)


def _describe(r: dict) -> str:
    return (
        f"{r['family']} {r['kernel']} {r['dtype']} {r['variant']} aligned={r['aligned']} "
        f"[{r['block_m']}, {r['block_n']}] x {r['num_warps']} warps: {r['registers']} registers, "
        f"{r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", type=Path, help="write the markdown register table here")
    parser.add_argument("--json", action="store_true", help="one JSON line per kernel only")
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help="parallel processes")
    parser.add_argument(
        "--complete",
        action="store_true",
        help="also every tile's aligned specialisation and the cross-entropy kernels with "
        "every option off (implied by --table)",
    )
    args = parser.parse_args(argv)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="triton-sm90-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        results = compile_all(args.jobs, complete=args.complete or args.table is not None)
    seconds = time.monotonic() - start
    if args.json:
        for r in results:
            print(json.dumps(r))
        return 0
    for r in results:
        print(json.dumps(r))
    bad = [r for r in spilled(results) if r["family"] in GATED]
    print(
        f"compiled {len(results)} kernels in {seconds:.0f} s; {len(spilled(results))} spill, "
        f"{len(bad)} of them in {', '.join(GATED)}",
        file=sys.stderr,
    )
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(markdown(results, seconds))
        print(f"wrote {args.table}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    # Before triton is imported: compile for the GPU, not the interpreter, and have ptxas print
    # its report (main compiles into a fresh cache: a cached kernel prints no report).
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset
    sys.path.insert(0, str(REPO))
    sys.exit(main())
