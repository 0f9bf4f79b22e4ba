"""User-level operations: merge, add a model to a soup, remove a model from a soup or a FeatureFusion merge,
and replay a recipe. Each builds a `MergeJob` and a `Recipe`; the engine does the streaming work.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from featurefusion.errors import CheckpointError, RecipeError
from featurefusion.io.checkpoint import COMPONENTS, open_checkpoint
from featurefusion.io.recipe import ModelRef, Recipe, model_hash, recipe_of, resolve_model
from featurefusion.merge import registry
from featurefusion.merge.engine import MergeJob, MergeReport, run_merge
from featurefusion.merge.featurefusion import StatisticsSidecar
from featurefusion.merge.featurefusion_math import FeatureFusionOptions
from featurefusion.merge.methods.soup import members as soup_members
from featurefusion.merge.registry import COMPONENT_RULES, BuildContext, Built
from featurefusion.merge.soup import add_weights


@dataclass
class OutputOptions:
    format: str | None = None
    dtype: str | None = None
    nan_policy: str = "error"
    progress: bool | None = None
    template: Path | None = None


STATISTICS_SUFFIX = ".ffstats"
# Written before the rename; UIs that list every `*.safetensors` in a model folder showed it as a model.
LEGACY_STATISTICS_SUFFIX = ".ffstats.safetensors"


def statistics_path(output: Path) -> Path:
    """Where the FeatureFusion statistics of a merged model are written: beside it, as `<stem>.ffstats`.

    The bytes are safetensors, but the name does not end in `.safetensors`, so folder scans for models
    skip it."""
    return _beside(Path(output), STATISTICS_SUFFIX)


def find_statistics(merged: Path) -> Path:
    """The statistics file of a merged model: `<stem>.ffstats`, else the older `<stem>.ffstats.safetensors`."""
    current = statistics_path(merged)
    legacy = _beside(Path(merged), LEGACY_STATISTICS_SUFFIX)
    return legacy if not current.exists() and legacy.exists() else current


def _beside(output: Path, suffix: str) -> Path:
    stem = output.stem if output.suffix == ".safetensors" else output.name
    return output.with_name(f"{stem}{suffix}")


def merge(
    models: list[Path],
    output: Path,
    method: str = "featurefusion",
    options=None,
    *,
    text_encoder: str = "base",
    vae: str = "base",
    out: OutputOptions | None = None,
    save_statistics: bool = True,
    **option_values,
) -> MergeReport:
    """Merge `models` (base first) with a registered method and write `output`.

    `options` is the method's options dataclass, a dict, or None (defaults); keyword arguments set single
    options (`merge(models, out, "soup", weights=[2, 1, 1])`, `merge(models, out, "ties", density=0.3)`).
    """
    models = [Path(m) for m in models]
    out = out or OutputOptions()
    plugin = registry.get(method)
    chosen = plugin.make_options(options, **option_values)
    if len(models) < 2:
        raise RecipeError(f"a merge needs at least two models, got {len(models)}")
    components = {"unet": "merge", "text_encoder": _rule(text_encoder), "vae": _rule(vae)}
    refs = [ModelRef(str(m), model_hash(m)) for m in models]
    recipe = Recipe(
        "merge",
        plugin.name,
        refs,
        plugin.recipe_options(chosen, refs),
        components,
        out.format,
        out.dtype,
        out.nan_policy,
    )
    built = plugin.build(recipe, BuildContext(output=Path(output), save_statistics=save_statistics))
    return _run(models, output, built, recipe, out)


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
    return _run([Path(model)], output, Built({}), recipe, out)


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
    new_members = [{**m, "weight": m["weight"] * keep} for m in members] + soup_members([ref], [new])
    return _update_soup(soup, ref, output, parent, "soup-add", new_members, {"weight": beta}, out)


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
    ref = ModelRef(str(model), model_hash(model))
    index = next((i for i, m in enumerate(members) if m["sha256"] == ref.sha256), None)
    if index is None:
        raise CheckpointError(f"this model is not a member of the soup {soup} (no member has its SHA-256)", model)
    alpha = members[index]["weight"]
    rest = [{**m, "weight": m["weight"] / (1.0 - alpha)} for i, m in enumerate(members) if i != index]
    return _update_soup(soup, ref, output, parent, "soup-remove", rest, {"alpha": alpha}, out)


def _update_soup(soup, ref: ModelRef, output, parent: Recipe, operation, members, extra, out):
    out = out or OutputOptions(format=parent.format, dtype=parent.dtype, nan_policy=parent.nan_policy)
    refs = [ModelRef(str(soup), model_hash(soup)), ref]
    recipe = Recipe(
        operation, "soup", refs, {**extra, "members": members}, parent.components, out.format, out.dtype,
        out.nan_policy,
    )  # fmt: skip
    built = registry.get("soup").build(recipe, BuildContext(output=Path(output)))
    return _run([Path(soup), Path(ref.path)], output, built, recipe, out)


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
    stats_file = Path(statistics) if statistics else find_statistics(Path(merged))
    recorded = StatisticsSidecar.open(stats_file)
    try:
        options = FeatureFusionOptions(**recorded.options)
        if recorded.model_hashes != [r.sha256 for r in recipe.models]:
            raise CheckpointError(f"statistics file does not belong to the merge {merged}", stats_file)
    finally:
        recorded.close()
    out = out or OutputOptions(format=recipe.format, dtype=recipe.dtype, nan_policy=recipe.nan_policy)
    removed = recipe.models[index]
    recorded_options = {
        **options.as_dict(),
        "removed": {"path": removed.path, "sha256": removed.sha256},
        "statistics": {"path": str(stats_file), "sha256": model_hash(stats_file), "dropped_index": index},
    }
    new_recipe = Recipe(
        "unlearn",
        "featurefusion",
        remaining_refs,
        recorded_options,
        recipe.components,
        out.format,
        out.dtype,
        out.nan_policy,
    )
    built = registry.get("featurefusion").build(new_recipe, BuildContext(output=Path(output)))
    return _run(remaining, output, built, new_recipe, out)


def replay(recipe: Recipe, output: Path, recipe_dir: Path | None = None, progress: bool | None = None) -> MergeReport:
    """Run a recipe again. With unchanged inputs the output is bit-identical to the original."""
    built = Built({}) if recipe.method == "copy" else None
    plugin = None if built else registry.get(recipe.method)  # an unknown method is an error, never a default
    paths = [resolve_model(r, recipe_dir) for r in recipe.models]
    out = OutputOptions(recipe.format, recipe.dtype, recipe.nan_policy, progress)
    built = built or plugin.build(recipe, BuildContext(output=Path(output), recipe_dir=recipe_dir))
    return _run(paths, output, built, recipe, out)


# ---- helpers ---------------------------------------------------------------------------------------------
def _rule(rule: str) -> str:
    if rule not in COMPONENT_RULES:
        raise RecipeError(f"component rule must be one of {COMPONENT_RULES}, got {rule!r}")
    return rule


def _run(models, output, built: Built, recipe: Recipe, out: OutputOptions) -> MergeReport:
    def finalize(metadata: dict[str, str]) -> dict[str, str]:
        planned = built.planned_options()
        return replace(recipe, options={**recipe.options, **planned}).metadata() if planned else metadata

    job = MergeJob(
        models=list(models),
        output=Path(output),
        methods=built.methods,
        output_format=out.format,
        dtype=out.dtype,
        metadata=recipe.metadata(),
        nan_policy=out.nan_policy,
        progress=out.progress,
        template=out.template,
        finalize_metadata=finalize if built.planned_options else None,
    )
    try:
        return run_merge(job, side_files=built.side_files)
    finally:
        built.close()


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
