"""What each Triton kernel compiles to for an NVIDIA H100 (sm_90a), on a machine without a GPU.

The tests elsewhere run the kernels through Triton's interpreter, which accepts code that the
GPU compiler may reject and says nothing about the machine code. This compiles each kernel
with Triton's own compiler in processes without TRITON_INTERPRET, reads ptxas's report
(registers, spill bytes) and Triton's metadata (shared memory), and reads the PTX:

- loops, found by their back edge: a branch to a label defined earlier in the function; each
  loop's block-wide barriers (``bar.sync`` / ``barrier.sync``), memory fences, atomics, and
  the widths of its global loads and stores;
- atomics (``atom.``, ``red.``) and fences (``membar``, ``fence.``) anywhere in the kernel;
- the ``ex2`` flavours (``ex2.approx.ftz.f32`` is one MUFU.EX2; the non-ftz form adds
  instructions that rescale denormal inputs and outputs).

Kernels and tiles come from the launch tables' registry, ``tiles.LAUNCHES``: each entry
"<family>.<name>" names its kernel and its table (rules per element size, at every tile
``tiles.selectable_tiles`` finds, or one ``SplitRule`` per element size: a split kernel's
slice); every ``*_kernel`` of a family's kernel module must have an entry, or be listed in
:data:`UNTABLED` with its launch, and each compile-time parameter must be known to
:data:`OPTIONS`, :data:`VARIANTS`, :data:`FIXED`, the tile, or be a module-level int of the
same name: anything new raises an error naming what to add, so no kernel goes unchecked.

    python -m benchmarks.compiled_code                   # JSON line per kernel, checks' verdict
    python -m benchmarks.compiled_code --table benchmarks/results/compiled_sm90.md \\
        --registers benchmarks/results/registers_sm90.md --complete

``tests/test_gpu_compile.py`` runs the representative set (:func:`jobs`) and asserts
:func:`violations` is empty; ``--complete`` compiles every selectable tile in both alignment
specialisations with every option on and off.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import resource
import sys
import tempfile
import time
from collections import Counter
from itertools import product
from operator import itemgetter
from pathlib import Path
from typing import NamedTuple

from benchmarks import common

REPO = common.REPO

#: Dtypes by element size; the representative set takes the first of each size.
DTYPES_BY_SIZE = {2: ("bf16", "fp16"), 4: ("fp32",), 8: ("fp64",)}
#: Processes compiling in parallel (ptxas and Triton's passes are single-threaded).
DEFAULT_JOBS = 2


class Family(NamedTuple):
    """An op module whose kernels are compiled."""

    module: str
    #: Pointers to data in the op's storage dtype; other pointers hold accumulator-dtype
    #: per-row values (loss, stats, scales), except ``target_ptr`` (int64 class indices or
    #: storage-dtype probabilities).
    data_pointers: tuple[str, ...]
    #: DRAM traffic by design, from the module docstring's byte accounting, per kernel name
    #: (as in ``_<family>_<kernel>_kernel``) and tile kind (held whole / streamed).
    dram: dict[tuple[str, bool], str]


FAMILIES = {
    "softmax": Family(
        "triton_softmax.ops.softmax_kernels",
        ("x_ptr", "y_ptr", "grad_x_ptr", "grad_y_ptr"),
        {
            ("forward", True): "1R + 1W (the floor)",
            ("forward", False): "1R + 1W + a 2nd read of the row (L2 or DRAM)",
            ("backward", True): "2R + 1W (the floor; softmax re-reads y from L1/L2)",
            ("backward", False): "4R + 1W (log-softmax 3R + 1W); 2R + 1W when pass 2 hits L2",
            ("split_forward", True): "1R + 1W (the floor; partials: 8 B a slice)",
            ("split_backward", True): "2R + 1W (the floor; partials: 4 B a slice)",
        },
    ),
    "cross_entropy": Family(
        "triton_softmax.ops.cross_entropy_kernels",
        ("logits_ptr", "grad_logits_ptr", "weight_ptr", "grad_ptr"),
        {
            ("forward", True): "1R; +1W with the gradient (row held in registers)",
            ("forward", False): "1R; with the gradient +1R (L2) +1W",
            ("backward", False): "1R + 1W (per-row upstream gradient)",
            ("scale", False): "1R + 1W when the factor is not 1, else 0",
        },
    ),
}

#: Compile-time options: (off, on). The representative set turns every option on; the
#: complete sweep also compiles every one off.
OPTIONS = {
    "LABEL_SMOOTHING": (0.0, 0.1),
    "Z_LOSS": (0.0, 1e-4),
    "SOFTCAP": (0.0, 30.0),
    "INV_TEMPERATURE": (1.0, 0.5),
    "ENTROPY": (False, True),
    "HAS_WEIGHT": (False, True),
    "SHARDED": (False, True),
    "WRITE_GRAD": (False, True),
    "HAS_GRAD_LSE": (False, True),
    "HAS_GRAD_ENTROPY": (False, True),
}
#: Compile-time switches between kernels of equal standing: every value is compiled.
VARIANTS = {"LOG": (False, True), "TARGET_IS_INDEX": (True, False)}
#: Compile-time parameters with one value in compiled launches: PHASE 0 is the split
#: kernels' single launch (PHASE 1 and 2 are the interpreter's two launches).
FIXED = {"PHASE": 0}
#: Pointer types other than the storage dtype / accumulator rule of :class:`Family`.
POINTER_TYPES = {"count_ptr": "*i32", "ticket_ptr": "*i32"}
#: Integer arguments that Triton's aligned specialisation marks divisible by 16 (row strides
#: are too): the row length. Pointers are always marked (torch allocates 16-byte aligned).
ALIGNED_SIZES = ("n_cols", "n_classes", "n_elements")
#: Kernels that no launch table sizes: kernel name -> (constexprs, num_warps), as their
#: launcher passes them (values named as strings are read from the kernel's module).
UNTABLED = {
    ("cross_entropy", "cross_entropy_scale_kernel"): ({"BLOCK": "SCALE_BLOCK"}, 8),
}
#: Names of the data-shaped compile-time parameters the tile sets.
TILE_PARAMS = ("SINGLE_BLOCK", "BLOCK_M", "BLOCK_N", "ACC_DTYPE")


class Job(NamedTuple):
    """One kernel specialisation to compile."""

    family: str  # softmax | cross_entropy
    kernel: str  # forward | backward | ... (the name between family and _kernel)
    module: str  # where the @triton.jit function lives
    function: str
    dtype: str  # fp16 | bf16 | fp32 | fp64
    variant: str  # the switches and options, in words
    aligned: bool  # Triton's 16-divisibility on strides and sizes (pointers always aligned)
    block_m: int
    block_n: int
    num_warps: int
    single_block: bool  # the row is held whole (no loop over column blocks)
    pointers: tuple[tuple[str, str], ...]  # name -> Triton pointer type
    constexprs: tuple[tuple[str, object], ...]  # tl dtypes as "tl.<name>"


def _acc(dtype: str) -> tuple[str, str]:
    """(ACC_DTYPE as 'tl.<name>', accumulator pointer type) for a storage dtype."""
    return ("tl.float64", "*fp64") if dtype == "fp64" else ("tl.float32", "*fp32")


def _kernels(family: str) -> dict[str, object]:
    """The module's @triton.jit kernels (functions named ``*_kernel`` defined there), by name."""
    import importlib

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    module = importlib.import_module(FAMILIES[family].module)
    return {  # InterpretedFunction under TRITON_INTERPRET=1 (the test process lists jobs)
        name: value
        for name, value in vars(module).items()
        if isinstance(value, JITFunction | InterpretedFunction)
        and name.endswith("_kernel")
        and value.fn.__module__ == module.__name__
    }


