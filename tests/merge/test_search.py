"""Searches over merges: a grid of methods and options, and block weights, scored by a function of the file."""

import pytest
import torch

from featurefusion.errors import RecipeError
from featurefusion.io.checkpoint import open_checkpoint
from featurefusion.io.recipe import recipe_of
from featurefusion.merge import operations
from featurefusion.merge.search import Candidate, grid, search_block_weights, search_merges


def unet(path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ckpt:
        return {k: ckpt.read(k).float() for k in ckpt.keys("unet")}


def closeness_to(target: dict[str, torch.Tensor]):
    """A stand-in metric: how close a candidate's UNet is to a target UNet (higher is better)."""

    def score(path) -> float:
        merged = unet(path)
        return -sum(float((merged[k] - target[k]).square().sum()) for k in target)

    return score


def test_grid_spans_each_method_s_search_space():
    candidates = grid(["task-arithmetic", "ties"])
    assert [c.label for c in candidates[:4]] == [f"task-arithmetic scale={s}" for s in ("0.2", "0.3", "0.5", "1")]
    assert len(candidates) == 4 + 2 * 3
    assert grid(["soup"]) == [Candidate.of("soup")]
    assert len(grid(["dare"], {"dare": {"density": (0.1,)}})) == 1


def test_search_finds_the_candidate_the_metric_prefers_and_writes_it(tiny, tmp_path):
    target = tmp_path / "target.safetensors"
    operations.merge(tiny.models, target, "task-arithmetic", scale=0.3)
    best = tmp_path / "best.safetensors"
    cache = {}
    result = search_merges(tiny.models, grid(["task-arithmetic", "soup"]), closeness_to(unet(target)), best,
                           cache=cache)  # fmt: skip
    assert result.best == Candidate.of("task-arithmetic", {"scale": 0.3})
    assert len(result.scores) == 5 and len(cache) == 5
    with open_checkpoint(best) as ckpt:
        assert recipe_of(ckpt.metadata, best).options["scale"] == 0.3
    assert "task-arithmetic scale=0.3 **(chosen)**" in result.table()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors", "target.safetensors"]
    # A second search with the same cache scores nothing again.
    calls = []
    search_merges(tiny.models, grid(["task-arithmetic"]), lambda p: calls.append(p) or 0.0, None, cache=cache)
    assert calls == []


def test_block_search_moves_one_block_at_a_time_towards_what_scores_best(tiny, tmp_path):
    from featurefusion.merge.methods.block_weighted import block_names

    with open_checkpoint(tiny.base) as ckpt:
        names = block_names(ckpt.unet_layout)
    wanted = [1.0 if name in ("M00", "OUT00") else 0.5 for name in names]
    target = tmp_path / "target.safetensors"
    operations.merge(tiny.models, target, "block-weighted", block_weights=[",".join(map(str, wanted))])
    result = search_block_weights(tiny.models, closeness_to(unet(target)), None, start=0.5, values=(2.0,))
    assert result.weights[1:] == wanted[1:]  # BASE is not searched by default
    assert [(block, value) for block, value, _, kept in result.steps if kept] == [("M00", 1.0), ("OUT00", 1.0)]
    assert len(result.steps) == len(names) - 1
    assert not list(tmp_path.glob(".*candidate*"))


def test_candidates_with_bad_options_fail_before_anything_is_scored():
    with pytest.raises(RecipeError, match="density"):
        Candidate.of("ties", {"density": 2.0})
    with pytest.raises(RecipeError, match="nothing to search"):
        search_merges([], [], lambda p: 0.0, None)
