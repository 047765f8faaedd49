"""Hyperparameters and config files as both SageMaker SDK generations write them."""

from __future__ import annotations

from pathlib import Path

import pytest
from maskrcnn.contract import SageMakerPaths
from maskrcnn.errors import ConfigError
from maskrcnn.train.config import Hyperparameters, ResourceConfig, TrainConfig
from support import write_job_tree

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"amp": "True"}, {"amp": True}),  # SDK v2: str(True)
        ({"amp": "true"}, {"amp": True}),  # SDK v3: json.dumps(True)
        ({"amp": "False", "photometric": "1"}, {"amp": False, "photometric": True}),
        ({"lr": "0.01", "epochs": "2"}, {"lr": 0.01, "epochs": 2}),
        ({"lr_steps": "[16, 22]"}, {"lr_steps": (16, 22)}),
        ({"lr_steps": "16,22"}, {"lr_steps": (16, 22)}),
        ({"arch": '"resnet50_fpn"'}, {"arch": "resnet50_fpn"}),  # SDK v3 json.dumps of a string
        ({"epochs": "3.0"}, {"epochs": 3}),
        ({"batch_size": 8}, {"batch_size": 8}),  # a hand-written file with real JSON types
    ],
)
def test_hyperparameter_strings_decode(raw: dict, expected: dict) -> None:
    hp = Hyperparameters.from_strings(raw)
    for key, value in expected.items():
        assert getattr(hp, key) == value


def test_unknown_hyperparameter_names_it_and_lists_accepted() -> None:
    with pytest.raises(ConfigError) as err:
        Hyperparameters.from_strings({"learning_rate": "0.1"})
    message = str(err.value)
    assert "'learning_rate'" in message
    for name in ("epochs", "max_steps", "batch_size", "lr", "arch", "min_size", "max_size", "seed"):
        assert name in message


def test_sagemaker_bookkeeping_keys_are_ignored() -> None:
    hp = Hyperparameters.from_strings({"sagemaker_program": "x", "sagemaker_region": '"us-east-1"', "epochs": "1"})
    assert hp.epochs == 1


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"epochs": "two"}, "'epochs' must be an integer"),
        ({"amp": "maybe"}, "'amp' must be true or false"),
        ({"lr": "fast"}, "'lr' must be a number"),
        ({"lr_steps": "[a]"}, "'lr_steps' must be a list of integers"),
        ({"arch": "resnet9000"}, "arch must be one of"),
        ({"epochs": "0"}, "epochs must be >= 1"),
        ({"val_fraction": "1.5"}, "val_fraction"),
    ],
)
def test_bad_values_fail_with_a_reason(raw: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        Hyperparameters.from_strings(raw)


def test_every_path_derives_from_the_base_directory(tmp_path: Path) -> None:
    paths = SageMakerPaths(tmp_path)
    for path in (
        paths.hyperparameters_file,
        paths.channel("training"),
        paths.model_dir,
        paths.failure_file,
        paths.checkpoints_dir,
        paths.output_data_dir,
    ):
        assert path.is_relative_to(tmp_path)
    assert paths.failure_file == tmp_path / "output" / "failure"
    assert paths.hyperparameters_file == tmp_path / "input" / "config" / "hyperparameters.json"


def test_from_env_reads_files_under_sagemaker_base_dir(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    base = write_job_tree(
        tmp_path / "job", {"epochs": "3", "amp": "True"}, {"training": tmp_path / "data"}, host="algo-2", hosts=2
    )
    config = TrainConfig.from_env({"SAGEMAKER_BASE_DIR": str(base), "TRAINING_JOB_NAME": "j1"})
    assert config.hp.epochs == 3 and config.hp.amp is True
    assert config.resources.host_rank == 1 and config.resources.hosts == ("algo-1", "algo-2")
    assert config.job_name == "j1" and config.channels == ("training",)
    with pytest.raises(dataclasses_frozen_error()):
        config.hp.epochs = 5  # type: ignore[misc]


def dataclasses_frozen_error() -> type[Exception]:
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_training_channel_is_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'training' channel is required"):
        TrainConfig.from_dicts(tmp_path, {}, {"validation": {}}, {})


def test_unknown_channel_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown input channel"):
        TrainConfig.from_dicts(tmp_path, {}, {"training": {}, "test": {}}, {})


def test_current_host_must_be_listed() -> None:
    with pytest.raises(ConfigError, match="not in hosts"):
        ResourceConfig.from_dict({"current_host": "algo-3", "hosts": ["algo-1"]})


def test_malformed_config_json_is_a_config_error(tmp_path: Path) -> None:
    config_dir = tmp_path / "input" / "config"
    config_dir.mkdir(parents=True)
    (config_dir / "hyperparameters.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"hyperparameters\.json is not valid JSON"):
        TrainConfig.from_env({"SAGEMAKER_BASE_DIR": str(tmp_path)})
