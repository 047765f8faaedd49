"""``python -m local check``: an image against the SageMaker container contract, one row per point.

    python -m local check --image TAG --data DIR [--payload FILE [--content-type TYPE]] [--hp KEY=VALUE ...]

Any image, ours or a bring-your-own one: the check starts it the ways SageMaker and both generations of the
SageMaker Python SDK start it (shared/CONTRACT.md), on a Docker engine, and prints PASS / FAIL / SKIP with
short evidence per point. A PASS means those clients will work with the image; a SKIP says why the point
could not be checked here (no GPU, no ``--payload``, a label the image does not carry).

Each row is of one of two kinds, shown in the table. **contract**: what SageMaker requires of the image for a
hosting mode (shared/CONTRACT.md); broken, the row FAILs. **advice**: what we recommend and SageMaker does
not enforce (our house rules: refuse unknown hyperparameters, refuse bodies SageMaker's real-time front end
would refuse anyway); broken, the row WARNs. The exit code is 1 only when a row FAILed. A closing line says
which hosting modes (real-time, batch transform, serverless, asynchronous, multi-model) the image is fit for,
from the rows each mode needs (:data:`MODE_POINTS`).

* Training: ``train`` as the argument with hyperparameters as SDK v2 writes them (``str(v)``), and no
  argument at all with SDK v3's encoding (``json.dumps(v)``, strings as they are) and its
  ``network_interface_name`` ``ethwe``; a model under /opt/ml/model; an unknown hyperparameter should leave
  /opt/ml/output/failure and a non-zero exit (advice); SIGTERM must end the job within 120 s (SKIP when the job
  ended before it could be stopped); two hosts ``algo-1``
  and ``algo-2`` on one user-defined network (container names ``algo-N-xxxxx`` as SDK v2's compose file
  has them; the first container to exit stops the other, as its ``--abort-on-container-exit`` does) must
  both exit 0 with a model written.
* Serving: the model the ``train`` run wrote, packed and unpacked into /opt/ml/model as SageMaker does,
  served with ``serve``: /ping within the start-up budget; every ping under 2 s while invocations run;
  ``--payload`` on /invocations answered 2xx; /execution-parameters in the documented spelling (SKIP on
  404); ``SAGEMAKER_BIND_TO_PORT`` honoured when the image carries the accept-bind-to-port label; a body
  over 6 MiB refused with a 4xx, the server still healthy (advice: SageMaker's real-time front end refuses
  it before the container, and asynchronous inference needs the opposite); SIGTERM ends it within 30 s.
* Other hosting modes, each in a container of its own: serverless's read-only root file system (``docker run
  --read-only --tmpfs /tmp``, the model mounted read-only, serverless's largest memory) answering /ping and
  ``--payload``; asynchronous inference's large bodies (a 20-MB PNG or JPEG made from ``--payload``'s type,
  with ``SAGEMAKER_MAX_PAYLOAD_IN_MB`` raised) answered 2xx; the multi-model API (SKIP unless the image
  carries the label ``com.amazonaws.sagemaker.capabilities.multi-models=true``): /ping with no model, load,
  409 on a second load, list, get, invoke, unload, 404 after.

``--hp`` picks the hyperparameters of every training run (keep them tiny: the check trains six times).
Keep them the image's own names; the check adds only an unknown key for the failure row. For images it
knows by their ``org.opencontainers.image.title`` label (:data:`KNOWN_IMAGES`) the SIGTERM row trains
long enough to be stopped mid-loop and expects a checkpoint; other images get SIGTERM after
:data:`SIGTERM_AFTER_S` of training (SKIP when their training ended before).
"""

from __future__ import annotations

import ast
import json
import logging
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from maskrcnn.contract import SERVE_PORT

from local import client
from local.artifacts import extract_archive, pack_dir
from local.errors import EndpointError, HarnessError
from local.layout import JobSpec, write_host_tree
from local.runtime import SHM_SIZE

log = logging.getLogger(__name__)

PASS, FAIL, WARN, SKIP = "PASS", "FAIL", "WARN", "SKIP"
CONTRACT, ADVICE = "contract", "advice"  # a broken contract row FAILs; a broken advice row WARNs
TRAIN_TIMEOUT_S = 900.0  # one training run of the user's (tiny) hyperparameters
TRAIN_STOP_S = 120.0  # StopTrainingJob: SIGTERM, SIGKILL 120 s later
SERVE_STOP_S = 30.0  # an endpoint: SIGTERM, SIGKILL 30 s later
STARTUP_S = 240.0  # /ping must pass within minutes (4 in the older docs; the newer allow 8)
PING_LIMIT_S = 2.0  # each ping must answer within 2 s
MAX_PAYLOAD = 6 * 1024 * 1024  # real-time request limit: 6291456 bytes
SIGTERM_AFTER_S = 5.0  # an unknown image is stopped this long after it starts: short jobs end soon after
COMPOSE_STOP_S = 10.0  # docker compose's stop timeout (--abort-on-container-exit)
BIND_PORT = 8123  # SAGEMAKER_BIND_TO_PORT for the bind-to-port row: anything but 8080
UNKNOWN_HP = "contract_check_no_such_hyperparameter"
TITLE_LABEL = "org.opencontainers.image.title"
BIND_LABEL = "com.amazonaws.sagemaker.capabilities.accept-bind-to-port"
MULTI_MODEL_LABEL = "com.amazonaws.sagemaker.capabilities.multi-models"
SERVERLESS_MEMORY = "6144m"  # serverless's largest memory size: an image that needs more cannot run there
LARGE_BODY = 20 * 1024 * 1024  # an asynchronous-inference body (S3 objects up to 1 GB)
LARGE_LIMIT_MB = 64  # SAGEMAKER_MAX_PAYLOAD_IN_MB for the large-body row

