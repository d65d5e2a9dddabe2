"""`triton-softmax serve` against an adversarial tester's requests (issue 22 follow-up).

Over HTTP and gRPC against one server started for the module, and in-process checks of
``ClassifierModel`` run in a subprocess (KServe's protobuf stubs clash with tritonclient's).
"""

import http.client
import json
import subprocess
import sys

import pytest

from tests.test_serve import _free_port, _request, _start, _stop, models  # noqa: F401

X1 = [5.1, 3.5, 1.4, 0.2]


@pytest.fixture(scope="module")
def served(models):  # noqa: F811
    grpc_port = _free_port()
    process, port = _start(
        str(models.repository), "--grpc-port", str(grpc_port), cwd=models.repository.parent
    )
    yield port, grpc_port
    assert _stop(process) == 0


def _tensor(shape=(1, 4), data=X1, **fields) -> dict:
    return {"name": "features", "shape": list(shape), "datatype": "FP32", "data": data, **fields}


def _infer(port: int, inputs: list, **fields) -> tuple[int, dict]:
    body = json.dumps({"inputs": inputs, **fields}).encode()
    return _request(port, "POST", "/v2/models/iris/infer", body)


def test_kserve_v1_routes_are_not_served(served):
    port, _ = served
    body = json.dumps({"instances": [X1]}).encode()
    for method, path, data in [
        ("POST", "/v1/models/iris:predict", body),
        ("POST", "/v1/models/iris:explain", body),
        ("GET", "/v1/models", None),
        ("GET", "/v1/models/iris", None),
    ]:
        status, answer = _request(port, method, path, data)
        assert status == 404 and "error" in answer, (path, status, answer)
    assert _infer(port, [_tensor()])[0] == 200


def test_binary_header_length_must_be_ascii_digits(served):
    port, _ = served
    # Headers arrive as Latin-1: b"\xb2" is "²", which str.isdigit() takes and int() refuses.
    for value in ("\u00b2", "1\u00b3", "\u00b9", "-1", "+4"):
        headers = {"Inference-Header-Content-Length": value}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.putrequest("POST", "/v2/models/iris/infer")
        conn.putheader("Inference-Header-Content-Length", value.encode("latin-1"))
        conn.putheader("Content-Length", "2")
        conn.endheaders(b"{}")
        response = conn.getresponse()
        answer = json.loads(response.read())
        conn.close()
        assert response.status == 400 and "byte count" in answer["error"], (headers, answer)


@pytest.mark.parametrize(
    "inputs, fields, message",
    [
        ([_tensor(shape=["1", "4"])], {}, "shape.0"),
        ([_tensor(shape=[True, 4])], {}, "shape.0"),
        ([_tensor(shape=[1.0, 4])], {}, "shape.0"),
        ([_tensor(datatype="FP16")], {}, "must be FP32, got FP16"),
        ([_tensor(datatype="")], {}, "datatype '' is not one of"),
        ([_tensor(data=[0] * 4000)], {}, "needs 4 values, got 4000"),
        (
            [_tensor()],
            {"outputs": [{"name": "label", "parameters": {"binary_data": "yes"}}]},
            "binary_data must be true or false",
        ),
        (
            [_tensor()],
            {"parameters": {"binary_data_output": 1}},
            "binary_data_output must be true or false",
        ),
        ([_tensor()], {"outputs": [{"name": "label"}] * 2}, "requested more than once"),
        (
            [_tensor(shape=[3, 4], data=X1 + [3e38, -3e38, 3e38, -3e38] + X1)],
            {},
            "overflows the model: rows [1] give non-finite probabilities",
        ),
    ],
    ids=[
        "shape-str", "shape-bool", "shape-float", "json-fp16", "empty-datatype", "count",
        "binary-data-str", "binary-data-output-int", "duplicate-output", "overflow",
    ],
)  # fmt: skip
def test_bad_requests_the_tester_found(served, inputs, fields, message):
    status, answer = _infer(served[0], inputs, **fields)
    assert status == 400 and message in answer.get("error", ""), answer


