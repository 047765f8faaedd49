"""``python -m local serve --multi-model DIR`` and ``invoke --target-model``: the platform's part of a multi-model
endpoint (load on first use, evict the least recently used on 507), in front of a real server (process mode)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from local import client
from local.errors import HarnessError
from local.multimodel import MultiModelEndpoint, archives, model_name


@pytest.mark.unit
def test_archives_and_model_names(tmp_path: Path) -> None:
    (tmp_path / "site-b").mkdir()
    for name in ("a.tar.gz", "site-b/c.tar.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert archives(tmp_path) == ["a.tar.gz", "site-b/c.tar.gz"]
    name = model_name("site-b/c.tar.gz")
    assert name.startswith("site-b_c-") and "/" not in name
    assert model_name("a.tar.gz") != model_name("a_tar.gz") and model_name("a.tar.gz") == model_name("a.tar.gz")


@pytest.mark.unit
def test_a_folder_without_archives_is_refused(tmp_path: Path, process_runtime) -> None:
    with pytest.raises(HarnessError, match="not a folder"):
        MultiModelEndpoint(process_runtime, tmp_path / "missing")
    with pytest.raises(HarnessError, match=r"no \*\.tar\.gz"):
        MultiModelEndpoint(process_runtime, tmp_path)


@pytest.mark.integration
def test_load_on_first_invoke_and_evict_the_least_recently_used(
    trained_job, process_runtime, dataset, tmp_path, capsys
) -> None:
    """MASKRCNN_MAX_MODELS=2 and three archives: the third load gets a 507, the least recently used model is
    unloaded and its folder removed, and it loads again when asked for; bad targets are typed 4xx."""
    from local.cli import build_parser, cmd_invoke

    models = tmp_path / "models"
    (models / "site-c").mkdir(parents=True)
    for name in ("a.tar.gz", "b.tar.gz", "site-c/c.tar.gz"):
        shutil.copy(trained_job.model_archive, models / name)
    image = sorted((dataset / "images").glob("*.png"))[0]
    with MultiModelEndpoint(process_runtime, models, port=0, env={"MASKRCNN_MAX_MODELS": "2"}) as endpoint:
        assert client.ping(endpoint.url)

        def invoke(target: str) -> client.Reply:
            return client.invoke(endpoint.url, image.read_bytes(), "image/png", target_model=target)

        for target in ("a.tar.gz", "b.tar.gz", "a.tar.gz"):  # a is now the most recently used
            assert invoke(target).ok
        assert list(endpoint.loaded) == ["b.tar.gz", "a.tar.gz"] and endpoint.evictions == 0
        reply = invoke("site-c/c.tar.gz")  # 507 from the server: b is evicted
        assert reply.ok, reply.message()
        assert list(endpoint.loaded) == ["a.tar.gz", "site-c/c.tar.gz"] and endpoint.evictions == 1
        listed = client.request("GET", endpoint.server.url + "/models").json()["models"]
        assert sorted(m["modelName"] for m in listed) == sorted(endpoint.loaded.values())
        assert sorted(p.name for p in endpoint.server.models_dir.iterdir()) == sorted(endpoint.loaded.values())
        assert invoke("b.tar.gz").ok and endpoint.evictions == 2  # back again, a evicted this time

        missing = invoke("nope.tar.gz")
        assert missing.status == 404 and "no such archive" in missing.message()
        shutil.copy(trained_job.model_archive, tmp_path / "outside.tar.gz")
        escape = invoke("../outside.tar.gz")  # only what the endpoint's prefix holds
        assert escape.status == 404 and "no such archive" in escape.message()
        no_target = client.invoke(endpoint.url, image.read_bytes(), "image/png")
        assert no_target.status == 400 and "X-Amzn-SageMaker-Target-Model" in no_target.message()

        args = build_parser({}).parse_args(["invoke", endpoint.url, str(image), "--target-model", "a.tar.gz"])
        assert cmd_invoke(args, {}) == 0
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["predictions"][0]["image_size"] == [128, 128]
    assert not client.ping(endpoint.server.url, timeout=1)
