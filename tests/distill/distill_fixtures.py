"""Fixtures of the distillation tests, star-imported by the test modules (a conftest.py here would shadow the
root one, whose helpers other tests import as `conftest`). Teachers are the built-in world's shipped base with
seeded perturbations (as fine-tunes are), saved as UNet weight files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from featurefusion.toyworld.demo import SHIPPED

BASE = SHIPPED / "base"


def perturbed_teacher(path: Path, seed: int, scale: float = 0.1) -> Path:
    from diffusers import UNet2DConditionModel

    from featurefusion.toyworld.train import save_unet_file

    unet = UNet2DConditionModel.from_pretrained(BASE / "unet", torch_dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(scale * p.std().nan_to_num(0.0) * torch.randn(p.shape, generator=gen))
    save_unet_file(unet, path, dtype=torch.float32)
    return path


@pytest.fixture(scope="session")
def teachers(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("teachers")
    return [perturbed_teacher(folder / f"t{i}.safetensors", seed=i + 1) for i in range(3)]


@pytest.fixture(scope="session")
def backbone():
    from featurefusion.distill.backbone import load_backbone

    return load_backbone(BASE)
