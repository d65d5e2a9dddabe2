"""Serving over HTTP on 127.0.0.1: `triton-softmax serve` next to in-process onnxruntime.

    python -m benchmarks.serving_http                    # about 1 minute on 2 cores
    python -m benchmarks.serving_http --update-readme    # and RESULTS.md's section bench:http
    python -m benchmarks.serving_http --smoke --out DIR  # a few seconds (the tests run it)

The Iris model is trained and exported with the project's API. In-process: ``OnnxClassifier.run``
with one onnxruntime thread, as the server runs it, p50 / p99 per call at batch 1 and 64 rows.
Floor: a bare uvicorn ASGI app that sends a fixed answer, with one client at batch 1.
Server: ``triton-softmax serve model.onnx`` in a subprocess; 1, 8 and 32 client processes, each
with one keep-alive connection (``http.client``), send JSON inference requests back to back for
``DURATION`` seconds after ``WARMUP`` seconds; latency is send to parsed response, p50 / p99 over
every client's requests, and requests/s counts the requests completed in the timed window. Every
answer is checked against the in-process labels. The target (docs/design.md): the server adds at
most 1 ms p50 to in-process onnxruntime at batch 1 with one client.

The clients run on the same machine: on a small one they take CPU time from the server, so the
figures are what server and clients reach together. Output: ``http_serving_<cpu>.csv`` and
``.md`` (not ``serving_*``, which ``benchmarks.serving`` reads).
"""

from __future__ import annotations

import http.client
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common, targets

CLIENTS = (1, 8, 32)
BATCHES = (1, 64)
WARMUP, DURATION = 1.0, 4.0
SMOKE_CLIENTS, SMOKE_WARMUP, SMOKE_DURATION = (1, 2), 0.2, 0.5
IN_PROCESS_CALLS, SMOKE_IN_PROCESS_CALLS = 20_000, 200
SMOKE_EPOCHS = 20
START_TIMEOUT = 120
MODEL = "iris"
TABLE_HEADER = ("path", "clients", "rows/request", "requests/s", "rows/s", "p50 ms", "p99 ms")
TABLE_HEADER += ("p50 added ms",)
VERSIONS = ("triton-softmax", "kserve", "fastapi", "uvicorn", "onnxruntime", "numpy")


def prepare(workdir: Path, epochs: int | None = None) -> tuple[Path, np.ndarray]:
    """Train and export the Iris model; 64 rows drawn like its features."""
    data, _ = common.iris_model(workdir, epochs)
    mean, std = data.features.mean(axis=0), data.features.std(axis=0)
    return workdir / "model.onnx", common.iris_like_rows(mean, std, max(BATCHES), seed=0)


def _timings(path: str, clients: int, batch: int, seconds: np.ndarray, per_s: int) -> dict:
    """One CSV row: requests per second, p50 / p99 latency in ms, the number of requests."""
    p50, p99 = np.percentile(seconds, [50, 99]) * 1e3
    return dict(
        path=path,
        clients=clients,
        batch=batch,
        requests_per_s=per_s,
        p50_ms=round(float(p50), 4),
        p99_ms=round(float(p99), 4),
        requests=int(seconds.size),
    )


