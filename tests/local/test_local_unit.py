"""Pure parts of the harness: --hp parsing, the job tree, tar safety, metrics reading, plans."""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
from pathlib import Path

import pytest
from maskrcnn.train.config import TrainConfig
from maskrcnn.train.metrics import Plan

from local import artifacts, client, layout, transform
from local import runtime as rt
from local.cli import main
from local.demo import detections_to_coco
from local.errors import HarnessError, UnsafeArchiveError
from local.progress import Progress, for_stream
from local.training import MetricsReader, _job_code

pytestmark = pytest.mark.unit


def test_parse_pairs_keeps_strings_and_last_wins():
    assert layout.parse_pairs(["epochs=2", "lr=0.1", "epochs=3", "note=a=b", "empty="]) == {
        "epochs": "3",
        "lr": "0.1",
        "note": "a=b",
        "empty": "",
    }


@pytest.mark.parametrize("bad", ["epochs", "=2", " =1"])
def test_parse_pairs_refuses_malformed(bad):
    with pytest.raises(HarnessError, match="KEY=VALUE"):
        layout.parse_pairs([bad])


def test_host_names():
    assert layout.host_names(3) == ["algo-1", "algo-2", "algo-3"]
    with pytest.raises(HarnessError):
        layout.host_names(0)


def _data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "a.png").write_bytes(b"png")
    (data / "annotations.json").write_text("{}")
    return data


def test_write_job_lays_out_what_sagemaker_writes(tmp_path):
    data = _data(tmp_path)
    spec = layout.JobSpec("job-1", {"training": data}, {"epochs": "3", "amp": "True"}, instance_count=2)
    trees = layout.write_job(tmp_path / "out", spec)
    assert list(trees) == ["algo-1", "algo-2"]
    for host, paths in trees.items():
        assert json.loads(paths.hyperparameters_file.read_text()) == {"epochs": "3", "amp": "True"}
        resources = json.loads(paths.resourceconfig_file.read_text())
        assert resources["current_host"] == host and resources["hosts"] == ["algo-1", "algo-2"]
        channels = json.loads(paths.inputdataconfig_file.read_text())
        assert channels["training"]["TrainingInputMode"] == "File"
        copied = paths.channel("training") / "images" / "a.png"
        assert copied.read_bytes() == b"png" and not copied.is_symlink()
        assert os.stat(copied).st_ino == os.stat(data / "images" / "a.png").st_ino  # a hard link
        assert paths.model_dir.is_dir() and paths.output_data_dir.is_dir() and paths.checkpoints_dir.is_dir()
    # the image's own reader understands the tree
    config = TrainConfig.from_env({"SAGEMAKER_BASE_DIR": str(trees["algo-2"].base), "TRAINING_JOB_NAME": "job-1"})
    assert config.resources.current_host == "algo-2" and config.resources.host_rank == 1
    assert config.hp.epochs == 3 and config.hp.amp is True and config.channels == ("training",)


def test_write_job_refuses_a_used_folder_unless_it_holds_a_job(tmp_path):
    spec = layout.JobSpec("job-1", {"training": _data(tmp_path)})
    used = tmp_path / "used"
    used.mkdir()
    (used / "precious.txt").write_text("keep")
    with pytest.raises(HarnessError, match="not empty"):
        layout.write_job(used, spec)
    with pytest.raises(HarnessError, match="does not hold a previous job"):
        layout.write_job(used, spec, overwrite=True)
    assert (used / "precious.txt").exists()
    layout.write_job(tmp_path / "job", spec)
    (tmp_path / "job" / "algo-1" / "checkpoints" / "last.pt").write_text("old")
    layout.write_job(tmp_path / "job", spec, overwrite=True)
    assert not (tmp_path / "job" / "algo-1" / "checkpoints" / "last.pt").exists()


def test_job_spec_checks_channels(tmp_path):
    with pytest.raises(HarnessError, match="training channel"):
        layout.JobSpec("j", {}).check()
    with pytest.raises(HarnessError, match="not a folder"):
        layout.JobSpec("j", {"training": tmp_path / "missing"}).check()


# ---- model.tar.gz: packing and safe extraction ----


