"""Sub-commands that sample and score real Stable Diffusion checkpoints: `sample` and `evaluate`.

Both run under several processes too (`torchrun --nproc_per_node N -m featurefusion.cli sample ...`):
the images are split between them and the main process writes manifests and reports.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from featurefusion.cli import ensemble


def register(sub) -> None:
    p = sub.add_parser("sample", help="draw images from a checkpoint (any layout) with a diffusers pipeline")
    p.set_defaults(handler=cmd_sample)
    p.add_argument(
        "checkpoint", nargs="?", help="diffusers pipeline folder or hub id, ldm .safetensors/.ckpt, or UNet file"
    )
    p.add_argument("--prompts", type=Path, required=True, help="prompt file: one per line, or a JSON/YAML list")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs, manifest.json and grid.png")
    add_sampler_args(p)
    p.add_argument("--no-grid", action="store_true", help="do not write grid.png")
    ensemble.add_sample_args(p)
    p.add_argument("--style", help="a DMM student's style: NAME, or a mix a=0.5,b=0.5 (featurefusion distill)")

    p = sub.add_parser("evaluate", help="score every model on every task (a models x tasks matrix per metric)")
    p.set_defaults(handler=cmd_evaluate)
    p.add_argument("--models", nargs="+", required=True, metavar="[NAME=]PATH", help="checkpoints to compare")
    p.add_argument("--tasks", type=Path, required=True, help="YAML/JSON list of tasks: name, prompts, references")
    p.add_argument("--metrics", default="clip", help="comma-separated: clip, imagereward, fid (default: clip)")
    add_metric_model_args(p)
    p.add_argument("--out", type=Path, required=True, help="folder for images, matrix.json, matrix.md, heatmaps")
    add_sampler_args(p)


def add_metric_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--clip-model", default=None, help="CLIP hub id or local folder (default openai/clip-vit-large-patch14)"
    )
    p.add_argument(
        "--imagereward-model", default=None, help="ImageReward checkpoint name or path (default ImageReward-v1.0)"
    )
    p.add_argument(
        "--fid-feature", type=int, choices=(64, 192, 768, 2048), default=2048, help="Inception layer for FID"
    )


def metric_options(args, names) -> dict[str, dict]:
    """Constructor options of each named metric, from the arguments of `add_metric_model_args`."""
    options: dict[str, dict] = {name: {"device": args.device} for name in names if name != "tifa"}
    if args.clip_model and "clip" in options:
        options["clip"]["model_name_or_path"] = args.clip_model
    if args.imagereward_model and "imagereward" in options:
        options["imagereward"]["model_name_or_path"] = args.imagereward_model
    if "fid" in options:
        options["fid"]["feature"] = args.fid_feature
    return options


def add_sampler_args(p: argparse.ArgumentParser, writes_model: bool = False) -> None:
    """Sampler options. A command that writes a model (`writes_model`) already has `--template` and
    `--no-progress`, which mean the same there, and its `--dtype` is the output's: sampling takes
    `--sample-dtype` instead."""
    with_template = not writes_model
    from featurefusion.evaluate.sampling import SCHEDULERS

    if with_template:
        p.add_argument("--template", help="pipeline folder or hub id giving what a single weights file lacks")
    p.add_argument("--scheduler", choices=tuple(SCHEDULERS), help="sampler (default: the pipeline's own)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0, help="image i of prompt p is seeded from (seed, p, i) alone")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass (does not change images)")
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--negative-prompt")
    p.add_argument(
        "--sample-dtype" if writes_model else "--dtype",
        dest="sample_dtype",
        choices=("fp32", "fp16", "bf16"),
        default="fp32",
        help="dtype of the pipeline while sampling",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the accelerator, else cpu)")
    if with_template:
        p.add_argument("--no-progress", action="store_true")


def sampler_settings(args):
    from featurefusion.evaluate.sampling import SamplerSettings

    return SamplerSettings(
        scheduler=args.scheduler,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        batch_size=args.batch_size,
        images_per_prompt=args.images_per_prompt,
        height=args.height,
        width=args.width,
        dtype=args.sample_dtype,
        device=args.device,
        negative_prompt=args.negative_prompt,
    )


def cmd_sample(args) -> None:
    from accelerate import PartialState

    from featurefusion.errors import FeatureFusionError
    from featurefusion.evaluate.sampling import sample

    if ensemble.wants_ensemble(args):
        return ensemble.cmd_sample_ensemble(args)
    if not args.checkpoint:
        raise FeatureFusionError("give a CHECKPOINT to sample (or --ensemble AFA_DIR / --ensemble-average MODEL...)")

    if args.style is not None or _is_student(args.checkpoint):
        from featurefusion.cli.distilling import sample_student

        return sample_student(args, sampler_settings(args))
    result = sample(
        args.checkpoint,
        args.prompts,
        args.out,
        sampler_settings(args),
        template=args.template,
        progress=False if args.no_progress else None,
        grid=not args.no_grid,
    )
    if PartialState().is_main_process:
        print(f"wrote {len(result.records)} images to {result.out}")
        print(f"manifest: {result.manifest}")
        if result.grid:
            print(f"grid: {result.grid}")


def _is_student(checkpoint: str) -> bool:
    from featurefusion.distill.store import is_student

    return is_student(checkpoint)


def cmd_evaluate(args) -> None:
    from accelerate import PartialState

    from featurefusion.evaluate.matrix import build_metrics, evaluate_matrix, parse_models, read_tasks
    from featurefusion.evaluate.metrics import parse_metric_names

    settings = sampler_settings(args)
    names = parse_metric_names(args.metrics)
    metrics = build_metrics(names, metric_options(args, names))  # before sampling: an unavailable metric fails at once
    result = evaluate_matrix(
        parse_models(args.models),
        read_tasks(args.tasks),
        metrics,
        args.out,
        settings,
        template=args.template,
        progress=False if args.no_progress else None,
    )
    if PartialState().is_main_process:
        print(f"matrix: {result.json}")
        print(f"tables: {result.markdown}")
        for name, path in result.heatmaps.items():
            print(f"heatmap ({name}): {path}")
        if result.grid:
            print(f"grid: {result.grid}")
