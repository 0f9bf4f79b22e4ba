"""Merges of whole (tiny) Stable Diffusion checkpoints through the engine, in every layout."""

import pytest
import torch
from safetensors.torch import load_file

from featurefusion.io.checkpoint import open_checkpoint
from featurefusion.io.recipe import Recipe, recipe_of
from featurefusion.merge import operations, registry
from featurefusion.merge.featurefusion_math import FeatureFusionOptions
from featurefusion.merge.operations import OutputOptions

from conftest import write_captioned_folder


def unet(path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ckpt:
        return {k: ckpt.read(k) for k in ckpt.keys("unet")}


def component(path, name) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ckpt:
        return {k: ckpt.read(k) for k in ckpt.keys(name)}


def assert_close(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=atol), key


def test_soup_of_identical_models_is_the_model(tiny, tmp_path):
    out = tmp_path / "soup.safetensors"
    operations.merge([tiny.base] * 3, out, "soup")
    assert_close(unet(out), unet(tiny.base))


def test_soup_is_the_weighted_mean(tiny, tmp_path):
    out = tmp_path / "soup.safetensors"
    operations.merge(tiny.models, out, "soup", weights=[2, 1, 1])
    states = [unet(m) for m in tiny.models]
    expected = {k: 0.5 * states[0][k] + 0.25 * states[1][k] + 0.25 * states[2][k] for k in states[0]}
    assert_close(unet(out), expected)
    # text encoder and VAE are the base's by default
    assert_close(component(out, "vae"), component(tiny.base, "vae"))


def test_remove_after_add_returns_the_original_soup(tiny, tmp_path):
    soup, added, removed = tmp_path / "soup.safetensors", tmp_path / "add.safetensors", tmp_path / "rm.safetensors"
    operations.merge(tiny.models[:2], soup, "soup", vae="average")
    operations.soup_add(soup, tiny.specialists[1], added)
    operations.soup_remove(added, tiny.specialists[1], removed)
    assert_close(unet(removed), unet(soup), atol=1e-5)
    assert_close(component(removed, "vae"), component(soup, "vae"), atol=1e-5)
    # the added soup is the uniform soup of all three
    direct = tmp_path / "direct.safetensors"
    operations.merge(tiny.models, direct, "soup")
    assert_close(unet(added), unet(direct), atol=1e-5)


def test_removing_a_member_of_a_soup_equals_the_soup_without_it(tiny, tmp_path):
    soup, removed, direct = (tmp_path / f"{n}.safetensors" for n in ("soup", "rm", "direct"))
    operations.merge(tiny.models, soup, "soup", weights=[0.5, 0.3, 0.2])
    operations.remove(soup, tiny.specialists[0], removed)
    operations.merge([tiny.base, tiny.specialists[1]], direct, "soup", weights=[0.5, 0.2])
    assert_close(unet(removed), unet(direct), atol=1e-5)


def test_featurefusion_of_copies_is_the_model_when_no_neurons_correlate(tiny, tmp_path):
    # Above the largest |cos| between two different neurons of any layer, each neuron only meets its copies.
    top = max_within_layer_correlation(unet(tiny.base))
    out = tmp_path / "ff.safetensors"
    options = FeatureFusionOptions(threshold=min(1.0, top + 1e-3))
    operations.merge([tiny.base] * 3, out, options=options)
    assert_close(unet(out), unet(tiny.base), atol=1e-5)


def max_within_layer_correlation(state) -> float:
    top = 0.0
    for key, w in state.items():
        if key.endswith(".weight") and w.ndim in (2, 4) and w.shape[0] > 1:
            flat = torch.nn.functional.normalize(w.reshape(w.shape[0], -1).double(), dim=1)
            cos = (flat @ flat.T).abs() - torch.eye(w.shape[0], dtype=torch.float64)
            top = max(top, float(cos.max()))
    return top


def test_lower_thresholds_move_a_self_merge_further(tiny, tmp_path):
    base = unet(tiny.base)
    drift = []
    for threshold in (0.9, 0.3, 0.0):
        out = tmp_path / f"ff{threshold}.safetensors"
        operations.merge([tiny.base] * 2, out, options=FeatureFusionOptions(threshold=threshold))
        merged = unet(out)
        drift.append(sum(float((merged[k] - base[k]).norm() ** 2) for k in base) ** 0.5)
    assert drift[0] <= drift[1] <= drift[2] and drift[2] > 0


def test_featurefusion_unlearning_equals_a_merge_without_the_model(tiny, tmp_path):
    full, unlearned, direct = (tmp_path / f"{n}.safetensors" for n in ("full", "unlearned", "direct"))
    options = FeatureFusionOptions(threshold=0.3, normalization="column")
    operations.merge(tiny.models, full, options=options, text_encoder="average")
    # the removed model's file is not needed: remove it by index
    operations.remove(full, "1", unlearned)
    operations.merge([tiny.base, tiny.specialists[1]], direct, options=options, text_encoder="average")
    assert_close(unet(unlearned), unet(direct), atol=1e-5)
    assert_close(component(unlearned, "text_encoder"), component(direct, "text_encoder"), atol=1e-6)
    recipe = Recipe.from_dict(__import__("json").loads(open_checkpoint(unlearned).metadata["featurefusion.recipe"]))
    # paths are relative to the merged file, with the absolute path as the fallback
    assert recipe.operation == "unlearn" and [m.absolute for m in recipe.models] == [
        str(tiny.base.resolve()),
        str(tiny.specialists[1].resolve()),
    ]
    assert [(unlearned.parent / m.path).resolve() for m in recipe.models] == [
        tiny.base.resolve(),
        tiny.specialists[1].resolve(),
    ]


def test_unlearning_works_when_the_removed_file_is_gone(tiny, tmp_path):
    import shutil

    models = [tmp_path / p.name for p in tiny.models]
    for src, dst in zip(tiny.models, models, strict=True):
        shutil.copy(src, dst)
    full, unlearned = tmp_path / "full.safetensors", tmp_path / "unlearned.safetensors"
    operations.merge(models, full)
    models[2].unlink()
    operations.remove(full, str(models[2]), unlearned)
    assert unlearned.exists()


def test_statistics_file_is_not_named_like_a_model_and_old_names_still_read(tiny, tmp_path):
    full, unlearned, again = (tmp_path / f"{n}.safetensors" for n in ("full", "unlearned", "again"))
    operations.merge(tiny.models, full)
    stats = tmp_path / "full.ffstats"
    assert operations.statistics_path(full) == stats and stats.is_file()
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["full.safetensors"]
    operations.remove(full, "1", unlearned)
    # a merge written before the rename: its statistics file is found under the old name
    stats.rename(tmp_path / "full.ffstats.safetensors")
    assert operations.find_statistics(full) == tmp_path / "full.ffstats.safetensors"
    operations.remove(full, "1", again)
    assert_close(unet(again), unet(unlearned), atol=0)


# Options that exercise each method's recorded randomness or resolution (sampled statistics, seeded drops).
REPLAY_OPTIONS = {
    "featurefusion": {"mode": "sampled", "samples": 64},
    "dare": {"density": 0.3, "seed": 7},
    "dare-ties": {"density": 0.3, "seed": 7},
    "block-weighted": {"block_weights": ["0.3"]},
    # ZipIt! runs the models on sample inputs: a captioned folder, encoded with the tiny pipeline's parts.
    "zipit": lambda tiny, tmp: {
        "sample_data": str(write_captioned_folder(tmp / "zipit-data", ["a red circle", "a blue square"] * 2)),
        "sample_count": 4,
        "pipeline": str(tiny.pipeline),
    },
}


@pytest.mark.parametrize("method", registry.names())
def test_recipe_replay_is_bit_identical(tiny, tmp_path, method):
    first, again = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    options = REPLAY_OPTIONS.get(method)
    operations.merge(tiny.models, first, method, options(tiny, tmp_path) if callable(options) else options)
    recipe = Recipe.from_dict(__import__("json").loads(open_checkpoint(first).metadata["featurefusion.recipe"]))
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(recipe.to_yaml())
    operations.replay(Recipe.from_yaml_file(recipe_file), again)
    assert first.read_bytes() == again.read_bytes()


def test_text_encoder_average_and_integer_tensors(tiny, tmp_path):
    out = tmp_path / "avg.safetensors"
    operations.merge(tiny.models, out, "soup", text_encoder="average")
    raw = load_file(out)
    ids = [k for k in raw if k.endswith("position_ids")]
    assert ids and all(raw[k].dtype == torch.int64 for k in ids)
    assert all(torch.equal(raw[k], load_file(tiny.base)[k]) for k in ids)


def test_output_dtype_and_maths_in_fp32(tiny, tmp_path):
    out = tmp_path / "half.safetensors"
    operations.merge(tiny.models, out, "soup", out=OutputOptions(dtype="fp16"))
    raw = load_file(out)
    assert {v.dtype for k, v in raw.items() if "position_ids" not in k} == {torch.float16}
    states = [unet(m) for m in tiny.models]
    expected = {k: sum(s[k] for s in states) / 3 for k in states[0]}
    merged = unet(out)
    for key in expected:
        # within one fp16 rounding step of the fp32 mean
        ulp = expected[key].abs().clamp_min(2**-14) * 2**-10
        assert ((merged[key].float() - expected[key]).abs() <= ulp).all(), key


def test_ldm_diffusers_round_trip_keeps_every_tensor(tiny, tmp_path):
    ldm, folder = tmp_path / "model.safetensors", tmp_path / "pipe"
    operations.convert(tiny.pipeline, ldm, OutputOptions(format="ldm"))
    operations.convert(ldm, folder, OutputOptions(format="diffusers", template=tiny.pipeline))
    with open_checkpoint(tiny.pipeline) as a, open_checkpoint(ldm) as b, open_checkpoint(folder) as c:
        for key in a.keys():
            assert torch.equal(a.read(key), b.read(key)) and torch.equal(a.read(key), c.read(key)), key
    copied = sorted(p.relative_to(tiny.pipeline) for p in tiny.pipeline.rglob("*.json"))
    assert copied and all((folder / rel).is_file() for rel in copied)


def test_merged_pipeline_runs_a_forward_pass(tiny, tmp_path):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "merged"
    operations.merge([tiny.pipeline, *tiny.specialists], out)
    model = UNet2DConditionModel.from_pretrained(out / "unet").eval()
    sample = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        result = model(sample, torch.tensor([10, 20]), encoder_hidden_states=torch.randn(2, 5, 32)).sample
    assert result.shape == sample.shape and torch.isfinite(result).all()


def test_merged_single_file_loads_in_diffusers(tiny, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "merged.safetensors"
    operations.merge(tiny.models, out)
    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(tiny.pipeline), local_files_only=True)
    expected = unet(out)
    loaded = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
    assert_close(loaded, expected, atol=0)
    with torch.no_grad():
        images = pipe("a red circle", num_inference_steps=2, height=16, width=16, output_type="np").images
    assert images.shape == (1, 16, 16, 3)


def test_model_shares_show_how_featurefusion_weighs_fine_tunes(tiny, tmp_path):
    from featurefusion.merge.featurefusion import model_shares

    shares = {}
    for threshold in (0.7, 0.0):
        out = tmp_path / f"ff-{threshold}.safetensors"
        operations.merge(tiny.models, out, options=FeatureFusionOptions(threshold=threshold))
        shares[threshold] = model_shares(operations.statistics_path(out))
        assert sum(s["share"] for s in shares[threshold]) == pytest.approx(1.0, abs=1e-4)
    # Specialists close to the base: each neuron is blended with its own copies only, ~1/3 per model.
    for s in shares[0.7]:
        assert s["share"] == pytest.approx(1 / 3, abs=0.02)
        assert s["same_neuron"] > 0.95 * s["share"]
    # With no threshold every neuron of the layer joins in with its small |P|: together they take a large part
    # of the mass (about half, in these small layers) away from the same index.
    assert all(s["same_neuron"] < 0.75 * s["share"] for s in shares[0.0])


def test_task_arithmetic_adds_scaled_task_vectors_and_replays(tiny, tmp_path):
    out = tmp_path / "ta.safetensors"
    operations.merge(tiny.models, out, "task-arithmetic", scale=0.8)
    states = [unet(m) for m in tiny.models]
    expected = {
        k: states[0][k].float() + 0.8 * sum(s[k].float() - states[0][k].float() for s in states[1:]) for k in states[0]
    }
    assert_close(unet(out), expected, atol=1e-5)
    # With scale 1/N it is the uniform soup.
    third, soup = tmp_path / "ta3.safetensors", tmp_path / "soup.safetensors"
    operations.merge(tiny.models, third, "task-arithmetic", scale=1 / 3)
    operations.merge(tiny.models, soup, "soup")
    assert_close(unet(third), unet(soup), atol=1e-5)
    again = tmp_path / "again.safetensors"
    with open_checkpoint(out) as ckpt:
        recipe = recipe_of(ckpt.metadata, out)
    assert recipe.method == "task-arithmetic" and recipe.options["scale"] == 0.8
    operations.replay(recipe, again)
    assert again.read_bytes() == out.read_bytes()


def test_task_arithmetic_rejects_bad_options(tiny, tmp_path):
    from featurefusion.errors import RecipeError

    with pytest.raises(RecipeError, match="scale"):
        operations.merge(tiny.models, tmp_path / "x.safetensors", "task-arithmetic", scale=-1.0)
    with pytest.raises(RecipeError, match="task-arithmetic has no option 'weights'"):
        operations.merge(tiny.models, tmp_path / "x.safetensors", "task-arithmetic", weights=[1, 1, 1])
    assert not (tmp_path / "x.safetensors").exists()
