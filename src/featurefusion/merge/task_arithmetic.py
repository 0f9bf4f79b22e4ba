"""Task arithmetic (Ilharco et al., 2023), the simplest merge that keeps each fine-tune's whole change.

Each specialist's task vector is its difference from the base, tau_i = theta_i - theta_0, and the merge adds
them up with one scale: theta = theta_0 + lambda * sum_i tau_i. Written as a weighted sum of the models,
that is the base with weight 1 - k * lambda and each of the k specialists with weight lambda, so it runs on
the soup's streaming `WeightedSum`.

It is here as a reference point for FeatureFusion and the soups, not from the four papers: a uniform soup of
N models gives every task vector the weight 1/N, and task arithmetic shows what is kept when it does not.
With lambda = 1/N it is exactly the uniform soup.
"""

from __future__ import annotations

import math

from featurefusion.errors import RecipeError

DEFAULT_SCALE = 0.5


def task_arithmetic_weights(count: int, scale: float = DEFAULT_SCALE) -> list[float]:
    """Weights of (base, specialist 1, ..., specialist k) for theta_0 + scale * sum_i (theta_i - theta_0)."""
    if count < 2:
        raise RecipeError(f"task arithmetic needs a base and at least one specialist, got {count} models")
    if not math.isfinite(scale) or scale <= 0:
        raise RecipeError(f"the task-arithmetic scale must be a positive number, got {scale}")
    return [1.0 - (count - 1) * scale] + [scale] * (count - 1)
