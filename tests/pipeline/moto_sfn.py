"""Test-only adapter that lets moto 5.2.5's Step Functions interpreter run this workflow.

moto executes state machines for real with ``mock_aws(config={"stepfunctions":
{"execute_state_machine": True}})`` (the interpreter under moto/stepfunctions/parser), but:

* it refuses ``.sync`` for SageMaker and CodeBuild ("Unsupported .sync callback procedure");
  ``SyncSageMaker`` resolves ``createTrainingJob.sync`` by polling DescribeTrainingJob, as
  Step Functions does, and fails the task on Failed / Stopped;
* its Lambda invoke needs Docker; ``invoke_in_process`` calls the Python handler instead and
  reports exceptions the way Lambda does (FunctionError + errorType);
* moto implements neither SageMaker UpdateEndpoint nor CodeBuild UpdateProject; both are
  added to moto's responses with the minimal behaviour the workflow relies on;
* its aws-sdk integration skips the PascalCase <-> API-casing conversion Step Functions does
  (``_normalise_parameters`` / ``_normalise_response`` are stubs in moto); ``sdk_casing`` restores
  it with moto's own ``_to_boto_request`` / ``_from_boto_response`` and botocore's shapes;
* moto's CodeBuild reports every build SUCCEEDED on first look; ``BuildScript`` scripts the
  statuses a build goes through so the poll loop and the failure branch run.

Everything is pinned to moto 5.2.5 (``MOTO_VERSION``); the fixtures skip on another version
rather than test against internals that moved.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

MOTO_VERSION = "5.2.5"


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def sync_sagemaker_class() -> type:
    """The adapter class, built lazily so importing this module needs no moto internals."""
    from moto.stepfunctions.parser.api import HistoryEventType, TaskFailedEventDetails
    from moto.stepfunctions.parser.asl.component.common.error_name.custom_error_name import CustomErrorName
    from moto.stepfunctions.parser.asl.component.common.error_name.failure_event import (
        FailureEvent,
        FailureEventException,
    )
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.resource import (
        ResourceCondition,
    )
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.state_task_service_unsupported import (
        StateTaskServiceUnsupported,
    )
    from moto.stepfunctions.parser.asl.eval.event.event_detail import EventDetails
    from moto.stepfunctions.parser.asl.utils.boto_client import boto_client_for

    class SyncSageMaker(StateTaskServiceUnsupported):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self._supported_integration_patterns = {
                ResourceCondition.WaitForTaskToken,
                ResourceCondition.Sync,
            }

        def _build_sync_resolver(self, env, resource_runtime_part, normalised_parameters, state_credentials):  # type: ignore[no-untyped-def]
            client = boto_client_for(
                service="sagemaker", region=resource_runtime_part.region, state_credentials=state_credentials
            )
            env.stack.pop()  # CreateTrainingJob's own answer; .sync answers with the description
            name = normalised_parameters["TrainingJobName"]

            def resolve() -> dict[str, Any] | None:
                described = client.describe_training_job(TrainingJobName=name)
                described.pop("ResponseMetadata", None)
                status = described["TrainingJobStatus"]
                if status == "Completed":
                    return dict(_json_safe(described))
                if status in ("Failed", "Stopped"):
                    error = f"SageMaker.TrainingJob{status}"
                    raise FailureEventException(
                        FailureEvent(
                            env=env,
                            error_name=CustomErrorName(error),
                            event_type=HistoryEventType.TaskFailed,
                            event_details=EventDetails(
                                taskFailedEventDetails=TaskFailedEventDetails(
                                    resource=self._get_sfn_resource(),
                                    resourceType=self._get_sfn_resource_type(),
                                    error=error,
                                    cause=described.get("FailureReason", status),
                                )
                            ),
                        )
                    )
                return None

            return resolve

    return SyncSageMaker


def invoke_in_process(
    handlers: Mapping[str, Callable[[Any, Any], Any]], calls: list[dict[str, Any]]
) -> Callable:
    """A stand-in for moto's ``_invoke_lambda_function`` that runs handlers by function name or ARN."""

    def invoke(parameters: dict[str, Any], region: str, state_credentials: Any) -> dict[str, Any]:
        name = parameters["FunctionName"].split(":function:")[-1].split(":")[0]
        payload = parameters.get("Payload") or b"{}"
        event = json.loads(payload.decode() if isinstance(payload, bytes) else payload)
        calls.append(event)
        try:
            result = handlers[name](event, None)
        except Exception as error:  # report it as Lambda does: the error's class becomes the error name
            return {
                "StatusCode": 200,
                "FunctionError": "Unhandled",
                "ExecutedVersion": "$LATEST",
                "Payload": {"errorType": type(error).__name__, "errorMessage": str(error)},
            }
        return {"StatusCode": 200, "ExecutedVersion": "$LATEST", "Payload": _json_safe(result)}

    return invoke


