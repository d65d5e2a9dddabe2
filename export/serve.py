"""Serve triton-softmax classifiers over the Open Inference Protocol with KServe's ModelServer.

    triton-softmax serve models                          # a Triton model repository, every model
    triton-softmax serve runs/iris/model.onnx --name iris --grpc-port 8001

KServe (its Python ``ModelServer``: FastAPI on uvicorn, and grpc.aio) speaks the protocol: health,
server and model metadata, model readiness and inference over REST (``/v2/...``) and gRPC, JSON
tensors and the binary tensor extension, Prometheus metrics (``/metrics``), signals and
shutdown. This module is its configuration and one model class, ``ClassifierModel``, which runs
``OnnxClassifier`` (numpy and onnxruntime; no torch, no triton).

What KServe does not do as Triton Inference Server does is configured through KServe's own
classes and hooks:

- the listening address: the HTTP socket is bound here (so a busy port is one line before
  anything is announced) and handed to uvicorn; the gRPC server binds ``host`` too (KServe: all
  interfaces, and with ``SO_REUSEPORT``, so a busy port went unnoticed);
- model control (the repository extension's load / unload) is off unless asked for: 403;
  readiness (``/v2/health/ready``) is true only while every model served is loaded;
- versions: each model is served as the version folder it came from (1 for a single file);
  ``/v2/models/NAME/versions/V/...`` (KServe: 501), metadata ``versions`` and ``platform``,
  ``model_version`` in every response, gRPC's ``version`` fields;
- requests: decoded strictly (FP32 data as a flat list of numbers, no booleans or strings,
  upper-case datatypes, nothing after the binary tensors), at most ``max_batch_size`` rows; any
  bad one is a 4xx with the protocol's ``{"error": ...}`` and one log line; a body over
  ``INLINE_BODY_BYTES`` is decoded and encoded in a worker thread and ``INLINE_ROWS`` rows or
  more run there, so the event loop (health checks, other clients) never waits on a big request;
- the classification extension: ``"parameters": {"classification": K}`` on ``probabilities``;
- a read timeout: a request's line, headers and body must arrive within ``read_timeout``
  seconds (408 after it; uvicorn has none); during shutdown within the grace period (503);
- the request-body limit: 413 past it, declared or chunked;
- KServe parses ``sys.argv`` when it is imported: it is imported here with ``sys.argv`` cut to the
  program name, so that ``triton-softmax serve``'s options are not read as KServe's.

KServe's Python server does not batch concurrent requests (in a cluster, an InferenceService's
``batcher`` does): each request runs onnxruntime on its own rows, on one non-spinning thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import sys
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from triton_softmax.export.runtime import CPU_PROVIDER, InputError, OnnxClassifier
from triton_softmax.export.signature import (
    DEFAULT_HOST,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_PORT,
    DEFAULT_READ_TIMEOUT,
    INPUT,
    LABEL,
    PLATFORM,
    PROBABILITIES,
)
from triton_softmax.export.triton_repo import ModelSpec

_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    import kserve
    from fastapi import APIRouter, FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from grpc import StatusCode, aio
    from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER
    from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady, ServerNotReady
    from kserve.logging import logger
    from kserve.model_repository import ModelRepository
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import (
        add_GRPCInferenceServiceServicer_to_server,
    )
    from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
    from kserve.protocol.grpc.server import GRPCServer
    from kserve.protocol.grpc.servicer import InferenceServicer
    from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension
    from kserve.protocol.rest.server import RESTServer, metrics_handler
    from kserve.protocol.rest.v2_datamodels import InferenceRequest, RequestInput
    from kserve.protocol.rest.v2_endpoints import register_v2_endpoints
    from pydantic import StrictInt, ValidationError
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import Response
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
finally:
    sys.argv = _argv

#: Seconds SIGTERM waits for requests in flight (those still arriving get at most this less 1).
GRACE_PERIOD = 10
#: Request line and headers larger than this get 431 (uvicorn's httptools parser has no limit).
MAX_HEAD_BYTES = 64 * 1024
#: Bodies up to this size are decoded and answered on the event loop: a thread hop costs more.
INLINE_BODY_BYTES = 64 * 1024
#: Requests of fewer rows run onnxruntime on the event loop (about 30 us at 1024 rows).
INLINE_ROWS = 2048
#: Worker threads for large requests (decode, onnxruntime, encode) and for gRPC handlers.
WORKER_THREADS = 2
DATATYPE = "FP32"
MAX_ERRORS_SHOWN = 10
#: A byte count: ASCII digits only (``str.isdigit`` also takes "²", which ``int`` refuses).
_DIGITS = re.compile(r"[0-9]+")
#: Values converted to float32 per numpy call (about 1 ms each).
CONVERT_SLICE = 65536
#: Rows listed in an error about rows.
MAX_ROWS_SHOWN = 10


class ServeError(OSError):
    """The server cannot start (a port is taken); the message is one line."""


class ModelControlOff(Exception):
    """Load or unload asked of a server started without ``--model-control`` (403)."""


class ModelNotLoaded(ModelNotFound):
    """A model this server serves, unloaded through model control (404, as an unknown one)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.reason = f"model {name} is not loaded (POST /v2/repository/models/{name}/load)"


