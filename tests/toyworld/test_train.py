"""Specialist training batches: the shard alone (the paper's setting) or mixed with replayed broad data."""

import torch

from featurefusion.toyworld.train import _batch
from featurefusion.toyworld.world import make_batch, standard_tasks


def test_replay_mixes_broad_data_into_a_specialist_batch():
    tasks = standard_tasks()
    specs, images = _batch(tasks["style-dark"], tasks["broad"], 0.25, 64, seed=3)
    assert len(specs) == len(images) == 64
    assert all(s.style == "dark" for s in specs[:48])  # the shard's part
    assert sum(s.style == "plain" for s in specs[48:]) >= 12  # the broad part is mostly plain


def test_no_replay_is_exactly_the_shard_batch():
    tasks = standard_tasks()
    specs, images = _batch(tasks["objects-round"], tasks["broad"], 0.0, 32, seed=5)
    expected_specs, expected_images = make_batch(tasks["objects-round"], 32, seed=5, split="train")
    assert specs == expected_specs and torch.equal(images, expected_images)


def test_specialists_alone_from_a_trained_base(tmp_path, capsys):
    from featurefusion.cli import main
    from featurefusion.toyworld.demo import SHIPPED
    from featurefusion.toyworld.train import SPECIALIST_TASKS

    args = ["toyworld", "train", "--from-base", str(SHIPPED / "base"), "--specialist-steps", "1",
            "--specialist-replay", "0", "--no-progress"]  # fmt: skip
    assert main(args) == 2 and "give --out" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path)]) == 0
    assert sorted(p.stem for p in (tmp_path / "specialists").iterdir()) == sorted(SPECIALIST_TASKS)
    assert not (tmp_path / "base").exists() and not (tmp_path / "scorer.safetensors").exists()
