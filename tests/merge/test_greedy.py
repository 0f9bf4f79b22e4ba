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
