"""A real `serve` (nginx + gunicorn gevent workers + the tiny model) over HTTP.

Order matters only at the end: the kill -9 test restarts a worker, so it runs last.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from maskrcnn.model.format import FORMAT_VERSION, OLDEST_FORMAT
from maskrcnn.serve.supervisor import EXIT_REFUSED
from PIL import Image
from serving_support import DETECT, Server, encode, group_processes, rss_mb, wait_until_ready

pytestmark = pytest.mark.integration

ATTRS = "X-Amzn-SageMaker-Custom-Attributes"


def assert_valid_success(headers: dict[str, str], body: bytes) -> None:
    if headers.get("content-type", "").startswith("image/png"):
        assert Image.open(io.BytesIO(body)).format == "PNG"
    else:
        assert isinstance(json.loads(body)["predictions"], list)


def test_ping_invocations_and_formats(server: Server, sample_jpeg: bytes) -> None:
    assert server.ping() == 200
    status, headers, body = server.request(
        "POST", "/invocations", sample_jpeg, {"Content-Type": "image/jpeg", ATTRS: DETECT}
    )
    assert status == 200 and headers["content-type"] == "application/json"
    assert headers["server"] == "nginx"  # server_tokens off: no version
    instances = json.loads(body)["predictions"][0]["instances"]
    assert 1 <= len(instances) <= 5 and "counts" in instances[0]["mask"]

    status, headers, body = server.request(
        "POST",
        "/invocations",
        sample_jpeg,
        {"Content-Type": "image/jpeg", "Accept": "image/png", ATTRS: DETECT},
    )
    assert status == 200 and Image.open(io.BytesIO(body)).size == (128, 96)

    document = json.dumps({"instances": [{"image": base64.b64encode(sample_jpeg).decode()}] * 2}).encode()
    status, _, body = server.request(
        "POST",
        "/invocations",
        document,
        {"Content-Type": "application/json", ATTRS: DETECT + ",mask_format=polygon"},
    )
    predictions = json.loads(body)["predictions"]
    assert status == 200 and len(predictions) == 2 and "polygons" in predictions[0]["instances"][0]["mask"]

    status, _, body = server.request("GET", "/execution-parameters")
    assert status == 200 and json.loads(body)["MaxPayloadInMB"] == 6
    assert server.request("GET", "/nowhere")[0] == 404


def test_body_over_the_limit_is_413_from_nginx(server: Server) -> None:
    status, _headers, body = server.request(
        "POST", "/invocations", b"\0" * (6 * 1024 * 1024 + 1), {"Content-Type": "image/jpeg"}
    )
    assert status == 413 and "error" in json.loads(body)
    # Exactly at the limit passes nginx and reaches the app (as an undecodable image).
    assert server.request("POST", "/invocations", b"\0" * (6 * 1024 * 1024), {"Content-Type": "image/jpeg"})[0] == 400


def malformed_corpus(sample_rgb: np.ndarray, sample_jpeg: bytes) -> Iterator[tuple[str, bytes, dict[str, str]]]:
    """At least 50 odd requests: (name, body, headers). Generated, seeded, no files."""
    rng = random.Random(7)
    png = encode(sample_rgb, "PNG")
    jpeg = {"Content-Type": "image/jpeg"}
    yield "empty", b"", jpeg
    for size in (1, 7, 100, 5000):
        yield f"random-{size}", rng.randbytes(size), jpeg
    for fraction in (0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99):
        yield f"jpeg-cut-{fraction}", sample_jpeg[: int(len(sample_jpeg) * fraction)], jpeg
        yield f"png-cut-{fraction}", png[: int(len(png) * fraction)], {"Content-Type": "image/png"}
    for i in range(8):
        flipped = bytearray(sample_jpeg)
        for _ in range(20):
            flipped[rng.randrange(2, len(flipped))] = rng.randrange(256)
        yield f"jpeg-flipped-{i}", bytes(flipped), jpeg
    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, format="PNG")
    yield "bomb-png", bomb.getvalue(), {"Content-Type": "image/png"}
    for mode, fmt in (
        ("P", "PNG"),
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("CMYK", "JPEG"),
        ("I;16", "PNG"),
        ("L", "PNG"),
        ("1", "PNG"),
        ("RGB", "GIF"),
        ("RGB", "BMP"),
        ("RGB", "TIFF"),
        ("RGB", "WEBP"),
    ):
        image = (
            Image.fromarray(sample_rgb).convert(mode)
            if mode != "I;16"
            else Image.fromarray(sample_rgb[..., 0].astype(np.uint16) * 257)
        )
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        yield f"mode-{mode}-{fmt}", buffer.getvalue(), {"Content-Type": "application/x-image", ATTRS: DETECT}
    for width, height in ((1, 1), (1, 600), (600, 1), (3, 2)):
        yield (
            f"tiny-{width}x{height}",
            encode(np.full((height, width, 3), 90, np.uint8), "PNG"),
            {"Content-Type": "image/png", ATTRS: DETECT},
        )
    rotated = Image.fromarray(sample_rgb)
    exif = rotated.getexif()
    exif[0x0112] = 8
    buffer = io.BytesIO()
    rotated.save(buffer, format="JPEG", exif=exif)
    yield (
        "exif-rotated",
        buffer.getvalue(),
        {"Content-Type": "image/jpeg", ATTRS: DETECT, "Accept": "image/png"},
    )
    b64 = base64.b64encode(sample_jpeg).decode()
    as_json = {"Content-Type": "application/json"}
    for name, text in (
        ("json-open", "{"),
        ("json-list", "[]"),
        ("json-null", "null"),
        ("json-number-image", '{"image": 3}'),
        ("json-bad-b64", '{"image": "@@@"}'),
        ("json-b64-not-image", json.dumps({"image": base64.b64encode(b"hello").decode()})),
        ("json-empty-instances", '{"instances": []}'),
        ("json-too-many", json.dumps({"instances": [{"image": b64}] * 17})),
        ("json-deep", "[" * 5000 + "]" * 5000),
        ("json-utf16", '{"image": "x"}'.encode("utf-16").decode("latin-1")),
    ):
        yield name, text.encode("latin-1"), as_json
    for content_type in (
        "text/plain",
        "",
        "image/gif",
        "application/octet-stream",
        "multipart/form-data; b=x",
    ):
        yield f"type-{content_type or 'none'}", sample_jpeg, {"Content-Type": content_type}
    for attrs in (
        "score_threshold=7",
        "max_detections=-1",
        "mask_format=svg",
        "foo=bar",
        "=",
        ",,,x",
        "score_threshold=0.5," * 100,
    ):
        yield f"attrs-{attrs[:20]}", sample_jpeg, {"Content-Type": "image/jpeg", ATTRS: attrs}
    for accept in ("text/html", "image/jpeg", "application/xml;q=1, */*;q=0"):
        yield f"accept-{accept}", sample_jpeg, {"Content-Type": "image/jpeg", "Accept": accept}


def test_malformed_corpus_never_yields_a_5xx(server: Server, sample_rgb: np.ndarray, sample_jpeg: bytes) -> None:
    workers_before = server.worker_pids()
    corpus = list(malformed_corpus(sample_rgb, sample_jpeg))
    assert len(corpus) >= 50
    statuses: dict[str, int] = {}
    for index, (name, body, headers) in enumerate(corpus):
        status, response_headers, response = server.request("POST", "/invocations", body, headers)
        statuses[name] = status
        assert status < 500, f"{name}: {status} {response[:300]!r}"
        if status < 300:
            assert_valid_success(response_headers, response)
        if index % 10 == 0:
            assert server.ping() == 200
    for method, path in (
        ("GET", "/invocations"),
        ("PUT", "/ping"),
        ("GET", "/../etc/passwd"),
        ("DELETE", "/"),
    ):
        status = server.request(method, path)[0]
        assert 400 <= status < 500, (method, path, status)
    assert server.ping() == 200
    assert server.worker_pids() == workers_before, "a worker restarted"
    assert "Traceback" not in server.log()
    assert sum(400 <= s < 500 for s in statuses.values()) >= 40  # most of it is refused, as it should be


def run_clients(
    server: Server,
    clients: int,
    body: bytes,
    stop: threading.Event,
    results: list[int],
    attributes: Callable[[int], str],
) -> list[threading.Thread]:
    def client(seed: int) -> None:
        count = seed
        while not stop.is_set():
            count += 1
            try:
                status = server.request(
                    "POST", "/invocations", body, {"Content-Type": "image/jpeg", ATTRS: attributes(count)}
                )[0]
            except OSError:
                status = -1
            results.append(status)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    return threads


def test_soak_no_errors_and_bounded_memory(server: Server, sample_jpeg: bytes) -> None:
    """2 x workers clients for at least 60 s and 1000 requests: 0 errors, worker RSS grows < 100 MB."""
    workers = server.worker_pids()
    clients = 2 * len(workers)
    stop = threading.Event()
    results: list[int] = []
    # Alternate "return masks" and the model's defaults so both paths are exercised.
    threads = run_clients(server, clients, sample_jpeg, stop, results, lambda n: DETECT if n % 2 else "")
    time.sleep(5)  # warm-up: allocator pools, first-request paths
    rss_before = {pid: rss_mb(pid) for pid in workers}
    counted_from = len(results)
    started = time.monotonic()
    slow_pings = []
    while time.monotonic() - started < 60 or len(results) - counted_from < 1000:
        t = time.monotonic()
        assert server.ping() == 200
        if time.monotonic() - t > 2.0:
            slow_pings.append(time.monotonic() - t)
        time.sleep(1.0)
        assert time.monotonic() - started < 240, f"only {len(results) - counted_from} requests in 240 s"
    rss_after = {pid: rss_mb(pid) for pid in workers}
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    errors = [s for s in results if s != 200]
    assert not errors, f"{len(errors)} errors among {len(results)} requests: {sorted(set(errors))}"
    assert not slow_pings
    assert server.worker_pids() == workers
    growth = {pid: rss_after[pid] - rss_before[pid] for pid in workers}
    print(
        f"soak: {len(results) - counted_from} requests in {time.monotonic() - started:.0f} s; "
        f"RSS MB before {rss_before}, growth {growth}"
    )
    assert max(growth.values()) < 100, growth


def send_slow_invocation(server: Server) -> http.client.HTTPConnection:
    """Four large images in one request (seconds of CPU), fully written: in flight, not still being sent."""
    big = encode((np.random.default_rng(0).random((900, 1200, 3)) * 255).astype(np.uint8), "JPEG")
    document = json.dumps({"instances": [{"image": base64.b64encode(big).decode()}] * 4}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/invocations", document, {"Content-Type": "application/json", ATTRS: DETECT})
    time.sleep(0.3)
    return conn


def test_serve_drains_in_flight_requests_on_sigterm(
    launch: Callable[..., Server], model_base: Path, nginx_path: str
) -> None:
    server = launch(model_base, SAGEMAKER_MODEL_SERVER_WORKERS="1")
    conn = send_slow_invocation(server)
    try:
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        response = conn.getresponse()
        status = response.status
        response.read()
    finally:
        conn.close()
    code = server.process.wait(timeout=30)
    assert status == 200
    assert code == 0
    assert time.monotonic() - started < 30
    with pytest.raises(OSError):
        server.ping(timeout=1)


def assert_stopped_cleanly(server: Server, run_dir: Path, signum: int) -> None:
    """`signum` ends serve with 0 within its drain deadline, and nothing it started outlives it."""
    started = time.monotonic()
    server.process.send_signal(signum)
    assert server.process.wait(timeout=35) == 0
    assert time.monotonic() - started < 30
    assert group_processes(server.process.pid) == [], "a child of serve outlived it"
    assert not run_dir.exists(), f"{run_dir} left behind"
    assert f"received {signal.Signals(signum).name}: draining and stopping" in server.log()


def test_sighup_reloads_the_workers_without_losing_a_request(
    launch: Callable[..., Server], model_base: Path, nginx_path: str
) -> None:
    server = launch(model_base, wait=False, SAGEMAKER_MODEL_SERVER_WORKERS="1")
    # A HUP while the children are still starting: held until each one handles HUP itself, not fatal.
    time.sleep(0.5)
    server.process.send_signal(signal.SIGHUP)
    wait_until_ready(server)
    run_dir = server.run_dir()
    workers = server.worker_pids()

    conn = send_slow_invocation(server)
    try:
        server.process.send_signal(signal.SIGHUP)
        response = conn.getresponse()
        status = response.status
        response.read()
    finally:
        conn.close()
    assert status == 200

    # The old worker drains and goes; a new one loads the model. /ping answers all along (503 while
    # no worker is ready), then 200 from the new worker; serve itself never stopped.
    deadline = time.monotonic() + 90
    while True:
        ping = server.ping()  # an OSError here (nothing listening) fails the test
        assert ping in (200, 503), ping
        if ping == 200 and not set(server.worker_pids()) & set(workers):
            break
        assert time.monotonic() < deadline, "no new worker answered /ping within 90 s of SIGHUP"
        time.sleep(0.2)
    assert server.process.poll() is None
    assert server.log().count("received SIGHUP: reloading nginx and the gunicorn workers") == 2
    assert (
        server.request("POST", "/invocations", encode(np.zeros((64, 64, 3), np.uint8)), {"Content-Type": "image/jpeg"})[
            0
        ]
        == 200
    )
    assert "Traceback" not in server.log()

    assert_stopped_cleanly(server, run_dir, signal.SIGTERM)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGQUIT], ids=["INT", "QUIT"])
def test_stop_signals_stop_every_child_and_remove_the_run_dir(
    launch: Callable[..., Server], model_base: Path, nginx_path: str, signum: int
) -> None:
    server = launch(model_base, SAGEMAKER_MODEL_SERVER_WORKERS="1")
    server.process.send_signal(signal.SIGUSR1)  # ignored: its default action would orphan the children
    assert server.ping() == 200
    assert_stopped_cleanly(server, server.run_dir(), signum)


def write_model(base: Path, model_base: Path, **changes: object) -> Path:
    """A copy of the tiny model in base/model, with model.json's fields changed (None deletes a file)."""
    model_dir = base / "model"
    model_dir.mkdir()
    spec = json.loads((model_base / "model" / "model.json").read_text())
    spec.update({k: v for k, v in changes.items() if k != "weights"})
    (model_dir / "model.json").write_text(json.dumps(spec))
    (model_dir / "model.safetensors").write_bytes(
        changes.get("weights", (model_base / "model" / "model.safetensors").read_bytes())  # type: ignore[arg-type]
    )
    return model_dir


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (
            "format_version",
            "format_version 1 is not one this image loads for arch 'lite' "
            f"({OLDEST_FORMAT['lite']}-{FORMAT_VERSION}); retrain",
        ),
        ("arch", "arch 'resnet18' is not one this image builds"),
        ("no model.json", "model.json missing (found: model.safetensors)"),
        ("no weights", "model.safetensors missing (found: model.json)"),
        ("not safetensors", "model.safetensors is not a safetensors file"),
    ],
)
def test_an_unusable_model_stops_serve_at_once_with_one_code_and_one_message(
    launch: Callable[..., Server], model_base: Path, tmp_path: Path, case: str, expected: str
) -> None:
    changes: dict[str, object] = {
        "format_version": {"format_version": 1},
        "arch": {"arch": "resnet18"},
        "not safetensors": {"weights": b"\x80\x04 not a safetensors header"},
    }.get(case, {})
    model_dir = write_model(tmp_path, model_base, **changes)
    if case == "no model.json":
        (model_dir / "model.json").unlink()
    if case == "no weights":
        (model_dir / "model.safetensors").unlink()
    started = time.monotonic()
    server = launch(tmp_path, wait=False)
    assert server.process.wait(timeout=30) == EXIT_REFUSED
    assert time.monotonic() - started < 5
    log = server.log()
    assert expected in log and str(model_dir) in log, log
    assert "serve cannot start" in log.strip().splitlines()[-1]  # the last line says why
    assert "Traceback" not in log
    assert "gunicorn" not in log and "nginx" not in log  # nothing was started


