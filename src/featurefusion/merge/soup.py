"""Diffusion Soup (Biggs et al., paper §4–5): weighted averages of parameters, and their exact updates.

- `WeightedSum(alphas)`: theta = sum_i alpha_i theta_i. Uniform soup is alphas = 1/N.
- Adding a model to a soup of weight 1 - beta:      theta' = (1 - beta) theta + beta theta_new.
- Removing model j that entered with weight alpha_j: theta' = (theta - alpha_j theta_j) / (1 - alpha_j).
All three are weighted sums of (soup, model) tensors; removal just has a negative weight on the model.
"""

from __future__ import annotations

import math

import torch

from featurefusion.errors import RecipeError
from featurefusion.merge.base import ModuleTensors


class WeightedSum:
    name = "weighted-sum"
    reads_all_models = True
    propagates_non_finite = True  # w * NaN, w * Inf (NaN when w = 0) and Inf - Inf are all non-finite

    def __init__(self, weights: list[float], min_models: int = 2):
        if len(weights) < min_models:
            raise RecipeError(f"a soup needs at least {min_models} models, got {len(weights)}")
        self.weights = [float(w) for w in weights]
        self.min_models = min_models

    def merge_module(self, module: str, tensors: ModuleTensors) -> dict[str, torch.Tensor]:
        return {suffix: weighted_sum(values, self.weights) for suffix, values in tensors.items()}

    def linear_weights(self, module: str, suffix: str) -> list[float]:
        return self.weights

    def finish(self) -> None:
        pass


def weighted_sum(values: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i w_i values_i in float32."""
    acc = values[0].to(torch.float32, copy=True).mul_(weights[0])
    for w, value in zip(weights[1:], values[1:], strict=True):
        acc.add_(value, alpha=w)  # fp16/bf16 inputs are widened inside the kernel, not copied
    return acc


def normalised_weights(weights: list[float] | None, count: int) -> list[float]:
    """Soup coefficients that sum to one; uniform when none are given."""
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise RecipeError(f"{len(weights)} soup weights given for {count} models")
    weights = [float(w) for w in weights]
    try:
        total = math.fsum(weights) if all(math.isfinite(w) for w in weights) else math.nan
    except OverflowError:
        total = math.inf
    # 1e308 + 1e308 overflows to Inf, and w / Inf = 0 would write an all-zero model.
    if not math.isfinite(total) or any(w < 0 for w in weights) or total <= 0:
        raise RecipeError(f"soup weights must be finite and non-negative, with a finite positive sum; got {weights}")
    return [w / total for w in weights]


def add_weights(beta: float) -> list[float]:
    if not 0.0 < beta < 1.0:
        raise RecipeError(f"the weight of an added model must lie in (0, 1), got {beta}")
    return [1.0 - beta, beta]


def remove_weights(alpha: float) -> list[float]:
    if not 0.0 < alpha < 1.0:
        raise RecipeError(f"cannot remove a model whose soup weight is {alpha}: it must lie in (0, 1)")
    return [1.0 / (1.0 - alpha), -alpha / (1.0 - alpha)]
