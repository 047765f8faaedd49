"""The buildspec's commands under CodeBuild's own rule: a command is judged by its exit status alone.

CodeBuild runs each listed command in one bash shell and fails the phase when a command's status is not 0;
a line that fails inside a multi-line command is not seen unless the command's last status carries it. So each
command here runs in bash, with ``make``, ``docker`` and ``aws`` replaced by shell functions, and its status
is what is asserted: a failure anywhere in the chain that matters must reach it.
"""

from __future__ import annotations

import subprocess

import pytest
import yaml
from support import REPO

pytestmark = pytest.mark.unit

PHASES = yaml.safe_load((REPO / "buildspec.yml").read_text())["phases"]


def command_status(command: str, stubs: str, env: dict[str, str]) -> tuple[int, str]:
    """Runs one buildspec command as CodeBuild does (bash, no errexit); its status and what it printed."""
    exports = "".join(f"export {name}={value!r}\n" for name, value in env.items())
    script = f'{stubs}\n{exports}{command}\nstatus=$?\necho "IMAGE_DIGEST=${{IMAGE_DIGEST:-}}"\nexit $status'
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=False)
    return result.returncode, result.stdout


BUILD = next(c for c in PHASES["build"]["commands"] if "make build" in c)
MAKE_FAILS = 'make() {{ echo "make $1"; [ "$1" != {0} ]; }}'


@pytest.mark.parametrize("failing", ["build", "test-unit", "test-container"])
def test_a_failing_build_or_test_fails_the_build_command(failing: str) -> None:
    status, printed = command_status(BUILD, MAKE_FAILS.format(failing), {"ALREADY_PUSHED": "0", "GIT_SHA": "abc"})
    assert status != 0, printed
    ran = [line.split()[1] for line in printed.splitlines() if line.startswith("make ")]
    assert ran[-1] == failing  # nothing after the failure ran


def test_the_build_command_succeeds_when_everything_does_and_skips_a_pushed_tag() -> None:
    status, printed = command_status(BUILD, MAKE_FAILS.format("none"), {"ALREADY_PUSHED": "0", "GIT_SHA": "abc"})
    assert status == 0 and [line for line in printed.splitlines() if line.startswith("make ")] == [
        "make build",
        "make test-unit",
        "make test-container",
    ]
    status, printed = command_status(BUILD, MAKE_FAILS.format("none"), {"ALREADY_PUSHED": "1", "GIT_SHA": "abc"})
    assert status == 0 and "make " not in printed


PUSH = next(c for c in PHASES["post_build"]["commands"] if "docker push" in c)
CHECK_DIGEST = next(c for c in PHASES["post_build"]["commands"] if "IMAGE_DIGEST#sha256:" in c)
PUSH_ENV = {"ALREADY_PUSHED": "0", "LOCAL_IMAGE": "img", "REPOSITORY_URI": "r/x", "IMAGE_TAG": "git-abc"}


@pytest.mark.parametrize(
    ("stubs", "succeeds"),
    [
        ('docker() { :; }; aws() { echo "sha256:0123"; }', True),
        ('docker() { [ "$1" != push ]; }; aws() { echo "sha256:0123"; }', False),  # the push failed
        ('docker() { [ "$1" != tag ]; }; aws() { echo "sha256:0123"; }', False),  # the tag failed
        ("docker() { :; }; aws() { return 255; }", False),  # ECR could not be asked for the digest
    ],
)
def test_a_failed_push_or_digest_lookup_fails_post_build(stubs: str, succeeds: bool) -> None:
    status, printed = command_status(PUSH, stubs, PUSH_ENV)
    assert (status == 0) is succeeds, printed
    if succeeds:
        assert "IMAGE_DIGEST=sha256:0123" in printed


@pytest.mark.parametrize(("digest", "valid"), [("sha256:0123", True), ("None", False), ("", False)])
def test_post_build_refuses_an_image_uri_without_a_digest(digest: str, valid: bool) -> None:
    status, _ = command_status(CHECK_DIGEST, "", {"IMAGE_DIGEST": digest})
    assert (status == 0) is valid
