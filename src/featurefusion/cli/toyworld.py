"""Sub-commands of the built-in world: the demo (the main job) and rebuilding the shipped models."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("demo", help="the paper's experiment on the built-in world: merge, sample, score, report")
    p.set_defaults(handler=cmd_demo)
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="where models and report.md go")
    p.add_argument("--images-per-task", type=int, help="test images per task and model (default 48)")
    p.add_argument("--steps", type=int, help="DDIM sampling steps (default 12)")
    p.add_argument("--quick", action="store_true", help="a reduced run (fewer images, short searches) to try things")
    p.add_argument(
        "--ablation",
        action="store_true",
        help="also run FeatureFusion's ablation on the test prompts: threshold sweep, slope, normalisation, sampled "
        "mode (about 3 more minutes)",
    )
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("toyworld", help="the built-in world's models")
    tw = p.add_subparsers(dest="toyworld_command", required=True)
    t = tw.add_parser("train", help="rebuild the shipped base, specialists and scorer from scratch")
    t.set_defaults(handler=cmd_toyworld_train)
    t.add_argument("--out", type=Path, help="folder to write to (default: the package's checkpoints folder)")
    t.add_argument("--base-steps", type=int)
    t.add_argument("--specialist-steps", type=int)
    t.add_argument(
        "--specialist-replay",
        type=float,
        help="share of each specialist batch drawn from the base's broad data (default 0.5; 0: the shard only)",
    )
    t.add_argument(
        "--from-base",
        type=Path,
        help="a trained base folder: fine-tune only the specialists from it (e.g. the shipped base, with another "
        "--specialist-replay), into --out/specialists",
    )
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-progress", action="store_true")


def cmd_demo(args) -> None:
    from dataclasses import replace

    from featurefusion.toyworld.demo import DemoConfig, quick_config, run_demo

    config = quick_config(args.out) if args.quick else DemoConfig(out=args.out)
    evaluation = config.evaluation
    if args.images_per_task:
        evaluation = replace(evaluation, images_per_task=args.images_per_task)
    if args.steps:
        evaluation = replace(evaluation, steps=args.steps)
    progress = False if args.no_progress else None
    config = replace(config, evaluation=evaluation, ablation=args.ablation, progress=progress)
    report = run_demo(config)
    print(f"report: {report}")


def cmd_toyworld_train(args) -> None:
    import json
    from dataclasses import replace

    from featurefusion.errors import FeatureFusionError
    from featurefusion.toyworld.demo import SHIPPED
    from featurefusion.toyworld.train import TrainConfig, build_world

    config = TrainConfig(seed=args.seed)
    if args.base_steps:
        config = replace(config, base_steps=args.base_steps)
    if args.specialist_steps:
        config = replace(config, specialist_steps=args.specialist_steps)
    if args.specialist_replay is not None:
        config = replace(config, specialist_replay=args.specialist_replay)
    if args.from_base is not None and args.out is None:
        raise FeatureFusionError("--from-base writes new specialists: give --out (the shipped ones stay as they are)")
    timings = build_world(args.out or SHIPPED, config, progress=False if args.no_progress else None,
                          from_base=args.from_base)  # fmt: skip
    print(json.dumps({k: round(v, 1) for k, v in timings.items()}, indent=2))