# The rows, in the order they are checked and printed.
TRAIN_V2 = "train: `train` argument (SDK v2), v2 hyperparameters"
TRAIN_V3 = "train: no argument (SDK v3), v3 hyperparameters"
MODEL = "train: a model under /opt/ml/model"
UNKNOWN = "train: unknown hyperparameter -> failure file, exit != 0 (house rule)"
TRAIN_SIGTERM = f"train: SIGTERM -> exit within {TRAIN_STOP_S:.0f} s"
TWO_HOSTS = "train: two hosts algo-1, algo-2"
TRAIN_GPU = "train: GPU (--gpus all)"
PING = f"serve: /ping 200 within {STARTUP_S:.0f} s"
INVOKE = "serve: /invocations with --payload -> 2xx"
PING_BUSY = f"serve: each /ping < {PING_LIMIT_S:.0f} s while invocations run"
EXECUTION_PARAMETERS = "serve: /execution-parameters spelling"
LARGE = "serve: body over 6 MiB -> 4xx by default, server healthy"
SERVE_SIGTERM = f"serve: SIGTERM -> exit within {SERVE_STOP_S:.0f} s"
BIND = "serve: SAGEMAKER_BIND_TO_PORT honoured"
SERVE_GPU = "serve: GPU (--gpus all)"
READ_ONLY = "serverless: --read-only --tmpfs /tmp, /ping and --payload"
LARGE_OK = f"asynchronous: 20-MB body, SAGEMAKER_MAX_PAYLOAD_IN_MB={LARGE_LIMIT_MB} -> 2xx"
MULTI_MODEL = "multi-model: load, 409, list, get, invoke, unload, 404"

# Rows whose failure is a recommendation broken (WARN), not the contract (FAIL).
ADVICE_POINTS = frozenset({UNKNOWN, LARGE})
# The rows each hosting mode needs: the image is fit for a mode when all of them PASS.
REAL_TIME_POINTS = (PING, INVOKE, PING_BUSY, SERVE_SIGTERM)
MODE_POINTS: dict[str, tuple[str, ...]] = {
    "real-time": REAL_TIME_POINTS,
    "batch transform": REAL_TIME_POINTS,
    "serverless": (*REAL_TIME_POINTS, READ_ONLY),
    "asynchronous": (*REAL_TIME_POINTS, LARGE_OK),
    "multi-model": (MULTI_MODEL,),
}


@dataclass(frozen=True)
class StopProbe:
    """How the SIGTERM row stops a known image mid-training and what the stop must leave behind."""

    hyperparameters: Mapping[str, str]  # overrides that keep the job training until it is stopped
    running_line: str  # a log line that says the training loop runs
    checkpoint: bool  # a checkpoint in /opt/ml/checkpoints after the stop


KNOWN_IMAGES = {
    "maskrcnn-sagemaker": StopProbe(
        {"max_steps": "1000000", "epochs": "1000", "log_every": "1", "checkpoint_every": "0"}, "phase=train", True
    ),
}


@dataclass(frozen=True)
class Row:
    point: str
    status: str  # PASS | FAIL | WARN | SKIP
    evidence: str

    @property
    def kind(self) -> str:
        return ADVICE if self.point in ADVICE_POINTS else CONTRACT


def graded(row: Row) -> Row:
    """An advice row that failed WARNs: the image breaks a recommendation of ours, not SageMaker's contract."""
    if row.kind == ADVICE and row.status == FAIL:
        return Row(row.point, WARN, row.evidence)
    return row


@dataclass(frozen=True)
class CheckSpec:
    """What ``python -m local check`` was asked to check."""

    image: str
    data: Path
    hyperparameters: Mapping[str, str] = field(default_factory=dict)
    payload: Path | None = None
    content_type: str | None = None

    def check(self) -> None:
        if not Path(self.data).is_dir():
            raise HarnessError(f"--data {self.data} is not a folder")
        if self.payload is not None:
            if not Path(self.payload).is_file():
                raise HarnessError(f"--payload {self.payload} is not a file")
            client.content_type_for(Path(self.payload), self.content_type)  # unknown suffix: say so now


def v3_encoding(hyperparameters: Mapping[str, str]) -> dict[str, str]:
    """The same values as SDK v3 writes them: strings as they are, everything else ``json.dumps``.

    ``--hp`` values are what SDK v2's ``str(v)`` gives (``True``, ``0.01``, ``[1, 2]``), so they are read
    back as Python literals; what is not one is a string.
    """
    out = {}
    for key, text in hyperparameters.items():
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            value = text
        out[key] = value if isinstance(value, str) else json.dumps(value)
    return out


def exit_code(rows: list[Row]) -> int:
    return 1 if any(row.status == FAIL for row in rows) else 0


