"""ZipIt! on diffusers U-Nets: a model zipped with a neuron-permuted copy of itself is the model again, the
matching follows its parameters, partial zips stay consistent, and bad options or models are clear errors."""

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel

from featurefusion.errors import CheckpointError, DataError, RecipeError
from featurefusion.merge.zipit import (
    ZipItInputs,
    ZipItOptions,
    ZipItPlan,
    apply_plan,
    noisy_inputs,
    zip_plan,
    zipit_unets,
)
from featurefusion.merge.zipit_graph import describe_unet
from featurefusion.merge.zipit_matching import Zip, greedy_groups, match_space

from conftest import build_unet

# Stable Diffusion 1.x's U-Net layout (block types, two layers per block, skips, heads) at toy width.
SD_SHAPED = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)


def sd_shaped(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**SD_SHAPED).eval()


def inputs_for(unet, batch: int = 4, seed: int = 0) -> ZipItInputs:
    c = unet.config
    gen = torch.Generator().manual_seed(seed)
    return ZipItInputs(
        sample=torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=gen),
        timesteps=torch.randint(0, 1000, (batch,), generator=gen),
        encoder_hidden_states=torch.randn(batch, 6, c.cross_attention_dim, generator=gen),
    )


def output(unet, inputs: ZipItInputs) -> torch.Tensor:
    with torch.no_grad():
        return unet(inputs.sample, inputs.timesteps, inputs.encoder_hidden_states).sample


def with_state(unet, state):
    other = copy.deepcopy(unet)
    other.load_state_dict(state)
    return other


def group_atoms(graph, name: str) -> torch.Tensor:
    """Channels of a space that every GroupNorm reading it (alone or inside a concatenation) keeps in the same
    group: permuting within such an atom leaves every GroupNorm's output permuted the same way."""
    sizes = {n: s.size for n, s in graph.spaces.items()}
    key = torch.zeros(sizes[name], dtype=torch.long)
    for module, groups in graph.group_norms.items():
        rows = graph.rules[f"{module}.weight"].rows
        width = sum(sizes[s] for s in rows) // groups
        offset = 0
        for space in rows:
            if space == name:
                key = key * (groups + 1) + (torch.arange(offset, offset + sizes[name]) // width)
            offset += sizes[space]
    return key


def random_permutation_plan(graph, seed: int, blocks: int | None = None) -> ZipItPlan:
    """A function-preserving permutation of every space (of the first `blocks` blocks): GroupNorm groups kept,
    attention heads moved whole (queries/keys with their values) and shuffled inside."""
    gen = torch.Generator().manual_seed(seed)
    limit = len(graph.blocks) if blocks is None else blocks
    zips = {}
    for name, space in graph.spaces.items():
        zips[name] = Zip.identity(space.size, 1)
        if space.shared or space.block >= limit or space.kind == "v":
            continue
        if space.heads > 1:
            d = space.size // space.heads
            head_order = torch.randperm(space.heads, generator=gen)
            for target in (name, space.partner):
                within = torch.stack([torch.randperm(d, generator=gen) for _ in range(space.heads)])
                zips[target] = Zip((head_order.unsqueeze(1) * d + within).reshape(-1), 1)
        else:
            assign = torch.arange(space.size)
            atoms = group_atoms(graph, name)
            for atom in atoms.unique():
                members = (atoms == atom).nonzero().squeeze(1)
                assign[members] = members[torch.randperm(members.numel(), generator=gen)]
            zips[name] = Zip(assign, 1)
    return ZipItPlan(graph, zips, [])


def permuted_copy(unet, seed: int = 1, blocks: int | None = None):
    plan = random_permutation_plan(describe_unet(unet), seed, blocks)
    return with_state(unet, apply_plan(plan, [unet.state_dict()]))


@pytest.mark.parametrize("build", [lambda: build_unet(0), sd_shaped], ids=["tiny", "sd-1.x-shaped"])
def test_zipping_a_model_with_a_permuted_copy_gives_the_model_back(build):
    unet = build()
    inputs = inputs_for(unet)
    twin = permuted_copy(unet)
    # the copy is really permuted, and computes the same function
    assert not torch.equal(twin.conv_in.weight, unet.conv_in.weight)
    assert torch.allclose(output(twin, inputs), output(unet, inputs), atol=1e-5)

    merged = zipit_unets([unet, twin], inputs, ZipItOptions(budget=0.5, repeat=0.3))
    for key, value in unet.state_dict().items():
        assert torch.allclose(merged[key], value, atol=1e-5), key
    fresh = inputs_for(unet, seed=7)  # other inputs than the ones matched on
    assert torch.allclose(output(with_state(unet, merged), fresh), output(unet, fresh), atol=1e-5)


def test_the_built_in_worlds_unet_with_a_permuted_copy():
    from featurefusion.toyworld.models import build_unet as toy_unet

    unet = toy_unet(0).eval()
    inputs = inputs_for(unet, batch=2)
    twin = permuted_copy(unet, seed=3)
    plan = zip_plan([unet, twin], inputs, ZipItOptions())
    assert plan.summary()["cross_model"] == 1.0  # every merged feature pairs a channel with its copy
    merged = with_state(unet, apply_plan(plan, [unet.state_dict(), twin.state_dict()]))
    assert torch.allclose(output(merged, inputs), output(unet, inputs), atol=1e-5)


def test_subsampled_positions_are_the_same_rows_in_every_model():
    unet = build_unet(0)
    inputs = inputs_for(unet)
    merged = zipit_unets([unet, permuted_copy(unet)], inputs, ZipItOptions(positions=24))
    assert torch.allclose(output(with_state(unet, merged), inputs), output(unet, inputs), atol=1e-5)


def test_noisy_inputs_are_seeded_training_style_batches():
    from diffusers import DDPMScheduler

    images, embeddings = torch.rand(10, 4, 8, 8) * 2 - 1, torch.randn(10, 6, 32)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    first = noisy_inputs(images, embeddings, scheduler, seed=3, batch_size=4)
    again = noisy_inputs(images, embeddings, scheduler, seed=3, batch_size=4)
    assert [b.sample.shape[0] for b in first] == [4, 4, 2]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.sample, b.sample) and torch.equal(a.timesteps, b.timesteps)
    assert not torch.equal(first[0].sample, images[:4])
    with pytest.raises(DataError, match="10 images but 9 prompt embeddings"):
        noisy_inputs(images, embeddings[:9], scheduler)


