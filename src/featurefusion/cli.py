"""The `featurefusion` command. Every sub-command is a thin call into the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from featurefusion import __version__
from featurefusion.errors import FeatureFusionError


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", type=Path, required=True, help="output file (or folder for --format diffusers)")
    p.add_argument(
        "--format", choices=("ldm", "diffusers-unet", "diffusers"), help="output layout (default: the base's)"
    )
    p.add_argument(
        "--dtype",
        choices=("fp16", "bf16", "fp32"),
        help="output float dtype (default: the base UNet's); maths is fp32",
    )
    p.add_argument(
        "--nan",
        choices=("error", "skip"),
        default="error",
        help="NaN/Inf in a model's weight: stop (default), or warn and take that module from the base",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--template", type=Path, help="pipeline folder whose configs/tokenizer a --format diffusers output copies"
    )


def _add_featurefusion_args(p: argparse.ArgumentParser) -> None:
    from featurefusion.merge.featurefusion_math import (
        MODES,
        NORMALIZATIONS,
        SAMPLE_DTYPES,
        SLOPES,
        FeatureFusionOptions,
    )

    d = FeatureFusionOptions()
    g = p.add_argument_group("FeatureFusion options (see docs/featurefusion.md)")
    g.add_argument(
        "--mode",
        choices=MODES,
        default=d.mode,
        help="exact: closed-form statistics; sampled: the paper's random inputs",
    )
    g.add_argument(
        "--threshold",
        type=float,
        default=d.threshold,
        help="neuron pairs with |Pearson| below this get no weight",
    )
    g.add_argument(
        "--slope",
        choices=SLOPES,
        default=d.slope,
        help="rescale: cov/var_j (k_j rescaled to k_i); regress: cov/var_i (authors' code)",
    )
    g.add_argument(
        "--normalization",
        choices=NORMALIZATIONS,
        default=d.normalization,
        help="convex: |P|-weighted blend; paper: divide by sum_j C_ij; column: authors' column L1",
    )
    g.add_argument("--samples", type=int, default=d.samples, help="random inputs per layer in sampled mode")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the sampled mode")
    g.add_argument(
        "--sample-dtype",
        choices=tuple(SAMPLE_DTYPES),
        default=d.sample_dtype,
        help="dtype of the sampled features",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featurefusion", description="Merge diffusion models: FeatureFusion, Diffusion Soup, ..."
    )
    parser.add_argument("--version", action="version", version=f"featurefusion {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="say what a checkpoint is: layout, components, parameters, dtype, recipe")
    p.add_argument("path", type=Path)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("merge", help="merge models (base first) with FeatureFusion or a soup, or replay a recipe")
    p.add_argument("models", nargs="*", type=Path, help="checkpoints, base model first")
    p.add_argument("--method", choices=("featurefusion", "soup"), default="featurefusion")
    p.add_argument("--weights", type=float, nargs="+", help="soup weights, one per model (normalised to sum 1)")
    p.add_argument(
        "--text-encoder",
        choices=("base", "average"),
        default="base",
        help="copy from the base (default) or average",
    )
    p.add_argument("--vae", choices=("base", "average"), default="base", help="copy from the base (default) or average")
    p.add_argument("--recipe", type=Path, help="replay a recipe YAML (or a merged model's embedded recipe)")
    p.add_argument(
        "--no-statistics",
        action="store_true",
        help="FeatureFusion: do not store the statistics that unlearning needs",
    )
    _add_output_args(p)
    _add_featurefusion_args(p)

    p = sub.add_parser("soup", help="Diffusion Soup of models (uniform or weighted)")
    p.add_argument("models", nargs="+", type=Path)
    p.add_argument("--weights", type=float, nargs="+")
    p.add_argument("--text-encoder", choices=("base", "average"), default="base")
    p.add_argument("--vae", choices=("base", "average"), default="base")
    _add_output_args(p)

    p = sub.add_parser("add", help="add a model to an existing soup")
    p.add_argument("soup", type=Path)
    p.add_argument("model", type=Path)
    p.add_argument("--weight", type=float, help="weight of the new model (default 1/(members+1))")
    _add_output_args(p)

    p = sub.add_parser("remove", help="remove a model from a soup (needs its file) or a FeatureFusion merge (does not)")
    p.add_argument("merged", type=Path)
    p.add_argument("model", help="the member to remove: path as in the recipe, file, SHA-256 prefix or index")
    p.add_argument(
        "--models",
        type=Path,
        nargs="+",
        help="FeatureFusion: remaining members, if not at their recorded paths",
    )
    p.add_argument(
        "--statistics",
        type=Path,
        help="FeatureFusion statistics file (default: <merged>.ffstats.safetensors)",
    )
    _add_output_args(p)

    p = sub.add_parser("convert", help="rewrite a model in another layout (ldm, diffusers-unet, diffusers) or dtype")
    p.add_argument("model", type=Path)
    _add_output_args(p)

    p = sub.add_parser("demo", help="the paper's experiment on the built-in world: merge, sample, score, report")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="where models and report.md go")
    p.add_argument("--images-per-task", type=int, help="test images per task and model (default 48)")
    p.add_argument("--steps", type=int, help="DDIM sampling steps (default 15)")
    p.add_argument("--quick", action="store_true", help="a reduced run (fewer images, no ablation sweep) to try things")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("toyworld", help="the built-in world's models")
    tw = p.add_subparsers(dest="toyworld_command", required=True)
    t = tw.add_parser("train", help="rebuild the shipped base, specialists and scorer from scratch")
    t.add_argument("--out", type=Path, help="folder to write to (default: the package's checkpoints folder)")
    t.add_argument("--base-steps", type=int)
    t.add_argument("--specialist-steps", type=int)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("recipe", help="print the recipe embedded in a merged model as YAML")
    p.add_argument("path", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s: %(message)s")
    try:
        return COMMANDS[args.command](args) or 0
    except FeatureFusionError as err:
        if args.verbose:
            raise
        print(f"featurefusion: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("featurefusion: interrupted; no output was written", file=sys.stderr)
        return 130


# ---- commands --------------------------------------------------------------------------------------------
def cmd_inspect(args) -> None:
    from featurefusion.io.inspect import describe, format_description

    info = describe(args.path)
    print(json.dumps(info, indent=2) if args.json else format_description(info))


def _out(args):
    from featurefusion.merge.operations import OutputOptions

    return OutputOptions(args.format, args.dtype, args.nan, False if args.no_progress else None, args.template)


def _report(report) -> None:
    print(f"wrote {report.output} ({report.format}, {report.dtype}, {report.keys} tensors) in {report.seconds:.1f} s")


def cmd_merge(args) -> None:
    from featurefusion.errors import RecipeError
    from featurefusion.io.recipe import Recipe
    from featurefusion.merge import operations
    from featurefusion.merge.featurefusion_math import FeatureFusionOptions

    if args.recipe:
        if args.models:
            raise RecipeError("give either --recipe or models, not both")
        recipe = _load_recipe(args.recipe) if args.recipe.suffix in (".yaml", ".yml") else None
        recipe = recipe or Recipe.from_dict(_embedded_recipe(args.recipe))
        _report(operations.replay(recipe, args.output, args.recipe.parent, False if args.no_progress else None))
        return
    options = FeatureFusionOptions(
        mode=args.mode,
        threshold=args.threshold,
        slope=args.slope,
        normalization=args.normalization,
        samples=args.samples,
        seed=args.seed,
        sample_dtype=args.sample_dtype,
    )
    _report(
        operations.merge(
            args.models,
            args.output,
            args.method,
            options=options,
            weights=args.weights,
            text_encoder=args.text_encoder,
            vae=args.vae,
            out=_out(args),
            save_statistics=not args.no_statistics,
        )
    )


def cmd_soup(args) -> None:
    from featurefusion.merge import operations

    _report(
        operations.merge(
            args.models,
            args.output,
            "soup",
            weights=args.weights,
            text_encoder=args.text_encoder,
            vae=args.vae,
            out=_out(args),
        )
    )


def cmd_add(args) -> None:
    from featurefusion.merge import operations

    _report(operations.soup_add(args.soup, args.model, args.output, args.weight, _out(args)))


def cmd_remove(args) -> None:
    from featurefusion.merge import operations

    _report(operations.remove(args.merged, args.model, args.output, _out(args), args.models, args.statistics))


def cmd_convert(args) -> None:
    from featurefusion.merge import operations

    _report(operations.convert(args.model, args.output, _out(args)))


def cmd_demo(args) -> None:
    from dataclasses import replace

    from featurefusion.toyworld.demo import DemoConfig, quick_config, run_demo

    config = quick_config(args.out) if args.quick else DemoConfig(out=args.out)
    evaluation = config.evaluation
    if args.images_per_task:
        evaluation = replace(evaluation, images_per_task=args.images_per_task)
    if args.steps:
        evaluation = replace(evaluation, steps=args.steps)
    config = replace(config, evaluation=evaluation, progress=False if args.no_progress else None)
    report = run_demo(config)
    print(f"report: {report}")


def cmd_toyworld(args) -> None:
    import json
    from dataclasses import replace

    from featurefusion.toyworld.demo import SHIPPED
    from featurefusion.toyworld.train import TrainConfig, build_world

    config = TrainConfig(seed=args.seed)
    if args.base_steps:
        config = replace(config, base_steps=args.base_steps)
    if args.specialist_steps:
        config = replace(config, specialist_steps=args.specialist_steps)
    timings = build_world(args.out or SHIPPED, config, progress=False if args.no_progress else None)
    print(json.dumps({k: round(v, 1) for k, v in timings.items()}, indent=2))


def cmd_recipe(args) -> None:
    from featurefusion.io.recipe import Recipe

    print(Recipe.from_dict(_embedded_recipe(args.path)).to_yaml(), end="")


def _load_recipe(path: Path):
    from featurefusion.io.recipe import Recipe

    return Recipe.from_yaml_file(path)


def _embedded_recipe(path: Path) -> dict:
    from featurefusion.io.checkpoint import open_checkpoint
    from featurefusion.io.recipe import recipe_of

    with open_checkpoint(path) as checkpoint:
        return recipe_of(checkpoint.metadata, path).to_dict()


COMMANDS = {
    "inspect": cmd_inspect,
    "merge": cmd_merge,
    "soup": cmd_soup,
    "add": cmd_add,
    "remove": cmd_remove,
    "convert": cmd_convert,
    "demo": cmd_demo,
    "toyworld": cmd_toyworld,
    "recipe": cmd_recipe,
}

if __name__ == "__main__":
    sys.exit(main())