class ClassifierModel(kserve.Model):
    """One triton-softmax classifier behind KServe: ``load`` once, ``predict`` per request.

    Input ``features`` FP32 ``[N, n_features]``; outputs ``label`` INT64 ``[N, 1]`` and
    ``probabilities`` FP32 ``[N, k]`` (or BYTES ``[N, K]`` ``"score:index:label"`` with the
    classification extension): the shapes Triton Inference Server gives clients of the
    repository that ``triton-softmax export --triton-repo`` writes, so one client works with both.

    Args:
        name: the model's name in the URLs.
        spec: the ``.onnx`` file, its version and its ``max_batch_size``.
        executor: where requests of ``INLINE_ROWS`` rows or more run (None: on the event loop).
    """

    def __init__(
        self,
        name: str,
        spec: ModelSpec | str | os.PathLike[str],
        executor: futures.Executor | None = None,
    ) -> None:
        super().__init__(name)
        self.spec = spec if isinstance(spec, ModelSpec) else ModelSpec(Path(spec))
        self.path = self.spec.path
        self.version = str(self.spec.version)
        self.max_batch_size = self.spec.max_batch_size
        self.executor = executor
        self.classifier: OnnxClassifier | None = None

    def load(self) -> bool:
        """Open the model on the CPU; ``ModelError`` when it is not a triton-softmax classifier."""
        self.classifier = OnnxClassifier(self.path, providers=[CPU_PROVIDER], threads=1)
        self.ready = True
        return self.ready

    def get_input_types(self) -> list[dict[str, Any]]:
        return [{"name": INPUT, "datatype": DATATYPE, "shape": [-1, self.classifier.n_features]}]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [
            {"name": LABEL, "datatype": "INT64", "shape": [-1, 1]},
            {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, self.classifier.n_classes]},
        ]

    def check_version(self, version: str | None) -> None:
        """``ModelNotFound`` (404) unless ``version`` is empty or the version served."""
        if version and version != self.version:
            raise ModelNotFound(f"{self.name} version {version} (serving version {self.version})")

    async def predict(self, payload: InferRequest, headers: Mapping[str, str] | None = None) -> Any:
        """Run the model on the request's ``features``; bad input raises ``InvalidInput`` (400).

        The request is checked first (names, shape, row limit, value count: no conversion), so
        a request refused costs no copy; converting the values, onnxruntime and building the
        outputs then run in a worker thread from ``INLINE_ROWS`` rows on.
        """
        self.check_version(payload.model_version)
        rows = self._check(payload)
        wanted = self._requested(payload)
        if rows >= INLINE_ROWS and self.executor is not None:
            loop = asyncio.get_running_loop()
            outputs = await loop.run_in_executor(self.executor, self._outputs, payload, wanted)
        else:
            outputs = self._outputs(payload, wanted)
        return InferResponse(
            response_id=payload.id if payload.id is not None else str(uuid.uuid4()),
            model_name=self.name,
            model_version=self.version,
            infer_outputs=outputs,
            use_binary_outputs=payload.use_binary_outputs,
            requested_outputs=payload.request_outputs,
        )

    def _outputs(self, payload: InferRequest, wanted: Mapping[str, int | None]) -> list:
        """The response's outputs for a checked request (the work of ``predict``)."""
        x = self._features(payload)
        try:
            label, proba = self.classifier.run(x)
        except InputError as e:
            raise InvalidInput(str(e)) from None
        # Finite inputs far from the training data can overflow the logits (inf - inf = NaN).
        bad = np.flatnonzero(~np.isfinite(proba).all(axis=1))
        if bad.size:
            shown = ", ".join(str(i) for i in bad[:MAX_ROWS_SHOWN])
            more = f" and {bad.size - MAX_ROWS_SHOWN} more" if bad.size > MAX_ROWS_SHOWN else ""
            raise InvalidInput(
                f"input {INPUT!r} overflows the model: rows [{shown}]{more} give non-finite "
                "probabilities (values far outside the training data)"
            )
        outputs = []
        for name, top_k in wanted.items():
            if name == LABEL:
                outputs.append(InferOutput(LABEL, [x.shape[0], 1], "INT64", label.reshape(-1, 1)))
            elif top_k is None:
                outputs.append(InferOutput(PROBABILITIES, list(proba.shape), "FP32", proba))
            else:
                text = classifications(proba, top_k, self.classifier.classes_)
                outputs.append(InferOutput(PROBABILITIES, list(text.shape), "BYTES", text))
        if payload.from_grpc:
            # KServe's to_grpc tests an ndarray's truth value: hand it bytes or a list instead.
            for output in outputs:
                output.set_data_from_numpy(output.data, binary_data=payload.use_binary_outputs)
        return outputs

    def _requested(self, payload: InferRequest) -> dict[str, int | None]:
        """``{output name: classification K or None}`` in the order the response lists them."""
        binary = (payload.parameters or {}).get("binary_data_output")
        if binary is not None and type(binary) is not bool:
            raise InvalidInput(f"binary_data_output must be true or false, got {binary!r}")
        if not payload.request_outputs:
            return {LABEL: None, PROBABILITIES: None}
        wanted: dict[str, int | None] = {}
        for output in payload.request_outputs:
            if output.name not in (LABEL, PROBABILITIES):
                raise InvalidInput(
                    f"unknown output {output.name!r}; this model has {LABEL!r} and "
                    f"{PROBABILITIES!r}"
                )
            if output.name in wanted:
                raise InvalidInput(f"output {output.name!r} is requested more than once")
            parameters = output.parameters or {}
            binary = parameters.get("binary_data")
            if binary is not None and type(binary) is not bool:
                raise InvalidInput(
                    f"output {output.name!r}: binary_data must be true or false, got {binary!r}"
                )
            top_k = parameters.get("classification")
            if top_k is not None:
                if output.name != PROBABILITIES:
                    raise InvalidInput(f"classification is offered on {PROBABILITIES!r} only")
                if type(top_k) is not int or top_k < 1:
                    raise InvalidInput(
                        f"classification must be a positive integer (classes wanted), got {top_k!r}"
                    )
            wanted[output.name] = top_k
        return wanted

    def _check(self, payload: InferRequest) -> int:
        """The request's rows, after checking its input without converting it; or ``InvalidInput``.

        The value count is compared with the shape here, before any copy: a small shape with
        millions of values is refused at the cost of a ``len``.
        """
        n = self.classifier.n_features
        names = [i.name for i in payload.inputs]
        if names != [INPUT]:
            found = ", ".join(repr(x) for x in names) or "no input"
            raise InvalidInput(f"expected one input {INPUT!r} (FP32 [N, {n}]), got {found}")
        tensor = payload.inputs[0]
        if tensor.datatype != DATATYPE:
            raise InvalidInput(f"input {INPUT!r} must be {DATATYPE}, got {tensor.datatype}")
        shape = list(tensor.shape)
        if len(shape) != 2 or shape[1] != n or shape[0] < 1:
            raise InvalidInput(
                f"input {INPUT!r} must have shape [N, {n}] with N >= 1 "
                f"({', '.join(self.classifier.feature_names)}), got {shape}"
            )
        if shape[0] > self.max_batch_size:
            raise InvalidInput(
                f"input {INPUT!r} has {shape[0]} rows, more than this model's max_batch_size "
                f"{self.max_batch_size}; split the request"
            )
        if isinstance(tensor.data, np.ndarray):  # the binary extension, decoded by _decode
            count = tensor.data.size
        elif tensor._raw_data is not None:  # gRPC's raw_input_contents
            raw = tensor._raw_data
            if len(raw) % 4:
                raise InvalidInput(f"input {INPUT!r}: {len(raw)} bytes is not a number of FP32")
            count = len(raw) // 4
        elif isinstance(tensor.data, list):
            count = len(tensor.data)
            if count and isinstance(tensor.data[0], list):
                raise InvalidInput(
                    f"input {INPUT!r}: data must be numbers, flattened in row-major order; "
                    "data[0] is a nested list"
                )
        else:
            raise InvalidInput(f"input {INPUT!r}: data must be a list of numbers")
        if count != shape[0] * shape[1]:
            raise InvalidInput(
                f"input {INPUT!r}: shape {shape} needs {shape[0] * shape[1]} values, got {count}"
            )
        return shape[0]

    def _features(self, payload: InferRequest) -> np.ndarray:
        """The input checked by ``_check`` as float32 (N, n_features), or ``InvalidInput``."""
        tensor = payload.inputs[0]
        if isinstance(tensor.data, np.ndarray):
            x = tensor.data
        elif tensor._raw_data is not None:
            x = np.frombuffer(tensor._raw_data, dtype="<f4")
        else:
            x = fp32_values(tensor.data, f"input {INPUT!r}")
        return x.reshape(tensor.shape)


