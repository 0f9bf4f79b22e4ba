import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from featurefusion.errors import FeatureFusionError
from featurefusion.evaluate.metrics import (
    ClipScore,
    Fid,
    ImageRewardScore,
    MetricUnavailable,
    build_metric,
    objective,
    parse_metric_names,
    to_uint8,
)


def noise_images(count: int, seed: int, low: int = 0, high: int = 256, size: int = 16) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(low, high, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def test_clip_score_from_a_local_model_folder_matches_cosine_similarity(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    prompts = ["a red circle", "a blue square", "a striped circle"]
    images = noise_images(3, seed=0)
    metric = build_metric("clip", model_name_or_path=tiny_clip, device="cpu")
    result = metric.score(prompts, images)
    assert metric.variant == str(tiny_clip) and metric.describe()["higher_is_better"] is True
    assert len(result.per_image) == 3 and result.value == pytest.approx(np.mean(result.per_image))

    # The same number computed by hand with transformers: 100 * max(cos(image, text), 0), per image.
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        for prompt, image, score in zip(prompts, images, result.per_image, strict=True):
            pixels = processor(images=[to_uint8(image)], return_tensors="pt")["pixel_values"]
            text = processor(text=[prompt], return_tensors="pt", padding=True)
            a = model.get_image_features(pixels).pooler_output
            b = model.get_text_features(text["input_ids"], text["attention_mask"]).pooler_output
            cosine = torch.nn.functional.cosine_similarity(a, b).item()
            assert score == pytest.approx(100 * max(cosine, 0.0), abs=1e-3)
    assert len(set(result.per_image)) > 1  # depends on the pair, not a constant

    with pytest.raises(FeatureFusionError, match="one prompt per image"):
        metric.score(prompts[:2], images)


def test_fid_is_zero_for_identical_sets_and_positive_for_different_ones(tmp_path, feature_net):
    fid = Fid(feature=feature_net, device="cpu")
    generated = noise_images(12, seed=1)
    same = fid.score(None, generated, references=generated)
    assert abs(same.value) < 1e-3 and same.per_image is None
    dark = noise_images(12, seed=2, high=60)
    assert fid.score(None, dark, references=generated).value > 0.01
    # A reference folder: features are computed once and reused for every model scored against it.
    folder = tmp_path / "refs"
    folder.mkdir()
    for i, image in enumerate(generated):
        image.save(folder / f"{i:02d}.png")
    first = fid.score(None, dark, references=folder).value
    assert first == pytest.approx(fid.score(None, dark, references=folder).value)
    assert first == pytest.approx(fid.score(None, dark, references=generated).value, rel=1e-4)
    assert fid.score(None, generated, references=folder).value == pytest.approx(0.0, abs=1e-3)
    assert objective(fid, first) == -first  # lower is better: greedy searches maximise the negation
    with pytest.raises(FeatureFusionError, match="reference"):
        fid.score(None, generated)


def test_image_reward_scores_through_an_injected_model(reward_model):
    loaded = []

    def loader(name, device):
        loaded.append((name, str(device)))
        return reward_model()

    metric = ImageRewardScore("my-reward.pt", device="cpu", loader=loader)
    prompts = ["a red circle", "a blue square", "a red circle", "a photo of a striped circle"]
    images = noise_images(4, seed=3)
    result = metric.score(prompts, images)
    assert loaded == [("my-reward.pt", "cpu")] and metric.variant == "my-reward.pt"
    reference = reward_model()  # same seed, same weights
    with torch.no_grad():
        expected = [reference.score(p, [im]) for p, im in zip(prompts, images, strict=True)]
    assert result.per_image == pytest.approx(expected, abs=1e-6)  # grouped by prompt, back in image order
    assert result.value == pytest.approx(np.mean(expected))
    metric.score(prompts, images)
    assert len(loaded) == 1  # the model is loaded once


@pytest.mark.skipif(importlib.util.find_spec("ImageReward") is not None, reason="image-reward is installed")
def test_missing_optional_backends_say_what_to_install():
    with pytest.raises(MetricUnavailable, match="pip install image-reward"):
        build_metric("imagereward")


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_inception_fid_without_torch_fidelity_says_what_to_install():
    with pytest.raises(MetricUnavailable, match="pip install torch-fidelity"):
        build_metric("fid")


def test_tifa_is_registered_but_not_available_and_names_are_checked():
    with pytest.raises(MetricUnavailable, match="TIFA is not available"):
        build_metric("tifa")
    with pytest.raises(FeatureFusionError, match="unknown metric"):
        build_metric("psnr")
    assert parse_metric_names("CLIP, image-reward,fid") == ["clip", "imagereward", "fid"]
    assert isinstance(build_metric("clipscore", device="cpu"), ClipScore)  # nothing is loaded before scoring
