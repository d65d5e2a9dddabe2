"""`triton-softmax export --triton-repo` and `triton-softmax serve`.

The repository's config.pbtxt is parsed with Triton's own ModelConfig schema (from tritonclient)
and checked against the ONNX model beside it. The server runs in a subprocess, on a free port of
127.0.0.1, where torch and triton cannot be imported; it is driven with the official tritonclient
and with plain HTTP, and its answers are compared with onnxruntime on the same rows.
"""

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
import tritonclient.http as httpclient
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from triton_softmax import cli
from triton_softmax.export import triton_repo
from triton_softmax.export.runtime import ModelError, OnnxClassifier
from triton_softmax.regression import SoftmaxRegression, TrainConfig, load_iris, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
MAX_BODY = 64 * 1024  # the servers' --max-body-bytes here: an oversized body stays small
#: Runs the command line with torch and triton made unimportable.
NO_TORCH = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
sys.modules["triton"] = None
from triton_softmax.cli import main
sys.exit(main(sys.argv[1:]))
"""
START_TIMEOUT = 60


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A Triton model repository written by `export --triton-repo` from an Iris checkpoint."""
    folder = tmp_path_factory.mktemp("serve")
    iris = load_iris()
    torch.manual_seed(0)
    model = SoftmaxRegression(iris.n_features, iris.n_classes)
    model.fit_normalization(torch.from_numpy(iris.features))
    with torch.no_grad():
        model.linear.weight.copy_(3 * torch.randn_like(model.linear.weight))
    checkpoint = save_checkpoint(
        folder / "run" / "model.safetensors",
        model,
        feature_names=iris.feature_names,
        class_names=iris.class_names,
        config=TrainConfig(),
        metrics={},
    )
    repository = folder / "models"
    code = cli.main(
        ["export", str(checkpoint), "--triton-repo", str(repository), "--name", "iris"]
        + ["--max-batch-size", "256"]
    )
    assert code == 0
    return SimpleNamespace(repository=repository, onnx=repository / "iris" / "1" / "model.onnx")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*args: str, cwd: Path) -> tuple[subprocess.Popen, int]:
    """`triton-softmax serve ARGS` without torch, ready on a free port, with its log in cwd."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    log = open(cwd / f"serve-{port}.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-c", NO_TORCH, "serve", "--port", str(port)]
        + ["--max-body-bytes", str(MAX_BODY), *args],  # the last of an option wins
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
    )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"serve exited {process.returncode}: {Path(log.name).read_text()}")
        with contextlib.suppress(OSError):
            if _request(port, "GET", "/v2/health/ready")[0] == 200:
                return process, port
        time.sleep(0.1)
    process.kill()
    pytest.fail(f"serve not ready after {START_TIMEOUT} s: {Path(log.name).read_text()}")


def _stop(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


def _request(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None
) -> tuple[int, dict]:
    """Plain HTTP: (status, JSON body). No content type is sent unless given, as `curl -d`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body, headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _infer_body(x: np.ndarray, **overrides) -> bytes:
    tensor = {"name": "features", "shape": list(x.shape), "datatype": "FP32"}
    tensor.update(data=x.ravel().tolist())
    tensor.update(overrides)
    return json.dumps({"inputs": [tensor]}).encode()


@pytest.fixture(scope="module")
def server(models):
    process, port = _start(str(models.repository), cwd=models.repository.parent)
    log = models.repository.parent / f"serve-{port}.log"
    yield SimpleNamespace(port=port, url=f"127.0.0.1:{port}", process=process, log=log)
    assert _stop(process) == 0


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(7)
    iris = load_iris()
    mean, std = iris.features.mean(axis=0), iris.features.std(axis=0)
    return rng.normal(mean, std, size=(64, iris.n_features)).astype(np.float32)


