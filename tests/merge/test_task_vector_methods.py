"""TIES, DARE, DARE-TIES, TSV-Merge, Iso-C and Iso-CTS: their maths on plain tensors, and through the engine."""

import pytest
import torch

from featurefusion.errors import RecipeError
from featurefusion.io.checkpoint import open_checkpoint
from featurefusion.merge import operations
from featurefusion.merge.methods.dare import drop_and_rescale
from featurefusion.merge.methods.iso import iso_c_combine, iso_cts_combine
from featurefusion.merge.methods.ties import elect_and_average, keep_largest
from featurefusion.merge.methods.tsv import tsv_combine


def unet(path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ckpt:
        return {k: ckpt.read(k).float() for k in ckpt.keys("unet")}


def assert_states_close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


# ---- TIES and DARE on plain tensors ---------------------------------------------------------------------
def test_keep_largest_keeps_exactly_the_top_share_by_magnitude():
    delta = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 0.0, 4.0, -1.0, 0.05, 3.0])
    kept = keep_largest(delta, 0.3)
    assert torch.equal(kept, torch.tensor([0, -5.0, 0, 0, 0, 0, 4.0, 0, 0, 3.0]))
    assert torch.equal(keep_largest(delta, 1.0), delta)


def test_sign_election_averages_only_the_agreeing_values():
    a = torch.tensor([1.0, 2.0, -3.0, 0.0, 1.0])
    b = torch.tensor([3.0, -1.0, -1.0, 0.0, -1.0])
    # entry 0: both +, mean 2; entry 1: sum +1 elects +, only a agrees: 2; entry 2: both -, mean -2;
    # entry 3: nothing kept; entry 4: sum 0 elects no sign, the entry stays the base's.
    assert torch.equal(elect_and_average([a, b]), torch.tensor([2.0, 2.0, -2.0, 0.0, 0.0]))


def test_dare_keeps_the_expected_task_vector_and_its_seed_decides_the_draw():
    delta = torch.ones(200_000)
    dropped = drop_and_rescale(delta, 0.25, seed=3)
    assert set(dropped.unique().tolist()) == {0.0, 4.0}
    assert dropped.mean().item() == pytest.approx(1.0, abs=0.02)
    assert torch.equal(dropped, drop_and_rescale(delta, 0.25, seed=3))
    assert not torch.equal(dropped, drop_and_rescale(delta, 0.25, seed=4))


# ---- TSV and Iso on plain tensors ---------------------------------------------------------------------
def orthogonal_low_rank_deltas(tasks=3, size=12, rank=4, seed=0):
    """Task vectors of rank `rank` whose left and right singular subspaces are mutually orthogonal."""
    gen = torch.Generator().manual_seed(seed)
    q_left, _ = torch.linalg.qr(torch.randn(size, size, generator=gen))
    q_right, _ = torch.linalg.qr(torch.randn(2 * size, 2 * size, generator=gen))
    deltas = []
    for t in range(tasks):
        cols = slice(t * rank, (t + 1) * rank)
        values = torch.rand(rank, generator=gen) + 0.5
        deltas.append((q_left[:, cols] * values) @ q_right[:, cols].T)
    return deltas


def test_tsv_of_orthogonal_low_rank_task_vectors_is_their_sum():
    deltas = orthogonal_low_rank_deltas()  # rank 4 each = min(12, 24) // 3 directions kept per task
    torch.testing.assert_close(tsv_combine(deltas), sum(deltas), atol=1e-5, rtol=0)


