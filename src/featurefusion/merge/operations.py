"""User-level operations: merge, add a model to a soup, remove a model from a soup or a FeatureFusion merge,
and replay a recipe. Each builds a `MergeJob` and a `Recipe`; the engine does the streaming work.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from featurefusion.errors import CheckpointError, RecipeError
from featurefusion.io.checkpoint import COMPONENTS, open_checkpoint
from featurefusion.io.recipe import ModelRef, Recipe, model_hash, recipe_of, resolve_model
from featurefusion.merge.base import CopyBase, MergeMethod
from featurefusion.merge.engine import MergeJob, MergeReport, run_merge
from featurefusion.merge.featurefusion import FeatureFusion, StatisticsSidecar
from featurefusion.merge.featurefusion_math import FeatureFusionOptions
from featurefusion.merge.soup import WeightedSum, add_weights, normalised_weights, remove_weights
from featurefusion.merge.task_arithmetic import DEFAULT_SCALE, task_arithmetic_weights

METHODS = ("featurefusion", "soup", "task-arithmetic")
COMPONENT_RULES = ("base", "average")


@dataclass
class OutputOptions:
    format: str | None = None
    dtype: str | None = None
    nan_policy: str = "error"
    progress: bool | None = None
    template: Path | None = None


def statistics_path(output: Path) -> Path:
    """Where the FeatureFusion statistics of a merged model live: beside it."""
    output = Path(output)
    stem = output.stem if output.suffix == ".safetensors" else output.name
    return output.with_name(f"{stem}.ffstats.safetensors")


def merge(
    models: list[Path],
    output: Path,
    method: str = "featurefusion",
    *,
    options: FeatureFusionOptions | None = None,
    weights: list[float] | None = None,
    text_encoder: str = "base",
    vae: str = "base",
    out: OutputOptions | None = None,
    save_statistics: bool = True,
    scale: float = DEFAULT_SCALE,
) -> MergeReport:
    """Merge `models` (base first) with FeatureFusion, a soup or task arithmetic (`scale`) and write `output`."""
    models = [Path(m) for m in models]
    out = out or OutputOptions()
    if method not in METHODS:
        raise RecipeError(f"unknown method {method!r}; choose one of {METHODS}")
    if len(models) < 2:
        raise RecipeError(f"a merge needs at least two models, got {len(models)}")
    components = {"unet": "merge", "text_encoder": _rule(text_encoder), "vae": _rule(vae)}
    refs = [ModelRef(str(m), model_hash(m)) for m in models]
    if method in ("soup", "task-arithmetic"):
        if method == "soup":
            alphas, extra = normalised_weights(weights, len(models)), {}
        else:
            if weights is not None:
                raise RecipeError("task arithmetic takes one --scale, not per-model weights")
            alphas, extra = task_arithmetic_weights(len(models), scale), {"scale": scale}
        members = [{"path": r.path, "sha256": r.sha256, "weight": a} for r, a in zip(refs, alphas, strict=True)]
        methods = _weighted_sum_methods(components, alphas)
        recipe = Recipe(
            "merge", method, refs, {**extra, "members": members}, components, out.format, out.dtype, out.nan_policy
        )
        return _run(models, output, methods, recipe, out)
    options = options or FeatureFusionOptions()
    recipe = Recipe(
        "merge", "featurefusion", refs, options.as_dict(), components, out.format, out.dtype, out.nan_policy
    )
    sidecar = (
        StatisticsSidecar.create(statistics_path(output), options, [r.sha256 for r in refs])
        if save_statistics
        else None
    )
    methods = _featurefusion_methods(components, FeatureFusion(options, record=sidecar), len(models))
    return _run(models, output, methods, recipe, out, sidecar)


def convert(model: Path, output: Path, out: OutputOptions) -> MergeReport:
    """Rewrite one model in another layout or dtype (every tensor copied, none merged)."""
    recipe = Recipe(
        "merge",
        "copy",
        [ModelRef(str(model), model_hash(model))],
        {},
        {c: "base" for c in COMPONENTS},
        out.format,
        out.dtype,
        out.nan_policy,
    )
    return _run([Path(model)], output, {}, recipe, out)


def soup_add(
    soup: Path, model: Path, output: Path, weight: float | None = None, out: OutputOptions | None = None
) -> MergeReport:
    """Add `model` to an existing soup: theta' = (1 - w) theta + w theta_new (w defaults to 1/(members + 1))."""
    parent = _recipe_of_model(soup)
    if parent.method != "soup":
        raise RecipeError(f"{soup} is a {parent.method} merge, not a soup; models can only be added to soups")
    members = parent.options["members"]
    beta = 1.0 / (len(members) + 1) if weight is None else float(weight)
    keep, new = add_weights(beta)
    ref = ModelRef(str(model), model_hash(model))
    new_members = [{**m, "weight": m["weight"] * keep} for m in members]
    new_members.append({"path": ref.path, "sha256": ref.sha256, "weight": new})
    return _update_soup(soup, model, output, parent, "soup-add", new_members, [keep, new], {"weight": beta}, out)