def test_triton_config_matches_the_model_beside_it(models):
    text = (models.repository / "iris" / "config.pbtxt").read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    proto = onnx.load(str(models.onnx))
    graph_in = {i.name: i.type.tensor_type for i in proto.graph.input}
    graph_out = {o.name: o.type.tensor_type for o in proto.graph.output}
    metadata = {p.key: p.value for p in proto.metadata_props}
    mc = model_config_pb2

    def dims(tensor_type):  # without the batch dimension, which max_batch_size stands for
        return [d.dim_value for d in tensor_type.shape.dim[1:]]

    assert config.name == "iris" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 256
    assert [i.name for i in config.input] == list(graph_in) == ["features"]
    (features,) = config.input
    assert features.data_type == mc.TYPE_FP32 == _triton_type(graph_in["features"].elem_type)
    assert list(features.dims) == dims(graph_in["features"]) == [4]
    outputs = {o.name: o for o in config.output}
    assert set(outputs) == set(graph_out) == {"label", "probabilities"}
    label, proba = outputs["label"], outputs["probabilities"]
    assert label.data_type == mc.TYPE_INT64 == _triton_type(graph_out["label"].elem_type)
    # The model's label is [N]: one value per row, declared [1] and reshaped to [] for the model.
    assert dims(graph_out["label"]) == [] and list(label.dims) == [1]
    assert label.HasField("reshape") and list(label.reshape.shape) == []
    assert proba.data_type == mc.TYPE_FP32 == _triton_type(graph_out["probabilities"].elem_type)
    assert list(proba.dims) == dims(graph_out["probabilities"]) == [3]
    assert not proba.HasField("reshape")
    # Triton's classification extension reads the labels from this file, one per line.
    assert proba.label_filename == "labels.txt" and not label.label_filename
    labels = (models.repository / "iris" / "labels.txt").read_text().splitlines()
    assert labels == json.loads(metadata["class_names"])
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (1, mc.ModelInstanceGroup.KIND_CPU)
    ]
    for key in ("class_names", "feature_names"):
        assert json.loads(config.parameters[key].string_value) == json.loads(metadata[key])


def _triton_type(onnx_type: int) -> int:
    return {
        TensorProto.FLOAT: model_config_pb2.TYPE_FP32,
        TensorProto.INT64: model_config_pb2.TYPE_INT64,
    }[onnx_type]


def test_triton_config_gpu_and_names_that_need_escaping():
    names = ['say "hi"', "back\\slash", "naïve\tcafé", "line\nbreak"]
    classifier = SimpleNamespace(
        classes_=np.array(names[:3]), feature_names=names, n_features=4, n_classes=3
    )
    text = triton_repo.config_pbtxt("m-1.v2", classifier, max_batch_size=8, gpu=True)
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.name == "m-1.v2" and config.max_batch_size == 8
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert json.loads(config.parameters["class_names"].string_value) == names[:3]
    assert json.loads(config.parameters["feature_names"].string_value) == names
    for bad in ("", "../x", "a/b", ".hidden", "-x", "sp ace"):
        with pytest.raises(ValueError, match="model name"):
            triton_repo.check_name(bad)


def test_find_models_repository_versions_and_single_files(models, tmp_path):
    repository = tmp_path / "repo"
    for name, version in (("b", "1"), ("b", "3"), ("b", "10"), ("a", "2")):
        (repository / name / version).mkdir(parents=True)
        (repository / name / version / "model.onnx").write_bytes(b"")
    (repository / "b" / "11").mkdir()  # no model.onnx: not a version
    (repository / "b" / "0").mkdir()  # Triton's versions start at 1
    (repository / "b" / "0" / "model.onnx").write_bytes(b"")
    (repository / "b" / "config.pbtxt").write_text('name: "b"\nmax_batch_size: 8  # rows\n')
    (repository / "empty").mkdir()
    Spec = triton_repo.ModelSpec
    assert triton_repo.find_models(repository) == {
        "a": Spec(repository / "a" / "2" / "model.onnx", 2, triton_repo.DEFAULT_MAX_BATCH_SIZE),
        "b": Spec(repository / "b" / "10" / "model.onnx", 10, 8),
    }
    assert triton_repo.find_models(models.onnx) == {"model": Spec(models.onnx)}
    assert triton_repo.find_models(models.onnx, "flowers", 5) == {
        "flowers": Spec(models.onnx, 1, 5)
    }
    bad_config = tmp_path / "bad"
    (bad_config / "m" / "1").mkdir(parents=True)
    (bad_config / "m" / "1" / "model.onnx").write_bytes(b"")
    (bad_config / "m" / "config.pbtxt").write_text("max_batch_size: 0\n")
    bad_name = tmp_path / "bad-name"
    (bad_name / "sp ace" / "1").mkdir(parents=True)
    (bad_name / "sp ace" / "1" / "model.onnx").write_bytes(b"")
    for path, name, limit, message in (
        (tmp_path / "missing", None, None, "no such model file or repository folder"),
        (repository / "empty", None, None, "no model in this repository"),
        (repository, "x", None, "--name is for one .onnx file"),
        (repository, None, 4, "--max-batch-size is for one .onnx file"),
        (models.onnx, "../../etc", None, "--name: model name '../../etc'"),
        (models.onnx, None, 0, "--max-batch-size must be at least 1"),
        (bad_config, None, None, "max_batch_size of at least 1"),
        (bad_name, None, None, "model name 'sp ace'"),
        (models.repository / "iris" / "config.pbtxt", None, None, "expected a .onnx model"),
    ):
        with pytest.raises(ModelError, match=re.escape(message)):
            triton_repo.find_models(path, name, limit)


