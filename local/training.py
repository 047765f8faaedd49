"""A training job on N emulated hosts: start, stream logs, read metrics, pack, report.

:func:`run_training` is ``python -m local train``. Each host runs the image's ``train`` on its own
/opt/ml tree (see :mod:`local.layout`) with ``TRAINING_JOB_NAME`` set; with several hosts they
rendezvous on ``MASKRCNN_MASTER_ADDR=127.0.0.1`` and a free ``MASKRCNN_MASTER_PORT`` (gloo on CPU).
Metrics are read from the log with the image's own ``METRIC_DEFINITIONS`` (algo-1 only: rank 0 logs
them). When a host fails, the others are stopped, as SageMaker fails the whole job; the reason is
the failing host's ``output/failure``. Ctrl-C (SIGINT) or SIGTERM stops the job like
StopTrainingJob: SIGTERM to every host, SIGKILL after ``stop_timeout_s``. On success algo-1's
``model/`` becomes ``model.tar.gz`` and its ``output/data/`` becomes ``output.tar.gz``.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import signal
import subprocess
import threading
import time
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from maskrcnn.contract import EXIT_STOPPED
from maskrcnn.train.metrics import parse_metrics, parse_plan

from local.artifacts import pack_dir
from local.errors import JobFailed
from local.layout import JOB_FILE, LOG_FILE, MODEL_ARCHIVE, OUTPUT_ARCHIVE, JobSpec, write_job
from local.progress import Progress
from local.runtime import Runtime, free_port, start_streaming, stop_on_signals

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 120.0  # StopTrainingJob: SIGTERM, then SIGKILL after 120 s
_POSITION = re.compile(r"\b(phase|epoch|step)=(\w+)")


@dataclass
class TrainResult:
    job_name: str
    mode: str
    hosts: list[str]
    exit_code: int
    seconds: float
    failure_reason: str | None = None
    model_archive: Path | None = None
    output_archive: Path | None = None
    log_file: Path | None = None
    tensorboard_dir: Path | None = None  # algo-1's event files: tensorboard --logdir <this>
    final_metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        data = asdict(self)
        for key in ("model_archive", "output_archive", "log_file", "tensorboard_dir"):
            data[key] = str(data[key]) if data[key] else None
        return json.dumps(data, indent=1)


@dataclass
class MetricsReader:
    """Folds log lines into a metrics history and drives the progress bar, in optimizer steps.

    The job announces its plan in ``#plan`` lines (:func:`maskrcnn.train.metrics.parse_plan`): before the
    first step, at every re-plan of a time budget, and the step training ended at. The bar's total is the
    latest plan, and the end line moves the bar to the step the job trained to, whatever ended it (the epochs,
    max_steps, the budget). Nothing here reads the job's sentences, which may be reworded.
    """

    progress: Progress
    history: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)

    def feed(self, line: str) -> None:
        plan = parse_plan(line)
        if plan is not None:
            self.progress.set_total(plan.last_step)
            if plan.event == "end":
                self.progress.advance(plan.step)
            return
        values = parse_metrics(line)
        if not values:
            return
        position = dict(_POSITION.findall(line))
        record: dict[str, Any] = {k: _number(v) for k, v in position.items()}
        record.update(values)
        self.history.append(record)
        if record.get("phase") == "eval":
            self.final = {k: v for k, v in values.items() if k.startswith("validation:")}
            scores = " ".join(f"{k.split(':', 1)[1]}={v:.4f}" for k, v in self.final.items())
            self.progress.event(f"eval epoch {record.get('epoch', '?')} step {self.progress.n}: {scores}")
        shown = {k.split(":", 1)[1]: v for k, v in values.items() if k in ("train:loss", "validation:segm_AP50")}
        if isinstance(record.get("step"), int):
            self.progress.advance(record["step"], **shown)
        elif shown:
            self.progress.advance(self.progress.n, **shown)  # an eval line: same step, new figures


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        return text


def read_failure(base: Path) -> str | None:
    path = base / "output" / "failure"
    if path.is_file():
        text = path.read_text(errors="replace").strip()
        return text or None
    return None


def _pump(host: str, stream: IO[str], lines: queue.Queue) -> None:
    for line in stream:
        lines.put((host, line.rstrip("\n")))
    lines.put((host, None))


def run_training(
    spec: JobSpec,
    output: Path,
    runtime: Runtime,
    progress: Progress | None = None,
    overwrite: bool = False,
    stop_timeout_s: float = STOP_TIMEOUT_S,
    stop_request: threading.Event | None = None,
) -> TrainResult:
    """Run the job to its end; raises :class:`JobFailed` (with the failure reason) when it fails.

    ``stop_request`` is StopTrainingJob from another thread (signals reach only the main thread).
    """
    progress = progress or Progress()
    started = time.monotonic()
    trees = write_job(output, spec, overwrite)
    group = _Hosts(spec.name, list(trees), runtime)
    env = {**spec.environment, "TRAINING_JOB_NAME": spec.name}
    if len(group.hosts) > 1:
        env.update(MASKRCNN_MASTER_ADDR="127.0.0.1", MASKRCNN_MASTER_PORT=str(free_port()))
    log.info("training job %s: %d host(s), %s mode, tree %s", spec.name, len(group.hosts), runtime.mode, output)

    reader = MetricsReader(progress)
    log_path = output / LOG_FILE
    progress.start(None, "step", f"train {spec.name}")
    stop = _AnyEvent(stop_request)
    try:
        with log_path.open("w", encoding="utf-8") as job_log, stop_on_signals() as signalled:
            stop = _AnyEvent(signalled, stop_request)
            group.start(trees, env)
            _follow(group, job_log, progress, reader, stop, stop_timeout_s)
    finally:
        progress.close()
        group.clean_up()

    result = TrainResult(
        job_name=spec.name,
        mode=runtime.mode,
        hosts=group.hosts,
        exit_code=_job_code(group.codes, group.hosts),
        seconds=round(time.monotonic() - started, 2),
        final_metrics=reader.final,
        history=reader.history,
        log_file=log_path,
    )
    _collect_outputs(result, trees, output, group.codes, stop.is_set())
    (output / JOB_FILE).write_text(result.to_json())
    if result.exit_code != 0:
        raise JobFailed(result.failure_reason or "training failed", result.exit_code)
    return result


class _Hosts:
    """The job's host processes (one per emulated host), their exit codes and their merged output lines."""

    def __init__(self, job_name: str, hosts: list[str], runtime: Runtime):
        self.hosts = hosts
        self.runtime = runtime
        self.containers = {host: f"{job_name}-{host}" for host in hosts}
        self.processes: dict[str, subprocess.Popen] = {}
        self.codes: dict[str, int] = {}
        self.lines: queue.Queue = queue.Queue()  # (host, line), (host, None) when its stream ends

    def start(self, trees: dict, env: dict[str, str]) -> None:
        for host in self.hosts:
            argv, proc_env = self.runtime.train_command(trees[host].base, env, self.containers[host])
            self.processes[host] = start_streaming(argv, proc_env)
            threading.Thread(target=_pump, args=(host, self.processes[host].stdout, self.lines), daemon=True).start()

    def poll(self) -> None:
        for name, process in self.processes.items():
            if name not in self.codes and process.poll() is not None:
                self.codes[name] = process.returncode

    def signal(self, sig: int) -> None:
        _signal_all(self.processes, self.codes, sig)

    def clean_up(self) -> None:
        """Kill what still runs; remove the containers of hosts that failed."""
        for host, process in self.processes.items():
            if process.poll() is None:
                process.kill()
                process.wait()
            if process.returncode:
                self.runtime.remove_container(self.containers[host])  # --rm does not run when the CLI was killed