def test_pack_dir_puts_contents_at_top_level_owned_by_root(tmp_path):
    model = tmp_path / "model"
    (model / "code").mkdir(parents=True)
    (model / "model.json").write_text("{}")
    (model / "code" / "x.txt").write_text("x")
    archive = artifacts.pack_dir(model, tmp_path / "model.tar.gz")
    assert artifacts.member_names(archive) == ["code", "code/x.txt", "model.json"]
    with tarfile.open(archive) as tar:
        assert {(m.uid, m.uname) for m in tar.getmembers()} == {(0, "root")}
    out = artifacts.extract_archive(archive, tmp_path / "out")
    assert (out / "code" / "x.txt").read_text() == "x"


def _tar(tmp_path: Path, *members: tarfile.TarInfo, data: bytes = b"evil") -> Path:
    path = tmp_path / "bad.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        good = tarfile.TarInfo("model.json")
        good.size = 2
        tar.addfile(good, io.BytesIO(b"{}"))
        for member in members:
            if member.isfile():
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
            else:
                tar.addfile(member)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize(
    "member",
    [
        _member("../escaped.txt"),
        _member("sub/../../escaped.txt"),
        _member("/tmp/absolute.txt"),
        _member("link", tarfile.SYMTYPE, "/etc/passwd"),
        _member("link", tarfile.SYMTYPE, "../../outside"),
        _member("hard", tarfile.LNKTYPE, "../outside"),
        _member("dev", tarfile.CHRTYPE),
        _member("fifo", tarfile.FIFOTYPE),
    ],
    ids=[
        "traversal",
        "nested-traversal",
        "absolute",
        "symlink-absolute",
        "symlink-out",
        "hardlink-out",
        "char-device",
        "fifo",
    ],
)
def test_extract_refuses_unsafe_members_and_writes_nothing(tmp_path, member):
    archive = _tar(tmp_path, member)
    dest = tmp_path / "deep" / "dest"
    with pytest.raises(UnsafeArchiveError, match="refusing"):
        artifacts.extract_archive(archive, dest)
    assert list(dest.iterdir()) == []  # checked before anything is written
    assert not (tmp_path / "deep" / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()


def test_extract_keeps_links_inside_the_folder(tmp_path):
    archive = _tar(tmp_path, _member("alias.json", tarfile.SYMTYPE, "model.json"))
    out = artifacts.extract_archive(archive, tmp_path / "out")
    assert (out / "alias.json").read_text() == "{}"


def test_extract_refuses_what_is_not_a_tar(tmp_path):
    junk = tmp_path / "model.tar.gz"
    junk.write_bytes(b"not a tar")
    with pytest.raises(UnsafeArchiveError, match="not a readable tar"):
        artifacts.extract_archive(junk, tmp_path / "out")


# ---- metrics from the job's log ----


class Recorder(Progress):
    def __init__(self):
        super().__init__()
        self.moves: list[tuple[int | None, dict]] = []

    def advance(self, n=None, **postfix):
        self.moves.append((n, postfix))


def test_metrics_reader_uses_the_image_regexes():
    progress = Recorder()
    reader = MetricsReader(progress)
    reader.feed("2026-01-01 INFO maskrcnn.train.job: data: 10 training images")
    reader.feed(
        "x INFO maskrcnn.train.engine: #metrics phase=train epoch=0 step=10 loss=1.25 lr=0.02 images_per_sec=3.1"
    )
    reader.feed("x INFO maskrcnn.train.engine: #metrics phase=eval epoch=1 bbox_mAP=0.5 segm_mAP=0.4 segm_AP50=0.875")
    assert reader.history[0] == {
        "phase": "train",
        "epoch": 0,
        "step": 10,
        "train:loss": 1.25,
        "train:lr": 0.02,
        "train:images_per_sec": 3.1,
    }
    assert reader.final == {
        "validation:bbox_mAP": 0.5,
        "validation:segm_mAP": 0.4,
        "validation:segm_AP50": 0.875,
    }
    # the bar counts steps; an eval line keeps the step and shows its figure
    assert progress.moves[0] == (10, {"loss": 1.25})
    assert progress.moves[1][1] == {"segm_AP50": 0.875}


def test_progress_counts_steps_to_the_total_the_job_announces():
    """The bar's total is the job's own plan (epochs may end before max_steps), and it ends there."""
    progress = Progress()
    reader = MetricsReader(progress)
    reader.feed("x INFO maskrcnn.train.job: " + Plan("start", 0, 16).line())
    assert progress.total == 16
    reader.feed("x INFO maskrcnn.train.engine: #metrics phase=train epoch=0 step=1 loss=2.5 lr=0.01")
    reader.feed("x INFO maskrcnn.train.engine: #metrics phase=eval epoch=1 bbox_mAP=0.1 segm_mAP=0.1 segm_AP50=0.2")
    reader.feed("x INFO maskrcnn.train.engine: #metrics phase=train epoch=1 step=16 loss=1.5 lr=0.0")
    assert progress.n == 16 == progress.total


def test_a_time_budget_moves_the_bars_total():
    progress = Progress()
    reader = MetricsReader(progress)
    reader.feed("x INFO maskrcnn.train.job: " + Plan("start", 0, 8000).line())
    reader.feed("x INFO maskrcnn.train.job: " + Plan("budget", 10, 57).line())
    assert progress.total == 57
    reader.feed("x INFO maskrcnn.train.engine: #metrics phase=train epoch=7 step=55 loss=1.5 lr=0.0")
    reader.feed("x INFO maskrcnn.train.job: " + Plan("budget", 55, 55).line())
    reader.feed("x INFO maskrcnn.train.job: " + Plan("end", 55, 55).line())
    assert progress.n == 55 == progress.total


def test_the_bar_ends_at_the_step_trained_to_when_the_budget_cuts_between_metrics_lines():
    """A re-plan that ends the job at step 53, after the metrics line of step 50 (log_every=10): the bar
    still ends at 53 of 53, from the job's structured lines alone."""
    progress = Progress()
    reader = MetricsReader(progress)
    reader.feed("x INFO maskrcnn.train.job: " + Plan("start", 0, 8000).line())
    reader.feed("x INFO maskrcnn.train.engine: #metrics phase=train epoch=6 step=50 loss=1.5 lr=0.001")
    reader.feed("x INFO maskrcnn.train.job: " + Plan("budget", 53, 53).line())
    reader.feed("x INFO maskrcnn.train.job: " + Plan("end", 53, 53).line())
    reader.feed("x INFO maskrcnn.train.engine: #metrics phase=eval epoch=7 bbox_mAP=0.1 segm_mAP=0.1 segm_AP50=0.2")
    assert progress.n == 53 == progress.total


def test_the_bar_reads_no_sentence_of_the_job():
    """The job's sentences are for people: rewording one (or a sentence that happens to hold a number next to
    "plan") moves nothing."""
    progress = Progress()
    reader = MetricsReader(progress)
    for sentence in (
        "x INFO maskrcnn.train.job: plan: 16 steps (2 epochs of 8 steps)",
        "x INFO maskrcnn.train.job: budget: max_runtime=40 s, measured 0.3 s/step, planning 57 steps (was 8000)",
        "x INFO maskrcnn.train.job: budget: trained to step 55 of its plan, 38 s into max_runtime=40 s",
    ):
        reader.feed(sentence)
    assert progress.total is None and progress.n == 0 and reader.history == []


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("verbose", [False, True])
def test_a_terminal_shows_the_bar_and_one_line_per_evaluation_and_the_job_log_with_v(verbose: bool):
    stream = _Terminal()
    progress = for_stream(stream, raw_lines=verbose)
    reader = MetricsReader(progress)
    progress.start(None, "step", "train")
    for line in (
        "x INFO maskrcnn.train.job: " + Plan("start", 0, 8).line(),
        "x INFO maskrcnn.train.engine: #metrics phase=train epoch=0 step=8 loss=1.5 lr=0.0",
        "x INFO maskrcnn.train.engine: #metrics phase=eval epoch=1 bbox_mAP=0.1 segm_mAP=0.1 segm_AP50=0.25",
    ):
        progress.line(line)
        reader.feed(line)
    progress.close()
    shown = stream.getvalue().splitlines()
    evals = [line for line in shown if line.startswith("eval epoch 1 step 8:") and "segm_AP50=0.2500" in line]
    assert ("#metrics phase=train" in stream.getvalue()) is verbose
    assert len(evals) == (0 if verbose else 1)  # with -v the job's own eval line says it


def test_job_code():
    assert _job_code({"algo-1": 0, "algo-2": 0}, ["algo-1", "algo-2"]) == 0
    assert _job_code({"algo-1": 0, "algo-2": 1}, ["algo-1", "algo-2"]) == 1
    assert _job_code({"algo-1": -15}, ["algo-1"]) == 143
    assert _job_code({"algo-1": -9}, ["algo-1"]) == 1


# ---- runtimes ----


def test_docker_train_command_mounts_the_tree_at_opt_ml(tmp_path):
    runtime = rt.Runtime(mode="docker", image="img:1", gpus=True, docker="docker")
    argv, _ = runtime.train_command(tmp_path, {"TRAINING_JOB_NAME": "j"}, "j-algo-1")
    assert argv[:2] == ["docker", "run"] and argv[-2:] == ["img:1", "train"]
    assert f"{tmp_path.resolve()}:/opt/ml" in argv and "TRAINING_JOB_NAME=j" in argv
    assert argv[argv.index("--network") + 1] == "host" and argv[argv.index("--gpus") + 1] == "all"


def test_docker_commands_pass_the_hosts_cpu_kernel_choice_into_the_container(tmp_path):
    # ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 make demo must emulate the AVX2 class in docker mode too.
    environ = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "HOME": "/root"}
    runtime = rt.Runtime(mode="docker", image="img:1", docker="docker", environ=environ)
    for argv, _ in (runtime.train_command(tmp_path, {}, "t"), runtime.serve_command(tmp_path, 8080, {}, "s")):
        assert "ATEN_CPU_CAPABILITY=avx2" in argv and "ONEDNN_MAX_CPU_ISA=AVX2" in argv
        assert "HOME=/root" not in argv  # only the kernel choice, not the host's environment


