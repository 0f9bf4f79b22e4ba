"""Captioned data sources: local image folders with captions, and Hugging Face datasets.

Sources:
- a Hugging Face dataset (`datasets.load_dataset(name)`, streaming or not; Pick-a-Pic v1 by default column
  layout), or any `datasets.Dataset` / `IterableDataset` already in memory;
- a local folder of images whose captions come from a `metadata.jsonl` / `metadata.csv` (`file_name` + a
  caption column, as the Hugging Face imagefolder loader reads) or from `.txt` files next to the images.

Both are seen through `Source`: rows 0..n-1 with a cheap caption pass first and images fetched afterwards for
the chosen rows only, so that sharding a large (or streamed) dataset decodes only the images it keeps.
`read_captioned_folder` is also how fine-tuning reads a shard's split folder.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from featurefusion.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_COLUMNS = ("caption", "text")  # tried in this order when no caption column is named
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
# The file at the root of a shard output (written by `shard`); a folder holding it and no image is a shard root.
MANIFEST_NAME = "manifest.json"
# Pick-a-Pic v1 stores two generated images per prompt and a preference label for each.
PICKAPIC_IMAGE_COLUMNS = ("jpg_0", "jpg_1")
PICKAPIC_LABEL_COLUMNS = ("label_0", "label_1")


# ---- local captioned folders ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionedImage:
    path: Path
    caption: str
    source_id: str  # path relative to the folder, with forward slashes


def read_captioned_folder(folder: str | os.PathLike, caption_column: str | None = None) -> list[CaptionedImage]:
    """Images under `folder` (recursively, hidden entries skipped) with their captions, sorted by path.

    A caption comes from the folder's metadata.jsonl / metadata.csv (`file_name` + caption column) when it
    lists the image, else from a `.txt` file with the image's name. Images without a caption are skipped
    with a warning; an empty folder is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError("no such folder", folder)
    if (folder / MANIFEST_NAME).is_file() and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()):
        raise DataError("this is a shard root, not a split folder: pass <root>/<category>/train", folder)
    images = sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not _hidden(p.relative_to(folder))
    )
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder", folder)
    from_metadata = _metadata_captions(folder, caption_column)
    items, uncaptioned = [], 0
    for path in images:
        rel = path.relative_to(folder).as_posix()
        caption = from_metadata.get(rel)
        if caption is None and path.with_suffix(".txt").is_file():
            caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        if caption is None:
            uncaptioned += 1
            continue
        items.append(CaptionedImage(path, caption, rel))
    if uncaptioned:
        log.warning("%d image(s) in %s have no caption (no metadata row, no .txt) and are skipped", uncaptioned, folder)
    if not items:
        raise DataError("no image in the folder has a caption (metadata.jsonl/.csv or .txt sidecar)", folder)
    return items


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _metadata_captions(folder: Path, caption_column: str | None) -> dict[str, str]:
    present = [folder / name for name in METADATA_FILES if (folder / name).is_file()]
    if not present:
        return {}
    if len(present) > 1:
        raise DataError("both metadata.jsonl and metadata.csv are present; keep one", folder)
    path = present[0]
    rows = _read_jsonl(path) if path.suffix == ".jsonl" else _read_csv(path)
    captions: dict[str, str] = {}
    column = caption_column
    for line, row in rows:
        if "file_name" not in row:
            raise DataError(f"row {line} has no 'file_name'", path)
        column = column or next((c for c in CAPTION_COLUMNS if c in row), None)
        if column is None or column not in row:
            wanted = caption_column or " or ".join(CAPTION_COLUMNS)
            raise DataError(f"row {line} has no caption column {wanted!r} (columns: {', '.join(row)})", path)
        name = str(row["file_name"]).replace("\\", "/")
        if not (folder / name).is_file():
            raise DataError(f"row {line} names an image that does not exist: {name!r}", path)
        captions[Path(name).as_posix()] = "" if row[column] is None else str(row[column])
    return captions


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"line {line_number} is not valid JSON: {err.msg}", path) from None
            if not isinstance(row, dict):
                raise DataError(f"line {line_number} is not a JSON object", path)
            yield line_number, row


