"""Aspect-ratio grouped batches, and loader workers sized to the host."""

from __future__ import annotations

from pathlib import Path

import pytest
from maskrcnn.train.data import DatasetIndex, GroupedOrder, aspect_ratio_groups
from maskrcnn.train.job import data_workers

pytestmark = pytest.mark.unit


def index_of(sizes: list[tuple[int, int]]) -> DatasetIndex:
    images = [
        {"id": i, "file_name": f"{i}.png", "width": w, "height": h, "path": Path(f"{i}.png")}
        for i, (w, h) in enumerate(sizes)
    ]
    return DatasetIndex(Path("."), images, {}, ["a"])


def test_square_images_keep_the_samplers_order() -> None:
    """The CPU preset's synthetic set is square: grouping must not change what it trains on."""
    order = [5, 2, 9, 0, 7, 1, 3, 8, 6, 4]
    groups = aspect_ratio_groups(index_of([(160, 160)] * 10), 3)
    assert list(GroupedOrder(order, groups, 4)) == order


def test_every_full_batch_holds_one_aspect_ratio_group_and_every_image_comes_once() -> None:
    sizes = [(640, 480), (480, 640), (800, 400), (500, 500)] * 5
    groups = aspect_ratio_groups(index_of(sizes), 3)
    assert len(set(groups)) == 4
    order = list(range(len(sizes)))[::-1]
    grouped = list(GroupedOrder(order, groups, 2))
    assert sorted(grouped) == sorted(order)
    full = len(grouped) // 2 - 2  # at most one partial group per group ends the epoch
    assert all(groups[grouped[2 * b]] == groups[grouped[2 * b + 1]] for b in range(full))
    assert aspect_ratio_groups(index_of(sizes), 0) == [0] * len(sizes)


def test_loader_workers_default_to_the_hosts_vcpus_per_process() -> None:
    assert data_workers(-1, cpus=96, procs_per_host=8) == 4  # ml.p4d: 96 vCPUs, 8 GPUs
    assert data_workers(-1, cpus=8, procs_per_host=4) == 2
    assert data_workers(-1, cpus=2, procs_per_host=1) == 2  # the CI VM: the old default
    assert data_workers(0, cpus=96, procs_per_host=8) == 0  # an explicit value wins