def _follow(
    group: _Hosts, job_log: IO[str], progress: Progress, reader: MetricsReader, stop: _AnyEvent, stop_timeout_s: float
) -> None:
    """Every line to the job's log and the progress display until every host has exited; on a stop request or a
    failed host, SIGTERM to the others, then SIGKILL after ``stop_timeout_s``."""
    hosts = group.hosts
    stopping_since: float | None = None
    open_streams = len(hosts)
    while open_streams or len(group.codes) < len(hosts):
        try:
            host, line = group.lines.get(timeout=0.2)
        except queue.Empty:
            host, line = "", ""
        if line is None:
            open_streams -= 1
        elif host:
            shown = f"{host} | {line}" if len(hosts) > 1 else line
            job_log.write(shown + "\n")
            progress.line(shown)
            if host == hosts[0]:
                reader.feed(line)
        group.poll()
        failed = any(code != 0 for code in group.codes.values())
        if (stop.is_set() or failed) and stopping_since is None:
            stopping_since = time.monotonic()
            if len(group.codes) < len(hosts):
                why = "stop requested" if stop.is_set() else "a host failed"
                log.warning("%s: sending SIGTERM to the running hosts", why)
                group.signal(signal.SIGTERM)
        if stopping_since is not None and time.monotonic() - stopping_since > stop_timeout_s:
            group.signal(signal.SIGKILL)
            stopping_since = float("inf")  # kill once


def _collect_outputs(result: TrainResult, trees: dict, output: Path, codes: dict[str, int], stopped: bool) -> None:
    """What SageMaker keeps of a job: the archives of the first host's model and output data, or the failure."""
    first = trees[result.hosts[0]]
    board = first.tensorboard_dir
    if board.is_dir() and any(board.iterdir()):
        result.tensorboard_dir = board
    if result.exit_code == 0:
        result.model_archive = pack_dir(first.model_dir, output / MODEL_ARCHIVE)
        if any(first.output_data_dir.iterdir()):
            result.output_archive = pack_dir(first.output_data_dir, output / OUTPUT_ARCHIVE)
    else:
        result.failure_reason = _failure(trees, result.hosts, codes, stopped)


class _AnyEvent:
    """Set when any of its events is set."""

    def __init__(self, *events: threading.Event | None):
        self.events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


def _signal_all(processes: dict[str, subprocess.Popen], codes: dict[str, int], sig: int) -> None:
    for name, process in processes.items():
        if name not in codes and process.poll() is None:
            with suppress(ProcessLookupError):
                process.send_signal(sig)


def _job_code(codes: dict[str, int], hosts: list[str]) -> int:
    """0 when all hosts succeeded; else the first failing host's code (143 when stopped)."""
    for host in hosts:
        code = codes.get(host, 1)
        if code != 0:
            return EXIT_STOPPED if code in (EXIT_STOPPED, -signal.SIGTERM) else (code if code > 0 else 1)
    return 0


def _failure(trees: dict, hosts: list[str], codes: dict[str, int], stopped: bool) -> str:
    """The reason a person should read: the first host's output/failure that says something."""
    for host in hosts:
        reason = read_failure(trees[host].base)
        if reason:
            return reason if len(hosts) == 1 else f"{host}: {reason}"
    if stopped:
        return f"stopped on request; checkpoints are in {trees[hosts[0]].checkpoints_dir}"
    if any(codes.get(h) in (EXIT_STOPPED, -signal.SIGTERM) for h in hosts):
        return (
            f"a host got SIGTERM from outside the harness and stopped; checkpoints are in "
            f"{trees[hosts[0]].checkpoints_dir}"
        )
    bad = next((h for h in hosts if codes.get(h, 1) != 0), hosts[0])
    return f"{bad} exited with code {codes.get(bad)} and wrote no output/failure; see its log above"