def test_process_commands_use_the_base_dir_seam(tmp_path):
    runtime = rt.Runtime(mode="process", environ={"PATH": "/bin"})
    argv, env = runtime.train_command(tmp_path, {"TRAINING_JOB_NAME": "j"}, "unused")
    assert argv[-1].endswith("images/maskrcnn/train")
    assert env == {"PATH": "/bin", "TRAINING_JOB_NAME": "j", "SAGEMAKER_BASE_DIR": str(tmp_path)}
    argv, env = runtime.serve_command(tmp_path, 8123, {}, "unused")
    assert argv[-1].endswith("images/maskrcnn/serve") and env["SAGEMAKER_BIND_TO_PORT"] == "8123"


def test_stop_on_signals_turns_ctrl_c_and_sigterm_into_a_stop_request():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    for sig in (signal.SIGINT, signal.SIGTERM):
        with rt.stop_on_signals() as stop:
            os.kill(os.getpid(), sig)  # delivered before the next bytecode: no KeyboardInterrupt, no exit
            assert stop.wait(5)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_resolve_falls_back_to_process_and_refuses_docker_without_engine():
    assert rt.resolve("auto", docker="no-such-docker-cli").mode == "process"
    with pytest.raises(HarnessError, match="needs a Docker engine"):
        rt.resolve("docker", docker="no-such-docker-cli")
    with pytest.raises(HarnessError, match="--mode"):
        rt.resolve("cloud")