def _launches(family: str, module, kernels: dict, complete: bool) -> list[tuple]:
    """(function, kernel name, the (element size, tile, aligned) it launches, its sets of
    constexprs) per kernel of the family: its entries of ``tiles.LAUNCHES`` ("<family>.<kernel
    name>"), then those of :data:`UNTABLED`."""
    from triton_softmax.ops import tiles

    found = []
    for key, launch in tiles.LAUNCHES.items():
        owner, _, kernel = key.partition(".")
        if owner != family:
            continue
        if launch.module != module.__name__ or launch.function not in kernels:
            raise LookupError(
                f"tiles.LAUNCHES[{key!r}] names {launch.module}.{launch.function}, which is "
                f"not a kernel of {module.__name__}"
            )
        names = list(kernels[launch.function].arg_names)
        table_tiles = _table_tiles(launch.table, held="SINGLE_BLOCK" in names)
        metas = _constexpr_sets(module, names, complete)
        found.append((launch.function, kernel, table_tiles, metas))
    for (owner, function), (constexprs, num_warps) in UNTABLED.items():
        if owner != family:
            continue
        meta = {k: getattr(module, v) if isinstance(v, str) else v for k, v in constexprs.items()}
        block_n = max(v for v in meta.values() if isinstance(v, int))
        tile = tiles.Tile(1, block_n, num_warps, False)
        kernel = function.removeprefix(f"{family}_").removesuffix("_kernel")
        found.append((function, kernel, [(s, tile, True) for s in DTYPES_BY_SIZE], [meta]))
    missing = set(kernels) - {function for function, *_ in found}
    if missing:
        raise LookupError(
            f"{module.__name__}: kernels {sorted(missing)} have no launch table: add an entry to "
            "tiles.LAUNCHES, or the launch to UNTABLED in benchmarks/compiled_code.py"
        )
    return found


