"""``python -m local VERB ...``: the parser, logging set-up, and the one place errors become exit codes.

Verbs: ``train``, ``serve``, ``invoke``, ``transform``, ``async``, ``synth``, ``demo``, ``check``, ``workflow``
(docs/local.md has every flag).
Exit codes: 0 done; 1 the job / a request / the demo failed; 2 a usage or set-up problem; 143 the
training job was stopped (SIGTERM/Ctrl-C) after checkpointing; 130 interrupted otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from maskrcnn.contract import EXIT_STOPPED
from maskrcnn.serve.content_types import JSON_TYPE, PNG_TYPE
from maskrcnn.serve.settings import DEFAULT_PAYLOAD_MB, DEFAULT_PORT, MAX_TIMEOUT_S

from local import runtime as rt
from local.errors import HarnessError, JobFailed
from local.layout import DISTRIBUTIONS, JobSpec, default_job_name, parse_pairs
from local.progress import for_stream
from pipeline.execution import APPROVAL_MODES, GATE_METRIC, GATE_MIN_VALUE

log = logging.getLogger("local")

DESCRIPTION = """SageMaker training jobs, endpoints and batch transform on this machine (docs/local.md).

exit codes: 0 done; 1 the job, a request or the demo failed; 2 a usage or set-up problem;
143 the training job was stopped (Ctrl-C / SIGTERM) after checkpointing; 130 interrupted."""


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s local %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def _runtime_flags(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    default_image = environ.get("IMAGE", rt.DEFAULT_IMAGE)
    parser.add_argument(
        "--mode",
        choices=rt.MODES,
        default="auto",
        help="process: plain processes; docker: the image; auto: docker when the image exists",
    )
    parser.add_argument("--image", default=default_image, help=f"image tag for docker mode (default {default_image})")
    parser.add_argument("--gpus", action="store_true", help="docker run --gpus all")


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m local", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging; train: the job's own log in a terminal too"
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    _add_train(verbs, environ)
    _add_serve(verbs, environ)
    _add_invoke(verbs)
    _add_transform(verbs, environ)
    _add_async(verbs)
    _add_synth(verbs)
    _add_demo(verbs, environ)
    _add_check(verbs, environ)
    _add_workflow(verbs)
    return parser


def _add_train(verbs: Any, environ: Mapping[str, str]) -> None:
    train = verbs.add_parser("train", help="run a training job; writes OUTPUT/model.tar.gz")
    train.add_argument("--data", type=Path, required=True, help="the training channel's folder")
    train.add_argument("--validation", type=Path, help="the validation channel's folder")
    train.add_argument(
        "--channel",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="another channel (e.g. pretrained=weights/)",
    )
    train.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE", help="a hyperparameter (repeat)")
    train.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="the job's Environment map (repeat)"
    )
    train.add_argument("--instance-count", type=int, default=1, help="hosts that train together (algo-1..N)")
    train.add_argument(
        "--distribution",
        choices=tuple(DISTRIBUTIONS),
        default=JobSpec.distribution,
        help="the training channel's S3DistributionType: every host gets all of --data (FullyReplicated), "
        "or each host a disjoint part (ShardedByS3Key)",
    )
    train.add_argument("--job-name", help="TRAINING_JOB_NAME (default maskrcnn-<timestamp>)")
    train.add_argument("--output", type=Path, required=True, help="job folder: host trees, model.tar.gz, job.json")
    train.add_argument("--overwrite", action="store_true", help="clear a previous job in --output first")
    _runtime_flags(train, environ)
    train.set_defaults(func=cmd_train)


def _add_serve(verbs: Any, environ: Mapping[str, str]) -> None:
    serve = verbs.add_parser("serve", help="start an endpoint for a model until Ctrl-C")
    model = serve.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", type=Path, help="model.tar.gz or an unpacked model folder")
    model.add_argument(
        "--multi-model",
        type=Path,
        metavar="DIR",
        help="a multi-model endpoint over a folder of *.tar.gz (the S3 prefix): loaded on first invoke --target-model, "
        "the least recently used evicted when the server answers 507",
    )
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="server environment")
    serve.add_argument(
        "--serverless",
        action="store_true",
        help="as Serverless Inference runs it (docker mode): read-only root file system but /tmp, --memory; "
        "prints the cold start",
    )
    serve.add_argument("--memory", type=int, default=3072, metavar="MB", help="--serverless: MemorySizeInMB (3072)")
    _runtime_flags(serve, environ)
    serve.set_defaults(func=cmd_serve)


def _add_invoke(verbs: Any) -> None:
    invoke = verbs.add_parser("invoke", help="POST files to an endpoint's /invocations")
    invoke.add_argument("url", help=f"the endpoint, e.g. http://127.0.0.1:{DEFAULT_PORT}")
    invoke.add_argument("files", type=Path, nargs="+")
    invoke.add_argument("--accept", default=JSON_TYPE, help=f"{JSON_TYPE} or {PNG_TYPE}")
    invoke.add_argument("--content-type", help="default: from each file's suffix")
    invoke.add_argument("--attributes", help="X-Amzn-SageMaker-Custom-Attributes")
    invoke.add_argument("--out", type=Path, help="write <name>.out files here (default: JSON to stdout)")
    invoke.add_argument("--target-model", help="a multi-model endpoint's TargetModel, e.g. site-a.tar.gz")
    invoke.set_defaults(func=cmd_invoke)


def _add_transform(verbs: Any, environ: Mapping[str, str]) -> None:
    transform = verbs.add_parser("transform", help="batch transform: one <name>.out per input file")
    transform.add_argument("--model", type=Path, required=True, help="model.tar.gz or an unpacked model folder")
    transform.add_argument("--input", type=Path, required=True, help="folder of inputs (read recursively)")
    transform.add_argument("--output", type=Path, required=True)
    transform.add_argument("--accept", default=JSON_TYPE)
    transform.add_argument("--content-type", help="default: from each file's suffix")
    transform.add_argument("--attributes", help="X-Amzn-SageMaker-Custom-Attributes on every request")
    transform.add_argument("--max-concurrent-transforms", type=int, help="default: the server's /execution-parameters")
    transform.add_argument("--max-payload-mb", type=int, help=f"default: the server's, else {DEFAULT_PAYLOAD_MB}")
    transform.add_argument("--batch-strategy", choices=("SINGLE_RECORD", "MULTI_RECORD"))
    transform.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    _runtime_flags(transform, environ)
    transform.set_defaults(func=cmd_transform)


def _add_async(verbs: Any) -> None:
    run = verbs.add_parser(
        "async", help="asynchronous inference against a running endpoint: <name>.out / <name>.error per input file"
    )
    run.add_argument("--endpoint", required=True, help=f"a running endpoint, e.g. http://127.0.0.1:{DEFAULT_PORT}")
    run.add_argument("--input", type=Path, required=True, help="folder of request bodies (read recursively)")
    run.add_argument("--output", type=Path, required=True, help="S3OutputPath: <name>.out per answer")
    run.add_argument("--failures", type=Path, help="S3FailurePath: <name>.error per failure (default: --output)")
    run.add_argument("--max-concurrent", type=int, default=1, help="MaxConcurrentInvocationsPerInstance (1)")
    run.add_argument(
        "--timeout", type=float, default=900, help=f"InvocationTimeoutSeconds (900, at most {MAX_TIMEOUT_S})"
    )
    run.add_argument("--content-type", help="default: from each file's suffix")
    run.add_argument("--accept", default=JSON_TYPE)
    run.set_defaults(func=cmd_async)


def _add_synth(verbs: Any) -> None:
    synth = verbs.add_parser("synth", help="write the synthetic COCO dataset")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--images", type=int, default=200)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", type=int, default=256)
    synth.set_defaults(func=cmd_synth)


def _add_demo(verbs: Any, environ: Mapping[str, str]) -> None:
    demo = verbs.add_parser("demo", help="the main job: data -> train -> endpoint -> held-out AP, overlays")
    demo.add_argument("--out", type=Path, default=Path("demo-output"))
    demo.add_argument("--train-images", type=int, help="override the demo's training set size")
    demo.add_argument("--heldout-images", type=int, help="override the demo's held-out set size")
    demo.add_argument("--seed", type=int, help="the training seed (weights, data order, augmentation); default 0")
    demo.add_argument(
        "--hp",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one of the demo's hyperparameters",
    )
    _runtime_flags(demo, environ)
    demo.set_defaults(func=cmd_demo)


def _add_check(verbs: Any, environ: Mapping[str, str]) -> None:
    check = verbs.add_parser("check", help="check an image against the SageMaker container contract")
    check.add_argument("--image", default=environ.get("IMAGE", rt.DEFAULT_IMAGE), help="the image tag to check")
    check.add_argument("--data", type=Path, required=True, help="a training channel the image can train on")
    check.add_argument("--payload", type=Path, help="a request body for /invocations (without it: SKIP)")
    check.add_argument("--content-type", help="the payload's Content-Type (default: from its suffix)")
    check.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE", help="a hyperparameter (repeat)")
    check.set_defaults(func=cmd_check)


def _add_workflow(verbs: Any) -> None:
    workflow = verbs.add_parser("workflow", help="run the deployed state machine here: real training and endpoint")
    workflow.add_argument("--training-data", type=Path, required=True, help="the training channel's folder")
    workflow.add_argument("--validation-data", type=Path, help="the validation channel's folder")
    workflow.add_argument("--pretrained", type=Path, help="the pretrained channel's folder")
    image = workflow.add_mutually_exclusive_group(required=True)
    image.add_argument("--image", help="a local image tag: the workflow's given-image branch")
    image.add_argument("--build", action="store_true", help="the build branch: CodeBuild's buildspec on local Docker")
    workflow.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE", help="a hyperparameter (repeat)")
    workflow.add_argument("--mode", choices=rt.MODES, default="auto", help="where the job and the endpoint run")
    workflow.add_argument("--gpus", action="store_true", help="docker run --gpus all")
    workflow.add_argument(
        "--gate",
        metavar="METRIC=MIN",
        help=f"the quality gate, as `pipeline start --gate` (default: the workflow's, {GATE_METRIC}={GATE_MIN_VALUE})",
    )
    # --approve and --approval-timeout left out keep WorkflowRun's defaults (auto, an hour), a local run's own.
    workflow.add_argument(
        "--approve",
        choices=APPROVAL_MODES,
        help="auto (default): the model is registered Approved; manual: the run prints the command that approves, "
        "and waits",
    )
    workflow.add_argument("--approval-timeout", type=int, metavar="S", help="manual: seconds to wait (default: 3600)")
    workflow.add_argument("--keep-endpoint", action="store_true", help="serve the endpoint until Ctrl-C")
    workflow.add_argument("--output", type=Path, required=True, help="new or empty folder: history, jobs, models")
    workflow.set_defaults(func=cmd_workflow)


def _runtime(args: argparse.Namespace, environ: Mapping[str, str]) -> rt.Runtime:
    return rt.resolve(args.mode, args.image, args.gpus, environ)


def cmd_train(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from local.training import run_training

    channels = {"training": args.data}
    if args.validation:
        channels["validation"] = args.validation
    channels.update({k: Path(v) for k, v in parse_pairs(args.channel, "--channel").items()})
    spec = JobSpec(
        name=args.job_name or default_job_name(),
        channels=channels,
        hyperparameters=parse_pairs(args.hp),
        instance_count=args.instance_count,
        environment=parse_pairs(args.env, "--env"),
        distribution=args.distribution,
    )
    # In a terminal: the bar and one line per evaluation; the job's own log is in its log file (and here with -v).
    progress = for_stream(sys.stdout, raw_lines=args.verbose)
    result = run_training(spec, args.output, _runtime(args, environ), progress, args.overwrite)
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in result.final_metrics.items())
    print(f"model: {result.model_archive}")
    if metrics:
        print(f"metrics: {metrics}")
    print(f"log: {result.log_file}")
    if result.tensorboard_dir:
        print(f"tensorboard: tensorboard --logdir {result.tensorboard_dir}")
    print(f"job {result.job_name} done in {result.seconds:.1f}s ({result.mode} mode)")
    return 0


def cmd_serve(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from local.endpoint import Endpoint, wait_until_stopped
    from local.runtime import stop_on_signals

    if args.multi_model is not None:
        return _serve_multi_model(args, environ)

    with (
        Endpoint(
            _runtime(args, environ),
            args.model,
            args.port,
            parse_pairs(args.env, "--env"),
            log_sink=for_stream(sys.stdout).line,
            serverless_memory_mb=args.memory if args.serverless else None,
        ) as endpoint,
        stop_on_signals() as stop,
    ):
        if args.serverless:
            print(
                f"serverless, {args.memory} MB, read-only root file system: cold start {endpoint.ready_s:.1f} s "
                "(docker run to the first 200 on /ping; SageMaker's ModelSetupTime)",
                flush=True,
            )
        print(f"serving {args.model} at {endpoint.url} (Ctrl-C stops)", flush=True)
        wait_until_stopped(endpoint, stop)
    return 0


def _serve_multi_model(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from local.endpoint import wait_until_stopped
    from local.multimodel import MultiModelEndpoint, archives
    from local.runtime import stop_on_signals

    if args.serverless:
        raise HarnessError("a serverless endpoint serves one model: --serverless or --multi-model, not both")
    endpoint = MultiModelEndpoint(
        _runtime(args, environ),
        args.multi_model,
        args.port,
        parse_pairs(args.env, "--env"),
        log_sink=for_stream(sys.stdout).line,
    )
    with endpoint, stop_on_signals() as stop:
        names = archives(args.multi_model)
        print(f"multi-model endpoint for {args.multi_model}: {len(names)} model(s): {', '.join(names[:5])}")
        print(f"serving at {endpoint.url} (invoke --target-model NAME; Ctrl-C stops)", flush=True)
        wait_until_stopped(endpoint.server, stop)
    return 0


def cmd_invoke(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from local.client import invoke_files

    failures = invoke_files(
        args.url,
        args.files,
        args.accept,
        args.content_type,
        args.attributes,
        args.out,
        stdout=sys.stdout,
        target_model=args.target_model,
    )
    return 1 if failures else 0


def cmd_transform(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from local.transform import TransformSettings, run_transform

    settings = TransformSettings(
        accept=args.accept,
        content_type=args.content_type,
        attributes=args.attributes,
        max_concurrent=args.max_concurrent_transforms,
        max_payload_mb=args.max_payload_mb,
        batch_strategy=args.batch_strategy,
    )
    result = run_transform(
        _runtime(args, environ),
        args.model,
        args.input,
        args.output,
        settings,
        port=args.port,
        progress=for_stream(sys.stdout),
    )
    print(f"transform: {result.succeeded} of {result.total} inputs -> {args.output}")
    for name, why in result.failures:
        print(f"failed: {name}: {why}", file=sys.stderr)
    return 1 if result.failures else 0


def cmd_async(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from local.asyncinf import AsyncJob, run_async

    job = AsyncJob(
        args.endpoint,
        args.input,
        args.output,
        args.failures,
        args.max_concurrent,
        args.timeout,
        args.content_type,
        args.accept,
    )
    result = run_async(job, for_stream(sys.stdout))
    print(
        f"async: {result.succeeded} of {result.total} answered in {result.seconds:.1f} s -> {job.output_dir}"
        + (f"; {len(result.failures)} failed -> {job.failure_dir}" if result.failures else "")
    )
    for name, why in result.failures:
        print(f"failed: {name}: {why}", file=sys.stderr)
    return 1 if result.failures else 0


def cmd_synth(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from maskrcnn.train.synthetic import write_coco_dataset

    path = write_coco_dataset(args.out, args.images, args.seed, args.size)
    print(path)
    return 0


def cmd_demo(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from local.demo import TARGET_SEGM_AP50, run_demo

    summary = run_demo(
        args.out,
        _runtime(args, environ),
        hp_overrides={**parse_pairs(args.hp), **({"seed": str(args.seed)} if args.seed is not None else {})},
        train_images=args.train_images,
        heldout_images=args.heldout_images,
        progress=for_stream(sys.stdout),
    )
    held = summary["heldout"]
    print(
        f"demo: segm AP50 {held['segm_AP50']:.3f}, segm mAP {held['segm_mAP']:.3f} on {held['images']} held-out images"
    )
    verdict = "met" if summary["passed"] else "NOT met"
    print(f"target segm AP50 >= {TARGET_SEGM_AP50}: {verdict}")
    print(f"demo output: {summary['folder']}")
    # A score below target is a result to read, not a crash; failed requests are a broken demo.
    return 1 if summary["inference"].get("failed_requests") else 0


def cmd_check(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from local.check import CheckSpec, exit_code, render_table, run_check

    spec = CheckSpec(args.image, args.data, parse_pairs(args.hp), args.payload, args.content_type)
    rows = run_check(spec)
    print(render_table(rows))
    return exit_code(rows)


def cmd_workflow(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from local.codebuild import DEFAULT_BASE_IMAGE
    from local.endpoint import wait_until_stopped
    from local.runtime import stop_on_signals
    from local.workflow import LocalWorkflow, WorkflowRun, report

    approval = {"approve": args.approve, "approval_timeout_s": args.approval_timeout}
    run = WorkflowRun(
        args.training_data,
        args.validation_data,
        args.pretrained,
        args.image,
        args.build,
        args.hp,
        gate=args.gate,
        **{k: v for k, v in approval.items() if v is not None},
    )
    # --build: docker mode needs the engine and the base the build starts from; the jobs run the image it builds.
    checked = args.image or (
        environ.get("BASE_IMAGE", DEFAULT_BASE_IMAGE) if args.build else environ.get("IMAGE", rt.DEFAULT_IMAGE)
    )
    runtime = rt.resolve(args.mode, checked, args.gpus, environ)
    with LocalWorkflow(runtime, args.output, sys.stdout) as workflow:
        outcome = workflow.run(run)
        report(outcome, sys.stdout)
        endpoint = workflow.endpoint(outcome.endpoint_name)
        if outcome.ok and args.keep_endpoint and endpoint is not None:
            with stop_on_signals() as stop:
                print(f"serving at {outcome.endpoint_url} (Ctrl-C stops)", flush=True)
                wait_until_stopped(endpoint, stop)
    return 0 if outcome.ok else 1


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = dict(os.environ if environ is None else environ)
    args = build_parser(environ).parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args, environ))
    except JobFailed as exc:
        outcome = "stopped" if exc.exit_code == EXIT_STOPPED else "failed"
        print(f"training {outcome} (exit code {exc.exit_code}): {exc.reason}", file=sys.stderr)
        return exc.exit_code
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
