"""Benchmarks of triton-softmax: the kernels on a GPU, and ONNX serving on a CPU.

    python -m benchmarks.kernels          # kernels vs torch eager, torch.compile, Liger, quack
    python -m benchmarks.serving          # Iris model: onnxruntime vs torch eager vs numpy
    python -m benchmarks.report --update-readme   # tables, plots and README sections from CSVs

Nothing runs at import time; see ``benchmarks/README.md``.
"""
