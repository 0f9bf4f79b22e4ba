"""Tests of the toy world's scorer (featurefusion.toyworld.scorer), on the shipped weights."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from safetensors.torch import save_file

from featurefusion.toyworld.scorer import (
    ATTRIBUTES,
    CLASSES,
    SHIPPED_SCORER,
    UNIFORM_TASK,
    AlignmentScore,
    Scorer,
    ScorerCheck,
    ScorerError,
    check_scorer,
    frechet_distance,
    frechet_distances,
    load_scorer,
    load_shipped_scorer,
    noise_images,
    prompt_alignment,
    reference_images,
    save_scorer,
    spec_labels,
    train_scorer,
)
from featurefusion.toyworld.world import COLOURS, Spec, all_specs, generate, split_seed, standard_tasks


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return load_shipped_scorer()


@pytest.fixture(scope="module")
def held_out() -> tuple[list[Spec], torch.Tensor]:
    """1024 real test-split images, exactly 8 of every one of the 128 specs."""
    specs = all_specs() * 8
    return specs, generate(specs, split_seed(31, "test", UNIFORM_TASK))


@pytest.fixture(scope="module")
def check(scorer) -> ScorerCheck:
    return check_scorer(scorer, n=1000, seed=7)


def test_shipped_scorer_is_small_and_has_the_default_config():
    assert SHIPPED_SCORER.is_file()
    assert SHIPPED_SCORER.stat().st_size < 1_000_000
    scorer = load_shipped_scorer()
    assert isinstance(scorer, Scorer) and not scorer.training
    assert scorer.config == Scorer().config


def test_shipped_scorer_accuracy_on_held_out_real_images(scorer, held_out):
    specs, images = held_out
    score = prompt_alignment(scorer, images, specs)
    assert score.count == len(specs) == 1024
    for attribute in (*ATTRIBUTES, "joint"):
        assert getattr(score, attribute) >= 0.95, score


def test_every_combination_is_learnt(scorer, held_out):
    """Rare objects and styles too: each of the 128 specs has at least 7 of its 8 images fully right."""
    specs, images = held_out
    pred, labels = scorer.predict(images), spec_labels(specs)
    right = torch.stack([pred[a] == labels[a] for a in ATTRIBUTES]).all(dim=0)
    per_spec: dict[Spec, list[bool]] = defaultdict(list)
    for spec, ok in zip(specs, right.tolist(), strict=True):
        per_spec[spec].append(ok)
    assert len(per_spec) == 128
    worst = min(per_spec, key=lambda s: sum(per_spec[s]))
    assert sum(per_spec[worst]) >= 7, f"{worst.prompt}: {per_spec[worst]}"


def test_check_scorer_real_and_noise_accuracy(check):
    assert check.chance == {"object": 1 / 8, "colour": 1 / 4, "style": 1 / 4, "joint": 1 / 128}
    for attribute in (*ATTRIBUTES, "joint"):
        assert check.real_accuracy[attribute] >= 0.95, check
    # Noise against random specs: chance by construction (3 standard errors at n=1000 are <= 0.041).
    for attribute in ATTRIBUTES:
        assert abs(check.noise_accuracy[attribute] - check.chance[attribute]) <= 0.045, check
    assert check.noise_accuracy["joint"] <= 0.03, check


def test_check_scorer_fids(check):
    assert 0 <= check.fid_real_vs_real < 0.05 * check.fid_noise_vs_real, check


def test_fid_same_task_is_much_smaller_than_noise_or_another_task(scorer):
    tasks = standard_tasks()
    dark_a = reference_images(tasks["style-dark"], 500, seed=1)
    dark_b = reference_images("style-dark", 500, seed=2)
    striped = reference_images(tasks["style-striped"], 500, seed=1)
    noise = noise_images(500, seed=3)
    same, vs_noise, vs_other = frechet_distances(scorer, [dark_b, noise, striped], dark_a)
    assert same == pytest.approx(frechet_distance(scorer, dark_b, dark_a), rel=1e-6)
    assert 0 <= same < 0.1 * vs_other, (same, vs_other)
    assert same < 0.1 * vs_noise, (same, vs_noise)
    round_a = reference_images("objects-round", 500, seed=1)
    round_b = reference_images("objects-round", 500, seed=2)
    pointy = reference_images("objects-pointy", 500, seed=1)
    same_objects, other_objects = frechet_distances(scorer, [round_b, pointy], round_a)
    assert same_objects < 0.1 * other_objects, (same_objects, other_objects)


def _frechet_float64(a: torch.Tensor, b: torch.Tensor) -> float:
    """Independent reference: ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), via eigh."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)

    def sqrtm(m: torch.Tensor) -> torch.Tensor:
        w, v = torch.linalg.eigh((m + m.T) / 2)
        return (v * w.clamp(min=0).sqrt()) @ v.T

    root = sqrtm(s_a)
    return float((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * sqrtm(root @ s_b @ root).trace())


def test_frechet_distance_matches_an_independent_float64_computation(scorer):
    images = reference_images("broad", 400, seed=5)
    reference = reference_images("style-outlined", 400, seed=5)
    expected = _frechet_float64(scorer.batched_features(images), scorer.batched_features(reference))
    assert frechet_distance(scorer, images, reference) == pytest.approx(expected, rel=1e-3)
    assert frechet_distance(scorer, reference, reference) == pytest.approx(0.0, abs=1e-2 * expected)


def test_frechet_distance_leaves_the_scorer_alone(scorer):
    before = {k: v.clone() for k, v in scorer.state_dict().items()}
    frechet_distance(scorer, noise_images(64, 0), reference_images("broad", 64, 0))
    after = scorer.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], v) for k, v in before.items())


