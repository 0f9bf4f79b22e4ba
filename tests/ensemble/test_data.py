"""Aggregator training data: each step's batch is fixed by (seed, step), and covers what it should."""

from __future__ import annotations

import pytest
import torch

from featurefusion.ensemble.data import TOY_TASKS, FolderData, ToyWorldData, open_data
from featurefusion.errors import DataError
from featurefusion.toyworld.world import parse_prompt, standard_tasks

from conftest import write_captioned_folder


def test_toy_world_batches_cover_every_task_equally_and_repeat_by_step():
    data = ToyWorldData()
    prompts, images = data.batch(3, 16)
    assert images.shape == (16, 3, 16, 16)
    tasks = standard_tasks()
    for i, name in enumerate(TOY_TASKS):
        assert all(tasks[name].contains(parse_prompt(p)) for p in prompts[2 * i : 2 * i + 2])
    again = data.batch(3, 16)
    assert again[0] == prompts and torch.equal(again[1], images)
    assert data.batch(4, 16)[0] != prompts
    with pytest.raises(DataError, match="multiple of the 8"):
        data.batch(0, 12)


def test_a_folder_is_read_in_a_fresh_order_every_epoch(tmp_path):
    captions = [f"caption {i}" for i in range(5)]
    data = FolderData(write_captioned_folder(tmp_path / "data", captions), resolution=8)
    epoch = [p for step in range(5) for p in data.batch(step, 1)[0]]
    assert sorted(epoch) == captions  # every image once per epoch
    assert [p for step in range(5, 10) for p in data.batch(step, 1)[0]] != epoch  # reshuffled
    assert data.batch(2, 2)[1].shape == (2, 3, 8, 8)
    with pytest.raises(DataError, match="no such data folder"):
        open_data(str(tmp_path / "missing"), 8)
