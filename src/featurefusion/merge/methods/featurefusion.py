"""FeatureFusion as a registered method: the glue between the registry and `featurefusion.merge.featurefusion`.

A merge records its options; an unlearning (`featurefusion remove`) records which model it dropped and the
statistics file it read, so both replay from the recipe alone.
"""

from __future__ import annotations

from featurefusion.io.recipe import ModelRef, Recipe, resolve_model
from featurefusion.merge.featurefusion import FeatureFusion, StatisticsSidecar
from featurefusion.merge.featurefusion_math import FeatureFusionOptions
from featurefusion.merge.registry import BuildContext, Built, MergeMethodPlugin, per_component, register
from featurefusion.merge.soup import WeightedSum


@register
class FeatureFusionMethod(MergeMethodPlugin):
    """For every linear and conv layer, each base neuron becomes a convex blend of the neurons of all models
    that correlate with it (Pearson |P| above the threshold), each rescaled to the base neuron's scale; the
    correlations come in closed form from the weights (exact mode) or from random inputs (the paper's sampled
    mode). Norm layers are averaged. The statistics stored beside the output let `remove` take a model out
    again without its file (unlearning, paper §5.2.3). See docs/featurefusion.md for the maths and every
    decision the paper leaves open."""

    name = "featurefusion"
    title = "FeatureFusion"
    order = 10
    Options = FeatureFusionOptions
    summary = "correlation-weighted convex blend of neurons, per linear/conv layer"
    source = "FeatureFusion: Merging Diffusion Models Through Representation Correlations, §4"
    cost = "matrix products of [N·n, d] per layer; memory of one layer of every model"
    operations = ("merge", "unlearn")
    search_space = {"threshold": (0.6, 0.7, 0.8)}

    def build(self, recipe: Recipe, context: BuildContext) -> Built:
        from featurefusion.merge.operations import statistics_path

        self.check_operation(recipe, self.operations)
        options = self.options_of(recipe)
        built = Built({})
        sidecar = None
        save = context.save_statistics and recipe.options.get("keep_statistics", True) is not False
        if save and context.output is not None:
            hashes = [r.sha256 for r in recipe.models]
            sidecar = StatisticsSidecar.create(statistics_path(context.output), options, hashes)
            built.side_files.append(sidecar)
        if recipe.operation == "merge":
            method = FeatureFusion(options, record=sidecar)
        else:
            stats = recipe.options["statistics"]
            ref = ModelRef(stats["path"], stats["sha256"], stats.get("absolute", ""))
            path = resolve_model(ref, context.recipe_dir)
            replay = StatisticsSidecar.open(path)
            built.cleanup.append(replay.close)
            built.inputs.append(path)
            method = FeatureFusion(options, record=sidecar, replay=replay, dropped_model=stats["dropped_index"])
        count = len(recipe.models)
        built.methods = per_component(recipe.components, method, WeightedSum([1.0 / count] * count))
        built.planned_options = method.planned_options
        return built
