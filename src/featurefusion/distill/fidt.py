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
from pathlib import Path

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


# ---- FIDt of a saved student: sample it and its teachers -------------------------------------------------
@dataclass(frozen=True)
class FIDtSampling:
    prompts: list[str]
    steps: int = 20
    guidance: float = 3.0
    seeds: tuple[int, int] = (1000, 1001)  # teachers' batches a and b; the student samples with b
    precision: str = "fp32"  # "bf16": built-in world students and teachers sample under bfloat16 autocast


def teacher_paths(student_folder: Path, meta: dict) -> list[tuple[str, Path]]:
    """Each recorded teacher (found from the student's folder, else by its path as given), checked by SHA-256."""
    from featurefusion.distill.backbone import DistillError
    from featurefusion.distill.store import locate_teacher
    from featurefusion.io.recipe import model_hash

    found = []
    for teacher in meta.get("teachers", []):
        path = locate_teacher(student_folder, teacher)
        if path is None:
            raise DistillError(f"teacher {teacher['name']!r} not found at its recorded path {teacher['path']}",
                               student_folder)  # fmt: skip
        if teacher.get("sha256") and model_hash(path) != teacher["sha256"]:
            raise DistillError(f"teacher {teacher['name']!r}: SHA-256 differs from the one the student was trained "
                               "with", path)  # fmt: skip
        found.append((teacher["name"], path))
    return found


def sample_sets(student_folder: str | Path, sampling: FIDtSampling):
    """(names, student sets, teacher sets a, teacher sets b): each style of the student and each teacher
    sampled on the prompts. Built-in world students give images in [-1, 1] (the scorer's input), Stable
    Diffusion ones in [0, 1] (what Inception FID takes)."""
    from featurefusion.distill.store import read_meta

    student_folder = Path(student_folder)
    meta = read_meta(student_folder)
    teachers = teacher_paths(student_folder, meta)
    if not (student_folder / "vae").is_dir():
        return toy_sets(student_folder, teachers, sampling)
    return _sd_sets(student_folder, teachers, sampling)


def toy_sets(folder: Path, teachers: list[tuple[str, Path]], sampling: FIDtSampling):
    """`sample_sets` for a built-in world student; `teachers` are (style, pipeline folder or UNet file)."""
    from featurefusion.distill.toy_sampling import load_toy_student
    from featurefusion.toyworld.models import load_pipeline

    student = load_toy_student(folder)
    n = len(sampling.prompts)

    def draw(pipe, seed, styles=None):
        extra = {} if styles is None else {"styles": styles}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=sampling.precision == "bf16"):
            return pipe(sampling.prompts, steps=sampling.steps, guidance_scale=sampling.guidance, seed=seed, **extra)

    names, students, teachers_a, teachers_b = [], [], [], []
    for name, path in teachers:
        teacher = load_pipeline(path) if path.is_dir() else load_pipeline(folder, path)
        names.append(name)
        teachers_a.append(draw(teacher, sampling.seeds[0]).float())
        teachers_b.append(draw(teacher, sampling.seeds[1]).float())
        students.append(draw(student, sampling.seeds[1], [name] * n).float())
    return names, students, teachers_a, teachers_b


def _sd_sets(folder: Path, teachers, sampling: FIDtSampling):
    from featurefusion.distill.export import fold_into_pipeline_unet
    from featurefusion.evaluate.sampling import load_pipeline, load_weights_into

    def draw(pipe, seed):
        generators = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(len(sampling.prompts))]
        with torch.no_grad():
            out = pipe(sampling.prompts, num_inference_steps=sampling.steps, guidance_scale=sampling.guidance,
                       generator=generators, output_type="pt")  # fmt: skip
        return out.images.float().cpu()

    pipe = load_pipeline(folder)
    plain_bias = pipe.unet.time_embedding.linear_2.bias.detach().clone()
    names, students, teachers_a, teachers_b = [], [], [], []
    for name, path in teachers:
        with torch.no_grad():
            pipe.unet.time_embedding.linear_2.bias.copy_(plain_bias)
        fold_into_pipeline_unet(pipe.unet, folder, name)
        students.append(draw(pipe, sampling.seeds[1]))
        if (path / "model_index.json").is_file():
            teacher = load_pipeline(path)
        else:  # a weights file: the student's pipeline with the teacher's UNet (and what else its file holds)
            teacher = load_pipeline(folder)
            load_weights_into(teacher, path)
        names.append(name)
        teachers_a.append(draw(teacher, sampling.seeds[0]))
        teachers_b.append(draw(teacher, sampling.seeds[1]))
        del teacher
    return names, students, teachers_a, teachers_b


def student_fidt(student_folder: str | Path, sampling: FIDtSampling, metric_factory: Callable) -> FIDtResult:
    names, students, teachers_a, teachers_b = sample_sets(student_folder, sampling)
    return compute_fidt(names, students, teachers_a, teachers_b, metric_factory)