def remove(
    merged: Path,
    model: str | Path,
    output: Path,
    out: OutputOptions | None = None,
    models: list[Path] | None = None,
    statistics: Path | None = None,
) -> MergeReport:
    """Remove a model from a soup (needs its file) or from a FeatureFusion merge (does not)."""
    recipe = _recipe_of_model(merged)
    if recipe.method == "soup":
        return soup_remove(merged, Path(model), output, out)
    return unlearn(merged, model, output, out, models, statistics)


def soup_remove(soup: Path, model: Path, output: Path, out: OutputOptions | None = None) -> MergeReport:
    """theta' = (theta - alpha_j theta_j) / (1 - alpha_j), with alpha_j read from the soup's recipe."""
    parent = _recipe_of_model(soup)
    members = parent.options["members"]
    digest = model_hash(model)
    index = next((i for i, m in enumerate(members) if m["sha256"] == digest), None)
    if index is None:
        raise CheckpointError(f"this model is not a member of the soup {soup} (no member has its SHA-256)", model)
    alpha = members[index]["weight"]
    rest = [{**m, "weight": m["weight"] / (1.0 - alpha)} for i, m in enumerate(members) if i != index]
    return _update_soup(soup, model, output, parent, "soup-remove", rest, remove_weights(alpha), {"alpha": alpha}, out)


def _update_soup(soup, model, output, parent, operation, members, pair_weights, extra, out):
    out = out or OutputOptions(format=parent.format, dtype=parent.dtype, nan_policy=parent.nan_policy)
    refs = [ModelRef(str(soup), model_hash(soup)), ModelRef(str(model), model_hash(model))]
    methods = _weighted_sum_methods(parent.components, pair_weights)
    recipe = Recipe(
        operation,
        "soup",
        refs,
        {**extra, "members": members},
        parent.components,
        out.format,
        out.dtype,
        out.nan_policy,
    )
    return _run([Path(soup), Path(model)], output, methods, recipe, out)


def unlearn(
    merged: Path,
    model: str | Path,
    output: Path,
    out: OutputOptions | None = None,
    models: list[Path] | None = None,
    statistics: Path | None = None,
) -> MergeReport:
    """Remove one specialist from a FeatureFusion merge using its stored statistics (paper §5.2.3).

    `model` names the member to remove: its path as written in the recipe, its file (matched by SHA-256),
    a SHA-256 prefix, or its 0-based index. The remaining members are found from the recipe, or given in
    `models`. The removed model's file is not needed.
    """
    recipe = _recipe_of_model(merged)
    if recipe.method != "featurefusion":
        raise RecipeError(f"{merged} is a {recipe.method} merge; FeatureFusion unlearning needs a FeatureFusion merge")
    index = _member_index(recipe, model, merged)
    if index == 0:
        raise RecipeError("the base model (the first model of the merge) cannot be removed")
    remaining_refs = [r for i, r in enumerate(recipe.models) if i != index]
    if models is not None:
        if len(models) != len(remaining_refs):
            raise RecipeError(f"{len(remaining_refs)} remaining models expected, {len(models)} given")
        remaining = [Path(m) for m in models]
        for ref, path in zip(remaining_refs, remaining, strict=True):
            if model_hash(path) != ref.sha256:
                raise CheckpointError(f"not the model the merge was built with ({ref.path})", path)
    else:
        remaining = [resolve_model(r, Path(merged).parent) for r in remaining_refs]
    stats_file = Path(statistics) if statistics else statistics_path(Path(merged))
    replay = StatisticsSidecar.open(stats_file)
    try:
        options = FeatureFusionOptions(**replay.options)
        if replay.model_hashes != [r.sha256 for r in recipe.models]:
            raise CheckpointError(f"statistics file does not belong to the merge {merged}", stats_file)
        out = out or OutputOptions(format=recipe.format, dtype=recipe.dtype, nan_policy=recipe.nan_policy)
        removed = recipe.models[index]
        new_recipe = Recipe(
            "unlearn",
            "featurefusion",
            remaining_refs,
            {
                **options.as_dict(),
                "removed": {"path": removed.path, "sha256": removed.sha256},
                "statistics": {
                    "path": str(stats_file),
                    "sha256": model_hash(stats_file),
                    "dropped_index": index,
                },
            },
            recipe.components,
            out.format,
            out.dtype,
            out.nan_policy,
        )
        sidecar = StatisticsSidecar.create(statistics_path(output), options, [r.sha256 for r in remaining_refs])
        method = FeatureFusion(options, record=sidecar, replay=replay, dropped_model=index)
        methods = _featurefusion_methods(recipe.components, method, len(remaining))
        return _run(remaining, output, methods, new_recipe, out, sidecar)
    finally:
        replay.close()