def test_head_on_health_and_model_readiness(served):
    port, _ = served
    for path in ("/v2/health/ready", "/v2/health/live"):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("HEAD", path)
        response = conn.getresponse()
        assert response.status == 200 and response.read() == b"", path
        conn.close()


GRPC = """
import sys
import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc as pbg

url = sys.argv[1]
client = grpcclient.InferenceServerClient(url)
assert client.is_model_ready("iris", "1")
assert not client.is_model_ready("nope") and not client.is_model_ready("iris", "2")
stub = pbg.GRPCInferenceServiceStub(grpc.insecure_channel(url))

def refused(datatype, field, values):
    request = pb.ModelInferRequest(model_name="iris")
    tensor = request.inputs.add(name="features", datatype=datatype, shape=[1, 4])
    getattr(tensor.contents, field).extend(values)
    try:
        stub.ModelInfer(request)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
        return e.details()
    raise AssertionError("no error")

print(refused("FP32", "int_contents", [1, 2, 3, 4]))
print(refused("BF16", "fp32_contents", [1, 2, 3, 4]))
print(refused("fp32", "fp32_contents", [1, 2, 3, 4]))
print(refused("FP32", "fp32_contents", [0.0] * 4000))
"""


def test_grpc_readiness_and_messages(served):
    done = subprocess.run(
        [sys.executable, "-c", GRPC, f"127.0.0.1:{served[1]}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "fp32_contents or raw_input_contents, not int_contents" in lines[0], lines
    assert "must be FP32, got BF16" in lines[1], lines
    assert "datatype 'fp32' is not one of" in lines[2], lines
    assert "needs 4 values, got 4000" in lines[3], lines


IN_PROCESS = """
import sys, threading
from pathlib import Path
import numpy as np
from triton_softmax.export import serve
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput
import asyncio
from concurrent import futures

spec = serve.ModelSpec(Path(sys.argv[1]), 1, 10 * serve.INLINE_ROWS)
model = serve.ClassifierModel("iris", spec, futures.ThreadPoolExecutor(1))
model.load()

class Untouchable(list):  # a request's values that must not be read before the count check
    def __iter__(self):
        raise AssertionError("values read before the count was checked")
    def __getitem__(self, i):
        if isinstance(i, slice):
            raise AssertionError("values read before the count was checked")
        return super().__getitem__(i)

def request(shape, data, outputs=None):
    return InferRequest("iris", [InferInput("features", shape, "FP32", data)],
                        request_outputs=outputs)

try:
    asyncio.run(model.predict(request([1, 4], Untouchable([0.0] * 400_000))))
    raise SystemExit("no error")
except InvalidInput as e:
    assert "needs 4 values, got 400000" in str(e), e

threads = []
features = model._features
model._features = lambda payload: threads.append(threading.current_thread().name) or features(
    payload)
rows = serve.INLINE_ROWS
x = np.random.default_rng(0).normal(3, 2, size=(rows, 4)).astype(np.float32)
wanted = [RequestedOutput("probabilities", {"classification": 2})]
response = asyncio.run(model.predict(request([rows, 4], x.ravel().tolist(), wanted)))
assert threads and threads[0] != threading.main_thread().name, threads
proba = model.classifier.run(x)[1]
text = response.outputs[0].data
names = model.classifier.classes_
for r in range(rows):
    order = sorted(range(proba.shape[1]), key=lambda i: (-proba[r, i], i))[:2]
    want = [f"{float(proba[r, i]):f}:{i}:{names[i]}".encode() for i in order]
    assert list(text[r]) == want, (r, text[r], want)
tie = serve.classifications(np.array([[0.25, 0.5, 0.25]], np.float32), 3, ["a", "b", "\u00e9"])
assert tie.tolist() == [[b"0.500000:1:b", b"0.250000:0:a", "0.250000:2:\u00e9".encode()]], tie
print("ok")
"""


def test_model_checks_counts_before_converting_and_works_off_the_loop(models):  # noqa: F811
    done = subprocess.run(
        [sys.executable, "-c", IN_PROCESS, str(models.onnx)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