def sdk_casing(service_class: type) -> tuple[Callable[..., None], Callable[..., None]]:
    """PascalCase requests to the API's casing and responses back, as Step Functions does."""
    import botocore.session

    def operation(self: Any, boto_service_name: str | None, service_action_name: str | None) -> Any:
        model = botocore.session.get_session().get_service_model(
            self._get_boto_service_name(boto_service_name)
        )
        action = self._get_boto_service_action(service_action_name)
        name = next(op for op in model.operation_names if camel_to_snake(op) == action)
        return model.operation_model(name)

    def normalise_parameters(
        self: Any,
        parameters: dict[str, Any],
        boto_service_name: str | None = None,
        service_action_name: str | None = None,
    ) -> None:
        shape = operation(self, boto_service_name, service_action_name).input_shape
        if shape is not None:
            self._to_boto_request(parameters, shape)

    def normalise_response(
        self: Any, response: Any, boto_service_name: str | None = None, service_action_name: str | None = None
    ) -> None:
        shape = operation(self, boto_service_name, service_action_name).output_shape
        if shape is not None:
            self._from_boto_response(response, shape)
        if isinstance(response, dict):  # timestamps reach the state as strings, as in Step Functions
            safe = _json_safe(response)
            response.clear()
            response.update(safe)

    return normalise_parameters, normalise_response


def camel_to_snake(name: str) -> str:
    from moto.stepfunctions.parser.utils import camel_to_snake_case

    return str(camel_to_snake_case(name))


@dataclass
class BuildScript:
    """Statuses successive BatchGetBuilds calls report; the last one repeats."""

    statuses: list[str] = field(default_factory=lambda: ["SUCCEEDED"])
    looks: int = 0

    def next_status(self) -> str:
        status = self.statuses[min(self.looks, len(self.statuses) - 1)]
        self.looks += 1
        return status


@dataclass
class Recorder:
    """What the adapted interpreter did, for the tests to assert on."""

    lambda_calls: list[dict[str, Any]] = field(default_factory=list)
    retry_sleeps: list[float] = field(default_factory=list)
    waits: list[int] = field(default_factory=list)
    build: BuildScript = field(default_factory=BuildScript)


def install(monkeypatch: pytest.MonkeyPatch, handlers: Mapping[str, Callable[[Any, Any], Any]]) -> Recorder:
    """Patch moto's interpreter and backends for this test; monkeypatch undoes it all."""
    import moto
    from moto.codebuild.models import CodeBuildBackend
    from moto.codebuild.responses import CodeBuildResponse
    from moto.sagemaker.responses import SageMakerResponse
    from moto.stepfunctions.parser.asl.component.common.retry import retrier_decl
    from moto.stepfunctions.parser.asl.component.state.exec.state_task import (
        lambda_eval_utils,
        state_task_factory,
    )
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service import (
        state_task_service_factory,
    )
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.state_task_service_aws_sdk import (
        StateTaskServiceAwsSdk,
    )
    from moto.stepfunctions.parser.asl.component.state.wait.wait_function.wait_function import WaitFunction

    if moto.__version__ != MOTO_VERSION:
        pytest.skip(
            f"the Step Functions adapter is written against moto {MOTO_VERSION}, found {moto.__version__}"
        )
    recorder = Recorder()
    sync_sagemaker = sync_sagemaker_class()
    original_factory = state_task_service_factory.state_task_service_for

    def service_for(service_name: str) -> Any:
        return sync_sagemaker() if service_name == "sagemaker" else original_factory(service_name)

    monkeypatch.setattr(state_task_factory, "state_task_service_for", service_for)
    monkeypatch.setattr(
        lambda_eval_utils, "_invoke_lambda_function", invoke_in_process(handlers, recorder.lambda_calls)
    )
    # Only the retrier's own view of ``time`` is replaced; time.sleep stays real everywhere else.
    monkeypatch.setattr(retrier_decl, "time", SimpleNamespace(sleep=recorder.retry_sleeps.append))
    monkeypatch.setattr(
        WaitFunction, "_wait_interval", lambda self, env, wait_seconds: recorder.waits.append(wait_seconds)
    )

    original_batch_get_builds = CodeBuildBackend.batch_get_builds

    def batch_get_builds(self: Any, ids: list[str]) -> list[dict[str, Any]]:
        builds = original_batch_get_builds(self, ids)
        status = recorder.build.next_status()
        for build in builds:
            build["buildStatus"] = status
        return builds

    def update_project(self: Any) -> Any:
        from moto.core.responses import ActionResult

        project = self.codebuild_backend.codebuild_projects[self._get_param("name")]
        metadata = project.project_metadata
        for field_name in (
            "source",
            "environment",
            "artifacts",
            "serviceRole",
            "logsConfig",
            "timeoutInMinutes",
        ):
            if self._get_param(field_name) is not None:
                metadata[field_name] = self._get_param(field_name)
        return ActionResult({"project": metadata})

    def update_endpoint(self: Any) -> Any:
        from moto.core.responses import ActionResult

        endpoint = self.sagemaker_backend.endpoints[self._get_param("EndpointName")]
        endpoint.endpoint_config_name = self._get_param("EndpointConfigName")
        endpoint.endpoint_status = "InService"
        return ActionResult({"EndpointArn": endpoint.arn})

    normalise_parameters, normalise_response = sdk_casing(StateTaskServiceAwsSdk)
    monkeypatch.setattr(StateTaskServiceAwsSdk, "_normalise_parameters", normalise_parameters)
    monkeypatch.setattr(StateTaskServiceAwsSdk, "_normalise_response", normalise_response)
    monkeypatch.setattr(CodeBuildBackend, "batch_get_builds", batch_get_builds)
    monkeypatch.setattr(CodeBuildResponse, "update_project", update_project, raising=False)
    monkeypatch.setattr(SageMakerResponse, "update_endpoint", update_endpoint, raising=False)
    return recorder


def history(client: Any, execution_arn: str) -> Iterator[dict[str, Any]]:
    paginator = client.get_paginator("get_execution_history")
    for page in paginator.paginate(executionArn=execution_arn):
        yield from page["events"]