def fp32_values(data: Any, what: str) -> np.ndarray:
    """JSON tensor data as float32: a flat list of numbers, as Triton takes it, or ``InvalidInput``.

    Booleans, strings (numeric ones included) and nested lists are refused: numpy would read
    ``true`` as 1, ``"1.5"`` as 1.5 and ``[[1, 2]]`` as a 2-D array.
    """
    if not isinstance(data, list):
        raise InvalidInput(f"{what}: data must be a list of numbers")
    kinds = {type(v) for v in data}
    if not kinds <= {int, float}:
        i = next(i for i, v in enumerate(data) if type(v) not in (int, float))
        kind = "a nested list" if isinstance(data[i], list) else type(data[i]).__name__
        raise InvalidInput(
            f"{what}: data must be numbers, flattened in row-major order; data[{i}] is {kind}"
        )
    # In slices: one numpy call over millions of values would hold the GIL (and so the event
    # loop) for its whole length; between slices other threads run.
    x = np.empty(len(data), dtype=np.float32)
    try:
        for i in range(0, len(data), CONVERT_SLICE):
            x[i : i + CONVERT_SLICE] = data[i : i + CONVERT_SLICE]
    except OverflowError:
        raise InvalidInput(f"{what}: data holds an integer too large for FP32") from None
    return x


def classifications(proba: np.ndarray, top_k: int, labels: Sequence[str]) -> np.ndarray:
    """Triton's classification output: the ``top_k`` most probable classes of each row.

    Args:
        proba: (N, k) probabilities.
        top_k: classes wanted per row (more than k gives k).
        labels: the k class names.

    Returns:
        object array (N, min(top_k, k)) of UTF-8 ``b"score:index:label"``, highest score first
        (ties: lower index first); the score printed as C's ``%f``, as Triton's
        ``std::to_string`` does.
    """
    k = min(top_k, proba.shape[1])
    order = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(proba, order, axis=1).astype(np.float64)
    names = np.asarray(list(labels), dtype=np.str_)
    text = np.char.add(np.char.mod("%f:", scores), order.astype(np.str_))
    text = np.char.add(np.char.add(text, ":"), names[order])
    return np.char.encode(text, "utf-8").astype(np.object_)