def _table_tiles(table: dict, held: bool) -> list[tuple[int, object, bool]]:
    """(element size, tile, aligned) a table can launch: ``selectable_tiles`` of a TileTable
    (streamed where the kernel cannot hold a row whole, ``held`` False); for one rule per size
    (a split kernel: one program per slice of ``block_n``, held in registers), that slice in
    both specialisations."""
    from triton_softmax.ops.tiles import Tile, selectable_tiles

    if all(hasattr(rule, "block_n") for rule in table.values()):
        return [
            (size, Tile(1, rule.block_n, rule.num_warps, True), aligned)
            for size, rule in table.items()
            for aligned in (False, True)
        ]
    found = selectable_tiles(table)
    if held:
        return found
    return list(dict.fromkeys((s, t._replace(single_block=False), a) for s, t, a in found))


def _pick(found: list[tuple[int, object, bool]]) -> list[tuple[int, object, bool]]:
    """The representative tiles of one table: per element size, the widest tile that holds
    a row whole (not aligned if launches use it so: element-wise loads, the costlier in
    registers) and the streamed tile in both specialisations (aligned: the 128-bit loads
    checked in its loop; not aligned: its registers)."""

    def widest(tiles: list) -> list:
        most = max((t.block_n for _, t, _ in tiles), default=None)
        return [x for x in tiles if x[1].block_n == most]

    picked = []
    for size in sorted({s for s, _, _ in found}):
        tiles = [x for x in found if x[0] == size]
        held = widest([x for x in tiles if x[1].single_block])
        picked += [min(held, key=lambda x: x[2])] if held else []  # unaligned first
        picked += widest([x for x in tiles if not x[1].single_block])
    return picked


def _constexpr_sets(module, names: list[str], complete: bool) -> list[dict]:
    """The compile-time parameters other than the tile's, one dict per specialisation. A
    parameter named as a module-level int of the kernel's module (``MAX_SLICES``) takes its
    value."""
    known = (*OPTIONS, *VARIANTS, *FIXED, *TILE_PARAMS)
    fixed = {
        n: FIXED[n] if n in FIXED else getattr(module, n)
        for n in names
        if n in FIXED or (n.isupper() and isinstance(getattr(module, n, None), int))
    }
    unknown = [n for n in names if n.isupper() and n not in known and n not in fixed]
    if unknown:
        raise LookupError(
            f"compile-time parameters {unknown} are unknown to benchmarks/compiled_code.py: "
            "add them to OPTIONS (off, on), VARIANTS or FIXED"
        )
    sets = [fixed]
    for name in names:
        if name in VARIANTS:
            sets = [{**s, name: v} for s in sets for v in VARIANTS[name]]
    options = [n for n in names if n in OPTIONS]
    states = (True, False) if complete and options else (True,)
    return [{**s, **{n: OPTIONS[n][on] for n in options}} for s in sets for on in states]


def _variant(constexprs: dict) -> str:
    words = []
    if "LOG" in constexprs:
        words.append("log-softmax" if constexprs["LOG"] else "softmax")
    if "TARGET_IS_INDEX" in constexprs:
        words.append("class index" if constexprs["TARGET_IS_INDEX"] else "probabilities")
    options = [n for n in constexprs if n in OPTIONS]
    if options:
        on = all(constexprs[n] == OPTIONS[n][1] for n in options)
        words.append("all options" if on else "no options")
    return ", ".join(words) or "-"


