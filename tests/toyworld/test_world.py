"""Tests of the toy world's image generator, prompts and tasks (featurefusion.toyworld.world)."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from featurefusion.toyworld.world import (
    COLOURS,
    COMMON_OBJECTS,
    OBJECT_GROUPS,
    OBJECTS,
    PALETTE,
    RARE_OBJECTS,
    SPECIAL_STYLES,
    STYLES,
    VOCABULARY,
    PromptError,
    Spec,
    Task,
    all_specs,
    broad_task,
    generate,
    image_grid,
    make_batch,
    parse_prompt,
    render,
    sample_specs,
    split_seed,
    standard_tasks,
    to_pil,
    to_uint8,
)

PALETTE_ARR = np.array([PALETTE[c] for c in COLOURS])


def _specs(n: int = 64) -> list[Spec]:
    return sample_specs(broad_task(plain_weight=0.25, rare_object_weight=1.0), n, seed=3)


# ---------------------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------------------


def test_generate_same_seed_is_bitwise_identical():
    specs = _specs()
    a, b = generate(specs, seed=7), generate(specs, seed=7)
    assert torch.equal(a, b)


def test_generate_different_seed_differs_for_every_image():
    specs = _specs()
    a, b = generate(specs, seed=7), generate(specs, seed=8)
    per_image = (a - b).abs().flatten(1).amax(dim=1)
    assert bool((per_image > 0.05).all())


def test_generate_prefix_and_chunking_do_not_change_images():
    specs = _specs(50)
    full = generate(specs, seed=11)
    assert torch.equal(generate(specs[:13], seed=11), full[:13])
    assert torch.equal(generate(specs, seed=11, chunk=7), full)


def test_sample_specs_deterministic_and_seed_dependent():
    task = standard_tasks()["broad"]
    assert sample_specs(task, 200, seed=5) == sample_specs(task, 200, seed=5)
    assert sample_specs(task, 200, seed=5) != sample_specs(task, 200, seed=6)
    assert sample_specs(task, 40, seed=5) == sample_specs(task, 200, seed=5)[:40]


# ---------------------------------------------------------------------------------------------------------
# Shapes, ranges, conversions
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 24, 32])
def test_shape_dtype_and_range(size):
    x = generate(_specs(20), seed=0, size=size)
    assert x.shape == (20, 3, size, size)
    assert x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    # the range is used, not squeezed: light backgrounds near +1, saturated colours near -1 in some channel
    assert float(x.max()) > 0.7 and float(x.min()) < -0.7


@pytest.mark.parametrize("size", [8, 15, 33, 64])
def test_size_out_of_range_is_rejected(size):
    with pytest.raises(ValueError, match="size"):
        generate(_specs(2), seed=0, size=size)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="seed"):
        generate(_specs(2), seed=-1)
    with pytest.raises(TypeError):
        generate(["a red circle, plain"], seed=0)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="split"):
        sample_specs(standard_tasks()["broad"], 3, seed=0, split="valid")  # type: ignore[arg-type]


def test_empty_batch():
    assert generate([], seed=0).shape == (0, 3, 16, 16)


def test_uint8_pil_and_grid_conversions():
    x = generate(_specs(6), seed=1)
    u = to_uint8(x)
    assert u.shape == (6, 16, 16, 3) and u.dtype == np.uint8
    expected = np.round((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5)
    assert np.abs(u.astype(np.float64) - expected).max() <= 1
    img = to_pil(x[0], upscale=4)
    assert isinstance(img, Image.Image) and img.size == (64, 64) and img.mode == "RGB"
    assert np.array_equal(np.asarray(to_pil(x[0]))[3, 5], u[0, 3, 5])
    grid = image_grid(x, nrow=4, upscale=2, pad=1)
    assert grid.size == ((4 * 17 + 1) * 2, (2 * 17 + 1) * 2)
    with pytest.raises(ValueError):
        to_uint8(torch.zeros(2, 4, 16, 16))


# ---------------------------------------------------------------------------------------------------------
# Prompts and vocabulary
# ---------------------------------------------------------------------------------------------------------


def test_prompt_round_trip_for_every_combination():
    specs = all_specs()
    assert len(specs) == len(OBJECTS) * len(COLOURS) * len(STYLES) == len(set(specs))
    prompts = {s.prompt for s in specs}
    assert len(prompts) == len(specs)
    for spec in specs:
        assert parse_prompt(spec.prompt) == spec
        assert Spec.from_prompt(spec.prompt.upper().replace(",", " ,  ")) == spec
        assert VOCABULARY.decode(VOCABULARY.encode(spec.prompt)) == spec.prompt


def test_prompt_form():
    assert Spec("triangle", "red", "striped").prompt == "a red triangle, striped"


@pytest.mark.parametrize(
    "prompt",
    [
        "a red triangle",
        "red triangle, plain",
        "a red hexagon, plain",
        "a pink circle, plain",
        "a red circle, fuzzy",
    ],
)
def test_bad_prompts_are_rejected_with_the_prompt_named(prompt):
    with pytest.raises(PromptError, match="prompt"):
        parse_prompt(prompt)


def test_bad_spec_is_rejected():
    with pytest.raises(PromptError, match="colour"):
        Spec("circle", "purple")


def test_vocabulary_covers_every_prompt_word():
    words = set(VOCABULARY.words)
    assert words == {"a", ",", *OBJECTS, *COLOURS, *STYLES}
    assert len(VOCABULARY.tokens) == len(set(VOCABULARY.tokens))
    unk = VOCABULARY.index("<unk>")
    for spec in all_specs():
        tokens = VOCABULARY.tokenize(spec.prompt)
        assert len(tokens) == 5 and set(tokens) <= words
        ids = VOCABULARY.encode(spec.prompt)
        assert len(ids) == 7 and unk not in ids
    assert VOCABULARY.encode("a purple blob, plain")[2] == unk
    assert VOCABULARY.encode("a red circle, plain", max_length=10)[-3:] == [VOCABULARY.index("<pad>")] * 3


# ---------------------------------------------------------------------------------------------------------
# Tasks and splits
# ---------------------------------------------------------------------------------------------------------


def test_standard_task_set():
    tasks = standard_tasks()
    kinds = Counter(t.kind for t in tasks.values())
    assert kinds["broad"] == 1 and kinds["object"] >= 4 and kinds["style"] >= 3
    for name, task in tasks.items():
        assert task.name == name
        if task.kind == "object":
            assert len(task.objects) == 2 and task.styles == ("plain",) and task.colours == COLOURS
            # every object task holds one object the broad data shows rarely
            assert len(set(task.objects) & set(RARE_OBJECTS)) == 1
        if task.kind == "style":
            assert len(task.styles) == 1 and task.styles[0] in SPECIAL_STYLES
            assert task.objects == COMMON_OBJECTS and task.colours == COLOURS
            assert not set(task.objects) & set(RARE_OBJECTS)
    object_tasks = [t for t in tasks.values() if t.kind == "object"]
    seen = [o for t in object_tasks for o in t.objects]
    assert len(seen) == len(set(seen))  # object groups do not overlap
    assert {t.styles[0] for t in tasks.values() if t.kind == "style"} == set(SPECIAL_STYLES)


@pytest.mark.parametrize("name", list(standard_tasks()))
def test_each_task_samples_only_and_all_of_its_attributes(name):
    task = standard_tasks()[name]
    specs = sample_specs(task, 20000, seed=1)  # enough that the broad mix's rarest objects (0.05 %) show up
    assert {s.object for s in specs} == set(task.objects)
    assert {s.colour for s in specs} == set(task.colours)
    assert {s.style for s in specs} == set(task.styles)
    assert all(task.contains(s) for s in specs)


def test_broad_task_is_skewed_as_documented():
    specs = sample_specs(standard_tasks()["broad"], 20000, seed=2)
    styles = Counter(s.style for s in specs)
    objects = Counter(s.object for s in specs)
    n = len(specs)
    assert abs(styles["plain"] / n - 0.97) < 0.01
    for style in SPECIAL_STYLES:
        assert abs(styles[style] / n - 0.01) < 0.004
    # rare objects weigh 0.002 against 1.0: 0.002 / (4 + 4 * 0.002) = 0.05 %, the others 24.95 %
    for obj in OBJECTS:
        expected, tolerance = (0.002 / 4.008, 0.0004) if obj in RARE_OBJECTS else (1 / 4.008, 0.01)
        assert abs(objects[obj] / n - expected) < tolerance, obj
    assert all(objects[obj] > 0 for obj in OBJECTS)  # every word is still seen
    colours = Counter(s.colour for s in specs)
    assert all(abs(colours[c] / n - 0.25) < 0.02 for c in COLOURS)


def test_broad_task_parameters_change_the_mix():
    uniform = broad_task(plain_weight=0.25, rare_object_weight=1.0).probabilities()
    assert all(abs(p - 1 / 8) < 1e-12 for p in uniform["objects"].values())
    assert all(abs(p - 1 / 4) < 1e-12 for p in uniform["styles"].values())
    no_special = sample_specs(broad_task(plain_weight=1.0, rare_object_weight=0.0), 2000, seed=0)
    assert {s.style for s in no_special} == {"plain"}
    assert not {s.object for s in no_special} & set(RARE_OBJECTS)
    with pytest.raises(ValueError):
        broad_task(plain_weight=1.5)
    with pytest.raises(ValueError):
        broad_task(rare_objects=("ring",))


def test_task_validation():
    with pytest.raises(ValueError, match="objects"):
        Task("bad", "object", objects=("circle", "ring"))
    with pytest.raises(ValueError, match="weights"):
        Task("bad", "object", objects=("circle",), object_weights=(1.0, 2.0))
    with pytest.raises(ValueError, match="kind"):
        Task("bad", "shape", objects=("circle",))  # type: ignore[arg-type]


def test_train_and_test_streams_are_disjoint():
    tasks = standard_tasks()
    seeds = range(300)
    for task in (tasks["broad"], tasks["objects-round"]):
        train = {split_seed(s, "train", task) for s in seeds}
        test = {split_seed(s, "test", task) for s in seeds}
        assert len(train) == len(test) == len(seeds)
        assert not train & test
    # the spec streams differ too: same seed, different split gives a different sequence
    broad = tasks["broad"]
    for seed in range(20):
        assert sample_specs(broad, 100, seed, "train") != sample_specs(broad, 100, seed, "test")
    # and a test batch never replays the training images of any nearby seed
    _, test_images = make_batch(tasks["style-dark"], 16, seed=0, split="test")
    for seed in range(10):
        _, train_images = make_batch(tasks["style-dark"], 16, seed=seed, split="train")
        assert not torch.equal(train_images, test_images)


def test_make_batch_is_deterministic_and_matches_its_specs():
    task = standard_tasks()["objects-pointy"]
    specs, images = make_batch(task, 12, seed=4, split="test")
    specs2, images2 = make_batch(task, 12, seed=4, split="test")
    assert specs == specs2 and torch.equal(images, images2)
    assert specs == sample_specs(task, 12, seed=4, split="test")
    assert torch.equal(images, generate(specs, split_seed(4, "test", task)))


# ---------------------------------------------------------------------------------------------------------
# Rendering shows the attributes
# ---------------------------------------------------------------------------------------------------------


def test_mean_paint_colour_is_closest_to_the_named_colour():
    specs = all_specs() * 3
    out = render(specs, seed=9)
    for i, spec in enumerate(specs):
        painted = out.paint[i] > 0.75
        assert painted.sum() >= 3, spec
        mean = out.images[i][painted].mean(axis=0)
        nearest = COLOURS[int(np.argmin(((PALETTE_ARR - mean) ** 2).sum(axis=1)))]
        assert nearest == spec.colour, (spec, mean)


def test_dark_background_is_darker_than_plain():
    for obj, colour in itertools.product(OBJECTS, COLOURS):
        out = render([Spec(obj, colour, "plain"), Spec(obj, colour, "dark")], seed=1)
        bg = out.silhouette < 0.01
        plain_bg = out.images[0][bg[0]].mean()
        dark_bg = out.images[1][bg[1]].mean()
        assert plain_bg > 0.75 and dark_bg < 0.25


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / np.maximum(a, b).sum())


def test_different_objects_give_different_masks():
    # each object rendered alone with the same seed gets the same position, size and rotation
    masks = {o: render([Spec(o, "red")], seed=5).silhouette[0] for o in OBJECTS}
    for a, b in itertools.combinations(OBJECTS, 2):
        assert _soft_iou(masks[a], masks[b]) < 0.9, (a, b)
        assert (np.abs(masks[a] - masks[b]) > 0.5).sum() >= 6, (a, b)
    # the same object with the same seed gives the same mask in every colour and style
    for colour, style in zip(COLOURS, STYLES, strict=True):
        assert np.array_equal(render([Spec("star", colour, style)], seed=5).silhouette[0], masks["star"])


def test_objects_are_recognisable_despite_jitter():
    # nearest mean silhouette (templates from one seed, queries from another) already recognises the object
    n_train, n_test = 300, 100
    train = render([Spec(o, "blue") for o in OBJECTS for _ in range(n_train)], seed=1).silhouette
    templates = train.reshape(len(OBJECTS), n_train, -1).mean(axis=1)
    test = render([Spec(o, "blue") for o in OBJECTS for _ in range(n_test)], seed=2).silhouette
    dist = ((test.reshape(len(OBJECTS) * n_test, 1, -1) - templates[None]) ** 2).sum(axis=-1)
    accuracy = (dist.argmin(axis=1) == np.repeat(np.arange(len(OBJECTS)), n_test)).mean()
    assert accuracy > 0.9


def test_objects_fit_in_the_image_with_margin():
    out = render(_specs(400), seed=3)
    border = np.concatenate(
        [
            out.silhouette[:, 0, :],
            out.silhouette[:, -1, :],
            out.silhouette[:, :, 0],
            out.silhouette[:, :, -1],
        ],
        axis=1,
    )
    assert float(border.max()) < 0.05
    area = out.silhouette.sum(axis=(1, 2)) / 256
    assert float(area.min()) > 0.1 and float(area.max()) < 0.5


def test_styles_paint_differently():
    for obj, colour in itertools.product(OBJECTS, COLOURS):
        specs = [Spec(obj, colour, s) for s in STYLES]
        out = render(specs, seed=2)
        sil = out.silhouette
        fill = (out.paint * sil).sum(axis=(1, 2)) / sil.sum(axis=(1, 2))
        plain, striped, outlined, dark = (STYLES.index(s) for s in ("plain", "striped", "outlined", "dark"))
        assert np.allclose(out.paint[plain], sil[plain]) and np.allclose(out.paint[dark], sil[dark])
        assert 0.25 < fill[striped] < 0.75, (obj, colour, fill)
        assert fill[outlined] < 0.9, (obj, colour, fill)
        # outlined: the deep inside of the shape shows the background again
        inner = sil[outlined] > 0.99
        if obj not in ("cross", "star", "moon"):
            assert out.paint[outlined][inner].min() < 0.2, obj
        # striped: strong texture inside the silhouette, unlike the flat plain fill
        inside = sil[plain] > 0.99
        assert out.images[striped][inside].std(axis=0).max() > 0.1
        assert out.images[plain][inside].std(axis=0).max() < 0.02


def test_samples_vary_but_stay_close():
    spec = Spec("square", "green", "plain")
    out = render([spec] * 200, seed=0)
    cx, cy, radius, angle = out.params.T
    assert cx.std() > 0.03 and cy.std() > 0.03 and radius.std() > 0.02 and angle.std() > 0.05
    assert np.abs(angle).max() < np.radians(12)  # a square never turns into a diamond
    assert out.colours.std(axis=0).max() > 0.01
    assert np.abs(out.colours - np.array(PALETTE["green"])).max() <= 0.05 + 1e-6
    images = out.images.reshape(200, -1)
    assert len({img.tobytes() for img in images}) == 200


def test_object_groups_are_the_object_tasks():
    tasks = standard_tasks()
    for group, objects in OBJECT_GROUPS.items():
        assert tasks[f"objects-{group}"].objects == objects
