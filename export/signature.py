"""The exported classifier's signature, file names and serving defaults, one definition each.

The exporter writes these names, the runtime checks them, the Triton model repository declares
them, the server and the command line use them. This module imports nothing, so a serving-only
install (no torch, no triton) reads it as it is.

Signature (the skl2onnx layout with zipmap off): input ``features`` float32 [N, n_features],
outputs ``label`` int64 [N] and ``probabilities`` float32 [N, k]; the feature and class names are
JSON lists in the model's ``metadata_props`` under ``feature_names`` and ``class_names``.
"""

#: The model's one input: float32 [N, n_features].
INPUT = "features"
#: The output of class indices: int64 [N].
LABEL = "label"
#: The output of class probabilities: float32 [N, k].
PROBABILITIES = "probabilities"
#: The outputs, in the order the graph returns them.
OUTPUTS = (LABEL, PROBABILITIES)
#: ``metadata_props`` keys of the JSON lists of feature names and class names.
FEATURE_NAMES = "feature_names"
CLASS_NAMES = "class_names"

#: The lowest default-domain ONNX opset the exporter accepts, and the one it writes by default.
MIN_OPSET = 18
DEFAULT_OPSET = 18

#: The model file that ``train`` writes and a model repository holds (``NAME/<version>/``).
ONNX_FILE = "model.onnx"
#: A model's Triton configuration in a model repository (``NAME/config.pbtxt``).
CONFIG_FILE = "config.pbtxt"
#: Triton's name of the backend that runs ``ONNX_FILE`` (config.pbtxt, model metadata).
PLATFORM = "onnxruntime_onnx"
#: The most rows one request (or one dynamic batch) may hold, when config.pbtxt does not say.
DEFAULT_MAX_BATCH_SIZE = 1024

#: ``triton-softmax serve``: the address and HTTP port it listens on.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
#: Largest request body accepted, in bytes: about 500 000 rows of 4 features as JSON text.
DEFAULT_MAX_BODY_BYTES = 16 * 2**20
#: Seconds a request's line, headers and body may take to arrive.
DEFAULT_READ_TIMEOUT = 30.0
