"""The batch transform as SageMaker's CreateTransformJob request: GPU hosts get a TransformAmiVersion the image
reaches, CPU hosts none, and the request is valid against botocore's own shape."""

from __future__ import annotations

import pytest
from maskrcnn.device import TRANSFORM_AMI

from local.transform import TransformSettings, transform_job_request
from pipeline.shapes import validate_request

pytestmark = pytest.mark.unit


def request(instance_type: str, settings: TransformSettings | None = None, **kwargs) -> dict:
    return transform_job_request(
        "maskrcnn-transform-1",
        "maskrcnn-model-1",
        "s3://b/in/",
        "s3://b/out/",
        instance_type,
        settings or TransformSettings(),
        **kwargs,
    )


@pytest.mark.parametrize("instance_type", ["ml.g4dn.xlarge", "ml.g5.xlarge", "ml.g6.2xlarge", "ml.p4d.24xlarge"])
def test_gpu_transform_hosts_get_the_ami_whose_driver_the_image_reaches(instance_type: str) -> None:
    sent = request(instance_type, TransformSettings(max_concurrent=2, max_payload_mb=6, content_type="image/png"))
    assert sent["TransformResources"]["TransformAmiVersion"] == TRANSFORM_AMI == "al2-ami-sagemaker-batch-gpu-535"
    assert sent["MaxConcurrentTransforms"] == 2 and sent["TransformInput"]["ContentType"] == "image/png"
    assert validate_request("sagemaker", "CreateTransformJob", sent, sdk_casing=False) is None


def test_cpu_transform_hosts_get_no_ami() -> None:
    sent = request("ml.m5.xlarge")
    assert "TransformAmiVersion" not in sent["TransformResources"]
    assert validate_request("sagemaker", "CreateTransformJob", sent, sdk_casing=False) is None


def test_a_transform_ami_the_image_would_refuse_fails_here() -> None:
    with pytest.raises(ValueError, match="R470"):
        request("ml.g4dn.xlarge", ami_version="al2-ami-sagemaker-batch-gpu-470")
    with pytest.raises(ValueError, match="has none"):
        request("ml.c5.xlarge", ami_version=TRANSFORM_AMI)