def in_process(path: Path, rows: np.ndarray, calls: int) -> list[dict]:
    """p50 / p99 of ``OnnxClassifier.run`` at each batch size (1 onnxruntime thread)."""
    from triton_softmax.export.runtime import OnnxClassifier

    clf = OnnxClassifier(path, providers=["CPUExecutionProvider"], threads=1)
    out = []
    for batch in BATCHES:
        x = rows[:batch]
        for _ in range(calls // 10):
            clf.run(x)
        times = np.empty(calls)
        for i in range(calls):
            start = time.perf_counter()
            clf.run(x)
            times[i] = time.perf_counter() - start
        per_s = round(1 / np.median(times))
        out.append(_timings("in-process OnnxClassifier", 1, batch, times, per_s))
    return out


def _client(port: int, body: bytes, expected: list, start_at: float, stop_at: float, queue) -> None:
    """One client process: requests back to back; (latencies of the timed window, errors)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"}
    latencies, errors = [], 0
    while True:
        t0 = time.perf_counter()
        if t0 >= stop_at:
            break
        conn.request("POST", f"/v2/models/{MODEL}/infer", body, headers)
        response = conn.getresponse()
        answer = json.loads(response.read())
        t1 = time.perf_counter()
        if response.status != 200 or answer["outputs"][0]["data"] != expected:
            errors += 1
        if t0 >= start_at and t1 <= stop_at:
            latencies.append(t1 - t0)
    conn.close()
    queue.put((latencies, errors))


def through_server(
    port: int,
    rows: np.ndarray,
    labels: np.ndarray,
    clients: int,
    warmup: float,
    duration: float,
    path: str = "triton-softmax serve (HTTP, JSON)",
    batches: tuple[int, ...] = BATCHES,
) -> list[dict]:
    """Requests/s and latency through the server for each batch size with ``clients`` clients."""
    out = []
    ctx = multiprocessing.get_context("fork")
    for batch in batches:
        x = rows[:batch]
        features = dict(name="features", shape=list(x.shape), datatype="FP32")
        body = json.dumps({"inputs": [features | {"data": x.ravel().tolist()}]}).encode()
        queue = ctx.Queue()
        start_at = time.perf_counter() + 0.5 + warmup  # after every client has connected
        stop_at = start_at + duration
        expected = labels[:batch].tolist()
        procs = [
            ctx.Process(target=_client, args=(port, body, expected, start_at, stop_at, queue))
            for _ in range(clients)
        ]
        for p in procs:
            p.start()
        results = [queue.get(timeout=duration + warmup + 120) for _ in procs]
        for p in procs:
            p.join()
        latencies = np.concatenate([np.asarray(r[0]) for r in results])
        errors = sum(r[1] for r in results)
        if errors:
            raise RuntimeError(
                f"{errors} wrong or failed answers ({clients} clients, batch {batch})"
            )
        out.append(_timings(path, clients, batch, latencies, round(latencies.size / duration)))
        print(
            f"  {clients:2d} clients, batch {batch:2d}: {out[-1]['requests_per_s']} requests/s, "
            f"p50 {out[-1]['p50_ms']:.3f} ms, p99 {out[-1]['p99_ms']:.3f} ms",
            flush=True,
        )
    return out


#: The floor under any Python server here: uvicorn (as KServe runs it) with a bare ASGI app that
#: reads the body and sends a fixed answer (the model's, for the first row).
BARE_APP = """
import sys, uvicorn
answer = sys.argv[1].encode()
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": answer})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", loop="asyncio")
"""


def start_server(cmd: list[str], workdir: Path) -> tuple[subprocess.Popen, int]:
    """``cmd`` followed by a free port, once it answers ``/v2/health/ready``."""
    port = common.free_port()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    log = open(workdir / "serve.log", "wb")  # noqa: SIM115 (closed when the process ends)
    process = subprocess.Popen([*cmd, str(port)], stdout=log, stderr=log, env=env)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve exited: {(workdir / 'serve.log').read_text()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v2/health/ready")
            if conn.getresponse().status == 200:
                return process, port
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("serve was not ready in time")


def run(out_dir: Path, smoke: bool) -> Path:
    """Measure in process, the bare app and the server; write the CSV and its markdown."""
    from triton_softmax.export.runtime import OnnxClassifier

    machine = common.cpu_description()
    load_start = common.load_average()
    print(f"machine: {machine}; load average {load_start:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        path, rows = prepare(workdir, epochs=SMOKE_EPOCHS if smoke else None)
        labels = OnnxClassifier(path).run(rows)[0]
        results = in_process(path, rows, SMOKE_IN_PROCESS_CALLS if smoke else IN_PROCESS_CALLS)
        answer = {"outputs": [{"name": "label", "data": labels[:1].tolist()}]}
        timing = (SMOKE_WARMUP, SMOKE_DURATION) if smoke else (WARMUP, DURATION)
        bare, port = start_server([sys.executable, "-c", BARE_APP, json.dumps(answer)], workdir)
        try:
            bare_app = dict(path="bare uvicorn app (fixed answer)", batches=(1,))
            results += through_server(port, rows, labels, 1, *timing, **bare_app)
        finally:
            bare.terminate()
            bare.wait(timeout=60)
        cmd = [sys.executable, "-m", "triton_softmax.cli", "serve", str(path), "--name", MODEL]
        process, port = start_server([*cmd, "--port"], workdir)
        try:
            for clients in SMOKE_CLIENTS if smoke else CLIENTS:
                results += through_server(port, rows, labels, clients, *timing)
        finally:
            process.terminate()
            exit_status = process.wait(timeout=60)
        if exit_status != 0:
            raise RuntimeError(f"serve exited {exit_status} on SIGTERM")
    meta = dict(
        machine=machine,
        load_avg=round(load_start, 2),
        load_avg_end=round(common.load_average(), 2),
        versions=common.versions(VERSIONS),
        smoke=smoke,
    )
    csv_path = out_dir / f"{common.stem('http_serving', False)}.csv"
    return common.write_results(csv_path, [{**r, **meta} for r in results], write_report)


def write_report(csv_path: Path) -> list[Path]:
    """``<stem>.md`` next to a CSV: ``report``."""
    return [common.write_markdown(csv_path.with_suffix(".md"), [report(csv_path)])]


def report(csv_path: Path) -> str:
    """The markdown of one CSV: how it was measured, the table, the target."""
    rows = common.read_csv(csv_path)
    r0 = rows[0]
    base = {r["batch"]: r for r in rows if r["path"].startswith("in-process")}
    in_process = base[1]["path"]
    table = [
        (
            r["path"],
            r["clients"],
            r["batch"],
            f"{r['requests_per_s']:,}",
            f"{r['requests_per_s'] * r['batch']:,}",
            f"{r['p50_ms']:.3f}",
            f"{r['p99_ms']:.3f}",
            "" if r["path"] == in_process else f"+{r['p50_ms'] - base[r['batch']]['p50_ms']:.3f}",
        )
        for r in rows
    ]
    one = next(r for r in rows if r["path"].startswith("triton-softmax") and r["batch"] == 1)
    bare = [r for r in rows if r["path"].startswith("bare")]
    added = one["p50_ms"] - base[1]["p50_ms"]
    verdict = "met" if added <= targets.HTTP_ADDED_MS else "**NOT met**"
    lines = [
        common.measured_on(r0)
        + ("; smoke run (tiny durations)" if r0["smoke"] == "True" else "")
        + ". Server and clients share the machine.",
        "",
        *common.md_table(TABLE_HEADER, table),
        "",
        f"Target (docs/design.md): the server adds ≤ {targets.HTTP_ADDED_MS:g} ms p50 to "
        f"in-process onnxruntime at batch 1 with one client: {verdict} (+{added:.3f} ms).",
    ]
    if bare:
        lines[-1] += (
            f" Of that, {bare[0]['p50_ms'] - base[1]['p50_ms']:.3f} ms is the floor of HTTP on "
            "this machine (the bare uvicorn app: client, loopback, uvicorn) and "
            f"{one['p50_ms'] - bare[0]['p50_ms']:.3f} ms FastAPI, KServe and our model class."
        )
    return "\n".join(lines)


def readme_section(results_dir: Path = common.RESULTS_DIR) -> str:
    """RESULTS.md's section ``bench:http``: each CSV's report."""
    return common.results_section(
        "Benchmarks: serving over HTTP",
        "`python -m benchmarks.serving_http` trains and exports the Iris model, times "
        "`OnnxClassifier.run` in process (one onnxruntime thread, as the server runs it) and a "
        "bare uvicorn app that sends a fixed answer (the floor of HTTP here), then starts "
        "`triton-softmax serve` on 127.0.0.1 and has 1, 8 and 32 client processes (one "
        "keep-alive connection each, JSON requests back to back, 4 s after 1 s of warm-up) send "
        "requests of 1 and 64 rows; every answer is checked. `--update-readme` rewrites this "
        "section.",
        results_dir.glob("http_serving_*.csv"),
        lambda path: [report(path)],
        "No HTTP serving numbers have been measured yet.",
    )


def main(argv: list[str] | None = None) -> int:
    """Run; with ``--update-readme`` also rewrite RESULTS.md's ``bench:http`` section."""
    ap = common.parser("serving_http", __doc__, smoke="tiny durations and client counts")
    ap.add_argument("--update-readme", action="store_true", help=f"rewrite {common.RESULTS_PAGE}")
    args = ap.parse_args(argv)
    csv_path = run(args.out, args.smoke)
    print(csv_path.with_suffix(".md").read_text())
    if args.update_readme:
        text = common.RESULTS_PAGE.read_text(encoding="utf-8")
        section = readme_section(args.out)
        common.RESULTS_PAGE.write_text(common.replace_section(text, "bench:http", section), "utf-8")
        print(f"updated {common.RESULTS_PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
