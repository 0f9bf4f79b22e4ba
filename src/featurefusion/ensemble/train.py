"""Training AFA aggregators on the denoising loss (AFA §3.4): the member U-Nets stay frozen.

Defaults are the paper's: AdamW, learning rate 1e-4, weight decay 0.01, the prompt dropped (empty) with
probability 0.1 so that the ensemble supports classifier-free guidance.

Data-parallel with accelerate: every step has one global batch (a pure function of the seed and the step);
each process takes an equal slice and accelerate averages the gradients, so N processes take the same steps
as one process on the whole batch. State (aggregators, optimizer, step) is saved under `AFA_DIR/state/`
every `save_every` steps and at the end; `resume` continues from it. `init_from` starts instead from the
aggregators of another AFA folder of the same members (to train them further, e.g. with a decaying rate).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from featurefusion.ensemble.io import Members, load_aggregators, read_config, save_aggregators
from featurefusion.ensemble.unet import AFAUNet, EnsembleError
from featurefusion.io.atomic import write_json_atomic
from featurefusion.progress import bar_disabled

STATE = "state"


@dataclass(frozen=True)
class AFATrainConfig:
    steps: int = 1000
    batch_size: int = 8  # global, over all processes
    lr: float = 1e-4
    weight_decay: float = 0.01
    uncond_prob: float = 0.1
    hidden_cap: int = 320  # aggregator width d = min(block channels, hidden_cap)
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 0  # also save resumable state every this many steps (0: at the end only)
    precision: str = "fp32"  # "bf16": forward under CPU/GPU autocast to bfloat16
    save_dtype: str = "fp32"
    max_seconds: float = 0.0  # stop (and save) after this much training time, before `steps` if need be; 0: no limit
    schedule: str = "constant"  # learning rate: "constant" (the paper's) or "cosine" (to 0 at `steps`)
    snr_gamma: float = 0.0  # Min-SNR-γ loss weighting (0: the paper's plain denoising loss)


@dataclass
class TrainResult:
    folder: Path
    start_step: int
    losses: list[float] = field(default_factory=list)  # mean loss over all processes, one per step run
    seconds: float = 0.0
    end_step: int = 0
    aggregators: object = None  # the trained AggregatorSet


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    tokenizer = pipe.tokenizer
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids  # fmt: skip
    return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]


def drop_prompts(prompts: list[str], probability: float, generator: torch.Generator) -> list[str]:
    drop = torch.rand(len(prompts), generator=generator) < probability
    return ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]


def train_aggregators(members: Members, data, out: str | os.PathLike, config: AFATrainConfig = AFATrainConfig(),
                      resume: bool = False, progress: bool | None = None, accelerator=None,
                      init_from: str | os.PathLike | None = None) -> TrainResult:  # fmt: skip
    """Train the aggregators of an ensemble of `members` on `data` and save them to `out` (starting from the
    trained aggregators in the AFA folder `init_from`, if given)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    out = Path(out)
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    world = accelerator.num_processes
    if config.batch_size % world:
        raise EnsembleError(f"batch size {config.batch_size} is not a multiple of the {world} processes")
    state_dir = out / STATE
    if not resume and (out / "afa.json").exists():
        raise EnsembleError(f"{out} already holds aggregators: pass --resume to continue, or choose another folder")
    if config.schedule not in ("constant", "cosine"):
        raise EnsembleError(f"schedule must be constant or cosine, not {config.schedule!r}")
    if config.snr_gamma < 0:
        raise EnsembleError(f"snr_gamma must be 0 (off) or positive, not {config.snr_gamma}")
    set_seed(config.seed)  # the aggregators' random init (their last conv is zero either way)
    earlier = _earlier_aggregators(init_from, members) if init_from is not None else None
    ensemble = AFAUNet(members.unets, aggregators=earlier, hidden_cap=config.hidden_cap)
    ensemble.aggregators.train()
    optimizer = torch.optim.AdamW(ensemble.aggregators.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(config, step))
    pipe = members.pipe
    device = accelerator.device
    ensemble.to(device)
    pipe.text_encoder.to(device).requires_grad_(False)
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        vae.to(device).requires_grad_(False)
    ensemble, optimizer = accelerator.prepare(ensemble, optimizer)
    # Not prepared: accelerate would step a prepared scheduler once per process; the batch here is global.
    accelerator.register_for_checkpointing(schedule)
    start_step = 0
    if resume:
        start_step = _resume(accelerator, state_dir, config)
    member_refs = members.refs(out) if accelerator.is_main_process else []
    noise_scheduler = pipe.scheduler
    shard = config.batch_size // world
    rank = accelerator.process_index
    result = TrainResult(out, start_step)
    started = time.perf_counter()
    bar = tqdm(range(start_step, config.steps), desc="AFA aggregators", initial=start_step, total=config.steps,
               disable=bar_disabled(progress) if accelerator.is_main_process else True)  # fmt: skip
    for step in bar:
        prompts, images = data.batch(step, config.batch_size)
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        prompts = drop_prompts(prompts, config.uncond_prob, gen)
        rows = slice(rank * shard, (rank + 1) * shard)
        with torch.no_grad():
            targets = _latents(pipe, images, gen).to(device)
            noise = torch.randn(targets.shape, generator=gen).to(device)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(targets),), generator=gen)
            targets, noise, t = targets[rows], noise[rows], t[rows].to(device)
            noisy = noise_scheduler.add_noise(targets, noise, t)
            context = encode_prompts(pipe, prompts[rows])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
            prediction = ensemble(noisy, t, context).sample
        loss = denoising_loss(prediction.float(), noise, t, noise_scheduler, config.snr_gamma)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if config.grad_clip:
            accelerator.clip_grad_norm_(accelerator.unwrap_model(ensemble).aggregators.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
        result.losses.append(mean_loss)
        bar.set_postfix(loss=f"{sum(result.losses[-20:]) / len(result.losses[-20:]):.4f}")
        done = step + 1
        if config.save_every and done % config.save_every == 0 and done < config.steps:
            _save_state(accelerator, state_dir, done, config)
        if config.max_seconds and _out_of_time(accelerator, started, config.max_seconds):
            break
    bar.close()
    result.seconds = time.perf_counter() - started
    result.end_step = start_step + len(result.losses)
    _save_state(accelerator, state_dir, result.end_step, config)
    if accelerator.is_main_process:
        training = {**asdict(config), "data": getattr(data, "description", type(data).__name__),
                    "processes": world, "steps_done": result.end_step,
                    "seconds_this_run": round(result.seconds, 1)}  # fmt: skip
        if init_from is not None:
            training["continued"] = {"from": str(init_from), "earlier_training": read_config(init_from).get("training")}
        save_aggregators(out, accelerator.unwrap_model(ensemble).aggregators, member_refs, training,
                         _DTYPES[config.save_dtype])  # fmt: skip
    accelerator.wait_for_everyone()
    result.aggregators = accelerator.unwrap_model(ensemble).aggregators
    return result


def denoising_loss(prediction, noise, t, noise_scheduler, snr_gamma: float = 0.0) -> torch.Tensor:
    """MSE to the noise; with `snr_gamma`, each sample weighted by min(SNR, γ) / SNR (Min-SNR-γ, Hang et al.
    2023, as diffusers' training examples do). The plain loss is dominated by the least noisy steps, where
    the members differ in detail; the weighting hands the weight to the noisier steps, where a sample's
    object takes shape and the aggregators must pick the member that knows it."""
    if not snr_gamma:
        return torch.nn.functional.mse_loss(prediction, noise)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, t).float()
    weights = snr.clamp(max=snr_gamma) / snr
    if noise_scheduler.config.prediction_type == "v_prediction":
        weights = snr.clamp(max=snr_gamma) / (snr + 1)
    per_sample = (prediction - noise).pow(2).flatten(1).mean(dim=1)
    return (per_sample * weights.to(per_sample.device)).mean()