def hosting_modes(rows: list[Row]) -> dict[str, tuple[str, str]]:
    """Each hosting mode's verdict from the rows it needs: ``fit``, ``not fit`` or ``not shown``, and why."""
    by_point = {row.point: row for row in rows}
    verdicts: dict[str, tuple[str, str]] = {}
    for mode, points in MODE_POINTS.items():
        needed = [by_point[p] for p in points if p in by_point]
        failed = [row for row in needed if row.status in (FAIL, WARN)]
        skipped = [row for row in needed if row.status == SKIP]
        if len(needed) < len(points):
            verdicts[mode] = ("not shown", "not checked")
        elif failed:
            verdicts[mode] = ("not fit", failed[0].point)
        elif skipped:
            verdicts[mode] = ("not shown", skipped[0].evidence)
        else:
            verdicts[mode] = ("fit", "")
    return verdicts


def render_modes(rows: list[Row]) -> str:
    """One line: the hosting modes the image is fit for, then the others with the row that decided."""
    verdicts = hosting_modes(rows)
    fit = [mode for mode, (verdict, _) in verdicts.items() if verdict == "fit"]
    others = [f"{mode} {verdict} ({why})" for mode, (verdict, why) in verdicts.items() if verdict != "fit"]
    return f"hosting modes: fit for {', '.join(fit) or 'none'}" + (f"; {'; '.join(others)}" if others else "")


def render_table(rows: list[Row]) -> str:
    """A plain-text table: point, kind (contract or advice), result, evidence; a count; the hosting modes."""
    width = max([len("point"), *(len(row.point) for row in rows)])
    lines = [f"{'point':<{width}}  kind      result  evidence", f"{'-' * width}  --------  ------  --------"]
    lines += [f"{row.point:<{width}}  {row.kind:<8}  {row.status:<6}  {row.evidence}" for row in rows]
    counts = {status: sum(row.status == status for row in rows) for status in (PASS, FAIL, WARN, SKIP)}
    lines.append(
        f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[WARN]} warned, {counts[SKIP]} skipped "
        "(FAIL: SageMaker's contract broken, sets the exit code; WARN: a recommendation of ours)"
    )
    lines.append(render_modes(rows))
    return "\n".join(lines)


def _last_line(text: str, limit: int = 100) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "(no output)")[:limit]


@dataclass
class Run:
    """A finished container: exit code (None: still running at the deadline), logs, seconds."""

    code: int | None
    logs: str
    seconds: float


class Bench:
    """The Docker engine, the image and a scratch folder: /opt/ml trees, containers, networks, all removed."""

    def __init__(self, docker_client: Any, spec: CheckSpec, workdir: Path):
        self.docker = docker_client
        self.spec = spec
        self.workdir = workdir
        self.suffix = secrets.token_hex(3)
        self.labels: dict[str, str] = docker_client.images.get(spec.image).labels or {}
        self._containers: list[Any] = []
        self._networks: list[Any] = []

    @property
    def stop_probe(self) -> StopProbe | None:
        return KNOWN_IMAGES.get(self.labels.get(TITLE_LABEL, ""))

    def tree(self, base: Path, hyperparameters: Mapping[str, str], hosts: int = 1) -> Path:
        """A fresh /opt/ml tree at ``base`` (named after its host) with the ``training`` channel."""
        spec = JobSpec("contract-check", {"training": self.spec.data}, dict(hyperparameters), hosts)
        spec.check()
        write_host_tree(base, spec, base.name if hosts > 1 else "algo-1")
        return base

    def path(self, run: str, host: str = "algo-1") -> Path:
        return self.workdir / run / host

    def start(self, command: str | None, mounts: Mapping[Path, str], mode: str = "rw", **kwargs: Any) -> Any:
        container = self.docker.containers.run(
            self.spec.image,
            command,
            detach=True,
            volumes={str(host): {"bind": target, "mode": mode} for host, target in mounts.items()},
            shm_size=SHM_SIZE,
            **kwargs,
        )
        self._containers.append(container)
        return container

    def train(self, command: str | None, tree: Path, **kwargs: Any) -> Any:
        """``docker run IMAGE [command]`` with ``tree`` at /opt/ml and TRAINING_JOB_NAME set, detached."""
        env = {"TRAINING_JOB_NAME": f"contract-check-{tree.parent.name}-{self.suffix}"}
        return self.start(command, {tree: "/opt/ml"}, environment=env, **kwargs)

    def wait(self, container: Any, timeout: float) -> Run:
        started = time.monotonic()
        try:
            code: int | None = int(container.wait(timeout=timeout)["StatusCode"])
        except Exception:  # requests' ReadTimeout / ConnectionError: still running at the deadline
            code = None
        return Run(code, container.logs().decode(errors="replace"), time.monotonic() - started)

    def run_training(self, command: str | None, tree: Path, **kwargs: Any) -> Run:
        return self.wait(self.train(command, tree, **kwargs), TRAIN_TIMEOUT_S)

    def network(self) -> Any:
        net = self.docker.networks.create(f"contract-check-{self.suffix}", driver="bridge")
        self._networks.append(net)
        return net

    def close(self) -> None:
        for container in self._containers:
            with suppress(Exception):  # already gone
                container.remove(force=True)
        for net in self._networks:
            with suppress(Exception):
                net.remove()


