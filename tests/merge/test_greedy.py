from featurefusion.merge.greedy import greedy_soup, reverse_greedy_soup

# A made-up metric over sets of models: 0 and 2 help together, 1 hurts, 3 is neutral alone but hurts in soups.
INDIVIDUAL = {0: 0.6, 1: 0.5, 2: 0.4, 3: 0.55}


def metric(members):
    if len(members) == 1:
        return INDIVIDUAL[members[0]]
    return 0.6 + 0.2 * (0 in members and 2 in members) - 0.3 * (1 in members) - 0.05 * (3 in members)


def test_greedy_adds_only_models_that_help():
    result = greedy_soup(4, metric)
    assert result.chosen == (0, 2)
    assert abs(result.score - 0.8) < 1e-9
    assert [s[0] for s in result.steps] == ["start", "skip 3", "skip 1", "add 2"]
    assert result.weights(4) == [0.5, 0.0, 0.5, 0.0]


def test_reverse_greedy_removes_models_that_hurt():
    result = reverse_greedy_soup(4, metric)
    assert result.chosen == (0, 2)
    assert [s[0] for s in result.steps] == ["start", "keep 2", "remove 1", "remove 3", "keep 0"]


def test_scores_are_cached():
    calls = []

    def counting(members):
        calls.append(members)
        return metric(members)

    result = greedy_soup(4, counting)
    assert len(calls) == len(set(calls)) == result.evaluations


def test_search_soup_merges_the_chosen_checkpoints(tiny, tmp_path):
    import torch

    from featurefusion.io.checkpoint import open_checkpoint
    from featurefusion.merge import operations
    from featurefusion.merge.greedy import search_soup

    def unet(path):
        with open_checkpoint(path) as ckpt:
            return {k: ckpt.read(k).float() for k in ckpt.keys("unet")}

    # The metric rewards closeness to the soup of the base and the second specialist.
    target_file = tmp_path / "target.safetensors"
    operations.merge([tiny.base, tiny.specialists[1]], target_file, "soup")
    target = unet(target_file)

    def closeness(path):
        weights = unet(path)
        return -sum(float((weights[k] - target[k]).square().sum()) for k in target)

    for reverse in (False, True):
        out = tmp_path / f"chosen-{reverse}.safetensors"
        result = search_soup(tiny.models, closeness, out, reverse=reverse)
        assert result.chosen == (0, 2)
        merged = unet(out)
        assert all(torch.allclose(merged[k], target[k], atol=1e-6) for k in target)
        assert not list(tmp_path.glob(".*candidate*"))  # the scratch soup is cleaned up
