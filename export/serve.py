"""Serve triton-softmax classifiers over the Open Inference Protocol with KServe's ModelServer.

    triton-softmax serve models                          # a Triton model repository, every model
    triton-softmax serve runs/iris/model.onnx --name iris

KServe (its Python ``ModelServer``: FastAPI on uvicorn) speaks the protocol: health, server and
model metadata, model readiness and inference over REST (``/v2/...``), JSON tensors and the binary
tensor extension, the ``{"error": ...}`` bodies, signals and shutdown. This module is its
configuration and one model class, ``ClassifierModel``, which runs ``OnnxClassifier`` (numpy and
onnxruntime; no torch, no triton) and reports bad requests as ``InvalidInput`` (HTTP 400).

What KServe does not offer as an option is configured through its own hooks, never by reading
HTTP ourselves:

- the listening address: KServe's REST server binds 0.0.0.0; ``_ModelServer`` sets the host of
  uvicorn's configuration once KServe has built it (``setup_event_loop`` runs just before the bind);
- the request-body limit: an ASGI middleware on KServe's app, 413 past it (FastAPI's own
  ``max_body_size`` answers in plain text, not the protocol's JSON);
- errors as the protocol's ``{"error": ...}`` with a 4xx: FastAPI's 422 for a body that is not an
  inference request and Starlette's HTTP errors (404 for an unknown path) get exception
  handlers; ``_DataPlane`` turns a binary tensor that does not match its shape into
  ``InvalidInput`` (KServe: 500) and reads a body sent without a JSON content type as JSON,
  as Triton does (``curl -d`` sends ``application/x-www-form-urlencoded``; KServe: 400);
- KServe parses ``sys.argv`` when it is imported: it is imported here with ``sys.argv`` cut to the
  program name, so that ``triton-softmax serve``'s options are not read as KServe's.

KServe's Python server does not batch concurrent requests (in a cluster, an InferenceService's
``batcher`` does): each request runs onnxruntime on its own rows in the event loop, on one
non-spinning thread (at batch 1 about 10 µs of the request's time).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from triton_softmax.export.runtime import InputError, OnnxClassifier

_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    import kserve
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER
    from kserve.errors import InvalidInput
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
    from kserve.protocol.rest.v2_datamodels import InferenceRequest
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException
finally:
    sys.argv = _argv

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
#: Largest request body accepted, in bytes: about 500 000 rows of 4 features as JSON text.
DEFAULT_MAX_BODY_BYTES = 16 * 2**20
INPUT = "features"
DATATYPE = "FP32"
MAX_ERRORS_SHOWN = 10


class ClassifierModel(kserve.Model):
    """One triton-softmax classifier behind KServe: ``load`` once, ``predict`` per request.

    Input ``features`` FP32 ``[N, n_features]``; outputs ``label`` INT64 ``[N, 1]`` and
    ``probabilities`` FP32 ``[N, k]``: the shapes Triton Inference Server gives clients of the
    repository that ``triton-softmax export --triton-repo`` writes, so one client works with both.

    Args:
        name: the model's name in the URLs.
        path: the ``.onnx`` file.
    """

    def __init__(self, name: str, path: str | os.PathLike[str]) -> None:
        super().__init__(name)
        self.path = Path(path)
        self.classifier: OnnxClassifier | None = None

    def load(self) -> bool:
        """Open the model on the CPU; ``ModelError`` when it is not a triton-softmax classifier."""
        self.classifier = OnnxClassifier(self.path, providers=["CPUExecutionProvider"], threads=1)
        self.ready = True
        return self.ready

    def get_input_types(self) -> list[dict[str, Any]]:
        return [{"name": INPUT, "datatype": DATATYPE, "shape": [-1, self.classifier.n_features]}]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [
            {"name": "label", "datatype": "INT64", "shape": [-1, 1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, self.classifier.n_classes]},
        ]

    def predict(self, payload: InferRequest, headers: Mapping[str, str] | None = None) -> Any:
        """Run the model on the request's ``features``; bad input raises ``InvalidInput`` (400)."""
        x = self._features(payload)
        try:
            label, proba = self.classifier.run(x)
        except InputError as e:
            raise InvalidInput(str(e)) from None
        outputs = [
            InferOutput("label", [x.shape[0], 1], "INT64", label.reshape(-1, 1)),
            InferOutput("probabilities", list(proba.shape), "FP32", proba),
        ]
        return InferResponse(
            response_id=payload.id if payload.id is not None else str(uuid.uuid4()),
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=payload.use_binary_outputs,
            requested_outputs=payload.request_outputs,
        )

    def _features(self, payload: InferRequest) -> np.ndarray:
        """The request's one input as a float32 (N, n_features) array, or ``InvalidInput``."""
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
        try:
            x = np.asarray(tensor.data, dtype=np.float32)
        except (TypeError, ValueError):
            raise InvalidInput(f"input {INPUT!r}: data must be numbers") from None
        if x.size != shape[0] * shape[1]:
            raise InvalidInput(
                f"input {INPUT!r}: shape {shape} needs {shape[0] * shape[1]} values, got {x.size}"
            )
        return x.reshape(shape)