def _model_files(tree: Path) -> list[Path]:
    model = tree / "model"
    return sorted(p for p in model.rglob("*") if p.is_file()) if model.is_dir() else []


def _failure(tree: Path) -> str:
    path = tree / "output" / "failure"
    return path.read_text(errors="replace").strip() if path.is_file() else ""


def _train_row(point: str, run: Run, tree: Path) -> Row:
    if run.code is None:
        return Row(point, FAIL, f"still running after {TRAIN_TIMEOUT_S:.0f} s")
    if run.code != 0:
        reason = _failure(tree) or _last_line(run.logs)
        return Row(point, FAIL, f"exit {run.code}: {_last_line(reason)}")
    return Row(point, PASS, f"exit 0 in {run.seconds:.0f} s")


# ---- training -------------------------------------------------------------------------------------------


def check_train_v2(bench: Bench, tree: Path) -> Row:
    """SageMaker and SDK v2: ``docker run IMAGE train``, hyperparameters as ``str(v)``."""
    bench.tree(tree, bench.spec.hyperparameters)
    row = _train_row(TRAIN_V2, bench.run_training("train", tree), tree)
    return Row(row.point, row.status, f"{row.evidence}; {json.dumps(dict(bench.spec.hyperparameters))}"[:160])


def check_train_v3(bench: Bench, tree: Path) -> Row:
    """SDK v3's local mode: no command at all, ``json.dumps`` hyperparameters, interface ``ethwe``."""
    hyperparameters = v3_encoding(bench.spec.hyperparameters)
    bench.tree(tree, hyperparameters)
    config = tree / "input" / "config" / "resourceconfig.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "network_interface_name": "ethwe"}))
    row = _train_row(TRAIN_V3, bench.run_training(None, tree), tree)
    if row.status == PASS and not _model_files(tree):
        row = Row(row.point, FAIL, "exit 0 but nothing in /opt/ml/model")
    return Row(row.point, row.status, f"{row.evidence}; {json.dumps(hyperparameters)}"[:160])


def check_model(tree: Path, trained: bool) -> Row:
    point = MODEL
    if not trained:
        return Row(point, SKIP, "the `train` run failed")
    files = _model_files(tree)
    if not files:
        return Row(point, FAIL, "/opt/ml/model is empty after exit 0")
    size = sum(p.stat().st_size for p in files)
    names = ", ".join(str(p.relative_to(tree / "model")) for p in files[:3])
    return Row(point, PASS, f"{len(files)} file(s), {size / 1e6:.1f} MB: {names}")


def check_unknown_hyperparameter(bench: Bench) -> Row:
    point = UNKNOWN
    tree = bench.tree(bench.path("unknown-hp"), {**bench.spec.hyperparameters, UNKNOWN_HP: "1"})
    run = bench.run_training("train", tree)
    reason = _failure(tree)
    if run.code is None:
        return Row(point, FAIL, f"still running after {TRAIN_TIMEOUT_S:.0f} s")
    if run.code == 0:
        return Row(point, FAIL, f"exit 0 with {UNKNOWN_HP}=1")
    if not reason:
        return Row(point, FAIL, f"exit {run.code} but /opt/ml/output/failure is missing or empty")
    return Row(point, PASS, f"exit {run.code}; failure: {_last_line(reason.splitlines()[0], 80)}")


def _wait_running(container: Any, probe: StopProbe | None) -> bool:
    """Until the job trains (the probe's log line, else SIGTERM_AFTER_S of running); False when it exited."""
    deadline = time.monotonic() + (TRAIN_TIMEOUT_S if probe else SIGTERM_AFTER_S)
    while time.monotonic() < deadline:
        container.reload()
        if container.status == "exited":
            return False
        if probe and probe.running_line in container.logs().decode(errors="replace"):
            return True
        time.sleep(1.0)
    return probe is None


def check_train_sigterm(bench: Bench) -> Row:
    point = TRAIN_SIGTERM
    probe = bench.stop_probe
    tree = bench.tree(bench.path("sigterm"), {**bench.spec.hyperparameters, **(probe.hyperparameters if probe else {})})
    container = bench.train("train", tree)
    delivered = False
    if _wait_running(container, probe):
        try:
            container.kill(signal="SIGTERM")
            delivered = True
        except Exception:  # the Docker API refuses (409) a container that exited in the meantime
            log.debug("SIGTERM not delivered", exc_info=True)
    if not delivered:
        return _ended_before_stop(point, bench.wait(container, 10))
    run = bench.wait(container, TRAIN_STOP_S)
    if run.code is None:
        return Row(point, FAIL, f"still running {TRAIN_STOP_S:.0f} s after SIGTERM (SageMaker would SIGKILL)")
    evidence = f"exit {run.code} {run.seconds:.1f} s after SIGTERM"
    if probe and probe.checkpoint:
        checkpoints = sorted(p.name for p in (tree / "checkpoints").rglob("*") if p.is_file())
        if not checkpoints:
            return Row(point, FAIL, f"{evidence}, but nothing in /opt/ml/checkpoints")
        evidence += f", checkpoint {', '.join(checkpoints[:2])}"
    return Row(point, PASS, evidence)