def _pointers(family: str, names: list[str], dtype: str, constexprs: dict) -> dict[str, str]:
    data = FAMILIES[family].data_pointers
    pointers = {}
    for name in names:
        if not name.endswith("_ptr"):
            continue
        if name in POINTER_TYPES:
            pointers[name] = POINTER_TYPES[name]
        elif name == "target_ptr":
            pointers[name] = "*i64" if constexprs.get("TARGET_IS_INDEX", True) else f"*{dtype}"
        elif name in data:
            pointers[name] = f"*{dtype}"
        else:
            pointers[name] = _acc(dtype)[1]
    return pointers


def jobs(complete: bool = False) -> list[Job]:
    """The specialisations to compile, in a stable order: with ``complete``, every tile each
    launch table can select, in each alignment specialisation it is launched with, in every
    dtype, with every option on and every option off; otherwise the representative set: per
    kernel, one dtype of each element size, the tiles :func:`_pick` takes, every switch in
    :data:`VARIANTS`, every option on."""
    import importlib

    found: list[Job] = []
    for family, spec in FAMILIES.items():
        module = importlib.import_module(spec.module)
        kernels = _kernels(family)
        for function, kernel, tiles, metas in _launches(family, module, kernels, complete):
            names = kernels[function].arg_names
            for size, tile, aligned in tiles if complete else _pick(tiles):
                for dtype, meta in product(DTYPES_BY_SIZE[size][: None if complete else 1], metas):
                    full = {
                        **meta,
                        "ACC_DTYPE": _acc(dtype)[0],
                        "BLOCK_M": tile.block_m,
                        "BLOCK_N": tile.block_n,
                        "SINGLE_BLOCK": tile.single_block,
                    }
                    pointers = tuple(_pointers(family, names, dtype, full).items())
                    constexprs = tuple((k, v) for k, v in full.items() if k in names)
                    variant = _variant(meta)
                    job = (family, kernel, spec.module, function, dtype, variant, aligned, *tile)
                    found.append(Job(*job, pointers, constexprs))
    return found


# --------------------------------------------------------------------------------------
# PTX reading. Each function takes the PTX text of one kernel (or a snippet of it).
# --------------------------------------------------------------------------------------

_LABEL = re.compile(r"^\s*(\$L__BB\d+_\d+):", re.M)
_PREDICATED = r"^\s*(?:@!?%p\d+\s+)?"  # an instruction, guarded by a predicate or not
_BRANCH = re.compile(_PREDICATED + r"bra(?:\.uni)?\s+(\$L__BB\d+_\d+);", re.M)
_BARRIER = re.compile(_PREDICATED + r"(?:bar|barrier)\.(?:cta\.)?(?:sync|red|arrive)\b", re.M)
_ATOMIC_OP = re.compile(_PREDICATED + r"((?:atom|red)\.[\w.:]+)", re.M)
_FENCE = re.compile(_PREDICATED + r"(?:membar|fence)\.[\w.:]+", re.M)
_GLOBAL = re.compile(_PREDICATED + r"(ld|st)\.global((?:\.[\w:]+)*)\s", re.M)
_EX2 = re.compile(_PREDICATED + r"(ex2\.[\w.]+)\s", re.M)


def _code(ptx: str) -> str:
    """PTX without comments (``//`` to the end of the line): labels in comments are not
    branch targets."""
    return re.sub(r"//[^\n]*", "", ptx)


def loops(ptx: str) -> list[str]:
    """The body of every loop, from its header label to its back edge (a branch, conditional
    or not, to a label defined earlier in the function), in the order of the back edges."""
    code = _code(ptx)
    labels = {m.group(1): m.start() for m in _LABEL.finditer(code)}
    found = []
    for branch in _BRANCH.finditer(code):
        start = labels.get(branch.group(1))
        if start is not None and start < branch.start():
            found.append(code[start : branch.end()])
    return found


def barriers(ptx: str) -> int:
    """Block-wide barrier instructions (``bar.sync``, ``barrier.sync``, ``bar.red``, ...)."""
    return len(_BARRIER.findall(_code(ptx)))


def atomics(ptx: str) -> Counter:
    """Atomic instructions by kind, "float" (``atom...add.f32``, ``red...add.f32``: data
    accumulated in an order that varies from run to run) or "int" (counters, locks): every
    ``atom.*`` and reduction to memory ``red.*`` (not the warp reduction ``redux``)."""
    kinds = Counter()
    for m in _ATOMIC_OP.finditer(_code(ptx)):
        kinds[
            "float" if re.search(r"\.(?:b?f16|f32|f64)(?:x2)?(?:\.|$)", m.group(1)) else "int"
        ] += 1
    return kinds


