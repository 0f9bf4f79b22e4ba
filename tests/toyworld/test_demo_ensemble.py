"""The demo's ensemble rows and cost table, on a reduced plan (no merge searches)."""

from dataclasses import replace

import pytest

from featurefusion.toyworld.demo import SHIPPED, quick_config, run_demo
from featurefusion.toyworld.demo_ensemble import AFA_LABEL, AVERAGE_LABEL, ROUTING_LABEL, task_keywords

pytestmark = pytest.mark.skipif(not (SHIPPED / "afa" / "afa.json").exists(), reason="shipped aggregators not built")


def test_task_keywords_name_each_tasks_objects_or_style():
    assert task_keywords("objects-round") == ["circle", "moon"]
    assert task_keywords("style-dark") == ["dark"]


def test_the_demo_reports_ensembles_next_to_merges_with_their_cost(tmp_path):
    config = replace(quick_config(tmp_path / "demo"), specialists=("objects-round",), searched_methods=(),
                     block_search=(), unlearning=False, greedy=False, thresholds=(), progress=False)  # fmt: skip
    # 10 images: more than the 8 per task an evaluation keeps for the grids.
    config = replace(config, evaluation=replace(config.evaluation, images_per_task=10, steps=3))
    text = run_demo(config).read_text()
    for row in (AFA_LABEL, AVERAGE_LABEL, ROUTING_LABEL, "one model (base, a specialist or any merge)"):
        assert text.count(f"| {row} |") >= 1, row
    assert "## Ensembles: what routing buys over a merge" in text and "### Inference cost" in text
    assert "AFA's members: base, objects-round, objects-angular" in text
    # Seconds per image are the evaluation's own time over every test image it drew (1 task x 10 images).
    cost = float(text.split("| one model (base, a specialist or any merge) |")[1].split("|")[1])
    sampled = float(text.split("\n| base | ")[-1].split(" |")[0])
    assert abs(cost * 10 - sampled) <= 0.06 + 0.02 * sampled
