"""DMM training (paper Alg. 1): one shared student, each teacher's batches on its own process.

A step is made of `S` slots, `accumulation` per process (`S = processes × accumulation`). Global slot `g`
of step `s` is supervised by supervisor `(s·S + g) mod N` (with `S = N` processes that is the paper's
"process j uses teacher j mod N") and draws a batch from a seed of (seed, stage, s, g) alone. Each process
sums its slots' gradients, the sums are all-reduced (torch.distributed: gloo on CPU, NCCL on GPUs), and
every process takes the same optimizer step. So one process with accumulation 2 takes the same steps as two
processes with accumulation 1, and a run resumed from a saved state takes the steps the uninterrupted run
would have taken.

Devices: the student, its head and the supervisors live on the trainer's device (by default the process's
GPU where there is one, else the CPU); random draws are made on the CPU from the slot's seeded generator and
moved, so a slot's batch, noise and timesteps are the same on every device.

A supervisor is a teacher UNet with its style index, or (incremental learning, §3.5) the frozen earlier
student with a style drawn at random from its old styles at every slot.

The student and the discriminator head are updated from the same forward pass (simultaneous GAN updates).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from featurefusion.distill.backbone import Backbone, DistillError
from featurefusion.distill.losses import (
    Discriminator,
    FeatureTap,
    adversarial_terms,
    feature_loss,
    predict_x0,
    score_loss,
)
from featurefusion.distill.student import StudentUNet
from featurefusion.progress import bar_disabled

log = logging.getLogger(__name__)
STATE_NAME = "distill-state.pt"
# Settings that fix which batch and supervisor a step uses: a resumed run must share them.
RESUME_INVARIANTS = ("steps", "batch_size", "seed", "slots", "synth_steps", "synth_images")


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 1000
    batch_size: int = 16  # per slot
    lr: float = 1e-4
    style_lr: float | None = None  # codebook and style MLP (new parameters, learnt from scratch); default: lr
    disc_lr: float = 1e-4
    warmup: int = 0
    schedule: str = "constant"  # learning rate after warmup: "constant" (the paper's) or "cosine" (to 0 at the end)
    lambda_feat: float = 0.001  # 0 switches feature imitation off
    lambda_adv: float = 0.01  # 0 switches the adversarial loss off
    uncond_prob: float = 0.1  # text replaced by the empty prompt's, for classifier-free guidance
    accumulation: int | None = None  # slots per process and step; default: every supervisor once per step
    synth_images: int = 0  # second stage: images synthesised per teacher (0: no second stage)
    synth_steps: int = 0
    synth_sample_steps: int = 20
    synth_guidance: float = 1.5
    ema: float = 0.0  # decay of an exponential moving average of the student (0: none)
    grad_clip: float = 1.0
    save_every: int = 0  # optimizer steps between saved states (0: only at the end of each stage)
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 0 or self.synth_steps < 0 or self.batch_size < 1:
            raise DistillError("steps must be >= 0 and batch size >= 1")
        if self.lambda_feat < 0 or self.lambda_adv < 0 or not 0 <= self.uncond_prob <= 1:
            raise DistillError("loss weights must be >= 0 and the empty-prompt share in [0, 1]")
        if self.schedule not in ("constant", "cosine"):
            raise DistillError(f"schedule must be constant or cosine, not {self.schedule!r}")
        if self.synth_steps and not self.synth_images:
            raise DistillError("a synthesised stage (synth_steps) needs synth_images > 0")


@dataclass
class Supervisor:
    """Who supervises a slot: a teacher UNet for one style, or a frozen student for random old styles."""

    name: str
    loader: Callable[[], torch.nn.Module]  # a UNet, or a StudentUNet when `styles` is set; loaded when first used
    style: int | None = None  # the student's style index for a teacher
    styles: list[int] | None = None  # for a frozen student: the styles it can stand for
    _model: torch.nn.Module | None = None
    device: torch.device = torch.device("cpu")  # set by the trainer

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            self._model = self.loader().to(self.device)
            self.tap = FeatureTap(self._model.unet if isinstance(self._model, StudentUNet) else self._model)
        return self._model

    def pick(self, gen: torch.Generator) -> int:
        if self.styles is None:
            return self.style
        return self.styles[int(torch.randint(0, len(self.styles), (1,), generator=gen))]

    @torch.no_grad()
    def __call__(self, noisy, t, context, style: int):
        model = self.model
        with self.tap.record() as feats:
            if isinstance(model, StudentUNet):
                eps = model(noisy, t, context, style=style)
            else:
                eps = model(noisy, t, context).sample
        return eps, list(feats)


@dataclass
class History:
    steps: list[int] = field(default_factory=list)
    score: list[float] = field(default_factory=list)
    feat: list[float] = field(default_factory=list)
    adv: list[float] = field(default_factory=list)
    disc: list[float] = field(default_factory=list)
    stage: list[str] = field(default_factory=list)

    def add(self, step, stage, values) -> None:
        self.steps.append(step)
        self.stage.append(stage)
        for k in ("score", "feat", "adv", "disc"):
            getattr(self, k).append(values[k])


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as given; by default this process's GPU (LOCAL_RANK under torchrun / accelerate launch) where
    there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device: torch.device | None = None) -> None:
    """Join the process group torchrun / accelerate launch describe in the environment (no-op alone): NCCL
    when the trainer's tensors are on GPUs, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        device = device or default_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


