"""Tiny Stable Diffusion-shaped models, built from configs (nothing is downloaded), saved in every layout.

`tiny` gives a base model and two "specialists" (the base plus small seeded perturbations, as fine-tunes
are) as ldm single files, the base also as a diffusers pipeline folder and as a diffusers UNet file. The
evaluation tests' scoring models (a CLIP folder, a feature net for FID, a reward model) are tiny and random
too, further down.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("FEATUREFUSION_PROGRESS", "0")

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=16,
)
TEXT_CONFIG = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=64,
    max_position_embeddings=16,
)


def build_unet(seed: int = 0, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**UNET_CONFIG, **overrides}).eval()


def build_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG).eval()


def build_text_encoder(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).eval()


def build_tokenizer(folder: Path):
    """A CLIP tokenizer over a handful of words, written as vocab.json + merges.txt."""
    from transformers import CLIPTokenizer

    words = ["a", "red", "blue", "circle", "square", "striped", "photo", "of"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for w in words:
        vocab[f"{w}</w>"] = len(vocab)
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(f"{ch}</w>", len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def write_captioned_folder(folder: Path, captions: list[str], size: tuple[int, int] = (20, 24)) -> Path:
    """Seeded random images `0.png`, `1.png`, ... with their captions in `metadata.jsonl`: a shard split folder."""
    from PIL import Image

    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    with (folder / "metadata.jsonl").open("w") as handle:
        for i, caption in enumerate(captions):
            pixels = torch.randint(0, 256, (*size, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i:05d}.png")
            handle.write(json.dumps({"file_name": f"{i:05d}.png", "text": caption}) + "\n")
    return folder


def perturb(state: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A stand-in for fine-tuning: every float weight moves a little, in a seeded direction."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        if value.is_floating_point():
            noise = torch.randn(value.shape, generator=gen)
            out[key] = value + scale * (value.std() if value.numel() > 1 else 1.0) * noise
        else:
            out[key] = value.clone()
    return out


def to_ldm(unet_sd, text_sd, vae_sd, unet_layout) -> dict[str, torch.Tensor]:
    from featurefusion.io import sd_keys

    out = {}
    for component, sd in (("unet", unet_sd), ("text_encoder", text_sd), ("vae", vae_sd)):
        for key, value in sd.items():
            ldm_key = sd_keys.diffusers_to_ldm(component, key, unet_layout)
            if sd_keys.vae_attention_needs_reshape(component, key) and value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)
            out[ldm_key] = value.contiguous()
    # Real SD 1.x files carry CLIP's int64 position ids (transformers >= 5 no longer saves them).
    positions = TEXT_CONFIG["max_position_embeddings"]
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(positions).unsqueeze(0)
    return out


@dataclass
class Tiny:
    root: Path
    base: Path  # ldm single file
    specialists: list[Path]  # ldm single files
    pipeline: Path  # base as a diffusers pipeline folder
    unet_file: Path  # base UNet as a diffusers weights file
    unet_states: list[dict[str, torch.Tensor]] = field(repr=False)  # diffusers UNet state dicts: base, specialists

    @property
    def models(self) -> list[Path]:
        return [self.base, *self.specialists]


def tiny_layout():
    from featurefusion.io.checkpoint import unet_layout_from_diffusers_keys

    return unet_layout_from_diffusers_keys(build_unet().state_dict().keys(), build_vae().state_dict().keys())


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    root = tmp_path_factory.mktemp("tiny")
    unet, vae, text = build_unet(0), build_vae(1), build_text_encoder(2)
    layout = tiny_layout()
    unet_sd = {k: v.contiguous() for k, v in unet.state_dict().items()}
    text_sd = {k: v.contiguous() for k, v in text.state_dict().items()}
    vae_sd = {k: v.contiguous() for k, v in vae.state_dict().items()}

    base = root / "base.safetensors"
    save_file(to_ldm(unet_sd, text_sd, vae_sd, layout), base)
    specialists, states = [], [unet_sd]
    for i, seed in enumerate((11, 12)):
        spec_unet = perturb(unet_sd, seed)
        states.append(spec_unet)
        path = root / f"specialist{i + 1}.safetensors"
        # Specialists are UNet fine-tunes: their text encoder and VAE are the base's.
        save_file(to_ldm(spec_unet, text_sd, vae_sd, layout), path)
        specialists.append(path)

    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=build_tokenizer(root / "tok"),
        scheduler=DDPMScheduler(num_train_timesteps=100),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline = root / "pipeline"
    pipe.save_pretrained(pipeline)
    unet_file = root / "unet.safetensors"
    save_file(unet_sd, unet_file)
    return Tiny(root, base, specialists, pipeline, unet_file, states)


# ---- tiny scoring models for the evaluation tests: a CLIP folder, a feature net for FID, a reward model ----
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