class _DataPlane(DataPlane):
    """KServe's data plane, decoding two more kinds of request body as the protocol reads them.

    - A body that FastAPI did not parse as JSON, because its content type is not JSON, and that
      is not the binary extension: Triton reads it as JSON whatever its type, and so does this
      (``curl -d`` sends ``application/x-www-form-urlencoded``; KServe would refuse it).
    - A binary-extension body whose binary part does not match its JSON part (data of the
      wrong size for its shape, a bad header length): ``InvalidInput`` (400) naming the problem,
      where KServe lets numpy's or Python's error out as a 500.
    """

    def decode(self, body: Any, headers: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(body, bytes) and INFERENCE_CONTENT_LENGTH_HEADER not in (headers or {}):
            try:
                body = InferenceRequest.model_validate_json(body)
            except ValidationError as e:
                raise InvalidInput(_not_a_request(e.errors())) from None
        try:
            return super().decode(body, headers, *args, **kwargs)
        except InvalidInput:
            raise
        except (ValueError, KeyError, TypeError, IndexError) as e:
            what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise InvalidInput(f"binary inference request does not decode: {what}") from None


class _ModelServer(kserve.ModelServer):
    """KServe's server, listening on ``host`` instead of KServe's fixed 0.0.0.0."""

    def __init__(self, host: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.host = host
        self.dataplane = _DataPlane(model_registry=self.registered_models)

    def setup_event_loop(self) -> None:
        # ModelServer.start() has built the REST server's uvicorn configuration and binds in
        # asyncio.run() right after this call.
        self._rest_server.config.host = self.host
        super().setup_event_loop()


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


async def _bad_request(request: Any, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 for a JSON body that is not an inference request, as 400."""
    return JSONResponse({"error": _not_a_request(exc.errors())}, 400)


async def _http_error(request: Any, exc: HTTPException) -> JSONResponse:
    """Starlette's own errors (404 for an unknown path, 405) as the protocol's ``error``."""
    return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)


class _BodyLimit:
    """ASGI middleware: 413 with a JSON ``error`` for a request body over ``max_bytes``.

    FastAPI's own ``max_body_size`` answers 413 in plain text ("Content Too Large"), past any
    exception handler. A declared ``Content-Length`` over the limit is answered before the body
    is read; a body without one (chunked) when its bytes pass the limit.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        error = f"request body over this server's limit of {self.max_bytes} bytes"
        await JSONResponse({"error": error}, 413)(scope, receive, send)


class _TooLarge(Exception):
    """The request body passed the limit (raised from ``receive``, caught by ``_BodyLimit``)."""


def load_models(models: Mapping[str, str | os.PathLike[str]]) -> list[ClassifierModel]:
    """Load every model before the port is bound; ``ModelError`` names the first bad one."""
    loaded = []
    for name, path in models.items():
        model = ClassifierModel(name, path)
        model.load()
        loaded.append(model)
    return loaded


def serve(
    models: list[ClassifierModel],
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    access_log: bool = False,
) -> None:
    """Serve loaded models over REST until SIGTERM or SIGINT, then finish in-flight requests.

    Args:
        models: from ``load_models``.
        host: address to listen on.
        port: TCP port.
        max_body_bytes: largest request body; larger ones get 413.
        access_log: log one line per request (off: it costs about 10 % at batch 1).
    """
    app = kserve.model_server.app
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    app.add_exception_handler(RequestValidationError, _bad_request)
    app.add_exception_handler(HTTPException, _http_error)
    server = _ModelServer(
        host,
        http_port=port,
        enable_grpc=False,
        enable_latency_logging=False,
        enable_docs_url=False,
        grace_period=10,
    )
    # KServe 0.21 answers with FastAPI's ORJSONResponse, which FastAPI 0.165 calls deprecated.
    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")
    # KServe logs two timing lines per request ("kserve.trace"); uvicorn one access line.
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    if not access_log:
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    server.start(models)


def describe(models: list[ClassifierModel]) -> str:
    """One line per model: name, path, features and classes."""
    return "\n".join(
        f"{m.name}: {m.path} ({m.classifier.n_features} features, classes "
        f"{json.dumps(list(m.classifier.classes_))})"
        for m in models
    )
