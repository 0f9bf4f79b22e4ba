"""Tiny scoring models for the evaluation tests: a CLIP model folder, a feature net for FID, a reward model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

PROMPTS = ["a red circle", "a blue square", "a photo of a striped circle"]


def clip_tokenizer(folder: Path):
    """A CLIP tokenizer over a few whole words plus single letters (vocab.json + an empty merges.txt)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for word in ("a", "red", "blue", "circle", "square", "striped", "photo", "of"):
        vocab[f"{word}</w>"] = len(vocab)
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(f"{letter}</w>", len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A random CLIP model and its processor saved with save_pretrained: a local model folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)  # a seed whose random CLIP gives positive cosines here (0 is clamped)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(**small, vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1),
        vision_config=dict(**small, image_size=16, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).eval().save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer(folder / "vocab")).save_pretrained(folder)
    return folder


class TinyFeatures(torch.nn.Module):
    """A random conv net from uint8 images to 8 features: FID's feature extractor in tests."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(images.float() / 127.5 - 1.0)).mean(dim=(2, 3))


class TinyReward(torch.nn.Module):
    """Shaped like ImageReward's model: `score(prompt, images)` gives a float for one image, a list for more."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.head = torch.nn.Linear(4, 1)

    def score(self, prompt, images):
        pixels = torch.stack(
            [torch.from_numpy(np.asarray(im, dtype=np.float32)).mean(dim=(0, 1)) / 255 for im in images]
        )
        words = torch.full((len(images), 1), float(len(prompt.split())))
        rewards = self.head(torch.cat([pixels, words], dim=1)).squeeze(1)
        return rewards.item() if len(images) == 1 else rewards.tolist()


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture
def feature_net() -> TinyFeatures:
    return TinyFeatures()


@pytest.fixture
def reward_model():
    """The tiny reward model's class: each instance has the same (seeded) weights."""
    return TinyReward