def _ended_before_stop(point: str, run: Run) -> Row:
    """The job exited before SIGTERM reached it: nothing was shown about stopping (SKIP), unless it failed."""
    if run.code == 0:
        return Row(
            point, SKIP, "the job ended (exit 0) before it could be stopped: untested; give --hp that train longer"
        )
    if run.code is None:
        return Row(point, FAIL, f"no training line within {TRAIN_TIMEOUT_S:.0f} s: {_last_line(run.logs)}")
    return Row(point, FAIL, f"exit {run.code} before it was stopped: {_last_line(run.logs)}")


def check_two_hosts(bench: Bench) -> Row:
    """algo-1 and algo-2 on one user-defined network, as SDK v2's compose file runs them."""
    point = TWO_HOSTS
    hosts = ["algo-1", "algo-2"]
    net = bench.network()
    trees = {host: bench.tree(bench.path("two-hosts", host), bench.spec.hyperparameters, hosts=2) for host in hosts}
    containers = {}
    for host in hosts:
        networking = {net.name: bench.docker.api.create_endpoint_config(aliases=[host])}
        containers[host] = bench.train(
            "train",
            trees[host],
            name=f"{host}-{bench.suffix}",
            hostname=host,
            network=net.name,
            networking_config=networking,
        )
    first, deadline = None, time.monotonic() + TRAIN_TIMEOUT_S
    while first is None and time.monotonic() < deadline:
        for host, container in containers.items():
            container.reload()
            if container.status == "exited":
                first = host
                break
        time.sleep(1.0)
    for container in containers.values():  # --abort-on-container-exit: the first exit stops the rest
        with suppress(Exception):
            container.stop(timeout=COMPOSE_STOP_S)
    runs = {host: bench.wait(container, 30) for host, container in containers.items()}
    codes = ", ".join(f"{host} exit {runs[host].code}" for host in hosts)
    if first is None:
        return Row(point, FAIL, f"no host exited within {TRAIN_TIMEOUT_S:.0f} s")
    bad = [host for host in hosts if runs[host].code != 0]
    if bad:
        why = _failure(trees[bad[0]]) or _last_line(runs[bad[0]].logs)
        return Row(point, FAIL, f"{codes} ({first} exited first); {bad[0]}: {_last_line(why, 80)}")
    if not _model_files(trees["algo-1"]):
        return Row(point, FAIL, f"{codes}, but algo-1 wrote nothing in /opt/ml/model")
    return Row(point, PASS, f"{codes}; model written by algo-1")


def gpu_missing(bench: Bench) -> str | None:
    """Why GPU rows cannot run here, or None when the engine has the NVIDIA runtime."""
    runtimes = bench.docker.info().get("Runtimes", {})
    if "nvidia" not in runtimes:
        return f"no GPU: no nvidia runtime in the Docker engine (runtimes: {', '.join(sorted(runtimes))})"
    return None


def _gpus() -> list[Any]:
    import docker

    return [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]


def check_train_gpu(bench: Bench) -> Row:
    why = gpu_missing(bench)
    if why:
        return Row(TRAIN_GPU, SKIP, why)
    tree = bench.tree(bench.path("gpu"), bench.spec.hyperparameters)
    row = _train_row(TRAIN_GPU, bench.run_training("train", tree, device_requests=_gpus()), tree)
    if row.status == PASS and not _model_files(tree):
        return Row(TRAIN_GPU, FAIL, "exit 0 but nothing in /opt/ml/model")
    return row


# ---- serving --------------------------------------------------------------------------------------------


@dataclass
class Server:
    container: Any
    url: str
    ready_s: float | None  # seconds to the first healthy /ping; None: never healthy


@contextmanager
def serving(
    bench: Bench,
    model: Path | None,
    port: int = SERVE_PORT,
    env: Mapping[str, str] | None = None,
    mounts: Mapping[Path, str] | None = None,
    **kwargs: Any,
) -> Iterator[Server]:
    """``docker run IMAGE serve`` with ``model`` at /opt/ml/model and ``port`` published on 127.0.0.1."""
    ports = {f"{port}/tcp": ("127.0.0.1", None)}
    volumes = {**({model: "/opt/ml/model"} if model is not None else {}), **(mounts or {})}
    container = bench.start("serve", volumes, environment=dict(env or {}), ports=ports, **kwargs)
    container.reload()
    host_port = container.attrs["NetworkSettings"]["Ports"][f"{port}/tcp"][0]["HostPort"]
    server = Server(container, f"http://127.0.0.1:{host_port}", None)
    started = time.monotonic()
    while time.monotonic() - started < STARTUP_S:
        if client.ping(server.url, timeout=PING_LIMIT_S):
            server.ready_s = time.monotonic() - started
            break
        container.reload()
        if container.status == "exited":
            break
        time.sleep(0.5)
    try:
        yield server
    finally:
        with suppress(Exception):
            container.remove(force=True)


def _not_ready(point: str, server: Server) -> Row:
    server.container.reload()
    logs = server.container.logs().decode(errors="replace")
    if server.container.status == "exited":
        return Row(point, FAIL, f"serve exited {server.container.attrs['State']['ExitCode']}: {_last_line(logs)}")
    return Row(point, FAIL, f"no healthy /ping within {STARTUP_S:.0f} s: {_last_line(logs)}")


def check_ping(server: Server) -> Row:
    point = PING
    if server.ready_s is None:
        return _not_ready(point, server)
    return Row(point, PASS, f"healthy after {server.ready_s:.1f} s")


