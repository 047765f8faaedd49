"""What moto 5.2.5's Step Functions interpreter lacks to run this project's state machine.

moto executes state machines for real with ``mock_aws(config={"stepfunctions":
{"execute_state_machine": True}})`` (the interpreter under moto/stepfunctions/parser, derived from
LocalStack's), but:

* it refuses ``.sync`` for SageMaker ("Unsupported .sync callback procedure");
  ``SyncSageMaker`` resolves ``createTrainingJob.sync`` by polling DescribeTrainingJob, as
  Step Functions does, and fails the task with ``SageMaker.TrainingJobFailed`` /
  ``SageMaker.TrainingJobStopped`` and the job's FailureReason as the cause;
* its Lambda invoke needs Docker; ``invoke_in_process`` calls the Python handler instead and
  reports exceptions the way Lambda does (FunctionError + errorType);
* moto implements neither SageMaker UpdateEndpoint nor CodeBuild UpdateProject; both are
  added with the minimal behaviour the workflow relies on (the endpoint takes the new config at once,
  unless :attr:`Backing.update_endpoint` does the update);
* moto's CloudWatch DescribeAlarms drops ``StateValue`` when ``AlarmNames`` is given (AWS applies both):
  ``_describe_alarms_response`` applies both, so the rollback branch names only the alarms that fired;
* its aws-sdk integration skips the PascalCase <-> API-casing conversion Step Functions does
  (``_normalise_parameters`` / ``_normalise_response`` are stubs in moto); ``sdk_casing`` restores
  it with moto's own ``_to_boto_request`` / ``_from_boto_response`` and botocore's shapes.

Past the interpreter, moto records every SageMaker and CodeBuild request and answers from its records. A caller
that does the work for real says so through :class:`Backing`: callbacks that moto's recorded job, endpoint or build
is handed to (:class:`local.workflow.LocalSageMaker`, :class:`local.codebuild.LocalCodeBuild`; the tests' Recorder).
This module is the one place that patches moto: :func:`interpreter_patches` lists every change as
``(owner, attribute, value)``, one per attribute; the caller applies them with what it has
(``unittest.mock.patch.object`` in :mod:`local.workflow`, pytest's monkeypatch in tests/pipeline), so both undo
them the same way. Everything is pinned to moto 5.2.5
(``MOTO_VERSION``): :func:`check_moto` refuses another version rather than run against internals
that moved. moto is imported inside the functions: a heavy development dependency, which importing this module
(for :class:`Backing`, :func:`history`) does not need.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from local.errors import HarnessError

MOTO_VERSION = "5.2.5"
Patch = tuple[Any, str, Any]  # (owner, attribute name, new value)


@dataclass(frozen=True)
class Backing:
    """Who does the work behind moto's records; each callback gets moto's record once moto made it.

    A callback left None keeps moto's own answer (the stand-in's, for UpdateEndpoint).
    """

    # CreateTrainingJob: moto's job record (MetricDefinitions as requested); the callback owns its status.
    training_job: Callable[[Any], None] | None = None
    # CreateEndpoint: moto's endpoint record and the config name; the callback owns its status.
    create_endpoint: Callable[[Any, str], None] | None = None
    # UpdateEndpoint: the endpoint record, the new config name and the request's DeploymentConfig (or None).
    update_endpoint: Callable[[Any, str, Any], None] | None = None
    # StartBuild: the project's metadata, moto's build record, sourceLocationOverride, environmentVariablesOverride.
    start_build: Callable[[Mapping[str, Any], dict[str, Any], str | None, list[Mapping[str, str]]], None] | None = None
    # BatchGetBuilds: the ids asked for and moto's own answer on demand (asking marks the builds SUCCEEDED in moto's
    # records); returns the answer to give.
    batch_get_builds: Callable[[list[str], Callable[[], list[dict[str, Any]]]], list[dict[str, Any]]] | None = None


class UnsupportedMoto(HarnessError):
    """The installed moto is not the version the interpreter adapter is written against."""


def check_moto() -> None:
    import moto

    if moto.__version__ != MOTO_VERSION:
        raise UnsupportedMoto(
            f"the Step Functions adapter is written against moto {MOTO_VERSION}, found {moto.__version__} "
            "(constraints.txt pins it)"
        )


def json_safe(value: Any) -> Any:
    """Timestamps and other non-JSON values as strings, as they reach a state in Step Functions."""
    return json.loads(json.dumps(value, default=str))


def sync_sagemaker_class() -> type:
    """The ``.sync`` SageMaker task class, built lazily so importing this module needs no moto internals."""
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

    class SyncSageMaker(StateTaskServiceUnsupported):
        def __init__(self) -> None:
            super().__init__()
            # moto declares the patterns Final and its enum's members as str: both are moto's typing, not ours.
            patterns = {ResourceCondition.WaitForTaskToken, ResourceCondition.Sync}
            self._supported_integration_patterns = patterns  # type: ignore[misc, assignment]

        def _build_sync_resolver(self, env, resource_runtime_part, normalised_parameters, state_credentials):
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
                    return dict(json_safe(described))
                if status in ("Failed", "Stopped"):
                    error = f"SageMaker.TrainingJob{status}"
                    raise FailureEventException(
                        FailureEvent(
                            env=env,
                            error_name=CustomErrorName(error),
                            event_type=HistoryEventType.TaskFailed,
                            event_details=EventDetails(  # type: ignore[typeddict-item]  # moto's TypedDict: every kind
                                taskFailedEventDetails=TaskFailedEventDetails(
                                    resource=self._get_sfn_resource(),
                                    resourceType=self._get_sfn_resource_type(),
                                    error=error,
                                    cause=described.get("FailureReason", status),
                                )
                            ),
                        )
                    )
                return None  # InProgress: moto's loop asks again in 0.5 s

            return resolve

    return SyncSageMaker


def invoke_in_process(
    handlers: Mapping[str, Callable[[Any, Any], Any]], calls: list[dict[str, Any]]
) -> Callable[..., dict[str, Any]]:
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
        return {"StatusCode": 200, "ExecutedVersion": "$LATEST", "Payload": json_safe(result)}

    return invoke


def camel_to_snake(name: str) -> str:
    from moto.stepfunctions.parser.utils import camel_to_snake_case

    return str(camel_to_snake_case(name))


def sdk_casing() -> tuple[Callable[..., None], Callable[..., None]]:
    """PascalCase requests to the API's casing and responses back, as Step Functions does."""
    import botocore.session

    def operation(self: Any, boto_service_name: str | None, service_action_name: str | None) -> Any:
        model = botocore.session.get_session().get_service_model(self._get_boto_service_name(boto_service_name))
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
            safe = json_safe(response)
            response.clear()
            response.update(safe)

    return normalise_parameters, normalise_response


