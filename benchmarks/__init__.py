"""Benchmarks of triton-softmax; they run from a clone (not installed), from the repository root.

    python -m benchmarks.kernels                  # kernels vs torch, Liger, quack (a GPU)
    python -m benchmarks.serving                  # Iris model: onnxruntime vs torch eager vs numpy
    python -m benchmarks.cpu_path                 # our plain-torch CPU path vs torch.nn.functional
    python -m benchmarks.report --update-readme   # tables, plots, RESULTS.md sections from the CSVs

Nothing runs at import time; see ``benchmarks/README.md``.
"""
