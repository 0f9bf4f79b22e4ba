"""`--threshold auto`: per layer from the layer's own statistics, recorded in the recipe, replayed exactly."""

import json
from dataclasses import replace

import torch

from featurefusion.io.checkpoint import open_checkpoint
from featurefusion.io.recipe import Recipe
from featurefusion.merge import operations
from featurefusion.merge.featurefusion_math import (
    AUTO_CEILING,
    AUTO_FLOOR,
    AUTO_GAP,
    FeatureFusionOptions,
    merge_layer,
    resolve_layer,
)


def recipe(path) -> Recipe:
    with open_checkpoint(path) as ckpt:
        return Recipe.from_dict(json.loads(ckpt.metadata["featurefusion.recipe"]))


def unet(path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ckpt:
        return {k: ckpt.read(k) for k in ckpt.keys("unet")}


def layer_with_pairs(strongest_other: float, n=16, d=64, seed=0):
    """Base, and a fine-tune whose neuron 3 also correlates `strongest_other` with base neuron 5."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    base = q[:n].clone()  # orthonormal: different base neurons do not correlate at all
    tuned = base + 0.01 * torch.randn(n, d, generator=gen)
    tuned[3] = strongest_other * base[5] + (1 - strongest_other**2) ** 0.5 * q[n + 1]
    return torch.cat([base, tuned]), n


def test_auto_goes_just_above_the_strongest_pair_of_different_neurons():
    for strongest, expected in ((0.3, AUTO_FLOOR), (0.72, 0.72 + AUTO_GAP), (0.97, AUTO_CEILING)):
        stack, n = layer_with_pairs(strongest)
        for algorithm in ("sparse", "dense"):
            _, threshold = resolve_layer(stack, n, FeatureFusionOptions(algorithm=algorithm), "l")
            assert abs(threshold - expected) < 1e-5, (strongest, algorithm, threshold)


def test_auto_blends_no_different_neurons_below_the_ceiling():
    stack, n = layer_with_pairs(0.72)
    options = FeatureFusionOptions()
    stats, threshold = resolve_layer(stack, n, options, "l")
    got = []
    merge_layer(stack, None, n, stats, options.for_layer(threshold), record=lambda r, c, v: got.append((r, c)))
    rows, cols = got[0]
    assert bool((cols % n == rows).all())  # only same-index pairs pass
    assert (3, n + 5) not in set(zip(rows.tolist(), cols.tolist(), strict=True))


def test_auto_is_recorded_per_layer_and_replays_bit_identically(tiny, tmp_path):
    merged, again, fixed = (tmp_path / f"{n}.safetensors" for n in ("m", "again", "fixed"))
    operations.merge(tiny.models, merged)
    recorded = recipe(merged)
    thresholds = recorded.options["thresholds"]
    assert recorded.options["threshold"] == "auto" and len(thresholds) > 10
    assert all(AUTO_FLOOR <= t <= AUTO_CEILING for t in thresholds.values())
    operations.replay(recorded, again)
    assert again.read_bytes() == merged.read_bytes()
    # deterministic: a second merge from scratch chooses the same values
    operations.merge(tiny.models, fixed)
    assert recipe(fixed).options["thresholds"] == thresholds


def test_unlearning_an_auto_merge_uses_the_recorded_thresholds(tiny, tmp_path):
    full, unlearned, direct = (tmp_path / f"{n}.safetensors" for n in ("full", "unlearned", "direct"))
    operations.merge(tiny.models, full)
    thresholds = recipe(full).options["thresholds"]
    operations.remove(full, "1", unlearned)
    options = replace(FeatureFusionOptions(), thresholds=thresholds)
    operations.merge([tiny.base, tiny.specialists[1]], direct, options=options)
    a, b = unet(unlearned), unet(direct)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_the_command_line_takes_auto_and_numbers(tiny, tmp_path):
    from featurefusion.cli import main

    auto, fixed = tmp_path / "auto.safetensors", tmp_path / "fixed.safetensors"
    assert main(["merge", *map(str, tiny.models), "-o", str(auto), "--threshold", "auto"]) == 0
    assert main(["merge", *map(str, tiny.models), "-o", str(fixed), "--threshold", "0.8"]) == 0
    assert recipe(auto).options["threshold"] == "auto" and recipe(auto).options["thresholds"]
    assert recipe(fixed).options["threshold"] == 0.8 and not recipe(fixed).options["thresholds"]