def _update_project_response(self: Any) -> Any:
    """CodeBuild UpdateProject (missing in moto): the fields the build Lambda sends replace the stored ones."""
    from moto.core.responses import ActionResult

    project = self.codebuild_backend.codebuild_projects[self._get_param("name")]
    metadata = project.project_metadata
    for field_name in ("source", "environment", "artifacts", "serviceRole", "logsConfig", "timeoutInMinutes"):
        if self._get_param(field_name) is not None:
            metadata[field_name] = self._get_param(field_name)
    return ActionResult({"project": metadata})


def _update_endpoint_response(self: Any) -> Any:
    """SageMaker UpdateEndpoint (missing in moto): the request, handed to the backend's ``update_endpoint``."""
    from moto.core.responses import ActionResult

    endpoint = self.sagemaker_backend.update_endpoint(
        self._get_param("EndpointName"),
        self._get_param("EndpointConfigName"),
        deployment_config=self._get_param("DeploymentConfig"),
    )
    return ActionResult({"EndpointArn": endpoint.arn})


def _describe_alarms_response(self: Any) -> Any:
    """CloudWatch DescribeAlarms with ``AlarmNames`` and ``StateValue`` both applied, as AWS does."""
    from moto.core.responses import ActionResult

    backend = self.cloudwatch_backend
    names, prefix, state = (self._get_param(k) for k in ("AlarmNames", "AlarmNamePrefix", "StateValue"))
    if names:
        alarms = list(backend.get_alarms_by_alarm_names(names))
    elif prefix:
        alarms = list(backend.get_alarms_by_alarm_name_prefix(prefix))
    else:
        alarms = list(backend.describe_alarms())
    alarms = [a for a in alarms if state is None or a.state_value == state]
    return ActionResult(
        {
            "MetricAlarms": [a for a in alarms if a.rule is None],
            "CompositeAlarms": [a for a in alarms if a.rule is not None],
        }
    )


def finish_update(endpoint: Any, endpoint_config_name: str) -> None:
    """The stand-in update: the endpoint takes the new config and is InService at once (no server, no canary)."""
    endpoint.endpoint_config_name = endpoint_config_name
    endpoint.endpoint_status = "InService"


def backend_patches(backing: Backing) -> list[Patch]:
    """moto's SageMaker and CodeBuild, each request handed to ``backing`` once moto recorded it."""
    return [*_sagemaker_patches(backing), *_codebuild_patches(backing)]