class _StrictInput(RequestInput):
    """A request input whose shape holds integers only (pydantic takes "1", 1.0 and true)."""

    shape: list[StrictInt]


class _StrictRequest(InferenceRequest):
    inputs: list[_StrictInput]


class _BinaryInput(_StrictInput):
    """A request input whose data may follow the JSON (the binary tensor extension)."""

    data: list | None = None


class _BinaryRequest(InferenceRequest):
    inputs: list[_BinaryInput]


def _decode(body: bytes, headers: Mapping[str, str], model: ClassifierModel) -> InferRequest:
    """An inference request body, JSON or binary extension, as KServe's ``InferRequest``.

    Refuses (``InvalidInput``) what Triton refuses: a binary tensor that is not FP32 or whose
    size does not match its shape, a ``binary_data_size`` past the body, bytes after the last
    binary tensor. Any content type is read as JSON, as Triton does (``curl -d`` sends a form).
    """
    header = headers.get(INFERENCE_CONTENT_LENGTH_HEADER)
    if header is None:
        try:
            request = _StrictRequest.model_validate_json(body)
        except ValidationError as e:
            raise InvalidInput(_not_a_request(e.errors())) from None
        _check_datatypes(request.inputs)
        return InferRequest.from_inference_request(request, model.name)
    if not _DIGITS.fullmatch(header) or int(header) > len(body):
        raise InvalidInput(
            f"{INFERENCE_CONTENT_LENGTH_HEADER} {header!r}: must be a byte count within the "
            f"body's {len(body)} bytes"
        )
    json_length = int(header)
    try:
        request = _BinaryRequest.model_validate_json(body[:json_length])
    except ValidationError as e:
        raise InvalidInput(_not_a_request(e.errors())) from None
    _check_datatypes(request.inputs)
    inputs, offset = [], json_length
    for tensor in request.inputs:
        parameters = dict(tensor.parameters or {})
        size = parameters.pop("binary_data_size", None)
        infer = InferInput(tensor.name, tensor.shape, tensor.datatype, parameters=parameters)
        if size is None:
            if tensor.data is None:
                raise InvalidInput(f"input {tensor.name!r}: no data and no binary_data_size")
            infer.data = tensor.data
        else:
            if type(size) is not int or size < 0 or offset + size > len(body):
                raise InvalidInput(
                    f"input {tensor.name!r}: binary_data_size {size!r} must be a byte count "
                    f"within the body ({len(body) - offset} bytes left)"
                )
            if size % 4:
                raise InvalidInput(f"input {tensor.name!r}: {size} bytes is not a number of FP32")
            infer.data = np.frombuffer(body, dtype="<f4", count=size // 4, offset=offset)
            offset += size
        inputs.append(infer)
    if offset != len(body):
        raise InvalidInput(
            f"{len(body) - offset} bytes after the binary tensors (binary_data_size and the "
            "body disagree)"
        )
    outputs = [o for o in (request.outputs or [])]
    decoded = InferRequest.from_inference_request(
        InferenceRequest(id=request.id, parameters=request.parameters, inputs=[], outputs=outputs),
        model.name,
    )
    decoded.inputs = inputs
    return decoded


def _check_datatypes(inputs: Sequence[Any]) -> None:
    """``InvalidInput`` naming a datatype other than FP32, before KServe reads the data.

    KServe would upper-case a datatype, read JSON FP16 as "binary only" and gRPC BF16 as
    "invalid content type"; every model served here takes FP32.
    """
    for tensor in inputs:
        if tensor.datatype != tensor.datatype.upper() or not tensor.datatype:
            raise InvalidInput(
                f"input {tensor.name!r}: datatype {tensor.datatype!r} is not one of the "
                f"protocol's (upper-case, e.g. {DATATYPE})"
            )
        if tensor.datatype != DATATYPE:
            raise InvalidInput(f"input {tensor.name!r} must be {DATATYPE}, got {tensor.datatype}")


def _encode(response: InferResponse) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON, or JSON then binary tensors."""
    content, json_length = response.to_rest()
    if json_length is None:
        return orjson.dumps(content), {"content-type": "application/json"}
    return content, {
        "content-type": "application/octet-stream",
        INFERENCE_CONTENT_LENGTH_HEADER: str(json_length),
    }


class _Repository(ModelRepository):
    """KServe's model registry, which can load a model again from the file it was served from."""

    def __init__(self, specs: Mapping[str, ModelSpec], executor: futures.Executor) -> None:
        super().__init__()
        self.specs = dict(specs)
        self.executor = executor

    def load(self, name: str) -> bool:
        if name not in self.specs:
            raise ModelNotFound(name)
        model = ClassifierModel(name, self.specs[name], self.executor)
        model.load()
        self.update(model)
        return True


class _ModelControl(ModelRepositoryExtension):
    """The repository extension (load / unload), refused with 403 unless ``enabled``."""

    def __init__(self, registry: _Repository, enabled: bool) -> None:
        super().__init__(model_registry=registry)
        self.enabled = enabled
        self.registry = registry

    def _check(self, name: str) -> None:
        if not self.enabled:
            raise ModelControlOff(
                "model control is off: start serve with --model-control to load and unload models"
            )
        if name not in self.registry.specs:
            raise ModelNotFound(name)

    async def load(self, model_name: str) -> None:
        self._check(model_name)
        await super().load(model_name)

    async def unload(self, model_name: str) -> None:
        self._check(model_name)
        await super().unload(model_name)


class _DataPlane(DataPlane):
    """KServe's data plane with strict readiness, versions and the extensions offered."""

    def __init__(self, registry: _Repository, model_control: bool) -> None:
        super().__init__(model_registry=registry)
        self.model_control = model_control
        # Large requests (REST and gRPC) in flight at once, each holding its decoded values:
        # as many as worker threads; others wait here with only their body read.
        self.heavy = asyncio.Semaphore(WORKER_THREADS)

    def metadata(self) -> dict:
        extensions = ["binary_tensor_data", "classification"]
        if self.model_control:
            extensions.append("model_repository")
        return {**super().metadata(), "extensions": extensions}

    async def ready(self) -> bool:
        """True while every model the server was started with is loaded and ready."""
        registry = self.model_registry
        for name in registry.specs:
            if not await registry.is_model_ready(name):
                return False
        return True

    async def model_metadata(self, model_name: str) -> dict:
        model = self.get_model_from_registry(model_name)
        metadata = await super().model_metadata(model_name)
        return {**metadata, "versions": [model.version], "platform": PLATFORM}

    def served(self, name: str, version: str | None = None) -> ClassifierModel:
        """The model ``name`` at ``version`` (any when None); 404 for one not served."""
        registry = self.model_registry
        if name in registry.specs and registry.get_model(name) is None:
            raise ModelNotLoaded(name)
        model = self.get_model_from_registry(name)
        model.check_version(version)
        return model


class _Endpoints:
    """The REST routes served here ahead of KServe's: inference, versions, model control."""

    def __init__(self, dataplane: _DataPlane, control: _ModelControl, executor: Any) -> None:
        self.dataplane, self.control, self.executor = dataplane, control, executor

    def router(self) -> APIRouter:
        router = APIRouter(prefix="/v2")
        for prefix in ("/models/{model_name}", "/models/{model_name}/versions/{model_version}"):
            router.add_api_route(prefix + "/infer", self.infer, methods=["POST"])
            router.add_api_route(prefix + "/ready", self.model_ready, methods=["GET"])
            router.add_api_route(prefix, self.model_metadata, methods=["GET"])
        router.add_api_route("/health/live", self.live, methods=["GET", "HEAD"])
        router.add_api_route("/health/ready", self.ready, methods=["GET", "HEAD"])
        router.add_api_route("/repository/models/{model_name}/load", self.load, methods=["POST"])
        router.add_api_route(
            "/repository/models/{model_name}/unload", self.unload, methods=["POST"]
        )
        return router

    async def infer(
        self, request: Request, model_name: str, model_version: str | None = None
    ) -> Response:
        model = self.dataplane.served(model_name, model_version)
        if not model.ready:
            raise ModelNotReady(model_name)
        try:
            body = await request.body()
        except ClientDisconnect:  # the read timeout answered already
            return Response(status_code=408)
        headers = dict(request.headers)
        if len(body) <= INLINE_BODY_BYTES:
            decoded = _decode(body, headers, model)
            response, _ = await self.dataplane.infer(model_name, decoded, headers)
            content, out_headers = _encode(response)
            return Response(content, headers=out_headers)
        loop = asyncio.get_running_loop()
        async with self.dataplane.heavy:
            decoded = await loop.run_in_executor(self.executor, _decode, body, headers, model)
            del body
            response, _ = await self.dataplane.infer(model_name, decoded, headers)
            del decoded
            content, out_headers = await loop.run_in_executor(self.executor, _encode, response)
        return Response(content, headers=out_headers)

    async def live(self) -> dict:
        return {"live": True}

    async def ready(self) -> dict:
        if not await self.dataplane.ready():
            raise ServerNotReady("not every model is loaded")
        return {"ready": True}

    async def model_ready(self, model_name: str, model_version: str | None = None) -> dict:
        model = self.dataplane.served(model_name, model_version)
        if not await model.healthy():
            raise ModelNotReady(model_name)
        return {"name": model_name, "ready": True}

    async def model_metadata(self, model_name: str, model_version: str | None = None) -> dict:
        self.dataplane.served(model_name, model_version)
        return await self.dataplane.model_metadata(model_name)

    async def load(self, model_name: str) -> dict:
        await self.control.load(model_name)
        return {"name": model_name, "load": True}

    async def unload(self, model_name: str) -> dict:
        await self.control.unload(model_name)
        return {"name": model_name, "unload": True}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error_handler(status: int | None) -> Callable[[Request, Exception], Any]:
    """A handler answering ``{"error": ...}`` with ``status`` and logging one line (no trace)."""

    async def handler(request: Request, exc: Exception) -> JSONResponse:
        code = status if status is not None else exc.status_code
        if isinstance(exc, RequestValidationError):
            message = _not_a_request(exc.errors())
        elif isinstance(exc, HTTPException):
            message = str(exc.detail)
        else:
            message = str(exc)
        logger.warning("%s %s %s: %s", code, request.method, request.url.path, _one_line(message))
        headers = getattr(exc, "headers", None) if isinstance(exc, HTTPException) else None
        return JSONResponse({"error": message}, code, headers=headers)

    return handler


CLIENT_ERRORS: dict[type[Exception], tuple[int | None, StatusCode | None]] = {
    InvalidInput: (400, StatusCode.INVALID_ARGUMENT),
    RequestValidationError: (400, None),
    ModelNotFound: (404, StatusCode.NOT_FOUND),
    ModelControlOff: (403, StatusCode.PERMISSION_DENIED),
    ModelNotReady: (503, StatusCode.UNAVAILABLE),
    ServerNotReady: (503, StatusCode.UNAVAILABLE),
    HTTPException: (None, None),
}


class _ReadTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request to arrive.

    From a connection's first byte (or its next request's), the request line, headers and body
    must arrive within ``read_timeout`` seconds, else 408 and the connection closes; during
    shutdown a request still arriving gets at most ``shutdown_timeout`` seconds, then 503, and
    one whose headers are incomplete gets 503 at once. Request line and headers over
    ``MAX_HEAD_BYTES`` get 431. Set the class attributes on a subclass (``_protocol``).
    """

    read_timeout: float = DEFAULT_READ_TIMEOUT
    shutdown_timeout: float = GRACE_PERIOD - 1

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._phase = "idle"  # then "headers", "body", "done" for each request
        self._head_bytes = 0
        self._deadline: asyncio.TimerHandle | None = None
        self._shutting_down = False
        self._arm(self.read_timeout)

    def data_received(self, data: bytes) -> None:
        if self._phase in ("idle", "headers", "done"):
            self._head_bytes += len(data)
        super().data_received(data)
        if self._phase in ("idle", "headers") and self._head_bytes > MAX_HEAD_BYTES:
            self._answer(431, f"request line and headers over {MAX_HEAD_BYTES} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = "headers"
        if self._deadline is None:
            self._arm(self.shutdown_timeout if self._shutting_down else self.read_timeout)

    def on_headers_complete(self) -> None:
        self._phase, self._head_bytes = "body", 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._phase = "done"
        self._disarm()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        self._shutting_down = True
        if self._phase == "headers":
            self._answer(503, "the server is shutting down")
            return
        if self._phase == "body" and self._deadline is not None:
            remaining = self._deadline.when() - self.loop.time()
            if remaining > self.shutdown_timeout:
                self._disarm()
                self._arm(self.shutdown_timeout)
        if self._phase != "body":
            self._disarm()
        super().shutdown()

    def _arm(self, seconds: float) -> None:
        self._deadline = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if self._shutting_down:
            self._answer(503, "the server is shutting down and the request did not arrive in time")
        elif self._phase == "idle":  # never a byte: close, as for an idle keep-alive connection
            self.transport.close()
        else:
            self._answer(408, f"the request did not arrive within {self.read_timeout:g} s")

    def _answer(self, status: int, message: str) -> None:
        """Send ``{"error": message}`` with ``status`` and close, unless a response has begun."""
        self._disarm()
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if self._phase == "body" and cycle is not None:
            if cycle.response_started:  # the app answered without the whole body: just close
                self.transport.close()
                return
            cycle.disconnected = True  # the app's receive() now answers http.disconnect
            cycle.message_event.set()
        client = "{}:{}".format(*self.client) if self.client else "?"
        logger.warning("%s from %s: %s", status, client, message)
        body = json.dumps({"error": message}).encode()
        reason = {408: "Request Timeout", 431: "Request Header Fields Too Large"}
        head = (
            f"HTTP/1.1 {status} {reason.get(status, 'Service Unavailable')}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.transport.close()


def _protocol(read_timeout: float, grace_period: float) -> type[_ReadTimeoutProtocol]:
    """``_ReadTimeoutProtocol`` with these timeouts, as uvicorn's ``http`` class."""
    shutdown = max(0.5, min(read_timeout, grace_period - 1))
    attributes = {"read_timeout": read_timeout, "shutdown_timeout": shutdown}
    return type("ReadTimeoutProtocol", (_ReadTimeoutProtocol,), attributes)


