"""DARE (Yu et al., ICML 2024): drop task-vector entries at random and rescale the rest, then add them up
(`dare`) or merge them with TIES' sign election (`dare-ties`).

Each entry of each task vector survives with probability `density` and is then divided by `density`, so the
expected task vector is unchanged. The draw is seeded per (seed, tensor, model), so a merge replays bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from featurefusion.io.recipe import Recipe
from featurefusion.merge.methods.ties import elect_and_average
from featurefusion.merge.registry import BuildContext, Built, MergeMethodPlugin, option, per_component, register
from featurefusion.merge.task_vectors import TaskVectorMerge, check_density, check_scale, tensor_seed


def drop_and_rescale(delta: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    if density >= 1.0:
        return delta
    kept = torch.rand(delta.shape, generator=torch.Generator().manual_seed(seed)) < density
    return delta * kept / density


@dataclass(frozen=True)
class DareOptions:
    density: float = option(
        0.2, "share of each task vector's entries kept (TIES: the largest; DARE: at random)", type=float
    )
    scale: float = option(1.0, "multiplier of the (combined) task vectors: base + scale * combine(deltas)", type=float)
    seed: int = option(0, "seed of the random draws (FeatureFusion sampled mode, DARE)", type=int)

    def __post_init__(self):
        check_density(self.density)
        check_scale(self.scale)


class _Dare(MergeMethodPlugin):
    Options = DareOptions
    cost = "one pass; a random mask per tensor and model; memory of one module per model"
    source = "Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous Models (ICML 2024)"
    search_space = {"density": (0.2, 0.5), "scale": (0.5, 1.0)}
    elect_sign = False

    def build(self, recipe: Recipe, context: BuildContext) -> Built:
        self.check_operation(recipe)
        options = self.options_of(recipe)

        def combine(key: str, deltas: list[torch.Tensor]) -> torch.Tensor:
            dropped = [
                drop_and_rescale(d, options.density, tensor_seed(options.seed, key, m)) for m, d in enumerate(deltas)
            ]
            return elect_and_average(dropped) if self.elect_sign else torch.stack(dropped).sum(dim=0)

        return Built(per_component(recipe.components, TaskVectorMerge(self.name, options.scale, combine)))


@register
class Dare(_Dare):
    """Keeps each task-vector entry with probability `density` and scales the survivors by 1/density, then
    adds the sparsified task vectors to the base like task arithmetic. Fine-tuning changes are redundant
    enough that most can be dropped, and sparse task vectors collide less. With density 1 it is task
    arithmetic."""

    name = "dare"
    order = 50
    summary = "drop task-vector entries at random, rescale by 1/density, add them up"


@register
class DareTies(_Dare):
    """DARE's random drop and rescale, then TIES' sign election and disjoint mean instead of a sum."""

    name = "dare-ties"
    order = 51
    summary = "DARE's random drop, then TIES' sign election and disjoint mean"
    elect_sign = True