def fences(ptx: str) -> list[str]:
    """Memory fences of GPU or system scope (``membar.gl``, ``fence.acq_rel.gpu``,
    ``fence.sc.sys``), as written; not the CTA-scope proxy fences that Triton puts before
    tensor-core reads of shared memory (``fence.proxy.async.shared::cta``)."""
    found = [m.group(0).strip().split()[-1] for m in _FENCE.finditer(_code(ptx))]
    return [f for f in found if re.search(r"\.(gpu|sys|gl)\b", f)]


def _ordered(suffixes: str) -> bool:
    """Whether a global access's qualifiers give it memory-model ordering (``.acquire``,
    ``.release``, ``.relaxed``, ``.volatile``): a synchronising access, not data."""
    return bool(re.search(r"\.(acquire|release|relaxed|volatile)\b", suffixes))


def ordered_accesses(ptx: str) -> int:
    """Global loads and stores with memory-model ordering (a spin on a counter)."""
    return sum(_ordered(m.group(2)) for m in _GLOBAL.finditer(_code(ptx)))


def access_bits(ptx: str, op: str) -> Counter:
    """Bits per global ``op`` ("ld" or "st") instruction -> how many: ``ld.global.v4.b32``
    is 128, ``ld.global.L1::evict_last.v2.b64`` 128, ``st.global.b16`` 16; accesses with
    memory-model ordering (:func:`ordered_accesses`) are left out."""
    widths = Counter()
    for m in _GLOBAL.finditer(_code(ptx)):
        if m.group(1) != op or _ordered(m.group(2)):
            continue
        suffixes = m.group(2).split(".")
        vector = next((int(s[1:]) for s in suffixes if re.fullmatch(r"v\d+", s)), 1)
        bits = next(int(s[1:]) for s in reversed(suffixes) if re.fullmatch(r"[bfsu]\d+", s))
        widths[vector * bits] += 1
    return widths


def ex2_flavours(ptx: str) -> Counter:
    """``ex2`` instruction -> how many (``ex2.approx.ftz.f32``, ``ex2.approx.f32``, ...)."""
    return Counter(m.group(1) for m in _EX2.finditer(_code(ptx)))


def analyse(ptx: str) -> dict:
    """Everything the checks and the table use, from one kernel's PTX (JSON-serialisable).
    A loop is "streamed" when it loads or stores global memory other than by atomics or
    ordered accesses (a loop over column blocks); otherwise it is a wait (a spin on a
    counter)."""

    def widths(code: str, op: str) -> dict[str, int]:
        return {str(k): v for k, v in sorted(access_bits(code, op).items())}

    def loop(body: str) -> dict:
        loads, stores = widths(body, "ld"), widths(body, "st")
        return {
            "streamed": bool(loads or stores),
            "barriers": barriers(body),
            "fences": fences(body),
            "atomics": dict(atomics(body)),
            "ordered": ordered_accesses(body),
            "loads": loads,
            "stores": stores,
        }

    return {
        "atomics": dict(atomics(ptx)),
        "fences": fences(ptx),
        "ex2": dict(ex2_flavours(ptx)),
        "loads": widths(ptx, "ld"),
        "stores": widths(ptx, "st"),
        "loops": [loop(body) for body in loops(ptx)],
    }


# --------------------------------------------------------------------------------------
# Checks on compiled kernels (the test asserts none fails).
# --------------------------------------------------------------------------------------

#: Kernels whose streamed loops must hold no block-wide barrier: (family, kernel).
BARRIER_FREE_LOOPS = {("cross_entropy", "forward"), ("softmax", "forward")}
#: Kernels that synchronise programs through integer atomics by design, (family, kernel) ->
#: why: the split softmax kernels take a ticket and count in / wait on their row's counter
#: (softmax_kernels.py's docstring). Float atomics (accumulating data) are refused in every kernel.
SYNC_ATOMICS = {
    ("softmax", "split_forward"): "ticket, then release / acquire on the row's counter",
    ("softmax", "split_backward"): "ticket, then release / acquire on the row's counter",
}


