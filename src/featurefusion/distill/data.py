"""Training data for distillation: a common captioned dataset, then images each teacher synthesised.

Every batch is a pure function of a seed (the trainer derives it from step and slot), so a resumed run and a
run split over several processes see the same batches as one uninterrupted process.

- `ToyWorldData`: the built-in world's data (uniform over its prompts by default), drawn fresh.
- `FolderData`: any captioned folder (`featurefusion shard` writes them: `<root>/<category>/train`).
- `SynthData`: the second stage (paper §3.4): a few hundred images synthesised by each teacher from the common
  data's prompts; a batch for teacher i is drawn from teacher i's own images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from featurefusion.distill.backbone import Backbone, DistillError


@dataclass
class Batch:
    x0: torch.Tensor  # clean inputs in the UNet's space
    prompts: list[str]


class ToyWorldData:
    """The built-in world's data of one task. The default, `uniform` (every object, colour and style equally
    often), plays the paper's broad common dataset: the base's own `broad` data is 97 % plain style with rare
    objects at 0.05 %, so the prompts where the specialists differ from the base would hardly ever be seen."""

    def __init__(self, task: str = "uniform"):
        from featurefusion.toyworld.scorer import UNIFORM_TASK
        from featurefusion.toyworld.world import standard_tasks

        tasks = {**standard_tasks(), "uniform": UNIFORM_TASK}
        if task not in tasks:
            raise DistillError(f"unknown built-in task {task!r}; choose one of {', '.join(tasks)}")
        self.task = tasks[task]
        self.description = f"toyworld:{task}"

    def batch(self, backbone: Backbone, seed: int, size: int, teacher: int | None = None) -> Batch:
        from featurefusion.toyworld.world import make_batch

        specs, images = make_batch(self.task, size, seed=seed, split="train")
        return Batch(images, [s.prompt for s in specs])

    def prompts(self, n: int, seed: int) -> list[str]:
        from featurefusion.toyworld.world import sample_specs

        return [s.prompt for s in sample_specs(self.task, n, seed=seed, split="train")]


class ToyWorldTeacherData:
    """The built-in world's uniform data, with `share` of teacher i's batches drawn from teacher i's own task
    (a specialist is named after its task; a teacher without one, such as the base, gets uniform data only).

    The paper distils on a common dataset alone, with 100k steps. At a few hundred CPU steps that gives each
    teacher only a few hundred prompts of its own task, where it differs from the base; this option spends the
    budget where the teachers differ, as the paper's synthesised second stage does with each teacher's images."""

    def __init__(self, names: list[str], share: float = 0.5):
        from featurefusion.toyworld.scorer import UNIFORM_TASK
        from featurefusion.toyworld.world import standard_tasks

        if not 0 <= share <= 1:
            raise DistillError(f"the own-task share must be in [0, 1], got {share}")
        tasks = standard_tasks()
        self.uniform, self.share = UNIFORM_TASK, share
        self.own = {i: tasks[name] for i, name in enumerate(names) if name in tasks and name != "broad"}
        self.description = f"toyworld:teachers:{share:g}"

    def _split(self, size: int, teacher: int | None) -> int:
        return round(self.share * size) if teacher in self.own else 0

    def batch(self, backbone: Backbone, seed: int, size: int, teacher: int | None = None) -> Batch:
        from featurefusion.toyworld.world import make_batch

        n_own = self._split(size, teacher)
        specs, images = make_batch(self.uniform, size - n_own, seed=seed, split="train")
        if n_own:
            own_specs, own_images = make_batch(self.own[teacher], n_own, seed=seed, split="train")
            specs, images = [*own_specs, *specs], torch.cat([own_images, images])
        return Batch(images, [s.prompt for s in specs])

    def prompts(self, n: int, seed: int, teacher: int | None = None) -> list[str]:
        from featurefusion.toyworld.world import sample_specs

        n_own = self._split(n, teacher)
        own = sample_specs(self.own[teacher], n_own, seed=seed, split="train") if n_own else []
        rest = sample_specs(self.uniform, n - n_own, seed=seed, split="train")
        return [s.prompt for s in [*own, *rest]]


class FolderData:
    def __init__(self, folder: str | Path, resolution: int):
        from featurefusion.train.sources import read_captioned_folder

        self.folder = Path(folder)
        self.items = read_captioned_folder(self.folder)  # DataError for a missing, empty or uncaptioned folder
        self.resolution = resolution
        self.description = str(self.folder)

    def _indices(self, seed: int, size: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, len(self.items), (size,), generator=gen).tolist()

    def batch(self, backbone: Backbone, seed: int, size: int, teacher: int | None = None) -> Batch:
        from featurefusion.train.finetune import load_training_image

        items = [self.items[i] for i in self._indices(seed, size)]
        pixels = torch.stack([load_training_image(it.path, self.resolution) for it in items])
        return Batch(backbone.encode_images(pixels, torch.Generator().manual_seed(seed)), [it.caption for it in items])

    def prompts(self, n: int, seed: int) -> list[str]:
        return [self.items[i].caption for i in self._indices(seed, n)]


class SynthData:
    """Per-teacher synthesised sets, held in memory (a few hundred small tensors per teacher), by style index.
    A supervisor without a set (the frozen student of incremental learning) draws from `fallback`."""

    def __init__(self, sets: dict[int, Batch], fallback):
        if any(len(s.prompts) == 0 for s in sets.values()):
            raise DistillError("every teacher needs at least one synthesised image")
        self.sets, self.fallback = sets, fallback
        self.description = "synthesised by each teacher"

    def batch(self, backbone: Backbone, seed: int, size: int, teacher: int | None = None) -> Batch:
        if teacher not in self.sets:
            return self.fallback.batch(backbone, seed, size, teacher)
        data = self.sets[teacher]
        idx = torch.randint(0, len(data.prompts), (size,), generator=torch.Generator().manual_seed(seed))
        return Batch(data.x0[idx], [data.prompts[i] for i in idx.tolist()])


def synthesize_sets(
    backbone: Backbone,
    teachers: dict[int, torch.nn.Module],
    common,
    count: int,
    seed: int,
    steps: int = 20,
    guidance: float = 1.5,
    batch_size: int = 128,
) -> SynthData:
    """`count` images per teacher (by style index), from the common data's prompts (the same for every teacher,
    unless the data draws part of each teacher's prompts from its own task)."""
    sets = {}
    for i, teacher in teachers.items():
        if isinstance(common, ToyWorldTeacherData):
            prompts = common.prompts(count, seed, teacher=i)
        else:
            prompts = common.prompts(count, seed)
        chunks = [
            backbone.synthesize(teacher, prompts[s : s + batch_size], seed * 7919 + i * 104_729 + s, steps, guidance)
            for s in range(0, count, batch_size)
        ]
        sets[i] = Batch(torch.cat(chunks), prompts)
    return SynthData(sets, common)


def open_data(spec: str | None, backbone: Backbone, resolution: int | None = None, names: list[str] | None = None):
    """`--data`: a captioned folder, `toyworld` / `toyworld:TASK` / `toyworld:teachers[:SHARE]`, or None (the
    built-in world's uniform data for a toy base). `names` are the styles, for `toyworld:teachers`."""
    if spec is None or spec.startswith("toyworld"):
        if not backbone.toy:
            raise DistillError("a Stable Diffusion base needs --data FOLDER (a captioned image folder)")
        task = (spec or "").partition(":")[2] or "uniform"
        if task.startswith("teachers"):
            share = task.partition(":")[2]
            try:
                return ToyWorldTeacherData(names or [], float(share) if share else 0.5)
            except ValueError:
                raise DistillError(f"cannot read the own-task share in --data {spec}") from None
        return ToyWorldData(task)
    if backbone.vae is None:  # the UNet works on pixels
        size = resolution or backbone.unet.config.sample_size
    else:
        size = resolution or backbone.unet.config.sample_size * 2 ** (len(backbone.vae.config.block_out_channels) - 1)
    return FolderData(spec, size)