def _sagemaker_patches(backing: Backing) -> list[Patch]:
    """CreateTrainingJob, CreateEndpoint and UpdateEndpoint (which moto lacks) handed to ``backing``."""
    from moto.sagemaker.models import SageMakerModelBackend

    original_create_job = SageMakerModelBackend.create_training_job
    original_create_endpoint = SageMakerModelBackend.create_endpoint

    def create_training_job(backend: Any, **request: Any) -> Any:
        definitions = copy.deepcopy(request["algorithm_specification"].get("MetricDefinitions"))
        job = original_create_job(backend, **request)
        if definitions is not None:  # moto replaces them with a fixed example
            job.algorithm_specification["MetricDefinitions"] = definitions
        if backing.training_job is not None:
            backing.training_job(job)
        return job

    def create_endpoint(backend: Any, endpoint_name: str, endpoint_config_name: str, tags: Any) -> Any:
        endpoint = original_create_endpoint(backend, endpoint_name, endpoint_config_name, tags)
        if backing.create_endpoint is not None:
            backing.create_endpoint(endpoint, endpoint_config_name)
        return endpoint

    def update_endpoint(
        backend: Any, endpoint_name: str, endpoint_config_name: str, deployment_config: Any = None
    ) -> Any:
        endpoint = backend.endpoints[endpoint_name]
        if backing.update_endpoint is None:
            finish_update(endpoint, endpoint_config_name)
        else:
            backing.update_endpoint(endpoint, endpoint_config_name, deployment_config)
        return endpoint

    return [
        (SageMakerModelBackend, "create_training_job", create_training_job),
        (SageMakerModelBackend, "create_endpoint", create_endpoint),
        (SageMakerModelBackend, "update_endpoint", update_endpoint),
    ]


def _codebuild_patches(backing: Backing) -> list[Patch]:
    """StartBuild (with the overrides moto drops) and BatchGetBuilds handed to ``backing``."""
    from moto.codebuild.models import CodeBuildBackend
    from moto.codebuild.responses import CodeBuildResponse

    original_start_build = CodeBuildResponse.start_build
    original_batch_get_builds = CodeBuildBackend.batch_get_builds

    def start_build(response: Any) -> Any:
        # moto's StartBuild drops the overrides; the build needs them, as CodeBuild uses them.
        result = original_start_build(response)
        if backing.start_build is not None:
            project = response.codebuild_backend.codebuild_projects[response._get_param("projectName")]
            backing.start_build(
                project.project_metadata,
                result.result["build"],  # type: ignore[index]  # moto: object
                response._get_param("sourceLocationOverride"),
                response._get_param("environmentVariablesOverride") or [],
            )
        return result

    def batch_get_builds(backend: Any, ids: list[str]) -> list[dict[str, Any]]:
        if backing.batch_get_builds is None:
            return original_batch_get_builds(backend, ids)
        return backing.batch_get_builds(ids, lambda: original_batch_get_builds(backend, ids))

    return [
        (CodeBuildResponse, "start_build", start_build),
        (CodeBuildBackend, "batch_get_builds", batch_get_builds),
    ]


def interpreter_patches(
    handlers: Mapping[str, Callable[[Any, Any], Any]],
    lambda_calls: list[dict[str, Any]],
    backing: Backing | None = None,
) -> list[Patch]:
    """Every change above, as ``(owner, attribute, value)``; Lambda ``handlers`` by function name."""
    from moto.cloudwatch.responses import CloudWatchResponse
    from moto.codebuild.responses import CodeBuildResponse
    from moto.sagemaker.responses import SageMakerResponse
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

    check_moto()
    sync_sagemaker = sync_sagemaker_class()
    original_factory = state_task_service_factory.state_task_service_for

    def service_for(service_name: str) -> Any:
        return sync_sagemaker() if service_name == "sagemaker" else original_factory(service_name)

    normalise_parameters, normalise_response = sdk_casing()
    return [
        (state_task_factory, "state_task_service_for", service_for),
        (lambda_eval_utils, "_invoke_lambda_function", invoke_in_process(handlers, lambda_calls)),
        (StateTaskServiceAwsSdk, "_normalise_parameters", normalise_parameters),
        (StateTaskServiceAwsSdk, "_normalise_response", normalise_response),
        (CodeBuildResponse, "update_project", _update_project_response),
        (SageMakerResponse, "update_endpoint", _update_endpoint_response),
        (CloudWatchResponse, "describe_alarms", _describe_alarms_response),
        *backend_patches(backing or Backing()),
    ]


def history(client: Any, execution_arn: str) -> Iterator[dict[str, Any]]:
    """Every event of an execution, oldest first (GetExecutionHistory, all pages)."""
    paginator = client.get_paginator("get_execution_history")
    for page in paginator.paginate(executionArn=execution_arn):
        yield from page["events"]
