"""Training the built-in world's models: a broadly trained base, then UNet-only specialists (paper §5.1.3).

Data are drawn fresh from the generator at every step (the world is infinite and deterministic by seed), so
there is no dataset on disk and no epoch. Half of every specialist batch replays the base's broad data
(`specialist_replay`): the paper fine-tunes SD so gently (lr 1e-6, 3 epochs of 1000 images) that its
specialists keep following prompts, while a tiny model fine-tuned on its shard alone forgets them.

Training uses the standard epsilon-prediction loss with classifier-free-guidance dropout (an empty prompt
10% of the time) and keeps an exponential moving average of the weights (diffusers' EMAModel), which
matters for sample quality at these step counts.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from featurefusion.progress import bar_disabled
from featurefusion.toyworld.models import ToyPipeline, build_pipeline, load_pipeline
from featurefusion.toyworld.world import Task, make_batch, standard_tasks

SPECIALIST_TASKS = (
    "objects-round",
    "objects-angular",
    "objects-pointy",
    "objects-symbol",
    "style-striped",
    "style-outlined",
    "style-dark",
)


@dataclass(frozen=True)
class TrainConfig:
    base_steps: int = 4000
    specialist_steps: int = 600
    batch_size: int = 64
    base_lr: float = 2e-3
    specialist_lr: float = 3e-4
    warmup: int = 200
    uncond_prob: float = 0.1  # prompt dropped this often, for classifier-free guidance
    base_ema: float = 0.999
    specialist_ema: float = 0.995
    # Share of each specialist batch drawn from the base's broad data (prior preservation, as in DreamBooth).
    # 0 is the paper's setting, a specialist sees its shard only; here that makes specialists forget the
    # prompt (a "dark" specialist draws every image dark), and no merge of them keeps any skill (README).
    specialist_replay: float = 0.5
    seed: int = 0


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())


def _prompts(specs, step_seed: int, uncond_prob: float) -> list[str]:
    drop = torch.rand(len(specs), generator=torch.Generator().manual_seed(step_seed)) < uncond_prob
    return ["" if d else s.prompt for s, d in zip(specs, drop.tolist(), strict=True)]


def _batch(task: Task, replay: Task | None, replay_share: float, size: int, seed: int):
    """A training batch of `task`, of which `replay_share` comes from `replay` (a different random stream)."""
    n_replay = round(replay_share * size) if replay is not None else 0
    specs, images = make_batch(task, size - n_replay, seed=seed, split="train")
    if n_replay:
        more_specs, more_images = make_batch(replay, n_replay, seed=seed, split="train")
        specs, images = [*specs, *more_specs], torch.cat([images, more_images])
    return specs, images


def _train(
    pipe: ToyPipeline,
    task: Task,
    steps: int,
    lr: float,
    ema_decay: float,
    config: TrainConfig,
    train_text: bool,
    seed: int,
    desc: str,
    progress: bool | None,
    replay: Task | None = None,
    replay_share: float = 0.0,
) -> list[float]:
    params = list(pipe.unet.parameters()) + (list(pipe.text_encoder.parameters()) if train_text else [])
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, steps, config.warmup))
    emas = [EMAModel(pipe.unet.parameters(), decay=ema_decay)]
    if train_text:
        emas.append(EMAModel(pipe.text_encoder.parameters(), decay=ema_decay))
    noise_scheduler = pipe.scheduler
    pipe.unet.train()
    pipe.text_encoder.train(train_text)
    pipe.text_encoder.requires_grad_(train_text)
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=bar_disabled(progress))
    for step in bar:
        step_seed = seed * 1_000_003 + step
        specs, images = _batch(task, replay, replay_share, config.batch_size, step_seed)
        gen = torch.Generator().manual_seed(step_seed)
        noise = torch.randn(images.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(images),), generator=gen)
        noisy = noise_scheduler.add_noise(images, noise, t)
        with torch.set_grad_enabled(train_text):
            context = pipe.encode(_prompts(specs, step_seed, config.uncond_prob))
        loss = torch.nn.functional.mse_loss(pipe.unet(noisy, t, context).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        emas[0].step(pipe.unet.parameters())
        if train_text:
            emas[1].step(pipe.text_encoder.parameters())
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    emas[0].copy_to(pipe.unet.parameters())
    if train_text:
        emas[1].copy_to(pipe.text_encoder.parameters())
    pipe.unet.eval()
    pipe.text_encoder.eval()
    pipe.text_encoder.requires_grad_(False)
    return losses


def train_base(config: TrainConfig = TrainConfig(), progress: bool | None = None) -> ToyPipeline:
    torch.manual_seed(config.seed)
    pipe = build_pipeline(config.seed)
    task = standard_tasks()["broad"]
    _train(pipe, task, config.base_steps, config.base_lr, config.base_ema, config, True, config.seed, "base", progress)
    return pipe


def finetune_specialist(
    base: ToyPipeline, task_name: str, config: TrainConfig = TrainConfig(), progress: bool | None = None
) -> UNet2DConditionModel:
    """A copy of the base UNet fine-tuned on one task; the text encoder stays frozen (paper §5.1.3)."""
    pipe = ToyPipeline(copy.deepcopy(base.unet), base.text_encoder, base.tokenizer, base.scheduler)
    task = standard_tasks()[task_name]
    seed = config.seed + 1 + SPECIALIST_TASKS.index(task_name) if task_name in SPECIALIST_TASKS else config.seed + 99
    _train(pipe, task, config.specialist_steps, config.specialist_lr, config.specialist_ema, config, False, seed,
           task_name, progress, standard_tasks()["broad"], config.specialist_replay)  # fmt: skip
    return pipe.unet


def save_unet_file(unet: UNet2DConditionModel, path: Path, dtype: torch.dtype = torch.float16) -> None:
    """A diffusers UNet weights file (UNet only, as specialists ship)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in unet.state_dict().items()}
    save_file(state, path, metadata={"format": "pt"})


def build_world(
    out_dir: Path, config: TrainConfig = TrainConfig(), progress: bool | None = None, from_base: Path | None = None
) -> dict:
    """Train the base, every specialist and the scorer, and save them where the package ships them (with
    `from_base`, a trained base folder: only the specialists, fine-tuned from it). Returns timings."""
    from featurefusion.toyworld.scorer import SHIPPED_SCORER, save_scorer, train_scorer

    out_dir = Path(out_dir)
    timings = {}
    if bar_disabled(progress):
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()  # save_pretrained's own shard bars
        transformers_logging.disable_progress_bar()
    if from_base is not None:
        base = load_pipeline(from_base)
    else:
        start = time.perf_counter()
        base = train_base(config, progress)
        # Shipped in fp16 to keep the package small. `.half()`, not `.to(float16)`: diffusers' `to` warns about
        # modules to keep in float32, and this UNet has none.
        base.unet.half()
        base.save_pretrained(out_dir / "base", safe_serialization=True)
        base = load_pipeline(out_dir / "base")  # specialists start from the base exactly as shipped
        timings["base"] = time.perf_counter() - start
    for name in SPECIALIST_TASKS:
        start = time.perf_counter()
        unet = finetune_specialist(base, name, config, progress)
        save_unet_file(unet, out_dir / "specialists" / f"{name}.safetensors")
        timings[name] = time.perf_counter() - start
    if from_base is not None:
        return timings
    start = time.perf_counter()
    scorer = train_scorer(seed=config.seed, progress=progress)
    save_scorer(scorer, out_dir / SHIPPED_SCORER.name)
    timings["scorer"] = time.perf_counter() - start
    return timings
