"""A real client of the image: the SageMaker Python SDK v3 trains (ModelTrainer) and serves (LocalSession).

Run by tests/local/test_sdk_clients.py with the interpreter of ``.venv-sdk3`` (``sagemaker==3.27.0``; its
pins clash with the project's), not collected by pytest:

    .venv-sdk3/bin/python tests/local/sdk3_local_mode.py --image TAG --data DIR --image-file X.png \
        --work DIR [--instance-counts 1,2] [--port 8080]

v3's local mode starts the training containers with no command (its compose file has none), so this
also checks the image's default CMD. v3's ModelBuilder serves only known model servers; its
``LocalSession`` (a port of v2's) serves a bring-your-own image through the boto3-shaped API used here.
Needs a Docker engine, ``docker compose`` or ``docker-compose``, the image, a free --port and an AWS
region (credentials may be fake). Prints one line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

# Same opt-out file as v2's: v3 reads SAGEMAKER_USER_CONFIG_OVERRIDE and the same TelemetryOptOut key.
OPT_OUT = "SchemaVersion: '1.0'\nSageMaker:\n  PythonSDK:\n    Modules:\n      TelemetryOptOut: true\n"

# Real Python types: v3 writes strings as they are and everything else as JSON (2, false).
HYPERPARAMETERS = {
    "arch": "lite",
    "max_steps": 2,
    "batch_size": 2,
    "min_size": 128,
    "max_size": 128,
    "num_workers": 0,
    "amp": False,
}
# The serving options docs/serving.md lists; a threshold of 0 keeps even an untrained model's boxes.
ATTRIBUTES = "score_threshold=0,max_detections=1,mask_format=none"


def train(image: str, data: Path, root: Path, count: int) -> tuple[Path, list]:
    """One local training job; returns its model.tar.gz and the command of each compose service."""
    import yaml
    from sagemaker.train import ModelTrainer
    from sagemaker.train.configs import Compute, InputData
    from sagemaker.train.model_trainer import Mode

    root.mkdir(parents=True, exist_ok=True)
    trainer = ModelTrainer(
        training_image=image,
        training_mode=Mode.LOCAL_CONTAINER,
        compute=Compute(instance_type="local_cpu", instance_count=count),
        hyperparameters=HYPERPARAMETERS,
        local_container_root=str(root),
    )
    trainer.train(input_data_config=[InputData(channel_name="training", data_source=str(data))])
    compose = yaml.safe_load((root / "docker-compose.yaml").read_text())
    commands = [service.get("command") for service in compose["services"].values()]
    return root / "compressed_artifacts" / "model.tar.gz", commands


def serve_and_invoke(image: str, archive: Path, image_file: Path, work: Path, port: int) -> dict:
    import boto3
    from sagemaker.core.local.local_session import LocalSession

    session = LocalSession(boto_session=boto3.Session(region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1")))
    session.config = {"local": {"container_root": str(work), "serving_port": port}}
    client, runtime = session.sagemaker_client, session.sagemaker_runtime_client
    client.create_model(
        ModelName="maskrcnn",
        PrimaryContainer={"Image": image, "ModelDataUrl": f"file://{archive}", "Environment": {}},
    )
    client.create_endpoint_config(
        EndpointConfigName="maskrcnn",
        ProductionVariants=[
            {
                "VariantName": "AllTraffic",
                "ModelName": "maskrcnn",
                "InitialInstanceCount": 1,
                "InstanceType": "local",
            }
        ],
    )
    client.create_endpoint(EndpointName="maskrcnn", EndpointConfigName="maskrcnn")
    body = image_file.read_bytes()

    def invoke(**extra: str) -> tuple[int, bytes]:
        response = runtime.invoke_endpoint(
            Body=body, EndpointName="maskrcnn", ContentType="image/png", Accept="application/json", **extra
        )
        return response["ResponseMetadata"]["HTTPStatusCode"], response["Body"].read()

    def predictions(**extra: str) -> list:
        status, reply = invoke(**extra)
        if status != 200:
            raise RuntimeError(f"invoke_endpoint({extra}): HTTP {status}: {reply[:500]!r}")
        return json.loads(reply)["predictions"]

    try:
        plain = predictions()
        attributed = predictions(CustomAttributes=ATTRIBUTES)
        bad_status, _ = invoke(CustomAttributes="no_such_option=1")
    finally:
        client.delete_endpoint(EndpointName="maskrcnn")
    return {
        "predictions": plain,
        "predictions_with_attributes": attributed,
        "bad_attribute_status": bad_status,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--image-file", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--instance-counts", default="1", help="comma-separated: one training job each")
    parser.add_argument("--port", type=int, default=8080, help="host port of the local endpoint")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    config = work / "sagemaker-config.yaml"
    config.write_text(OPT_OUT)
    os.environ["SAGEMAKER_USER_CONFIG_OVERRIDE"] = str(config)  # read when sagemaker is imported

    counts = [int(n) for n in args.instance_counts.split(",")]
    jobs = {n: train(args.image, args.data.resolve(), work / f"train-{n}-hosts", n) for n in counts}
    result: dict = {
        "model_data": {str(n): str(archive) for n, (archive, _) in jobs.items()},
        "compose_commands": {str(n): commands for n, (_, commands) in jobs.items()},
    }
    last_archive = jobs[counts[-1]][0]
    result.update(serve_and_invoke(args.image, last_archive, args.image_file, work, args.port))
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
