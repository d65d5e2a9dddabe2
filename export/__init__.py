"""Export of the softmax-regression model to ONNX and its onnxruntime serving wrapper.

Installed as ``triton_softmax.export`` (the folder is mapped in pyproject.toml).
``triton_softmax.export.onnx_export`` needs torch; ``triton_softmax.export.runtime`` needs only
onnxruntime and numpy. Neither is imported here, and ``triton_softmax`` imports its public names
lazily, so ``from triton_softmax.export.runtime import OnnxClassifier`` works without torch.
"""
