"""Sub-commands that read, merge, convert and unmerge checkpoints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from featurefusion.cli.common import add_output_args, output_options, print_report
from featurefusion.cli.evaluation import add_metric_model_args, add_sampler_args
from featurefusion.merge.registry import default_of


def register(sub) -> None:
    p = sub.add_parser("inspect", help="say what a checkpoint is: layout, components, parameters, dtype, recipe")
    p.set_defaults(handler=cmd_inspect)
    p.add_argument("path", type=Path)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("merge", help="merge models (base first) with any registered method, or replay a recipe")
    p.set_defaults(handler=cmd_merge)
    p.add_argument("models", nargs="*", type=Path, help="checkpoints, base model first")
    add_method_args(p)
    p.add_argument(
        "--text-encoder",
        choices=("base", "average"),
        default="base",
        help="copy from the base (default) or merge with the method (FeatureFusion averages it)",
    )
    p.add_argument("--vae", choices=("base", "average"), default="base", help="copy from the base (default) or merge")
    p.add_argument("--recipe", type=Path, help="replay a recipe YAML (or a merged model's embedded recipe)")
    p.add_argument(
        "--no-statistics",
        action="store_true",
        help="FeatureFusion: do not store the statistics that unlearning needs",
    )
    add_output_args(p)

    p = sub.add_parser("methods", help="list the merge methods with their options, sources and costs")
    p.set_defaults(handler=cmd_methods)
    p.add_argument("--markdown", action="store_true", help="print docs/methods.md")

    p = sub.add_parser("soup", help="Diffusion Soup of models: uniform, weighted, greedy or reverse-greedy")
    p.set_defaults(handler=cmd_soup)
    p.add_argument("models", nargs="+", type=Path, help="checkpoints, base model first")
    p.add_argument("--weights", type=float, nargs="+")
    p.add_argument("--text-encoder", choices=("base", "average"), default="base")
    p.add_argument("--vae", choices=("base", "average"), default="base")
    add_output_args(p)
    add_greedy_args(p)

    p = sub.add_parser(
        "search", help="choose a merge on validation prompts: a grid of methods and options, block weights, soups"
    )
    p.set_defaults(handler=cmd_search)
    p.add_argument("models", nargs="+", type=Path, help="checkpoints, base model first")
    p.add_argument(
        "--tasks", type=Path, required=True, help="validation tasks: YAML/JSON list of name, prompts (as evaluate)"
    )
    p.add_argument(
        "--methods",
        default="task-arithmetic,ties,dare,dare-ties,tsv,iso-c,iso-cts",
        help="comma-separated methods whose search spaces form the grid, or 'all' (every method but zipit, which "
        "needs sample inputs, and block-weighted, which --block-search covers)",
    )
    p.add_argument(
        "--block-search",
        action="store_true",
        help="also choose per-block weights (autoMBW), starting from the best task-arithmetic scale",
    )
    p.add_argument("--greedy-soups", action="store_true", help="also run greedy and reverse-greedy soups")
    p.add_argument("--metric", default="clip", help="clip (default), imagereward or fid; averaged over the tasks")
    p.add_argument("--table", type=Path, help="where the table of candidates goes (default: OUTPUT.search.md)")
    add_metric_model_args(p)
    add_sampler_args(p, writes_model=True)
    add_output_args(p)

    p = sub.add_parser("add", help="add a model to an existing soup")
    p.set_defaults(handler=cmd_add)
    p.add_argument("soup", type=Path)
    p.add_argument("model", type=Path)
    p.add_argument("--weight", type=float, help="weight of the new model (default 1/(members+1))")
    add_output_args(p)

    p = sub.add_parser("remove", help="remove a model from a soup (needs its file) or a FeatureFusion merge (does not)")
    p.set_defaults(handler=cmd_remove)
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
        help="FeatureFusion statistics file (default: <merged>.ffstats, or the older <merged>.ffstats.safetensors)",
    )
    add_output_args(p)

    p = sub.add_parser("convert", help="rewrite a model in another layout (ldm, diffusers-unet, diffusers) or dtype")
    p.set_defaults(handler=cmd_convert)
    p.add_argument("model", type=Path)
    add_output_args(p)

    p = sub.add_parser("recipe", help="print the recipe embedded in a merged model as YAML")
    p.set_defaults(handler=cmd_recipe)
    p.add_argument("path", type=Path)


def add_greedy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("greedy soups (Diffusion Soup §4.2): members chosen by a metric on held-out prompts")
    search = g.add_mutually_exclusive_group()
    search.add_argument("--greedy", action="store_true", help="add models, best first, while the metric improves")
    search.add_argument(
        "--reverse-greedy", action="store_true", help="start from all models; drop models, worst first, while it helps"
    )
    g.add_argument("--prompts", type=Path, help="held-out prompt file (one per line, or a JSON/YAML list)")
    g.add_argument("--metric", default="clip", help="clip (default), imagereward or fid")
    g.add_argument("--references", type=Path, help="reference images folder (FID)")
    add_metric_model_args(g)
    add_sampler_args(g, writes_model=True)


def add_method_args(p: argparse.ArgumentParser) -> None:
    """`--method` and one flag per option name of every registered method. Flags default to None, so a
    method's own default applies unless the flag is given; a flag given to a method without that option
    is an error (see `method_options`)."""
    from featurefusion.merge import registry

    p.add_argument(
        "--method", choices=registry.names(), default="featurefusion", help="merge method (default: %(default)s)"
    )
    g = p.add_argument_group("method options (`featurefusion methods` describes them; defaults are per method)")
    for name, users in _option_users().items():
        first = users[0][1]
        defaults = ", ".join(f"{plugin.name}: {_shown(default_of(f))}" for plugin, f in users)
        parsing = {"metavar": name.upper(), **first.metadata["argparse"]}
        if "choices" in parsing:
            del parsing["metavar"]
        g.add_argument(
            f"--{name.replace('_', '-')}",
            dest=f"option_{name}",
            default=None,
            help=f"{first.metadata['help']} [{defaults}]",
            **parsing,
        )


def method_options(args, method: str) -> dict:
    """The option values given on the command line for `method`."""
    from featurefusion.errors import RecipeError

    values = {}
    for name, users in _option_users().items():
        value = getattr(args, f"option_{name}", None)
        if value is None:
            continue
        if method not in {plugin.name for plugin, _ in users}:
            takers = ", ".join(plugin.name for plugin, _ in users)
            raise RecipeError(f"--{name.replace('_', '-')} is not an option of {method} (it applies to {takers})")
        values[name] = value
    return values


def _option_users() -> dict:
    from featurefusion.merge import registry
    from featurefusion.merge.registry import cli_fields

    users: dict[str, list] = {}
    for plugin in registry.plugins():
        for f in cli_fields(plugin.Options):
            users.setdefault(f.name, []).append((plugin, f))
    return users


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return " ".join(map(str, value)) or "none"
    return str(value)


def cmd_inspect(args) -> None:
    from featurefusion.io.inspect import describe, format_description

    info = describe(args.path)
    print(json.dumps(info, indent=2) if args.json else format_description(info))


def cmd_merge(args) -> None:
    from featurefusion.errors import RecipeError
    from featurefusion.io.recipe import Recipe
    from featurefusion.merge import operations

    if args.recipe:
        if args.models:
            raise RecipeError("give either --recipe or models, not both")
        recipe = _load_recipe(args.recipe) if args.recipe.suffix in (".yaml", ".yml") else None
        recipe = recipe or Recipe.from_dict(_embedded_recipe(args.recipe), str(args.recipe))
        progress = False if args.no_progress else None
        report = operations.replay(
            recipe, args.output, args.recipe.parent, progress, recipe_file=args.recipe, overwrite=args.overwrite
        )
        print_report(report)
        return
    print_report(
        operations.merge(
            args.models,
            args.output,
            args.method,
            method_options(args, args.method),
            text_encoder=args.text_encoder,
            vae=args.vae,
            out=output_options(args),
            save_statistics=not args.no_statistics,
        )
    )


def cmd_methods(args) -> None:
    from featurefusion.merge.catalogue import methods_markdown, methods_text

    print(methods_markdown() if args.markdown else methods_text(), end="")


def cmd_soup(args) -> None:
    from featurefusion.merge import operations

    if args.greedy or args.reverse_greedy:
        return _greedy_soup(args)

    print_report(
        operations.merge(
            args.models,
            args.output,
            "soup",
            weights=args.weights,
            text_encoder=args.text_encoder,
            vae=args.vae,
            out=output_options(args),
        )
    )


def _validation_scorer(args, prompts_of_tasks):
    """A score function of a checkpoint (higher is better) and the options that candidates are written with:
    the metric on held-out prompts, averaged over tasks, every candidate sampled with the same seeds."""
    from featurefusion.cli.evaluation import metric_options, sampler_settings
    from featurefusion.evaluate.matrix import score_model
    from featurefusion.evaluate.metrics import build_metric, parse_metric_names
    from featurefusion.merge import operations

    (name,) = parse_metric_names(args.metric)
    metric = build_metric(name, **metric_options(args, [name])[name])  # fails now if unavailable
    base = args.models[0]
    template = args.template or (base if base.is_dir() else None)
    settings = sampler_settings(args)

    def score(checkpoint: Path) -> float:
        values = [
            score_model(checkpoint, list(prompts), metric, settings, template=template, references=refs, oriented=True)
            for prompts, refs in prompts_of_tasks
        ]
        return sum(values) / len(values)

    # Candidates only differ in the UNet when text encoder and VAE come from the base: a UNet file is enough.
    copied = getattr(args, "text_encoder", "base") == "base" and getattr(args, "vae", "base") == "base"
    unet_only = copied and template is not None
    candidate_out = operations.OutputOptions(format="diffusers-unet", progress=False) if unet_only else None
    return name, score, candidate_out


def _greedy_soup(args) -> None:
    from featurefusion.errors import RecipeError
    from featurefusion.merge.greedy import search_soup

    if args.weights:
        raise RecipeError("--weights and a greedy search exclude each other: the search chooses uniform members")
    if not args.prompts:
        raise RecipeError("a greedy search needs --prompts: held-out prompts to score candidate soups on")
    name, score, candidate_out = _validation_scorer(args, [(_read_prompts(args.prompts), args.references)])
    result = search_soup(
        args.models, score, args.output, reverse=args.reverse_greedy, out=output_options(args),
        candidate_out=candidate_out,
    )  # fmt: skip
    for action, members, value in result.steps:
        print(f"{action:>10}  {{{', '.join(str(args.models[i]) for i in members)}}}  {name} {value:.4f}")
    print(f"chosen: {', '.join(str(args.models[i]) for i in result.chosen)} ({result.evaluations} candidates scored)")
    print(f"wrote {args.output}")


def _read_prompts(path: Path) -> list[str]:
    from featurefusion.evaluate.sampling import read_prompts

    return read_prompts(path)


def cmd_search(args) -> None:
    from featurefusion.evaluate.matrix import read_tasks
    from featurefusion.io.atomic import write_text_atomic
    from featurefusion.merge import registry
    from featurefusion.merge.greedy import search_soup
    from featurefusion.merge.search import Candidate, grid, search_block_weights, search_merges, write

    everything = [m for m in registry.names() if m not in ("zipit", "block-weighted")]
    methods = everything if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m]
    for method in methods:
        registry.get(method)  # an unknown name fails before anything is sampled
    tasks = read_tasks(args.tasks)
    name, score, candidate_out = _validation_scorer(args, [(t.prompts, t.references) for t in tasks])
    cache: dict = {}
    candidates = grid([m for m in methods if m != "block-weighted"])
    result = search_merges(args.models, candidates, score, None, candidate_out=candidate_out, cache=cache)
    if args.block_search:
        ta = [c for c in result.scores if c.method == "task-arithmetic"]
        start = result.best_of("task-arithmetic").option_dict["scale"] if ta else 1.0 / len(args.models)
        blocks = search_block_weights(args.models, score, None, start=start, candidate_out=candidate_out, cache=cache)
        result.scores.update(blocks.scores)
    if args.greedy_soups:
        for reverse in (False, True):
            scratch = args.output.with_name(f".{args.output.name}.greedy.safetensors")
            soup = search_soup(args.models, score, scratch, reverse=reverse, candidate_out=candidate_out)
            scratch.unlink(missing_ok=True)
            weights = soup.weights(len(args.models))
            result.scores[Candidate.soup(weights)] = soup.score
    result.best = max(result.scores, key=result.scores.get)
    write(args.models, result.best, args.output, output_options(args))
    table = args.table or args.output.with_name(args.output.name + ".search.md")
    header = f"Validation {name} (higher is better; FID negated), mean over {len(tasks)} tasks\n\n"
    write_text_atomic(table, header + result.table(name))
    print(result.table(name), end="")
    print(f"chosen: {result.best.label} ({len(result.scores)} candidates scored)")
    print(f"wrote {args.output}; table: {table}")


def cmd_add(args) -> None:
    from featurefusion.merge import operations

    print_report(operations.soup_add(args.soup, args.model, args.output, args.weight, output_options(args)))


def cmd_remove(args) -> None:
    from featurefusion.merge import operations

    report = operations.remove(args.merged, args.model, args.output, output_options(args), args.models, args.statistics)
    print_report(report)


def cmd_convert(args) -> None:
    from featurefusion.merge import operations

    print_report(operations.convert(args.model, args.output, output_options(args)))


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
