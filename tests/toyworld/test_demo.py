"""The shipped models and the demo, on reduced settings."""

import pytest

from featurefusion.evaluate.toy import EvalSettings, Evaluator
from featurefusion.toyworld.demo import SHIPPED, quick_config, run_demo
from featurefusion.toyworld.models import load_pipeline
from featurefusion.toyworld.scorer import load_scorer
from featurefusion.toyworld.train import SPECIALIST_TASKS

pytestmark = pytest.mark.skipif(not (SHIPPED / "base").exists(), reason="shipped toy-world models not built")


def test_every_shipped_specialist_beats_the_base_on_its_own_task():
    scorer = load_scorer(SHIPPED / "scorer.safetensors")
    settings = EvalSettings(images_per_task=48, steps=12, seed=5)
    base = Evaluator(scorer, list(SPECIALIST_TASKS), settings)(load_pipeline(SHIPPED / "base"), with_fid=False)
    for name in SPECIALIST_TASKS:
        specialist = load_pipeline(SHIPPED / "base", SHIPPED / "specialists" / f"{name}.safetensors")
        own = Evaluator(scorer, [name], settings)(specialist, with_fid=False).alignment()[name]
        assert own >= base.alignment()[name] + 15, f"{name}: specialist {own:.1f} vs base {base.alignment()[name]:.1f}"


def test_the_demo_runs_end_to_end(tmp_path):
    from dataclasses import replace

    config = replace(quick_config(tmp_path / "demo"), specialists=SPECIALIST_TASKS[:2], greedy=True, progress=False)
    report = run_demo(config)
    text = report.read_text()
    headings = ("Every model on every task", "Unlearning", "threshold sweep", "How FeatureFusion weighs",
                "How each method's options were chosen", "Block weights", "ZipIt!", "Greedy soups",
                "Times")  # fmt: skip
    for heading in headings:
        assert heading in text
    for picture in ("alignment.png", "fid.png", "grid.png", "threshold.png"):
        assert (report.parent / picture).stat().st_size > 1000
    assert "specialist objects-round" in text and "without objects-angular" in text
    for row in (
        "| TIES (density 0.2, scale 1) |",
        "| Iso-CTS (scale 1) |",
        "| Block-weighted (searched) |",
        "| ZipIt! (budget 0.125) |",
    ):
        assert row in text