def _bytes_per_thread(r: dict) -> int:
    """Bytes of one [BLOCK_M, BLOCK_N] block each thread loads: below 16, a 128-bit load is
    impossible (short rows: a few elements a thread)."""
    size = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}[r["dtype"]]
    return r["block_m"] * r["block_n"] * size // (32 * r["num_warps"])


def violations(r: dict) -> list[str]:
    """What is wrong with one compiled kernel (a result of :func:`compile_job`). Empty when
    all is well. Refused: register spills; float atomics anywhere; integer atomics outside
    :data:`SYNC_ATOMICS` or inside a streamed loop; fences in a streamed loop; block-wide
    barriers in the streamed loops of :data:`BARRIER_FREE_LOOPS`; global loads narrower
    than 128 bits in the streamed loops of aligned launches whose threads load at least 16
    bytes a block; any ``ex2`` other than
    ``ex2.approx.ftz.f32`` in fp32-accumulating cross-entropy kernels (or none at all)."""
    found = []
    if r["spill_stores"] or r["spill_loads"]:
        found.append(f"spills {r['spill_stores']} B stores, {r['spill_loads']} B loads")
    if r["atomics"].get("float"):
        found.append(f"{r['atomics']['float']} float atom/red instructions")
    if r["atomics"].get("int") and (r["family"], r["kernel"]) not in SYNC_ATOMICS:
        found.append(f"{r['atomics']['int']} integer atom/red instructions")
    for i, loop in enumerate(r["loops"]):
        if not loop["streamed"]:
            continue
        if loop["atomics"]:
            found.append(f"loop {i}: atomics {loop['atomics']}")
        if loop["fences"]:
            found.append(f"loop {i}: fences {loop['fences']}")
        if loop["barriers"] and (r["family"], r["kernel"]) in BARRIER_FREE_LOOPS:
            found.append(f"loop {i}: {loop['barriers']} block-wide barriers")
        narrow = {int(k): v for k, v in loop["loads"].items() if int(k) < 128}
        if r["aligned"] and narrow and _bytes_per_thread(r) >= 16:
            found.append(f"loop {i}: global loads narrower than 128 bits {narrow}")
    if r["family"] == "cross_entropy" and r["kernel"] in ("forward", "backward"):
        if r["dtype"] != "fp64":
            other = {k: v for k, v in r["ex2"].items() if k != "ex2.approx.ftz.f32"}
            if other or not r["ex2"]:
                found.append(f"ex2 other than ex2.approx.ftz.f32: {other or 'no ex2'}")
    return found


def describe(r: dict) -> str:
    """One line naming a compiled kernel."""
    return (
        f"{r['family']} {r['kernel']} {r['dtype']} {r['variant']} aligned={r['aligned']} "
        f"[{r['block_m']}, {r['block_n']}] x {r['num_warps']} warps"
        + (", held whole" if r["single_block"] else "")
    )


# --------------------------------------------------------------------------------------
# Compiling.
# --------------------------------------------------------------------------------------


def compile_job(job: Job) -> dict:
    """Compile one job for sm_90a; return it with ptxas's registers and spill bytes, the
    shared memory, and :func:`analyse` of its PTX.

    Needs TRITON_DUMP_PTXAS_LOG=1 and a fresh TRITON_CACHE_DIR in the environment (ptxas
    does not run, and prints nothing, for a cached kernel), and no TRITON_INTERPRET when
    triton was imported: :func:`compile_all` runs in such a process (see :func:`main`).
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
        if name in pointers or (job.aligned and (name.endswith("stride") or name in ALIGNED_SIZES)):
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()},
        attrs=attrs,
    )
    log, cpu = io.StringIO(), _cpu_s()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(
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
        "shared_bytes": int(compiled.metadata.shared),
        **analyse(compiled.asm["ptx"]),
        "cpu_s": round(_cpu_s() - cpu, 2),
    }


def _cpu_s() -> float:
    """CPU seconds of this process and of its children waited for (ptxas)."""
    return time.process_time() + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime


def compile_all(n_jobs: int = DEFAULT_JOBS, complete: bool = False) -> list[dict]:
    """Compile every job in ``n_jobs`` processes; results in the order of :func:`jobs`."""
    import multiprocessing

    todo = jobs(complete)
    # Largest tiles first, so that the last ones to finish are short.
    order = sorted(range(len(todo)), key=lambda i: -todo[i].block_m * todo[i].block_n)
    with multiprocessing.get_context("fork").Pool(n_jobs) as pool:
        done = pool.map(compile_job, [todo[i] for i in order], chunksize=1)
    by_index = dict(zip(order, done, strict=True))
    return [by_index[i] for i in range(len(todo))]


def versions() -> str:
    """Triton's version, the target, and the ptxas build."""
    import triton
    from triton.backends.nvidia.compiler import get_ptxas_version

    ptxas = get_ptxas_version(90).strip().splitlines()[-1]
    return f"triton {triton.__version__}, target sm_90a (GPUTarget('cuda', 90, 32)), ptxas: {ptxas}"


