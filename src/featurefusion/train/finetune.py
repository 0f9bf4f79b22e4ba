"""UNet-only fine-tuning of a Stable Diffusion pipeline on a captioned image folder (paper §5.1.3).

The text encoder and the VAE are frozen (and cast to the mixed-precision dtype); only the UNet learns, with
the standard denoising objective: MSE between the UNet's prediction and the noise (or the velocity, when
the pipeline's scheduler is configured for v-prediction). Defaults are the paper's: 512 px, batch 1,
gradient accumulation 2, AdamW at 1e-6, cosine schedule with warmup, 3 epochs, gradient checkpointing,
attention slicing and VAE slicing.

Runs under `accelerate` (one process, or `accelerate launch` for several GPUs). Determinism: the shuffle
order of an epoch and the noise of a micro-batch are functions of (seed, epoch, position, process), not of a
running random state, so a run resumed from a saved state reproduces the uninterrupted run exactly.

"Attention slicing" in diffusers is `set_attention_slice`: attention computed head-slice by head-slice
through `SlicedAttnProcessor`. It is differentiable, so it is used in training too; it lowers the peak of
the attention forward pass, while autograd still keeps every slice's activations for the backward pass
(gradient checkpointing is what bounds those). On PyTorch >= 2 the default SDPA attention is already
memory-efficient, and slicing replaces it: `attention_slicing="off"` is usually faster on modern GPUs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from featurefusion import __version__
from featurefusion.errors import FeatureFusionError
from featurefusion.progress import bar_disabled
from featurefusion.train.sources import CaptionedImage, read_captioned_folder

log = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "fp16", "bf16")
ATTENTION_SLICING = ("off", "auto", "max")
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
SETTINGS_FILE = "training.json"
METADATA_KEY = "featurefusion.training"
STATE_FILE = "featurefusion-state.json"
STATE_PREFIX = "step-"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Settings that fix how a step number maps to a data position: a resumed run must share them.
RESUME_INVARIANTS = ("batch_size", "gradient_accumulation_steps", "seed", "epochs", "max_steps", "num_images")


class FinetuneError(FeatureFusionError):
    """A fine-tuning run cannot start or go on (bad paths, options, resume state). Names the path."""

    def __init__(self, message: str, path: object | None = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{message} ({self.path})" if self.path is not None else message)


@dataclass
class FinetuneConfig:
    model: str  # diffusers pipeline folder or hub id
    data: Path  # captioned image folder (a shard split folder)
    output: Path  # folder for the fine-tuned UNet (config.json + diffusion_pytorch_model.safetensors)
    revision: str | None = None
    caption_column: str | None = None
    resolution: int = 512
    batch_size: int = 1
    gradient_accumulation_steps: int = 2
    learning_rate: float = 1e-6
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler: str = "cosine"
    warmup_steps: int = 100
    epochs: int = 3
    max_steps: int | None = None
    mixed_precision: str = "no"
    seed: int = 0
    gradient_checkpointing: bool = True
    attention_slicing: str = "auto"  # off | auto | max | an integer slice size
    vae_slicing: bool = True
    checkpoint_every: int = 500  # optimizer steps between saved training states; 0 = never
    checkpoint_dir: Path | None = None  # default: <output>-checkpoints next to the output
    resume: str | None = None  # "latest" or a state folder
    num_workers: int = 0
    overwrite: bool = False
    progress: bool | None = None

    def __post_init__(self) -> None:
        self.data, self.output = Path(self.data), Path(self.output)
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = Path(self.checkpoint_dir)

    @property
    def state_dir(self) -> Path:
        return self.checkpoint_dir or self.output.with_name(self.output.name + "-checkpoints")

    def validate(self) -> None:
        positive = ("resolution", "batch_size", "gradient_accumulation_steps", "epochs")
        for name in positive:
            if getattr(self, name) < 1:
                raise FinetuneError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.resolution % 8:
            raise FinetuneError(f"resolution must be a multiple of 8, got {self.resolution}")
        if self.max_steps is not None and self.max_steps < 1:
            raise FinetuneError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise FinetuneError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}")
        if self.attention_slicing not in ATTENTION_SLICING and not str(self.attention_slicing).isdigit():
            raise FinetuneError(f"attention_slicing must be one of {', '.join(ATTENTION_SLICING)} or an integer")
        from diffusers.optimization import SchedulerType

        known = [t.value for t in SchedulerType]
        if self.lr_scheduler not in known:
            raise FinetuneError(f"unknown lr scheduler {self.lr_scheduler!r}; choose one of {', '.join(known)}")
        if self.warmup_steps < 0 or self.checkpoint_every < 0:
            raise FinetuneError("warmup_steps and checkpoint_every must not be negative")


@dataclass
class Components:
    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: Any


@dataclass
class FinetuneResult:
    output: Path
    start_step: int  # optimizer steps already done when this run began (from a resumed state)
    steps_run: int  # optimizer steps done by this run
    total_steps: int
    losses: list[float] = field(default_factory=list)  # mean loss of each optimizer step of this run
    checkpoints: list[Path] = field(default_factory=list)


# ---- loading -------------------------------------------------------------------------------------------


def load_components(model: str, revision: str | None = None) -> Components:
    """Tokenizer, text encoder, VAE, UNet and noise scheduler of a diffusers pipeline folder or hub id."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    _check_model_reference(model)
    try:
        return Components(
            tokenizer=CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", revision=revision),
            text_encoder=CLIPTextModel.from_pretrained(model, subfolder="text_encoder", revision=revision),
            vae=AutoencoderKL.from_pretrained(model, subfolder="vae", revision=revision),
            unet=UNet2DConditionModel.from_pretrained(model, subfolder="unet", revision=revision),
            noise_scheduler=DDPMScheduler.from_pretrained(model, subfolder="scheduler", revision=revision),
        )
    except Exception as err:  # hub, file and config errors come in many types; all mean "cannot load"
        raise FinetuneError(f"cannot load the pipeline: {type(err).__name__}: {err}", model) from err


