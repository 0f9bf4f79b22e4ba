"""UNet-only fine-tuning on the tiny pipeline: what moves, what stays, the output file, resuming, the CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from featurefusion.cli import main
from featurefusion.io.checkpoint import open_checkpoint
from featurefusion.train.finetune import (
    METADATA_KEY,
    FinetuneConfig,
    FinetuneError,
    FinetuneResult,
    find_latest_state,
    finetune,
    load_components,
    load_training_image,
)

from conftest import write_captioned_folder

CAPTIONS = ["a red circle", "a blue square", "a striped circle", "a photo of a red square", "blue", "a circle"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Six small captioned images in the shard split layout (images + metadata.jsonl)."""
    return write_captioned_folder(tmp_path_factory.mktemp("shard") / "train", CAPTIONS)


def config_for(tiny, data: Path, output: Path, **overrides) -> FinetuneConfig:
    settings = dict(
        resolution=16,
        learning_rate=1e-3,  # large enough that two steps move every trained weight visibly
        warmup_steps=0,
        max_steps=2,
        checkpoint_every=1,
        attention_slicing="auto",
        progress=False,
    )
    return FinetuneConfig(model=str(tiny.pipeline), data=data, output=output, **{**settings, **overrides})


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@dataclass
class Run:
    config: FinetuneConfig
    result: FinetuneResult
    text_before: dict[str, torch.Tensor]
    vae_before: dict[str, torch.Tensor]
    components: object


@pytest.fixture(scope="module")
def run(tiny, data, tmp_path_factory) -> Run:
    """Two optimizer steps (4 micro-batches with accumulation 2), a saved state after each."""
    config = config_for(tiny, data, tmp_path_factory.mktemp("run") / "unet")
    components = load_components(str(tiny.pipeline))
    text_before, vae_before = state_of(components.text_encoder), state_of(components.vae)
    result = finetune(config, components)
    return Run(config, result, text_before, vae_before, components)


def test_two_steps_change_the_unet_only(run, tiny):
    result = run.result
    assert (result.start_step, result.steps_run, result.total_steps) == (0, 2, 2)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    base = tiny.unet_states[0]
    with open_checkpoint(run.config.output) as ckpt:
        assert ckpt.layout == "diffusers-unet"
        assert set(ckpt.keys()) == {f"unet.{k}" for k in base}
        changed = [k for k in base if not torch.equal(ckpt.read(f"unet.{k}"), base[k])]
        assert all(torch.isfinite(ckpt.read(f"unet.{k}")).all() for k in base)
    assert len(changed) > 0.9 * len(base), f"only {len(changed)} of {len(base)} UNet tensors moved"
    for name, before in (("text_encoder", run.text_before), ("vae", run.vae_before)):
        module = getattr(run.components, name)
        after = module.state_dict()
        assert all(torch.equal(after[k], before[k]) for k in before), f"{name} changed"
        assert not any(p.requires_grad for p in module.parameters())


def test_output_carries_its_settings(run):
    with open_checkpoint(run.config.output) as ckpt:
        settings = json.loads(ckpt.metadata[METADATA_KEY])
    assert settings["settings"]["learning_rate"] == 1e-3
    assert settings["settings"]["gradient_accumulation_steps"] == 2
    assert settings["num_images"] == len(CAPTIONS) and settings["total_steps"] == 2
    sidecar = json.loads((run.config.output / "training.json").read_text())
    assert sidecar == settings
    assert json.loads((run.config.output / "config.json").read_text())["block_out_channels"] == [32, 64]


def test_resume_continues_at_the_saved_step_and_matches_the_uninterrupted_run(run, tiny, data, tmp_path):
    states = run.config.state_dir
    assert [p.name for p in run.result.checkpoints] == ["step-00000001", "step-00000002"]
    assert find_latest_state(states) == states / "step-00000002"
    config = config_for(
        tiny, data, tmp_path / "resumed", resume=str(states / "step-00000001"), checkpoint_dir=tmp_path / "states"
    )
    result = finetune(config)
    assert (result.start_step, result.steps_run) == (1, 1)
    with open_checkpoint(run.config.output) as full, open_checkpoint(config.output) as resumed:
        for key in full.keys():
            assert torch.equal(full.read(key), resumed.read(key)), key
    # The resumed run did one step from the saved weights: the second step of the full run, not a first one.
    assert result.losses == pytest.approx(run.result.losses[1:], rel=1e-5)


def test_resume_refuses_changed_settings(run, tiny, data, tmp_path):
    states = run.config.state_dir
    config = config_for(tiny, data, tmp_path / "out", resume="latest", checkpoint_dir=states, batch_size=2)
    with pytest.raises(FinetuneError, match="batch_size"):
        finetune(config)


def test_refuses_output_equal_to_input_or_existing(tiny, data, tmp_path):
    with pytest.raises(FinetuneError, match="input pipeline"):
        finetune(config_for(tiny, data, tiny.pipeline))
    with pytest.raises(FinetuneError, match="input pipeline"):
        finetune(config_for(tiny, data, tiny.pipeline / "unet"))
    (tmp_path / "exists").mkdir()
    with pytest.raises(FinetuneError, match="already exists"):
        finetune(config_for(tiny, data, tmp_path / "exists"))
    with pytest.raises(FinetuneError, match="unknown lr scheduler"):
        finetune(config_for(tiny, data, tmp_path / "o", lr_scheduler="cosinus"))
    with pytest.raises(FinetuneError, match="no such pipeline folder"):
        finetune(FinetuneConfig(model=str(tmp_path / "nothing"), data=data, output=tmp_path / "o"))


def test_image_preprocessing_resizes_and_centre_crops(tmp_path):
    # 64x32: white in the middle 32 columns, black at both ends; the 16 px centre crop of the 32x16 resize is white.
    pixels = torch.zeros(32, 64, 3, dtype=torch.uint8)
    pixels[:, 16:48] = 255
    Image.fromarray(pixels.numpy()).save(tmp_path / "wide.png")
    tensor = load_training_image(tmp_path / "wide.png", 16)
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32
    assert torch.allclose(tensor[:, :, 2:-2], torch.ones(3, 16, 12), atol=1e-6)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(FinetuneError, match="broken.png"):
        load_training_image(tmp_path / "broken.png", 16)


def test_cli_finetune(tiny, data, tmp_path, capsys):
    out = tmp_path / "cli-unet"
    argv = ["finetune", "--model", str(tiny.pipeline), "--data", str(data), "-o", str(out), "--resolution", "16"]
    argv += ["--max-steps", "1", "--checkpoint-every", "0", "--lr", "1e-3", "--warmup-steps", "0", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "steps 0..1 of 1" in printed
    with open_checkpoint(out) as ckpt:
        assert ckpt.layout == "diffusers-unet"
    assert not (tmp_path / "cli-unet-checkpoints").exists()
    assert main(argv) == 2  # the output exists now
    assert "already exists" in capsys.readouterr().err
