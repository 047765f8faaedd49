"""A real client of the image: the SageMaker Python SDK v2's local mode trains, deploys, predicts, transforms.

Run by tests/local/test_sdk_clients.py with the interpreter of ``.venv-sdk`` (``sagemaker<3`` pins clash
with the project's), not collected by pytest:

    .venv-sdk/bin/python tests/local/sdk_local_mode.py --image TAG --data DIR --image-file X.png \
        --work DIR [--instance-count 2] [--port 8080] [--transform DIR_OF_PNGS]

Needs a Docker engine, ``docker compose`` or ``docker-compose``, the image, a free --port and an AWS region
(credentials may be fake: local mode calls no AWS API). Prints one line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

# The SDK sends telemetry to an AWS host unless its config opts out; this run has no network for it.
OPT_OUT = "SchemaVersion: '1.0'\nSageMaker:\n  PythonSDK:\n    Modules:\n      TelemetryOptOut: true\n"

# Real Python types: the SDK turns them into strings ("2", "False") as on SageMaker. Tiny: 2 CPU cores.
HYPERPARAMETERS = {
    "arch": "lite",
    "max_steps": 2,
    "batch_size": 2,
    "min_size": 128,
    "max_size": 128,
    "num_workers": 0,
    "amp": False,
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--image-file", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--instance-count", type=int, default=1)
    parser.add_argument("--port", type=int, default=8080, help="host port of the local endpoint")
    parser.add_argument("--transform", type=Path, help="a folder of images for a batch transform")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    config = work / "sagemaker-config.yaml"
    config.write_text(OPT_OUT)
    os.environ["SAGEMAKER_USER_CONFIG_OVERRIDE"] = str(config)  # read when sagemaker is imported

    import boto3
    from sagemaker.deserializers import JSONDeserializer
    from sagemaker.estimator import Estimator
    from sagemaker.local import LocalSession
    from sagemaker.serializers import IdentitySerializer

    session = LocalSession(boto_session=boto3.Session(region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1")))
    session.config = {"local": {"local_code": True, "container_root": str(work), "serving_port": args.port}}
    estimator = Estimator(
        image_uri=args.image,
        role="arn:aws:iam::123456789012:role/SageMakerRole",  # not checked in local mode
        instance_count=args.instance_count,
        instance_type="local",
        sagemaker_session=session,
        output_path=f"file://{work / 'output'}",
        hyperparameters=HYPERPARAMETERS,
    )
    estimator.fit({"training": f"file://{args.data.resolve()}"}, logs=True)
    result: dict = {"model_data": str(estimator.model_data)}

    # wait=False: local create_endpoint returns once /ping answers 200; wait=True would only add
    # wait_for_endpoint, which sleeps its 30 s poll interval before it first looks.
    predictor = estimator.deploy(
        1,
        "local",
        serializer=IdentitySerializer("image/png"),
        deserializer=JSONDeserializer(),
        wait=False,
    )
    try:
        result["predictions"] = predictor.predict(args.image_file.read_bytes())["predictions"]
    finally:
        predictor.delete_endpoint()  # frees the port for the transform's own serving container

    if args.transform:
        # The SDK's local transform reads BatchStrategy from the image's /execution-parameters and
        # accepts only the API spelling (SingleRecord / MultiRecord), while the container contract
        # documents SINGLE_RECORD, which the image returns; an explicit strategy wins over the
        # container's, and the SDK maps it to SAGEMAKER_BATCH_STRATEGY=SINGLE_RECORD itself.
        transformer = estimator.transformer(
            1,
            "local",
            strategy="SingleRecord",
            output_path=f"file://{work / 'transform'}",  # default is the account's S3 bucket
            accept="application/json",
        )
        # wait=False: wait() asks the real AWS API for the job's logs. Local mode's transform runs
        # every request before transform() returns; describe_transform_job (local) has its state.
        transformer.transform(f"file://{args.transform.resolve()}", content_type="image/png", wait=False)
        job = session.sagemaker_client.describe_transform_job(TransformJobName=transformer.latest_transform_job.name)
        result["transform_status"] = job["TransformJobStatus"]
        result["transform_output"] = str(work / "transform")
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
