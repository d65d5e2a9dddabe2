"""What the kernels compile to for an NVIDIA H100 (sm_90a), checked on a machine without a GPU.

The other tests run the kernels through Triton's interpreter, which has no registers to run
out of and emits no machine code. Here ``benchmarks.compiled_code`` compiles a representative
set of specialisations with Triton's own compiler and ptxas in a process without
TRITON_INTERPRET, and the test asserts ``violations()`` is empty for every kernel: no spills,
no float atomics (integer ones only where programs synchronise by design), no fences or
atomics in streamed loops, no block-wide barrier in the streamed loops of the softmax and
cross-entropy forwards, 128-bit global loads in the streamed loops of aligned launches, and
only ``ex2.approx.ftz.f32`` in the fp32-accumulating cross-entropy kernels. The PTX predicates
are tested on handcrafted snippets first, so that each check is known to be able to fail.

The exhaustive sweep and the committed tables:

    python -m benchmarks.compiled_code --complete \\
        --table benchmarks/results/compiled_sm90.md --registers benchmarks/results/registers_sm90.md
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import compiled_code as cc

# A streamed loop as Triton emits it for sm_90 (abridged): a header label, a back edge.
LOOP = """
.visible .entry k(
)
{
	mov.u32 	%r1, 0;
$L__BB0_1:                              // %loop
	@%p1 ld.global.L1::evict_last.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd1 + 0 ];
{body}
	@%p2 bra 	$L__BB0_1;
	bra.uni 	$L__BB0_3;