def _check_model_reference(model: str) -> None:
    path = Path(model)
    if path.exists():
        if not (path / "model_index.json").is_file() or not (path / "unet").is_dir():
            raise FinetuneError("not a diffusers pipeline folder (model_index.json and unet/ expected)", path)
        return
    if not HUB_ID.match(model):  # neither an existing folder nor something the hub could name
        raise FinetuneError("no such pipeline folder", path)


# ---- data ----------------------------------------------------------------------------------------------


def load_training_image(path: Path, resolution: int) -> torch.Tensor:
    """RGB image resized (shorter side = resolution) and centre-cropped, as a [3, H, W] tensor in [-1, 1]."""
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:
        raise FinetuneError(f"unreadable image ({type(err).__name__}: {err})", path) from None
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class CaptionedImageDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[CaptionedImage], tokenizer, resolution: int):
        self.items = items
        self.tokenizer = tokenizer
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.items[index]
        tokens = self.tokenizer(
            item.caption,
            max_length=self.tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        return {"pixel_values": load_training_image(item.path, self.resolution), "input_ids": tokens.input_ids[0]}


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A permutation that depends only on (seed, epoch): the same order whether a run was resumed or not."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


# ---- training ------------------------------------------------------------------------------------------


def finetune(config: FinetuneConfig, components: Components | None = None) -> FinetuneResult:
    """Fine-tune the UNet of `config.model` on `config.data` and write it to `config.output`.

    `components` lets a caller hand over already-built models (tests do); otherwise they are loaded from
    `config.model`. The text encoder and VAE are frozen in place."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    config.validate()
    _check_output(config)
    items = read_captioned_folder(config.data, config.caption_column)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps, mixed_precision=config.mixed_precision
    )
    set_seed(config.seed)
    parts = components or load_components(config.model, config.revision)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    _freeze(parts.text_encoder, accelerator.device, weight_dtype)
    _freeze(parts.vae, accelerator.device, weight_dtype)
    _prepare_unet_memory(parts, config)

    sampler = EpochShuffleSampler(len(items), config.seed)
    loader = torch.utils.data.DataLoader(
        CaptionedImageDataset(items, parts.tokenizer, config.resolution),
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.num_workers,
    )
    loader = accelerator.prepare(loader)
    steps_per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)

    optimizer, lr_scheduler = _optimizer_and_schedule(parts.unet, config, total_steps, accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(parts.unet, optimizer, lr_scheduler)
    invariants = {**{k: getattr(config, k) for k in RESUME_INVARIANTS if k != "num_images"}, "num_images": len(items)}
    start_step = _resume(accelerator, config, invariants)

    result = FinetuneResult(config.output, start_step, 0, total_steps)
    train = _TrainLoop(accelerator, unet, parts, optimizer, lr_scheduler, config, weight_dtype)
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        desc="fine-tuning UNet",
        unit="step",
        disable=not accelerator.is_local_main_process or bar_disabled(config.progress),
    )
    step = start_step
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        skip = done_in_epoch * config.gradient_accumulation_steps  # states are saved at step boundaries only
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        for position, batch in enumerate(epoch_loader, start=skip):
            loss = train.micro_step(batch, micro_index=epoch * len(loader) + position)
            if loss is None:
                continue
            step += 1
            result.losses.append(loss)
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                result.checkpoints.append(_save_state(accelerator, config, step, invariants))
            if step >= total_steps:
                break
    bar.close()
    result.steps_run = step - start_step
    if accelerator.is_main_process:
        _write_unet(accelerator.unwrap_model(unet), config, result, len(items))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


class _TrainLoop:
    """One micro-batch at a time; returns the mean loss of an accumulation group when an optimizer step is made."""

    def __init__(self, accelerator, unet, parts: Components, optimizer, lr_scheduler, config, weight_dtype):
        self.accelerator = accelerator
        self.unet = unet
        self.parts = parts
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.config = config
        self.weight_dtype = weight_dtype
        self.pending: list[torch.Tensor] = []

    def micro_step(self, batch: dict[str, torch.Tensor], micro_index: int) -> float | None:
        accelerator = self.accelerator
        generator = torch.Generator(device=accelerator.device).manual_seed(self._noise_seed(micro_index))
        with accelerator.accumulate(self.unet):
            loss = diffusion_loss(batch, self.unet, self.parts, generator, self.weight_dtype, accelerator.device)
            accelerator.backward(loss)
            if accelerator.sync_gradients and self.config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(self.unet.parameters(), self.config.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.pending.append(loss.detach())
        if not accelerator.sync_gradients:
            return None
        mean = accelerator.reduce(torch.stack(self.pending).mean(), reduction="mean")
        self.pending = []
        return float(mean)

    def _noise_seed(self, micro_index: int) -> int:
        process = self.accelerator.process_index
        return (self.config.seed * 1_000_003 + process * 7_919 + micro_index * 104_729) % (2**63 - 1)


def diffusion_loss(batch, unet, parts: Components, generator, weight_dtype, device) -> torch.Tensor:
    """MSE between the UNet's output and the target (noise for epsilon prediction) at a random timestep."""
    scheduler = parts.noise_scheduler
    pixels = batch["pixel_values"].to(device, dtype=weight_dtype)
    with torch.no_grad():
        latents = parts.vae.encode(pixels).latent_dist.sample(generator=generator)
        shift = getattr(parts.vae.config, "shift_factor", None) or 0.0
        latents = ((latents - shift) * parts.vae.config.scaling_factor).float()
        text = parts.text_encoder(batch["input_ids"].to(device), return_dict=False)[0]
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=device
    )
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise FinetuneError(f"unsupported prediction type {prediction_type!r} in the pipeline's scheduler config")
    prediction = unet(noisy, timesteps, text.to(noisy.dtype), return_dict=False)[0]
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")