def _lr_factor(config: AFATrainConfig, step: int) -> float:
    if config.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, config.steps))))
    return 1.0


def _earlier_aggregators(folder: str | os.PathLike, members: Members):
    """The aggregators of the AFA folder `folder`, which must have been trained on these very members."""
    config = read_config(folder)
    recorded = [ref["sha256"] for ref in config["members"]]
    now = [ref["sha256"] for ref in members.refs()]
    if recorded != now:
        raise EnsembleError(f"{folder}: its aggregators were trained on other member models (or another order); "
                            "training further needs the same members in the same order")  # fmt: skip
    return load_aggregators(folder, config)


def _out_of_time(accelerator, started: float, limit: float) -> bool:
    # Every process must stop at the same step: the main process's clock decides.
    flag = torch.tensor([float(time.perf_counter() - started > limit)], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _latents(pipe, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    vae = getattr(pipe, "vae", None)
    if vae is None:  # the built-in world denoises pixels
        return images
    images = images.to(vae.device, vae.dtype)
    # The posterior mean, not a draw: the SD VAE's posterior is narrow, and the batch stays a pure function of the step.
    # The VAE hands back channels-last latents; torch 2.13's CPU backward through the ensemble crashes on them.
    return (vae.encode(images).latent_dist.mean * vae.config.scaling_factor).contiguous()


def _save_state(accelerator, state_dir: Path, step: int, config: AFATrainConfig) -> None:
    tmp = state_dir.with_name(f".{STATE}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        write_json_atomic(tmp / "progress.json", {"step": step, "config": asdict(config)})
        shutil.rmtree(state_dir, ignore_errors=True)
        os.replace(tmp, state_dir)
    accelerator.wait_for_everyone()


def _resume(accelerator, state_dir: Path, config: AFATrainConfig) -> int:
    progress = state_dir / "progress.json"
    if not progress.is_file():
        raise EnsembleError(f"{state_dir}: no saved training state to resume from")
    saved = json.loads(progress.read_text())
    keys = ["batch_size", "lr", "weight_decay", "hidden_cap", "seed", "uncond_prob", "schedule", "snr_gamma"]
    if config.schedule == "cosine":
        keys.append("steps")  # the decay is spread over them
    for key in keys:
        if saved["config"].get(key, getattr(AFATrainConfig(), key)) != getattr(config, key):
            raise EnsembleError(f"{state_dir}: saved with {key}={saved['config'].get(key)}, "
                                f"this run has {getattr(config, key)}; resume with the same settings")  # fmt: skip
    accelerator.load_state(str(state_dir))
    return int(saved["step"])
