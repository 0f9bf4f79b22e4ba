"""Isotropic merging (Marczak et al., ICML 2025): Iso-C and Iso-CTS.

Iso-C: per weight matrix, the sum of the task vectors with its singular values all replaced by their mean,
so no few dominant directions of the sum drown out the rest. Iso-CTS: the top `common_fraction` of the
directions of that sum (the common subspace) plus, for each task, the top directions of what its task vector
has outside it (task-specific subspaces); both bases made orthogonal, and every direction given the mean
singular value. Tensors that are not matrices (biases, norms) get the mean task vector, as in the authors' code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from featurefusion.errors import RecipeError
from featurefusion.io.recipe import Recipe
from featurefusion.merge.methods.tsv import nearest_orthogonal
from featurefusion.merge.registry import BuildContext, Built, MergeMethodPlugin, option, per_component, register
from featurefusion.merge.task_vectors import TaskVectorMerge, as_matrix, check_scale


def iso_c_combine(deltas: list[torch.Tensor]) -> torch.Tensor:
    total = as_matrix(torch.stack(deltas).sum(dim=0))
    if total is None:
        return torch.stack(deltas).mean(dim=0)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    return (s.mean() * (u @ vh)).reshape(deltas[0].shape)


def iso_cts_combine(deltas: list[torch.Tensor], common_fraction: float) -> torch.Tensor:
    matrices = [as_matrix(d) for d in deltas]
    if matrices[0] is None:
        return torch.stack(deltas).mean(dim=0)
    tasks, rank = len(matrices), min(matrices[0].shape)
    # The task-specific part is split evenly between tasks, rounded to a whole number of directions each;
    # the common part takes the rest (as the authors size them).
    per_task = round((rank - int(rank * common_fraction)) / tasks)
    common = rank - per_task * tasks
    u, s, vh = torch.linalg.svd(torch.stack(matrices).sum(dim=0), full_matrices=False)
    lefts, values, rights = [u[:, :common]], [s[:common]], [vh[:common]]
    if per_task:
        projector = lefts[0] @ lefts[0].T
        for matrix in matrices:
            tu, ts, tvh = torch.linalg.svd(matrix - projector @ matrix, full_matrices=False)
            lefts.append(tu[:, :per_task])
            values.append(ts[:per_task])
            rights.append(tvh[:per_task])
    u = nearest_orthogonal(torch.cat(lefts, dim=1))
    vh = nearest_orthogonal(torch.cat(rights, dim=0))
    return (torch.cat(values).mean() * (u @ vh)).reshape(deltas[0].shape)


@dataclass(frozen=True)
class IsoCOptions:
    scale: float = option(1.0, "multiplier of the (combined) task vectors: base + scale * combine(deltas)", type=float)

    def __post_init__(self):
        check_scale(self.scale)


@dataclass(frozen=True)
class IsoCtsOptions:
    scale: float = option(1.0, "multiplier of the (combined) task vectors: base + scale * combine(deltas)", type=float)
    common_fraction: float = option(
        0.8, "iso-cts: share of the directions taken from the sum of task vectors", type=float
    )

    def __post_init__(self):
        check_scale(self.scale)
        if not 0.0 < self.common_fraction <= 1.0:
            raise RecipeError(f"common_fraction must lie in (0, 1], got {self.common_fraction}")


@register
class IsoC(MergeMethodPlugin):
    """Task arithmetic's sum with a flat spectrum: per weight matrix, the summed task vectors keep their
    singular directions but every singular value becomes their mean, so the few directions that dominate
    the sum (shared by many tasks) stop drowning out the directions only one task uses."""

    name = "iso-c"
    order = 70
    Options = IsoCOptions
    summary = "sum of task vectors with its singular values flattened to their mean"
    source = "Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces (ICML 2025)"  # noqa: E501
    cost = "one SVD per weight matrix; memory of one module per model"
    search_space = {"scale": (0.5, 1.0, 1.5)}

    def build(self, recipe: Recipe, context: BuildContext) -> Built:
        self.check_operation(recipe)
        options = self.options_of(recipe)
        merge = TaskVectorMerge(self.name, options.scale, lambda key, deltas: iso_c_combine(deltas))
        return Built(per_component(recipe.components, merge))


@register
class IsoCts(MergeMethodPlugin):
    """Iso-C with room for every task: the weakest directions of the summed task vectors are replaced by each
    task's strongest directions outside the common subspace, the combined bases are made orthogonal, and all
    directions get the same (mean) singular value."""

    name = "iso-cts"
    order = 71
    Options = IsoCtsOptions
    summary = "Iso-C on the common subspace plus each task's own directions"
    source = IsoC.source
    cost = "T + 3 SVDs per weight matrix; memory of one module per model"
    search_space = {"scale": (0.5, 1.0, 1.5)}

    def build(self, recipe: Recipe, context: BuildContext) -> Built:
        self.check_operation(recipe)
        options = self.options_of(recipe)
        fraction = options.common_fraction
        merge = TaskVectorMerge(self.name, options.scale, lambda key, deltas: iso_cts_combine(deltas, fraction))
        return Built(per_component(recipe.components, merge))
