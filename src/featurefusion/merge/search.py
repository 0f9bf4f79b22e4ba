"""Choose a merge by its score on validation prompts: a grid of methods and options, greedy soups, block weights.

Every candidate merge is written to a scratch file and scored by `score_checkpoint(path) -> float` (higher is
better): the built-in world's scorer, CLIP score, ImageReward or FID (negated) on held-out prompts. The best
candidate is written to the output. Scores are cached by (method, options), so searches that share a cache
(the demo's rows, a grid and a block search) never score the same merge twice.

- `grid(methods)`: every combination of each method's `search_space` (or a given space).
- `search_merges`: score a list of candidates, write the best.
- `search_block_weights`: autoMBW-style coordinate ascent over the block weights of `block-weighted`, one
  shared weight per UNet block for all specialists (a per-block task-arithmetic scale).
- Greedy and reverse-greedy soups (`featurefusion.merge.greedy`) are searches of the same kind; their result
  is a soup with uniform weights over the chosen members (`Candidate.soup`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from featurefusion.errors import RecipeError
from featurefusion.merge import registry

Score = Callable[[Path], float]


@dataclass(frozen=True)
class Candidate:
    method: str
    options: tuple[tuple[str, object], ...] = ()  # sorted (name, value) pairs: hashable, so it can key a cache

    @classmethod
    def of(cls, method: str, options: dict | None = None) -> Candidate:
        registry.get(method).make_options(dict(options or {}))  # bad values fail before anything is scored
        return cls(method, tuple(sorted((k, _frozen(v)) for k, v in (options or {}).items())))

    @classmethod
    def soup(cls, weights: Sequence[float]) -> Candidate:
        return cls.of("soup", {"weights": list(weights)})

    @property
    def option_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.options}

    @property
    def title(self) -> str:
        """For reports: "TIES (density 0.2, scale 1)"."""
        return self.title_without(())

    def title_without(self, hidden) -> str:
        """The title without the options named in `hidden` (those every candidate shares)."""
        shown = ", ".join(f"{k.replace('_', ' ')} {_shown(v)}" for k, v in self.options if k not in hidden)
        name = registry.get(self.method).title
        return f"{name} ({shown})" if shown else name

    @property
    def label(self) -> str:
        shown = " ".join(f"{k}={_shown(v)}" for k, v in self.options)
        return f"{self.method} {shown}".strip()


def _frozen(value):
    return tuple(value) if isinstance(value, list) else value


def _shown(value) -> str:
    if value is None:
        return "all"  # the options whose None means "no limit" (ZipIt!'s depth)
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def grid(methods: Sequence[str], spaces: dict[str, dict[str, Sequence]] | None = None) -> list[Candidate]:
    """Every combination of option values for each method (its registered `search_space` unless `spaces`
    names one); a method without a space contributes its defaults."""
    candidates = []
    for name in methods:
        space = (spaces or {}).get(name, registry.get(name).search_space)
        keys = list(space)
        for values in itertools.product(*(space[k] for k in keys)):
            candidates.append(Candidate.of(name, dict(zip(keys, values, strict=True))))
    return candidates


@dataclass
class SearchResult:
    scores: dict[Candidate, float] = field(default_factory=dict)  # every candidate scored, in order
    best: Candidate | None = None

    @property
    def best_score(self) -> float:
        return self.scores[self.best]

    def best_of(self, method: str) -> Candidate:
        return max((c for c in self.scores if c.method == method), key=self.scores.get)

    def table(self, metric: str = "score") -> str:
        lines = [f"| candidate | {metric} |", "|---|---:|"]
        for candidate, value in self.scores.items():
            mark = " **(chosen)**" if candidate == self.best else ""
            lines.append(f"| {candidate.label}{mark} | {value:.4f} |")
        return "\n".join(lines) + "\n"


class CandidateScorer:
    """Writes candidate merges to one scratch file and scores them, with a cache shared across searches."""

    def __init__(self, models: Sequence[Path], score: Score, scratch: Path, out=None, cache: dict | None = None):
        self.models, self.score, self.scratch, self.out = [Path(m) for m in models], score, Path(scratch), out
        self.cache: dict[Candidate, float] = {} if cache is None else cache

    def __call__(self, candidate: Candidate) -> float:
        from featurefusion.merge import operations

        if candidate not in self.cache:
            out = self.out or operations.OutputOptions(progress=False)
            operations.merge(
                self.models, self.scratch, candidate.method, candidate.option_dict, out=out, save_statistics=False
            )
            value = float(self.score(self.scratch))
            if math.isnan(value):
                raise RecipeError(f"the metric gave NaN for {candidate.label}")
            self.cache[candidate] = value
        return self.cache[candidate]

    def close(self) -> None:
        self.scratch.unlink(missing_ok=True)


def search_merges(
    models: Sequence[Path],
    candidates: Sequence[Candidate],
    score_checkpoint: Score,
    output: Path | None,
    *,
    out=None,
    candidate_out=None,
    cache: dict | None = None,
    workdir: Path | None = None,
) -> SearchResult:
    """Score every candidate (written with `candidate_out`, e.g. UNet-only files) and write the best to
    `output` (with `out`), unless `output` is None."""
    if not candidates:
        raise RecipeError("nothing to search: no candidate merges")
    scorer = _scorer(models, score_checkpoint, output, candidate_out, cache, workdir)
    result = SearchResult()
    try:
        for candidate in candidates:
            result.scores[candidate] = scorer(candidate)
    finally:
        scorer.close()
    result.best = max(result.scores, key=result.scores.get)
    if output is not None:
        write(models, result.best, output, out)
    return result


def write(models: Sequence[Path], candidate: Candidate, output: Path, out=None) -> None:
    from featurefusion.merge import operations

    operations.merge(list(models), output, candidate.method, candidate.option_dict, out=out)


@dataclass
class BlockSearchResult(SearchResult):
    blocks: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)  # the chosen weight of every block
    steps: list[tuple[str, float, float, bool]] = field(default_factory=list)  # (block, value, score, kept)


def search_block_weights(
    models: Sequence[Path],
    score_checkpoint: Score,
    output: Path | None,
    *,
    start: float,
    values: Sequence[float] = (0.0, 2.0),
    include_base: bool = False,
    out=None,
    candidate_out=None,
    cache: dict | None = None,
    workdir: Path | None = None,
) -> BlockSearchResult:
    """Coordinate ascent over per-block weights, as autoMBW does: start with `start` in every block (task
    arithmetic with that scale), then visit the blocks in order and try each of `values` (multiples of
    `start`) there, keeping a change whenever the score improves. One weight per block is shared by all
    specialists. BASE (text encoder) is searched only with `include_base`."""
    from featurefusion.io.checkpoint import open_checkpoint
    from featurefusion.merge.methods.block_weighted import block_names

    with open_checkpoint(models[0]) as base:
        names = block_names(base.unet_layout)
    scorer = _scorer(models, score_checkpoint, output, candidate_out, cache, workdir)
    weights = [start] * len(names)

    def candidate(w: list[float]) -> Candidate:
        return Candidate.of("block-weighted", {"block_weights": [",".join(f"{x:g}" for x in w)]})

    result = BlockSearchResult(blocks=names)
    try:
        best = candidate(weights)
        result.scores[best] = best_score = scorer(best)
        for i, block in enumerate(names):
            if block == "BASE" and not include_base:
                continue
            for multiple in values:
                trial = [*weights[:i], start * multiple, *weights[i + 1 :]]
                if trial == weights:
                    continue
                c = candidate(trial)
                result.scores[c] = score = scorer(c)
                kept = score > best_score
                result.steps.append((block, start * multiple, score, kept))
                if kept:
                    weights, best, best_score = trial, c, score
    finally:
        scorer.close()
    result.best, result.weights = best, weights
    if output is not None:
        write(models, best, output, out)
    return result


def _scorer(models, score_checkpoint, output, candidate_out, cache, workdir) -> CandidateScorer:
    folder = Path(workdir or (Path(output).parent if output is not None else Path.cwd()))
    name = Path(output).name if output is not None else "search"
    return CandidateScorer(models, score_checkpoint, folder / f".{name}.candidate.safetensors", candidate_out, cache)
