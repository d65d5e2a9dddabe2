"""Export of the softmax-regression model to ONNX and its onnxruntime serving wrapper.

``export.onnx_export`` needs torch; ``export.runtime`` needs only onnxruntime and numpy. This
package imports neither at import time, so ``from export.runtime import OnnxClassifier`` works
without torch.
"""
