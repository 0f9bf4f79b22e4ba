"""Output ensembles: averaged and keyword-routed noise predictions; and what each ensemble costs."""

from __future__ import annotations

import copy

import pytest
import torch
from ensemble_helpers import load_toy_members

from featurefusion.ensemble.output import KeywordRouter, OutputEnsembleUNet, parse_keyword_map
from featurefusion.ensemble.unet import EnsembleError

from conftest import build_unet

_toy_members = pytest.fixture(scope="module", name="toy_members")(load_toy_members)


def _inputs():
    return torch.randn(2, 4, 8, 8), torch.tensor([3, 70]), torch.randn(2, 5, 32)


def test_uniform_and_weighted_averages_of_noise_predictions():
    members = [build_unet(seed) for seed in (0, 1, 2)]
    sample, t, context = _inputs()
    with torch.no_grad():
        eps = [m(sample, t, context).sample for m in members]
        uniform = OutputEnsembleUNet(members)(sample, t, context).sample
        weighted = OutputEnsembleUNet(members, weights=[2, 1, 0])(sample, t, context).sample
    torch.testing.assert_close(uniform, sum(eps) / 3)
    torch.testing.assert_close(weighted, (2 * eps[0] + eps[1]) / 3)


def test_n_identical_models_make_every_output_ensemble_equal_to_the_single_model():
    single = build_unet(0)
    members = [copy.deepcopy(single) for _ in range(3)]
    sample, t, context = _inputs()
    routed = OutputEnsembleUNet(members, router=KeywordRouter({1: ["cat"], 2: ["dog"]}, 3, fallback=None))
    with torch.no_grad():
        expected = single(sample, t, context).sample
        torch.testing.assert_close(OutputEnsembleUNet(members)(sample, t, context).sample, expected)
        torch.testing.assert_close(OutputEnsembleUNet(members, [5, 1, 1])(sample, t, context).sample, expected)
        with routed.route(["a cat", "a bird"]):
            torch.testing.assert_close(routed(sample, t, context).sample, expected)


def test_keyword_router_weights():
    router = KeywordRouter({1: ["striped"], 2: ["circle", "moon"]}, 3, fallback=0)
    weights = router.weights(["a red circle, striped", "a blue moon, plain", "a red square, plain", "stripedness"])
    assert weights.tolist() == [[0, 0.5, 0.5], [0, 0, 1], [1, 0, 0], [1, 0, 0]]  # whole words only
    assert KeywordRouter({1: ["x"]}, 2, fallback=None).weights(["y"]).tolist() == [[0.5, 0.5]]
    assert parse_keyword_map("style-striped=striped; 2=circle,moon", ["base", "style-striped", "round"]) == {
        1: ["striped"],
        2: ["circle", "moon"],
    }
    with pytest.raises(EnsembleError, match="none of the models"):
        parse_keyword_map("nobody=x", ["base"])
    with pytest.raises(EnsembleError, match="has 2 models"):
        KeywordRouter({5: ["x"]}, 2)


def test_routing_in_the_toy_pipeline_gives_each_prompt_its_models_images(toy_members):
    from featurefusion.toyworld.models import ToyPipeline

    members = toy_members
    pipe = members.pipe
    prompts = ["a red circle, plain", "a blue square, dark", "a green star, plain", "a red moon, dark"]
    router = KeywordRouter({1: ["circle", "moon"], 2: ["dark"]}, 3, fallback=0)
    routed = ToyPipeline(OutputEnsembleUNet(members.unets, router=router), pipe.text_encoder, pipe.tokenizer,
                         pipe.scheduler)  # fmt: skip
    images = routed(prompts, steps=3, seed=4, batch_size=3)  # two pipeline batches: routing follows each one
    singles = [ToyPipeline(u, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)(prompts, steps=3, seed=4)
               for u in members.unets]  # fmt: skip
    torch.testing.assert_close(images[0], singles[1][0])
    torch.testing.assert_close(images[1], singles[2][1])
    torch.testing.assert_close(images[2], singles[0][2])
    assert not torch.allclose(images[3], singles[1][3])  # circle-or-moon and dark: the average of both
    assert not torch.allclose(images[3], singles[2][3])


def test_costs_count_shared_components_once(toy_members):
    from featurefusion.ensemble.cost import measure, parameters_held
    from featurefusion.ensemble.unet import AFAUNet
    from featurefusion.toyworld.models import ToyPipeline

    pipe = toy_members.pipe
    unet = sum(p.numel() for p in toy_members.unets[0].parameters())
    text = sum(p.numel() for p in pipe.text_encoder.parameters())
    single = ToyPipeline(toy_members.unets[0], pipe.text_encoder, pipe.tokenizer, pipe.scheduler)
    average = ToyPipeline(OutputEnsembleUNet(toy_members.unets), pipe.text_encoder, pipe.tokenizer, pipe.scheduler)
    afa_unet = AFAUNet(toy_members.unets, hidden_cap=16)
    afa = ToyPipeline(afa_unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)
    assert parameters_held(single)[0] == unet + text
    assert parameters_held(average)[0] == 3 * unet + text
    aggregators = sum(p.numel() for p in afa_unet.aggregators.parameters())
    assert parameters_held(afa)[0] == 3 * unet + text + aggregators
    costs = {name: measure(p, lambda p=p: p(["a red circle, plain"] * 4, steps=2), 4)
             for name, p in (("single", single), ("afa", afa))}  # fmt: skip
    assert costs["afa"].seconds_per_image > costs["single"].seconds_per_image > 0
    assert costs["afa"].peak_bytes > costs["single"].peak_bytes >= parameters_held(single)[1]