$L__BB0_3:
	st.global.b32 	[ %rd2 + 0 ], { %r6 };
	ret;
}
"""


#: Violations known to be open, each with its cause as measured (the owner's to fix), as
#: (family, kernel, text in the violation, cause). The test fails on any other violation, and
#: on an entry here that no longer occurs (fixed: remove it).
KNOWN_OPEN: tuple[tuple[str, str, str, str], ...] = ()


def _ptx(body: str = "") -> str:
    return LOOP.replace("{body}", body)


def test_loops_found_by_back_edge_only():
    ptx = _ptx()
    (body,) = cc.loops(ptx)
    assert body.startswith("$L__BB0_1:") and body.rstrip().endswith("bra \t$L__BB0_1;")
    assert "$L__BB0_3" not in body  # the forward branch makes no loop
    assert cc.loops(ptx.replace("@%p2 bra \t$L__BB0_1;", "")) == []
    # A label named only in a comment is no branch target.
    assert cc.loops("// $L__BB0_9:\n@%p1 bra $L__BB0_9;\n") == []


def test_barriers_counted_inside_the_loop_only():
    body = "\tbar.sync \t0;\n\tst.shared.v4.b32 \t[%r7], {%r1, %r2, %r3, %r4};\n\tbar.sync \t0;"
    (loop,) = cc.loops(_ptx(body))
    assert cc.barriers(loop) == 2
    assert cc.barriers(_ptx("\tbarrier.sync.aligned \t0;")) == 1
    assert cc.barriers(_ptx()) == 0
    # Outside the loop: counted in the kernel, not in the loop.
    after = _ptx().replace("\tret;", "\tbar.sync \t0;\n\tret;")
    assert cc.barriers(after) == 1 and cc.barriers(cc.loops(after)[0]) == 0


def test_atomics_by_kind_and_not_redux():
    ptx = _ptx(
        "\t@%p3 red.global.gpu.relaxed.add.f32 [ %rd3 + 0 ], %r8;\n"
        "\tatom.global.gpu.acq_rel.add.u32 %r9, [%rd4], 1;\n"
        "\tatom.global.v2.f16x2.add.noftz %r10, [%rd5], %r11;\n"
        "\tredux.sync.add.s32 %r12, %r13, -1;"
    )
    assert cc.atomics(ptx) == {"float": 2, "int": 1}
    assert cc.atomics(_ptx()) == {}


def test_fences_and_global_access_widths():
    assert cc.fences(_ptx("\tfence.acq_rel.gpu;\n\tmembar.gl;")) == [
        "fence.acq_rel.gpu",
        "membar.gl",
    ]
    ptx = _ptx(
        "\t@%p4 ld.global.v2.b64 { %rd6, %rd7 }, [ %rd8 + 0 ];\n"
        "\t@%p5 ld.global.b16 { %rs1 }, [ %rd9 + 0 ];\n"
        "\tst.global.v4.b32 [ %rd2 + 0 ], { %r1, %r2, %r3, %r4 };"
    )
    assert cc.access_bits(ptx, "ld") == {128: 2, 16: 1}
    assert cc.access_bits(ptx, "st") == {128: 1, 32: 1}


def test_ex2_flavours():
    ptx = _ptx("\tex2.approx.ftz.f32 \t%r1, %r2;\n\tex2.approx.f32 \t%r3, %r4;\n")
    assert cc.ex2_flavours(ptx) == {"ex2.approx.ftz.f32": 1, "ex2.approx.f32": 1}


def _result(ptx: str, **job) -> dict:
    r = dict(
        family="cross_entropy",
        kernel="forward",
        dtype="fp32",
        variant="-",
        aligned=True,
        block_m=1,
        block_n=4096,
        num_warps=16,
        single_block=False,
        registers=40,
        spill_stores=0,
        spill_loads=0,
        shared_bytes=0,
    )
    r.update(job)
    return {**r, **cc.analyse(ptx)}


def test_violations_each_check_can_fail():
    ftz = "\tex2.approx.ftz.f32 \t%r1, %r2;"
    assert cc.violations(_result(_ptx(ftz))) == []

    def fails(ptx: str, needle: str, **job) -> None:
        found = cc.violations(_result(ptx, **job))
        assert len(found) == 1 and needle in found[0], found

    fails(_ptx(ftz + "\n\tbar.sync \t0;"), "block-wide barriers")
    fails(_ptx(ftz + "\n\tbar.sync \t0;"), "block-wide barriers", family="softmax")
    assert (
        cc.violations(_result(_ptx("\tbar.sync \t0;"), family="softmax", kernel="backward")) == []
    )
    after = "\tred.global.add.f32 [ %rd3 + 0 ], %r8;\n\tret;"
    fails(_ptx(ftz).replace("\tret;", after), "float atom/red")
    fails(_ptx(ftz).replace("\tret;", "\tatom.global.add.u32 %r9, [%rd4], 1;\n\tret;"), "integer")
    # Integer atomics where programs synchronise by design: allowed outside streamed loops.
    split = _ptx().replace("\tret;", "\tatom.global.acquire.gpu.add.u32 %r9, [%rd4], 0;\n\tret;")
    assert cc.violations(_result(split, family="softmax", kernel="split_forward")) == []
    spin = _ptx("\tatom.global.acquire.gpu.add.u32 %r9, [%rd4], 0;")
    fails(spin, "loop 0: atomics", family="softmax", kernel="split_forward")
    # A loop with only ordered loads is a wait, not a streamed loop: its barriers pass.
    wait = _ptx("\tbar.sync \t0;").replace("ld.global.L1::evict_last.v4", "ld.global.gpu.acquire")
    assert cc.analyse(wait)["loops"][0]["streamed"] is False
    assert cc.violations(_result(wait, family="softmax")) == []
    fails(_ptx("\tbar.sync \t0;"), "block-wide barriers", family="softmax")
    fails(_ptx(ftz + "\n\tfence.acq_rel.gpu;"), "fences")
    fails(_ptx(ftz + "\n\tld.global.b32 { %r1 }, [ %rd1 + 0 ];"), "narrower than 128 bits")
    # 16 fp32 columns a block over 4 warps: a thread loads 4 bytes, 128 bits are impossible.
    narrow = _ptx(ftz + "\n\tld.global.b32 { %r1 }, [ %rd1 + 0 ];")
    assert cc.violations(_result(narrow, block_n=16, num_warps=4)) == []
    assert (
        cc.violations(
            _result(_ptx(ftz + "\n\tld.global.b32 { %r1 }, [ %rd1 + 0 ];"), aligned=False)
        )
        == []
    )
    fails(_ptx(ftz + "\n\tex2.approx.f32 \t%r3, %r4;"), "ex2 other than")
    fails(_ptx(), "no ex2")
    assert cc.violations(_result(_ptx(), dtype="fp64")) == []
    fails(_ptx(ftz), "spills", spill_stores=4)


def test_jobs_come_from_the_launch_tables():
    jobs = cc.jobs()
    kernels = {(j.family, j.function) for j in jobs}
    for family in cc.FAMILIES:
        assert {(family, f) for f in cc._kernels(family)} <= kernels
    # Per table kernel: each element size, held-whole and streamed tiles where it has them,
    # the streamed one aligned (its 128-bit loads are checked).
    for family, kernel in (("softmax", "forward"), ("cross_entropy", "forward")):
        mine = [j for j in jobs if (j.family, j.kernel) == (family, kernel)]
        assert {j.dtype for j in mine} == {"bf16", "fp32", "fp64"}
        assert {j.single_block for j in mine} == {True, False}
        assert any(j.aligned and not j.single_block for j in mine)
    assert len(cc.jobs(complete=True)) > 4 * len(jobs)


def test_compiled_code_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.compiled_code"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cc.REPO,
    )
    if "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("Triton's ptxas is not available on this machine")
    results = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(results) == len(cc.jobs()) > 0, result.stderr[-4000:]
    found = [(r, v) for r in results for v in cc.violations(r)]

    def known(r: dict, v: str) -> tuple | None:
        return next(
            (k for k in KNOWN_OPEN if (r["family"], r["kernel"]) == k[:2] and k[2] in v), None
        )

    bad = [f"{cc.describe(r)}: {v}" for r, v in found if known(r, v) is None]
    assert not bad, "\n".join(bad)
    fixed = set(KNOWN_OPEN) - {known(r, v) for r, v in found}
    assert not fixed, f"fixed, remove from KNOWN_OPEN: {sorted(k[:3] for k in fixed)}"