def replay(recipe: Recipe, output: Path, recipe_dir: Path | None = None, progress: bool | None = None) -> MergeReport:
    """Run a recipe again. With unchanged inputs the output is bit-identical to the original."""
    paths = [resolve_model(r, recipe_dir) for r in recipe.models]
    out = OutputOptions(recipe.format, recipe.dtype, recipe.nan_policy, progress)
    components = recipe.components
    if recipe.method == "copy":
        return _run(paths, output, {}, recipe, out)
    if recipe.method in ("soup", "task-arithmetic"):
        # A merge records each member's weight; soup-add and soup-remove record the one number they used.
        if recipe.operation == "merge":
            weights = [m["weight"] for m in recipe.options["members"]]
        elif recipe.operation == "soup-add":
            weights = add_weights(recipe.options["weight"])
        else:
            weights = remove_weights(recipe.options["alpha"])
        return _run(paths, output, _weighted_sum_methods(components, weights), recipe, out)
    ff_fields = set(FeatureFusionOptions.__dataclass_fields__)
    options = FeatureFusionOptions(**{k: v for k, v in recipe.options.items() if k in ff_fields})
    hashes = [r.sha256 for r in recipe.models]
    sidecar = StatisticsSidecar.create(statistics_path(output), options, hashes)
    if recipe.operation == "merge":
        method = FeatureFusion(options, record=sidecar)
    else:
        stats = recipe.options["statistics"]
        replay_from = StatisticsSidecar.open(resolve_model(ModelRef(stats["path"], stats["sha256"]), recipe_dir))
        method = FeatureFusion(options, record=sidecar, replay=replay_from, dropped_model=stats["dropped_index"])
    return _run(paths, output, _featurefusion_methods(components, method, len(paths)), recipe, out, sidecar)


# ---- helpers ---------------------------------------------------------------------------------------------
def _rule(rule: str) -> str:
    if rule not in COMPONENT_RULES:
        raise RecipeError(f"component rule must be one of {COMPONENT_RULES}, got {rule!r}")
    return rule


def _weighted_sum_methods(components: dict[str, str], weights: list[float]) -> dict[str, MergeMethod]:
    """The UNet and every component whose rule is not 'base' get the weighted sum (components with the rule
    'average' of a task-arithmetic merge get the same weights: the rule names where the method applies)."""
    method = WeightedSum(weights)
    return {c: method for c, rule in components.items() if rule != "base"}


def _featurefusion_methods(components: dict[str, str], ff: FeatureFusion, count: int) -> dict[str, MergeMethod]:
    methods: dict[str, MergeMethod] = {"unet": ff}
    for component in COMPONENTS:
        if component != "unet":
            rule = components.get(component, "base")
            methods[component] = CopyBase() if rule == "base" else WeightedSum([1.0 / count] * count)
    return methods


def _run(models, output, methods, recipe: Recipe, out: OutputOptions, sidecar: StatisticsSidecar | None = None):
    job = MergeJob(
        models=list(models),
        output=Path(output),
        methods=methods,
        output_format=out.format,
        dtype=out.dtype,
        metadata=recipe.metadata(),
        nan_policy=out.nan_policy,
        progress=out.progress,
        template=out.template,
    )
    return run_merge(job, side_files=[sidecar] if sidecar else None)


def _recipe_of_model(path: Path):
    with open_checkpoint(path) as checkpoint:
        return recipe_of(checkpoint.metadata, Path(path))


def _member_index(recipe: Recipe, model: str | Path, merged: Path) -> int:
    text = str(model)
    if text.isdigit() and int(text) < len(recipe.models):
        return int(text)
    for i, ref in enumerate(recipe.models):
        if ref.path == text:
            return i
    if Path(text).exists():
        digest = model_hash(Path(text))
        for i, ref in enumerate(recipe.models):
            if ref.sha256 == digest:
                return i
    matches = [i for i, ref in enumerate(recipe.models) if len(text) >= 8 and ref.sha256.startswith(text)]
    if len(matches) == 1:
        return matches[0]
    members = ", ".join(f"{i}: {r.path}" for i, r in enumerate(recipe.models))
    raise CheckpointError(f"{text!r} is not a member of this merge (members: {members})", merged)
