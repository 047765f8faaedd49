"""The CloudFormation template: least privilege, and the linters CI runs (cfn-lint, checkov)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from support import REPO

from pipeline.settings import StackSettings
from pipeline.template import build_template

CHECKOV = REPO / ".venv-checkov" / "bin" / "checkov"
ASL_VALIDATOR = REPO / "pipeline" / "node_modules" / ".bin" / "asl-validator"


def missing_tool(reason: str) -> None:
    """CI installs every tool, so there a missing one fails; elsewhere it skips with the reason."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must install it: see docs/pipeline.md)")
    pytest.skip(reason)


@pytest.fixture
def template() -> dict[str, Any]:
    """The template with the default settings."""
    return build_template(StackSettings())


def statements(template: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for name, resource in template["Resources"].items():
        for policy in resource.get("Properties", {}).get("Policies", []):
            found += [(name, s) for s in policy["PolicyDocument"]["Statement"]]
    return found


@pytest.mark.unit
def test_no_managed_full_access_and_no_wildcard_actions(template: dict[str, Any]) -> None:
    text = json.dumps(template)
    assert "FullAccess" not in text and "ManagedPolicyArns" not in text
    for name, statement in statements(template):
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        assert all(a != "*" and not a.endswith(":*") for a in actions), (name, actions)


@pytest.mark.unit
def test_pass_role_is_limited_to_the_receiving_service(template: dict[str, Any]) -> None:
    passes = [(name, s) for name, s in statements(template) if "iam:PassRole" in s["Action"]]
    assert {name for name, _ in passes} == {"BuildFunctionRole", "StateMachineRole"}
    for _, statement in passes:
        assert statement["Condition"]["StringEquals"]["iam:PassedToService"] in (
            "codebuild.amazonaws.com",
            "sagemaker.amazonaws.com",
        )
        assert "*" not in json.dumps(statement["Resource"])


@pytest.mark.unit
def test_star_resources_only_where_aws_has_no_resource_level(template: dict[str, Any]) -> None:
    unscoped_ok = {"ecr:GetAuthorizationToken", "cloudwatch:PutMetricData", "sagemaker:ListEndpoints"}
    for name, statement in statements(template):
        if statement["Resource"] == ["*"]:
            actions = set(statement["Action"])
            assert actions <= unscoped_ok or all(a.startswith(("logs:", "xray:")) for a in actions), (
                name,
                actions,
            )
    sagemaker_scoped = [
        s for _, s in statements(template) if any(a.startswith("sagemaker:Create") for a in s["Action"])
    ]
    assert all(all(f"/{StackSettings().prefix}" in json.dumps(r) for r in s["Resource"]) for s in sagemaker_scoped), (
        sagemaker_scoped
    )


@pytest.mark.unit
def test_repository_is_scanned_immutable_and_expiring(template: dict[str, Any]) -> None:
    repository = template["Resources"]["ImageRepository"]["Properties"]
    assert repository["ImageTagMutability"] == "IMMUTABLE"
    assert repository["ImageScanningConfiguration"] == {"ScanOnPush": True}
    rules = json.loads(repository["LifecyclePolicy"]["LifecyclePolicyText"])["rules"]
    assert {r["selection"]["tagStatus"] for r in rules} == {"tagged", "untagged"}


@pytest.mark.unit
def test_every_checkov_skip_says_why(template: dict[str, Any]) -> None:
    for name, resource in template["Resources"].items():
        for skip in resource.get("Metadata", {}).get("checkov", {}).get("skip", []):
            assert skip["id"].startswith("CKV_") and len(skip["comment"]) > 30, name


@pytest.fixture
def template_file(tmp_path: Path, template: dict[str, Any]) -> Path:
    """The template written where the linters can read it."""
    path = tmp_path / "template.json"
    path.write_text(json.dumps(template, indent=2))
    return path


@pytest.mark.integration
def test_cfn_lint_reports_nothing(template_file: Path) -> None:
    from cfnlint.api import lint_all

    matches = lint_all(template_file.read_text())
    # Errors and warnings, as the cfn-lint CLI reports by default; informational (I) rules are opt-in.
    assert [str(m) for m in matches if m.rule.id[0] in "EW"] == []


@pytest.mark.integration
def test_checkov_has_no_failed_checks(template_file: Path) -> None:
    if not CHECKOV.exists():
        missing_tool(f"checkov is not installed at {CHECKOV}")
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    result = subprocess.run(
        [
            str(CHECKOV),
            "-f",
            str(template_file),
            "--framework",
            "cloudformation",
            "--skip-download",
            "--output",
            "json",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    report = json.loads(result.stdout)
    summary = report["summary"]
    assert summary["failed"] == 0 and summary["passed"] > 40, result.stdout[-3000:]
    assert result.returncode == 0


@pytest.mark.integration
def test_asl_validator_accepts_the_definition(tmp_path: Path) -> None:
    if not ASL_VALIDATOR.exists() or shutil.which("node") is None:
        missing_tool("asl-validator is not installed: npm ci --prefix pipeline")
    from pipeline.shapes import SAMPLE_SUBSTITUTIONS
    from pipeline.workflow import build_definition, substitute

    rendered = tmp_path / "statemachine.asl.json"
    concrete = tmp_path / "statemachine.concrete.json"
    rendered.write_text(json.dumps(build_definition(StackSettings())))
    concrete.write_text(json.dumps(substitute(build_definition(StackSettings()), SAMPLE_SUBSTITUTIONS)))
    for path in (rendered, concrete):
        result = subprocess.run([str(ASL_VALIDATOR), "--json-path", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.integration
def test_asl_validator_rejects_a_broken_definition(tmp_path: Path) -> None:
    if not ASL_VALIDATOR.exists() or shutil.which("node") is None:
        missing_tool("asl-validator is not installed: npm ci --prefix pipeline")
    from pipeline.workflow import build_definition

    definition = build_definition(StackSettings())
    definition["States"]["CreateModel"]["Next"] = "NoSuchState"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(definition))
    result = subprocess.run([str(ASL_VALIDATOR), "--json-path", str(path)], capture_output=True, text=True)
    assert result.returncode != 0
