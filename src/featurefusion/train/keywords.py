"""Categories and keyword scoring: which captions belong to which specialist category, and how strongly.

Categories come from a YAML or JSON mapping `name: [keyword, ...]` (`categories.yaml` next to this module is
the shipped default: the paper's seven categories, §5.1.1). `shard` ranks captions by these scores.

Scoring (documented in docs/training.md): a caption is lower-cased and split into words (runs of letters and
digits); a keyword (one or more words) hits when it appears as whole consecutive words, where the last word
may carry a plural "s" or "es". A caption's score for a category is the number of *distinct* keywords of
that category it hits; the total number of hits (repeats counted) is kept too, as the first tie-break.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from featurefusion.errors import DataError

CATEGORY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
WORD = re.compile(r"[a-z0-9]+")


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