def _freeze(module: torch.nn.Module, device, dtype) -> None:
    module.requires_grad_(False)
    module.eval()
    module.to(device, dtype=dtype)


def _prepare_unet_memory(parts: Components, config: FinetuneConfig) -> None:
    unet = parts.unet
    unet.requires_grad_(True)
    unet.train()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if config.attention_slicing != "off":
        size = int(config.attention_slicing) if str(config.attention_slicing).isdigit() else config.attention_slicing
        unet.set_attention_slice(size)
    if config.vae_slicing:
        parts.vae.enable_slicing()  # encodes a batch one image at a time: matters for batch_size > 1


def _optimizer_and_schedule(unet, config: FinetuneConfig, total_steps: int, num_processes: int):
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    # accelerate steps a prepared scheduler once per process for each optimizer step; scale to match.
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.warmup_steps * num_processes,
        num_training_steps=total_steps * num_processes,
    )
    return optimizer, lr_scheduler


# ---- checkpoints and output ----------------------------------------------------------------------------


def _save_state(accelerator, config: FinetuneConfig, step: int, invariants: dict) -> Path:
    folder = config.state_dir / f"{STATE_PREFIX}{step:08d}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        (folder / STATE_FILE).write_text(json.dumps({"global_step": step, **invariants}, indent=1))
    accelerator.wait_for_everyone()
    return folder