def _read_csv(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8", newline="") as handle:
        yield from enumerate(csv.DictReader(handle), 2)


# ---- sources -------------------------------------------------------------------------------------------

# What a source hands over for an image: a file, encoded bytes, or a decoded PIL image.
Payload = Path | bytes | Image.Image


class Source:
    """A captioned dataset seen as rows 0..n-1: a cheap caption pass, then images for chosen rows only."""

    description: dict[str, Any]

    def size(self) -> int | None:
        """Number of rows, None when unknown (streaming)."""
        raise NotImplementedError

    def captions(self) -> Iterator[tuple[int, str, str]]:
        """(row, source_id, caption) in source order."""
        raise NotImplementedError

    def images(self, rows: set[int]) -> Iterator[tuple[int, Payload]]:
        """Payloads of the given rows, in any order."""
        raise NotImplementedError

    def where(self, row: int, source_id: str) -> str:
        """How an error names this row."""
        raise NotImplementedError


class FolderSource(Source):
    def __init__(self, folder: Path, caption_column: str | None = None):
        self.folder = folder
        self.items = read_captioned_folder(folder, caption_column)
        self.description = {"type": "folder", "path": str(folder), "caption_column": caption_column}

    def size(self) -> int:
        return len(self.items)

    def captions(self) -> Iterator[tuple[int, str, str]]:
        for row, item in enumerate(self.items):
            yield row, item.source_id, item.caption

    def images(self, rows: set[int]) -> Iterator[tuple[int, Payload]]:
        for row in sorted(rows):
            yield row, self.items[row].path

    def where(self, row: int, source_id: str) -> str:
        return str(self.items[row].path)


class HFDatasetSource(Source):
    """A `datasets.Dataset` or `IterableDataset`. With several image columns and as many label columns, a row's
    image is the one with the highest label (Pick-a-Pic's preferred image; ties take the first column)."""

    def __init__(
        self,
        dataset,
        name: str,
        caption_column: str = "caption",
        image_columns: Sequence[str] = ("image",),
        label_columns: Sequence[str] = (),
        batch_size: int = 1000,
    ):
        self.name = name
        self.caption_column = caption_column
        self.image_columns = tuple(image_columns)
        self.label_columns = tuple(label_columns)
        self.batch_size = batch_size
        if not self.image_columns:
            raise DataError("at least one image column is needed", name)
        if self.label_columns and len(self.label_columns) != len(self.image_columns):
            raise DataError("give one label column per image column, or none", name)
        if len(self.image_columns) > 1 and not self.label_columns:
            raise DataError("several image columns need label columns to choose between them", name)
        self.dataset = _undecoded_images(dataset, self.image_columns)
        self._check_columns()
        self.description = {
            "type": "hf-dataset",
            "name": name,
            "caption_column": caption_column,
            "image_columns": list(self.image_columns),
            "label_columns": list(self.label_columns),
            "streaming": not hasattr(dataset, "__len__"),
        }

    def _check_columns(self) -> None:
        columns = self.dataset.column_names
        if columns is None:  # a stream whose features are unknown until read
            return
        missing = [c for c in (self.caption_column, *self.image_columns, *self.label_columns) if c not in columns]
        if missing:
            raise DataError(f"dataset has no column {', '.join(missing)} (columns: {', '.join(columns)})", self.name)

    def size(self) -> int | None:
        return len(self.dataset) if hasattr(self.dataset, "__len__") else None

    def captions(self) -> Iterator[tuple[int, str, str]]:
        row = 0
        for batch in self.dataset.select_columns([self.caption_column]).iter(batch_size=self.batch_size):
            for caption in batch[self.caption_column]:
                yield row, str(row), "" if caption is None else str(caption)
                row += 1

    def images(self, rows: set[int]) -> Iterator[tuple[int, Payload]]:
        columns = [*self.image_columns, *self.label_columns]
        if hasattr(self.dataset, "__len__"):  # random access
            ordered = sorted(rows)
            for row, record in zip(ordered, self.dataset.select(ordered).select_columns(columns), strict=True):
                yield row, self._payload(row, record)
            return
        remaining = set(rows)
        for row, record in enumerate(self.dataset.select_columns(columns)):
            if row in remaining:
                remaining.discard(row)
                yield row, self._payload(row, record)
                if not remaining:
                    return

    def _payload(self, row: int, record: dict) -> Payload:
        index = 0
        if self.label_columns:
            labels = [float(record[c] or 0.0) for c in self.label_columns]
            index = labels.index(max(labels))
        value = record[self.image_columns[index]]
        if isinstance(value, dict):  # an undecoded Image feature: {"bytes": ..., "path": ...}
            if value.get("bytes"):
                return bytes(value["bytes"])
            return Path(value["path"]) if value.get("path") else b""
        if isinstance(value, str):
            return Path(value)
        if value is None:
            return b""
        return value

    def where(self, row: int, source_id: str) -> str:
        return f"dataset {self.name}, row {row}"


def _undecoded_images(dataset, image_columns: Sequence[str]):
    # Reading an Image feature undecoded keeps the original encoded bytes: no decode, no lossy re-encode.
    from datasets import Image as ImageFeature

    features = getattr(dataset, "features", None) or {}
    for column in image_columns:
        if isinstance(features.get(column), ImageFeature) and features[column].decode:
            dataset = dataset.cast_column(column, ImageFeature(decode=False))
    return dataset


def load_hub_source(
    name: str,
    split: str = "train",
    streaming: bool = False,
    revision: str | None = None,
    caption_column: str = "caption",
    image_columns: Sequence[str] | None = None,
    label_columns: Sequence[str] | None = None,
) -> HFDatasetSource:
    """Load a dataset by hub name (or any `load_dataset` path). Without image columns, Pick-a-Pic v1's layout."""
    import datasets

    if image_columns is None:
        image_columns = PICKAPIC_IMAGE_COLUMNS
        label_columns = PICKAPIC_LABEL_COLUMNS if label_columns is None else label_columns
    try:
        dataset = datasets.load_dataset(name, split=split, streaming=streaming, revision=revision)
    except Exception as err:  # the library raises many types (network, missing split, bad config)
        raise DataError(f"cannot load dataset: {type(err).__name__}: {err}", name) from err
    source = HFDatasetSource(dataset, name, caption_column, image_columns, label_columns or ())
    source.description.update(split=split, revision=revision, streaming=streaming)
    return source