def test_wrong_colours_get_low_colour_accuracy(scorer, held_out):
    specs, images = held_out
    swapped = [Spec(s.object, COLOURS[(COLOURS.index(s.colour) + 1) % len(COLOURS)], s.style) for s in specs]
    score = prompt_alignment(scorer, images, swapped)
    assert score.colour <= 0.05, score
    assert score.joint <= 0.05, score
    assert score.object >= 0.95 and score.style >= 0.95, score  # only the colour is wrong


def test_save_load_round_trip(scorer, held_out, tmp_path):
    _, images = held_out
    path = save_scorer(scorer, tmp_path / "sub" / "scorer.safetensors")
    loaded = load_scorer(path)
    assert loaded.config == scorer.config
    expected, got = scorer.predict(images), loaded.predict(images)
    assert all(torch.equal(expected[a], got[a]) for a in ATTRIBUTES)
    assert torch.equal(scorer.features(images[:16]), loaded.features(images[:16]))
    assert not list(tmp_path.glob("sub/.*tmp"))  # no temporary file left behind

    torch.manual_seed(0)
    small = Scorer(width=8, feature_dim=16, image_size=20)
    loaded_small = load_scorer(save_scorer(small, tmp_path / "small.safetensors"))
    assert loaded_small.config == {"width": 8, "feature_dim": 16, "image_size": 20}
    x = torch.rand(4, 3, 20, 20) * 2 - 1
    assert torch.equal(small.eval()(x)["style"], loaded_small(x)["style"])


def test_load_rejects_files_that_are_not_scorers(tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, other)
    with pytest.raises(ScorerError, match="not a toy-world scorer"):
        load_scorer(other)
    with pytest.raises(ScorerError, match="not found"):
        load_scorer(tmp_path / "missing.safetensors")


def test_bad_inputs_are_rejected(scorer, held_out):
    specs, images = held_out
    with pytest.raises(ScorerError, match="specs"):
        prompt_alignment(scorer, images[:10], specs[:9])
    with pytest.raises(ScorerError, match="shape"):
        scorer.predict(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="multiple of 4"):
        Scorer(image_size=18)


def test_predict_outputs(scorer, held_out):
    _, images = held_out
    images = images[:512]
    logits = scorer(images[:3])
    assert {a: tuple(v.shape) for a, v in logits.items()} == {a: (3, len(CLASSES[a])) for a in ATTRIBUTES}
    assert scorer.features(images[:3]).shape == (3, 64)
    pred = scorer.predict(images, batch_size=512)
    assert all(p.dtype == torch.int64 and p.shape == (512,) for p in pred.values())
    # Batching does not change the predictions.
    small_batches = scorer.predict(images, batch_size=100)
    assert all(torch.equal(pred[a], small_batches[a]) for a in ATTRIBUTES)


def test_reference_and_noise_images_are_deterministic():
    a, b = reference_images("style-dark", 8, seed=4), reference_images("style-dark", 8, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, reference_images("style-dark", 8, seed=5))
    n = noise_images(8, seed=4)
    assert torch.equal(n, noise_images(8, seed=4)) and n.min() >= -1 and n.max() <= 1
    with pytest.raises(ScorerError, match="unknown task"):
        reference_images("no-such-task", 4)


def test_train_scorer_smoke():
    threads = torch.get_num_threads()
    first = train_scorer(steps=5, batch_size=32, seed=3, progress=False, num_threads=1)
    assert torch.get_num_threads() == threads
    assert isinstance(first, Scorer) and not first.training
    second = train_scorer(steps=5, batch_size=32, seed=3, progress=False, num_threads=1)
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())
    specs = all_specs()[:16]
    score = prompt_alignment(first, generate(specs, 0), specs)
    assert isinstance(score, AlignmentScore) and score.count == 16