def test_identical_models_give_the_model_exactly():
    unet = build_unet(0)
    merged = zipit_unets([unet, copy.deepcopy(unet)], inputs_for(unet), ZipItOptions(budget=1.0))
    for key, value in unet.state_dict().items():
        assert torch.equal(merged[key], value), key


def test_depth_zero_is_a_uniform_soup():
    a, b = build_unet(0), build_unet(1)
    merged = zipit_unets([a, b], inputs_for(a), ZipItOptions(depth=0))
    sa, sb = a.state_dict(), b.state_dict()
    for key in sa:
        assert torch.allclose(merged[key], (sa[key] + sb[key]) / 2, atol=1e-6), key


def test_partial_zip_carries_the_unmerge_past_the_depth():
    """Only the first two blocks' spaces are permuted: a zip of depth 2 matches them and merges the rest by index
    (where the two models agree), so the model comes back; a zip of depth 1 leaves block 2 mismatched."""
    unet = sd_shaped()
    inputs = inputs_for(unet)
    twin = permuted_copy(unet, blocks=2)
    expected = output(unet, inputs)
    deep_enough = with_state(unet, zipit_unets([unet, twin], inputs, ZipItOptions(depth=2)))
    assert torch.allclose(output(deep_enough, inputs), expected, atol=1e-5)
    too_shallow = with_state(unet, zipit_unets([unet, twin], inputs, ZipItOptions(depth=1)))
    assert not torch.allclose(output(too_shallow, inputs), expected, atol=1e-3)


def test_budget_zero_pairs_each_feature_with_one_of_the_other_model():
    a, b = build_unet(0), build_unet(1)
    plan = zip_plan([a, b], inputs_for(a), ZipItOptions(budget=0.0, repeat=0.0))
    summary = plan.summary()
    assert summary["within_model"] == 0.0 and summary["cross_model"] == 1.0
    free = zip_plan([a, b], inputs_for(a), ZipItOptions(budget=1.0, repeat=0.0)).summary()
    assert free["within_model"] > 0.0  # unrelated models: some features are best merged with their own kind