class _RESTServer(RESTServer):
    """KServe's REST server on a socket bound beforehand, with the routes and handlers above."""

    def __init__(self, endpoints: _Endpoints, protocol: type, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.endpoints = endpoints
        self.config.http = protocol

    def _register_endpoints(self, app: FastAPI) -> None:
        """Ours, then KServe's v2 routes, ``/`` and ``/metrics``: not KServe's v1 protocol."""
        app.include_router(self.endpoints.router())  # ahead of KServe's: the first match wins
        root = APIRouter()
        root.add_api_route("/", self.dataplane.live)
        root.add_api_route("/metrics", metrics_handler, methods=["GET"])
        app.include_router(root)
        register_v2_endpoints(app, self.dataplane, self.model_repository_extension)

    def _add_exception_handlers(self, app: FastAPI) -> None:
        super()._add_exception_handlers(app)
        for kind, (status, _) in CLIENT_ERRORS.items():
            app.add_exception_handler(kind, _error_handler(status))

    async def serve_on(self, sock: socket.socket) -> None:
        self.create_application()
        await self._server.serve(sockets=[sock])


class _Servicer(InferenceServicer):
    """KServe's gRPC servicer, with versions checked and listed."""

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> Any:
        """``ready: false`` for a model or version not served, as HTTP clients read a 404."""
        try:
            model = self._data_plane.served(request.name, request.version)
        except ModelNotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=bool(await model.healthy()))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> Any:
        self._data_plane.served(request.name, request.version)
        metadata = await self._data_plane.model_metadata(request.name)
        return pb.ModelMetadataResponse(**metadata)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> Any:
        """KServe's, with inputs checked before their values are copied out of the message.

        A large request (``INLINE_ROWS`` rows or more) copies and encodes in a worker thread.
        """
        model = self._data_plane.served(request.model_name, request.model_version)
        self.validate_grpc_request(request)
        _check_datatypes(request.inputs)
        rows = 0
        for tensor in request.inputs:
            wrong = [f.name for f, _ in tensor.contents.ListFields() if f.name != "fp32_contents"]
            if wrong:
                raise InvalidInput(
                    f"input {tensor.name!r}: {DATATYPE} values go in fp32_contents or "
                    f"raw_input_contents, not {', '.join(wrong)}"
                )
            rows = max(rows, tensor.shape[0] if tensor.shape else 0)
        if rows < INLINE_ROWS:
            response, _ = await self._data_plane.infer(
                request=InferRequest.from_grpc(request), model_name=request.model_name
            )
            return response.to_grpc()
        loop = asyncio.get_running_loop()
        async with self._data_plane.heavy:
            infer_request = await loop.run_in_executor(
                model.executor, InferRequest.from_grpc, request
            )
            response, _ = await self._data_plane.infer(
                request=infer_request, model_name=request.model_name
            )
            return await loop.run_in_executor(model.executor, response.to_grpc)


