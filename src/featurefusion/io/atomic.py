"""Small output files written whole or not at all: to a temporary name beside the target, then renamed."""

from __future__ import annotations

import json
import os
from pathlib import Path


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = _temporary(Path(path))
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def save_png_atomic(image, path: Path) -> None:
    """A PIL image as PNG."""
    tmp = _temporary(Path(path))
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
