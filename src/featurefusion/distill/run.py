"""`featurefusion distill BASE TEACHER... -o STUDENT`: check the inputs, train both stages, save the student.

Every input is checked (base, each teacher's architecture, the data) before training starts, and the student is
written only at the end, atomically; interrupted runs keep their training state in `STUDENT.state/`, which
`resume=True` continues from.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from featurefusion.distill.backbone import Backbone, DistillError, load_backbone, load_teacher, teacher_name
from featurefusion.distill.data import open_data, synthesize_sets
from featurefusion.distill.store import load_student, save_student, teacher_record
from featurefusion.distill.student import StudentUNet
from featurefusion.distill.trainer import (
    STATE_NAME,
    DistillConfig,
    History,
    Supervisor,
    Trainer,
    default_device,
    init_distributed,
    invariants_of,
)


@dataclass
class DistillResult:
    output: Path
    styles: list[str]
    history: History
    seconds: float
    steps_run: int


def loss_log(history: History, points: int = 50) -> dict:
    """Mean losses over up to `points` equal windows of the run (the whole history would bloat student.json)."""
    n = len(history.steps)
    if not n:
        return {}
    edges = [round(i * n / min(points, n)) for i in range(min(points, n) + 1)]
    out: dict[str, list] = {"step": [], "score": [], "feat": [], "adv": [], "disc": []}
    for a, b in zip(edges, edges[1:], strict=False):
        out["step"].append(history.steps[b - 1])
        for key in ("score", "feat", "adv", "disc"):
            values = getattr(history, key)[a:b]
            out[key].append(round(sum(values) / len(values), 6))
    return out


def state_dir(output: Path) -> Path:
    return Path(f"{output}.state")


def check_output(output: Path, inputs: list[Path], overwrite: bool) -> None:
    output = Path(output)
    for p in inputs:
        if output.resolve() == Path(p).resolve() or Path(p).resolve().is_relative_to(output.resolve()):
            raise DistillError("the output would overwrite an input", output)
    if output.exists() and not overwrite:
        raise DistillError("output exists (pass --overwrite to replace it)", output)


def named_teachers(specs: list[str]) -> list[tuple[str, Path]]:
    named = [teacher_name(s) for s in specs]
    if not named:
        raise DistillError("give at least one teacher")
    for _name, path in named:
        if not path.exists():
            raise DistillError("no such teacher file or folder", path)
    names = [n for n, _ in named]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DistillError(f"two teachers share the style name {dupes[0]!r}: name them NAME=PATH")
    return named


def check_teachers(named: list[tuple[str, Path]], backbone: Backbone) -> None:
    """Fail before training on a teacher of another architecture (loads each once, then lets it go)."""
    for _name, path in named:
        load_teacher(path, backbone.unet)


def distill(
    base: str | os.PathLike,
    teachers: list[str],
    output: str | os.PathLike,
    config: DistillConfig | None = None,
    data: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    save_dtype: torch.dtype = torch.float32,
    progress: bool | None = None,
    init_from: str | os.PathLike | None = None,
    device: str | None = None,
) -> DistillResult:
    """Train a student of `teachers` (initialised from the base's UNet, or from the trained student
    `init_from` of the same teachers, to train it further)."""
    output = Path(output)
    named = named_teachers(teachers)
    earlier = [Path(init_from)] if init_from is not None else []
    check_output(output, [Path(base), *(p for _, p in named), *earlier], overwrite or resume)
    config = config or DistillConfig()
    config.validate()
    backbone = load_backbone(base)
    names = [n for n, _ in named]
    common = open_data(data, backbone, names=names)
    check_teachers(named, backbone)
    continued = None
    if init_from is None:
        student = StudentUNet.from_base(backbone.unet, names, seed=config.seed)
    else:
        student, earlier_meta = load_student(init_from)
        if student.names != names:
            raise DistillError(
                f"--from: the student's styles are {student.names}, the teachers given are {names} "
                "(train further with the same teachers in the same order; --add adds new ones)",
                init_from,
            )
        continued = {"from": str(init_from), "earlier_training": earlier_meta.get("training"),
                     "earlier_continued": earlier_meta.get("continued")}  # fmt: skip
    supervisors = [
        Supervisor(name, (lambda p=path: load_teacher(p, backbone.unet)), style=i)
        for i, (name, path) in enumerate(named)
    ]
    meta = {
        "base": str(base),
        "teachers": [teacher_record(n, p, output) for n, p in named],
        "data": common.description,
        **({"continued": continued} if continued else {}),
    }
    return train_and_save(student, supervisors, backbone, common, config, output, meta, resume, save_dtype, progress,
                          device)  # fmt: skip


def train_and_save(
    student: StudentUNet,
    supervisors: list[Supervisor],
    backbone: Backbone,
    common,
    config: DistillConfig,
    output: Path,
    meta: dict,
    resume: bool,
    save_dtype: torch.dtype,
    progress: bool | None,
    device: str | torch.device | None = None,
) -> DistillResult:
    device = default_device(device)
    init_distributed(device)
    start = time.perf_counter()
    backbone.to(device)
    trainer = Trainer(student, supervisors, backbone, config, classes=len(student.names), device=device)
    invariants = invariants_of(config, trainer.slots, student.names)
    states = state_dir(output)
    state_file = states / STATE_NAME
    if resume and state_file.is_file():
        trainer.load_state_dict(torch.load(state_file, weights_only=False, map_location="cpu"), invariants, state_file)
    first = trainer.step

    def save_state(t: Trainer) -> None:
        if t.rank == 0:
            states.mkdir(parents=True, exist_ok=True)
            tmp = states / f".{STATE_NAME}.tmp"
            torch.save(t.state_dict(invariants), tmp)
            os.replace(tmp, state_file)

    trainer.run_stage(common, 1, config.steps, "distill", progress, save_state)
    if config.synth_steps:
        needed = {s.style: s.model for i, s in enumerate(supervisors) if i in trainer.needed() and s.styles is None}
        synth = synthesize_sets(backbone, needed, common, config.synth_images, config.seed + 1,
                                config.synth_sample_steps, config.synth_guidance)  # fmt: skip
        trainer.run_stage(synth, 2, config.steps + config.synth_steps, "synthesised", progress, save_state)
    final = trainer.final_student()
    seconds = time.perf_counter() - start
    if trainer.rank == 0:
        training = {**asdict(config), "processes": trainer.world, "slots": trainer.slots, "seconds": round(seconds, 1)}
        meta = {**meta, "training": training, "losses": loss_log(trainer.history)}
        save_student(final, output, backbone.folder, meta, save_dtype)
        shutil.rmtree(states, ignore_errors=True)
    if trainer.world > 1:
        dist.barrier()
    return DistillResult(output, final.names, trainer.history, seconds, trainer.step - first)
