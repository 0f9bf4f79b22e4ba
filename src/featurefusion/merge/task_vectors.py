"""Task-vector merges: combine the specialists' differences from the base, one tensor at a time.

For every tensor, delta_m = theta_m - theta_0 for each specialist m, and the merged tensor is
theta_0 + scale * combine(deltas). A method only writes `combine`; the engine streams, casts and checks as for
any other method. TIES, DARE, TSV-Merge and Iso-C/Iso-CTS are all of this form.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import torch

from featurefusion.errors import RecipeError
from featurefusion.merge.base import ModuleTensors

Combine = Callable[[str, list[torch.Tensor]], torch.Tensor]


class TaskVectorMerge:
    reads_all_models = True
    propagates_non_finite = False  # trimming or dropping entries can hide a NaN: inputs are checked instead
    min_models = 2

    def __init__(self, name: str, scale: float, combine: Combine):
        self.name, self.scale, self.combine = name, scale, combine

    def merge_module(self, module: str, tensors: ModuleTensors) -> dict[str, torch.Tensor]:
        out = {}
        for suffix, values in tensors.items():
            base = values[0].float()
            deltas = [value.float() - base for value in values[1:]]
            out[suffix] = torch.add(base, self.combine(f"{module}.{suffix}", deltas), alpha=self.scale)
        return out

    def finish(self) -> None:
        pass


def as_matrix(tensor: torch.Tensor) -> torch.Tensor | None:
    """A weight as the matrix it multiplies with: linear [out, in] as is, conv [out, in, k, k] flattened to
    [out, in*k*k]. None for vectors (biases, norms) and scalars."""
    if tensor.ndim == 2:
        return tensor
    if tensor.ndim == 4:
        return tensor.reshape(tensor.shape[0], -1)
    return None


def check_scale(scale: float) -> None:
    if not math.isfinite(scale) or scale <= 0:
        raise RecipeError(f"the scale must be a positive number, got {scale}")


def check_density(density: float) -> None:
    if not (0.0 < density <= 1.0):
        raise RecipeError(f"the density (share of each task vector kept) must lie in (0, 1], got {density}")


def tensor_seed(seed: int, key: str, model: int) -> int:
    """A seed of its own for every (tensor, model): results do not depend on the order tensors are merged in."""
    return (seed * 1_000_003 + zlib.crc32(f"{key}#{model}".encode())) % (2**63)