def test_tsv_keeps_rank_over_tasks_directions_per_task_and_averages_vectors():
    gen = torch.Generator().manual_seed(1)
    deltas = [torch.randn(8, 6, generator=gen) for _ in range(3)]
    merged = tsv_combine(deltas)
    assert torch.linalg.matrix_rank(merged) == 3 * (6 // 3)
    biases = [torch.randn(5, generator=gen) for _ in range(3)]
    torch.testing.assert_close(tsv_combine(biases), sum(biases) / 3)
    conv = [torch.randn(4, 2, 3, 3, generator=gen) for _ in range(2)]
    assert tsv_combine(conv).shape == (4, 2, 3, 3)


def test_iso_c_flattens_the_spectrum_of_the_sum():
    gen = torch.Generator().manual_seed(2)
    deltas = [torch.randn(10, 7, generator=gen) for _ in range(3)]
    total = sum(deltas)
    merged = iso_c_combine(deltas)
    values = torch.linalg.svdvals(merged)
    torch.testing.assert_close(values, torch.full_like(values, torch.linalg.svdvals(total).mean().item()))
    # same singular subspaces as the sum: projecting the sum onto the merged column space changes nothing
    u = torch.linalg.svd(merged, full_matrices=False)[0]
    torch.testing.assert_close(u @ (u.T @ total), total, atol=1e-4, rtol=0)


def test_iso_cts_with_the_whole_common_space_is_iso_c_and_otherwise_flat_too():
    gen = torch.Generator().manual_seed(3)
    deltas = [torch.randn(16, 12, generator=gen) for _ in range(3)]
    torch.testing.assert_close(iso_cts_combine(deltas, 1.0), iso_c_combine(deltas), atol=1e-5, rtol=0)
    merged = iso_cts_combine(deltas, 0.5)
    values = torch.linalg.svdvals(merged)
    torch.testing.assert_close(values, torch.full_like(values, values.mean().item()), atol=1e-4, rtol=0)
    assert not torch.allclose(merged, iso_c_combine(deltas), atol=1e-3)


# ---- through the engine ---------------------------------------------------------------------------------
def test_ties_with_one_specialist_and_full_density_is_task_arithmetic(tiny, tmp_path):
    ties, ta = tmp_path / "ties.safetensors", tmp_path / "ta.safetensors"
    models = [tiny.base, tiny.specialists[0]]
    operations.merge(models, ties, "ties", density=1.0, scale=0.7)
    operations.merge(models, ta, "task-arithmetic", scale=0.7)
    assert_states_close(unet(ties), unet(ta))


def test_dare_with_full_density_is_task_arithmetic(tiny, tmp_path):
    dare, ta = tmp_path / "dare.safetensors", tmp_path / "ta.safetensors"
    operations.merge(tiny.models, dare, "dare", density=1.0, scale=0.4)
    operations.merge(tiny.models, ta, "task-arithmetic", scale=0.4)
    assert_states_close(unet(dare), unet(ta))


def test_sparse_methods_change_only_what_they_keep(tiny, tmp_path):
    base = unet(tiny.base)
    for method in ("ties", "dare", "dare-ties"):
        out = tmp_path / f"{method}.safetensors"
        operations.merge(tiny.models, out, method, density=0.1)
        merged = unet(out)
        key = "unet.down_blocks.0.resnets.0.conv1.weight"
        changed = (merged[key] - base[key]).abs() > 1e-7
        # TIES keeps 10 % of each task vector (at most 20 % of entries change, fewer where signs collide);
        # DARE keeps each entry with probability 0.1 per specialist (about 19 % change).
        assert 0.05 < changed.float().mean().item() < 0.25, method


def test_merging_identical_models_gives_the_model_for_every_task_vector_method(tiny, tmp_path):
    for method in ("ties", "dare", "dare-ties", "tsv", "iso-c", "iso-cts"):
        out = tmp_path / f"{method}.safetensors"
        operations.merge([tiny.base] * 3, out, method)
        assert_states_close(unet(out), unet(tiny.base), atol=1e-6)


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("ties", {"density": 0.0}, "density"),
        ("ties", {"density": 1.5}, "density"),
        ("dare", {"density": -0.1}, "density"),
        ("tsv", {"scale": 0.0}, "scale"),
        ("iso-c", {"scale": float("nan")}, "scale"),
        ("iso-cts", {"common_fraction": 0.0}, "common_fraction"),
        ("ties", {"threshold": 0.5}, "ties has no option 'threshold'"),
    ],
)
def test_bad_options_are_clear_errors_and_write_nothing(tiny, tmp_path, method, options, message):
    out = tmp_path / "x.safetensors"
    with pytest.raises(RecipeError, match=message):
        operations.merge(tiny.models, out, method, **options)
    assert list(tmp_path.iterdir()) == []
