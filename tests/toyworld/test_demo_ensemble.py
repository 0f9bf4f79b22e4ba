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


def test_with_ablation_the_demo_leaves_each_specialist_out_of_the_ensembles(tmp_path):
    from featurefusion.evaluate.toy import Evaluator
    from featurefusion.toyworld import demo_ensemble
    from featurefusion.toyworld.demo import DemoState
    from featurefusion.toyworld.scorer import load_scorer

    config = replace(quick_config(tmp_path / "demo"), specialists=("style-dark",), progress=False)
    config = replace(config, evaluation=replace(config.evaluation, images_per_task=4, steps=2))
    assert "ensembles without one member" not in [label for label, _ in demo_ensemble.ensemble_steps(config)]
    config = replace(config, ablation=True)
    steps = dict(demo_ensemble.ensemble_steps(config))
    state = DemoState(config, Evaluator(load_scorer(config.checkpoints / "scorer.safetensors"), ["style-dark"],
                                        config.evaluation))  # fmt: skip
    for label in ("AFA", "output average", "ensembles without one member"):
        steps[label](state, tmp_path)
    row = state.ensembles["removal"]["style-dark"]
    assert set(row) == {"AFA, all", "AFA, without", "average, all", "average, without"}
    assert all(0 <= v <= 100 for v in row.values())
    assert state.ensembles["pipes"][AFA_LABEL].unet.excluded == frozenset()  # put back for the cost step
    alignment = {"base": {"style-dark": 0.0}}
    text = "\n".join(demo_ensemble._removal_section(state, alignment))
    assert "| style-dark |" in text and "AFA: lost" in text and "average: lost" in text


def test_the_best_merge_is_a_merge_not_the_student_or_an_ensemble():
    from types import SimpleNamespace

    from featurefusion.ensemble.cost import Cost
    from featurefusion.toyworld import demo_distill, demo_ensemble

    tasks = ("objects-round",)

    def row(value):
        return {"objects-round": value, "mean": value}

    alignment = {"base": row(40.0), "specialist objects-round": row(90.0), "Task arithmetic (scale 0.5)": row(55.0),
                 demo_distill.ROW: row(80.0), AFA_LABEL: row(85.0)}  # fmt: skip
    state = SimpleNamespace(
        config=SimpleNamespace(specialists=tasks, evaluation=SimpleNamespace(steps=12, precision="bf16")),
        dmm=demo_distill.DMMResults({}, None, {}),
        ensembles={"pipes": {}, "members": {}, "costs": {AFA_LABEL: Cost(1, 4, 0.1, 8)}},
        unlearned={},
    )
    text = "\n".join(demo_distill.report_section(state, alignment))
    assert "best merge (Task arithmetic (scale 0.5)) 55.0" in text
    text = "\n".join(demo_ensemble.ensemble_section(state, alignment))
    assert f"| {AFA_LABEL} | 85.0 | 55.0 | 90.0 |" in text
