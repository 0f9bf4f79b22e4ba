"""The student's demo steps on a reduced setup: a one-step student of the base and two specialists."""

from dataclasses import replace

from featurefusion.distill.run import distill
from featurefusion.distill.trainer import DistillConfig
from featurefusion.evaluate.toy import Evaluator
from featurefusion.toyworld import demo_distill
from featurefusion.toyworld.demo import SHIPPED, DemoState, quick_config
from featurefusion.toyworld.scorer import load_scorer


def test_student_rows_and_fidt(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "specialists").mkdir(parents=True)
    (checkpoints / "base").symlink_to(SHIPPED / "base")
    (checkpoints / "scorer.safetensors").symlink_to(SHIPPED / "scorer.safetensors")
    tasks = ("objects-round", "style-dark")
    for name in tasks:
        (checkpoints / "specialists" / f"{name}.safetensors").symlink_to(
            SHIPPED / "specialists" / f"{name}.safetensors"
        )
    teachers = [f"base={SHIPPED / 'base'}", *(str(SHIPPED / "specialists" / f"{n}.safetensors") for n in tasks)]
    distill(SHIPPED / "base", teachers, checkpoints / "student", DistillConfig(steps=1, batch_size=2), progress=False)

    config = replace(quick_config(tmp_path / "demo"), checkpoints=checkpoints, specialists=tasks, progress=False)
    config = replace(config, evaluation=replace(config.evaluation, images_per_task=4, steps=2, reference_images=16))
    state = DemoState(
        config, Evaluator(load_scorer(checkpoints / "scorer.safetensors"), list(tasks), config.evaluation)
    )
    state.results["base"] = state.score(None)
    for name in tasks:
        state.results[f"specialist {name}"] = state.score(state.specialist_file(name))
    steps = demo_distill.plan(config)
    assert [label for label, _ in steps] == ["DMM student", "DMM FIDt"]
    for _label, step in steps:
        step(state, tmp_path)
    row = state.results[demo_distill.ROW]
    assert set(row.alignment()) == set(tasks)
    assert state.dmm.fidt.names == ["base", *tasks]
    assert all(v >= 0 for v in state.dmm.fidt.diagonal().values())
    alignment = {n: {**r.alignment(), "mean": r.mean_alignment()} for n, r in state.results.items()}
    text = "\n".join(demo_distill.report_section(state, alignment))
    assert "DMM: one student" in text and "FIDt" in text and "kept %" in text


def test_no_student_no_steps(tmp_path):
    assert demo_distill.plan(replace(quick_config(tmp_path), checkpoints=tmp_path)) == []
