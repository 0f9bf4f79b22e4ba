"""TSV-Merge (Gargiulo et al., CVPR 2025): merge task vectors in the span of their top singular vectors, made
orthogonal so that tasks stop interfering.

Per weight matrix (conv kernels flattened to [out, in*k*k]): each of the T task vectors keeps its top rank/T
singular triplets; the kept left vectors of all tasks are concatenated and replaced by the nearest orthogonal
matrix (the orthogonal factor of their SVD, Procrustes), the right vectors likewise, and the matrix is
reassembled with the kept singular values. Tensors that are not matrices (biases, norms) get the mean task
vector. Task vectors whose singular subspaces are already orthogonal come back as their plain sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from featurefusion.io.recipe import Recipe
from featurefusion.merge.registry import BuildContext, Built, MergeMethodPlugin, option, per_component, register
from featurefusion.merge.task_vectors import TaskVectorMerge, as_matrix, check_scale


def nearest_orthogonal(matrix: torch.Tensor) -> torch.Tensor:
    """The matrix with orthonormal columns (or rows, if wide) closest to `matrix` in Frobenius norm."""
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def tsv_combine(deltas: list[torch.Tensor]) -> torch.Tensor:
    matrices = [as_matrix(d) for d in deltas]
    if matrices[0] is None:
        return torch.stack(deltas).mean(dim=0)
    rank = min(matrices[0].shape)
    keep = max(1, rank // len(matrices))
    lefts, values, rights = [], [], []
    for matrix in matrices:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        lefts.append(u[:, :keep])
        values.append(s[:keep])
        rights.append(vh[:keep])
    u = nearest_orthogonal(torch.cat(lefts, dim=1))
    vh = nearest_orthogonal(torch.cat(rights, dim=0))
    return ((u * torch.cat(values)) @ vh).reshape(deltas[0].shape)


@dataclass(frozen=True)
class TsvOptions:
    scale: float = option(1.0, "multiplier of the (combined) task vectors: base + scale * combine(deltas)", type=float)

    def __post_init__(self):
        check_scale(self.scale)


@register
class TaskSingularVectors(MergeMethodPlugin):
    """Task Singular Vectors merge: every task vector is cut to its top rank/T singular directions (a
    low-rank sketch that keeps most of its effect), and the directions of all tasks are made orthogonal to
    each other before the sketches are added, which removes the overlap through which tasks interfere.
    Biases and norms get the mean task vector."""

    name = "tsv"
    order = 60
    Options = TsvOptions
    summary = "each task vector's top rank/T singular directions, orthogonalised across tasks, summed"
    source = "Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging (CVPR 2025)"
    cost = "T + 2 SVDs per weight matrix (seconds per SD layer on a CPU); memory of one module per model"
    search_space = {"scale": (0.5, 1.0, 1.5)}

    def build(self, recipe: Recipe, context: BuildContext) -> Built:
        self.check_operation(recipe)
        options = self.options_of(recipe)
        merge = TaskVectorMerge(self.name, options.scale, lambda key, deltas: tsv_combine(deltas))
        return Built(per_component(recipe.components, merge))
