"""``python -m local async``: asynchronous inference's platform part, against a real server (process mode)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from local.asyncinf import AsyncJob, failure_record, inputs
from local.check import large_body
from local.cli import main
from local.errors import HarnessError


@pytest.mark.unit
def test_inputs_are_every_visible_file_sorted(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ("z.png", "b/a.png", ".hidden/x.png", ".dot.png"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in inputs(tmp_path)] == ["b/a.png", "z.png"]


@pytest.mark.unit
def test_job_refuses_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="not a folder"):
        AsyncJob("http://x", tmp_path / "missing", tmp_path).check()
    with pytest.raises(HarnessError, match="--max-concurrent"):
        AsyncJob("http://x", tmp_path, tmp_path, max_concurrent=0).check()
    with pytest.raises(HarnessError, match="--timeout"):
        AsyncJob("http://x", tmp_path, tmp_path, timeout_s=3601).check()
    assert AsyncJob("http://x", tmp_path, tmp_path / "out").failure_dir == tmp_path / "out"


@pytest.mark.unit
def test_failure_record_holds_the_status_and_the_body() -> None:
    record = json.loads(failure_record(413, "application/json", b'{"error": "too large"}'))
    assert record == {"status": 413, "content_type": "application/json", "body": '{"error": "too large"}'}
    assert json.loads(failure_record(None, "", b"", "no answer"))["error"] == "no answer"


@pytest.mark.unit
def test_cli_without_a_server_is_a_set_up_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"x")
    argv = ["async", "--endpoint", "http://127.0.0.1:9", "--input", str(tmp_path / "in"), "--output", str(tmp_path)]
    assert main(argv) == 2
    assert "does not answer /ping" in capsys.readouterr().err


@pytest.mark.integration
def test_async_writes_out_and_error_files(trained_job, process_runtime, endpoint_factory, dataset, tmp_path) -> None:
    """Two images, one in a sub-folder, a 7-MB one (over real-time's 6 MiB, under the raised limit) and a
    broken file, two in flight: three ``.out`` answers, one ``.error`` with the typed 400, exit 1."""
    endpoint = endpoint_factory(
        process_runtime, trained_job.model_archive, port=0, env={"SAGEMAKER_MAX_PAYLOAD_IN_MB": "64"}
    )
    source = tmp_path / "in"
    (source / "site-b").mkdir(parents=True)
    images = sorted((dataset / "images").glob("*.png"))[:2]
    (source / images[0].name).write_bytes(images[0].read_bytes())
    (source / "site-b" / images[1].name).write_bytes(images[1].read_bytes())
    big = large_body("image/png", size=7 * 1024 * 1024)
    assert big is not None
    (source / "large.png").write_bytes(big)
    (source / "broken.png").write_bytes(b"not a png")

    out, failures = tmp_path / "out", tmp_path / "failed"
    argv = ["async", "--endpoint", endpoint.url, "--input", str(source), "--output", str(out)]
    assert main([*argv, "--failures", str(failures), "--max-concurrent", "2"]) == 1

    answers = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert answers == sorted([f"{images[0].name}.out", f"site-b/{images[1].name}.out", "large.png.out"])
    assert "predictions" in json.loads((out / "large.png.out").read_text())
    assert [p.name for p in failures.rglob("*") if p.is_file()] == ["broken.png.error"]
    record = json.loads((failures / "broken.png.error").read_text())
    assert record["status"] == 400 and "error" in json.loads(record["body"])
