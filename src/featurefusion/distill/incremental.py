"""Incremental learning (DMM paper §3.5, Tab. 2): add teachers to a trained student.

The codebook gets one new entry per new teacher (the old entries keep their values and the MLP its shape);
new teachers supervise their styles as in the first training. With regularisation (the default) one more
slot per step is supervised by a frozen copy of the old student, with one of the old styles chosen at random
at every slot: the student keeps reproducing what it knew, at the cost of one extra teacher rather than all
the old ones. `regularization=False` trains on the new teachers alone, to show the forgetting.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from featurefusion.distill.backbone import load_backbone, load_teacher
from featurefusion.distill.data import open_data
from featurefusion.distill.run import DistillResult, check_output, check_teachers, named_teachers, train_and_save
from featurefusion.distill.store import load_student, locate_teacher, read_meta, teacher_record
from featurefusion.distill.trainer import DistillConfig, Supervisor


def add_teachers(
    student_folder: str | os.PathLike,
    teachers: list[str],
    output: str | os.PathLike,
    config: DistillConfig | None = None,
    data: str | None = None,
    regularization: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    save_dtype: torch.dtype = torch.float32,
    progress: bool | None = None,
    device: str | None = None,
) -> DistillResult:
    output, student_folder = Path(output), Path(student_folder)
    read_meta(student_folder)  # a clear error for a folder that is not a student
    named = named_teachers(teachers)
    check_output(output, [student_folder, *(p for _, p in named)], overwrite or resume)
    config = config or DistillConfig()
    config.validate()
    backbone = load_backbone(student_folder)  # text encoder, scheduler (and VAE) as the student was saved with
    student, meta = load_student(student_folder)
    common = open_data(data, backbone, names=[*student.names, *(n for n, _ in named)])
    check_teachers(named, backbone)
    old = len(student.names)
    frozen = copy.deepcopy(student).eval().requires_grad_(False)
    student.prompts.add([n for n, _ in named], seed=config.seed + old)
    supervisors = [
        Supervisor(name, (lambda p=path: load_teacher(p, backbone.unet)), style=old + i)
        for i, (name, path) in enumerate(named)
    ]
    if regularization:
        supervisors.append(Supervisor("earlier student", lambda: frozen, styles=list(range(old))))
    new_meta = {
        "base": meta.get("base"),
        "teachers": [
            *(_seen_from(output, student_folder, t) for t in meta.get("teachers", [])),
            *(teacher_record(n, p, output) for n, p in named),
        ],  # fmt: skip
        "data": common.description,
        "incremental": {
            "from": str(student_folder),
            "old_styles": old,
            "regularization": regularization,
            "earlier": meta.get("incremental"),
        },  # fmt: skip
    }
    return train_and_save(student, supervisors, backbone, common, config, output, new_meta, resume, save_dtype,
                          progress, device)  # fmt: skip


def _seen_from(output: Path, student_folder: Path, record: dict) -> dict:
    """An earlier teacher's record with its path seen from the new student's folder (kept as it was when the
    teacher is no longer where the earlier student recorded it)."""
    path = locate_teacher(student_folder, record)
    if path is None:
        return {k: v for k, v in record.items() if k != "from_folder"}
    return {**record, "from_folder": os.path.relpath(path.resolve(), output.resolve())}