# ---- transform and client ----


def test_transform_plan_mirrors_the_input_tree(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.jpg", ".hidden"):
        (tmp_path / "in" / name).write_bytes(b"x")
    pairs = transform.plan(tmp_path / "in", tmp_path / "out")
    assert [(s.name, str(t.relative_to(tmp_path))) for s, t in pairs] == [
        ("a.png", "out/a.png.out"),
        ("b.jpg", "out/sub/b.jpg.out"),
    ]


def test_transform_parameters_command_line_then_server_then_defaults():
    settings = transform.TransformSettings(max_payload_mb=20)
    served = {"MaxConcurrentTransforms": 2, "BatchStrategy": "MULTI_RECORD", "MaxPayloadInMB": 6}
    assert transform.resolve_parameters(settings, served) == {
        "MaxConcurrentTransforms": 2,
        "MaxPayloadInMB": 20,
        "BatchStrategy": "MULTI_RECORD",
    }
    assert transform.resolve_parameters(transform.TransformSettings(), None) == transform.DEFAULTS
    assert settings.server_env() == {"SAGEMAKER_BATCH": "true", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "20"}


def test_client_helpers():
    assert client.base_url("127.0.0.1:8080/invocations") == "http://127.0.0.1:8080"
    assert client.base_url("http://h:1/") == "http://h:1"
    assert client.content_type_for(Path("a.JPG")) == "image/jpeg"
    assert client.content_type_for(Path("a.bin"), "image/png") == "image/png"
    with pytest.raises(HarnessError, match="--content-type"):
        client.content_type_for(Path("a.bin"))


def test_detections_to_coco():
    answer = {
        "predictions": [
            {
                "image_size": [8, 8],
                "instances": [
                    {
                        "box": [1, 2, 5, 6],
                        "label": 2,
                        "label_name": "rectangle",
                        "score": 0.9,
                        "mask": {"size": [8, 8], "counts": "abc"},
                    }
                ],
            }
        ]
    }
    assert detections_to_coco(7, answer) == [
        {
            "image_id": 7,
            "category_id": 2,
            "bbox": [1.0, 2.0, 4.0, 4.0],
            "score": 0.9,
            "segmentation": {"size": [8, 8], "counts": "abc"},
        }
    ]


# ---- the CLI's error boundary ----


def test_cli_usage_errors_exit_2(tmp_path, capsys):
    code = main(
        ["train", "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "o"), "--mode", "process"],
        environ={},
    )
    assert code == 2 and "not a folder" in capsys.readouterr().err
    code = main(
        [
            "train",
            "--data",
            str(tmp_path),
            "--hp",
            "epochs",
            "--output",
            str(tmp_path / "o"),
            "--mode",
            "process",
        ],
        environ={},
    )
    assert code == 2 and "KEY=VALUE" in capsys.readouterr().err


def test_cli_synth(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "s"), "--images", "2", "--size", "64"], environ={}) == 0
    assert json.loads((tmp_path / "s" / "annotations.json").read_text())["images"][1]["width"] == 64


