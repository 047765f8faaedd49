"""``python -m local check`` on a real Docker engine: our image passes every point; a broken one fails.

    IMAGE=maskrcnn-sagemaker:latest MASKRCNN_SKIP_BUILD=1 pytest tests/image/test_check.py -rs

The first test runs the whole check (six training runs, six servers): about 2.5 minutes on 2 CPU cores;
the second the whole check on a minimal bring-your-own image (a shell `train`, an `http.server` `serve`): ~40 s;
the third only the two training rows.
"""

from __future__ import annotations

import io
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest
from tiny import TINY_HP

from local.check import (
    FAIL,
    LARGE,
    MULTI_MODEL,
    MULTI_MODEL_LABEL,
    PASS,
    SERVE_GPU,
    SKIP,
    TRAIN_GPU,
    TRAIN_SIGTERM,
    UNKNOWN,
    WARN,
    Bench,
    CheckSpec,
    check_train_v2,
    check_train_v3,
    exit_code,
    hosting_modes,
    run_check,
)

pytestmark = pytest.mark.container

# The hyperparameters docs/local.md gives for a quick check of our image.
TINY = {key: TINY_HP[key] for key in ("max_steps", "batch_size", "min_size", "max_size", "num_workers")}


def _payload(dataset: Path) -> Path:
    return sorted((dataset / "images").iterdir())[0]


@pytest.mark.timeout(900)
def test_our_image_passes_every_point(image: str, docker_client, dataset: Path) -> None:
    """Every row PASS, the serverless and asynchronous ones too; only the GPU rows SKIP here, and they say why."""
    rows = run_check(CheckSpec(image, dataset, TINY, _payload(dataset)))
    statuses = {row.point: row.status for row in rows}
    assert len(rows) == 18
    unchecked = {TRAIN_GPU, SERVE_GPU}
    if docker_client.images.get(image).labels.get(MULTI_MODEL_LABEL) != "true":
        unchecked.add(MULTI_MODEL)
    assert {p: s for p, s in statuses.items() if p not in unchecked and s != PASS} == {}, rows
    for row in rows:
        if row.point in {TRAIN_GPU, SERVE_GPU} and row.status == SKIP:
            assert "nvidia runtime" in row.evidence
    verdicts = hosting_modes(rows)
    fit = {mode for mode, (verdict, _) in verdicts.items() if verdict == "fit"}
    assert {"real-time", "batch transform", "serverless", "asynchronous"} <= fit, verdicts
    assert ("multi-model" in fit) == (MULTI_MODEL not in unchecked), verdicts
    assert exit_code(rows) == 0


# A scikit_bring_your_own-style image nobody here wrote: `train` fits at once and ignores unknown keys; `serve`
# is http.server, which takes any body of any size. Built on our image only for its Python (labels reset).
BYO_ENTRY = """#!/bin/sh
if [ "$1" = serve ]; then exec python3 /usr/local/bin/byo-serve; fi
mkdir -p /opt/ml/model && echo '{"fitted": true}' > /opt/ml/model/model.json
"""
BYO_SERVE = """import http.server, os

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.answer(200 if self.path == "/ping" else 404, b"")

    def do_POST(self):
        left = int(self.headers.get("Content-Length") or 0)
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
        self.answer(200 if self.path == "/invocations" else 404, b'{"label": "cat"}')

    def answer(self, status, body):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

port = int(os.environ.get("SAGEMAKER_BIND_TO_PORT", "8080"))
http.server.ThreadingHTTPServer(("", port), Handler).serve_forever()
"""
BYO_DOCKERFILE = """FROM {image}
COPY byo-entry byo-serve /usr/local/bin/
RUN chmod 755 /usr/local/bin/byo-entry /usr/local/bin/byo-serve
LABEL org.opencontainers.image.title=byo-scikit-style \\
    com.amazonaws.sagemaker.capabilities.accept-bind-to-port=false \\
    com.amazonaws.sagemaker.capabilities.multi-models=false
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/byo-entry"]
CMD ["train"]
"""


@pytest.fixture
def byo_image(docker_client, image: str, tmp_path: Path):
    """A minimal bring-your-own image (shell train, http.server serve), removed afterwards."""
    tag = f"contract-check-byo:{secrets.token_hex(3)}"
    (tmp_path / "Dockerfile").write_text(BYO_DOCKERFILE.format(image=image))
    (tmp_path / "byo-entry").write_text(BYO_ENTRY)
    (tmp_path / "byo-serve").write_text(BYO_SERVE)
    docker_client.images.build(path=str(tmp_path), tag=tag, rm=True)
    yield tag
    docker_client.images.remove(tag, force=True)


@pytest.mark.timeout(600)
def test_a_minimal_byo_image_gets_sound_verdicts(byo_image: str, dataset: Path) -> None:
    """What a user of another image would dispute is not a FAIL: a job that ends before SIGTERM is untested
    (SKIP), ignoring unknown hyperparameters and accepting bodies over 6 MiB are WARNs of our house rules; the
    exit code is 0 and the image is fit for real-time, batch, serverless and asynchronous endpoints."""
    rows = run_check(CheckSpec(byo_image, dataset, {"epochs": "1"}, _payload(dataset)))
    by_point = {row.point: row for row in rows}
    assert by_point[TRAIN_SIGTERM].status == SKIP and "before it could be stopped" in by_point[TRAIN_SIGTERM].evidence
    assert (by_point[UNKNOWN].status, by_point[UNKNOWN].kind) == (WARN, "advice")
    assert (by_point[LARGE].status, by_point[LARGE].kind) == (WARN, "advice")
    assert by_point[MULTI_MODEL].status == SKIP
    assert [row for row in rows if row.status == FAIL] == []
    assert exit_code(rows) == 0
    fit = {mode for mode, (verdict, _) in hosting_modes(rows).items() if verdict == "fit"}
    assert fit == {"real-time", "batch transform", "serverless", "asynchronous"}, rows


@pytest.fixture
def old_entrypoint_image(docker_client, image: str):
    """Our image with the entrypoint it had before SDK v3: tini alone, no default command."""
    tag = f"contract-check-old-entrypoint:{secrets.token_hex(3)}"
    dockerfile = f'FROM {image}\nENTRYPOINT ["/usr/bin/tini", "--"]\n'  # also resets CMD
    docker_client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True)
    yield tag
    docker_client.images.remove(tag, force=True)


@pytest.mark.timeout(300)
def test_image_that_needs_an_argument_fails_the_v3_row(docker_client, old_entrypoint_image: str, dataset: Path) -> None:
    """SDK v3 starts training with no argument: such an image FAILs that row; `docker run IMAGE train` still PASSes.

    Only the two training rows run (the whole check is the test above; how rows become the exit code is a
    unit test): the same Bench and row functions as ``python -m local check``.
    """
    spec = CheckSpec(old_entrypoint_image, dataset, TINY, _payload(dataset))
    bench = Bench(docker_client, spec, Path(tempfile.mkdtemp(prefix="contract-check-")))
    try:
        v3 = check_train_v3(bench, bench.path("train-v3"))
        v2 = check_train_v2(bench, bench.path("train-v2"))
    finally:
        bench.close()
        shutil.rmtree(bench.workdir, ignore_errors=True)
    assert v3.status == FAIL, v3
    assert v2.status == PASS, v2
    assert exit_code([v2, v3]) == 1