def test_health_and_metadata(server):
    client = httpclient.InferenceServerClient(server.url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("iris") and not client.is_model_ready("nope")
    assert client.get_server_metadata()["name"]
    metadata = client.get_model_metadata("iris")
    assert metadata["name"] == "iris"
    assert metadata["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]
    assert metadata["outputs"] == [
        {"name": "label", "datatype": "INT64", "shape": [-1, 1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
    ]
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/iris/ready"):
        assert _request(server.port, "GET", path)[0] == 200
    status, body = _request(server.port, "GET", "/v2/models/nope")
    assert status == 404 and "nope" in body["error"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_results_equal_onnxruntime(server, models, rows, binary):
    label, proba = OnnxClassifier(models.onnx).run(rows)
    assert len(set(label.tolist())) > 1  # the rows reach more than one class
    client = httpclient.InferenceServerClient(server.url)
    tensor = httpclient.InferInput("features", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, binary_data=binary)
    outputs = [
        httpclient.InferRequestedOutput(name, binary_data=binary)
        for name in ("label", "probabilities")
    ]
    result = client.infer("iris", [tensor], outputs=outputs, request_id="r-17")
    assert result.get_response()["id"] == "r-17"
    np.testing.assert_array_equal(result.as_numpy("label"), label.reshape(-1, 1))
    np.testing.assert_array_equal(result.as_numpy("probabilities"), proba)
    # Defaults of tritonclient (binary tensors both ways), one row.
    tensor = httpclient.InferInput("features", [1, 4], "FP32")
    tensor.set_data_from_numpy(rows[:1])
    result = client.infer("iris", [tensor])
    np.testing.assert_array_equal(result.as_numpy("label"), label[:1].reshape(1, 1))


def test_plain_http_json_results_equal_onnxruntime(server, models, rows):
    label, proba = OnnxClassifier(models.onnx).run(rows)
    for headers in ({}, {"Content-Type": "application/json"}):  # `curl -d` sends neither
        status, body = _request(
            server.port, "POST", "/v2/models/iris/infer", _infer_body(rows), headers
        )
        assert status == 200, body
        out = {o["name"]: o for o in body["outputs"]}
        assert out["label"]["shape"] == [64, 1] and out["label"]["datatype"] == "INT64"
        assert out["label"]["data"] == label.tolist()
        got = np.array(out["probabilities"]["data"], dtype=np.float32).reshape(64, 3)
        np.testing.assert_array_equal(got, proba)  # float32 values survive JSON exactly


X1 = [[5.1, 3.5, 1.4, 0.2]]
BAD_REQUESTS = {
    "wrong feature count": (
        {"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]},
        400,
        "must have shape [N, 4]",
    ),
    "shape not matching the data": (
        {"inputs": [{"name": "features", "shape": [2, 4], "datatype": "FP32", "data": X1[0]}]},
        400,
        "shape [2, 4] needs 8 values, got 4",
    ),
    "unknown input name": (
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": X1[0]}]},
        400,
        "expected one input 'features'",
    ),
    "two inputs": (
        {"inputs": [{"name": n, "shape": [1, 4], "datatype": "FP32", "data": X1[0]} for n in "ab"]},
        400,
        "got 'a', 'b'",
    ),
    "wrong datatype": (
        {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "INT64", "data": [1] * 4}]},
        400,
        "must be FP32, got INT64",
    ),
    "strings as data": (
        {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": ["a"] * 4}]},
        400,
        "data must be numbers",
    ),
    "NaN": (
        '{"inputs": [{"name": "features", "shape": [3, 4], "datatype": "FP32", '
        '"data": [1, 2, 3, 4, 1, 2, 3, 4, 1, NaN, 3, 4]}]}',
        400,
        "NaN or inf (after the cast to float32) in row(s) 2",
    ),
    "infinite values": (
        '{"inputs": [{"name": "features", "shape": [2, 4], "datatype": "FP32", '
        '"data": [Infinity, 2, 3, 4, 1, 2, 3, -Infinity]}]}',
        400,
        "in row(s) 0, 1",
    ),
    "values beyond float32": (
        {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1e39] * 4}]},
        400,
        "NaN or inf",
    ),
    "empty inputs": ({"inputs": []}, 400, "expected one input 'features'"),
    "no rows": (
        {"inputs": [{"name": "features", "shape": [0, 4], "datatype": "FP32", "data": []}]},
        400,
        "with N >= 1",
    ),
    "no inputs field": ({"outputs": []}, 400, "inputs: Field required"),
    "malformed JSON": ('{"inputs": [', 400, "not an inference request: invalid JSON"),
    "an integer of 400 digits": (
        '{"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", '
        '"data": [1, 2, 3, ' + "9" * 400 + "]}]}",
        400,
        "too large for FP32",
    ),
    "booleans as FP32": (
        {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [True] * 4}]},
        400,
        "data[0] is bool",
    ),
    "numeric strings as FP32": (
        {
            "inputs": [
                {"name": "features", "shape": [1, 4], "datatype": "FP32", "data": ["1.5"] * 4}
            ]
        },
        400,
        "data[0] is str",
    ),
    "nested lists as FP32": (
        {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": X1}]},
        400,
        "data[0] is a nested list",
    ),
    "lower-case datatype": (
        {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "fp32", "data": X1[0]}]},
        400,
        "datatype 'fp32' is not one of the protocol's",
    ),
    "more rows than max_batch_size": (
        {
            "inputs": [
                {"name": "features", "shape": [257, 4], "datatype": "FP32", "data": [1] * 1028}
            ]
        },
        400,
        "257 rows, more than this model's max_batch_size 256",
    ),
    "classification of zero classes": (
        {
            "inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": X1[0]}],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 0}}],
        },
        400,
        "classification must be a positive integer",
    ),
    "classification of the label": (
        {
            "inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": X1[0]}],
            "outputs": [{"name": "label", "parameters": {"classification": 1}}],
        },
        400,
        "classification is offered on 'probabilities' only",
    ),
    "unknown output": (
        {
            "inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": X1[0]}],
            "outputs": [{"name": "logits"}],
        },
        400,
        "logits",
    ),
}


