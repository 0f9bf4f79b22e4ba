"""Sample inputs for ZipIt! from a data source a recipe can name: the built-in world's broad data, or a folder of
captioned images (the layout `featurefusion shard` writes: images plus metadata.jsonl).

The base model's own parts turn data into U-Net inputs: its text encoder embeds the prompts (UNet-only fine-tunes
share it), its VAE (Stable Diffusion) encodes images to latents, its scheduler's noise schedule noises them at
uniformly drawn timesteps as training does. A base that is a single file takes configs, tokenizer and scheduler
from a pipeline folder (`pipeline`, like `--template` elsewhere) and its own text encoder and VAE weights.
Every 10th prompt is left empty, as classifier-free-guidance training drops prompts, so the unconditional
branch that sampling uses is seen too. Everything is seeded: the same source, count and seed give the same
inputs, which replay relies on; a folder's selected images and captions are fingerprinted for the recipe.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from featurefusion.errors import CheckpointError, DataError
from featurefusion.merge.zipit import ZipItInputs, noisy_inputs

TOYWORLD = "toyworld"
EMPTY_PROMPT_EVERY = 10
ENCODE_BATCH = 16


def resolve_source(source: str, recipe_dir: Path | None = None) -> str | Path:
    """`toyworld`, or the captioned folder (a relative path is also looked up beside the recipe)."""
    if source == TOYWORLD:
        return TOYWORLD
    path = Path(source)
    if not path.exists() and not path.is_absolute() and recipe_dir is not None and (recipe_dir / path).exists():
        path = recipe_dir / path
    if not path.is_dir():
        raise DataError(f"ZipIt! sample data must be {TOYWORLD!r} or a folder of captioned images", path)
    return path


def fingerprint(source: str, count: int, seed: int, recipe_dir: Path | None = None) -> str:
    """SHA-256 of what the inputs are made from: the selected images' bytes and captions (the built-in world's
    data is generated from the seed, so its fingerprint is its name)."""
    resolved = resolve_source(source, recipe_dir)
    if resolved == TOYWORLD:
        return TOYWORLD
    digest = hashlib.sha256()
    for item in _selected(resolved, count, seed):
        digest.update(f"{item.source_id}\0{item.caption}\0".encode())
        digest.update(item.path.read_bytes())
    return digest.hexdigest()


def sample_inputs(
    source: str,
    base: Path,
    pipeline: Path | None,
    count: int,
    seed: int,
    recipe_dir: Path | None = None,
    batch_size: int = 64,
) -> list[ZipItInputs]:
    """U-Net inputs from `source`, made with the parts of the base model: `base` itself when it is a pipeline
    folder, else the `pipeline` folder with the base file's own text encoder and VAE weights copied in."""
    resolved = resolve_source(source, recipe_dir)
    if resolved == TOYWORLD:
        return _toyworld(Path(pipeline or base), count, seed, batch_size)
    return _captioned_folder(resolved, Path(base), pipeline, count, seed, batch_size)


def with_empty_prompts(prompts: list[str]) -> list[str]:
    return ["" if i % EMPTY_PROMPT_EVERY == EMPTY_PROMPT_EVERY - 1 else p for i, p in enumerate(prompts)]


@torch.inference_mode()
def _toyworld(folder: Path, count: int, seed: int, batch_size: int) -> list[ZipItInputs]:
    from featurefusion.toyworld import world
    from featurefusion.toyworld.models import load_pipeline

    if not (folder / "model_index.json").is_file():
        raise CheckpointError("the built-in world's sample inputs need a built-in world model folder", folder)
    try:
        pipe = load_pipeline(folder)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"not a built-in world model folder ({err})", folder) from None
    specs, images = world.make_batch(world.broad_task(), count, seed, split="train")
    embeddings = pipe.encode(with_empty_prompts([s.prompt for s in specs]))
    return noisy_inputs(images, embeddings, pipe.scheduler, seed, batch_size)


def _selected(folder: Path, count: int, seed: int):
    from featurefusion.train.sources import read_captioned_folder

    items = read_captioned_folder(folder)
    if count < len(items):
        chosen = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:count]
        items = [items[i] for i in sorted(chosen.tolist())]
    return items


@torch.inference_mode()
def _captioned_folder(
    folder: Path, base: Path, pipeline: Path | None, count: int, seed: int, batch_size: int
) -> list[ZipItInputs]:
    from diffusers import DDPMScheduler

    from featurefusion.evaluate.sampling import load_pipeline
    from featurefusion.train.finetune import load_training_image

    pipe = load_pipeline(base, template=pipeline)
    if getattr(pipe, "vae", None) is None or getattr(pipe, "text_encoder", None) is None:
        raise CheckpointError(
            f"a captioned folder needs the base's VAE and text encoder (use {TOYWORLD!r} for the built-in world)", base
        )
    tokenizer, text_encoder, vae = pipe.tokenizer, pipe.text_encoder.eval(), pipe.vae.eval()
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the same noise schedule, with add_noise
    resolution = pipe.unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    items = _selected(folder, count, seed)
    latents, embeddings = [], []
    prompts = with_empty_prompts([item.caption for item in items])
    for start in range(0, len(items), ENCODE_BATCH):
        chunk = items[start : start + ENCODE_BATCH]
        pixels = torch.stack([load_training_image(item.path, resolution) for item in chunk])
        # The posterior mean rather than a draw: the noise added next is the only randomness.
        latents.append(vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor)
        ids = tokenizer(
            prompts[start : start + ENCODE_BATCH],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        embeddings.append(text_encoder(ids)[0])
    return noisy_inputs(torch.cat(latents), torch.cat(embeddings), scheduler, seed, batch_size)
