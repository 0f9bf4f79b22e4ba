"""Specialist data shards: score captions against keyword categories, keep the top k per category (paper §5.1.1).

Sources:
- a Hugging Face dataset (`datasets.load_dataset(name)`, streaming or not; Pick-a-Pic v1 by default column
  layout), or any `datasets.Dataset` / `IterableDataset` already in memory;
- a local folder of images whose captions come from a `metadata.jsonl` / `metadata.csv` (`file_name` + a
  caption column, as the Hugging Face imagefolder loader reads) or from `.txt` files next to the images.

Scoring (documented in docs/training.md): a caption is lower-cased and split into words (runs of letters and
digits); a keyword (one or more words) hits when it appears as whole consecutive words, where the last word
may carry a plural "s" or "es". A caption's score for a category is the number of *distinct* keywords of
that category it hits; the tie-breaks are the total number of hits, then the source order (earlier first).
With `overlap="best"` (default) a caption competes only in its best category (ties: the one listed first
in the categories file); with `overlap="all"` it competes in every category it scores in.

Output (written to a temporary sibling folder and renamed into place at the end):
    OUT/manifest.json
    OUT/<category>/<train|test>/metadata.jsonl   # file_name, text, score, source_id
    OUT/<category>/<train|test>/00000.jpg ...
Each split folder is itself a local captioned folder, readable by `read_captioned_folder` and by
`datasets.load_dataset("imagefolder", data_dir=...)`.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import io
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from PIL import Image
from tqdm.auto import tqdm

from featurefusion import __version__
from featurefusion.errors import FeatureFusionError
from featurefusion.progress import bar_disabled

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_COLUMNS = ("caption", "text")  # tried in this order when no caption column is named
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
OVERLAP_POLICIES = ("best", "all")
BAD_IMAGE_POLICIES = ("error", "skip")
SPLITS = ("train", "test")
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
# Pick-a-Pic v1 stores two generated images per prompt and a preference label for each.
PICKAPIC_IMAGE_COLUMNS = ("jpg_0", "jpg_1")
PICKAPIC_LABEL_COLUMNS = ("label_0", "label_1")
FORMAT_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}
CATEGORY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
WORD = re.compile(r"[a-z0-9]+")


class DataError(FeatureFusionError):
    """A dataset, image, categories file or output folder cannot be used. Names the file (or dataset row)."""

    def __init__(self, message: str, path: object | None = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{message} ({self.path})" if self.path is not None else message)


# ---- categories and scoring ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Category:
    name: str
    keywords: tuple[str, ...]


def default_categories_file() -> Path:
    return Path(str(resources.files("featurefusion.train").joinpath("categories.yaml")))


def load_categories(path: str | os.PathLike | None = None) -> list[Category]:
    """Categories from a YAML or JSON mapping `name: [keyword, ...]` (the shipped default when `path` is None)."""
    path = Path(path) if path is not None else default_categories_file()
    if not path.is_file():
        raise DataError("categories file not found", path)
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise DataError(f"cannot parse categories file: {err}", path) from None
    if isinstance(raw, dict) and set(raw) == {"categories"}:
        raw = raw["categories"]
    if not isinstance(raw, dict) or not raw:
        raise DataError("categories file must be a non-empty mapping of category name -> list of keywords", path)
    return [_parse_category(path, name, keywords) for name, keywords in raw.items()]


def _parse_category(path: Path, name: object, keywords: object) -> Category:
    if not isinstance(name, str) or not CATEGORY_NAME.match(name):
        raise DataError(f"category name {name!r} is not usable as a folder name (letters, digits, _ . -)", path)
    if not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
        raise DataError(f"category {name!r}: keywords must be a list of strings", path)
    normalised = tuple(dict.fromkeys(" ".join(WORD.findall(k.lower())) for k in keywords))
    normalised = tuple(k for k in normalised if k)
    if not normalised:
        raise DataError(f"category {name!r} has no keywords", path)
    return Category(name, normalised)


@dataclass(frozen=True)
class CategoryScore:
    score: int  # distinct keywords hit
    occurrences: int  # all hits, counting repeats
    hits: tuple[str, ...]  # the distinct keywords, in order of first appearance


class KeywordScorer:
    """Whole-word, case-insensitive keyword matching with one tokenisation per caption and dict look-ups."""

    def __init__(self, categories: Sequence[Category]):
        self.categories = list(categories)
        self._phrases: dict[tuple[str, ...], list[tuple[int, str]]] = {}
        for index, category in enumerate(self.categories):
            for keyword in category.keywords:
                self._phrases.setdefault(tuple(keyword.split()), []).append((index, keyword))
        self._longest = max(len(p) for p in self._phrases)

    def score(self, caption: str) -> list[CategoryScore | None]:
        """One entry per category: its score, or None when no keyword of it appears."""
        words = WORD.findall((caption or "").lower())
        found: list[dict[str, int]] = [{} for _ in self.categories]
        for start in range(len(words)):
            for length in range(1, min(self._longest, len(words) - start) + 1):
                for index, keyword in self._lookup(words[start : start + length]):
                    found[index][keyword] = found[index].get(keyword, 0) + 1
        return [CategoryScore(len(h), sum(h.values()), tuple(h)) if h else None for h in found]

    def _lookup(self, phrase: list[str]) -> list[tuple[int, str]]:
        # Exact words first, then the last word without a plural ending ("cars" -> "car", "buses" -> "bus").
        last = phrase[-1]
        for candidate in (last, last[:-1] if last.endswith("s") else None, last[:-2] if last.endswith("es") else None):
            if candidate:
                hit = self._phrases.get((*phrase[:-1], candidate))
                if hit:
                    return hit
        return []


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


# ---- sharding ------------------------------------------------------------------------------------------


@dataclass
class ShardOptions:
    k: int = 1000
    test_fraction: float = 0.1
    seed: int = 0
    min_score: int = 1
    overlap: str = "best"
    dedupe_captions: bool = True
    on_bad_image: str = "error"
    limit: int | None = None  # scan only the first rows (for a quick try)
    overwrite: bool = False
    progress: bool | None = None  # None: tqdm decides (off when not a terminal)

    def validate(self) -> None:
        if self.k < 1:
            raise DataError(f"k must be at least 1, got {self.k}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise DataError(f"test fraction must be in [0, 1), got {self.test_fraction}")
        if self.min_score < 1:
            raise DataError(f"min score must be at least 1, got {self.min_score}")
        if self.overlap not in OVERLAP_POLICIES:
            raise DataError(f"overlap must be one of {', '.join(OVERLAP_POLICIES)}, got {self.overlap!r}")
        if self.on_bad_image not in BAD_IMAGE_POLICIES:
            raise DataError(f"on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}")
        if self.limit is not None and self.limit < 1:
            raise DataError(f"limit must be at least 1, got {self.limit}")


@dataclass(order=True)
class Candidate:
    # Field order is the ranking: a larger tuple is better (more keywords, more hits, earlier row).
    score: int
    occurrences: int
    neg_row: int
    category: str = field(compare=False)
    source_id: str = field(compare=False)
    caption: str = field(compare=False)
    hits: tuple[str, ...] = field(compare=False)

    @property
    def row(self) -> int:
        return -self.neg_row


@dataclass
class ShardResult:
    output: Path
    manifest: Path
    counts: dict[str, dict[str, int]]
    rows_scanned: int


def shard_folder(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    categories_file: str | os.PathLike | None = None,
    caption_column: str | None = None,
    options: ShardOptions | None = None,
) -> ShardResult:
    folder, out = Path(folder), Path(out)
    _check_output(out, options or ShardOptions(), source_folder=folder)
    return build_shards(FolderSource(folder, caption_column), out, categories_file, options)


def shard_hf_dataset(
    dataset,
    out: str | os.PathLike,
    name: str,
    caption_column: str = "caption",
    image_columns: Sequence[str] = ("image",),
    label_columns: Sequence[str] = (),
    categories_file: str | os.PathLike | None = None,
    options: ShardOptions | None = None,
) -> ShardResult:
    """Shard a `datasets.Dataset` / `IterableDataset` that is already loaded (the hub path ends here too)."""
    source = HFDatasetSource(dataset, name, caption_column, image_columns, label_columns)
    return build_shards(source, Path(out), categories_file, options)


def build_shards(
    source: Source,
    out: Path,
    categories_file: str | os.PathLike | None = None,
    options: ShardOptions | None = None,
) -> ShardResult:
    options = options or ShardOptions()
    options.validate()
    _check_output(out, options)
    categories = load_categories(categories_file)
    categories_origin = str(categories_file) if categories_file is not None else "default"
    ranked, matched, rows_scanned = _rank_candidates(source, categories, options)
    empty = [c.name for c in categories if not ranked[c.name]]
    if empty:
        raise DataError(
            f"no caption matched category {', '.join(empty)} in {rows_scanned} rows: add keywords or remove it",
            categories_file or default_categories_file(),
        )
    with _atomic_folder(out, options.overwrite) as staging:
        chosen, skipped = _collect_images(source, ranked, options, staging / ".pool")
        counts, items = _write_splits(staging, categories, chosen, skipped, matched, options)
        shutil.rmtree(staging / ".pool", ignore_errors=True)
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "featurefusion_version": __version__,
            "source": source.description,
            "categories_file": categories_origin,
            "categories": {c.name: list(c.keywords) for c in categories},
            "scoring": "distinct whole-word keyword hits (plural s/es allowed); ties: total hits, then source order",
            "k": options.k,
            "min_score": options.min_score,
            "overlap": options.overlap,
            "dedupe_captions": options.dedupe_captions,
            "on_bad_image": options.on_bad_image,
            "split": {"test_fraction": options.test_fraction, "seed": options.seed},
            "rows_scanned": rows_scanned,
            "counts": counts,
            "items": items,
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
    return ShardResult(out, out / MANIFEST_NAME, counts, rows_scanned)


def _check_output(out: Path, options: ShardOptions, source_folder: Path | None = None) -> None:
    if source_folder is not None:
        src, dst = source_folder.resolve(), out.resolve()
        if src == dst or src.is_relative_to(dst) or dst.is_relative_to(src):
            raise DataError("output folder must be outside the source folder (and not contain it)", out)
    if out.exists() and not options.overwrite:
        raise DataError("output already exists; pass --overwrite to replace it", out)


def _rank_candidates(
    source: Source, categories: list[Category], options: ShardOptions
) -> tuple[dict[str, list[Candidate]], dict[str, int], int]:
    """Best candidates per category, best first, and how many captions matched each category. Keeps k plus a
    reserve (to replace unreadable images)."""
    scorer = KeywordScorer(categories)
    keep = options.k + _reserve(options)
    heaps: dict[str, list[Candidate]] = {c.name: [] for c in categories}
    matched = dict.fromkeys(heaps, 0)
    seen_captions: set[bytes] = set()
    total = source.size()
    if options.limit is not None:
        total = min(total, options.limit) if total is not None else options.limit
    rows = 0
    bar = tqdm(total=total, desc="scoring captions", unit="row", disable=bar_disabled(options.progress))
    for row, source_id, caption in source.captions():
        if options.limit is not None and row >= options.limit:
            break
        rows += 1
        bar.update()
        scores = scorer.score(caption)
        if not any(s is not None and s.score >= options.min_score for s in scores):
            continue
        if options.dedupe_captions and _seen(caption, seen_captions):
            continue
        for category, result in _competing(categories, scores, options):
            candidate = Candidate(result.score, result.occurrences, -row, category, source_id, caption, result.hits)
            matched[category] += 1
            _push_bounded(heaps[category], candidate, keep)
    bar.close()
    return {name: sorted(heap, reverse=True) for name, heap in heaps.items()}, matched, rows


def _reserve(options: ShardOptions) -> int:
    return max(16, options.k // 4) if options.on_bad_image == "skip" else 0


def _seen(caption: str, seen: set[bytes]) -> bool:
    # Normalised (lower-case words) so that "A cat." and "a cat" count as one prompt; a short hash bounds memory.
    digest = hashlib.blake2b(" ".join(WORD.findall(caption.lower())).encode(), digest_size=12).digest()
    if digest in seen:
        return True
    seen.add(digest)
    return False


def _competing(categories: list[Category], scores: list[CategoryScore | None], options: ShardOptions):
    qualified = [
        (cat.name, s)
        for cat, s in zip(categories, scores, strict=True)
        if s is not None and s.score >= options.min_score
    ]
    if options.overlap == "all" or len(qualified) <= 1:
        return qualified
    # max() keeps the first of equals: ties go to the category listed first.
    return [max(qualified, key=lambda pair: (pair[1].score, pair[1].occurrences))]


def _push_bounded(heap: list[Candidate], candidate: Candidate, keep: int) -> None:
    if len(heap) < keep:
        heapq.heappush(heap, candidate)
    elif candidate > heap[0]:
        heapq.heapreplace(heap, candidate)


def _collect_images(
    source: Source, ranked: dict[str, list[Candidate]], options: ShardOptions, pool: Path
) -> tuple[dict[str, list[tuple[Candidate, Path]]], dict[str, int]]:
    """Fetch images for the top k of each category, in rounds: an unreadable image (with on_bad_image="skip")
    is replaced by the next candidate of its category. Images are written to `pool` as they arrive."""
    pool.mkdir(parents=True)
    chosen: dict[str, list[tuple[Candidate, Path]]] = {name: [] for name in ranked}
    cursor = dict.fromkeys(ranked, 0)
    stored: dict[int, Path | None] = {}  # row -> pooled file, None when unreadable
    skipped = dict.fromkeys(ranked, 0)
    bar = tqdm(
        total=sum(min(options.k, len(c)) for c in ranked.values()),
        desc="writing images",
        unit="img",
        disable=bar_disabled(options.progress),
    )
    while True:
        wanted = _next_wanted(ranked, chosen, cursor, options.k)
        if not wanted:
            break
        missing = {c.row for cands in wanted.values() for c in cands if c.row not in stored}
        ids = {c.row: c.source_id for cands in wanted.values() for c in cands}
        for row, payload in source.images(missing):
            stored[row] = _store_image(payload, pool / str(row), source.where(row, ids[row]), options.on_bad_image)
        for name, cands in wanted.items():
            for candidate in cands:
                if candidate.row not in stored:
                    raise DataError(f"the source did not return row {candidate.row} on the image pass", _label(source))
                path = stored[candidate.row]
                if path is None:
                    skipped[name] += 1
                    continue
                chosen[name].append((candidate, path))
                bar.update()
    bar.close()
    short = {name: len(items) for name, items in chosen.items() if len(items) < min(options.k, len(ranked[name]))}
    for name, n in short.items():
        log.warning("category %s: only %d readable images among its candidates", name, n)
    empty = [name for name, items in chosen.items() if not items]
    if empty:
        raise DataError(f"category {', '.join(empty)} has no readable image", _label(source))
    return chosen, skipped


def _label(source: Source) -> str | None:
    return source.description.get("name") or source.description.get("path")


def _next_wanted(ranked, chosen, cursor, k: int) -> dict[str, list[Candidate]]:
    wanted = {}
    for name, candidates in ranked.items():
        need = k - len(chosen[name])
        if need > 0 and cursor[name] < len(candidates):
            wanted[name] = candidates[cursor[name] : cursor[name] + need]
            cursor[name] += len(wanted[name])
    return wanted


def _store_image(payload: Payload, stem: Path, where: str, on_bad_image: str) -> Path | None:
    """Check that the image decodes and put it at `stem` + its format's suffix; None if unreadable and skipped."""
    try:
        return _write_payload(payload, stem)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        if on_bad_image == "error":
            raise DataError(
                f"unreadable image ({type(err).__name__}: {err}); --skip-bad-images skips such", where
            ) from None
        log.warning("skipping unreadable image %s: %s", where, err)
        return None


