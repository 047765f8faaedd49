"""Offline check of the workflow's API Parameters against botocore's own request shapes.

Step Functions sends a Task's Parameters as the request of the API call it names. botocore
ships the request shapes, so each SageMaker / aws-sdk task can be validated with botocore's
``ParamValidator`` once its ``.$`` keys are replaced by the values they would take::

    errors = validate_definition(definition, example_input().to_document())   # [] when valid

Values are resolved against a sample state: the execution input plus a sample of what every
earlier state writes into it (``SAMPLE_RESULTS``). The resolver knows the subset of JSONPath and
intrinsic functions the workflow uses and fails loudly on anything else.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Mapping
from typing import Any

import botocore.session
from botocore.model import ListShape, Shape, StructureShape
from botocore.validate import ParamValidator

from pipeline.workflow import AWS_SDK, api_calls, substitute

log = logging.getLogger(__name__)

SAMPLE_ACCOUNT = "123456789012"
SAMPLE_REGION = "us-east-1"
SAMPLE_SUBSTITUTIONS = {
    "BuildFunctionArn": f"arn:aws:lambda:{SAMPLE_REGION}:{SAMPLE_ACCOUNT}:function:maskrcnn-build-image",
    "SageMakerRoleArn": f"arn:aws:iam::{SAMPLE_ACCOUNT}:role/maskrcnn-sagemaker-execution",
}
_REPO_URI = f"{SAMPLE_ACCOUNT}.dkr.ecr.{SAMPLE_REGION}.amazonaws.com/maskrcnn-sagemaker"
_DIGEST = "sha256:" + "ab" * 32
# What the states before each task leave in the state (their ResultPath targets).
SAMPLE_RESULTS: dict[str, Any] = {
    "BuildResult": {
        "BuildId": "maskrcnn-image-build:6f1c1c1e-0000-4000-8000-000000000000",
        "RepositoryName": "maskrcnn-sagemaker",
        "RepositoryUri": _REPO_URI,
        "ImageTag": "git-0123456789abcdef0123456789abcdef01234567",
    },
    "LastBuild": {"Build": {"BuildStatus": "SUCCEEDED"}},
    "BuiltImage": {"Detail": {"ImageDigest": _DIGEST, "ImageTags": ["git-0123456789abcdef0123456789abcdef01234567"]}},
    "Image": {"Uri": f"{_REPO_URI}@{_DIGEST}"},
    "TrainingJob": {
        "S3ModelArtifacts": "s3://bucket/output/job/output/model.tar.gz",
        "TrainingJobArn": f"arn:aws:sagemaker:{SAMPLE_REGION}:{SAMPLE_ACCOUNT}:training-job/job",
        "FinalMetricDataList": [{"MetricName": "validation:segm_AP50", "Value": 0.87, "Timestamp": "2024-06-01"}],
    },
    "GateMetric": {"Values": [0.87]},
    "Gate": {"MetricName": "validation:segm_AP50", "Value": 0.87, "MinValue": 0.5},
    "Registration": {"Status": "PendingManualApproval"},
    "ModelPackage": {"Arn": f"arn:aws:sagemaker:{SAMPLE_REGION}:{SAMPLE_ACCOUNT}:model-package/maskrcnn-models/1"},
    "ApprovalWait": {"Seconds": 0},
    "Review": {"Status": "Approved"},
    "ExistingEndpoints": {"Names": []},
    "EndpointCheck": {"Exists": False},
    "Endpoint": {"Status": "InService", "ConfigName": "maskrcnn-model-20240601-120000"},
    "FiredAlarms": {"Names": ["maskrcnn-endpoint-5xx-errors"]},
}
SAMPLE_CONTEXT = {"Execution": {"Id": f"arn:aws:states:{SAMPLE_REGION}:{SAMPLE_ACCOUNT}:execution:sm:run-1"}}

_TOKEN = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")


class UnsupportedExpression(ValueError):
    """A ``.$`` value this offline resolver does not understand."""


def resolve_path(path: str, state: Any, context: Mapping[str, Any]) -> Any:
    """``$.a.b[0]`` against the state, ``$$.x`` against the context object."""
    if path.startswith("$$"):
        document: Any = context
        rest = path[2:]
    elif path.startswith("$"):
        document, rest = state, path[1:]
    else:
        raise UnsupportedExpression(path)
    position = 0
    while position < len(rest):
        match = _TOKEN.match(rest, position)
        if not match:
            raise UnsupportedExpression(path)
        key, index = match.groups()
        document = document[key] if key is not None else document[int(index)]
        position = match.end()
    return document


def _split_args(text: str) -> list[str]:
    args, depth, current, quoted = [], 0, "", False
    for char in text:
        if char == "'" and (not current or current[-1] != "\\"):
            quoted = not quoted
        elif not quoted and char == "(":
            depth += 1
        elif not quoted and char == ")":
            depth -= 1
        if char == "," and depth == 0 and not quoted:
            args.append(current.strip())
            current = ""
        else:
            current += char
    if current.strip():
        args.append(current.strip())
    return args


def resolve_expression(expression: str, state: Any, context: Mapping[str, Any]) -> Any:
    """A path or one of the intrinsic functions the workflow uses."""
    if expression.startswith("$"):
        return resolve_path(expression, state, context)
    match = re.fullmatch(r"States\.(\w+)\((.*)\)", expression, flags=re.DOTALL)
    if not match:
        raise UnsupportedExpression(expression)
    function, raw_args = match.groups()
    args = [a[1:-1] if a.startswith("'") else resolve_expression(a, state, context) for a in _split_args(raw_args)]
    if function == "Array":
        return list(args)
    if function == "Format":
        template, *values = args
        return template.replace("{}", "%s") % tuple(values)
    if function == "ArrayContains":
        return args[1] in args[0]
    raise UnsupportedExpression(expression)


def resolve_parameters(parameters: Any, state: Any, context: Mapping[str, Any]) -> Any:
    """Parameters with every ``key.$`` replaced by ``key`` and its resolved value."""
    if isinstance(parameters, list):
        return [resolve_parameters(item, state, context) for item in parameters]
    if not isinstance(parameters, dict):
        return parameters
    resolved: dict[str, Any] = {}
    for key, value in parameters.items():
        if key.endswith(".$"):
            resolved[key[:-2]] = copy.deepcopy(resolve_expression(value, state, context))
        else:
            resolved[key] = resolve_parameters(value, state, context)
    return resolved


def to_api_casing(value: Any, shape: Shape | None) -> Any:
    """aws-sdk tasks take PascalCase keys even where the API is camelCase (ECR, CodeBuild).

    Step Functions maps each key to the member of the same name up to the case of its first
    letter; keys with no such member are left as they are, for the validator to report.
    """
    if isinstance(shape, StructureShape) and isinstance(value, dict):
        members = {name[:1].lower() + name[1:]: name for name in shape.members}
        converted = {}
        for key, item in value.items():
            name = members.get(key[:1].lower() + key[1:], key)
            converted[name] = to_api_casing(item, shape.members.get(name))
        return converted
    if isinstance(shape, ListShape) and isinstance(value, list):
        return [to_api_casing(item, shape.member) for item in value]
    return value


def validate_request(service: str, operation: str, request: Mapping[str, Any], *, sdk_casing: bool) -> str | None:
    """botocore's own validation of one request; None when it is valid."""
    model = botocore.session.get_session().get_service_model(service)
    shape = model.operation_model(operation).input_shape
    if sdk_casing:
        request = to_api_casing(dict(request), shape)
    report = ParamValidator().validate(dict(request), shape)
    return report.generate_report() if report.has_errors() else None


def validate_definition(definition: Mapping[str, Any], execution_input: Mapping[str, Any]) -> list[str]:
    """Errors (empty when none) of every SageMaker / aws-sdk task's request for this input."""
    concrete = substitute(definition, SAMPLE_SUBSTITUTIONS)
    state = {**copy.deepcopy(dict(execution_input)), **copy.deepcopy(SAMPLE_RESULTS)}
    context = {**SAMPLE_CONTEXT, "Execution": {**SAMPLE_CONTEXT["Execution"], "Input": execution_input}}
    errors = []
    for name, (service, operation, parameters) in api_calls(concrete).items():
        request = resolve_parameters(parameters, state, context)
        sdk = concrete["States"][name]["Resource"].startswith(AWS_SDK)
        problem = validate_request(service, operation, request, sdk_casing=sdk)
        log.debug("%s: %s.%s %s", name, service, operation, "invalid" if problem else "valid")
        if problem:
            errors.append(f"{name} ({service}.{operation}): {problem}")
    return errors
