"""A student on disk: a diffusers pipeline folder whose `unet/` is the student's UNet, plus its style prompts.

```
STUDENT/
  model_index.json, text_encoder/, tokenizer/, scheduler/ (vae/)   copied from the base pipeline
  unet/                   the student's UNet (diffusers `save_pretrained`)
  styles.safetensors      codebook [N, d], mlp.0.weight, mlp.2.weight; metadata: the style names
  student.json            style names, teachers (name, path as given and seen from STUDENT, SHA-256), base,
                          training settings
```

Everything is written into a staging folder beside the target and renamed into place, so a failed save leaves
no partial student. Without a style, the folder samples as the plain UNet (style offset zero); `featurefusion
sample STUDENT --style NAME` adds a style, and `featurefusion distill export` folds one into a plain model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from featurefusion import __version__
from featurefusion.distill.backbone import DistillError
from featurefusion.distill.student import StudentUNet, StylePrompts

STYLES_FILE = "styles.safetensors"
META_FILE = "student.json"
FORMAT = "featurefusion-dmm-student"
_BASE_PARTS = ("model_index.json", "text_encoder", "tokenizer", "scheduler", "vae", "feature_extractor")


def teacher_record(name: str, path: str | os.PathLike, student_folder: str | os.PathLike) -> dict:
    """A teacher as student.json records it: its path as given, its path seen from the student's folder (so a
    student moved or shipped together with its teachers still finds them) and its SHA-256."""
    from featurefusion.io.recipe import model_hash

    from_folder = os.path.relpath(Path(path).resolve(), Path(student_folder).resolve())
    return {"name": name, "path": str(path), "from_folder": from_folder, "sha256": model_hash(path)}


def locate_teacher(student_folder: str | os.PathLike, record: dict) -> Path | None:
    """Where a recorded teacher lies now: seen from the student's folder first, then the path as given (older
    students recorded only that, sometimes relative to the student's parent)."""
    folder = Path(student_folder)
    candidates = [folder / record["from_folder"]] if "from_folder" in record else []
    candidates += [Path(record["path"]), folder / record["path"], folder.parent / record["path"]]
    return next((c for c in candidates if c.exists()), None)


def is_student(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


def save_student(
    student: StudentUNet, folder: Path, base_folder: Path | None, meta: dict, dtype: torch.dtype = torch.float32
) -> Path:
    folder = Path(folder)
    staging = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if base_folder is not None:
            for part in _BASE_PARTS:
                src = Path(base_folder) / part
                if src.is_dir():
                    shutil.copytree(src, staging / part)
                elif src.is_file():
                    shutil.copy2(src, staging / part)
        state = {k: v.detach().to(dtype).contiguous() for k, v in student.unet.state_dict().items()}
        unet = UNet2DConditionModel.from_config(student.unet.config)
        unet.load_state_dict(state)
        # `.half()`, not `.to(float16)`: diffusers' `to` warns about modules to keep in float32 (there are none).
        unet = {torch.float16: unet.half, torch.bfloat16: unet.bfloat16}.get(dtype, unet.float)()
        unet.save_pretrained(staging / "unet", safe_serialization=True)
        styles = {k: v.detach().float().contiguous() for k, v in student.prompts.state_dict().items()}
        save_file(styles, staging / STYLES_FILE, metadata={"format": "pt", "styles": json.dumps(student.names)})
        full = {"format": FORMAT, "version": __version__, "styles": student.names, **meta}
        (staging / META_FILE).write_text(json.dumps(full, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def read_meta(folder: str | os.PathLike) -> dict:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise DistillError(f"not a DMM student ({META_FILE} missing)", folder)
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DistillError(f"unreadable student metadata: {err}", path) from None
    if meta.get("format") != FORMAT:
        raise DistillError(f"not a DMM student (format {meta.get('format')!r})", path)
    return meta


def load_student(folder: str | os.PathLike) -> tuple[StudentUNet, dict]:
    folder = Path(folder)
    meta = read_meta(folder)
    styles_path = folder / STYLES_FILE
    if not styles_path.is_file():
        raise DistillError(f"the student's style prompts are missing ({STYLES_FILE})", folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).eval()
    tensors = load_file(styles_path)
    if "codebook" not in tensors:
        raise DistillError("no codebook in the style prompts (key 'codebook')", styles_path)
    names = meta["styles"]
    if tensors["codebook"].shape[0] != len(names):
        raise DistillError(f"the codebook has {tensors['codebook'].shape[0]} entries for {len(names)} styles",
                           styles_path)  # fmt: skip
    prompts = StylePrompts(names, tensors["codebook"].shape[1])
    prompts.load_state_dict(tensors)
    return StudentUNet(unet, prompts), meta
