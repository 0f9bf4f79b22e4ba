"""AFA: the ensemble U-Net's forward pass, its aggregators, training and saved folders."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from ensemble_helpers import load_toy_members, toy_inputs

from featurefusion.ensemble.aggregator import BlockAggregator
from featurefusion.ensemble.unet import AFAUNet, EnsembleError, block_channels

from conftest import build_unet

_toy_members = pytest.fixture(scope="module", name="toy_members")(load_toy_members)


def _record_aggregations(ensemble: AFAUNet):
    records = []

    def hook(module, args, output):
        records.append(([f.detach() for f in args[0]], output.detach()))

    handles = [block.register_forward_hook(hook) for block in ensemble.aggregators.blocks]
    return records, handles


def test_zero_initialised_aggregators_give_the_uniform_average_of_block_features():
    members = [build_unet(seed) for seed in (0, 1, 2)]  # three different models, SD-shaped with a VAE's 4 channels
    ensemble = AFAUNet(members, hidden_cap=16)
    records, handles = _record_aggregations(ensemble)
    sample, t, context = torch.randn(2, 4, 8, 8), torch.tensor([3, 70]), torch.randn(2, 5, 32)
    with torch.no_grad():
        out = ensemble(sample, t, context).sample
    for h in handles:
        h.remove()
    assert len(records) == len(block_channels(members[0])) == len(ensemble.aggregators.blocks)
    for features, aggregated in records:
        assert not torch.allclose(features[0], features[1])  # the members really differ
        torch.testing.assert_close(aggregated, torch.stack(features).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, records[-1][1])


def test_n_identical_models_make_an_afa_ensemble_equal_to_the_single_model():
    single = build_unet(0)
    ensemble = AFAUNet([copy.deepcopy(single) for _ in range(3)], hidden_cap=16)
    # Trained-looking aggregators: any softmax weights over identical features give the same feature.
    for block in ensemble.aggregators.blocks:
        torch.nn.init.normal_(block.to_logits.weight, std=0.5)
    sample, t, context = torch.randn(2, 4, 8, 8), torch.tensor([3, 70]), torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(ensemble(sample, t, context).sample, single(sample, t, context).sample,
                                   rtol=1e-4, atol=1e-5)  # fmt: skip


def test_trained_aggregator_weights_are_a_softmax_over_models_at_every_position():
    block = BlockAggregator(3, 8, ensemble_config := _config(3, (8,)))
    torch.nn.init.normal_(block.to_logits.weight, std=1.0)
    features = [torch.randn(2, 8, 4, 4) for _ in range(3)]
    temb = torch.randn(2, ensemble_config.time_embed_dim)
    weights = block.weights(features, temb, torch.randn(2, 5, 32))
    assert weights.shape == (2, 3, 4, 4)
    torch.testing.assert_close(weights.sum(1), torch.ones(2, 4, 4))
    assert weights.std() > 0.01  # position- and sample-dependent, not uniform


def _config(n, channels):
    from featurefusion.ensemble.aggregator import AggregatorConfig

    return AggregatorConfig(n_models=n, channels=channels, cross_attention_dim=32, hidden_cap=8)


def test_members_of_different_architectures_are_refused():
    with pytest.raises(EnsembleError, match="block_out_channels"):
        AFAUNet([build_unet(0), build_unet(1, block_out_channels=(32, 32))])


def test_a_few_training_steps_lower_the_loss(toy_members, tmp_path):
    from featurefusion.ensemble.data import ToyWorldData
    from featurefusion.ensemble.io import load_aggregators
    from featurefusion.ensemble.train import AFATrainConfig, train_aggregators

    data = ToyWorldData()
    config = AFATrainConfig(steps=20, batch_size=8, lr=1e-2, hidden_cap=16)
    train_aggregators(toy_members, data, tmp_path / "afa", config, progress=False)
    untrained = AFAUNet(toy_members.unets, hidden_cap=16)
    trained = AFAUNet(toy_members.unets, load_aggregators(tmp_path / "afa"))
    # The same held-out batches (steps the training never drew), the same noise and timesteps for both.
    losses = {"untrained": 0.0, "trained": 0.0}
    for step in range(1000, 1004):
        noisy, t, context, noise = toy_inputs(toy_members.pipe, data, step, 8)
        with torch.no_grad():
            for name, ensemble in (("untrained", untrained), ("trained", trained)):
                losses[name] += torch.nn.functional.mse_loss(ensemble(noisy, t, context).sample, noise).item()
    assert losses["trained"] < 0.99 * losses["untrained"], losses


def test_save_load_round_trip_and_hash_check(toy_members, tmp_path):
    from featurefusion.ensemble.data import ToyWorldData
    from featurefusion.ensemble.io import load_afa, load_members
    from featurefusion.ensemble.train import AFATrainConfig, train_aggregators

    # A private copy of one member, so that it can be changed afterwards.
    member = tmp_path / "member.safetensors"
    shutil.copy(toy_members.paths[2], member)
    members = load_members(toy_members.paths[0], [toy_members.paths[1], member])
    config = AFATrainConfig(steps=2, batch_size=8, lr=1e-2, hidden_cap=16)
    result = train_aggregators(members, ToyWorldData(), tmp_path / "afa", config, progress=False)
    pipe, loaded = load_afa(tmp_path / "afa")
    assert [p.resolve() for p in loaded.paths] == [p.resolve() for p in members.paths]
    noisy, t, context, _ = toy_inputs(members.pipe, ToyWorldData(), 5, 8)
    with torch.no_grad():
        reloaded = pipe.unet(noisy, t, context).sample
        trained = AFAUNet(members.unets, result.aggregators)(noisy, t, context).sample
        untrained = AFAUNet(members.unets, hidden_cap=16)(noisy, t, context).sample
    torch.testing.assert_close(reloaded, trained)
    assert not torch.allclose(reloaded, untrained)

    # Change one weight of the member: the aggregators no longer fit it, and loading says which file.
    from safetensors.torch import load_file, save_file

    state = load_file(member)
    key = next(iter(state))
    state[key] = state[key] + 1
    save_file(state, member)
    with pytest.raises(EnsembleError, match=r"member\.safetensors: SHA-256 differs"):
        load_afa(tmp_path / "afa")


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_training_refuses_an_existing_folder_without_resume_and_resumes_to_the_same_result(
    toy_members, tmp_path, schedule
):
    from featurefusion.ensemble.data import ToyWorldData
    from featurefusion.ensemble.io import load_aggregators
    from featurefusion.ensemble.train import AFATrainConfig, train_aggregators

    data = ToyWorldData()
    config = AFATrainConfig(steps=4, batch_size=8, lr=1e-2, hidden_cap=16, save_every=2, schedule=schedule)
    train_aggregators(toy_members, data, tmp_path / "whole", config, progress=False)
    train_aggregators(toy_members, data, tmp_path / "parts", AFATrainConfig(**{**config.__dict__, "max_seconds": 1e-9}),
                      progress=False)  # fmt: skip  # stops after its first step
    with pytest.raises(EnsembleError, match="--resume"):
        train_aggregators(toy_members, data, tmp_path / "parts", config, progress=False)
    result = train_aggregators(toy_members, data, tmp_path / "parts", config, resume=True, progress=False)
    assert result.start_step == 1 and result.end_step == 4
    whole, parts = load_aggregators(tmp_path / "whole"), load_aggregators(tmp_path / "parts")
    for (name, a), b in zip(whole.state_dict().items(), parts.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_training_further_starts_from_the_given_aggregators_of_the_same_members(toy_members, tmp_path):
    from featurefusion.ensemble.data import ToyWorldData
    from featurefusion.ensemble.io import Members, load_aggregators, read_config
    from featurefusion.ensemble.train import AFATrainConfig, train_aggregators

    data = ToyWorldData()
    train_aggregators(toy_members, data, tmp_path / "first", AFATrainConfig(steps=3, batch_size=8, lr=1e-2,
                      hidden_cap=16), progress=False)  # fmt: skip
    still = AFATrainConfig(steps=1, batch_size=8, lr=1e-12, hidden_cap=16, schedule="cosine")
    train_aggregators(toy_members, data, tmp_path / "further", still, progress=False, init_from=tmp_path / "first")
    first, further = load_aggregators(tmp_path / "first"), load_aggregators(tmp_path / "further")
    moved = 0
    for (name, a), b in zip(first.state_dict().items(), further.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
        moved += int(a.abs().sum() > 0 and "to_logits" in name)
    assert moved  # the first run trained the zero-initialised logits convs, the second kept them
    assert read_config(tmp_path / "further")["training"]["continued"]["from"] == str(tmp_path / "first")

    swapped = Members(toy_members.pipe, toy_members.unets[::-1], toy_members.paths[::-1], toy_members.toy)
    with pytest.raises(EnsembleError, match="same members in the same order"):
        train_aggregators(swapped, data, tmp_path / "x", still, progress=False, init_from=tmp_path / "first")
    assert not (tmp_path / "x").exists()


def test_leaving_a_member_out_runs_without_it_and_weighs_the_others():
    members = [build_unet(seed) for seed in (0, 1, 2)]
    ensemble = AFAUNet(members, hidden_cap=16)
    for block in ensemble.aggregators.blocks:  # trained-looking aggregators
        torch.nn.init.normal_(block.to_logits.weight, std=0.5)
    calls = []
    members[2].conv_in.register_forward_hook(lambda *a: calls.append(1))
    records, handles = _record_aggregations(ensemble)
    sample, t, context = torch.randn(2, 4, 8, 8), torch.tensor([3, 70]), torch.randn(2, 5, 32)
    with torch.no_grad():
        ensemble.exclude([2])(sample, t, context)
    for h in handles:
        h.remove()
    assert not calls  # the left-out member never ran
    for block, (features, aggregated) in zip(ensemble.aggregators.blocks, records, strict=True):
        torch.testing.assert_close(features[2], features[0])  # its slot holds the base's features
        weights = block.weights(features, ensemble.aggregators.embed_time(t, 2, torch.float32), context, frozenset({2}))
        assert torch.all(weights[:, 2] == 0)
        torch.testing.assert_close(weights[:, :2].sum(1), torch.ones_like(weights[:, 0]))
        torch.testing.assert_close(aggregated, weights[:, :1] * features[0] + weights[:, 1:2] * features[1])

    # Two members, one left out: the ensemble is the base model itself.
    pair = AFAUNet([members[0], members[1]], hidden_cap=16).exclude([1])
    with torch.no_grad():
        torch.testing.assert_close(pair(sample, t, context).sample, members[0](sample, t, context).sample,
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
    with pytest.raises(EnsembleError, match="among 1..2"):
        ensemble.exclude([0])
    assert ensemble.exclude().excluded == frozenset()


def test_min_snr_weighting_lowers_only_the_least_noisy_samples_weight():
    from diffusers import DDPMScheduler

    from featurefusion.ensemble.train import denoising_loss

    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    t = torch.tensor([5, 150, 600, 990])  # SNR ≈ 2e3, 16, 0.5, 1e-4
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    prediction = noise + 0.1 * torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    plain = denoising_loss(prediction, noise, t, scheduler)
    assert plain == torch.nn.functional.mse_loss(prediction, noise)
    per_sample = [
        denoising_loss(prediction[i : i + 1], noise[i : i + 1], t[i : i + 1], scheduler, 5.0) for i in range(4)
    ]
    unweighted = [torch.nn.functional.mse_loss(prediction[i], noise[i]) for i in range(4)]
    alpha = scheduler.alphas_cumprod[t]
    snr = alpha / (1 - alpha)
    # weight min(SNR, 5) / SNR: below 1 only where the image is nearly clean, 1 at and beyond SNR 5
    assert per_sample[0] < 0.01 * unweighted[0] and per_sample[1] < 0.5 * unweighted[1]
    torch.testing.assert_close(per_sample[1], unweighted[1] * 5 / snr[1])
    torch.testing.assert_close(per_sample[2], unweighted[2])
    torch.testing.assert_close(per_sample[3], unweighted[3])
    torch.testing.assert_close(denoising_loss(prediction, noise, t, scheduler, 5.0), torch.stack(per_sample).mean())


def test_resume_refuses_another_loss_weighting(toy_members, tmp_path):
    from featurefusion.ensemble.data import ToyWorldData
    from featurefusion.ensemble.train import AFATrainConfig, train_aggregators

    config = AFATrainConfig(steps=3, batch_size=8, lr=1e-2, hidden_cap=16, save_every=1, snr_gamma=5.0,
                            max_seconds=1e-9)  # fmt: skip  # stops after its first step, state saved
    train_aggregators(toy_members, ToyWorldData(), tmp_path / "afa", config, progress=False)
    other = AFATrainConfig(**{**config.__dict__, "snr_gamma": 0.0, "max_seconds": 0.0})
    with pytest.raises(EnsembleError, match="snr_gamma"):
        train_aggregators(toy_members, ToyWorldData(), tmp_path / "afa", other, resume=True, progress=False)
    with pytest.raises(EnsembleError, match="snr_gamma"):
        train_aggregators(toy_members, ToyWorldData(), tmp_path / "bad", AFATrainConfig(snr_gamma=-1), progress=False)
