"""Sparse FeatureFusion against the dense computation: same pairs, same merged layer up to float32 round-off."""

import itertools
from dataclasses import replace

import pytest
import torch

from featurefusion.merge.featurefusion_math import (
    FeatureFusionOptions,
    LayerStatistics,
    drop_model,
    layer_statistics,
    merge_layer,
)
from featurefusion.merge.featurefusion_sparse import screen_margin, thresholded_pairs

THRESHOLD = 0.7
GAP = 2e-5  # planted pairs sit this far above or below the threshold: far beyond float32 round-off


def unit(v):
    return v / v.norm()


def planted_layer(n=24, d=200, seed=0):
    """Base + a close fine-tune + a model far from the base, with pairs of neurons at |P| = t +- GAP in
    every block (within the base, base vs close, base vs far; positive and negative correlations)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=gen)
    close = base + 0.05 * torch.randn(n, d, generator=gen)
    far = torch.randn(n, d, generator=gen)
    models = [base, close, far]
    plants = []
    for k, (block, sign, above) in enumerate(itertools.product(range(3), (1, -1), (True, False))):
        i, j = k, n - 1 - k  # distinct base neuron and target neuron per plant
        cos = sign * (THRESHOLD + (GAP if above else -GAP))
        g = unit(base[i].double())
        w = torch.randn(d, generator=gen).double()
        w = unit(w - (w @ g) * g)  # orthogonal to g, so cos(target, g) is exactly `cos`
        norm = float(models[block][j].norm())
        models[block][j] = ((cos * g + (1 - cos * cos) ** 0.5 * w) * norm).float()
        plants.append((i, block * n + j, above))
    return torch.cat(models), n, plants


def close(a, b):
    """Equal up to float32 round-off relative to each row's size (the `paper` normaliser can be small, which
    makes a row large and scales its round-off with it)."""
    scale = b.abs().amax(dim=-1, keepdim=True) if b.ndim > 1 else b.abs()
    return bool(((a - b).abs() <= 1e-5 * scale + 1e-6).all())


def pairs_of(stack, n, options, bias=None):
    stats = layer_statistics(stack, n, options, "layer")
    got = []
    layer = merge_layer(stack, bias, n, stats, options, record=lambda r, c, v: got.append((r, c, v)))
    rows = torch.cat([g[0] for g in got])
    cols = torch.cat([g[1] for g in got])
    values = torch.cat([g[2] for g in got])
    return layer, {(int(r), int(c)) for r, c in zip(rows, cols, strict=True)}, (rows, cols, values), stats


OPTIONS = [
    FeatureFusionOptions(slope=s, normalization=z, threshold=THRESHOLD)
    for s, z in itertools.product(("rescale", "regress"), ("convex", "paper", "column"))
]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_sparse_and_dense_pick_the_same_pairs_and_agree(options):
    stack, n, plants = planted_layer()
    bias = torch.randn(stack.shape[0], generator=torch.Generator().manual_seed(3))
    sparse, sparse_pairs, _, sparse_stats = pairs_of(stack, n, options, bias)
    dense, dense_pairs, _, dense_stats = pairs_of(stack, n, replace(options, algorithm="dense"), bias)
    for i, j, above in plants:  # the planted pairs really sit where they should
        assert ((i, j) in dense_pairs) == above
    assert sparse_pairs == dense_pairs
    assert len(dense_pairs) > 1.5 * n  # same-index pairs of base and close model, the planted ones
    assert sparse.kept == dense.kept and sparse.degenerate_rows == dense.degenerate_rows
    assert close(sparse.weight, dense.weight)
    assert close(sparse.bias, dense.bias)
    if options.normalization == "column":
        assert close(sparse_stats.column_l1, dense_stats.column_l1)


@pytest.mark.parametrize("normalization", ("convex", "paper", "column"))
def test_sampled_mode_sparse_equals_dense_near_the_threshold(normalization):
    stack, n, _ = planted_layer(seed=1)
    options = FeatureFusionOptions(mode="sampled", samples=128, normalization=normalization)
    p = layer_statistics(stack, n, options, "layer").correlation_rows(torch.arange(n)).abs()
    values = p[(p > 0.3) & (p < 0.99)]
    for threshold in (float(values.min()) + 1e-5, float(values.median()) - 1e-5, float(values.median()) + 1e-5):
        chosen = replace(options, threshold=threshold)
        sparse, sparse_pairs, *_ = pairs_of(stack, n, chosen)
        dense, dense_pairs, *_ = pairs_of(stack, n, replace(chosen, algorithm="dense"))
        assert sparse_pairs == dense_pairs
        assert close(sparse.weight, dense.weight)


def test_the_screen_never_misses_a_pair_on_wide_layers():
    # Wide layers (d = 4608, as a 512-channel 3x3 conv): a close fine-tune whose neuron i also leans towards
    # base neuron i - 1 (the triangle bound's case) and a far model with correlations over the whole range
    # (its own bf16 product).
    gen = torch.Generator().manual_seed(2)
    n, d = 64, 4608
    base = torch.randn(n, d, generator=gen)
    mix = torch.linspace(0, 1, n).unsqueeze(1)
    close = base + 0.05 * torch.randn(n, d, generator=gen) + 0.8 * mix * base.roll(1, 0)
    far = mix * base.roll(1, 0) + (1 - mix) * torch.randn(n, d, generator=gen)
    k = torch.cat([base, close, far])
    stats = LayerStatistics(sigma=k.norm(dim=1), features=k)
    u = k / k.norm(dim=1, keepdim=True)
    p = (u[:n].double() @ u.double().T).abs()
    for threshold in (0.2, 0.5, 0.7):
        pairs = thresholded_pairs(stats, n, threshold)
        found = torch.zeros_like(p, dtype=torch.bool)
        found[pairs.rows, pairs.cols] = True
        assert found[p >= threshold + 1e-5].all() and not found[p < threshold - 1e-5].any()
        assert (pairs.values - p[pairs.rows, pairs.cols]).abs().max() < 1e-5
    assert screen_margin(d) < 0.02  # the screen stays a screen


@pytest.mark.parametrize("normalization", ("convex", "paper", "column"))
def test_unlearning_from_sparse_statistics_equals_the_dense_ones(normalization):
    stack, n, _ = planted_layer(seed=4)
    options = FeatureFusionOptions(normalization=normalization, threshold=THRESHOLD)
    results = []
    for algorithm in ("sparse", "dense"):
        chosen = replace(options, algorithm=algorithm)
        _, _, (rows, cols, values), stats = pairs_of(stack, n, chosen)
        stored = torch.zeros(n, stack.shape[0])
        stored[rows, cols] = values
        recorded = LayerStatistics(stats.sigma, correlation=stored, column_l1=stats.column_l1)
        rest = torch.cat([stack[:n], stack[2 * n :]])
        results.append(merge_layer(rest, None, n, drop_model(recorded, n, 1), chosen).weight)
        direct = merge_layer(rest, None, n, layer_statistics(rest, n, chosen, "layer"), chosen).weight
        assert close(results[-1], direct)
    assert close(results[0], results[1])
