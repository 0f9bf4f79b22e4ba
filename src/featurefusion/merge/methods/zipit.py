"""ZipIt! as a registered method: the glue between the registry's streaming engine and
`featurefusion.merge.zipit`, which needs whole models and sample inputs.

The engine walks the output key by key; ZipIt! cannot, since each layer's merge depends on the features of the
layers before it. So the method does all its work in `prepare`, which the engine calls once with every input
opened: it loads each model's UNet (config from the first model's pipeline folder, or `--pipeline`), makes the sample
inputs from the data source the options name, zips, and then hands the engine the merged tensors module by
module. Text encoder and VAE follow the component rules (copied from the base, or averaged).

The recipe records every option, the sample data source and its fingerprint, so replay makes the same inputs,
the same statistics and the same matching: bit-identical output (on the same machine and thread count; the
matching breaks no ties differently, but float sums of another thread count may differ in the last bit).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from featurefusion.errors import CheckpointError, RecipeError
from featurefusion.io.checkpoint import Checkpoint
from featurefusion.io.recipe import ModelRef, Recipe
from featurefusion.merge.base import ModuleTensors
from featurefusion.merge.registry import BuildContext, Built, MergeMethodPlugin, option, per_component, register
from featurefusion.merge.soup import WeightedSum
from featurefusion.merge.zipit import (
    ZipItOptions,
    apply_plan,
    collect_statistics,
    describe_models,
    match_spaces,
)
from featurefusion.merge.zipit_inputs import fingerprint, sample_inputs

log = logging.getLogger(__name__)

# Statistics kept between merges while `reuse_statistics()` is active (the demo's search over budget and depth
# records features once); None otherwise, so a large merge frees them as soon as they are used.
_STATISTICS_CACHE: dict | None = None


@contextlib.contextmanager
def reuse_statistics():
    """Within this block, ZipIt! merges of the same models and sample inputs record features only once."""
    global _STATISTICS_CACHE
    previous, _STATISTICS_CACHE = _STATISTICS_CACHE, {}
    try:
        yield
    finally:
        _STATISTICS_CACHE = previous


@dataclass(frozen=True)
class ZipItMergeOptions(ZipItOptions):
    sample_data: str | None = option(
        None,
        "ZipIt!: sample inputs, 'toyworld' (the built-in world's broad data) or a captioned image folder",
        type=str,
    )
    sample_count: int = option(128, "ZipIt!: sample images taken from the sample data", type=int)
    pipeline: str | None = option(
        None,
        "ZipIt!: diffusers pipeline folder with the UNet config, tokenizer and scheduler, when the base is a "
        "single file (default: the base itself)",
        type=str,
    )
    seed: int = option(0, "seed of the random draws (FeatureFusion sampled mode, DARE, ZipIt! inputs)", type=int)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.sample_count, bool) or not isinstance(self.sample_count, int) or self.sample_count < 1:
            raise RecipeError(f"ZipIt! option: sample_count must be a positive whole number, got {self.sample_count!r}")

    def matching(self) -> ZipItOptions:
        return ZipItOptions(budget=self.budget, repeat=self.repeat, depth=self.depth, positions=self.positions)


@register
class ZipIt(MergeMethodPlugin):
    """Runs every model on the same noisy sample inputs, records the features of each U-Net layer with forward
    hooks, and merges features greedily by correlation, within one model as well as across models, until the
    merged layer has the original width; each merged layer is the merge of the space it writes times the unmerge
    of the space it reads. Residual streams share one merge, skip concatenations are unmerged part by part,
    attention heads are matched whole, cross-attention keys and values read the shared text embedding unmerged.
    Partial zips match only the first blocks and average the rest neuron by neuron. Fine-tunes of one base are
    already aligned, so on them ZipIt! pairs same-index neurons and comes out close to a uniform soup. See
    docs/zipit.md."""

    name = "zipit"
    title = "ZipIt!"
    order = 90
    Options = ZipItMergeOptions
    summary = "features matched by correlation on sample inputs, within and across models (whole U-Nets)"
    source = "Stoica et al., ZipIt! Merging Models from Different Tasks without Training (2023); FeatureFusion §3.1"
    cost = (
        "all models in memory, N forward passes per sample batch, one [N·n, N·n] co-moment per feature space "
        "(two SD 1.5 U-Nets: 12.8 GiB)"
    )
    search_space = {"budget": (0.0, 0.125, 0.5), "depth": (None, 3)}

    def search_context(self):
        return reuse_statistics()

    def recipe_options(self, options: ZipItMergeOptions, models: list[ModelRef]) -> dict:
        if options.sample_data is None:
            raise RecipeError("ZipIt! needs sample inputs: --sample-data toyworld or --sample-data FOLDER")
        data = fingerprint(options.sample_data, options.sample_count, options.seed)
        return {**asdict(options), "sample_data_sha256": data}

    def build(self, recipe: Recipe, context: BuildContext) -> Built:
        self.check_operation(recipe)
        options = self.options_of(recipe)
        if options.sample_data is None:
            raise RecipeError("ZipIt! needs sample inputs: --sample-data toyworld or --sample-data FOLDER")
        recorded = recipe.options.get("sample_data_sha256")
        if recorded is not None and fingerprint(options.sample_data, options.sample_count, options.seed,
                                                context.recipe_dir) != recorded:  # fmt: skip
            raise RecipeError(f"the ZipIt! sample data {options.sample_data} is not the one the recipe was made with")
        method = ZipItMerge(options, [r.sha256 for r in recipe.models], context.recipe_dir)
        count = len(recipe.models)
        return Built(per_component(recipe.components, method, WeightedSum([1.0 / count] * count)))


class ZipItMerge:
    """The engine's side: zip everything in `prepare`, then serve the merged tensors module by module."""

    name = "zipit"
    min_models = 2
    reads_all_models = True
    propagates_non_finite = False  # inputs are checked (and every tensor again when the U-Nets are loaded)

    def __init__(self, options: ZipItMergeOptions, model_hashes: list[str], recipe_dir: Path | None = None):
        self.options = options
        self.model_hashes = model_hashes
        self.recipe_dir = recipe_dir
        self.merged: dict[str, torch.Tensor] | None = None

    def prepare(self, models: list[Checkpoint]) -> None:
        config_folder = Path(self.options.pipeline) if self.options.pipeline else models[0].path
        unets = [load_unet(config_folder, checkpoint) for checkpoint in models]
        options = self.options.matching()
        graph = describe_models(unets, options)
        key = (tuple(self.model_hashes), self.options.sample_data, self.options.sample_count, self.options.seed,
               self.options.positions)  # fmt: skip
        cache = _STATISTICS_CACHE
        if cache is not None and key in cache:
            stats = cache[key]
        else:
            o = self.options
            pipeline = Path(o.pipeline) if o.pipeline else None
            inputs = sample_inputs(o.sample_data, models[0].path, pipeline, o.sample_count, o.seed, self.recipe_dir)
            # With a cache every space is recorded, so that any depth can be matched from it later.
            wanted = graph.matched_spaces(None if cache is not None else options.depth)
            stats = collect_statistics(unets, graph, inputs, {s.name for s in wanted}, options.positions)
            if cache is not None:
                cache.clear()  # one set of statistics at a time
                cache[key] = stats
        plan = match_spaces(graph, stats, len(unets), options, release=cache is None)
        summary = plan.summary()
        log.info(
            "ZipIt!: %d merged features, %.1f%% across models, %.1f%% within one model, %.1f%% same index",
            summary["merged_features"],
            100 * summary["cross_model"],
            100 * summary["within_model"],
            100 * summary["same_index"],
        )
        self.merged = apply_plan(plan, [u.state_dict() for u in unets], dtype=torch.float32)

    def merge_module(self, module: str, tensors: ModuleTensors) -> dict[str, torch.Tensor]:
        if self.merged is None:
            raise RuntimeError("ZipIt! was not prepared")
        key = module.removeprefix("unet.")
        return {suffix: self.merged[f"{key}.{suffix}"] for suffix in tensors}

    def finish(self) -> None:
        self.merged = None


def load_unet(pipeline: Path, checkpoint: Checkpoint):
    """`checkpoint`'s UNet weights (float32) in a diffusers UNet built from the pipeline folder's UNet config."""
    from diffusers import UNet2DConditionModel

    config_folder = Path(pipeline) / "unet"
    if not (config_folder / "config.json").is_file():
        raise CheckpointError(
            "ZipIt! runs the models and needs their UNet config: make the first model a diffusers pipeline folder "
            "or give one with --pipeline",
            pipeline,
        )
    config = UNet2DConditionModel.load_config(config_folder)
    state = {}
    for key in checkpoint.keys("unet"):
        tensor = checkpoint.read(key).float()
        if not torch.isfinite(tensor).all():
            raise CheckpointError("tensor holds NaN or Inf", checkpoint.source_file(key), key)
        state[key.removeprefix("unet.")] = tensor
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    try:
        unet.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"UNet weights do not fit the base's UNet config ({err})", checkpoint.path) from None
    return unet.eval()