@pytest.mark.parametrize("content_type", [None, "application/json"], ids=["no-type", "json"])
def test_bad_requests_get_4xx_json_errors_and_the_server_goes_on(server, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    for what, (body, status, message) in BAD_REQUESTS.items():
        data = body if isinstance(body, str) else json.dumps(body)
        got, answer = _request(server.port, "POST", "/v2/models/iris/infer", data.encode(), headers)
        assert (got, message in answer.get("error", "")) == (status, True), (what, answer)
    good = _infer_body(np.array(X1, dtype=np.float32))
    status, answer = _request(server.port, "POST", "/v2/models/nope/infer", good, headers)
    assert status == 404 and "nope" in answer["error"]
    big = _infer_body(np.zeros((MAX_BODY // 16, 4), dtype=np.float32))
    assert len(big) > MAX_BODY
    status, answer = _request(server.port, "POST", "/v2/models/iris/infer", big, headers)
    assert status == 413 and "error" in answer
    assert _request(server.port, "POST", "/v2/models/iris/infer", good, headers)[0] == 200


def test_binary_tensor_of_the_wrong_size_is_a_400(server, rows):
    client = httpclient.InferenceServerClient(server.url)
    tensor = httpclient.InferInput("features", [2, 4], "FP32")
    tensor.set_data_from_numpy(rows[:2])
    tensor.set_shape([3, 4])  # the binary part holds 2 rows
    with pytest.raises(
        InferenceServerException,
        match=re.escape("[400] input 'features': shape [3, 4] needs 12 values, got 8"),
    ):
        client.infer("iris", [tensor])
    with pytest.raises(InferenceServerException, match="nope"):
        client.infer("nope", [tensor])
    assert client.is_server_ready()


def test_concurrent_clients_all_answered_correctly(server, models, rows):
    label, proba = OnnxClassifier(models.onnx).run(rows)
    n_clients, n_requests = 8, 60
    wrong: list[str] = []

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        for i in range(n_requests):
            lo = (k * 7 + i) % 60
            n = 1 + (i % 4)
            conn.request("POST", "/v2/models/iris/infer", _infer_body(rows[lo : lo + n]))
            response = conn.getresponse()
            body = json.loads(response.read())
            out = {o["name"]: o["data"] for o in body.get("outputs", [])}
            if response.status != 200 or out.get("label") != label[lo : lo + n].tolist():
                wrong.append(f"client {k} request {i}: {response.status} {body}")
            elif not np.array_equal(
                np.array(out["probabilities"], dtype=np.float32), proba[lo : lo + n].ravel()
            ):
                wrong.append(f"client {k} request {i}: probabilities differ")
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert wrong == []


def test_sigterm_finishes_the_request_in_flight_and_exits_0(models, rows):
    read_timeout = 4
    process, port = _start(
        str(models.onnx), "--name", "flowers", "--read-timeout", str(read_timeout),
        cwd=models.repository.parent,
    )  # fmt: skip
    body = _infer_body(rows[:2])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("POST", "/v2/models/flowers/infer")
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders()
    conn.send(body[:20])  # the request is in flight: its body is still arriving
    # Two stalled requests: headers cut short, and a body that never comes.
    head = _raw(port, b"POST /v2/models/flowers/infer HTTP/1.1\r\nHost: x\r\n")
    stalled = _raw(port, b"POST /v2/models/flowers/infer HTTP/1.1\r\nContent-Length: 99\r\n\r\n{")
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert _read_status(head) == 503  # at once: its headers never came
    time.sleep(0.5)
    assert process.poll() is None  # waiting for the request in flight
    conn.send(body[20:])
    response = conn.getresponse()
    answer = json.loads(response.read())
    assert response.status == 200, answer
    assert answer["outputs"][0]["data"] == OnnxClassifier(models.onnx).run(rows[:2])[0].tolist()
    assert _read_status(stalled) == 503  # within the read timeout, inside the grace period
    assert time.monotonic() - signalled < read_timeout + 2
    assert _stop(process) == 0
    assert time.monotonic() - signalled < 9
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_serve_refuses_a_missing_or_foreign_model_before_binding(tmp_path):
    foreign = tmp_path / "identity.onnx"
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    onnx.save_model(helper.make_model(graph), str(foreign))
    port = _free_port()
    for path, message in (
        (tmp_path / "missing.onnx", "no such model file"),
        (foreign, "not a triton-softmax classifier"),
    ):
        done = _run_without_torch(["serve", str(path), "--port", str(port)], tmp_path)
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith("triton-softmax serve: error: ") and message in done.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # never bound by serve


def _run_without_torch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def test_predict_and_info_on_onnx_without_torch_train_says_what_is_missing(models, rows, tmp_path):
    iris = load_iris()
    csv = tmp_path / "new.csv"
    csv.write_text(
        ",".join(iris.feature_names) + "\n" + "\n".join(",".join(map(str, r)) for r in rows[:5])
    )
    for args, expected in (
        (["info", str(models.onnx)], "classes: setosa, versicolor, virginica"),
        (["predict", str(models.onnx), str(csv)], "label,class,probability_setosa"),
    ):
        done = _run_without_torch(args, tmp_path)
        assert done.returncode == 0, done.stderr
        assert expected in done.stdout
    done = _run_without_torch(["train"], tmp_path)
    assert done.returncode == 1
    assert done.stderr == (
        "triton-softmax train: error: torch is not installed; this command needs the package's "
        "own dependencies (README: Quick start)\n"
    )


def test_readme_serving_only_install_matches_the_serve_extra():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    serve_deps = extra["optional-dependencies"]["serve"]
    line = "pip install " + " ".join(f'"{r}"' for r in serve_deps)
    assert line in (REPO / "README.md").read_text()


@pytest.mark.slow  # about 17 s on 2 loaded cores: it trains and exports a model first
def test_http_benchmark_smoke(tmp_path):
    from benchmarks import common, serving_http

    csv_path = serving_http.run(tmp_path, smoke=True)
    rows = common.read_csv(csv_path)
    assert [(r["path"].split()[0], r["clients"], r["batch"]) for r in rows] == [
        ("in-process", 1, 1),
        ("in-process", 1, 64),
        ("bare", 1, 1),
        *(("triton-softmax", c, b) for c in serving_http.SMOKE_CLIENTS for b in (1, 64)),
    ]
    assert all(r["requests"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"] for r in rows)
    text = csv_path.with_suffix(".md").read_text()
    assert "Target (docs/design.md)" in text and "smoke run" in text
    assert "No HTTP serving numbers" not in serving_http.readme_section(tmp_path)


BIG_ROWS = 300_000  # a legal request (4.8 MB) of about half a second's work or more on 2 cores
READ_TIMEOUT = 1.5


@pytest.fixture(scope="module")
def extra(models):
    """One .onnx file served with every option: gRPC, model control, a big row limit."""
    grpc_port = _free_port()
    process, port = _start(
        str(models.onnx), "--name", "flowers", "--model-control", "--grpc-port", str(grpc_port),
        "--max-batch-size", str(BIG_ROWS), "--max-body-bytes", str(32 * 2**20),
        "--read-timeout", str(READ_TIMEOUT), cwd=models.repository.parent,
    )  # fmt: skip
    yield SimpleNamespace(port=port, grpc_port=grpc_port, url=f"127.0.0.1:{port}")
    assert _stop(process) == 0


def _raw(port: int, data: bytes) -> socket.socket:
    """A socket that has sent ``data`` (and nothing after)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(data)
    return sock


def _read_status(sock: socket.socket) -> int:
    """The status of the one response on ``sock``, whose body must be a JSON ``error``."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert "error" in json.loads(body), data
    return int(head.split()[1])


def test_model_control_is_off_by_default(server, rows):
    for action in ("unload", "load"):
        status, body = _request(server.port, "POST", f"/v2/repository/models/iris/{action}")
        assert status == 403 and "model control is off" in body["error"]
    assert _request(server.port, "GET", "/v2/health/ready") == (200, {"ready": True})
    assert _request(server.port, "POST", "/v2/models/iris/infer", _infer_body(rows[:1]))[0] == 200
    extensions = _request(server.port, "GET", "/v2")[1]["extensions"]
    assert "classification" in extensions and not any("repository" in e for e in extensions)


def test_model_control_flag_and_readiness(extra, rows):
    body = _infer_body(rows[:1])
    assert _request(extra.port, "POST", "/v2/repository/models/nope/unload")[0] == 404
    assert _request(extra.port, "POST", "/v2/repository/models/flowers/unload")[0] == 200
    # Readiness follows the models: a probe stops sending traffic while one is unloaded.
    assert _request(extra.port, "GET", "/v2/health/ready")[0] == 503
    assert _request(extra.port, "GET", "/v2/models/flowers/ready")[0] == 404
    assert _request(extra.port, "POST", "/v2/models/flowers/infer", body)[0] == 404
    assert _request(extra.port, "POST", "/v2/repository/models/flowers/load")[0] == 200
    assert _request(extra.port, "GET", "/v2/health/ready") == (200, {"ready": True})
    assert _request(extra.port, "POST", "/v2/models/flowers/infer", body)[0] == 200
    assert "model_repository" in _request(extra.port, "GET", "/v2")[1]["extensions"]


def test_health_answers_while_a_large_request_runs(extra, models):
    x = np.random.default_rng(1).normal(3, 1, size=(BIG_ROWS, 4)).astype(np.float32)
    header = {"name": "features", "shape": list(x.shape), "datatype": "FP32"}
    header["parameters"] = {"binary_data_size": x.nbytes}
    body, headers = _binary_body({"inputs": [header]}, x.tobytes())
    result = {}

    def big() -> None:  # http.client: the answer is read as bytes, parsed once this is over
        start = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", extra.port, timeout=120)
        conn.request("POST", "/v2/models/flowers/infer", body, headers)
        response = conn.getresponse()
        result["answer"] = (response.status, response.read())
        result["seconds"] = time.monotonic() - start
        conn.close()

    thread = threading.Thread(target=big)
    thread.start()
    waits = []
    while thread.is_alive():
        start = time.monotonic()
        assert _request(extra.port, "GET", "/v2/health/ready")[0] == 200
        waits.append(time.monotonic() - start)
        time.sleep(0.05)
    thread.join()
    # Health checks were made while the big request ran, and none waited on it: a server that
    # ran the request on its event loop would hold the first check about as long as the request.
    assert len(waits) >= 3, (result["seconds"], waits)
    assert max(waits) < min(0.5, result["seconds"] / 2), (result["seconds"], waits)
    status, answer = result["answer"]
    assert status == 200, answer[:500]
    outputs = {o["name"]: o for o in json.loads(answer)["outputs"]}
    label = OnnxClassifier(models.onnx).run(x)[0]
    assert outputs["label"]["data"] == label.tolist()


def test_max_batch_size_of_a_single_file(models, tmp_path):
    # The repository's limit (256) is in BAD_REQUESTS; a single file takes --max-batch-size.
    rows = np.ones((3, 4), dtype=np.float32)
    process, port = _start(str(models.onnx), "--max-batch-size", "2", cwd=tmp_path)
    try:
        status, body = _request(port, "POST", "/v2/models/model/infer", _infer_body(rows))
        assert status == 400 and "3 rows, more than this model's max_batch_size 2" in body["error"]
        assert _request(port, "POST", "/v2/models/model/infer", _infer_body(rows[:2]))[0] == 200
    finally:
        assert _stop(process) == 0


def test_read_timeout_answers_408(extra):
    started = time.monotonic()
    head = _raw(extra.port, b"POST /v2/models/flowers/infer HTTP/1.1\r\nHost: x\r\n")
    body = _raw(
        extra.port, b"POST /v2/models/flowers/infer HTTP/1.1\r\nContent-Length: 50\r\n\r\n{"
    )
    assert _read_status(head) == 408 and _read_status(body) == 408
    assert READ_TIMEOUT - 0.1 < time.monotonic() - started < READ_TIMEOUT + 5
    assert _request(extra.port, "GET", "/v2/health/live")[0] == 200


def test_versions(server, models, rows):
    client = httpclient.InferenceServerClient(server.url)
    assert client.is_model_ready("iris", model_version="1")
    assert not client.is_model_ready("iris", model_version="2")
    metadata = client.get_model_metadata("iris", model_version="1")
    assert metadata["versions"] == ["1"] and metadata["platform"] == "onnxruntime_onnx"
    tensor = httpclient.InferInput("features", [4, 4], "FP32")
    tensor.set_data_from_numpy(rows[:4])
    result = client.infer("iris", [tensor], model_version="1")
    assert result.get_response()["model_version"] == "1"
    label = OnnxClassifier(models.onnx).run(rows[:4])[0]
    np.testing.assert_array_equal(result.as_numpy("label"), label.reshape(-1, 1))
    with pytest.raises(InferenceServerException, match="version 2"):
        client.infer("iris", [tensor], model_version="2")
    status, body = _request(server.port, "POST", "/v2/models/iris/infer", _infer_body(rows[:1]))
    assert status == 200 and body["model_version"] == "1"


def _expected_classes(proba: np.ndarray, k: int, names: list[str]) -> list[list[str]]:
    """Triton's strings: "%f" score, index, label; the k most probable first."""
    order = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    return [
        [f"{float(p[i]):f}:{i}:{names[i]}" for i in row]
        for p, row in zip(proba, order, strict=True)
    ]


def test_classification_extension(server, models, rows):
    clf = OnnxClassifier(models.onnx)
    proba = clf.run(rows)[1]
    names = list(clf.classes_)
    request = json.loads(_infer_body(rows))
    request["outputs"] = [{"name": "probabilities", "parameters": {"classification": 2}}]
    status, body = _request(
        server.port, "POST", "/v2/models/iris/infer", json.dumps(request).encode()
    )
    assert status == 200, body
    (out,) = body["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("probabilities", "BYTES", [64, 2])
    assert np.array(out["data"]).reshape(64, 2).tolist() == _expected_classes(proba, 2, names)
    # tritonclient's class_count, binary both ways; more classes than the model has gives all.
    client = httpclient.InferenceServerClient(server.url)
    tensor = httpclient.InferInput("features", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)
    wanted = [httpclient.InferRequestedOutput("probabilities", class_count=5)]
    got = client.infer("iris", [tensor], outputs=wanted).as_numpy("probabilities")
    assert got.shape == (64, 3)
    assert [[v.decode() for v in r] for r in got] == _expected_classes(proba, 3, names)


def _metric(port: int, name: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    line = next(x for x in text.splitlines() if x.startswith(name + " "))
    return float(line.split()[-1])


def test_metrics_count_requests_and_latency(server, rows):
    count = 'request_predict_seconds_count{model_name="iris"}'
    slowest = 'request_predict_seconds_bucket{le="+Inf",model_name="iris"}'
    total = 'request_predict_seconds_sum{model_name="iris"}'
    before = [_metric(server.port, m) for m in (count, slowest, total)]
    for n in (1, 2, 3):
        assert (
            _request(server.port, "POST", "/v2/models/iris/infer", _infer_body(rows[:n]))[0] == 200
        )
    after = [_metric(server.port, m) for m in (count, slowest, total)]
    assert after[0] == before[0] + 3 and after[1] == before[1] + 3 and after[2] > before[2]


def _binary_body(header: dict, data: bytes) -> tuple[bytes, dict]:
    text = json.dumps(header).encode()
    return text + data, {"Inference-Header-Content-Length": str(len(text))}


def test_malformed_binary_and_chunked_requests_get_4xx_and_one_log_line(server, rows):
    data = rows[:2].tobytes()

    def tensor(**fields) -> dict:
        base = {"name": "features", "shape": [2, 4], "datatype": "FP32"}
        base.update(parameters={"binary_data_size": len(data)})
        return {"inputs": [{**base, **fields}]}

    cases = {
        "shape [-1, 4]": (tensor(shape=[-1, 4]), data, "with N >= 1"),
        "BYTES as binary": (tensor(datatype="BYTES"), data, "must be FP32, got BYTES"),
        "trailing bytes": (tensor(), data + b"\0" * 8, "8 bytes after the binary tensors"),
        "size past the body": (tensor(), data[:16], "must be a byte count within the body"),
        "size not a number": (tensor(parameters={"binary_data_size": "32"}), data, "byte count"),
        "lower-case datatype": (tensor(datatype="fp32"), data, "is not one of the protocol's"),
    }
    log_before = server.log.read_text()
    for what, (header, tail, message) in cases.items():
        body, headers = _binary_body(header, tail)
        status, answer = _request(server.port, "POST", "/v2/models/iris/infer", body, headers)
        assert (status, message in answer.get("error", "")) == (400, True), (what, answer)
    body, headers = _binary_body(tensor(), data)
    headers["Inference-Header-Content-Length"] = str(len(body) + 1)
    status, answer = _request(server.port, "POST", "/v2/models/iris/infer", body, headers)
    assert status == 400 and "within the body" in answer["error"]
    # A chunked body over the limit: 413 as for a declared one.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    chunks = (b"x" * 8192 for _ in range(MAX_BODY // 8192 + 2))
    conn.request("POST", "/v2/models/iris/infer", chunks, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413 and "limit" in json.loads(response.read())["error"]
    conn.close()
    # One log line per client error, no traceback.
    new = server.log.read_text()[len(log_before) :].splitlines()
    errors = [line for line in new if " 400 POST " in line or " 413 POST " in line]
    assert len(errors) == len(cases) + 2 and "Traceback" not in "\n".join(new), new


GRPC_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

url, rows_path, expected_path = sys.argv[1:]
rows, expected = np.load(rows_path), json.load(open(expected_path))
client = grpcclient.InferenceServerClient(url)
assert client.is_server_live() and client.is_server_ready()
assert client.is_model_ready("flowers", "1")
metadata = client.get_model_metadata("flowers", "1", as_json=True)
assert metadata["versions"] == ["1"] and metadata["platform"] == "onnxruntime_onnx", metadata
tensor = grpcclient.InferInput("features", list(rows.shape), "FP32")
tensor.set_data_from_numpy(rows)
result = client.infer("flowers", [tensor], model_version="1")
assert result.get_response().model_version == "1"
assert result.as_numpy("label").ravel().tolist() == expected["label"]
assert np.array_equal(result.as_numpy("probabilities"), np.array(expected["proba"], np.float32))
wanted = [grpcclient.InferRequestedOutput("probabilities", class_count=2)]
got = client.infer("flowers", [tensor], outputs=wanted).as_numpy("probabilities")
assert [[v.decode() for v in r] for r in got] == expected["top2"], got
for call in (lambda: client.infer("flowers", [tensor], model_version="2"),
             lambda: client.infer("nope", [tensor])):
    try:
        call()
        raise AssertionError("no error")
    except InferenceServerException as e:
        assert "NOT_FOUND" in str(e.status()), e
bad = grpcclient.InferInput("features", [300001, 4], "FP32")
bad.set_data_from_numpy(np.zeros((300001, 4), np.float32))
try:
    client.infer("flowers", [bad])
    raise AssertionError("no error")
except InferenceServerException as e:
    assert "INVALID_ARGUMENT" in str(e.status()) and "max_batch_size" in str(e), e
print("ok")
"""


def test_grpc_with_tritonclient_in_its_own_process(extra, models, rows, tmp_path):
    # tritonclient.grpc's protobuf stubs and KServe's clash in one process: the client runs apart.
    label, proba = OnnxClassifier(models.onnx).run(rows)
    names = list(OnnxClassifier(models.onnx).classes_)
    np.save(tmp_path / "rows.npy", rows)
    expected = {
        "label": label.tolist(),
        "proba": proba.tolist(),
        "top2": _expected_classes(proba, 2, names),
    }
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    done = subprocess.run(
        [sys.executable, "-c", GRPC_CLIENT, f"127.0.0.1:{extra.grpc_port}"]
        + [str(tmp_path / "rows.npy"), str(tmp_path / "expected.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_a_busy_port_ends_serve_with_one_line(models, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for option in ("--port", "--grpc-port"):
            args = ["serve", str(models.onnx), "--port", str(_free_port()), option, str(port)]
            done = _run_without_torch(args, tmp_path)
            assert done.returncode == 1, done.stderr
            assert "serving" not in done.stderr and "Traceback" not in done.stderr
            what = "gRPC" if option == "--grpc-port" else "HTTP"
            assert done.stderr.splitlines()[-1] == (
                f"triton-softmax serve: error: cannot listen for {what} on 127.0.0.1:{port}: "
                "Address already in use"
            )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--port", "70000"], "a port is 1 to 65535"),
        (["--grpc-port", "0"], "must be at least 1"),
        (["--max-body-bytes", "-1"], "must be at least 1"),
        (["--max-batch-size", "0"], "must be at least 1"),
        (["--read-timeout", "nan"], "must be above 0 and finite"),
    ],
)
def test_serve_options_are_checked(models, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", str(models.onnx), *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
