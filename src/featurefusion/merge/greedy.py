"""Greedy and reverse-greedy soups (Diffusion Soup §4.2): choose which models enter a uniform soup by a metric.

- Greedy: start from the best single model; try the others in order of their own score, best first, and keep
  each one whose addition improves the soup's score.
- Reverse greedy: start from the uniform soup of all models; try removing them in order of their own score,
  worst first, and keep each removal that improves the soup's score.

The metric is any function of a set of model indices (the caller builds that uniform soup and scores it on
held-out prompts: the built-in world's scorer, ImageReward, CLIP score, ...). Scores are cached per set, and
higher is better.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

Score = Callable[[tuple[int, ...]], float]


@dataclass
class GreedyResult:
    chosen: tuple[int, ...]
    score: float
    steps: list[tuple[str, tuple[int, ...], float]] = field(default_factory=list)  # (action, set, score)
    evaluations: int = 0

    def weights(self, count: int) -> list[float]:
        """Uniform soup weights over the chosen models, zero for the others."""
        return [1.0 / len(self.chosen) if i in self.chosen else 0.0 for i in range(count)]


class _Cached:
    def __init__(self, score: Score, cache: dict | None = None):
        self._score, self.cache = score, {} if cache is None else cache

    def __call__(self, members: Sequence[int]) -> float:
        key = tuple(sorted(members))
        if key not in self.cache:
            self.cache[key] = float(self._score(key))
        return self.cache[key]


def _individual_order(score: _Cached, count: int, individual: Sequence[float] | None) -> list[int]:
    values = list(individual) if individual is not None else [score((i,)) for i in range(count)]
    return sorted(range(count), key=lambda i: values[i], reverse=True)


def greedy_soup(
    count: int, score: Score, individual: Sequence[float] | None = None, cache: dict | None = None
) -> GreedyResult:
    """`cache` (members -> score) may be shared between searches over the same models and metric."""
    cached = _Cached(score, cache)
    order = _individual_order(cached, count, individual)
    chosen = [order[0]]
    best = cached(chosen)
    result = GreedyResult((), best, [("start", (order[0],), best)])
    for candidate in order[1:]:
        trial = cached([*chosen, candidate])
        kept = trial > best
        result.steps.append((f"{'add' if kept else 'skip'} {candidate}", tuple(sorted([*chosen, candidate])), trial))
        if kept:
            chosen.append(candidate)
            best = trial
    result.chosen, result.score, result.evaluations = tuple(sorted(chosen)), best, len(cached.cache)
    return result


def reverse_greedy_soup(
    count: int, score: Score, individual: Sequence[float] | None = None, cache: dict | None = None
) -> GreedyResult:
    cached = _Cached(score, cache)
    order = list(reversed(_individual_order(cached, count, individual)))  # worst first
    chosen = list(range(count))
    best = cached(chosen)
    result = GreedyResult((), best, [("start", tuple(chosen), best)])
    for candidate in order:
        if len(chosen) == 1:
            break
        rest = [i for i in chosen if i != candidate]
        trial = cached(rest)
        kept = trial > best
        result.steps.append((f"{'remove' if kept else 'keep'} {candidate}", tuple(rest), trial))
        if kept:
            chosen = rest
            best = trial
    result.chosen, result.score, result.evaluations = tuple(sorted(chosen)), best, len(cached.cache)
    return result


def search_soup(
    models: Sequence[Path],
    score_checkpoint: Callable[[Path], float],
    output: Path,
    reverse: bool = False,
    out=None,
    workdir: Path | None = None,
    cache: dict | None = None,
    candidate_out=None,
) -> GreedyResult:
    """Greedy (or reverse-greedy) soup over checkpoint files, written to `output`.

    `score_checkpoint(path)` scores one model file (a single member, or a candidate soup written to a scratch
    file) on held-out prompts, higher is better: the built-in world's scorer and the Stable Diffusion
    metrics (ImageReward, CLIP score, ...) plug in here alike. The chosen members are written as a uniform
    soup (or copied, when one model wins). `cache` shares scores between a greedy and a reverse-greedy search.
    Candidates are written with `candidate_out` (default: `out`), e.g. as UNet-only files.
    """
    from featurefusion.merge import operations

    models = [Path(m) for m in models]
    output = Path(output)
    scratch = Path(workdir or output.parent) / f".{output.name}.candidate.safetensors"
    out = out or operations.OutputOptions(progress=False)
    candidate_out = candidate_out or out

    def score(members: tuple[int, ...]) -> float:
        if len(members) == 1:
            return score_checkpoint(models[members[0]])
        operations.merge([models[i] for i in members], scratch, "soup", out=candidate_out)
        return score_checkpoint(scratch)

    try:
        result = (reverse_greedy_soup if reverse else greedy_soup)(len(models), score, cache=cache)
    finally:
        scratch.unlink(missing_ok=True)
    chosen = [models[i] for i in result.chosen]
    if len(chosen) == 1:
        operations.convert(chosen[0], output, out)
    else:
        operations.merge(chosen, output, "soup", out=out)
    return result