def _invoke(url: str, body: bytes, content_type: str) -> client.Reply:
    # Only Content-Type, as a caller that sets no Accept: SageMaker passes Accept only when the caller does.
    return client.request("POST", client.base_url(url) + "/invocations", body, {"Content-Type": content_type})


def check_invocation(server: Server, payload: bytes | None, content_type: str | None) -> Row:
    point = INVOKE
    if payload is None or content_type is None:
        return Row(point, SKIP, "no --payload given")
    try:
        started = time.monotonic()
        reply = _invoke(server.url, payload, content_type)
    except EndpointError as exc:
        return Row(point, FAIL, str(exc)[:120])
    seconds = time.monotonic() - started
    evidence = f"HTTP {reply.status} {reply.content_type or '(no type)'}, {len(reply.body)} bytes in {seconds:.1f} s"
    if not reply.ok:
        return Row(point, FAIL, f"{evidence}: {reply.message()[:80]}")
    return Row(point, PASS, evidence)


def check_ping_while_invoking(server: Server, payload: bytes | None, content_type: str | None) -> Row:
    point = PING_BUSY
    if payload is None or content_type is None:
        return Row(point, SKIP, "no --payload given")
    busy = threading.Event()
    done = threading.Event()

    def invoke_a_few() -> None:
        busy.set()
        for _ in range(3):
            with suppress(EndpointError):
                _invoke(server.url, payload, content_type)
        done.set()

    threading.Thread(target=invoke_a_few, daemon=True).start()
    busy.wait()
    latencies: list[float] = []
    while not done.is_set():
        started = time.monotonic()
        try:
            ok = client.request("GET", server.url + "/ping", timeout=PING_LIMIT_S).ok
        except EndpointError:
            ok = False
        elapsed = time.monotonic() - started
        if not ok:
            return Row(point, FAIL, f"a /ping failed or took over {PING_LIMIT_S:.0f} s ({elapsed:.1f} s)")
        latencies.append(elapsed)
        time.sleep(0.1)
    if not latencies:
        return Row(point, SKIP, "the invocations ended before a ping could be sent")
    return Row(point, PASS, f"{len(latencies)} pings during 3 invocations, slowest {max(latencies):.2f} s")


def check_execution_parameters(server: Server) -> Row:
    point = EXECUTION_PARAMETERS
    try:
        reply = client.request("GET", server.url + "/execution-parameters", timeout=10.0)
    except EndpointError as exc:
        return Row(point, FAIL, str(exc)[:120])
    if reply.status == 404:
        return Row(point, SKIP, "404: the image has no /execution-parameters (optional)")
    try:
        data = reply.json()
    except ValueError:
        data = None
    if not reply.ok or not isinstance(data, dict):
        return Row(point, FAIL, f"HTTP {reply.status}, not a JSON object: {reply.body[:60]!r}")
    problems = []
    if data.get("BatchStrategy") not in ("SINGLE_RECORD", "MULTI_RECORD"):
        problems.append(f"BatchStrategy {data.get('BatchStrategy')!r} is not SINGLE_RECORD / MULTI_RECORD")
    for key in ("MaxConcurrentTransforms", "MaxPayloadInMB"):
        if not isinstance(data.get(key), int) or data[key] < 1:
            problems.append(f"{key} {data.get(key)!r} is not a positive integer")
    if problems:
        return Row(point, FAIL, "; ".join(problems))
    return Row(point, PASS, json.dumps(data))


def check_large_payload(server: Server, content_type: str | None) -> Row:
    point = LARGE
    body = b"\0" * (MAX_PAYLOAD + 1)
    try:
        reply = _invoke(server.url, body, content_type or "application/octet-stream")
        status = f"HTTP {reply.status}"
        refused = 400 <= reply.status < 500
    except EndpointError as exc:  # the server closed the connection without an answer
        status, refused = f"no answer ({_last_line(str(exc), 60)})", False
    alive = client.ping(server.url, timeout=PING_LIMIT_S)
    evidence = f"{MAX_PAYLOAD + 1} bytes: {status}; /ping afterwards {'200' if alive else 'failed'}"
    return Row(point, PASS if refused and alive else FAIL, evidence)


def check_bind_to_port(bench: Bench, model: Path) -> Row:
    point = BIND
    if bench.labels.get(BIND_LABEL) != "true":
        return Row(point, SKIP, f"the image has no label {BIND_LABEL}=true")
    with serving(bench, model, BIND_PORT, {"SAGEMAKER_BIND_TO_PORT": str(BIND_PORT)}) as server:
        if server.ready_s is None:
            return _not_ready(point, server)
        return Row(point, PASS, f"/ping 200 on port {BIND_PORT} after {server.ready_s:.1f} s")


def check_serve_sigterm(server: Server) -> Row:
    point = SERVE_SIGTERM
    started = time.monotonic()
    server.container.kill(signal="SIGTERM")
    try:
        code = server.container.wait(timeout=SERVE_STOP_S)["StatusCode"]
    except Exception:
        return Row(point, FAIL, f"still running {SERVE_STOP_S:.0f} s after SIGTERM (SageMaker would SIGKILL)")
    return Row(point, PASS, f"exit {code} {time.monotonic() - started:.1f} s after SIGTERM")


