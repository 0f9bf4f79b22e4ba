"""Shared helpers of the ensemble tests."""

from __future__ import annotations

from pathlib import Path

import torch

from featurefusion.ensemble.train import encode_prompts

CHECKPOINTS = Path(__file__).parents[2] / "src" / "featurefusion" / "toyworld" / "checkpoints"
BASE = CHECKPOINTS / "base"
SPECIALISTS = [CHECKPOINTS / "specialists" / f"{name}.safetensors" for name in ("objects-round", "style-dark")]


def load_toy_members():
    """The built-in world's base and two specialists (a test module makes this its `toy_members` fixture)."""
    from featurefusion.ensemble.io import load_members

    return load_members(BASE, SPECIALISTS)


def toy_inputs(pipe, data, step: int, size: int):
    """(noisy images, timesteps, text context, noise) of one data step, fixed by the step."""
    prompts, images = data.batch(step, size)
    gen = torch.Generator().manual_seed(step)
    noise = torch.randn(images.shape, generator=gen)
    t = torch.randint(0, 1000, (size,), generator=gen)
    with torch.no_grad():
        context = encode_prompts(pipe, prompts)
    return pipe.scheduler.add_noise(images, noise, t), t, context, noise
