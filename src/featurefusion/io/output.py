"""Write a merged model in any supported layout, tensor by tensor, atomically.

The engine hands over canonical keys (`unet.conv_in.weight`, ...) in a fixed order; `plan_output` maps them
to files and file keys of the requested layout, and `CheckpointWriter` streams them out. Everything is
staged beside the destination and published at `commit()` (`io.atomic`), so an interrupted or failed merge
leaves no partial model at the output path, and nothing else either.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from featurefusion.errors import CheckpointError
from featurefusion.io import sd_keys
from featurefusion.io.atomic import StagedFolder, publish
from featurefusion.io.checkpoint import PIPELINE_WEIGHT_FILES, Checkpoint
from featurefusion.io.safetensors_stream import PlannedTensor, StreamingSafetensorsWriter, planned_size

OUTPUT_FORMATS = ("ldm", "diffusers-unet", "diffusers")


@dataclass(frozen=True)
class Placement:
    file: str  # path relative to the output (\"\" for a single-file output)
    key: str
    from_canonical: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class OutputPlan:
    format: str
    path: Path
    files: dict[str, list[PlannedTensor]] = field(default_factory=dict)
    placements: dict[str, Placement] = field(default_factory=dict)
    template: Path | None = None  # pipeline folder whose configs/tokenizer are copied


def components_written(fmt: str) -> tuple[str, ...]:
    return (
        ("unet",) if fmt == "diffusers-unet" else (*sd_keys.COMPONENTS, "extra") if fmt == "ldm" else sd_keys.COMPONENTS
    )


def plan_output(
    fmt: str,
    path: Path,
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
    base: Checkpoint,
    template: Path | None = None,
) -> OutputPlan:
    """Decide file and key for each canonical (key, dtype, shape). Entries of unwritten components are skipped.

    A diffusers pipeline output copies configs, tokenizer and scheduler from `template`, or from the base
    when that is a pipeline folder itself."""
    if fmt not in OUTPUT_FORMATS:
        raise CheckpointError(f"unknown output format {fmt!r}; choose one of {', '.join(OUTPUT_FORMATS)}", path)
    plan = OutputPlan(fmt, path)
    if fmt == "diffusers":
        template = template or (base.path if base.layout == "diffusers" else None)
        if template is None or not (Path(template) / "model_index.json").is_file():
            raise CheckpointError(
                "writing a diffusers pipeline folder needs a pipeline folder to copy configs, tokenizer and "
                "scheduler from: use a diffusers base model or give --template FOLDER",
                template or base.path,
            )
        plan.template = Path(template)
    wanted = components_written(fmt)
    for key, dtype, shape in entries:
        component, _, inner = key.partition(".")
        if component not in wanted:
            continue
        placement, out_shape = _place(fmt, component, inner, shape, base)
        plan.placements[key] = placement
        plan.files.setdefault(placement.file, []).append(PlannedTensor(placement.key, dtype, out_shape))
    return plan


def _place(fmt: str, component: str, inner: str, shape: tuple[int, ...], base: Checkpoint):
    if fmt == "diffusers-unet":
        return Placement("", inner), shape
    if fmt == "diffusers":
        return Placement(f"{component}/{PIPELINE_WEIGHT_FILES[component][0]}", inner), shape
    # ldm single file
    if component == "extra":
        return Placement("", inner), shape
    if base.unet_layout is None:
        raise CheckpointError("cannot place UNet keys in the ldm layout: UNet layout unknown", base.path)
    key = sd_keys.diffusers_to_ldm(component, inner, base.unet_layout)
    if sd_keys.vae_attention_needs_reshape(component, inner) and len(shape) == 2:
        return Placement("", key, _to_1x1_conv), (*shape, 1, 1)
    return Placement("", key), shape


def _to_1x1_conv(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(*t.shape, 1, 1)


def check_output_target(fmt: str, path: Path, overwrite: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written or would destroy what the tool did not
    write: a single file goes to a `.safetensors` name that is not a folder; a pipeline folder replaces only
    an empty folder, or with `overwrite` a folder that holds a model."""
    path = Path(path)
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError("cannot write the output: a part of its path is a file, not a folder", parent)
            break
    if fmt != "diffusers":
        if path.is_dir():
            raise CheckpointError(f"the output is a folder; a {fmt} model is one file: give a file name", path)
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"a {fmt} output is written as safetensors: name it *.safetensors (a {path.suffix or 'suffix-less'} "
                "name promises a format it would not hold)",
                path,
            )
        return
    if path.exists() and not path.is_dir():
        raise CheckpointError("the output of --format diffusers is a folder, and a file exists at that path", path)
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise CheckpointError("the output folder exists and is not empty; give --overwrite to replace it", path)
        if not _holds_a_model(path):
            raise CheckpointError(
                "the output folder holds no diffusers model (model_index.json or config.json with weights); "
                "refusing to replace it even with --overwrite",
                path,
            )


