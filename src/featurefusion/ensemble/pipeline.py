"""Pipelines whose U-Net is an ensemble, and sampling them to image files.

The base's pipeline is loaded once; its U-Net is replaced by the ensemble (AFA or an output ensemble), so
scheduler, text encoder, VAE and classifier-free guidance are the pipeline's own.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from featurefusion.ensemble.io import load_afa, load_members
from featurefusion.ensemble.output import KeywordRouter, OutputEnsembleUNet, parse_keyword_map


def member_names(paths: Sequence[Path]) -> list[str]:
    return [Path(p).name.removesuffix(".safetensors") for p in paths]


def afa_pipeline(folder: str | os.PathLike, template: str | os.PathLike | None = None):
    pipe, members = load_afa(folder, template)
    return pipe, members


def average_pipeline(models: Sequence[str | os.PathLike], weights: Sequence[float] | None = None,
                     route: str | None = None, fallback: str | None = "0",
                     template: str | os.PathLike | None = None):  # fmt: skip
    """The first model is the base (a pipeline folder, or a file with `template`); all share its components.

    `route` ("MODEL=word,word;MODEL=word", MODEL a member's index or file stem) sends each prompt to the
    members whose words it contains; `fallback` (index or stem; "all" for the uniform average) serves the rest.
    """
    members = load_members(models[0], list(models[1:]), template)
    router = None
    if route:
        names = member_names(members.paths)
        keywords = parse_keyword_map(route, names)
        fallback_index = None if fallback == "all" else next(iter(parse_keyword_map(f"{fallback}=x", names)))
        router = KeywordRouter(keywords, len(members.unets), fallback_index)
    members.pipe.unet = OutputEnsembleUNet(members.unets, weights, router)
    return members.pipe, members


class RoutedPipeline:
    """A diffusers pipeline whose routed U-Net is told each call's prompts (everything else passes through)."""

    def __init__(self, pipe):
        self._pipe = pipe

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def to(self, *args, **kwargs):
        self._pipe = self._pipe.to(*args, **kwargs)
        return self

    def __call__(self, prompt, *args, **kwargs):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        per_prompt = kwargs.get("num_images_per_prompt") or 1
        with self._pipe.unet.route([p for p in prompts for _ in range(per_prompt)]):
            return self._pipe(prompt, *args, **kwargs)


def sample_toy(pipe, prompts: Sequence[str], out: str | os.PathLike, steps: int, guidance_scale: float, seed: int,
               images_per_prompt: int = 1, description: dict | None = None) -> list[dict]:  # fmt: skip
    """Built-in-world images (16 px PNGs), a manifest and a grid, as `featurefusion sample` writes them."""
    import torch

    from featurefusion.io.atomic import save_png_atomic, write_json_atomic
    from featurefusion.toyworld.world import image_grid, to_pil

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(p, i, prompt) for p, prompt in enumerate(prompts) for i in range(images_per_prompt)]
    with torch.no_grad():
        images = pipe([job[2] for job in jobs], steps=steps, guidance_scale=guidance_scale, seed=seed)
    records = []
    for (p, i, prompt), image in zip(jobs, images, strict=True):
        name = f"{p:05d}_{i:03d}.png"
        save_png_atomic(to_pil(image), out / name)
        records.append({"file": name, "prompt": prompt, "prompt_index": p, "image_index": i})
    settings = {"steps": steps, "guidance_scale": guidance_scale, "seed": seed, "images_per_prompt": images_per_prompt}
    write_json_atomic(out / "manifest.json", {"checkpoint": description or {}, "settings": settings, "images": records})
    save_png_atomic(image_grid(images, nrow=min(8, len(jobs))), out / "grid.png")
    return records
