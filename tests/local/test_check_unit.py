"""``python -m local check`` without a Docker engine: the v3 encoding, the table, exit codes, set-up errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from local.check import (
    FAIL,
    INVOKE,
    LARGE,
    LARGE_OK,
    MULTI_MODEL,
    PASS,
    PING,
    PING_BUSY,
    READ_ONLY,
    SERVE_SIGTERM,
    SKIP,
    TRAIN_SIGTERM,
    UNKNOWN,
    WARN,
    CheckSpec,
    Row,
    Run,
    _ended_before_stop,
    exit_code,
    graded,
    hosting_modes,
    large_body,
    render_table,
    v3_encoding,
)
from local.cli import main
from local.errors import HarnessError

pytestmark = pytest.mark.unit


def test_v3_encoding_is_json_for_values_and_leaves_strings_alone():
    v2 = {"amp": "True", "lr": "0.01", "steps": "[16, 22]", "arch": "lite", "epochs": "2", "empty": ""}
    v3 = v3_encoding(v2)
    assert v3 == {"amp": "true", "lr": "0.01", "steps": "[16, 22]", "arch": "lite", "epochs": "2", "empty": ""}
    assert json.loads(v3["amp"]) is True  # what SDK v3 writes for hyperparameters={"amp": True}


def test_exit_code_is_1_only_when_a_row_failed():
    passed, skipped, failed = Row("a", PASS, "ok"), Row("b", SKIP, "no GPU"), Row("c", FAIL, "exit 127")
    assert exit_code([passed, skipped]) == 0
    assert exit_code([passed, failed, skipped]) == 1


def test_table_has_one_line_per_point_its_kind_a_count_and_the_hosting_modes():
    rows = [
        Row("train: x", PASS, "exit 0 in 3 s"),
        Row("serve: a longer point", FAIL, "HTTP 500"),
        graded(Row(LARGE, FAIL, "HTTP 200")),
    ]
    lines = render_table(rows).splitlines()
    assert lines[0].split() == ["point", "kind", "result", "evidence"]
    assert lines[2].split("  ")[0] == "train: x" and "contract  PASS" in lines[2] and lines[2].endswith("exit 0 in 3 s")
    assert "contract  FAIL" in lines[3] and lines[3].endswith("HTTP 500")
    assert "advice    WARN" in lines[4]
    assert lines[-2].startswith("1 passed, 1 failed, 1 warned, 0 skipped")
    assert lines[-1].startswith("hosting modes: fit for none; real-time not shown")


def test_advice_rows_warn_and_never_set_the_exit_code():
    """Unknown hyperparameters refused and 6-MiB bodies refused are our house rules, not SageMaker's contract."""
    for point in (UNKNOWN, LARGE):
        row = graded(Row(point, FAIL, "exit 0"))
        assert (row.status, row.kind) == (WARN, "advice")
        assert exit_code([row]) == 0
    contract = graded(Row(TRAIN_SIGTERM, FAIL, "still running"))
    assert (contract.status, contract.kind) == (FAIL, "contract")
    assert graded(Row(UNKNOWN, PASS, "exit 1")).status == PASS


def test_a_job_that_ends_before_sigterm_is_untested_not_failed():
    assert _ended_before_stop(TRAIN_SIGTERM, Run(0, "done", 1.0)).status == SKIP
    assert "before it could be stopped" in _ended_before_stop(TRAIN_SIGTERM, Run(0, "", 1.0)).evidence
    assert _ended_before_stop(TRAIN_SIGTERM, Run(3, "boom", 1.0)).status == FAIL


def test_hosting_modes_follow_the_rows_each_mode_needs():
    base = [Row(p, PASS, "ok") for p in (PING, INVOKE, PING_BUSY, SERVE_SIGTERM)]
    rows = [*base, Row(READ_ONLY, FAIL, "Read-only file system"), Row(LARGE_OK, PASS, "ok")]
    rows.append(Row(MULTI_MODEL, SKIP, "the image has no label"))
    verdicts = hosting_modes(rows)
    assert verdicts["real-time"] == ("fit", "") and verdicts["batch transform"] == ("fit", "")
    assert verdicts["asynchronous"] == ("fit", "")
    assert verdicts["serverless"] == ("not fit", READ_ONLY)
    assert verdicts["multi-model"] == ("not shown", "the image has no label")
    no_payload = [Row(p, SKIP if p == INVOKE else PASS, "no --payload given") for p in (PING, INVOKE)]
    assert hosting_modes(no_payload)["real-time"][0] == "not shown"


def test_large_body_is_a_20_mb_image_of_the_payload_type():
    from PIL import Image

    for content_type, fmt in (("image/png", "PNG"), ("image/jpeg", "JPEG")):
        body = large_body(content_type, size=300_000)
        assert body is not None and len(body) >= 300_000
        with Image.open(io.BytesIO(body)) as image:
            assert image.format == fmt
    assert large_body("application/json") is None and large_body(None) is None


def test_spec_refuses_missing_data_and_unknown_payload_type(tmp_path: Path):
    with pytest.raises(HarnessError, match="not a folder"):
        CheckSpec("img", tmp_path / "missing").check()
    payload = tmp_path / "body.bin"
    payload.write_bytes(b"x")
    with pytest.raises(HarnessError, match="--content-type"):
        CheckSpec("img", tmp_path, payload=payload).check()
    CheckSpec("img", tmp_path, payload=payload, content_type="application/x-npy").check()


def test_cli_check_usage_problem_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["check", "--image", "img", "--data", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