# --------------------------------------------------------------------------------------
# Tables.
# --------------------------------------------------------------------------------------


def _widths(counts: dict) -> str:
    return " ".join(f"{k}x{v}" for k, v in sorted(counts.items(), key=lambda kv: -int(kv[0])))


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


_EX2_NAMES = {"ex2.approx.ftz.f32": "ftz", "ex2.approx.f32": "non-ftz"}
#: The tables' order of compiled kernels.
_ORDER = itemgetter("family", "kernel", "dtype", "block_n", "block_m", "variant", "aligned")


def _head(title: str, command: str, what: str, results: list[dict], seconds: float) -> list[str]:
    """A table page's title, how it was generated (``what``: the rest of that paragraph), the
    versions and the compile time."""
    return [
        f"# {title}",
        "",
        f"Generated by `{command}` (benchmarks/compiled_code.py): {what}",
        "",
        f"{versions()}; {len(results)} kernels compiled in {seconds:.0f} s on "
        f"{os.cpu_count()} cores.",
        "",
    ]


def _named(r: dict) -> str:
    """A kernel's first table cells: kernel, dtype, variant, aligned."""
    return f"| {r['family']} {r['kernel']} | {r['dtype']} | {r['variant']} | {_yes(r['aligned'])} |"


def compiled_markdown(results: list[dict], seconds: float, command: str) -> str:
    """The table of what each kernel compiles to."""
    lines = _head(
        "What each kernel compiles to, sm_90a (no GPU needed)",
        command,
        "each kernel compiled with Triton for sm_90a in a process without TRITON_INTERPRET, "
        "assembled by ptxas (registers, spills), its PTX read for loops (a branch back to an "
        "earlier label), barriers, fences, atomics, global access widths and ex2 flavours. No "
        "GPU ran these kernels. `tests/test_gpu_compile.py` compiles the representative set and "
        "asserts `violations()` is empty.",
        results,
        seconds,
    )
    lines += [
        "Columns: **held** the row is held in registers whole (no loop over column blocks); "
        "**aligned** Triton's specialisation for 16-aligned strides and row length; "
        "**smem** shared memory in bytes (Triton's metadata); **loads / stores** global "
        "accesses by width in bits x count in the whole kernel, and in the loops "
        "(**loop loads**, streamed loops only); **barriers per loop** `bar.sync` / "
        "`barrier.sync` between each loop's header and back edge, in the order of the back "
        "edges, `(wait)` marking a loop that only spins on an atomic counter; **atomics** "
        "float / int `atom.` / `red.` in the kernel; **ex2** "
        "`ftz` = ex2.approx.ftz.f32, `non-ftz` = ex2.approx.f32 (rescales denormals: more "
        "instructions), `f64` the fp64 exp (no ex2); **DRAM** the traffic per row by design "
        "(R / W = the row read / written once), from the module docstrings.",
        "",
        "| kernel | dtype | variant | aligned | BLOCK_M x BLOCK_N | warps | held "
        "| registers | spills (B) | smem | loads | stores | loop loads | barriers per loop "
        "| atomics | ex2 | DRAM by design |",
        "|---|---|---|---|---|---:|---|---:|---:|---:|---|---|---|---|---:|---|---|",
    ]
    ordered = sorted(results, key=_ORDER)
    for r in ordered:
        ex2 = ", ".join(f"{_EX2_NAMES.get(k, k)} {v}" for k, v in sorted(r["ex2"].items()))
        loop_loads = sum((Counter(x["loads"]) for x in r["loops"] if x["streamed"]), Counter())
        per_loop = [f"{x['barriers']}{'' if x['streamed'] else ' (wait)'}" for x in r["loops"]]
        lines.append(
            f"{_named(r)} {r['block_m']} x {r['block_n']} | {r['num_warps']} | "
            f"{_yes(r['single_block'])} | {r['registers']} | "
            f"{r['spill_stores'] + r['spill_loads']} | {r['shared_bytes']} | "
            f"{_widths(r['loads'])} | {_widths(r['stores'])} | {_widths(loop_loads) or '-'} | "
            f"{', '.join(per_loop) or '-'} | "
            f"{' '.join(f'{k} {v}' for k, v in sorted(r['atomics'].items())) or '0'} | "
            f"{ex2 or ('f64' if r['dtype'] == 'fp64' else '-')} | "
            f"{FAMILIES[r['family']].dram.get((r['kernel'], r['single_block']), '-')} |"
        )
    lines += ["", "## Checks that fail", ""]
    lines += [f"- {describe(r)}: {v}" for r in ordered for v in violations(r)] or ["None."]
    return "\n".join(lines) + "\n"


