"""Specialist data shards: keep the top k captions per category, split train/test, write the folders (paper §5.1.1).

The captions come from a `sources.Source` (a captioned folder or a Hugging Face dataset) and are scored by
`keywords.KeywordScorer`. Within a category, captions rank by score, then total hits, then source order
(earlier first). With `overlap="best"` (default) a caption competes only in its best category (ties: the
one listed first in the categories file); with `overlap="all"` it competes in every category it scores in.
Only the selected rows' images are fetched, each fully decoded once to check it; an unreadable one is an
error, or (with `on_bad_image="skip"`) is replaced by the category's next candidate.

Output (written to a temporary sibling folder and renamed into place at the end):
    OUT/manifest.json
    OUT/<category>/<train|test>/metadata.jsonl   # file_name, text, score, source_id
    OUT/<category>/<train|test>/00000.jpg ...
Each split folder is itself a local captioned folder, readable by `sources.read_captioned_folder` and by
`datasets.load_dataset("imagefolder", data_dir=...)`.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import logging
import os
import random
import shutil
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from featurefusion import __version__
from featurefusion.errors import DataError
from featurefusion.progress import bar_disabled
from featurefusion.train.keywords import (
    WORD,
    Category,
    CategoryScore,
    KeywordScorer,
    default_categories_file,
    load_categories,
)
from featurefusion.train.sources import MANIFEST_NAME, FolderSource, HFDatasetSource, Payload, Source

log = logging.getLogger(__name__)

OVERLAP_POLICIES = ("best", "all")
BAD_IMAGE_POLICIES = ("error", "skip")
MANIFEST_VERSION = 1
FORMAT_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


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
