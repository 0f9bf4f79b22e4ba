"""The maths of FeatureFusion on single layers: closed form, sampled convergence, identities, unlearning."""

import itertools

import pytest
import torch

from featurefusion.merge.featurefusion_math import (
    FeatureFusionOptions,
    LayerStatistics,
    coefficient_matrix,
    drop_model,
    layer_statistics,
    merge_layer,
)

ALL_OPTIONS = [
    FeatureFusionOptions(slope=s, normalization=n, threshold=t)
    for s, n, t in itertools.product(("rescale", "regress"), ("convex", "paper", "column"), (0.0, 0.3, 0.7))
]


def merged(stack, n, options, bias=None):
    stats = layer_statistics(stack, n, options, "layer")
    layer = merge_layer(stack, bias, n, stats, options)
    return layer.weight, layer.bias, layer


def reference_coefficients(stack, n, options):
    """C written out entry by entry from the paper's definitions, as a check on the factored computation."""
    k = stack.double()
    cov = k @ k.T
    var = cov.diagonal()
    p = cov / torch.sqrt(var.unsqueeze(1) * var.unsqueeze(0))
    slope = cov / (var.unsqueeze(0) if options.slope == "rescale" else var.unsqueeze(1))
    a = p.abs() * (p.abs() >= options.threshold)
    c = a * slope
    if options.normalization == "convex":
        c = c / a.sum(1, keepdim=True)
    elif options.normalization == "paper":
        c = c / c.sum(1, keepdim=True)
    else:
        c = c / c.abs().sum(0, keepdim=True)
    return c[:n].float()


def orthogonal_rows(n, d, seed=0):
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=torch.Generator().manual_seed(seed)))
    return q.T.contiguous() * torch.linspace(0.5, 2.0, n).unsqueeze(1)  # distinct norms on purpose


def test_exact_statistics_are_cosines_and_norms():
    stack = torch.randn(6, 5)
    stats = layer_statistics(stack, 2, FeatureFusionOptions(), "l")
    cos = torch.nn.functional.cosine_similarity(stack[:2].unsqueeze(1), stack.unsqueeze(0), dim=-1)
    assert torch.allclose(stats.correlation_rows(torch.arange(2)), cos, atol=1e-6)
    assert torch.allclose(stats.sigma, stack.norm(dim=1))


@pytest.mark.parametrize("options", ALL_OPTIONS, ids=str)
def test_factored_coefficients_match_the_definitions(options):
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(5, 9, generator=gen)
    stack = torch.cat(
        [base, base + 0.5 * torch.randn(5, 9, generator=gen), -2 * base + torch.randn(5, 9, generator=gen)]
    )
    stats = layer_statistics(stack, 5, options, "l")
    assert torch.allclose(coefficient_matrix(stats, 5, options), reference_coefficients(stack, 5, options), atol=1e-5)


@pytest.mark.parametrize("options", ALL_OPTIONS, ids=str)
def test_copies_of_a_model_with_uncorrelated_neurons_merge_to_the_model(options):
    # No two neurons of the layer correlate (orthogonal rows), so each base neuron only meets its own copies.
    w = orthogonal_rows(8, 12)
    bias = torch.randn(8)
    out, out_bias, _ = merged(torch.cat([w, w, w]), 8, options, torch.cat([bias] * 3))
    assert torch.allclose(out, w, atol=1e-5)
    assert torch.allclose(out_bias, bias, atol=1e-5)


def test_correlated_neurons_within_a_model_are_mixed_below_the_threshold():
    # Neuron 1 is twice neuron 0 plus a little noise: |cos| ~ 0.99. They pass any threshold below that, and mix.
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    w[1] = 2 * w[0] + 0.3 * torch.randn(16, generator=torch.Generator().manual_seed(2))
    cos = torch.nn.functional.cosine_similarity(w.unsqueeze(1), w.unsqueeze(0), dim=-1)
    assert 0.95 < cos[0, 1] < 0.999 and (cos - torch.eye(4)).abs().max() == cos[0, 1]
    stack = torch.cat([w, w])
    kept, _, _ = merged(stack, 4, FeatureFusionOptions(threshold=float(cos[0, 1]) + 1e-4))
    mixed, _, _ = merged(stack, 4, FeatureFusionOptions(threshold=0.9))
    assert torch.allclose(kept, w, atol=1e-5)
    assert not torch.allclose(mixed[:2], w[:2], atol=1e-3)
    # With the rescaling slope, neuron 1 rescaled to look like neuron 0 is close to neuron 0 itself.
    assert (mixed[0] - w[0]).norm() < 0.1 * w[0].norm()


