"""FIDt (DMM paper §4.1): how well a student matches each teacher's distribution.

`M[i][j] = FID(student with style i, teacher j)`, FIDt = trace(M). The reference `M_ref[i][j]` compares two
batches of the teachers' own samples drawn with different seeds, `FID(teacher i seed b, teacher j seed a)`;
its trace is what a perfect student would reach at this sample size. Students are sampled with seed b, like
the reference's first batch, so both matrices compare images of different noise against the same teacher set.

The feature space is a torchmetrics `FrechetInceptionDistance`: the built-in world's scorer features
(`scorer_metric`), or Inception features for real models (`inception_metric`, needs torch-fidelity).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from featurefusion.evaluate.metrics import fid_columns


@dataclass
class FIDtResult:
    names: list[str]
    matrix: list[list[float]]  # [student style i][teacher j]
    reference: list[list[float]]  # [teacher i, seed b][teacher j, seed a]

    @property
    def fidt(self) -> float:
        return sum(self.matrix[i][i] for i in range(len(self.names)))

    @property
    def reference_fidt(self) -> float:
        return sum(self.reference[i][i] for i in range(len(self.names)))

    def diagonal(self) -> dict[str, float]:
        return {n: self.matrix[i][i] for i, n in enumerate(self.names)}

    def reference_diagonal(self) -> dict[str, float]:
        return {n: self.reference[i][i] for i, n in enumerate(self.names)}

    def as_dict(self) -> dict:
        return {"styles": self.names, "matrix": self.matrix, "reference": self.reference, "fidt": self.fidt,
                "reference_fidt": self.reference_fidt}  # fmt: skip


def fid_matrix(metric_factory: Callable, rows: list[torch.Tensor], columns: list[torch.Tensor]) -> list[list[float]]:
    """`M[i][j] = FID(rows[i], columns[j])`."""
    by_column = [fid_columns(metric_factory(), rows, col) for col in columns]
    return [[by_column[j][i] for j in range(len(columns))] for i in range(len(rows))]


def compute_fidt(
    names: list[str],
    student_sets: list[torch.Tensor],
    teacher_sets_a: list[torch.Tensor],
    teacher_sets_b: list[torch.Tensor],
    metric_factory: Callable,
) -> FIDtResult:
    if not len(names) == len(student_sets) == len(teacher_sets_a) == len(teacher_sets_b):
        raise ValueError("one student set and two teacher sets per style")
    return FIDtResult(
        names,
        fid_matrix(metric_factory, student_sets, teacher_sets_a),
        fid_matrix(metric_factory, teacher_sets_b, teacher_sets_a),
    )


def scorer_metric(scorer) -> Callable:
    """FID in the built-in world's scorer feature space (as the demo's FID)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from featurefusion.toyworld.scorer import _FeatureExtractor

    return lambda: FrechetInceptionDistance(feature=_FeatureExtractor(scorer), normalize=True)


def inception_metric(feature: int = 2048) -> Callable:
    """FID with Inception features (images as floats in [0, 1]; torchmetrics resizes them)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return lambda: FrechetInceptionDistance(feature=feature, normalize=True)