class Trainer:
    def __init__(
        self,
        student: StudentUNet,
        supervisors: list[Supervisor],
        backbone: Backbone,
        config: DistillConfig,
        classes: int | None = None,
        device: str | torch.device | None = None,
    ):
        config.validate()
        self.student, self.supervisors, self.backbone, self.config = student, supervisors, backbone, config
        self.device = default_device(device)
        self.student.to(self.device)
        for sup in supervisors:
            sup.device = self.device
        self.rank, self.world = world()
        self.accumulation = config.accumulation or max(1, -(-len(supervisors) // self.world))
        self.slots = self.world * self.accumulation
        self.tap = FeatureTap(student.unet)
        mid_channels = student.unet.config.block_out_channels[-1]
        torch.manual_seed(config.seed)  # the head's initialisation, identical on every process
        self.head = Discriminator(mid_channels, 2 * (classes or len(student.names))).to(self.device)
        self.student.train()
        groups = [{"params": list(self.student.unet.parameters()), "lr": config.lr},
                  {"params": list(self.student.prompts.parameters()), "lr": config.style_lr or config.lr}]  # fmt: skip
        self.opt = torch.optim.AdamW(groups, weight_decay=0.0)
        self.opt_d = torch.optim.AdamW(self.head.parameters(), lr=config.disc_lr, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.ema = None
        if config.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.student.parameters(), decay=config.ema)
        self.empty = backbone.encode_text([""]).to(self.device)
        self.history = History()
        self.step = 0  # optimizer steps done over both stages

    def _lr_factor(self, step: int) -> float:
        cfg = self.config
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        if cfg.schedule == "cosine":
            total = max(1, cfg.steps + cfg.synth_steps - cfg.warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup) / total)))
        return 1.0

    # ---- one slot ------------------------------------------------------------------------------------
    def _slot(self, data, stage: int, step: int, g: int) -> dict[str, torch.Tensor]:
        cfg = self.config
        sup_index = (step * self.slots + g) % len(self.supervisors)
        sup = self.supervisors[sup_index]
        seed = ((cfg.seed * 1_000_003 + stage) * 1_000_003 + step) * 4099 + g
        gen = torch.Generator().manual_seed(seed)
        style = sup.pick(gen)
        batch = data.batch(self.backbone, seed % (2**63), cfg.batch_size, teacher=sup.style)
        device = self.device
        x0 = batch.x0.to(device)
        context = self.backbone.encode_text(batch.prompts).to(device)
        drop = (torch.rand(len(batch.prompts), generator=gen) < cfg.uncond_prob).to(device)
        context = torch.where(drop.view(-1, 1, 1), self.empty.expand_as(context), context)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        sched = self.backbone.scheduler
        t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=gen).to(device)
        noisy = sched.add_noise(x0, noise, t)
        styles = torch.full((len(x0),), style, dtype=torch.long, device=device)
        with self.tap.record() as feats_s:
            eps_s = self.student(noisy, t, context, style=styles)
        eps_t, feats_t = sup(noisy, t, context, style)
        losses = {"score": score_loss(eps_s, eps_t)}
        zero = torch.zeros((), device=device)
        losses["feat"] = feature_loss(list(feats_s), feats_t) if cfg.lambda_feat else zero
        if cfg.lambda_adv:
            terms = adversarial_terms(self.student.unet, self.head, sched, predict_x0(sched, noisy, eps_s, t),
                                      predict_x0(sched, noisy, eps_t, t), context, style, gen)  # fmt: skip
            losses["adv"], losses["disc"] = terms.generator, terms.discriminator
        else:
            losses["adv"] = losses["disc"] = zero
        return losses

    # ---- one optimizer step --------------------------------------------------------------------------
    def train_step(self, data, stage: int) -> dict[str, float]:
        cfg = self.config
        self.opt.zero_grad(set_to_none=False)
        self.opt_d.zero_grad(set_to_none=False)
        totals = {k: 0.0 for k in ("score", "feat", "adv", "disc")}
        for a in range(self.accumulation):
            g = self.rank * self.accumulation + a
            losses = self._slot(data, stage, self.step, g)
            gen_loss = losses["score"] + cfg.lambda_feat * losses["feat"] + cfg.lambda_adv * losses["adv"]
            total = (gen_loss + (losses["disc"] if cfg.lambda_adv else 0.0)) / self.slots
            if total.requires_grad:
                total.backward()
            for k in totals:
                totals[k] += float(losses[k].detach()) / self.slots
        params = [*self.student.parameters(), *self.head.parameters()]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.world > 1:
            totals_tensor = torch.tensor(list(totals.values()), device=self.device)
            flat = torch.cat([p.grad.reshape(-1) for p in params] + [totals_tensor])
            dist.all_reduce(flat)
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
            totals = dict(zip(totals, flat[offset:].tolist(), strict=True))
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(list(self.student.parameters()), cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        if cfg.lambda_adv:
            self.opt_d.step()
        if self.ema is not None:
            self.ema.step(self.student.parameters())
        self.step += 1
        return totals

    # ---- stages, states ------------------------------------------------------------------------------
    def run_stage(self, data, stage: int, until: int, label: str, progress: bool | None, on_save=None) -> None:
        if self.step >= until:
            return
        bar = tqdm(total=until, initial=self.step, desc=label, disable=bar_disabled(progress) or self.rank != 0)
        while self.step < until:
            values = self.train_step(data, stage)
            self.history.add(self.step, label, values)
            bar.set_postfix(score=f"{values['score']:.4f}", feat=f"{values['feat']:.3f}", adv=f"{values['adv']:.3f}")
            bar.update()
            if on_save is not None and self.config.save_every and self.step % self.config.save_every == 0:
                on_save(self)
        bar.close()
        if on_save is not None:
            on_save(self)

    def needed(self) -> set[int]:
        """The supervisors this process's slots can ever use."""
        mine = [self.rank * self.accumulation + a for a in range(self.accumulation)]
        n = len(self.supervisors)
        if self.slots % n == 0:
            return {g % n for g in mine}
        return set(range(n))

    def state_dict(self, invariants: dict) -> dict:
        return {
            "step": self.step,
            "student": self.student.state_dict(),
            "styles": self.student.names,
            "head": self.head.state_dict(),
            "opt": self.opt.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "sched": self.sched.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "history": asdict(self.history),
            "invariants": invariants,
        }

    def load_state_dict(self, state: dict, invariants: dict, path: Path) -> None:
        differs = {k: (state["invariants"].get(k), v) for k, v in invariants.items() if state["invariants"].get(k) != v}
        if differs:
            raise DistillError(f"cannot resume: settings differ from the saved state's (saved, now): {differs}", path)
        self.student.load_state_dict(state["student"])
        self.head.load_state_dict(state["head"])
        self.opt.load_state_dict(state["opt"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sched.load_state_dict(state["sched"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.history = History(**state["history"])
        self.step = state["step"]

    def final_student(self) -> StudentUNet:
        """The trained student, on the CPU (to be saved)."""
        if self.ema is not None:
            self.ema.copy_to(self.student.parameters())
        self.student.eval()
        return self.student.to("cpu")


def invariants_of(config: DistillConfig, slots: int, styles: list[str]) -> dict:
    values = {k: getattr(config, k) for k in RESUME_INVARIANTS if k != "slots"}
    return {**values, "slots": slots, "styles": list(styles)}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start
