"""`featurefusion distill`: DMM students (train, add teachers, export one style) and `sample --style`.

featurefusion distill BASE TEACHER... -o STUDENT            train a student of the teachers
featurefusion distill --add TEACHER... --from STUDENT -o NEW add teachers (incremental learning)
featurefusion distill BASE TEACHER... --from STUDENT -o NEW  train a student further
featurefusion distill export STUDENT --style NAME -o FILE    one style folded into a plain checkpoint
featurefusion distill fidt STUDENT --prompts FILE -o OUT.json FIDt: each style against its teacher (DMM §4.2)
"""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPES = ("fp32", "fp16", "bf16")


def register(sub) -> None:
    p = sub.add_parser(
        "distill",
        help="DMM: distill teachers into one style-promptable student (or: distill export STUDENT --style NAME)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(handler=cmd_distill)
    p.add_argument("inputs", nargs="*", metavar="BASE TEACHER", help="base pipeline folder, then teachers "
                   "([NAME=]PATH; the style is named after the file); or: export STUDENT; "
                   "or: fidt STUDENT")  # fmt: skip
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="student folder (export: the checkpoint file; fidt: the JSON report)")  # fmt: skip
    p.add_argument("--add", nargs="+", metavar="TEACHER", help="teachers to add to the student given by --from")
    p.add_argument("--from", dest="from_student", type=Path,
                   help="a trained student: with --add, the one to add teachers to; with BASE TEACHER..., "
                        "the one to train further (same teachers, same order)")  # fmt: skip
    p.add_argument(
        "--no-regularization",
        action="store_true",
        help="with --add: no frozen earlier student supervising the old styles (shows the forgetting)",
    )
    p.add_argument("--data", help="captioned image folder (e.g. a `featurefusion shard` split), or toyworld[:TASK] "
                   "(default for a built-in world base: toyworld:uniform)")  # fmt: skip
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=1000, help="optimizer steps on the common data")
    t.add_argument("--batch-size", type=int, default=16, help="images per teacher slot")
    t.add_argument("--accumulation", type=int, help="teacher slots per process and step (default: every teacher "
                   "once per step, split over the processes)")  # fmt: skip
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--style-lr", type=float, help="learning rate of the codebook and style MLP (default: --lr)")
    t.add_argument("--disc-lr", type=float, default=1e-4, help="learning rate of the discriminator head")
    t.add_argument("--warmup", type=int, default=0)
    t.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    t.add_argument("--lambda-feat", type=float, default=0.001, help="feature imitation weight")
    t.add_argument("--lambda-adv", type=float, default=0.01, help="multi-class adversarial weight")
    t.add_argument("--no-feature-imitation", action="store_true")
    t.add_argument("--no-adversarial", action="store_true")
    t.add_argument("--uncond-prob", type=float, default=0.1, help="share of empty prompts (classifier-free guidance)")
    t.add_argument("--synth-images", type=int, default=0, help="second stage: images synthesised per teacher")
    t.add_argument("--synth-steps", type=int, default=0, help="second stage: optimizer steps on them")
    t.add_argument("--synth-sample-steps", type=int, default=20, help="DDIM steps when synthesising")
    t.add_argument("--synth-guidance", type=float, default=1.5)
    t.add_argument("--ema", type=float, default=0.0, help="EMA decay of the student's weights (0: none)")
    t.add_argument("--save-every", type=int, default=0, help="save a resumable state every N steps")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue from OUTPUT.state/ of an interrupted run")
    t.add_argument("--overwrite", action="store_true", help="replace an existing output")
    t.add_argument("--device", help="where to train (default: this process's GPU where there is one, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="dtype of the saved UNet (export: of the file)")
    p.add_argument("--style", help="export: the style to fold in (NAME, or a mix a=0.5,b=0.5)")
    p.add_argument("--format", choices=("ldm", "diffusers-unet", "diffusers"),
                   help="export layout (default: ldm for a Stable Diffusion student, else diffusers-unet)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    f = p.add_argument_group("fidt (the teachers are found by the paths and SHA-256 the student recorded)")
    f.add_argument("--prompts", type=Path, help="prompt file, one per line (as `featurefusion sample` reads)")
    f.add_argument("--images-per-prompt", type=int, default=1)
    f.add_argument("--sample-steps", type=int, default=20, help="DDIM steps per image")
    f.add_argument("--guidance", type=float, default=3.0)
    f.add_argument("--feature", type=int, default=2048, help="Inception feature layer (Stable Diffusion students)")
    f.add_argument("--scorer", type=Path, help="built-in world: the scorer whose features FID uses (default: shipped)")


def _config(args):
    from featurefusion.distill.trainer import DistillConfig

    return DistillConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, style_lr=args.style_lr, disc_lr=args.disc_lr,
        warmup=args.warmup, schedule=args.schedule,
        lambda_feat=0.0 if args.no_feature_imitation else args.lambda_feat,
        lambda_adv=0.0 if args.no_adversarial else args.lambda_adv,
        uncond_prob=args.uncond_prob, accumulation=args.accumulation, synth_images=args.synth_images,
        synth_steps=args.synth_steps, synth_sample_steps=args.synth_sample_steps, synth_guidance=args.synth_guidance,
        ema=args.ema, save_every=args.save_every, seed=args.seed,
    )  # fmt: skip


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def cmd_distill(args) -> None:
    from featurefusion.distill.backbone import DistillError

    progress = False if args.no_progress else None
    if args.inputs and args.inputs[0] == "export":
        return cmd_export(args)
    if args.inputs and args.inputs[0] == "fidt":
        return cmd_fidt(args)
    if args.add:
        if args.from_student is None or args.inputs:
            raise DistillError("--add TEACHER... needs --from STUDENT and no BASE")
        from featurefusion.distill.incremental import add_teachers

        result = add_teachers(
            args.from_student, args.add, args.output, _config(args), args.data,
            regularization=not args.no_regularization, resume=args.resume, overwrite=args.overwrite,
            save_dtype=_torch_dtype(args.dtype), progress=progress, device=args.device,
        )  # fmt: skip
    else:
        if len(args.inputs) < 2:
            raise DistillError("give a base and at least one teacher: featurefusion distill BASE TEACHER... -o STUDENT")
        from featurefusion.distill.run import distill

        result = distill(args.inputs[0], args.inputs[1:], args.output, _config(args), args.data, resume=args.resume,
                         overwrite=args.overwrite, save_dtype=_torch_dtype(args.dtype), progress=progress,
                         init_from=args.from_student, device=args.device)  # fmt: skip
    if result.history.steps:
        h = result.history
        print(f"last step: score {h.score[-1]:.5f}, feature {h.feat[-1]:.4f}, adversarial {h.adv[-1]:.4f}")
    print(f"wrote {result.output} (styles: {', '.join(result.styles)}; {result.steps_run} steps in "
          f"{result.seconds:.0f} s)")  # fmt: skip


def cmd_export(args) -> None:
    from featurefusion.distill.backbone import DistillError
    from featurefusion.distill.export import export_style

    if len(args.inputs) != 2 or not args.style:
        raise DistillError("usage: featurefusion distill export STUDENT --style NAME -o FILE")
    report = export_style(Path(args.inputs[1]), args.style, args.output, args.format, args.dtype,
                          progress=False if args.no_progress else None)  # fmt: skip
    print(f"wrote {report.output} ({report.format}, {report.dtype}, {report.keys} tensors): style {args.style}")


def cmd_fidt(args) -> None:
    from featurefusion.distill.backbone import DistillError
    from featurefusion.distill.fidt import FIDtSampling, inception_metric, scorer_metric, student_fidt
    from featurefusion.evaluate.sampling import read_prompts
    from featurefusion.io.atomic import write_json_atomic

    if len(args.inputs) != 2 or args.prompts is None:
        raise DistillError("usage: featurefusion distill fidt STUDENT --prompts FILE -o REPORT.json")
    student = Path(args.inputs[1])
    prompts = [p for p in read_prompts(args.prompts) for _ in range(args.images_per_prompt)]
    if len(prompts) < 2:
        raise DistillError(
            "FID needs at least 2 images per set: give more prompts or --images-per-prompt", args.prompts
        )
    if (student / "vae").is_dir():
        metric = inception_metric(args.feature)
    else:
        from featurefusion.toyworld.demo import SHIPPED
        from featurefusion.toyworld.scorer import load_scorer

        metric = scorer_metric(load_scorer(args.scorer or SHIPPED / "scorer.safetensors"))
    sampling = FIDtSampling(prompts, args.sample_steps, args.guidance)
    result = student_fidt(student, sampling, metric)
    settings = {"prompts": str(args.prompts), "images": len(prompts), "steps": args.sample_steps,
                "guidance": args.guidance, "seeds": list(sampling.seeds)}  # fmt: skip
    write_json_atomic(args.output, {"student": str(student), "settings": settings, **result.as_dict()})
    width = max(len(n) for n in result.names)
    print(f"{'style':<{width}}  student M(i,i)  reference M_ref(i,i)")
    for name, own, ref in zip(result.names, result.diagonal().values(), result.reference_diagonal().values(),
                              strict=True):  # fmt: skip
        print(f"{name:<{width}}  {own:14.1f}  {ref:20.1f}")
    change = 100 * (result.fidt / result.reference_fidt - 1) if result.reference_fidt else float("nan")
    print(f"FIDt {result.fidt:.1f} against the teachers' reference {result.reference_fidt:.1f} ({change:+.0f} %); "
          f"wrote {args.output}")  # fmt: skip


def sample_student(args, settings) -> None:
    """`featurefusion sample STUDENT --style NAME`: a Stable Diffusion student through the usual sampler with
    the style folded in; a built-in world student through its own sampler (PNGs, manifest, grid)."""
    from featurefusion.distill.backbone import DistillError
    from featurefusion.distill.store import is_student, read_meta
    from featurefusion.distill.student import parse_style

    if not is_student(args.checkpoint):
        raise DistillError("--style needs a DMM student folder (made by featurefusion distill)", args.checkpoint)
    meta = read_meta(args.checkpoint)
    if args.style is None:
        raise DistillError(f"sampling a student needs --style (one of: {', '.join(meta['styles'])})", args.checkpoint)
    style = parse_style(args.style)
    for name in [style] if isinstance(style, str) else style:
        if name not in meta["styles"]:
            raise DistillError(f"unknown style {name!r}; the student knows: {', '.join(meta['styles'])}",
                               args.checkpoint)  # fmt: skip
    if not (Path(args.checkpoint) / "vae").is_dir():
        return _sample_toy_student(args, settings, style)
    from featurefusion.distill.export import fold_into_pipeline_unet
    from featurefusion.evaluate.sampling import load_pipeline, sample

    pipe = load_pipeline(args.checkpoint, None, settings.dtype)
    fold_into_pipeline_unet(pipe.unet, args.checkpoint, args.style)
    result = sample(args.checkpoint, args.prompts, args.out, settings, pipe=pipe,
                    progress=False if args.no_progress else None, grid=not args.no_grid)  # fmt: skip
    print(f"wrote {len(result.records)} images to {result.out} (style {args.style})")


def _sample_toy_student(args, settings, style) -> None:
    from featurefusion.distill.toy_sampling import load_toy_student
    from featurefusion.evaluate.sampling import read_prompts
    from featurefusion.io.atomic import save_png_atomic, write_json_atomic
    from featurefusion.toyworld.world import image_grid, to_pil

    prompts = read_prompts(args.prompts)
    prompts = [p for p in prompts for _ in range(settings.images_per_prompt)]
    pipe = load_toy_student(args.checkpoint)
    images = pipe(prompts, steps=settings.steps, guidance_scale=settings.guidance_scale, seed=settings.seed,
                  styles=[style] * len(prompts))  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
        name = f"{i:05d}.png"
        save_png_atomic(to_pil(image, upscale=4), out / name)
        records.append({"file": name, "prompt": prompt, "seed": settings.seed, "index": i})
    write_json_atomic(out / "manifest.json", {"checkpoint": str(args.checkpoint), "style": args.style,
                                              "settings": settings.recorded(), "images": records})  # fmt: skip
    if not args.no_grid:
        save_png_atomic(image_grid(images), out / "grid.png")
    print(f"wrote {len(records)} images to {out} (style {args.style})")
