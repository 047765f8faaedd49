"""What a multi-GPU job adds, checked in one process: the step's flags, the metrics' device sums and rates,
SyncBatchNorm, the learning rate per image, sharded ground truth, and data checked once per host."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.unit


def cpu(world_size: int = 1, rank: int = 0):
    from maskrcnn.train.distributed import DistContext

    return DistContext(rank, rank, world_size, torch.device("cpu"))


def test_one_process_agrees_with_itself_and_reads_the_loss_flag_from_the_device() -> None:
    from maskrcnn.train.distributed import StepFlags, agree

    finite = torch.isfinite(torch.tensor(1.5))
    assert agree(finite, False, cpu()) == StepFlags(nonfinite=False, stop=False, out_of_time=False, plan=None)
    nan = torch.isfinite(torch.tensor(float("nan")))
    assert agree(nan, True, cpu(), plan=0) == StepFlags(nonfinite=True, stop=True, out_of_time=False, plan=0)
    assert agree(finite, False, cpu(), out_of_time=True, plan=1234).plan == 1234


def test_metrics_sum_the_loss_parts_on_the_device_and_read_them_once_a_line(caplog) -> None:
    from maskrcnn.train.engine import LoopState, Step, TrainMetrics

    state = LoopState(last_step=100)
    metrics = TrainMetrics(log_every=3, world_size=8)
    reads = []

    class Counted(torch.Tensor):  # counts the host reads of the running sums
        def tolist(self):  # type: ignore[override]
            reads.append(state.global_step)
            return super().tolist()

    with caplog.at_level(logging.INFO, logger="maskrcnn.train.engine"):
        for step in range(1, 7):
            state.global_step = step
            losses = torch.tensor([0.5 * step, 1.0, 0.5 * step + 1.0], dtype=torch.float64).as_subclass(Counted)
            finite = torch.tensor(True)
            metrics.add(Step(losses, ("loss_mask", "loss_box", "loss"), finite, images=4, data_wait=0.0), state, 0.01)
    assert reads == [1, 3, 6]  # the first step, then every log_every: never per step
    lines = [h for h in state.history if h["phase"] == "train"]
    assert [h["step"] for h in lines] == [1, 3, 6]
    assert lines[1]["loss_mask"] == pytest.approx((1.0 + 1.5) / 2) and lines[2]["loss"] == pytest.approx(3.5)
    assert lines[2]["job_images_per_sec"] == pytest.approx(8 * lines[2]["images_per_sec"])
    assert "job_images_per_sec=" in caplog.text and " images_per_sec=" in caplog.text


def test_sync_batch_norm_only_for_several_cuda_processes() -> None:
    from maskrcnn.model.architectures import build_model
    from maskrcnn.train.distributed import DistContext, sync_batch_norm

    def batch_norms(model: torch.nn.Module) -> set[type]:
        return {type(m) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}

    cuda = DistContext(1, 1, 8, torch.device("cuda", 1))  # a context only: converting needs no GPU
    assert batch_norms(sync_batch_norm(build_model("resnet50_fpn", 3, 128, 128), cuda)) == {torch.nn.SyncBatchNorm}
    assert batch_norms(sync_batch_norm(build_model("resnet50_fpn", 3, 128, 128), cpu(2))) == {torch.nn.BatchNorm2d}
    one_gpu = DistContext(0, 0, 1, torch.device("cuda", 0))
    assert batch_norms(sync_batch_norm(build_model("resnet50_fpn", 3, 128, 128), one_gpu)) == {torch.nn.BatchNorm2d}


def test_lr_is_one_processs_and_the_log_states_the_rate_per_image() -> None:
    from maskrcnn.train.config import SYNTHETIC_CPU_PRESET, Hyperparameters
    from maskrcnn.train.job import describe_lr, job_lr

    demo = Hyperparameters.from_strings(SYNTHETIC_CPU_PRESET)
    assert job_lr(demo, 1) == demo.lr == 0.003  # one process: the preset's rate exactly
    hp = Hyperparameters.from_strings({"lr": "0.005", "batch_size": "2"})
    assert job_lr(hp, 8) == pytest.approx(0.04)
    line = describe_lr(hp, 8)
    assert "peak 0.04 for 16 images a step" in line and "0.0025 per image" in line
    assert "0.02 for 16 images, 0.00125 per image" in line  # torchvision's rule beside it


def test_sharded_hosts_ground_truth_merges_under_job_wide_ids(synthetic_dir: Path) -> None:
    from maskrcnn.train.data import load_index, merge_coco

    index = load_index(synthetic_dir)  # two hosts whose shards reuse the same ids
    first = {im["id"]: n for n, im in enumerate(index.images, 1)}
    second = {im["id"]: len(index.images) + n for n, im in enumerate(index.images, 1)}
    merged = merge_coco([index.to_coco(first), index.to_coco(second)])
    ids = [im["id"] for im in merged["images"]]
    assert ids == list(range(1, 2 * len(index.images) + 1))
    assert [a["id"] for a in merged["annotations"]] == list(range(1, len(merged["annotations"]) + 1))
    assert {a["image_id"] for a in merged["annotations"]} <= set(ids)
    assert len(merged["annotations"]) == 2 * len(index.to_coco()["annotations"])


def test_given_header_sizes_no_image_is_opened_again(synthetic_dir: Path, monkeypatch) -> None:
    from maskrcnn.errors import DataError
    from maskrcnn.train import data

    checked = data.load_index(synthetic_dir)
    sizes = data.image_sizes(checked)
    assert len(sizes) == len(checked.images)

    def no_open(*_args, **_kwargs):
        raise AssertionError("an image header was read again")

    monkeypatch.setattr(data.Image, "open", no_open)
    again = data.load_index(synthetic_dir, sizes=sizes)
    assert again.images == checked.images and again.annotations == checked.annotations
    wrong = {path: (w + 1, h) for path, (w, h) in sizes.items()}
    with pytest.raises(DataError, match="but its entry says"):  # the sizes are what the check compares
        data.load_index(synthetic_dir, sizes=wrong)


def test_the_network_between_hosts_is_reported_from_the_files_efa_needs(tmp_path: Path) -> None:
    from maskrcnn.train.distributed import network_stack

    bare = network_stack({"NCCL_SOCKET_IFNAME": "eth0"}, root=tmp_path)
    assert "NCCL_SOCKET_IFNAME=eth0" in bare and "aws-ofi-nccl plugin not found" in bare
    assert "NCCL will use TCP sockets" in bare
    for library in (
        "opt/amazon/ofi-nccl/lib/libnccl-net.so",
        "opt/amazon/efa/lib/libfabric.so.1",
        "dev/infiniband/uverbs0",
    ):
        (tmp_path / library).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / library).touch()
    efa = network_stack({"NCCL_SOCKET_IFNAME": "eth0", "FI_PROVIDER": "efa"}, root=tmp_path)
    assert "aws-ofi-nccl plugin /opt/amazon/ofi-nccl/lib/libnccl-net.so" in efa
    assert "libfabric /opt/amazon/efa/lib/libfabric.so.1" in efa and "1 EFA/RDMA device(s)" in efa
    assert "FI_PROVIDER=efa" in efa and "TCP" not in efa


def test_the_network_nccl_chose_is_read_from_its_own_lines(tmp_path: Path) -> None:
    from maskrcnn.train.distributed import nccl_debug_to_file, nccl_network

    assert nccl_debug_to_file({}, tmp_path)["NCCL_DEBUG_FILE"] == str(tmp_path / "nccl.%h.%p.log")
    assert nccl_debug_to_file({"NCCL_DEBUG": "WARN"}, tmp_path) == {}  # the user's own setting wins
    efa = (
        "h:1:2 [0] NCCL INFO NET/Plugin: Loaded net plugin Libfabric (v9)\n"
        "h:1:2 [0] NCCL INFO NET/OFI Selected Provider is efa (found 4 nics)\n"
        "h:1:2 [0] NCCL INFO Using network Libfabric\n"
    )
    assert nccl_network(efa) == "Libfabric (NET/OFI Selected Provider is efa)"
    tcp = "h:1:2 [0] NCCL INFO NET/Socket : Using [0]eth0:10.0.0.1<0>\nh:1:2 [0] NCCL INFO Using network Socket\n"
    assert nccl_network(tcp) == "Socket (NET/Socket : Using [0]eth0:10.0.0.1<0>)"
    assert nccl_network("h:1:2 [0] NCCL INFO Bootstrap : Using eth0\n") is None