class _GrpcErrors(ExceptionToStatusInterceptor):
    """Client errors as their gRPC status with one log line; anything else as KServe does."""

    async def handle_exception(
        self, ex: Exception, request_or_iterator: Any, context: Any, method_name: str
    ) -> None:
        for kind, (_, code) in CLIENT_ERRORS.items():
            if code is not None and isinstance(ex, kind):
                logger.warning("gRPC %s %s: %s", code.name, method_name, _one_line(str(ex)))
                await context.abort(code, str(ex))
        await super().handle_exception(ex, request_or_iterator, context, method_name)


class _GRPCServer(GRPCServer):
    """KServe's gRPC server, bound to ``host`` (KServe: every interface) before it starts."""

    def __init__(self, host: str, port: int, max_message_bytes: int, **kwargs: Any) -> None:
        super().__init__(port=port, kwargs={}, **kwargs)
        self.host, self.max_message_bytes = host, max_message_bytes

    def bind(self) -> None:
        """Create the server and bind its port; ``ServeError`` when the port is taken."""
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=WORKER_THREADS),
            interceptors=(_GrpcErrors(),),
            options=[
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.so_reuseport", 0),  # a busy port is an error, not a shared one
            ],
        )
        servicer = _Servicer(self._data_plane, self._model_repository_extension)
        add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        address = f"[{self.host}]:{self._port}" if ":" in self.host else f"{self.host}:{self._port}"
        _bind(self.host, self._port, "gRPC").close()  # gRPC would log its own lines on failure
        try:
            bound = self._server.add_insecure_port(address)
        except RuntimeError:
            bound = 0
        if bound == 0:
            raise ServeError(f"cannot listen for gRPC on {address}: the port is taken or invalid")

    async def start(self, max_workers: int | None = None) -> None:
        await self._server.start()
        await self._server.wait_for_termination()