def test_heads_stay_whole_and_queries_move_with_their_values():
    a, b = build_unet(0), build_unet(1)
    plan = zip_plan([a, b], inputs_for(a), ZipItOptions(budget=0.5))
    attention = [s for s in plan.graph.spaces.values() if s.kind == "qk"]
    assert attention
    for space in attention:
        d = space.size // space.heads
        for m in range(2):
            qk_heads = plan.zips[space.name].of_model(m).reshape(space.heads, d) // d
            v_heads = plan.zips[space.partner].of_model(m).reshape(space.heads, d) // d
            assert (qk_heads == qk_heads[:, :1]).all()  # one merged head per original head
            assert torch.equal(qk_heads, v_heads)


def reference_groups(similarity, labels, target, budget, repeat):
    """The ZipIt! loop written plainly: search the whole matrix for the best allowed pair at every step."""
    sims = similarity.clone().float()
    sims.fill_diagonal_(float("-inf"))
    count = sims.shape[0]
    origin = labels.clone()
    members = {i: [i] for i in range(count)}
    per_model = int(((count - target) // int(labels.max() + 1)) * budget + 1e-4)
    allowed = {m: per_model for m in range(int(labels.max()) + 1)}
    while len(members) > target:
        masked = sims.clone()
        for m, left in allowed.items():
            if left <= 0:
                same = (origin == m).unsqueeze(0) & (origin == m).unsqueeze(1)
                masked[same] = float("-inf")
        flat = int(masked.argmax())
        keep, drop = sorted((flat // count, flat % count))
        members[keep] += members.pop(drop)
        merged = torch.minimum(sims[keep], sims[drop])
        merged = merged * repeat if repeat > 0 else torch.full_like(merged, float("-inf"))
        merged[keep] = merged[drop] = float("-inf")
        sims[drop, :] = sims[:, drop] = float("-inf")
        sims[keep, :] = sims[:, keep] = merged
        if origin[keep] == origin[drop]:
            allowed[int(origin[keep])] -= 1
        origin[drop] = -1
    return sorted(sorted(g) for g in members.values())


@pytest.mark.parametrize("budget,repeat", [(0.0, 0.0), (0.25, 0.0), (1.0, 0.0), (0.25, 0.5), (1.0, 1.0)])
def test_fast_greedy_matching_equals_the_plain_loop(budget, repeat):
    gen = torch.Generator().manual_seed(int(budget * 10 + repeat * 100))
    for _ in range(3):
        features = torch.randn(200, 24, generator=gen) @ torch.randn(24, 24, generator=gen)
        corr = torch.corrcoef(features.T)
        labels = torch.arange(2).repeat_interleave(12)
        fast = sorted(sorted(g) for g in greedy_groups(corr, labels, 12, budget, repeat))
        assert fast == reference_groups(corr, labels, 12, budget, repeat)


def test_budget_limits_within_model_merges():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(500, 64, generator=gen) @ torch.randn(64, 64, generator=gen)
    corr = torch.corrcoef(features.T)
    counts = []
    for budget in (0.0, 0.25, 0.5, 1.0):
        members = match_space(corr, 2, budget, repeat=0.0).members()
        within = int((members == 2).sum())  # pairs of one model's features
        assert within <= int(32 * budget)  # (64 - 32) // 2 models * budget merges each
        counts.append(within)
    assert counts[0] == 0 and counts[-1] > counts[1] > 0


def test_three_models_zip_to_one_model_of_the_same_shape():
    models = [build_unet(s) for s in (0, 1, 2)]
    merged = zipit_unets(models, inputs_for(models[0]), ZipItOptions(repeat=0.5))
    for key, value in models[0].state_dict().items():
        assert merged[key].shape == value.shape and torch.isfinite(merged[key]).all(), key


@pytest.mark.parametrize(
    "options",
    [
        dict(budget=1.5),
        dict(budget=-0.1),
        dict(repeat=2.0),
        dict(depth=-1),
        dict(depth=1.5),
        dict(depth=True),
        dict(positions=1),
    ],
)
def test_bad_options_are_recipe_errors(options):
    with pytest.raises(RecipeError, match="ZipIt! option"):
        ZipItOptions(**options)


def test_bad_model_sets_and_inputs_are_clear_errors():
    a, b = build_unet(0), build_unet(1)
    inputs = inputs_for(a)
    with pytest.raises(RecipeError, match="at least two models"):
        zip_plan([a], inputs, ZipItOptions())
    with pytest.raises(RecipeError, match="needs repeat > 0"):
        zip_plan([a, b, a], inputs, ZipItOptions(repeat=0.0))
    with pytest.raises(RecipeError, match="exceeds this U-Net's 5 blocks"):
        zip_plan([a, b], inputs, ZipItOptions(depth=6))
    with pytest.raises(CheckpointError, match="one architecture"):
        zip_plan([a, build_unet(0, block_out_channels=(32, 32))], inputs, ZipItOptions())
    bad = ZipItInputs(torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), torch.randn(2, 6, 32))
    with pytest.raises(DataError, match=r"\[B, 4, H, W\]"):
        zip_plan([a, b], bad, ZipItOptions())
    with pytest.raises(DataError, match="at least one sample"):
        zip_plan([a, b], [], ZipItOptions())


def test_unsupported_unets_are_named_not_merged_wrongly():
    with pytest.raises(CheckpointError, match="scale-shift"):
        describe_unet(build_unet(0, resnet_time_scale_shift="scale_shift"))
    with pytest.raises(CheckpointError, match="class_embed_type"):
        describe_unet(build_unet(0, class_embed_type="timestep"))


# ---- the registered method: CLI, recipe, replay ------------------------------------------------------------
def zipit_data(tmp_path):
    from conftest import write_captioned_folder

    return write_captioned_folder(tmp_path / "data", ["a red circle", "a blue square", "a striped circle"] * 2)


def test_cli_zipit_of_a_model_and_itself_is_the_model(tiny, tmp_path):
    from featurefusion.cli import main
    from featurefusion.io.checkpoint import open_checkpoint
    from featurefusion.io.recipe import recipe_of

    out = tmp_path / "zipped.safetensors"
    argv = ["merge", str(tiny.pipeline), str(tiny.base), "-o", str(out), "--method", "zipit", "--budget", "1",
            "--sample-data", str(zipit_data(tmp_path)), "--sample-count", "4", "--depth", "5"]  # fmt: skip
    assert main(argv) == 0
    with open_checkpoint(out) as merged, open_checkpoint(tiny.pipeline) as base:
        recipe = recipe_of(merged.metadata, out)
        for key in base.keys("unet"):
            assert torch.equal(merged.read(key), base.read(key)), key
    assert recipe.method == "zipit"
    assert {k: recipe.options[k] for k in ("budget", "depth", "sample_count")} == {"budget": 1.0, "depth": 5,
                                                                                   "sample_count": 4}  # fmt: skip
    assert len(recipe.options["sample_data_sha256"]) == 64


def test_zipit_needs_sample_data_and_a_config(tiny, tmp_path):
    from featurefusion.merge import operations

    out = tmp_path / "z.safetensors"
    with pytest.raises(RecipeError, match="needs sample inputs"):
        operations.merge([tiny.pipeline, tiny.base], out, "zipit")
    with pytest.raises(CheckpointError, match="needs their UNet config"):
        operations.merge(tiny.models, out, "zipit", sample_data=str(zipit_data(tmp_path)), sample_count=2)
    with pytest.raises(RecipeError, match="sample_count must be a positive"):
        operations.merge([tiny.pipeline, tiny.base], out, "zipit", sample_data="toyworld", sample_count=0)
    with pytest.raises(DataError, match="'toyworld' or a folder"):
        operations.merge([tiny.pipeline, tiny.base], out, "zipit", sample_data=str(tmp_path / "nowhere"))
    assert not out.exists()


def test_replay_refuses_changed_sample_data(tiny, tmp_path):
    from featurefusion.io.checkpoint import open_checkpoint
    from featurefusion.io.recipe import recipe_of
    from featurefusion.merge import operations

    data, out = zipit_data(tmp_path), tmp_path / "z.safetensors"
    operations.merge([tiny.pipeline, *tiny.specialists], out, "zipit", sample_data=str(data), sample_count=3)
    with open_checkpoint(out) as merged:
        recipe = recipe_of(merged.metadata, out)
    (data / "metadata.jsonl").write_text((data / "metadata.jsonl").read_text().replace("red", "green"))
    with pytest.raises(RecipeError, match="not the one the recipe was made with"):
        operations.replay(recipe, tmp_path / "again.safetensors")
    assert not (tmp_path / "again.safetensors").exists()
