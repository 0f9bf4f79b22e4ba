"""TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge, tensor by tensor.

Per tensor (mergekit's reading): keep each task vector's top `density` fraction of entries by magnitude,
elect every entry's sign as the sign of the sum of the kept values, and average only the kept values that
agree with it. Where the kept values sum to exactly zero, no sign wins and the entry stays the base's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from featurefusion.io.recipe import Recipe
from featurefusion.merge.registry import BuildContext, Built, MergeMethodPlugin, option, per_component, register
from featurefusion.merge.task_vectors import TaskVectorMerge, check_density, check_scale


def keep_largest(delta: torch.Tensor, density: float) -> torch.Tensor:
    """`delta` with all but its `density` fraction of largest-magnitude entries set to zero."""
    if density >= 1.0:
        return delta
    k = int(density * delta.numel())
    flat = delta.flatten()
    kept = torch.zeros_like(flat)
    if k > 0:
        index = flat.abs().topk(k, sorted=False).indices
        kept[index] = flat[index]
    return kept.view_as(delta)


def elect_and_average(deltas: list[torch.Tensor]) -> torch.Tensor:
    """TIES' sign election and disjoint mean: per entry, the mean of the values whose sign is the sign of
    their sum (zeros, e.g. trimmed entries, never count)."""
    sign = torch.stack(deltas).sum(dim=0).sign() if len(deltas) > 1 else deltas[0].sign()
    total = torch.zeros_like(deltas[0])
    count = torch.zeros_like(deltas[0])
    for delta in deltas:
        agrees = (delta.sign() == sign) & (delta != 0)
        total += delta * agrees
        count += agrees
    return total / count.clamp_min(1.0)


@dataclass(frozen=True)
class TiesOptions:
    density: float = option(
        0.2, "share of each task vector's entries kept (TIES: the largest; DARE: at random)", type=float
    )
    scale: float = option(1.0, "multiplier of the (combined) task vectors: base + scale * combine(deltas)", type=float)

    def __post_init__(self):
        check_density(self.density)
        check_scale(self.scale)


@register
class Ties(MergeMethodPlugin):
    """Resolves interference between task vectors before adding them: small changes are trimmed away (each
    task vector keeps its top `density` share by magnitude), every parameter takes the sign that carries most
    mass, and the kept values that agree with it are averaged. With one specialist and density 1 it is task
    arithmetic."""

    name = "ties"
    order = 40
    Options = TiesOptions
    summary = "trim small changes, elect a sign per entry, average the agreeing task-vector values"
    source = "Yadav et al., TIES-Merging: Resolving Interference When Merging Models (NeurIPS 2023)"
    cost = "one pass; a top-k per tensor and model; memory of one module per model"
    search_space = {"density": (0.2, 0.5), "scale": (0.5, 1.0, 1.5)}

    def build(self, recipe: Recipe, context: BuildContext) -> Built:
        self.check_operation(recipe)
        options = self.options_of(recipe)

        def combine(key: str, deltas: list[torch.Tensor]) -> torch.Tensor:
            return elect_and_average([keep_largest(d, options.density) for d in deltas])

        return Built(per_component(recipe.components, TaskVectorMerge(self.name, options.scale, combine)))