def find_latest_state(state_dir: Path) -> Path | None:
    """The saved state with the highest step in `state_dir` (only complete ones: those with the step file)."""
    if not state_dir.is_dir():
        return None
    states = [p for p in state_dir.glob(f"{STATE_PREFIX}*") if (p / STATE_FILE).is_file()]
    return max(states, key=lambda p: int(p.name[len(STATE_PREFIX) :]), default=None)


def _resume(accelerator, config: FinetuneConfig, invariants: dict) -> int:
    if config.resume is None:
        return 0
    if config.resume == "latest":
        folder = find_latest_state(config.state_dir)
        if folder is None:
            log.info("no saved state in %s: starting from step 0", config.state_dir)
            return 0
    else:
        folder = Path(config.resume)
        if not (folder / STATE_FILE).is_file():
            raise FinetuneError(f"not a saved training state (no {STATE_FILE})", folder)
    saved = json.loads((folder / STATE_FILE).read_text())
    changed = [k for k in RESUME_INVARIANTS if saved.get(k) != invariants[k]]
    if changed:
        detail = ", ".join(f"{k}: saved {saved.get(k)!r}, now {invariants[k]!r}" for k in changed)
        raise FinetuneError(f"cannot resume with different settings ({detail})", folder)
    accelerator.load_state(str(folder))
    log.info("resumed from %s at step %d", folder, saved["global_step"])
    return int(saved["global_step"])


def _check_output(config: FinetuneConfig) -> None:
    out = config.output.resolve()
    model = Path(config.model)
    if model.exists() and (out == model.resolve() or out.is_relative_to(model.resolve())):
        raise FinetuneError("output must not be the input pipeline folder or inside it", config.output)
    if out == config.data.resolve():
        raise FinetuneError("output must not be the training data folder", config.output)
    if config.output.exists() and not config.overwrite:
        raise FinetuneError("output already exists; pass --overwrite to replace it", config.output)


def training_settings(config: FinetuneConfig, result: FinetuneResult, num_images: int) -> dict:
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    for transient in ("overwrite", "progress", "resume", "num_workers"):
        settings.pop(transient)
    return {
        "featurefusion_version": __version__,
        "task": "unet-finetune",
        "settings": settings,
        "num_images": num_images,
        "total_steps": result.total_steps,
        "final_loss": result.losses[-1] if result.losses else None,
    }


def _write_unet(unet, config: FinetuneConfig, result: FinetuneResult, num_images: int) -> None:
    """config.json + diffusion_pytorch_model.safetensors (settings in its metadata) + training.json, atomically."""
    from safetensors.torch import save_file

    out = config.output
    staging = out.with_name(f".{out.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        unet.save_config(staging)
        settings = training_settings(config, result, num_images)
        state = {k: v.detach().to("cpu").contiguous() for k, v in unet.state_dict().items()}
        metadata = {"format": "pt", METADATA_KEY: json.dumps(settings, sort_keys=True)}
        save_file(state, staging / UNET_WEIGHTS, metadata=metadata)
        (staging / SETTINGS_FILE).write_text(json.dumps(settings, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
