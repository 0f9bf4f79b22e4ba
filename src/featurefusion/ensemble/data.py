"""Training data for ensemble aggregators: a batch of (prompts, images in [-1, 1]) for any step.

A batch is a pure function of (seed, step), so a resumed run sees the same batches as an uninterrupted one,
and so do several data-parallel processes, each taking its slice of the step's global batch.
"""

from __future__ import annotations

from pathlib import Path

import torch

from featurefusion.errors import DataError
from featurefusion.toyworld.train import SPECIALIST_TASKS
from featurefusion.toyworld.world import make_batch, standard_tasks

# The built-in world's aggregator data: every specialist task and the base's broad mix in equal parts, so
# the aggregators see each task's prompts as often as every other's.
TOY_TASKS = ("broad", *SPECIALIST_TASKS)


class ToyWorldData:
    """Equal shares of each task per batch (the batch size must be a multiple of the number of tasks)."""

    description = "built-in world: equal shares of broad, 4 object tasks and 3 style tasks (train split)"

    def __init__(self, tasks: tuple[str, ...] = TOY_TASKS, seed: int = 0):
        all_tasks = standard_tasks()
        self.tasks = [all_tasks[t] for t in tasks]
        self.seed = seed

    def batch(self, step: int, size: int) -> tuple[list[str], torch.Tensor]:
        if size % len(self.tasks):
            raise DataError(f"the batch size ({size}) must be a multiple of the {len(self.tasks)} toy-world tasks")
        prompts, images = [], []
        for task in self.tasks:
            specs, pixels = make_batch(task, size // len(self.tasks), seed=self.seed * 1_000_003 + step)
            prompts += [s.prompt for s in specs]
            images.append(pixels)
        return prompts, torch.cat(images)


class FolderData:
    """A captioned image folder (as `featurefusion finetune` reads it), reshuffled every epoch."""

    def __init__(self, folder: str | Path, resolution: int, seed: int = 0, caption_column: str | None = None):
        from featurefusion.train.sources import read_captioned_folder

        self.items = read_captioned_folder(folder, caption_column)
        if not self.items:
            raise DataError("no captioned images", folder)
        self.description = f"{folder}: {len(self.items)} captioned images at {resolution} px"
        self.resolution, self.seed = resolution, seed

    def _order(self, epoch: int) -> torch.Tensor:
        # One permutation per epoch, a function of (seed, epoch) only; the latest one is kept.
        if getattr(self, "_epoch", None) != epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._permutation = epoch, torch.randperm(len(self.items), generator=generator)
        return self._permutation

    def batch(self, step: int, size: int) -> tuple[list[str], torch.Tensor]:
        from featurefusion.train.finetune import load_training_image

        n = len(self.items)
        picks = []
        for position in range(step * size, (step + 1) * size):
            epoch, index = divmod(position, n)
            picks.append(self.items[int(self._order(epoch)[index])])
        images = torch.stack([load_training_image(item.path, self.resolution) for item in picks])
        return [item.caption for item in picks], images


def open_data(spec: str, resolution: int | None, seed: int = 0):
    """`toyworld` for the built-in world's mix, else a captioned image folder."""
    if spec == "toyworld":
        return ToyWorldData(seed=seed)
    if not Path(spec).is_dir():
        raise DataError("no such data folder (give a captioned image folder, or `toyworld`)", spec)
    if resolution is None:
        raise DataError("a data folder needs the training resolution", spec)
    return FolderData(spec, resolution, seed)