def check_serve_gpu(bench: Bench, model: Path, payload: bytes | None, content_type: str | None) -> Row:
    why = gpu_missing(bench)
    if why:
        return Row(SERVE_GPU, SKIP, why)
    with serving(bench, model, device_requests=_gpus()) as server:
        if server.ready_s is None:
            return _not_ready(SERVE_GPU, server)
        row = check_invocation(server, payload, content_type)
        return Row(SERVE_GPU, row.status, f"/ping 200 after {server.ready_s:.1f} s; {row.evidence}")


def check_read_only(bench: Bench, model: Path, payload: bytes | None, content_type: str | None) -> Row:
    """Serverless: the root file system read-only but /tmp, the model read-only, serverless's largest memory."""
    point = READ_ONLY
    flags: dict[str, Any] = {"read_only": True, "tmpfs": {"/tmp": ""}, "mem_limit": SERVERLESS_MEMORY, "mode": "ro"}
    with serving(bench, model, **flags) as server:
        if server.ready_s is None:
            return _not_ready(point, server)
        evidence = f"/ping 200 after {server.ready_s:.1f} s"
        if payload is None or content_type is None:
            return Row(point, PASS, f"{evidence}; no --payload given, /invocations not tried")
        row = check_invocation(server, payload, content_type)
        return Row(point, row.status, f"{evidence}; {row.evidence}")


def large_body(content_type: str | None, size: int = LARGE_BODY) -> bytes | None:
    """A PNG or JPEG of noise (incompressible) at least ``size`` bytes, in ``content_type``; None for other types."""
    import io

    import numpy as np
    from PIL import Image

    formats = {"image/png": "PNG", "application/x-image": "PNG", "image/jpeg": "JPEG"}
    fmt = formats.get((content_type or "").split(";")[0].strip().lower())
    if fmt is None:
        return None
    side = int((size / 3) ** 0.5) + 16  # three bytes a pixel, PNG's and JPEG's (quality 100) size of noise
    while True:
        pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(
            buffer, format=fmt, **({"quality": 100, "subsampling": 0} if fmt == "JPEG" else {})
        )
        if buffer.tell() >= size:
            return buffer.getvalue()
        side = int(side * (size / buffer.tell()) ** 0.5) + 16


def check_large_body(bench: Bench, model: Path, content_type: str | None) -> Row:
    """Asynchronous inference posts the whole S3 object: a 20-MB image, the payload limit raised, answered 2xx."""
    point = LARGE_OK
    if content_type is None:
        return Row(point, SKIP, "no --payload given")
    body = large_body(content_type)
    if body is None:
        return Row(point, SKIP, f"--payload is {content_type}: the check makes 20-MB bodies as PNG or JPEG only")
    with serving(bench, model, env={"SAGEMAKER_MAX_PAYLOAD_IN_MB": str(LARGE_LIMIT_MB)}) as server:
        if server.ready_s is None:
            return _not_ready(point, server)
        try:
            started = time.monotonic()
            reply = _invoke(server.url, body, content_type)
        except EndpointError as exc:
            return Row(point, FAIL, str(exc)[:120])
        evidence = f"{len(body) / 1e6:.1f} MB {content_type}: HTTP {reply.status} in {time.monotonic() - started:.1f} s"
        if not reply.ok:
            return Row(point, FAIL, f"{evidence}: {reply.message()[:80]}")
        return Row(point, PASS, evidence)


def _json_request(server: Server, method: str, path: str, data: Any = None) -> client.Reply:
    body = json.dumps(data).encode() if data is not None else None
    headers = {"Content-Type": "application/json", "Accept": "application/json"} if body else {}
    return client.request(method, server.url + path, body, headers)


def check_multi_model(bench: Bench, model: Path, payload: bytes | None, content_type: str | None) -> Row:
    """SageMaker's multi-model container API, as the platform drives it, on a server with no model loaded."""
    point = MULTI_MODEL
    if bench.labels.get(MULTI_MODEL_LABEL) != "true":
        return Row(point, SKIP, f"the image has no label {MULTI_MODEL_LABEL}=true")
    models = bench.workdir / "multi-model"
    shutil.copytree(model, models / "m1" / "model")
    env = {"SAGEMAKER_MULTI_MODEL": "true"}
    with serving(bench, None, env=env, mounts={models: "/opt/ml/models"}) as server:
        if server.ready_s is None:
            return _not_ready(point, server)
        load = {"model_name": "m1", "url": "/opt/ml/models/m1/model"}
        steps: list[tuple[str, Callable[[], client.Reply], int]] = [
            ("load", lambda: _json_request(server, "POST", "/models", load), 200),
            ("load again", lambda: _json_request(server, "POST", "/models", load), 409),
            ("list", lambda: _json_request(server, "GET", "/models"), 200),
            ("get", lambda: _json_request(server, "GET", "/models/m1"), 200),
        ]
        if payload is not None and content_type is not None:
            headers = {"Content-Type": content_type, "X-Amzn-SageMaker-Target-Model": "m1.tar.gz"}
            invoke = ("invoke", lambda: client.request("POST", server.url + "/models/m1/invoke", payload, headers), 200)
            steps.append(invoke)
        steps += [
            ("unload", lambda: _json_request(server, "DELETE", "/models/m1"), 200),
            ("get after unload", lambda: _json_request(server, "GET", "/models/m1"), 404),
        ]
        seen = []
        for name, call, expected in steps:
            try:
                reply = call()
            except EndpointError as exc:
                return Row(point, FAIL, f"{name}: {_last_line(str(exc), 100)}")
            ok = reply.ok if expected == 200 else reply.status == expected
            if name == "list" and ok:
                listed = reply.json().get("models", []) if reply.content_type.startswith("application/json") else []
                ok = any(isinstance(m, dict) and m.get("modelName") == "m1" for m in listed)
            if not ok:
                return Row(point, FAIL, f"{name}: HTTP {reply.status}, expected {expected}: {reply.message()[:60]}")
            seen.append(f"{name} {reply.status}")
        return Row(point, PASS, f"/ping 200 with no model after {server.ready_s:.1f} s; " + ", ".join(seen))


