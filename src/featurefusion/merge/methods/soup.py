"""Diffusion Soup (Biggs et al.): a weighted average of the models' parameters.

The recipe records every member with its normalised weight, so replay, `add` and `remove` need no other
input. Adding and removing a model are weighted sums of two files (see `featurefusion.merge.soup`).
"""

from __future__ import annotations

from dataclasses import dataclass

from featurefusion.io.recipe import ModelRef, Recipe
from featurefusion.merge.registry import BuildContext, Built, MergeMethodPlugin, option, per_component, register
from featurefusion.merge.soup import WeightedSum, add_weights, normalised_weights, remove_weights


@dataclass(frozen=True)
class SoupOptions:
    weights: list[float] | None = option(
        None, "soup: one weight per model, normalised to sum 1 (default: uniform)", type=float, nargs="+"
    )


def members(models: list[ModelRef], weights: list[float]) -> list[dict]:
    """The recipe's record of a weighted sum: each input with the weight it entered with."""
    return [{"path": m.path, "sha256": m.sha256, "weight": w} for m, w in zip(models, weights, strict=True)]


@register
class Soup(MergeMethodPlugin):
    """The uniform soup averages every parameter of the N models; weights make it a weighted average. All
    models keep their share whatever a layer does, so each fine-tune's change reaches the merge at 1/N of its
    size. `soup --greedy` and `--reverse-greedy` choose the members by a metric on held-out prompts (paper
    §4.2); `add` and `remove` update a soup exactly without the other members' files."""

    name = "soup"
    order = 20
    Options = SoupOptions
    summary = "weighted average of all parameters (uniform by default)"
    source = "Diffusion Soup (Biggs et al., 2024), paper §4"
    cost = "one pass over the inputs; memory of one module per model"
    operations = ("merge", "soup-add", "soup-remove")

    def recipe_options(self, options: SoupOptions, models: list[ModelRef]) -> dict:
        return {"members": members(models, normalised_weights(options.weights, len(models)))}

    def options_of(self, recipe: Recipe) -> SoupOptions:
        return SoupOptions(weights=[m["weight"] for m in recipe.options["members"]])

    def build(self, recipe: Recipe, context: BuildContext) -> Built:
        self.check_operation(recipe, self.operations)
        # A merge records each member's weight; soup-add and soup-remove record the one number they used.
        if recipe.operation == "merge":
            weights = [m["weight"] for m in recipe.options["members"]]
        elif recipe.operation == "soup-add":
            weights = add_weights(recipe.options["weight"])
        else:
            weights = remove_weights(recipe.options["alpha"])
        return Built(per_component(recipe.components, WeightedSum(weights)))