def registers_markdown(results: list[dict], seconds: float, command: str) -> str:
    """The register table: a summary per kernel and dtype, then every compiled kernel."""
    lines = _head(
        "Registers and spills per kernel configuration, sm_90 (no GPU needed)",
        command,
        "every tile the launch tables can select (`tiles.LAUNCHES` in "
        "triton_softmax/ops/tiles.py) in every dtype and in each of Triton's alignment "
        "specialisations it is launched with, every option on and off, compiled with Triton for "
        "sm_90a and assembled by ptxas, whose report gives the registers per thread and the "
        "spill bytes. `tests/test_gpu_compile.py` compiles a representative set in CI and fails "
        "on any spill. No GPU ran these kernels; registers say nothing about speed. A thread "
        "has at most 255 registers, and 65 536 / (32 x num_warps) with more than 8 warps (64 at "
        "32 warps). The other properties of the code are in compiled_sm90.md.",
        results,
        seconds,
    )
    lines += [
        "## Summary",
        "",
        "| kernel | dtype | kernels | registers (min-max) | kernels that spill |",
        "|---|---|---:|---:|---:|",
    ]
    ordered = sorted(results, key=_ORDER)
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in ordered:
        groups.setdefault((r["family"], r["kernel"], r["dtype"]), []).append(r)
    for (family, kernel, dtype), rows in groups.items():
        regs = [r["registers"] for r in rows]
        spilled = sum(bool(r["spill_stores"] or r["spill_loads"]) for r in rows)
        lines.append(
            f"| {family} {kernel} | {dtype} | {len(rows)} | {min(regs)}-{max(regs)} | {spilled} |"
        )
    lines += [
        "",
        "## Every kernel",
        "",
        "| kernel | dtype | variant | aligned | BLOCK_M | BLOCK_N | num_warps | held "
        "| registers | spill stores (B) | spill loads (B) |",
        "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    lines += [
        f"{_named(r)} {r['block_m']} | {r['block_n']} | {r['num_warps']} | "
        f"{_yes(r['single_block'])} | {r['registers']} | {r['spill_stores']} | "
        f"{r['spill_loads']} |"
        for r in ordered
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Compile, print one JSON line per kernel, write the tables; exit 1 when a check fails."""
    parser = common.parser("compiled_code", __doc__.split("\n\n")[0], out=False)
    parser.add_argument("--table", type=Path, help="write the compiled-code table here")
    parser.add_argument("--registers", type=Path, help="write the register table here")
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help="parallel processes")
    parser.add_argument(
        "--complete",
        action="store_true",
        help="every selectable tile in every specialisation and dtype, options on and off",
    )
    args = parser.parse_args(argv)
    # Before triton is imported: compile for the GPU, not the interpreter, and have ptxas print
    # its report (compiled into a fresh cache: a cached kernel prints no report).
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET"):
        raise RuntimeError("triton was imported with TRITON_INTERPRET=1: run in a fresh process")
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset
    command = f"{parser.prog} " + " ".join(sys.argv[1:] if argv is None else argv)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="triton-sm90-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        results = compile_all(args.jobs, complete=args.complete)
    seconds = time.monotonic() - start
    for r in results:
        print(json.dumps(r))
    bad = [f"{describe(r)}: {v}" for r in results for v in violations(r)]
    print(
        f"compiled {len(results)} kernels in {seconds:.0f} s; {len(bad)} failed checks"
        + "".join(f"\n  {b}" for b in bad),
        file=sys.stderr,
    )
    for path, write in ((args.table, compiled_markdown), (args.registers, registers_markdown)):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(write(results, seconds, command))
            print(f"wrote {path}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