def serve_model(bench: Bench, trees: list[Path]) -> Path | None:
    """The first tree's model packed to model.tar.gz and unpacked into a fresh folder, as SageMaker does."""
    for tree in trees:
        if _model_files(tree):
            archive = pack_dir(tree / "model", bench.workdir / "model.tar.gz")
            return extract_archive(archive, bench.workdir / "serve-model")
    return None


# ---- the whole check ------------------------------------------------------------------------------------


def _guarded(point: str, check: Callable[[], Row]) -> Row:
    """A check that raised is a FAIL row with the error; the other points are still checked."""
    try:
        return check()
    except Exception as exc:
        log.debug("%s raised", point, exc_info=True)
        return Row(point, FAIL, f"{type(exc).__name__}: {_last_line(str(exc))}")


def connect(image: str) -> Any:
    """A Docker SDK client of the local engine holding ``image``; HarnessError (exit 2) when there is none."""
    import docker

    try:
        docker_client = docker.from_env(timeout=300)
        docker_client.ping()
    except docker.errors.DockerException as exc:
        raise HarnessError(f"no Docker engine reachable ({exc}); scripts/install-docker.sh starts one") from None
    try:
        docker_client.images.get(image)
    except docker.errors.ImageNotFound:
        raise HarnessError(f"image {image} does not exist in the Docker engine; build it first") from None
    return docker_client


def run_check(spec: CheckSpec, on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """Every contract point against ``spec.image``, in order; ``on_row`` sees each row as it is decided."""
    spec.check()
    payload = Path(spec.payload).read_bytes() if spec.payload else None
    content_type = client.content_type_for(Path(spec.payload), spec.content_type) if spec.payload else None
    docker_client = connect(spec.image)
    bench = Bench(docker_client, spec, Path(tempfile.mkdtemp(prefix="contract-check-")))
    rows: list[Row] = []

    def add(point: str, check: Callable[[], Row]) -> Row:
        row = graded(_guarded(point, check))
        rows.append(row)
        log.info("%s  %s: %s", row.status, row.point, row.evidence)
        if on_row:
            on_row(row)
        return row

    try:
        v2_tree, v3_tree = bench.path("train-v2"), bench.path("train-v3")
        v2 = add(TRAIN_V2, lambda: check_train_v2(bench, v2_tree))
        add(TRAIN_V3, lambda: check_train_v3(bench, v3_tree))
        add(MODEL, lambda: check_model(v2_tree, v2.status == PASS))
        add(UNKNOWN, lambda: check_unknown_hyperparameter(bench))
        add(TRAIN_SIGTERM, lambda: check_train_sigterm(bench))
        add(TWO_HOSTS, lambda: check_two_hosts(bench))
        add(TRAIN_GPU, lambda: check_train_gpu(bench))
        serve_points = (
            *(PING, INVOKE, PING_BUSY, EXECUTION_PARAMETERS, LARGE, SERVE_SIGTERM, BIND, SERVE_GPU),
            *(READ_ONLY, LARGE_OK, MULTI_MODEL),
        )
        model = serve_model(bench, [v2_tree, v3_tree])
        if model is None:
            for point in serve_points:
                add(point, partial(Row, point, SKIP, "no model to serve: no training run wrote one"))
            return rows
        with serving(bench, model) as server:
            add(PING, lambda: check_ping(server))
            if server.ready_s is None:
                for point in serve_points[1:6]:
                    add(point, partial(Row, point, SKIP, "the server never answered /ping"))
            else:
                add(INVOKE, lambda: check_invocation(server, payload, content_type))
                add(PING_BUSY, lambda: check_ping_while_invoking(server, payload, content_type))
                add(EXECUTION_PARAMETERS, lambda: check_execution_parameters(server))
                add(LARGE, lambda: check_large_payload(server, content_type))
                add(SERVE_SIGTERM, lambda: check_serve_sigterm(server))
        add(BIND, lambda: check_bind_to_port(bench, model))
        add(SERVE_GPU, lambda: check_serve_gpu(bench, model, payload, content_type))
        add(READ_ONLY, lambda: check_read_only(bench, model, payload, content_type))
        add(LARGE_OK, lambda: check_large_body(bench, model, content_type))
        add(MULTI_MODEL, lambda: check_multi_model(bench, model, payload, content_type))
        return rows
    finally:
        bench.close()
        shutil.rmtree(bench.workdir, ignore_errors=True)
        docker_client.close()
