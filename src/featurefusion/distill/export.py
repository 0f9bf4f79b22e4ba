"""One style of a student as an ordinary checkpoint any Stable Diffusion tool loads.

The style's offset is folded into the time embedding's last bias (`fold_style`), the UNet is saved in a
staging copy of the student's pipeline folder, and the package's converter writes it in the requested layout
(atomically, with its recipe), so the result is exactly what `featurefusion convert` writes for any model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from featurefusion.distill.backbone import DistillError
from featurefusion.distill.store import STYLES_FILE, load_student
from featurefusion.distill.student import fold_style, parse_style


def export_style(student_folder: Path, style: str, output: Path, fmt: str | None = None, dtype: str = "fp32",
                 progress: bool | None = None):  # fmt: skip
    from featurefusion.merge.operations import OutputOptions, convert

    student_folder, output = Path(student_folder), Path(output)
    student, _meta = load_student(student_folder)
    unet = fold_style(student, parse_style(style))  # unknown style: an error before anything is written
    pipeline = (student_folder / "model_index.json").is_file()
    fmt = fmt or ("ldm" if (student_folder / "vae").is_dir() else "diffusers-unet")
    if fmt != "diffusers-unet" and not pipeline:
        raise DistillError(f"format {fmt} needs the student's text encoder and configs; this student has a UNet only",
                           student_folder)  # fmt: skip
    if output.exists():
        raise DistillError("output exists", output)
    with tempfile.TemporaryDirectory(dir=output.parent if output.parent.exists() else None) as tmp:
        staging = Path(tmp) / f"{student_folder.name}-{_slug(style)}"
        staging.mkdir()
        for entry in student_folder.iterdir():
            if entry.name in ("unet", STYLES_FILE) or not pipeline:
                continue
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, staging / entry.name)
        unet.save_pretrained(staging / "unet", safe_serialization=True)
        source = staging if pipeline else staging / "unet"
        return convert(source, output, OutputOptions(format=fmt, dtype=dtype, progress=progress))


def _slug(style: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in style)[:60] or "style"


def fold_into_pipeline_unet(pipe_unet, student_folder: str | os.PathLike, style: str) -> None:
    """Give a loaded pipeline's UNet (the student's own weights) the style's offset, in place."""
    import torch

    student, _meta = load_student(student_folder)
    folded = fold_style(student, parse_style(style))
    with torch.no_grad():
        bias = pipe_unet.time_embedding.linear_2.bias
        bias.copy_(folded.time_embedding.linear_2.bias.to(bias))
