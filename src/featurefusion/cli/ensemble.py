"""Ensembles: `featurefusion ensemble train` (AFA aggregators) and the ensemble options of `sample`.

`featurefusion ensemble train BASE MODEL... -o AFA_DIR --data DIR` trains AFA aggregators for the base and
the models (run it under `accelerate launch` for data-parallel training); `featurefusion sample --ensemble
AFA_DIR` samples the trained ensemble and `featurefusion sample --ensemble-average BASE MODEL...` the output
average (`--weights`, or `--route` for keyword routing).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("ensemble", help="AFA ensembles: train the feature aggregators of N models")
    group = p.add_subparsers(dest="ensemble_command", required=True)
    t = group.add_parser("train", help="train AFA aggregators (the models stay frozen)")
    t.set_defaults(handler=cmd_ensemble_train)
    t.add_argument("base", help="the base: a diffusers pipeline folder (its text encoder and VAE are shared)")
    t.add_argument("models", nargs="+", help="the other members: UNet files, ldm files or pipeline folders")
    t.add_argument("-o", "--out", type=Path, required=True, help="AFA folder: aggregators.safetensors, afa.json")
    t.add_argument("--data", required=True, help="captioned image folder, or `toyworld` (the built-in world's mix)")
    t.add_argument("--template", help="pipeline folder giving what a single-file base lacks")
    t.add_argument("--resolution", type=int, default=512, help="training image size (data folders)")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch-size", type=int, default=8, help="global batch over all processes")
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--uncond-prob", type=float, default=0.1, help="prompt dropped this often (for CFG)")
    t.add_argument("--hidden-cap", type=int, default=320, help="aggregator width: min(block channels, this)")
    t.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="forward under bf16 autocast")
    t.add_argument("--save-dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    t.add_argument("--save-every", type=int, default=0, help="resumable state every N steps (0: at the end)")
    t.add_argument("--max-minutes", type=float, default=0, help="stop and save after this long (0: no limit)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue from AFA_DIR/state")
    t.add_argument(
        "--schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="learning rate: constant (the paper's) or cosine decay to 0 at --steps",
    )
    t.add_argument(
        "--snr-gamma",
        type=float,
        default=0.0,
        help="Min-SNR-γ loss weighting, e.g. 5 (0: the paper's plain denoising loss); see docs/ensembles.md",
    )
    t.add_argument(
        "--from",
        dest="init_from",
        type=Path,
        help="start from the aggregators of this AFA folder (same members, same order)",
    )
    t.add_argument("--no-progress", action="store_true")


def cmd_ensemble_train(args) -> None:
    from featurefusion.ensemble.data import open_data
    from featurefusion.ensemble.io import load_members
    from featurefusion.ensemble.train import AFATrainConfig, train_aggregators

    members = load_members(args.base, args.models, args.template)
    data = open_data(args.data, None if members.toy else args.resolution, args.seed)
    config = AFATrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        uncond_prob=args.uncond_prob, hidden_cap=args.hidden_cap, seed=args.seed, save_every=args.save_every,
        precision=args.precision, save_dtype=args.save_dtype, max_seconds=60 * args.max_minutes,
        schedule=args.schedule, snr_gamma=args.snr_gamma,
    )  # fmt: skip
    result = train_aggregators(members, data, args.out, config, args.resume, False if args.no_progress else None,
                               init_from=args.init_from)  # fmt: skip
    if result.losses:
        tenth = max(1, len(result.losses) // 10)
        first, last = result.losses[:tenth], result.losses[-tenth:]
        print(f"steps {result.start_step} -> {result.end_step} in {result.seconds:.0f} s; mean loss "
              f"{sum(first) / len(first):.4f} (first tenth) -> {sum(last) / len(last):.4f} (last tenth)")  # fmt: skip
    print(f"aggregators: {args.out}")


# ---- `featurefusion sample --ensemble ... | --ensemble-average ...` -------------------------------------------
def add_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ensemble", type=Path, metavar="AFA_DIR", help="sample an AFA ensemble (no CHECKPOINT)")
    p.add_argument(
        "--ensemble-average",
        nargs="+",
        metavar="MODEL",
        help="sample the average of N models' noise predictions (first: the base; no CHECKPOINT)",
    )
    p.add_argument("--weights", type=float, nargs="+", help="--ensemble-average: one weight per model")
    p.add_argument(
        "--route",
        metavar="MODEL=WORD,...;...",
        help="--ensemble-average: keyword routing; MODEL is an index or a file name without .safetensors",
    )
    p.add_argument(
        "--route-fallback", default="0", help="model for prompts without a keyword (index, name, or `all`: the average)"
    )


def wants_ensemble(args) -> bool:
    return bool(args.ensemble or args.ensemble_average)


def cmd_sample_ensemble(args) -> None:
    from featurefusion.ensemble.pipeline import RoutedPipeline, afa_pipeline, average_pipeline, sample_toy
    from featurefusion.ensemble.unet import EnsembleError
    from featurefusion.evaluate.sampling import describe_checkpoint, read_prompts, sample

    if args.checkpoint or (args.ensemble and args.ensemble_average):
        raise EnsembleError("give exactly one of CHECKPOINT, --ensemble AFA_DIR, --ensemble-average MODEL...")
    if (args.weights or args.route) and not args.ensemble_average:
        raise EnsembleError("--weights and --route apply to --ensemble-average")
    if args.ensemble:
        pipe, members = afa_pipeline(args.ensemble, args.template)
        description = {"afa": str(args.ensemble), "members": members.refs()}
    else:
        pipe, members = average_pipeline(args.ensemble_average, args.weights, args.route, args.route_fallback,
                                         args.template)  # fmt: skip
        description = {"output_average": members.refs(), "weights": args.weights, "route": args.route}
    prompts = read_prompts(args.prompts)
    if members.toy:
        records = sample_toy(pipe, prompts, args.out, args.steps, args.guidance_scale, args.seed,
                             args.images_per_prompt, description)  # fmt: skip
        print(f"wrote {len(records)} images to {args.out}")
        return
    from featurefusion.cli.evaluation import sampler_settings

    if getattr(pipe.unet, "router", None) is not None:
        pipe = RoutedPipeline(pipe)
    result = sample(members.paths[0], prompts, args.out, sampler_settings(args), pipe=pipe,
                    progress=False if args.no_progress else None, grid=not args.no_grid)  # fmt: skip
    print(f"wrote {len(result.records)} images to {result.out} ({describe_checkpoint(members.paths[0])['path']} "
          "and its ensemble)")  # fmt: skip
