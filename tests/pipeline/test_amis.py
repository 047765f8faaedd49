"""Endpoint and transform hosts get an AMI whose NVIDIA driver the image's CUDA reaches, checked against botocore."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import botocore.session
import pytest
from maskrcnn.device import INFERENCE_AMI, INFERENCE_AMI_DRIVERS, TRANSFORM_AMI, TRANSFORM_AMI_DRIVERS

from pipeline.__main__ import main
from pipeline.amis import inference_ami, is_nvidia_gpu, transform_ami
from pipeline.execution import InputError, example_input
from pipeline.settings import StackSettings
from pipeline.shapes import validate_definition
from pipeline.workflow import build_definition

pytestmark = pytest.mark.unit
MODEL = botocore.session.get_session().get_service_model("sagemaker")


@pytest.mark.parametrize(
    "instance_type",
    ["ml.g4dn.xlarge", "ml.g5.2xlarge", "ml.g6.xlarge", "ml.g6e.xlarge", "ml.p4d.24xlarge", "ml.p5.48xlarge"],
)
def test_gpu_endpoints_get_an_ami_whose_driver_the_image_runs(instance_type: str) -> None:
    assert inference_ami(instance_type) == INFERENCE_AMI == "al2023-ami-sagemaker-inference-gpu-4-1"
    assert transform_ami(instance_type) == TRANSFORM_AMI == "al2-ami-sagemaker-batch-gpu-535"
    document = dataclasses.replace(example_input(), inference_instance_type=instance_type).to_document()
    (variant,) = document["Inference"]["ProductionVariants"]
    assert variant["InferenceAmiVersion"] == INFERENCE_AMI and variant["InstanceType"] == instance_type
    assert validate_definition(build_definition(StackSettings()), document) == []


@pytest.mark.parametrize("instance_type", ["ml.m5.xlarge", "ml.c5.2xlarge", "ml.inf2.xlarge", "ml.g4ad.xlarge"])
def test_instances_without_an_nvidia_gpu_get_no_ami(instance_type: str) -> None:
    assert not is_nvidia_gpu(instance_type)
    assert inference_ami(instance_type) is None and transform_ami(instance_type) is None
    document = dataclasses.replace(example_input(), inference_instance_type=instance_type).to_document()
    assert "InferenceAmiVersion" not in document["Inference"]["ProductionVariants"][0]
    assert validate_definition(build_definition(StackSettings()), document) == []


def test_an_override_the_image_reaches_is_kept() -> None:
    chosen = dataclasses.replace(example_input(), inference_ami_version="al2-ami-sagemaker-inference-gpu-2-1")
    variant = chosen.to_document()["Inference"]["ProductionVariants"][0]
    assert variant["InferenceAmiVersion"] == "al2-ami-sagemaker-inference-gpu-2-1"  # R535: forward-compat
    assert validate_definition(build_definition(StackSettings()), chosen.to_document()) == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"inference_ami_version": "al2-ami-sagemaker-inference-gpu-3-1"}, "runs driver R550"),
        ({"inference_ami_version": "al2-ami-sagemaker-inference-neuron-2"}, "none of the NVIDIA GPU AMIs"),
        ({"inference_instance_type": "ml.m5.xlarge", "inference_ami_version": INFERENCE_AMI}, "has none"),
        ({"inference_instance_type": "ml.p3.2xlarge"}, "no kernels for its GPU (V100, sm_70)"),
        ({"training_instance_type": "ml.p3.8xlarge"}, "no kernels for its GPU (V100, sm_70)"),
    ],
)
def test_a_choice_the_image_would_refuse_fails_before_any_aws_call(changes: dict, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        dataclasses.replace(example_input(), **changes)


def test_a_batch_transform_ami_the_image_cannot_reach_is_refused() -> None:
    with pytest.raises(ValueError, match="runs driver R470"):
        transform_ami("ml.g5.xlarge", "al2-ami-sagemaker-batch-gpu-470")


def test_every_inference_ami_is_one_botocore_knows() -> None:
    shape = MODEL.shape_for("ProductionVariantInferenceAmiVersion")
    assert set(INFERENCE_AMI_DRIVERS) <= set(shape.enum)
    assert "TransformAmiVersion" in MODEL.shape_for("TransformResources").members
    assert all(1 <= len(name) <= 63 for name in TRANSFORM_AMI_DRIVERS)  # botocore's pattern, no enum there


def test_render_emits_the_ami_for_the_gpu_variant(tmp_path: Path) -> None:
    assert main(["render", "--out", str(tmp_path)]) == 0
    document = json.loads((tmp_path / "example-input.json").read_text())
    assert document["Inference"]["InstanceType"] == "ml.g4dn.xlarge"
    assert document["Inference"]["ProductionVariants"][0]["InferenceAmiVersion"] == INFERENCE_AMI
    definition = json.loads((tmp_path / "statemachine.asl.json").read_text())
    parameters = definition["States"]["CreateEndpointConfig"]["Parameters"]
    assert parameters["ProductionVariants.$"] == "$.Inference.ProductionVariants"
