"""User-level operations: merge, add a model to a soup, remove a model from a soup or a FeatureFusion merge,
and replay a recipe. Each builds a `MergeJob` and a `Recipe`; the engine does the streaming work.
"""

from __future__ import annotations

import json
import logging
import os
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

log = logging.getLogger(__name__)


@dataclass
class OutputOptions:
    """How the output is written. `None` fields take their defaults: the base's layout and dtype for a merge;
    what the recipe recorded for `add` and `remove`; "error" for the policies."""

    format: str | None = None
    dtype: str | None = None
    nan_policy: str | None = None
    progress: bool | None = None
    template: Path | None = None
    overwrite: bool = False  # replace an existing output folder that holds a model
    overflow: str | None = None  # a cast that overflows the output dtype: "error" or "clamp"

    def defaults_from(self, recipe: Recipe | None) -> OutputOptions:
        """Unset fields from `recipe` (what the merged model was written with), else the global defaults."""
        return replace(
            self,
            format=self.format or (recipe.format if recipe else None),
            dtype=self.dtype or (recipe.dtype if recipe else None),
            nan_policy=self.nan_policy or (recipe.nan_policy if recipe else "error"),
            overflow=self.overflow or (recipe.overflow if recipe else "error"),
        )


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
    if not output.name:  # "." or "..": name it by the folder it means
        output = Path(os.path.abspath(output))
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
    out = (out or OutputOptions()).defaults_from(None)
    plugin = registry.get(method)
    chosen = plugin.make_options(options, **option_values)
    if len(models) < 2:
        raise RecipeError(f"a merge needs at least two models, got {len(models)}")
    components = {"unet": "merge", "text_encoder": _rule(text_encoder), "vae": _rule(vae)}
    refs = [ModelRef.of(m, output) for m in models]
    warn_duplicates(models, refs)
    recorded = plugin.recipe_options(chosen, refs)
    if not save_statistics and plugin.name == "featurefusion":
        # `remove` must know this merge has no statistics, not find those of another merge at that path.
        recorded["keep_statistics"] = False
    recipe = _recipe("merge", plugin.name, refs, recorded, components, out)
    built = plugin.build(recipe, BuildContext(output=Path(output), save_statistics=save_statistics))
    return _run(models, output, built, recipe, out)


def warn_duplicates(models: list[Path], refs: list[ModelRef]) -> None:
    """The same model twice is legal (it weighs double) but rarely meant."""
    seen: dict[str, Path] = {}
    for model, ref in zip(models, refs, strict=True):
        if ref.sha256 in seen:
            log.warning(
                "%s and %s are the same model (equal SHA-256): it enters the merge twice", seen[ref.sha256], model
            )
        seen.setdefault(ref.sha256, model)


def _recipe(operation, method, refs, options, components, out: OutputOptions) -> Recipe:
    return Recipe(
        operation, method, refs, options, components, out.format, out.dtype, out.nan_policy, overflow=out.overflow
    )


def convert(model: Path, output: Path, out: OutputOptions) -> MergeReport:
    """Rewrite one model in another layout or dtype (every tensor copied, none merged)."""
    out = out.defaults_from(None)
    recipe = _recipe("merge", "copy", [ModelRef.of(model, output)], {}, {c: "base" for c in COMPONENTS}, out)
    return _run([Path(model)], output, Built({}), recipe, out)


def soup_add(
    soup: Path, model: Path, output: Path, weight: float | None = None, out: OutputOptions | None = None
) -> MergeReport:
    """Add `model` to an existing soup: theta' = (1 - w) theta + w theta_new (w defaults to 1/(members + 1))."""
    parent = _recipe_of_model(soup)
    if parent.method != "soup":
        raise RecipeError(f"{soup} is a {parent.method} merge, not a soup; models can only be added to soups")
    members = _members(parent, soup)
    beta = 1.0 / (len(members) + 1) if weight is None else float(weight)
    keep, new = add_weights(beta)
    ref = ModelRef.of(model, output)
    if any(m.get("sha256") == ref.sha256 for m in members):
        log.warning("%s is already a member of the soup %s: it will count twice", model, soup)
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
    members = _members(parent, soup)
    ref = ModelRef.of(model, output)
    index = next((i for i, m in enumerate(members) if m.get("sha256") == ref.sha256), None)
    if index is None:
        raise CheckpointError(f"this model is not a member of the soup {soup} (no member has its SHA-256)", model)
    alpha = members[index]["weight"]
    rest = [{**m, "weight": m["weight"] / (1.0 - alpha)} for i, m in enumerate(members) if i != index]
    return _update_soup(soup, ref, output, parent, "soup-remove", rest, {"alpha": alpha}, out)


def _members(recipe: Recipe, path: Path) -> list[dict]:
    members = recipe.options.get("members")
    if not isinstance(members, list) or not all(isinstance(m, dict) and "weight" in m for m in members):
        raise CheckpointError("corrupt soup recipe: its members (with weights) are missing", path)
    return members


