"""The train-and-deploy workflow as plain Amazon States Language, built by typed functions.

    definition = build_definition(StackSettings())   # a dict; json.dumps it

The chain (state names in brackets)::

    [ChooseImage] -- ImageUri given (pinned by digest) --------------------------> [UseGivenImage]
         |                                                                               |
    [BuildImage] Lambda: ECR repo, build context to S3, CodeBuild project, StartBuild   |
         |  Retry States.TaskFailed every 15 s, 2 attempts, backoff 4.0; Catch -> [BuildImageFailed]
    [DescribeBuild] <-> [WaitForBuild]   (polled here, not inside the Lambda)           |
         |  [IsBuildDone]: FAILED/FAULT/STOPPED/TIMED_OUT -> [BuildFailed]              |
    [ResolveImageDigest] ECR DescribeImages -> [UseBuiltImage] repo@sha256:...          |
         +-------------------------------------------------------------------------------+
    [TrainModel] createTrainingJob.sync
    [MeasureGateMetric] Map over FinalMetricDataList -> [ReadGateMetric] -> [CheckQualityGate]
         |  none logged -> [GateMetricNotLogged]; below $.QualityGate.MinValue -> [BelowQualityBar]
    [ChooseApprovalStatus] -> [RegisterModel] CreateModelPackage (Approved | PendingManualApproval)
    [DescribeModelPackage] <-> [WaitForApproval] until Approved; Rejected -> [Rejected]; -> [ApprovalTimedOut]
    [CreateModel] -> [CreateEndpointConfig] -> [FindEndpoint] -> [CheckEndpoint] -> [EndpointExists]:
         new: [CreateEndpoint]; exists: [PutErrorAlarm] -> [PutLatencyAlarm] -> [UpdateEndpoint] blue/green
    [DescribeEndpoint] <-> [WaitForEndpoint] until InService; Failed -> [EndpointFailed]
    [IsNewModelServing] -> [Deployed]; rolled back: [FindFiredAlarms] -> [DeploymentRolledBack]

ARNs of the stack's own resources are ``${BuildFunctionArn}`` / ``${SageMakerRoleArn}``
placeholders, replaced by CloudFormation's DefinitionSubstitutions (see ``substitute``).
The execution input is ``execution.ExecutionInput.to_document()``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from maskrcnn.serve.content_types import RESPONSE_TYPES, SUPPORTED_TYPES
from maskrcnn.serve.settings import DEFAULT_TIMEOUT_S
from maskrcnn.train.metrics import METRIC_DEFINITIONS

from pipeline.execution import CHECKPOINT_LOCAL_PATH
from pipeline.settings import BUILD_FUNCTION_ARN, SAGEMAKER_ROLE_ARN, StackSettings

State = dict[str, Any]

LAMBDA_INVOKE = "arn:aws:states:::lambda:invoke"
SAGEMAKER = "arn:aws:states:::sagemaker"
AWS_SDK = "arn:aws:states:::aws-sdk"
BUILD_FAILURE_STATUSES = ("FAILED", "FAULT", "STOPPED", "TIMED_OUT")
SERVING_PORT_ENV = {"SAGEMAKER_MODEL_SERVER_TIMEOUT": str(DEFAULT_TIMEOUT_S)}
# The two alarms of an endpoint that roll a deployment back (names start with the endpoint's, so with the prefix).
ERROR_ALARM = "States.Format('{}-5xx-errors', $.EndpointName)"
LATENCY_ALARM = "States.Format('{}-model-latency', $.EndpointName)"
ERROR_METRIC, LATENCY_METRIC = "Invocation5XXErrors", "ModelLatency"  # the endpoint metrics they watch

# The build Lambda only starts a CodeBuild build: a failure is an API throttle or a cold start, over in seconds.
BUILD_RETRY: State = {
    "ErrorEquals": ["States.TaskFailed"],
    "IntervalSeconds": 15,
    "MaxAttempts": 2,
    "BackoffRate": 4.0,
}
# Throttling and transient API errors of the polling calls; the work itself is never retried here.
SDK_RETRY: State = {
    "ErrorEquals": ["States.TaskFailed"],
    "IntervalSeconds": 5,
    "MaxAttempts": 3,
    "BackoffRate": 2.0,
}


def task(
    resource: str,
    parameters: Mapping[str, Any],
    next_state: str | None,
    *,
    result_path: str | None = None,
    result_selector: Mapping[str, Any] | None = None,
    retry: Sequence[State] = (),
    catch: Sequence[State] = (),
    comment: str | None = None,
) -> State:
    """One Task state; ``result_path=None`` keeps the input and discards the result."""
    state: State = {"Type": "Task", "Resource": resource, "Parameters": dict(parameters)}
    if comment:
        state["Comment"] = comment
    if result_selector is not None:
        state["ResultSelector"] = dict(result_selector)
    state["ResultPath"] = result_path
    if retry:
        state["Retry"] = list(retry)
    if catch:
        state["Catch"] = list(catch)
    state.update({"Next": next_state} if next_state else {"End": True})
    return state


def pass_state(parameters: Mapping[str, Any], result_path: str, next_state: str) -> State:
    return {"Type": "Pass", "Parameters": dict(parameters), "ResultPath": result_path, "Next": next_state}


def choice(choices: Sequence[State], default: str) -> State:
    return {"Type": "Choice", "Choices": list(choices), "Default": default}


def wait(seconds: int, next_state: str) -> State:
    return {"Type": "Wait", "Seconds": seconds, "Next": next_state}


def fail(error: str, cause: str) -> State:
    return {"Type": "Fail", "Error": error, "Cause": cause}


def any_of(variable: str, values: Sequence[str], next_state: str) -> State:
    return {"Or": [{"Variable": variable, "StringEquals": v} for v in values], "Next": next_state}


def build_states(settings: StackSettings) -> dict[str, State]:
    """From the start to an image URI pinned by digest in ``$.Image.Uri``."""
    return {
        "ChooseImage": choice(
            [{"Variable": "$.ImageUri", "IsPresent": True, "Next": "UseGivenImage"}], default="BuildImage"
        ),
        "UseGivenImage": pass_state({"Uri.$": "$.ImageUri"}, "$.Image", "TrainModel"),
        "BuildImage": task(
            LAMBDA_INVOKE,
            {
                "FunctionName": BUILD_FUNCTION_ARN,
                "Payload": {"Build.$": "$.Build", "ExecutionId.$": "$$.Execution.Id"},
            },
            "DescribeBuild",
            comment="Starts a CodeBuild build and returns at once; the state machine waits for it.",
            result_selector={
                "BuildId.$": "$.Payload.BuildId",
                "RepositoryName.$": "$.Payload.RepositoryName",
                "RepositoryUri.$": "$.Payload.RepositoryUri",
                "ImageTag.$": "$.Payload.ImageTag",
            },
            result_path="$.BuildResult",
            retry=[BUILD_RETRY],
            catch=[{"ErrorEquals": ["States.TaskFailed"], "ResultPath": "$.Error", "Next": "BuildImageFailed"}],
        ),
        "BuildImageFailed": fail("BuildImageFailed", "The build Lambda failed after its retries."),
        "DescribeBuild": task(
            f"{AWS_SDK}:codebuild:batchGetBuilds",
            {"Ids.$": "States.Array($.BuildResult.BuildId)"},
            "IsBuildDone",
            # Paths end at the array index: `[0].Field` is read differently by some interpreters (moto).
            result_selector={"Build.$": "$.Builds[0]"},
            result_path="$.LastBuild",
            retry=[SDK_RETRY],
        ),
        "IsBuildDone": choice(
            [
                {
                    "Variable": "$.LastBuild.Build.BuildStatus",
                    "StringEquals": "SUCCEEDED",
                    "Next": "ResolveImageDigest",
                },
                any_of("$.LastBuild.Build.BuildStatus", BUILD_FAILURE_STATUSES, "BuildFailed"),
            ],
            default="WaitForBuild",
        ),
        "WaitForBuild": wait(settings.build_poll_seconds, "DescribeBuild"),
        "BuildFailed": fail("BuildFailed", "The CodeBuild build did not succeed; see its logs."),
        "ResolveImageDigest": task(
            f"{AWS_SDK}:ecr:describeImages",
            {
                "RepositoryName.$": "$.BuildResult.RepositoryName",
                "ImageIds": [{"ImageTag.$": "$.BuildResult.ImageTag"}],
            },
            "UseBuiltImage",
            result_selector={"Detail.$": "$.ImageDetails[0]"},
            result_path="$.BuiltImage",
            retry=[SDK_RETRY],
        ),
        "UseBuiltImage": pass_state(
            {"Uri.$": "States.Format('{}@{}', $.BuildResult.RepositoryUri, $.BuiltImage.Detail.ImageDigest)"},
            "$.Image",
            "TrainModel",
        ),
    }


def training_parameters() -> dict[str, Any]:
    """CreateTrainingJob request; the dynamic parts come from the execution input."""
    return {
        "TrainingJobName.$": "$.JobName",
        "RoleArn": SAGEMAKER_ROLE_ARN,
        "AlgorithmSpecification": {
            "TrainingImage.$": "$.Image.Uri",
            "TrainingInputMode": "File",
            "MetricDefinitions": [dict(d) for d in METRIC_DEFINITIONS],
            "EnableSageMakerMetricsTimeSeries": True,
        },
        "HyperParameters.$": "$.Training.HyperParameters",
        "InputDataConfig.$": "$.Training.InputDataConfig",
        "OutputDataConfig": {"S3OutputPath.$": "$.OutputPath"},
        "ResourceConfig": {
            "InstanceType.$": "$.Training.InstanceType",
            "InstanceCount.$": "$.Training.InstanceCount",
            "VolumeSizeInGB.$": "$.Training.VolumeSizeInGB",
        },
        "StoppingCondition.$": "$.Training.StoppingCondition",
        "EnableManagedSpotTraining.$": "$.Training.UseSpot",
        "CheckpointConfig": {"S3Uri.$": "$.CheckpointS3Uri", "LocalPath": CHECKPOINT_LOCAL_PATH},
    }


def gate_states() -> dict[str, State]:
    """From a trained job to its gate metric checked against ``$.QualityGate``, before anything is registered.

    ASL has no lookup by a name held in the input, so a Map walks ``FinalMetricDataList`` and keeps the
    value of the one metric named ``$.QualityGate.MetricName``; a job that logged none of it fails too.
    """
    item_processor = {
        "ProcessorConfig": {"Mode": "INLINE"},
        "StartAt": "IsGateMetric",
        "States": {
            "IsGateMetric": choice(
                [{"Variable": "$.Metric.MetricName", "StringEqualsPath": "$.Wanted", "Next": "KeepValue"}],
                default="SkipMetric",
            ),
            "KeepValue": {"Type": "Pass", "Parameters": {"Value.$": "$.Metric.Value"}, "End": True},
            "SkipMetric": {"Type": "Pass", "Result": {}, "End": True},
        },
    }
    below = "States.Format('{} = {} is below the quality bar {}', $.Gate.MetricName, $.Gate.Value, $.Gate.MinValue)"
    return {
        "MeasureGateMetric": {
            "Type": "Map",
            "ItemsPath": "$.TrainingJob.FinalMetricDataList",
            "ItemSelector": {"Metric.$": "$$.Map.Item.Value", "Wanted.$": "$.QualityGate.MetricName"},
            "ItemProcessor": item_processor,
            "ResultSelector": {"Values.$": "$[*].Value"},
            "ResultPath": "$.GateMetric",
            "Next": "IsGateMetricLogged",
        },
        "IsGateMetricLogged": choice(
            [{"Variable": "$.GateMetric.Values[0]", "IsPresent": True, "Next": "ReadGateMetric"}],
            default="GateMetricNotLogged",
        ),
        "GateMetricNotLogged": {
            "Type": "Fail",
            "Error": "GateMetricNotLogged",
            "CausePath": "States.Format('the training job logged no {}: no model to judge', $.QualityGate.MetricName)",
        },
        "ReadGateMetric": pass_state(
            {
                "MetricName.$": "$.QualityGate.MetricName",
                "Value.$": "$.GateMetric.Values[0]",
                "MinValue.$": "$.QualityGate.MinValue",
            },
            "$.Gate",
            "CheckQualityGate",
        ),
        "CheckQualityGate": choice(
            [{"Variable": "$.Gate.Value", "NumericLessThanPath": "$.Gate.MinValue", "Next": "BelowQualityBar"}],
            default="ChooseApprovalStatus",
        ),
        "BelowQualityBar": {"Type": "Fail", "Error": "BelowQualityBar", "CausePath": below},
    }


def registry_states(settings: StackSettings) -> dict[str, State]:
    """From a model that passed the gate to an Approved package in the registry (or Rejected, or timed out).

    ``$.Approval.Mode`` "auto" registers it Approved; otherwise it waits PendingManualApproval, polled every
    ``$.Approval.PollSeconds`` until someone approves or rejects it (``python -m pipeline approve|reject``)
    or ``$.Approval.TimeoutSeconds`` have been waited.
    """
    status = "$.Review.Status"
    return {
        "ChooseApprovalStatus": choice(
            [{"Variable": "$.Approval.Mode", "StringEquals": "auto", "Next": "ApproveAutomatically"}],
            default="AwaitManualApproval",
        ),
        "ApproveAutomatically": {
            "Type": "Pass",
            "Result": {"Status": "Approved"},
            "ResultPath": "$.Registration",
            "Next": "RegisterModel",
        },
        "AwaitManualApproval": {
            "Type": "Pass",
            "Result": {"Status": "PendingManualApproval"},
            "ResultPath": "$.Registration",
            "Next": "RegisterModel",
        },
        "RegisterModel": task(
            f"{AWS_SDK}:sagemaker:createModelPackage",
            {
                "ModelPackageGroupName": settings.model_package_group_name,
                "ModelPackageDescription.$": "States.Format('{}: {} = {}', $.JobName, $.Gate.MetricName, $.Gate.Value)",
                "InferenceSpecification": {
                    "Containers": [
                        {
                            "Image.$": "$.Image.Uri",
                            "ModelDataUrl.$": "$.TrainingJob.S3ModelArtifacts",
                            "Environment": dict(SERVING_PORT_ENV),
                        }
                    ],
                    "SupportedContentTypes": list(SUPPORTED_TYPES),  # what the image serves, as the registry records it
                    "SupportedResponseMIMETypes": list(RESPONSE_TYPES),
                    "SupportedRealtimeInferenceInstanceTypes.$": "States.Array($.Inference.InstanceType)",
                },
                "ModelApprovalStatus.$": "$.Registration.Status",
                "MetadataProperties": {"GeneratedBy.$": "$.TrainingJob.TrainingJobArn"},
                "CustomerMetadataProperties": {
                    "TrainingJobName.$": "$.JobName",
                    "GateMetricName.$": "$.Gate.MetricName",
                    "GateMetricValue.$": "States.Format('{}', $.Gate.Value)",
                },
            },
            "StartApprovalWait",
            result_selector={"Arn.$": "$.ModelPackageArn"},
            result_path="$.ModelPackage",
        ),
        "StartApprovalWait": {
            "Type": "Pass",
            "Result": {"Seconds": 0},
            "ResultPath": "$.ApprovalWait",
            "Next": "DescribeModelPackage",
        },
        "DescribeModelPackage": task(
            f"{AWS_SDK}:sagemaker:describeModelPackage",
            {"ModelPackageName.$": "$.ModelPackage.Arn"},
            "IsModelApproved",
            result_selector={"Status.$": "$.ModelApprovalStatus"},
            result_path="$.Review",
            retry=[SDK_RETRY],
        ),
        "IsModelApproved": choice(
            [
                {"Variable": status, "StringEquals": "Approved", "Next": "CreateModel"},
                {"Variable": status, "StringEquals": "Rejected", "Next": "Rejected"},
                {
                    "Variable": "$.ApprovalWait.Seconds",
                    "NumericGreaterThanEqualsPath": "$.Approval.TimeoutSeconds",
                    "Next": "ApprovalTimedOut",
                },
            ],
            default="WaitForApproval",
        ),
        "WaitForApproval": {"Type": "Wait", "SecondsPath": "$.Approval.PollSeconds", "Next": "CountApprovalWait"},
        "CountApprovalWait": pass_state(
            {"Seconds.$": "States.MathAdd($.ApprovalWait.Seconds, $.Approval.PollSeconds)"},
            "$.ApprovalWait",
            "DescribeModelPackage",
        ),
        "Rejected": {
            "Type": "Fail",
            "Error": "Rejected",
            "CausePath": "States.Format('model package {} was rejected; nothing deployed', $.ModelPackage.Arn)",
        },
        "ApprovalTimedOut": {
            "Type": "Fail",
            "Error": "ApprovalTimedOut",
            "CausePath": "States.Format('model package {} was neither approved nor rejected within {} s', "
            "$.ModelPackage.Arn, $.Approval.TimeoutSeconds)",
        },
    }


def alarm_parameters(name: str, metric: str, statistic: Mapping[str, str], threshold: str) -> dict[str, Any]:
    """PutMetricAlarm for one endpoint metric of the AllTraffic variant, over one-minute periods."""
    return {
        "AlarmName.$": name,
        "AlarmDescription": f"{metric} of the endpoint; rolls back a deployment that trips it",
        "Namespace": "AWS/SageMaker",
        "MetricName": metric,
        "Dimensions": [
            {"Name": "EndpointName", "Value.$": "$.EndpointName"},
            {"Name": "VariantName", "Value": "AllTraffic"},
        ],
        **statistic,
        "Period": 60,
        "EvaluationPeriods": 1,
        "Threshold.$": threshold,
        "ComparisonOperator": "GreaterThanThreshold",
        "TreatMissingData": "notBreaching",  # no traffic in a minute is no evidence against the model
    }


def guarded_update_states() -> dict[str, State]:
    """An existing endpoint is updated blue/green: the new fleet beside the old one, a canary share for a baking
    period, then all traffic; either alarm (its 5xx errors, its p99 model latency, thresholds from
    ``$.Deployment``) rolls it back. The alarms are put (created or updated) per endpoint first."""
    return {
        "PutErrorAlarm": task(
            f"{AWS_SDK}:cloudwatch:putMetricAlarm",
            alarm_parameters(ERROR_ALARM, ERROR_METRIC, {"Statistic": "Sum"}, "$.Deployment.Max5xxErrors"),
            "PutLatencyAlarm",
            retry=[SDK_RETRY],
        ),
        "PutLatencyAlarm": task(
            f"{AWS_SDK}:cloudwatch:putMetricAlarm",
            alarm_parameters(
                LATENCY_ALARM,
                LATENCY_METRIC,
                {"ExtendedStatistic": "p99"},
                "$.Deployment.MaxModelLatencyMicroseconds",
            ),
            "UpdateEndpoint",
            retry=[SDK_RETRY],
        ),
        # The optimised integration takes no DeploymentConfig; the aws-sdk one sends the whole request.
        "UpdateEndpoint": task(
            f"{AWS_SDK}:sagemaker:updateEndpoint",
            {
                "EndpointName.$": "$.EndpointName",
                "EndpointConfigName.$": "$.ModelName",
                "DeploymentConfig": {
                    "BlueGreenUpdatePolicy": {
                        "TrafficRoutingConfiguration": {
                            "Type": "CANARY",
                            "CanarySize": {"Type": "CAPACITY_PERCENT", "Value.$": "$.Deployment.CanaryPercent"},
                            "WaitIntervalInSeconds.$": "$.Deployment.BakingSeconds",
                        },
                        "TerminationWaitInSeconds": 0,
                    },
                    "AutoRollbackConfiguration": {
                        "Alarms": [{"AlarmName.$": ERROR_ALARM}, {"AlarmName.$": LATENCY_ALARM}]
                    },
                },
            },
            "DescribeEndpoint",
        ),
    }


def deploy_states(settings: StackSettings) -> dict[str, State]:
    """From a pinned image to a trained model behind an InService endpoint."""
    return {
        "TrainModel": task(
            f"{SAGEMAKER}:createTrainingJob.sync",
            training_parameters(),
            "MeasureGateMetric",
            # .sync returns DescribeTrainingJob; keep only what later states read.
            result_selector={
                "S3ModelArtifacts.$": "$.ModelArtifacts.S3ModelArtifacts",
                "TrainingJobArn.$": "$.TrainingJobArn",
                "FinalMetricDataList.$": "$.FinalMetricDataList",
            },
            result_path="$.TrainingJob",
        ),
        "CreateModel": task(
            f"{SAGEMAKER}:createModel",
            {
                "ModelName.$": "$.ModelName",
                "ExecutionRoleArn": SAGEMAKER_ROLE_ARN,
                "PrimaryContainer": {
                    "Image.$": "$.Image.Uri",
                    "ModelDataUrl.$": "$.TrainingJob.S3ModelArtifacts",
                    "Environment": dict(SERVING_PORT_ENV),
                },
            },
            "CreateEndpointConfig",
        ),
        "CreateEndpointConfig": task(
            f"{SAGEMAKER}:createEndpointConfig",
            {
                "EndpointConfigName.$": "$.ModelName",
                # Rendered by ExecutionInput.production_variants: InferenceAmiVersion only on GPU instances.
                "ProductionVariants.$": "$.Inference.ProductionVariants",
            },
            "FindEndpoint",
        ),
        # NameContains is a substring match, so the exact name is checked with ArrayContains.
        "FindEndpoint": task(
            f"{AWS_SDK}:sagemaker:listEndpoints",
            {"NameContains.$": "$.EndpointName", "MaxResults": 100},
            "CheckEndpoint",
            result_selector={"Names.$": "$.Endpoints[*].EndpointName"},
            result_path="$.ExistingEndpoints",
            retry=[SDK_RETRY],
        ),
        "CheckEndpoint": pass_state(
            {"Exists.$": "States.ArrayContains($.ExistingEndpoints.Names, $.EndpointName)"},
            "$.EndpointCheck",
            "EndpointExists",
        ),
        "EndpointExists": choice(
            [{"Variable": "$.EndpointCheck.Exists", "BooleanEquals": True, "Next": "PutErrorAlarm"}],
            default="CreateEndpoint",
        ),
        "CreateEndpoint": task(
            f"{SAGEMAKER}:createEndpoint",
            {"EndpointName.$": "$.EndpointName", "EndpointConfigName.$": "$.ModelName"},
            "DescribeEndpoint",
        ),
        **guarded_update_states(),
        "DescribeEndpoint": task(
            f"{AWS_SDK}:sagemaker:describeEndpoint",
            {"EndpointName.$": "$.EndpointName"},
            "IsEndpointInService",
            result_selector={"Status.$": "$.EndpointStatus", "ConfigName.$": "$.EndpointConfigName"},
            result_path="$.Endpoint",
            retry=[SDK_RETRY],
        ),
        "IsEndpointInService": choice(
            [
                {"Variable": "$.Endpoint.Status", "StringEquals": "InService", "Next": "IsNewModelServing"},
                any_of("$.Endpoint.Status", ("Failed", "UpdateRollbackFailed"), "EndpointFailed"),
            ],
            default="WaitForEndpoint",
        ),
        # InService again with the old config: SageMaker rolled the update back (an alarm fired during the
        # baking period, or the new fleet never became healthy); the old model serves on.
        "IsNewModelServing": choice(
            [{"Variable": "$.Endpoint.ConfigName", "StringEqualsPath": "$.ModelName", "Next": "Deployed"}],
            default="FindFiredAlarms",
        ),
        "FindFiredAlarms": task(
            f"{AWS_SDK}:cloudwatch:describeAlarms",
            {"AlarmNames.$": f"States.Array({ERROR_ALARM}, {LATENCY_ALARM})", "StateValue": "ALARM"},
            "DeploymentRolledBack",
            result_selector={"Names.$": "$.MetricAlarms[*].AlarmName"},
            result_path="$.FiredAlarms",
            retry=[SDK_RETRY],
        ),
        "DeploymentRolledBack": {
            "Type": "Fail",
            "Error": "DeploymentRolledBack",
            "CausePath": "States.Format('the update to {} was rolled back and {} serves on; alarms in ALARM: {} "
            "(none: the new fleet failed, see DescribeEndpoint FailureReason)', $.ModelName, $.Endpoint.ConfigName, "
            "States.JsonToString($.FiredAlarms.Names))",
        },
        "WaitForEndpoint": wait(settings.endpoint_poll_seconds, "DescribeEndpoint"),
        "EndpointFailed": fail("EndpointFailed", "The endpoint went to Failed; see DescribeEndpoint's FailureReason."),
        "Deployed": {"Type": "Succeed"},
    }


def build_definition(settings: StackSettings) -> dict[str, Any]:
    """The complete state machine definition."""
    return {
        "Comment": "Build the Mask R-CNN image, train it on SageMaker and deploy it to an endpoint.",
        "StartAt": "ChooseImage",
        "States": {
            **build_states(settings),
            **gate_states(),
            **registry_states(settings),
            **deploy_states(settings),
        },
    }


def substitute(definition: Mapping[str, Any], values: Mapping[str, str]) -> dict[str, Any]:
    """Replace ``${Name}`` placeholders as CloudFormation's DefinitionSubstitutions would."""
    text = json.dumps(definition)
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    result: dict[str, Any] = json.loads(text)
    return result


def api_calls(definition: Mapping[str, Any]) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """State name -> (botocore service, operation, Parameters) for every SageMaker and aws-sdk task.

    Both the optimised ``sagemaker:createX`` integrations and ``aws-sdk:service:action`` tasks send
    their Parameters as the API's request, so both can be checked against botocore's shapes.
    """
    found: dict[str, tuple[str, str, dict[str, Any]]] = {}
    for name, state in definition["States"].items():
        resource: str = state.get("Resource", "")
        if state["Type"] != "Task":
            continue
        if resource.startswith(f"{SAGEMAKER}:"):
            service, action = "sagemaker", resource.removeprefix(f"{SAGEMAKER}:")
        elif resource.startswith(f"{AWS_SDK}:"):
            service, action = resource.removeprefix(f"{AWS_SDK}:").split(":", 1)
        else:
            continue
        action = action.split(".")[0]
        found[name] = (service, action[0].upper() + action[1:], state["Parameters"])
    return found