def test_demo_scoring_of_perfect_answers_is_one(tmp_path):
    """The demo's path from endpoint JSON to COCO AP: the ground truth sent back as answers scores 1."""
    from maskrcnn.train.data import load_index
    from maskrcnn.train.engine import coco_scores
    from maskrcnn.train.synthetic import write_coco_dataset

    write_coco_dataset(tmp_path, num_images=3, seed=1, size=64)
    truth = load_index(tmp_path).to_coco()
    results = []
    for image in truth["images"]:
        instances = [
            {
                "box": [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]],
                "label": a["category_id"],
                "score": 1.0,
                "mask": a["segmentation"],
            }
            for a in truth["annotations"]
            if a["image_id"] == image["id"]
        ]
        results += detections_to_coco(image["id"], {"predictions": [{"instances": instances}]})
    scores = coco_scores(truth, results)
    assert scores["segm_AP50"] == pytest.approx(1.0) and scores["bbox_AP50"] == pytest.approx(1.0)


def test_failure_reason_comes_from_output_failure(tmp_path):
    from local.training import _failure

    trees = layout.write_job(tmp_path / "job", layout.JobSpec("j", {"training": _data(tmp_path)}, instance_count=2))
    hosts = ["algo-1", "algo-2"]
    assert "exited with code 1 and wrote no output/failure" in _failure(trees, hosts, {"algo-1": 1}, False)
    assert "SIGTERM from outside" in _failure(trees, hosts, {"algo-1": 143}, False)
    assert "stopped on request" in _failure(trees, hosts, {"algo-1": 143}, True)
    trees["algo-2"].failure_file.write_text("dataset /x has no images\n")
    assert _failure(trees, hosts, {"algo-2": 1}, False) == "algo-2: dataset /x has no images"