class _ModelServer(kserve.ModelServer):
    """KServe's server: REST (and gRPC) on sockets bound before anything is announced."""

    def __init__(
        self,
        specs: Mapping[str, ModelSpec],
        host: str,
        port: int,
        grpc_port: int | None,
        max_body_bytes: int,
        read_timeout: float,
        model_control: bool,
    ) -> None:
        self.executor = futures.ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="infer")
        registry = _Repository(specs, self.executor)
        super().__init__(
            http_port=port,
            grpc_port=grpc_port or 0,
            registered_models=registry,
            enable_grpc=grpc_port is not None,
            enable_docs_url=False,
            enable_latency_logging=False,
            grace_period=GRACE_PERIOD,
        )
        self.host, self.max_body_bytes, self.read_timeout = host, max_body_bytes, read_timeout
        self.dataplane = _DataPlane(registry, model_control)
        self.model_repository_extension = _ModelControl(registry, model_control)

    def start(self, models: list[ClassifierModel], announce: Callable[[], None] = lambda: None):
        """Bind, ``announce``, serve until SIGTERM or SIGINT; ``ServeError`` if a port is taken."""
        for model in models:
            model.executor = self.executor
        self._register_and_check_atleast_one_model_is_ready(models)
        sock = _bind(self.host, self.http_port)
        endpoints = _Endpoints(self.dataplane, self.model_repository_extension, self.executor)
        self._rest_server = _RESTServer(
            endpoints,
            _protocol(self.read_timeout, self.grace_period),
            app="kserve.model_server:app",
            data_plane=self.dataplane,
            model_repository_extension=self.model_repository_extension,
            http_port=self.http_port,
            grace_period=self.grace_period,
            timeout_keep_alive=self.timeout_keep_alive,
        )
        self.register_signal_handler()
        try:
            asyncio.run(self._run(sock, announce))
        finally:
            sock.close()
            self.executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, sock: socket.socket, announce: Callable[[], None]) -> None:
        self.servers = []
        if self.enable_grpc:
            self._grpc_server = _GRPCServer(
                self.host,
                self.grpc_port,
                self.max_body_bytes,
                data_plane=self.dataplane,
                model_repository_extension=self.model_repository_extension,
                grace_period=self.grace_period,
            )
            self._grpc_server.bind()
            self.servers.append(self._grpc_server.start())
        self.servers.append(self._rest_server.serve_on(sock))
        announce()
        await asyncio.gather(*self.servers)


