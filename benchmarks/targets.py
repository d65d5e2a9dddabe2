"""docs/design.md's targets (§Targets) as the benchmarks check them, in one place."""

# Kernels (benchmarks.kernels), fused linear + cross-entropy forward+backward:
#: the least "X's time / ours" per peer (no slower than torch eager, >= 1.2x the chunked op, Liger).
LCE_SPEEDUP_OVER = {"torch": 1.0, "torch-chunked": 1.2, "liger": 1.2}
#: at most this x the time of its GEMMs alone (torch.matmul, same shapes, same run).
LCE_OVER_GEMMS = 1.15
#: our peak extra memory at most this x Cut Cross-Entropy's (exact ``cce``).
LCE_PEAK_OVER_CCE = 1.0

# The CPU path (benchmarks.cpu_path): ours / torch at most this at 4x3 and from 256 rows.
CPU_OVERHEAD, CPU_SPEED = 2.0, 1.3
# Fused linear + CE on the CPU (benchmarks.cpu_linear_ce): ours / torch's chunked op at most this;
# peak extra memory at most this fraction of the full fp32 logits.
CPU_LCE_OVER_CHUNKED, CPU_LCE_PEAK_X_LOGITS = 1.0, 0.1

# Serving (benchmarks.serving): onnxruntime's speed-up over torch eager, at least this at 1e5 rows
# and at batch 1.
SERVING_SPEEDUP_1E5, SERVING_SPEEDUP_BATCH1 = 2.0, 1.0
# Serving over HTTP (benchmarks.serving_http): ms p50 the server adds to in-process onnxruntime.
HTTP_ADDED_MS = 1.0
