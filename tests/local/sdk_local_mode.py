"""A real client of the image: the SageMaker Python SDK v2's local mode trains, deploys and predicts.

Run by tests/local/test_local_container.py with the interpreter of ``.venv-sdk`` (``sagemaker<3`` pins
clash with the project's), not collected by pytest:

    .venv-sdk/bin/python tests/local/sdk_local_mode.py --image TAG --data DIR --image-file X.png --work DIR

Needs a Docker engine, ``docker compose`` or ``docker-compose``, the image, free port 8080 and an AWS
region (credentials may be fake: local mode calls no AWS API). Prints one line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

# The SDK sends telemetry to an AWS host unless its config opts out; this run has no network for it.
OPT_OUT = "SchemaVersion: '1.0'\nSageMaker:\n  PythonSDK:\n    Modules:\n      TelemetryOptOut: true\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--image-file", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    args.work.mkdir(parents=True, exist_ok=True)
    config = args.work / "sagemaker-config.yaml"
    config.write_text(OPT_OUT)
    os.environ["SAGEMAKER_USER_CONFIG_OVERRIDE"] = str(config)  # read when sagemaker is imported

    import boto3
    from sagemaker.deserializers import JSONDeserializer
    from sagemaker.estimator import Estimator
    from sagemaker.local import LocalSession
    from sagemaker.serializers import IdentitySerializer

    session = LocalSession(
        boto_session=boto3.Session(region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    )
    session.config = {"local": {"local_code": True, "container_root": str(args.work)}}
    estimator = Estimator(
        image_uri=args.image,
        role="arn:aws:iam::123456789012:role/SageMakerRole",  # not checked in local mode
        instance_count=1,
        instance_type="local",
        sagemaker_session=session,
        output_path=f"file://{args.work / 'output'}",
        # real Python types: the SDK turns them into strings ("2", "False") as on SageMaker
        hyperparameters={
            "arch": "lite",
            "max_steps": 2,
            "batch_size": 2,
            "min_size": 128,
            "max_size": 128,
            "num_workers": 0,
            "amp": False,
        },
    )
    estimator.fit({"training": f"file://{args.data.resolve()}"}, logs=True)
    model_data = estimator.model_data
    predictor = estimator.deploy(
        1, "local", serializer=IdentitySerializer("image/png"), deserializer=JSONDeserializer()
    )
    try:
        answer = predictor.predict(args.image_file.read_bytes())
    finally:
        predictor.delete_endpoint()
    result = {"model_data": str(model_data), "predictions": answer["predictions"]}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