def _update_soup(soup, ref: ModelRef, output, parent: Recipe, operation, members, extra, out):
    out = (out or OutputOptions()).defaults_from(parent)
    refs = [ModelRef.of(soup, output), ref]
    recipe = _recipe(operation, "soup", refs, {**extra, "members": members}, parent.components, out)
    built = registry.get("soup").build(recipe, BuildContext(output=Path(output)))
    return _run([Path(soup), Path(ref.absolute)], output, built, recipe, out)


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
    if recipe.options.get("keep_statistics") is False and statistics is None:
        raise RecipeError(
            f"{merged} was merged with --no-statistics, so it cannot be unmerged; merge again with statistics"
        )
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
    options = registry.get("featurefusion").options_of(recipe)
    check_statistics(stats_file, recipe, options, merged)
    out = (out or OutputOptions()).defaults_from(recipe)
    removed = recipe.models[index]
    stats_ref = ModelRef.of(stats_file, output)
    recorded_options = {
        **options.as_dict(),
        "removed": removed.to_dict(),
        "statistics": {**stats_ref.to_dict(), "dropped_index": index},
    }
    new_refs = [
        ModelRef(ModelRef.of(p, output).path, r.sha256, str(p.resolve()))
        for r, p in zip(remaining_refs, remaining, strict=True)
    ]
    new_recipe = _recipe("unlearn", "featurefusion", new_refs, recorded_options, recipe.components, out)
    built = registry.get("featurefusion").build(new_recipe, BuildContext(output=Path(output)))
    built.inputs += [Path(merged), stats_file]
    return _run(remaining, output, built, new_recipe, out)


def check_statistics(stats_file: Path, recipe: Recipe, options: FeatureFusionOptions, merged: Path) -> None:
    """The statistics must be those of this merge: the same models (by SHA-256) and the same options. A file
    of another merge at the same path (an older merge with other options, say) is refused, never used."""
    recorded = StatisticsSidecar.open(stats_file)
    try:
        try:
            stored_options, stored_models = recorded.options, recorded.model_hashes
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"corrupt statistics metadata ({err!r})", stats_file) from None
        if not isinstance(stored_options, dict) or not isinstance(stored_models, list):
            raise CheckpointError("corrupt statistics metadata (options or models of the wrong type)", stats_file)
        if stored_models != [r.sha256 for r in recipe.models]:
            raise CheckpointError(f"statistics file does not belong to the merge {merged} (other models)", stats_file)
        # `thresholds` are what `auto` chose while planning: in the recipe, and per layer in the statistics.
        stored = {k: v for k, v in stored_options.items() if k != "thresholds"}
        expected = {k: v for k, v in options.as_dict().items() if k != "thresholds"}
        if json.dumps(stored, sort_keys=True) != json.dumps(expected, sort_keys=True):
            differ = sorted(k for k in expected if stored.get(k) != expected[k])
            raise CheckpointError(
                f"statistics file does not belong to the merge {merged}: it was made with other options "
                f"({', '.join(differ) or 'unknown'})",
                stats_file,
            )
        if recorded.merged_sha256 and Path(merged).is_file() and model_hash(merged) != recorded.merged_sha256:
            raise CheckpointError(
                f"statistics file belongs to another version of {merged} (it records another SHA-256)", stats_file
            )
    finally:
        recorded.close()


def replay(
    recipe: Recipe,
    output: Path,
    recipe_dir: Path | None = None,
    progress: bool | None = None,
    *,
    recipe_file: Path | None = None,
    overwrite: bool = False,
) -> MergeReport:
    """Run a recipe again. With unchanged inputs the output is bit-identical to the original. Every input is
    verified by the SHA-256 of its content, hashed while the merge reads it; a mismatch publishes nothing."""
    built = Built({}) if recipe.method == "copy" else None
    plugin = None if built else registry.get(recipe.method)  # an unknown method is an error, never a default
    if plugin is not None and recipe.operation not in plugin.operations:
        raise RecipeError(f"a {recipe.method} recipe cannot have the operation {recipe.operation!r}")
    if not all(r.sha256 for r in recipe.models):
        log.warning("the recipe records no SHA-256 for some inputs: they cannot be verified")
    paths = [resolve_model(r, recipe_dir, verify=False) for r in recipe.models]
    out = OutputOptions(recipe.format, recipe.dtype, recipe.nan_policy, progress, overwrite=overwrite)
    out = replace(out, overflow=recipe.overflow)
    if built is None:
        try:
            built = plugin.build(recipe, BuildContext(output=Path(output), recipe_dir=recipe_dir))
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise RecipeError(f"recipe options do not fit {recipe.method}: {err!r}") from None
    if recipe_file is not None:
        built.inputs.append(Path(recipe_file))
    hashes = [r.sha256 for r in recipe.models]
    return _run(paths, output, built, recipe, out, expected_hashes=hashes)


# ---- helpers ---------------------------------------------------------------------------------------------
def _rule(rule: str) -> str:
    if rule not in COMPONENT_RULES:
        raise RecipeError(f"component rule must be one of {COMPONENT_RULES}, got {rule!r}")
    return rule


def _run(models, output, built: Built, recipe: Recipe, out: OutputOptions, expected_hashes=None) -> MergeReport:
    out = out.defaults_from(None)

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
        inputs=list(built.inputs),
        overwrite=out.overwrite,
        overflow=out.overflow,
        expected_hashes=expected_hashes,
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
    for i, ref in enumerate(recipe.models):
        if ref.absolute and ref.absolute == str(Path(text).resolve()):
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