def test_process_mode_without_nginx(launch: Callable[..., Server], model_base: Path, sample_jpeg: bytes) -> None:
    server = launch(model_base, MASKRCNN_NGINX="off", SAGEMAKER_MODEL_SERVER_WORKERS="1")
    assert "gunicorn listens on port" in server.log()
    assert server.request("POST", "/invocations", sample_jpeg, {"Content-Type": "image/jpeg"})[0] == 200
    status, _, body = server.request(
        "POST", "/invocations", b"\0" * (6 * 1024 * 1024 + 1), {"Content-Type": "image/jpeg"}
    )
    assert status == 413 and "error" in json.loads(body)  # the app's own limit
    assert server.request("GET", "/nope")[0] == 404


class Marker:
    """Unpickling this creates a file: proof that a pickle ran."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def pickle_bytes(marker: Path) -> bytes:
    import pickle

    return pickle.dumps({"model": Marker(marker)})


def test_pickled_weights_alone_are_refused(launch: Callable[..., Server], tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.pth").write_bytes(pickle_bytes(marker))
    server = launch(tmp_path, wait=False)
    assert server.process.wait(timeout=60) == EXIT_REFUSED
    assert "never loaded" in server.log()
    assert not marker.exists()


def test_a_pickle_dressed_as_safetensors_stops_serve(
    launch: Callable[..., Server], model_base: Path, tmp_path: Path, nginx_path: str
) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.json").write_text((model_base / "model" / "model.json").read_text())
    (tmp_path / "model" / "model.safetensors").write_bytes(pickle_bytes(marker))
    server = launch(tmp_path, wait=False)
    # serve reads the safetensors header before it starts anything: a pickle has none.
    assert server.process.wait(timeout=30) == EXIT_REFUSED
    assert "is not a safetensors file" in server.log()
    assert not marker.exists()


def test_a_stray_pickle_beside_the_model_is_ignored(
    launch: Callable[..., Server], model_base: Path, tmp_path: Path, nginx_path: str
) -> None:
    marker = tmp_path / "pwned"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("model.json", "model.safetensors"):
        (model_dir / name).write_bytes((model_base / "model" / name).read_bytes())
    for name in ("model.pth", "model.pkl", "checkpoint.pt"):
        (model_dir / name).write_bytes(pickle_bytes(marker))
    server = launch(tmp_path, SAGEMAKER_MODEL_SERVER_WORKERS="1")
    assert server.ping() == 200
    assert not marker.exists()


def test_zz_kill_9_of_a_worker_under_load_recovers(server: Server, sample_jpeg: bytes) -> None:
    workers = server.worker_pids()
    stop = threading.Event()
    results: list[int] = []
    threads = run_clients(server, len(workers), sample_jpeg, stop, results, lambda n: DETECT)
    time.sleep(2)
    os.kill(workers[0], signal.SIGKILL)
    killed_at = time.monotonic()
    while True:
        try:
            if server.ping() == 200:
                break
        except OSError:
            pass
        assert time.monotonic() - killed_at < 10, "/ping not 200 within 10 s of kill -9"
        time.sleep(0.1)
    # A replacement worker boots and takes traffic; serve itself never noticed.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        current = server.worker_pids()  # the killed pid lingers until the kernel and the master are done with it
        if workers[0] not in current and len(current) == len(workers):
            break
        time.sleep(0.2)
    replaced = server.worker_pids()
    assert len(replaced) == len(workers) and workers[0] not in replaced
    time.sleep(3)
    before = len(results)
    time.sleep(3)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert server.process.poll() is None
    assert all(s == 200 for s in results[before:]), sorted(set(results[before:]))
