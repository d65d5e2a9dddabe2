"""Every kernel compiles for an NVIDIA GPU (sm_90), even on a machine without one.

The tests elsewhere run the kernels through Triton's interpreter, which accepts code that the
GPU compiler may reject (types, constexpr use, fp64 math). This compiles a representative set of
specialisations to cubin with Triton's own compiler and ptxas, in a process without
TRITON_INTERPRET. Run this file as a script to compile them all and print the count.
"""

import os
import subprocess
import sys

import pytest

SOFTMAX_CASES = [  # (dtype, SINGLE_BLOCK, BLOCK_M, BLOCK_N, LOG)
    ("fp32", True, 128, 16, False),
    ("bf16", False, 1, 4096, True),
    ("fp64", True, 1, 8192, True),
]
CROSS_ENTROPY_CASES = [  # (dtype, TARGET_IS_INDEX, HAS_WEIGHT, LABEL_SMOOTHING, Z_LOSS,
    #                         HAS_GRAD_LSE, BLOCK_M, BLOCK_N)
    ("fp32", True, True, 0.1, 1e-4, True, 1, 4096),
    ("bf16", False, True, 0.2, 0.0, False, 128, 16),
    ("fp64", True, False, 0.0, 0.0, False, 1, 4096),
    ("fp16", True, False, 0.1, 1e-3, True, 128, 32),
]
LINEAR_CASES = [  # (dtype, TARGET_IS_INDEX, LABEL_SMOOTHING, SOFTCAP, HAS_BIAS, BM, BV, BK)
    ("bf16", True, 0.1, 30.0, True, 64, 128, 64),
    ("fp32", False, 0.0, 0.0, False, 64, 64, 32),
    ("fp64", True, 0.0, 0.0, True, 32, 64, 32),
]


def _compile_all() -> int:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from triton_softmax.ops import cross_entropy, linear_cross_entropy, softmax

    target = GPUTarget("cuda", 90, 32)
    acc_types = {"fp64": (tl.float64, "*fp64")}

    def compile_kernel(kernel, pointer_types, constexprs):
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = pointer_types[name]
            else:  # strides, sizes, ignore_index
                signature[name] = "i64" if name.endswith("stride") else "i32"
        source = ASTSource(
            fn=kernel,
            signature=signature,
            constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()},
        )
        triton.compile(source, target=target)

    count = 0
    for dtype, single, block_m, block_n, log in SOFTMAX_CASES:
        acc, _ = acc_types.get(dtype, (tl.float32, "*fp32"))
        meta = dict(LOG=log, ACC_DTYPE=acc, SINGLE_BLOCK=single, BLOCK_M=block_m, BLOCK_N=block_n)
        for kernel in (softmax._softmax_forward_kernel, softmax._softmax_backward_kernel):
            pointers = {name: f"*{dtype}" for name in kernel.arg_names if name.endswith("_ptr")}
            compile_kernel(kernel, pointers, meta)
            count += 1
    for (
        dtype,
        is_index,
        weight,
        smoothing,
        z_loss,
        grad_lse,
        block_m,
        block_n,
    ) in CROSS_ENTROPY_CASES:
        acc, acc_pointer = acc_types.get(dtype, (tl.float32, "*fp32"))
        meta = dict(
            LABEL_SMOOTHING=smoothing,
            Z_LOSS=z_loss,
            SOFTCAP=30.0 if smoothing else 0.0,
            TARGET_IS_INDEX=is_index,
            HAS_WEIGHT=weight,
            ACC_DTYPE=acc,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
        )
        pointers = {
            "logits_ptr": f"*{dtype}",
            "grad_logits_ptr": f"*{dtype}",
            "weight_ptr": f"*{dtype}",
            "target_ptr": "*i64" if is_index else f"*{dtype}",
            **{
                p: acc_pointer
                for p in ("loss_ptr", "lse_ptr", "grad_loss_ptr", "grad_lse_ptr")
                + ("row_max_ptr", "log_sum_ptr", "target_mass_ptr")
            },
        }
        compile_kernel(cross_entropy._cross_entropy_forward_kernel, pointers, meta)
        compile_kernel(
            cross_entropy._cross_entropy_backward_kernel,
            pointers,
            dict(meta, HAS_GRAD_LSE=grad_lse),
        )
        count += 2
    for dtype, is_index, smoothing, softcap, bias, block_m, block_v, block_k in LINEAR_CASES:
        acc, acc_pointer = acc_types.get(dtype, (tl.float32, "*fp32"))
        meta = dict(
            LABEL_SMOOTHING=smoothing,
            SOFTCAP=softcap,
            TARGET_IS_INDEX=is_index,
            HAS_WEIGHT=True,
            HAS_BIAS=bias,
            DOT_DTYPE={"bf16": tl.bfloat16, "fp16": tl.float16}.get(dtype, acc),
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
        kernel = linear_cross_entropy._linear_cross_entropy_forward_kernel
        pointers.update({p: acc_pointer for p in kernel.arg_names if p not in pointers})
        compile_kernel(kernel, pointers, dict(meta, SPLITS=2))
        kernel = linear_cross_entropy._linear_cross_entropy_backward_kernel
        pointers.update({p: acc_pointer for p in kernel.arg_names if p not in pointers})
        compile_kernel(kernel, pointers, dict(meta, GRAD_X=True, GRAD_W=True, GRAD_B=bias))
        count += 2
    return count


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600
    )
    if "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("Triton's ptxas is not available on this machine")
    assert result.returncode == 0, result.stderr[-4000:]
    assert (
        result.stdout.strip()
        == f"compiled {2 * len(SOFTMAX_CASES + CROSS_ENTROPY_CASES + LINEAR_CASES)}"
    )


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(f"compiled {_compile_all()}")
