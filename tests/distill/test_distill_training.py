"""Distillation runs end to end: resume, two processes against one, incremental learning."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from distill_fixtures import *  # noqa: F403 (the fixtures backbone, teachers)

from featurefusion.distill.incremental import add_teachers
from featurefusion.distill.run import distill
from featurefusion.distill.store import load_student
from featurefusion.distill.trainer import DistillConfig, Trainer
from featurefusion.toyworld.demo import SHIPPED

BASE = SHIPPED / "base"

TINY = dict(steps=3, batch_size=2, lr=1e-3, style_lr=1e-2)


def _params(folder):
    student, _ = load_student(folder)
    return {k: v.clone() for k, v in student.state_dict().items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, teachers, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["FEATUREFUSION_PROGRESS"] = "0"
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        distill(BASE, teachers, out, DistillConfig(**TINY, accumulation=1), progress=False)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process(teachers, tmp_path):
    names = [f"t0={teachers[0]}", f"t1={teachers[1]}"]
    one = distill(BASE, names, tmp_path / "one", DistillConfig(**TINY, accumulation=2), progress=False)
    assert one.steps_run == 3 and len(one.history.score) == 3
    mp.spawn(_worker, args=(2, _free_port(), names, str(tmp_path / "two")), nprocs=2, join=True)
    a, b = _params(tmp_path / "one"), _params(tmp_path / "two")
    start = _params_of_base()
    moved = max((a[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-4  # it trained
    # The all-reduce sums gradients in another order than one process's accumulation, and Adam turns a
    # round-off difference in a near-zero gradient into a full step of either sign: a few entries may differ
    # by up to lr per step, every other one must agree. A missing all-reduce moves most entries apart.
    close = [torch.isclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a]
    differing = sum(int((~c).sum()) for c in close) / sum(c.numel() for c in close)
    print(f"entries differing between 1 and 2 processes: {differing:.2e}")
    assert differing < 1e-3
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 2 * TINY["lr"] * TINY["steps"]


def _params_of_base():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(BASE / "unet", torch_dtype=torch.float32)
    return {f"unet.{k}": v for k, v in unet.state_dict().items()}


def test_resume_continues_exactly(teachers, tmp_path, monkeypatch):
    names = [f"t0={teachers[0]}", f"t1={teachers[1]}"]
    config = DistillConfig(**{**TINY, "steps": 4}, save_every=2)
    straight = distill(BASE, names, tmp_path / "straight", config, progress=False)

    real_step = Trainer.train_step

    def interrupted(self, data, stage):
        if self.step == 3:
            raise KeyboardInterrupt
        return real_step(self, data, stage)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distill(BASE, names, tmp_path / "resumed", config, progress=False)
    assert not (tmp_path / "resumed").exists()
    assert (tmp_path / "resumed.state" / "distill-state.pt").is_file()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    resumed = distill(BASE, names, tmp_path / "resumed", config, resume=True, progress=False)
    assert resumed.steps_run == 2
    a, b = _params(tmp_path / "straight"), _params(tmp_path / "resumed")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert straight.history.score[-1] == pytest.approx(resumed.history.score[-1], rel=1e-5)
    assert not (tmp_path / "resumed.state").exists()


def test_second_stage_on_synthesised_images(teachers, tmp_path):
    config = DistillConfig(**{**TINY, "steps": 1}, synth_images=4, synth_steps=2, synth_sample_steps=2)
    result = distill(BASE, [str(teachers[0])], tmp_path / "s", config, progress=False)
    assert result.history.stage == ["distill", "synthesised", "synthesised"]


@pytest.mark.parametrize("regularization", [True, False])
def test_incremental_adds_entries_and_keeps_the_old_shapes(teachers, tmp_path, regularization):
    first = tmp_path / "first"
    distill(BASE, [f"a={teachers[0]}", f"b={teachers[1]}"], first, DistillConfig(**TINY), progress=False)
    old, _ = load_student(first)
    out = tmp_path / "second"
    result = add_teachers(first, [f"c={teachers[2]}"], out, DistillConfig(**TINY), regularization=regularization,
                          progress=False)  # fmt: skip
    new, meta = load_student(out)
    assert new.names == ["a", "b", "c"] and result.styles == ["a", "b", "c"]
    assert new.prompts.codebook.shape == (3, old.prompts.codebook.shape[1])
    for p_old, p_new in zip(old.prompts.mlp.parameters(), new.prompts.mlp.parameters(), strict=True):
        assert p_old.shape == p_new.shape
    assert [t["name"] for t in meta["teachers"]] == ["a", "b", "c"]
    assert meta["incremental"]["regularization"] is regularization


def test_training_further_starts_from_the_given_student(teachers, tmp_path):
    first = tmp_path / "first"
    named = [f"a={teachers[0]}", f"b={teachers[1]}"]
    distill(BASE, named, first, DistillConfig(**TINY), progress=False)
    still = DistillConfig(**{**TINY, "steps": 1, "lr": 1e-12, "style_lr": 1e-12})
    distill(BASE, named, tmp_path / "further", still, progress=False, init_from=first)
    distill(BASE, named, tmp_path / "fresh", still, progress=False)
    trained, further, fresh = _params(first), _params(tmp_path / "further"), _params(tmp_path / "fresh")
    changed = [k for k in trained if not torch.equal(trained[k], fresh[k])]
    assert changed  # the first run moved the student away from the base
    for key in changed:
        torch.testing.assert_close(further[key], trained[key], atol=1e-6, rtol=0)
    _, meta = load_student(tmp_path / "further")
    assert meta["continued"]["from"] == str(first) and meta["continued"]["earlier_training"]["steps"] == 3


def test_training_further_needs_the_same_teachers(teachers, tmp_path):
    from featurefusion.distill.backbone import DistillError

    first = tmp_path / "first"
    distill(BASE, [f"a={teachers[0]}", f"b={teachers[1]}"], first, DistillConfig(**TINY), progress=False)
    with pytest.raises(DistillError, match="the student's styles are"):
        distill(BASE, [f"b={teachers[1]}", f"a={teachers[0]}"], tmp_path / "x", DistillConfig(**TINY),
                progress=False, init_from=first)  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_the_device_defaults_to_this_process_gpu_and_the_backend_follows(monkeypatch):
    from featurefusion.distill import trainer

    assert trainer.default_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert trainer.default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert trainer.default_device() == torch.device("cuda", 1)

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(trainer.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(trainer.dist, "init_process_group", lambda backend: calls.append(backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(str(device)))
    trainer.init_distributed(torch.device("cuda", 1))
    trainer.init_distributed(torch.device("cpu"))
    assert calls == ["cuda:1", "nccl", "gloo"]