def test_rescale_slope_undoes_a_scaled_copy_and_regress_squares_it():
    base = orthogonal_rows(4, 10)
    stack = torch.cat([base, 3.0 * base])  # the specialist is the base scaled by m = 3
    rescaled, _, _ = merged(stack, 4, FeatureFusionOptions(slope="rescale"))
    regressed, _, _ = merged(stack, 4, FeatureFusionOptions(slope="regress"))
    assert torch.allclose(rescaled, base, atol=1e-5)
    # regress uses cov/var_i = m, so the specialist's term is m * (m k_i): (k + 9 k) / 2 = 5 k
    assert torch.allclose(regressed, 5.0 * base, atol=1e-4)


def test_paper_rows_sum_to_one():
    stack = torch.randn(9, 7, generator=torch.Generator().manual_seed(3))
    options = FeatureFusionOptions(normalization="paper", threshold=0.0)
    c = coefficient_matrix(layer_statistics(stack, 3, options, "l"), 3, options)
    assert torch.allclose(c.sum(1), torch.ones(3), atol=1e-5)


def test_paper_normalisation_keeps_the_base_neuron_when_its_row_sum_vanishes():
    # k_2 = -k_1 in the second model: C row = [1 * 1, |-1| * (-1)] sums to zero
    base = orthogonal_rows(2, 4)
    stack = torch.cat([base, -base])
    out, _, layer = merged(stack, 2, FeatureFusionOptions(normalization="paper", slope="regress"))
    assert layer.degenerate_rows == 2 and torch.equal(out, base)


def test_sampled_statistics_converge_to_the_exact_ones():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 20, generator=gen)
    stack = torch.cat(
        [base, base + 0.3 * torch.randn(6, 20, generator=gen), base + 0.3 * torch.randn(6, 20, generator=gen)]
    )
    exact_opts = FeatureFusionOptions(threshold=0.0)
    exact, _, _ = merged(stack, 6, exact_opts)
    errors = []
    for samples in (64, 1024, 16384):
        opts = FeatureFusionOptions(mode="sampled", samples=samples, threshold=0.0, sample_dtype="float64")
        approx, _, _ = merged(stack, 6, opts)
        errors.append((approx - exact).norm() / exact.norm())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.02


def test_sampled_mode_is_deterministic_by_seed():
    stack = torch.randn(12, 9)
    a = merged(stack, 4, FeatureFusionOptions(mode="sampled", samples=64, seed=1, threshold=0.0))[0]
    b = merged(stack, 4, FeatureFusionOptions(mode="sampled", samples=64, seed=1, threshold=0.0))[0]
    c = merged(stack, 4, FeatureFusionOptions(mode="sampled", samples=64, seed=2, threshold=0.0))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("normalization", ["convex", "paper", "column"])
@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_dropping_a_model_equals_merging_without_it(normalization, mode):
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(5, 8, generator=gen)
    models = [base] + [base + 0.4 * torch.randn(5, 8, generator=gen) for _ in range(3)]
    options = FeatureFusionOptions(mode=mode, normalization=normalization, threshold=0.3, samples=256)
    full = layer_statistics(torch.cat(models), 5, options, "l")
    stored = LayerStatistics(full.sigma, correlation=full.correlation_rows(torch.arange(5)), column_l1=full.column_l1)
    for j in (1, 2, 3):
        rest = torch.cat([m for i, m in enumerate(models) if i != j])
        fresh = layer_statistics(rest, 5, options, "l")
        unlearned = merge_layer(rest, None, 5, drop_model(stored, 5, j), options).weight
        direct = merge_layer(rest, None, 5, fresh, options).weight
        assert torch.allclose(unlearned, direct, atol=1e-5)


def test_zero_neurons_do_not_produce_nan():
    stack = torch.randn(6, 4)
    stack[0] = 0.0
    stack[3] = 0.0
    for options in ALL_OPTIONS:
        out, _, _ = merged(stack, 3, options)
        assert torch.isfinite(out).all()


def test_options_are_validated():
    from featurefusion.errors import RecipeError

    for bad in (dict(mode="x"), dict(slope="x"), dict(normalization="x"), dict(threshold=1.5), dict(samples=1)):
        with pytest.raises(RecipeError):
            FeatureFusionOptions(**bad)
