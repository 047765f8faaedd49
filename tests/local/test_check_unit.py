"""``python -m local check`` without a Docker engine: the v3 encoding, the table, exit codes, set-up errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from local.check import FAIL, PASS, SKIP, CheckSpec, Row, exit_code, render_table, v3_encoding
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


def test_table_has_one_line_per_point_and_a_count():
    rows = [Row("train: x", PASS, "exit 0 in 3 s"), Row("serve: a longer point", FAIL, "HTTP 500")]
    lines = render_table(rows).splitlines()
    assert lines[0].split() == ["contract", "point", "result", "evidence"]
    assert lines[2].split("  ")[0] == "train: x" and "PASS" in lines[2] and lines[2].endswith("exit 0 in 3 s")
    assert "FAIL" in lines[3] and lines[3].endswith("HTTP 500")
    assert lines[-1] == "1 passed, 1 failed, 0 skipped"


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
