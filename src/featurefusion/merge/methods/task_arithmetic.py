"""Task arithmetic (Ilharco et al., 2023), the simplest merge that keeps each fine-tune's whole change.

Each specialist's task vector is its difference from the base, tau_i = theta_i - theta_0, and the merge adds
them up with one scale: theta = theta_0 + lambda * sum_i tau_i. Written as a weighted sum of the models, that
is the base with weight 1 - k * lambda and each of the k specialists with weight lambda, so it runs on the
soup's streaming `WeightedSum`. With lambda = 1/N it is exactly the uniform soup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from featurefusion.errors import RecipeError
from featurefusion.io.recipe import ModelRef, Recipe
from featurefusion.merge.methods.soup import members
from featurefusion.merge.registry import BuildContext, Built, MergeMethodPlugin, option, per_component, register
from featurefusion.merge.soup import WeightedSum


@dataclass(frozen=True)
class TaskArithmeticOptions:
    scale: float = option(0.5, "multiplier of the (combined) task vectors: base + scale * combine(deltas)", type=float)

    def __post_init__(self):
        if not math.isfinite(self.scale) or self.scale <= 0:
            raise RecipeError(f"the scale must be a positive number, got {self.scale}")


def task_arithmetic_weights(count: int, scale: float) -> list[float]:
    """Weights of (base, specialist 1, ..., specialist k) for theta_0 + scale * sum_i (theta_i - theta_0)."""
    if count < 2:
        raise RecipeError(f"task arithmetic needs a base and at least one specialist, got {count} models")
    return [1.0 - (count - 1) * scale] + [scale] * (count - 1)


@register
class TaskArithmetic(MergeMethodPlugin):
    """Adds every specialist's task vector (its difference from the base) to the base, each with the same
    scale, instead of averaging the models. Not one of the four papers' methods: it is the reference point
    for what averaging loses, and the base of TIES, DARE, TSV and Iso-C. Scale 1/N is the uniform soup."""

    name = "task-arithmetic"
    order = 30
    Options = TaskArithmeticOptions
    summary = "base + scale × Σ (specialist − base)"
    source = "Ilharco et al., Editing Models with Task Arithmetic (ICLR 2023)"
    cost = "one pass over the inputs, like a soup"
    search_space = {"scale": (0.2, 0.3, 0.5, 1.0)}

    def recipe_options(self, options: TaskArithmeticOptions, models: list[ModelRef]) -> dict:
        weights = task_arithmetic_weights(len(models), options.scale)
        return {"scale": options.scale, "members": members(models, weights)}

    def build(self, recipe: Recipe, context: BuildContext) -> Built:
        self.check_operation(recipe)
        weights = [m["weight"] for m in recipe.options["members"]]
        return Built(per_component(recipe.components, WeightedSum(weights)))
