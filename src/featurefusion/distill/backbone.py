"""The frozen parts a distillation shares with its base, and the teachers' UNets.

Two kinds of base: a Stable Diffusion pipeline folder (tokenizer, CLIP text encoder, VAE, UNet, scheduler;
the UNet works on VAE latents) and the built-in world's toy pipeline folder (no VAE: the UNet works on
pixels). Teachers are UNets of the base's architecture in any layout `open_checkpoint` reads (UNet-only
fine-tunes, single files, pipeline folders); they share the base's text encoder, as UNet-only fine-tunes do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from featurefusion.errors import CheckpointError, FeatureFusionError


class DistillError(FeatureFusionError):
    """Bad input to a distillation; names the file and key where there is one."""

    def __init__(self, message: str, path: object | None = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{message} ({self.path})" if self.path is not None else message)


@dataclass
class Backbone:
    folder: Path
    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module | None
    unet: UNet2DConditionModel
    scheduler: DDPMScheduler
    toy: bool

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def to(self, device: torch.device) -> Backbone:
        """Text encoder, VAE and UNet onto `device` (where a trainer's student is)."""
        for part in (self.text_encoder, self.vae, self.unet):
            if part is not None:
                part.to(device)
        return self

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        length = self.tokenizer.model_max_length
        ids = self.tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return self.text_encoder(ids.input_ids.to(self.device))[0].float()

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] -> the UNet's input space (VAE latents, or the pixels themselves)."""
        if self.vae is None:
            return pixels.float()
        # diffusers draws from a CPU generator on the CPU and moves the draw: the same latents on every device.
        latents = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist.sample(generator=generator)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def synthesize(self, unet, prompts: list[str], seed: int, steps: int, guidance: float) -> torch.Tensor:
        """Clean samples of `unet` in its input space (DDIM with classifier-free guidance)."""
        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(steps)
        cond, uncond = self.encode_text(prompts), self.encode_text([""])
        channels, size = self.unet.config.in_channels, self.unet.config.sample_size
        gen = torch.Generator().manual_seed(seed)
        device = next(unet.parameters()).device
        x = torch.randn(len(prompts), channels, size, size, generator=gen).to(device) * scheduler.init_noise_sigma
        context = torch.cat([uncond.expand(len(prompts), -1, -1), cond]).to(device)
        for t in scheduler.timesteps:
            e_uncond, e_cond = unet(torch.cat([x, x]), t, context).sample.chunk(2)
            x = scheduler.step(e_uncond + guidance * (e_cond - e_uncond), t, x).prev_sample
        return x.clamp(-1, 1) if self.toy else x


def load_backbone(base: str | os.PathLike) -> Backbone:
    """The base model's parts; the built-in world's folder (no vae/) or a Stable Diffusion pipeline folder."""
    folder = Path(base)
    if not (folder / "model_index.json").is_file() or not (folder / "unet").is_dir():
        raise DistillError("the base must be a diffusers pipeline folder (model_index.json and unet/)", folder)
    toy = not (folder / "vae").is_dir()
    try:
        if toy:
            from featurefusion.toyworld.models import load_pipeline

            pipe = load_pipeline(folder)
            parts = dict(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=None, unet=pipe.unet,
                         scheduler=DDPMScheduler.from_config(pipe.scheduler.config))  # fmt: skip
        else:
            from featurefusion.train.finetune import load_components

            c = load_components(str(folder))
            c.vae.requires_grad_(False).eval()
            parts = dict(tokenizer=c.tokenizer, text_encoder=c.text_encoder, vae=c.vae, unet=c.unet,
                         scheduler=c.noise_scheduler)  # fmt: skip
    except FeatureFusionError:
        raise
    except Exception as err:  # config and weight errors come in many types; all mean "cannot load"
        raise DistillError(f"cannot load the base: {type(err).__name__}: {err}", folder) from err
    if parts["unet"].config.get("addition_embed_type") is not None:
        raise DistillError(
            "this base's UNet needs added conditioning (SDXL's pooled text embeddings and time ids, "
            f"addition_embed_type={parts['unet'].config.addition_embed_type!r}); distillation supports SD 1.x/2.x "
            "UNets",
            folder,
        )
    if parts["scheduler"].config.prediction_type != "epsilon":
        raise DistillError("only epsilon-prediction models can be distilled (scheduler prediction_type)", folder)
    parts["text_encoder"].requires_grad_(False).eval()
    parts["unet"].float().eval().requires_grad_(False)
    return Backbone(folder=folder, toy=toy, **parts)


def teacher_name(spec: str) -> tuple[str, Path]:
    """`NAME=PATH` or `PATH` (named after the file's stem, or the folder's name)."""
    name, sep, path = spec.partition("=")
    if sep and name and not Path(spec).exists():
        return name, Path(path)
    p = Path(spec)
    return (p.stem if p.is_file() else p.name), p


def load_teacher(path: Path, base: UNet2DConditionModel) -> UNet2DConditionModel:
    """A teacher's UNet in the base's architecture. Another architecture is an error naming file and key."""
    from featurefusion.io.checkpoint import open_checkpoint

    expected = base.state_dict()
    try:
        with open_checkpoint(path) as ckpt:
            keys = ckpt.keys("unet")
            if not keys:
                raise DistillError("no UNet weights in this checkpoint", path)
            state = {}
            for key in keys:
                inner = key.removeprefix("unet.")
                if inner not in expected:
                    raise DistillError(f"not the base's architecture: unexpected UNet key {inner!r}", path)
                tensor = ckpt.read(key)
                if tuple(tensor.shape) != tuple(expected[inner].shape):
                    raise DistillError(
                        f"not the base's architecture: key {inner!r} has shape {tuple(tensor.shape)}, the base "
                        f"{tuple(expected[inner].shape)}",
                        path,
                    )
                state[inner] = tensor.float()
    except CheckpointError as err:
        raise DistillError(str(err)) from None
    missing = sorted(set(expected) - set(state))
    if missing:
        raise DistillError(f"not the base's architecture: UNet key {missing[0]!r} is missing", path)
    unet = UNet2DConditionModel.from_config(base.config)
    unet.load_state_dict(state)
    return unet.float().eval().requires_grad_(False)
