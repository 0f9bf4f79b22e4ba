"""DMM's three losses (paper §3.4, Alg. 1): score distillation, feature imitation, multi-class adversarial.

- Score distillation: MSE between the student's noise prediction with style i and teacher i's, on the same
  noisy input, timestep and text.
- Feature imitation: MSE between the outputs of every down block, the mid block and every up block of the
  student and of the teacher (forward hooks; each block's MSE is averaged, then the blocks are averaged).
- Multi-class adversarial: a head of convs, GroupNorm and SiLU on mid-block features, with 2N logits: class i
  means "teacher i's image", class N+i "the student's imitation of style i". The images are clean-image
  predictions x̂0 (eq. 12), re-noised to a random timestep before they go through the backbone (A.2).

The discriminator's backbone is the student's own UNet (down blocks and mid block), run without a style
offset and with its parameters detached: the generator's adversarial gradient reaches the student through
the image x̂0 only, so the student cannot fool the head by changing the backbone's features, and the
discriminator's loss trains the head only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn


class FeatureTap:
    """Records the outputs of a UNet's down, mid and up blocks during a forward pass."""

    def __init__(self, unet: UNet2DConditionModel):
        self.features: list[torch.Tensor] = []
        self.enabled = False
        blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
        self._handles = [b.register_forward_hook(self._hook) for b in blocks]

    def _hook(self, _module, _inputs, output):
        if self.enabled:
            self.features.append(output[0] if isinstance(output, tuple) else output)

    @contextlib.contextmanager
    def record(self):
        self.features, self.enabled = [], True
        try:
            yield self.features
        finally:
            self.enabled = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def score_loss(student_eps: torch.Tensor, teacher_eps: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student_eps.float(), teacher_eps.float())


def feature_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student features against {len(teacher)} teacher features")
    return torch.stack([F.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher, strict=True)]).mean()


def predict_x0(scheduler, noisy: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Eq. 12: x̂0 = (x_t − sqrt(1 − ᾱ_t) ε) / sqrt(ᾱ_t)."""
    abar = scheduler.alphas_cumprod.to(noisy.device)[t].float().view(-1, *([1] * (noisy.ndim - 1)))
    return (noisy.float() - (1 - abar).sqrt() * eps.float()) / abar.sqrt()


class _Stop(Exception):
    pass


def mid_features(unet: UNet2DConditionModel, sample, t, context, params: dict | None = None) -> torch.Tensor:
    """The mid block's output; the up blocks are skipped. With `params` (detached tensors) the UNet runs on
    those, so gradients flow to `sample` only."""
    box = {}

    def hook(_m, _i, out):
        box["mid"] = out
        raise _Stop

    handle = unet.mid_block.register_forward_hook(hook)
    try:
        if params is None:
            unet(sample, t, context)
        else:
            torch.func.functional_call(unet, params, (sample, t, context))
    except _Stop:
        pass
    finally:
        handle.remove()
    return box["mid"]


class Discriminator(nn.Module):
    """The multi-class head: conv → GroupNorm → SiLU (twice, the second halving the resolution), global mean,
    linear to 2N logits."""

    def __init__(self, channels: int, classes: int, width: int | None = None, groups: int = 8):
        super().__init__()
        width = width or channels
        g = max(1, min(groups, width))
        while width % g:
            g -= 1
        self.classes = classes
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.GroupNorm(g, width),
            nn.SiLU(),
            nn.Conv2d(width, width, 4, stride=2, padding=1),
            nn.GroupNorm(g, width),
            nn.SiLU(),
        )
        self.out = nn.Linear(width, classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = features.float()
        if h.shape[-1] < 2:  # too small to halve
            h = F.interpolate(h, scale_factor=2)
        return self.out(self.body(h).mean(dim=(2, 3)))


@dataclass
class AdversarialTerms:
    generator: torch.Tensor  # the student's adversarial loss (CE towards "teacher i")
    discriminator: torch.Tensor  # the head's loss (student -> N+i, teacher -> i)


def renoise(scheduler, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator).to(x0.device)
    return scheduler.add_noise(x0, noise, t), t


def adversarial_terms(
    unet: UNet2DConditionModel,
    head: Discriminator,
    scheduler,
    x0_student: torch.Tensor,
    x0_teacher: torch.Tensor,
    context: torch.Tensor,
    style: int,
    generator: torch.Generator,
) -> AdversarialTerms:
    """Both adversarial losses for one teacher's batch (Alg. 1, lines 11-12 and 17-18)."""
    n = head.classes // 2
    params = {k: v.detach() for k, v in unet.named_parameters()}
    noisy_s, t_s = renoise(scheduler, x0_student, generator)
    noisy_t, t_t = renoise(scheduler, x0_teacher, generator)
    feats_s = mid_features(unet, noisy_s, t_s, context, params)
    with torch.no_grad():
        feats_t = mid_features(unet, noisy_t, t_t, context)
    real = torch.full((x0_student.shape[0],), style, dtype=torch.long, device=x0_student.device)
    head_params = {k: v.detach() for k, v in head.named_parameters()}  # the student's loss trains the student only
    generator_loss = F.cross_entropy(torch.func.functional_call(head, head_params, (feats_s,)), real)
    # The head's own loss sees detached features: it must not push gradients into the student.
    discriminator_loss = F.cross_entropy(head(feats_s.detach()), real + n) + F.cross_entropy(head(feats_t), real)
    return AdversarialTerms(generator_loss, discriminator_loss)
