"""Sampling a student in the built-in world, with a style per image (or a mix of styles).

The loop is the toy pipeline's own (DDIM, classifier-free guidance, one noise generator per image), with the
student's style offset set per image: the demo scores every task in one call with each task prompted in its
teacher's style, on exactly the noise the other models get.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMScheduler

from featurefusion.distill.store import load_student
from featurefusion.distill.student import StudentUNet
from featurefusion.toyworld.models import ToyPipeline, _per_image_noise, load_pipeline


class StyledToyPipeline:
    """Called like `ToyPipeline`; `styles` gives each prompt's style (name, index or mix), cycled by position."""

    def __init__(self, pipe: ToyPipeline, student: StudentUNet, styles: list | None = None):
        self.pipe, self.student = pipe, student
        self.styles = styles

    @torch.inference_mode()
    def __call__(self, prompts: list[str], steps: int = 20, guidance_scale: float = 3.0, seed: int = 0,
                 batch_size: int = 256, styles: list | None = None) -> torch.Tensor:  # fmt: skip
        styles = styles if styles is not None else self.styles
        if styles is None or len(styles) != len(prompts):
            raise ValueError(f"give one style per prompt ({len(prompts)} prompts)")
        weights = torch.stack([self.student.prompts.weights(s) for s in styles])
        scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(steps)
        uncond = self.pipe.encode([""])
        out = []
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            offset = self.student.prompts.offset(weights[start : start + len(batch)])
            cond = self.pipe.encode(batch)
            x = _per_image_noise(seed, start, len(batch)) * scheduler.init_noise_sigma
            context = torch.cat([uncond.expand(len(batch), -1, -1), cond])
            self.student._offset = torch.cat([offset, offset])
            try:
                for t in scheduler.timesteps:
                    eps_uncond, eps_cond = self.student.unet(torch.cat([x, x]), t, context).sample.chunk(2)
                    x = scheduler.step(eps_uncond + guidance_scale * (eps_cond - eps_uncond), t, x).prev_sample
            finally:
                self.student._offset = None
            out.append(x.clamp(-1, 1))
        return torch.cat(out)


def load_toy_student(folder: str | Path) -> StyledToyPipeline:
    student, _meta = load_student(folder)
    student.eval().requires_grad_(False)
    pipe = load_pipeline(folder)
    pipe.unet = student.unet
    return StyledToyPipeline(pipe, student)