def _holds_a_model(folder: Path) -> bool:
    if (folder / "model_index.json").is_file():
        return True
    return (folder / "config.json").is_file() and any(
        (folder / name).is_file() for name in PIPELINE_WEIGHT_FILES["unet"]
    )


class CheckpointWriter:
    """Streams canonical tensors into the files of an `OutputPlan`; all or nothing (see `io.atomic`)."""

    def __init__(self, plan: OutputPlan, metadata: Mapping[str, str], hash_content: bool = True):
        self.plan = plan
        # Transformers refuses safetensors files whose metadata lacks the framework tag.
        self.metadata = {"format": "pt", **metadata}
        self._folder = StagedFolder(plan.path) if plan.format == "diffusers" else None
        self._writers: dict[str, StreamingSafetensorsWriter] = {}
        try:
            if self._folder is not None:
                _copy_template(plan.template, self._folder.path, set(plan.files))
            for rel, planned in plan.files.items():
                file_path = (self._folder.path / rel) if self._folder is not None else plan.path
                self._writers[rel] = StreamingSafetensorsWriter(file_path, planned, self.metadata, hash_content)
        except BaseException:
            self.abort()
            raise

    def wants(self, canonical_key: str) -> bool:
        return canonical_key in self.plan.placements

    def write(self, canonical_key: str, tensor: torch.Tensor) -> None:
        placement = self.plan.placements[canonical_key]
        if placement.from_canonical is not None:
            tensor = placement.from_canonical(tensor)
        self._writers[placement.file].write(placement.key, tensor)

    def finish(self) -> list:
        """Check every file is complete and return what `publish` makes visible: the file, or the folder."""
        staged = [item for writer in self._writers.values() for item in writer.finish()]
        if self._folder is None:
            return staged
        publish(staged)  # into the hidden folder; the folder itself is published by the caller
        return [self._folder]

    def write_bytes(self, canonical_key: str, data: torch.Tensor) -> None:
        """Raw bytes of a tensor already in its planned dtype, in parts (shape changes between layouts are
        reshapes, so the bytes are the same in every layout)."""
        placement = self.plan.placements[canonical_key]
        self._writers[placement.file].write_bytes(placement.key, data)

    def commit(self) -> None:
        publish(self.finish())

    def sha256(self) -> str | None:
        """SHA-256 of a single-file output, hashed as it was written (None for a pipeline folder)."""
        return None if self._folder is not None else self._writers[""].sha256()

    def abort(self) -> None:
        for writer in self._writers.values():
            writer.abort()
        if self._folder is not None:
            self._folder.abort()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()


def output_size(plan: OutputPlan, metadata: Mapping[str, str]) -> int:
    """Bytes the output's weight files will take (configs copied from a template are small)."""
    meta = {"format": "pt", **metadata}
    return sum(planned_size(planned, meta) for planned in plan.files.values())


def _copy_template(template: Path | None, staging: Path, written: set[str]) -> None:
    """Copy a pipeline folder's configs, tokenizer, scheduler (and any weights we do not rewrite)."""
    assert template is not None
    for src in template.rglob("*"):
        rel = src.relative_to(template)
        if src.is_dir() or rel.as_posix() in written:
            continue
        # Other weight formats of a component we rewrite would shadow or contradict the new file.
        if rel.parent.name in PIPELINE_WEIGHT_FILES and src.name in PIPELINE_WEIGHT_FILES[rel.parent.name]:
            continue
        dst = staging / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