def _bind(host: str, port: int, what: str = "HTTP") -> socket.socket:
    """A listening TCP socket on ``host:port``; ``ServeError`` (one line) when that fails."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ServeError(f"cannot listen for {what} on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen for {what} on {host}:{port}: {e.strerror or e}") from None
    return sock


def _not_a_request(errors: Sequence[Mapping[str, Any]]) -> str:
    """One line from pydantic's errors for a body that is not an inference request."""
    problems = []
    for e in errors[:MAX_ERRORS_SHOWN]:
        loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "bytes")]
        if e.get("type") == "json_invalid":  # FastAPI's loc is the character's offset
            detail = (e.get("ctx") or {}).get("error") or e.get("msg")
            problems.append(f"invalid JSON: {detail}" + (f" (character {loc[0]})" if loc else ""))
        else:
            where = ".".join(loc)
            problems.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "not an inference request: " + "; ".join(problems)


class _BodyLimit:
    """ASGI middleware: 413 with a JSON ``error`` for a request body over ``max_bytes``.

    FastAPI's own ``max_body_size`` answers 413 in plain text ("Content Too Large"), past any
    exception handler. A declared ``Content-Length`` over the limit is answered before the body
    is read; a chunked body (no length) is read here, at most ``max_bytes`` of it, and handed on
    whole (an error raised from ``receive`` would reach FastAPI, which answers 400).
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                return await self._refuse(scope, receive, send)
            return await self.app(scope, receive, send)
        if b"transfer-encoding" not in headers:
            return await self.app(scope, receive, send)
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                return await self._refuse(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([whole], receive), send)

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        error = f"request body over this server's limit of {self.max_bytes} bytes"
        logger.warning("413 %s %s: %s", scope.get("method"), scope.get("path"), error)
        await JSONResponse({"error": error}, 413)(scope, receive, send)


def _replay(messages: list[dict], receive: Any) -> Callable[[], Any]:
    """A ``receive`` that gives ``messages`` first, then defers to ``receive``."""
    pending = list(messages)

    async def replayed() -> dict:
        return pending.pop(0) if pending else await receive()

    return replayed


def load_models(models: Mapping[str, ModelSpec | str | os.PathLike[str]]) -> list[ClassifierModel]:
    """Load every model before the port is bound; ``ModelError`` names the first bad one."""
    loaded = []
    for name, spec in models.items():
        model = ClassifierModel(name, spec)
        model.load()
        loaded.append(model)
    return loaded


def serve(
    models: list[ClassifierModel],
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    access_log: bool = False,
    grpc_port: int | None = None,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    model_control: bool = False,
) -> None:
    """Serve loaded models until SIGTERM or SIGINT, then finish the requests in flight.

    Prints one line to stderr once the ports are bound ("serving N model(s) on ...").

    Args:
        models: from ``load_models``.
        host: address to listen on.
        port: HTTP port.
        max_body_bytes: largest request body (and gRPC message); larger ones get 413.
        access_log: log one line per request (off: it costs about 10 % at batch 1).
        grpc_port: serve the v2 gRPC protocol on this port too (None: no gRPC).
        read_timeout: seconds a request may take to arrive (408 after).
        model_control: allow ``/v2/repository/models/NAME/load`` and ``unload``.

    Raises:
        ServeError: a port cannot be bound (nothing was served).
    """
    specs = {m.name: m.spec for m in models}
    server = _ModelServer(specs, host, port, grpc_port, max_body_bytes, read_timeout, model_control)
    app = kserve.model_server.app
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    # KServe 0.21 answers with FastAPI's ORJSONResponse, which FastAPI 0.165 calls deprecated.
    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")
    # KServe logs two timing lines per request ("kserve.trace"); uvicorn one access line.
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    if not access_log:
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)

    def announce() -> None:
        grpc = f" and gRPC on {host}:{grpc_port}" if grpc_port is not None else ""
        print(
            f"serving {len(models)} model(s) on http://{host}:{port}/v2{grpc} (Open Inference "
            "Protocol); metrics on /metrics; Ctrl-C or SIGTERM to stop",
            file=sys.stderr,
            flush=True,
        )

    server.start(models, announce)


def describe(models: list[ClassifierModel]) -> str:
    """One line per model: name, version, path, row limit, features and classes."""
    return "\n".join(
        f"{m.name} (version {m.version}): {m.path} ({m.classifier.n_features} features, classes "
        f"{json.dumps(list(m.classifier.classes_))}, at most {m.max_batch_size} rows a request)"
        for m in models
    )
