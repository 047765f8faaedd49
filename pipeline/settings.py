"""Stack-wide names and defaults, in one frozen object.

Every resource name the template, the workflow and the build Lambda share is derived here, so
the three cannot drift apart. Override with ``python -m pipeline render --prefix ...``.
"""

from __future__ import annotations

from dataclasses import dataclass

# Placeholders the state machine definition carries; CloudFormation's DefinitionSubstitutions
# (and the tests) replace them with real ARNs.
BUILD_FUNCTION_ARN = "${BuildFunctionArn}"
SAGEMAKER_ROLE_ARN = "${SageMakerRoleArn}"


@dataclass(frozen=True)
class StackSettings:
    """Names shared by the template, the workflow and the build Lambda."""

    prefix: str = "maskrcnn"  # every SageMaker resource name must start with it (IAM scopes on it)
    repository_name: str = "maskrcnn-sagemaker"  # ECR repository; `make build` tags maskrcnn-sagemaker:latest
    build_poll_seconds: int = 30  # Wait between CodeBuild status polls
    endpoint_poll_seconds: int = 60  # Wait between endpoint status polls
    build_timeout_minutes: int = 120  # CodeBuild build timeout
    build_compute_type: str = "BUILD_GENERAL1_LARGE"  # docker build of a torch image needs RAM
    build_image: str = "aws/codebuild/standard:7.0"  # Ubuntu 22.04, docker, python 3.11, aws cli v2
    log_retention_days: int = 365  # CloudWatch log groups of the Lambda, CodeBuild and the state machine

    def __post_init__(self) -> None:
        if not self.prefix or not self.prefix.islower() or not self.prefix.replace("-", "").isalnum():
            raise ValueError(f"prefix must be lower-case alphanumerics and dashes, got {self.prefix!r}")

    @property
    def project_name(self) -> str:
        return f"{self.prefix}-image-build"

    @property
    def function_name(self) -> str:
        return f"{self.prefix}-build-image"

    @property
    def model_package_group_name(self) -> str:
        return f"{self.prefix}-models"

    @property
    def state_machine_name(self) -> str:
        return f"{self.prefix}-train-deploy"

    @property
    def endpoint_name(self) -> str:
        """The endpoint an execution deploys to unless its input names another."""
        return f"{self.prefix}-endpoint"