def _write_payload(payload: Payload, stem: Path) -> Path:
    if isinstance(payload, Image.Image):
        target = stem.with_suffix(".png")
        payload.save(target)
        return target
    data = payload.read_bytes() if isinstance(payload, Path) else bytes(payload)
    if not data:
        raise ValueError("no image data")
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # a full decode: truncated files fail here, not during training
        suffix = FORMAT_SUFFIX.get(image.format or "")
        if suffix is None:  # a format we do not keep as is: store a lossless copy
            target = stem.with_suffix(".png")
            image.save(target)
            return target
    target = stem.with_suffix(suffix)
    target.write_bytes(data)
    return target


def split_rows(count: int, test_fraction: float, seed: int, category: str) -> tuple[list[int], list[int]]:
    """Positions (in rank order) that go to train and to test. A seeded shuffle per category; the test share is
    round(count * test_fraction), but train keeps at least one item."""
    n_test = min(round(count * test_fraction), max(count - 1, 0))
    order = list(range(count))
    random.Random(f"{seed}/{category}").shuffle(order)
    test = sorted(order[:n_test])
    train = sorted(order[n_test:])
    return train, test


def _write_splits(staging, categories, chosen, skipped, matched, options):
    counts: dict[str, dict[str, int]] = {}
    items: list[dict] = []
    uses: dict[Path, Path] = {}  # pooled file -> first place it went (overlap="all" can use a file twice)
    for category in categories:
        selected = chosen[category.name]
        train, test = split_rows(len(selected), options.test_fraction, options.seed, category.name)
        for split, positions in (("train", train), ("test", test)):
            folder = staging / category.name / split
            folder.mkdir(parents=True)
            lines = []
            for number, position in enumerate(positions):
                candidate, pooled = selected[position]
                file_name = f"{number:05d}{pooled.suffix}"
                _place(pooled, folder / file_name, uses)
                lines.append({"file_name": file_name, "text": candidate.caption, "score": candidate.score})
                lines[-1]["source_id"] = candidate.source_id
                items.append(_manifest_item(category.name, split, file_name, position, candidate))
            with (folder / "metadata.jsonl").open("w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        counts[category.name] = {
            "candidates": matched[category.name],
            "train": len(train),
            "test": len(test),
            "skipped_images": skipped[category.name],
        }
    return counts, items


def _place(pooled: Path, target: Path, uses: dict[Path, Path]) -> None:
    if pooled in uses:
        shutil.copyfile(uses[pooled], target)
    else:
        os.replace(pooled, target)
        uses[pooled] = target


def _manifest_item(category: str, split: str, file_name: str, rank: int, candidate: Candidate) -> dict:
    return {
        "category": category,
        "split": split,
        "file": f"{category}/{split}/{file_name}",
        "rank": rank,
        "score": candidate.score,
        "occurrences": candidate.occurrences,
        "hits": list(candidate.hits),
        "source_id": candidate.source_id,
        "caption": candidate.caption,
    }


@contextmanager
def _atomic_folder(out: Path, overwrite: bool):
    """Yield a staging folder next to `out`; on success it replaces `out`, on failure it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if out.exists():
            if not overwrite:
                raise DataError("output appeared while sharding; pass --overwrite to replace it", out)
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
