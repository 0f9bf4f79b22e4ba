"""The DMM student in `featurefusion demo`: its row in every table, and FIDt against the teachers' reference.

The shipped student (`checkpoints/student`, distilled from the base and the seven specialists) is sampled on
every task's test prompts with each task prompted in its teacher's style, on the same prompts and initial
noise as every other model, and scored by the same scorer; its row joins the models × tasks matrix and the
FID table. FIDt (DMM paper §4.1) compares the student with each style to every teacher, and two seeds of the
teachers' own samples give the reference (`featurefusion.distill.fidt`), on the uniform task's test prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from featurefusion.evaluate.report import markdown_table

ROW = "DMM student (teacher's style)"
STUDENT_DIR = "student"


@dataclass
class DMMResults:
    styles: dict[str, str]  # task -> style the student was prompted with
    fidt: object | None  # distill.fidt.FIDtResult
    training: dict


def student_folder(config) -> Path:
    return config.checkpoints / STUDENT_DIR


def plan(config) -> list:
    """The demo's steps for the student (none when the package ships no student)."""
    if not (student_folder(config) / "student.json").is_file():
        return []
    return [("DMM student", _score_student), ("DMM FIDt", _fidt)]


def _results(state) -> DMMResults:
    # Kept on the demo state as an attribute of its own, so the demo's dataclass stays as it is.
    if getattr(state, "dmm", None) is None:
        meta = json.loads((student_folder(state.config) / "student.json").read_text())
        training = dict(meta.get("training", {}))
        if meta.get("continued"):  # trained further from an earlier student: report both runs
            training["continued"] = meta["continued"]
        state.dmm = DMMResults({}, None, training)
    return state.dmm


def _score_student(state, _models: Path) -> None:
    from featurefusion.distill.toy_sampling import load_toy_student

    pipe = load_toy_student(student_folder(state.config))
    tasks = list(state.evaluator.specs)
    missing = [t for t in tasks if t not in pipe.student.names]
    if missing:
        raise ValueError(f"the shipped student has no style for tasks {missing} (styles: {pipe.student.names})")
    results = _results(state)
    results.styles = {t: t for t in tasks}
    pipe.styles = [t for t in tasks for _ in state.evaluator.specs[t]]  # the evaluator's prompt order
    state.results[ROW] = state.evaluator(pipe)


def _fidt(state, _models: Path) -> None:
    from featurefusion.distill.fidt import FIDtSampling, compute_fidt, scorer_metric, toy_sets
    from featurefusion.distill.store import read_meta
    from featurefusion.toyworld.scorer import UNIFORM_TASK
    from featurefusion.toyworld.world import sample_specs

    ev = state.config.evaluation
    n = max(16, ev.images_per_task)
    prompts = [s.prompt for s in sample_specs(UNIFORM_TASK, n, seed=ev.seed, split="test")]
    folder = student_folder(state.config)
    files = {"base": state.base_dir, **{name: state.specialist_file(name) for name in state.config.specialists}}
    teachers = [(name, files[name]) for name in read_meta(folder)["styles"] if name in files]  # the demo's only
    sampling = FIDtSampling(prompts, ev.steps, ev.guidance_scale, precision=ev.precision)
    sets = toy_sets(folder, teachers, sampling)
    _results(state).fidt = compute_fidt(*sets, scorer_metric(state.evaluator.scorer))


def report_section(state, alignment: dict[str, dict[str, float]]) -> list[str]:
    results = getattr(state, "dmm", None)
    if results is None or ROW not in alignment:
        return []
    tasks = list(state.config.specialists)
    rows = {}
    for task in tasks:
        teacher = alignment[f"specialist {task}"][task]
        student = alignment[ROW][task]
        rows[task] = {"teacher (own task)": teacher, "student (teacher's style)": student,
                      "kept %": 100 * student / teacher if teacher else float("nan")}  # fmt: skip
    from featurefusion.toyworld.demo_ensemble import ENSEMBLE_LABELS

    not_merges = {ROW, "base", *ENSEMBLE_LABELS}
    best_merge = max((n for n in alignment if n not in not_merges and not n.startswith("specialist ")),
                     key=lambda n: alignment[n]["mean"], default=None)  # fmt: skip
    t = results.training
    lines = [
        "## DMM: one student distilled from the base and every specialist",
        "",
        "A style-promptable student (DMM, Song et al.; `featurefusion distill`, docs/distill.md): the base's UNet "
        "plus a learned style embedding per teacher added to the time embedding. Each task is prompted in its "
        "teacher's style. Own-task prompt alignment, teacher against student:",
        "",
        markdown_table(
            rows,
            ["teacher (own task)", "student (teacher's style)", "kept %"],
            fmt="{:.1f}",
            bold_best=False,
            first_header="task",
        ),  # fmt: skip
        "",
        f"Mean over tasks: student {alignment[ROW]['mean']:.1f}"
        + (f", best merge ({best_merge}) {alignment[best_merge]['mean']:.1f}" if best_merge else "")
        + f", base {alignment['base']['mean']:.1f}.",
        "",
    ]
    if t:
        runs, continued = [t], t.get("continued")
        while continued and continued.get("earlier_training"):  # the runs this student was trained further from
            runs.insert(0, continued["earlier_training"])
            continued = continued.get("earlier_continued")
        said = "; then ".join(
            f"{r.get('steps')} steps (+{r.get('synth_steps')} on {r.get('synth_images')} images synthesised per "
            f"teacher), batch {r.get('batch_size')} per teacher, {r.get('seconds')} s"
            for r in runs
        )
        lines += [
            f"Trained in {len(runs)} run{'s' if len(runs) > 1 else ''} on this machine: {said} (the commands are in "
            "docs/distill.md).",
            "",
        ]
    if results.fidt is not None:
        f = results.fidt
        diag = {
            name: {"student M(i,i)": f.matrix[i][i], "reference M_ref(i,i)": f.reference[i][i]}
            for i, name in enumerate(f.names)
        }
        diag["FIDt (trace)"] = {"student M(i,i)": f.fidt, "reference M_ref(i,i)": f.reference_fidt}
        lines += [
            "### FIDt (DMM paper §4.1)",
            "",
            "FID in the scorer's feature space between the student with style i and teacher i, on the uniform "
            "task's test prompts; the reference compares two seeds of teacher i's own samples (what a perfect "
            f"student would score at this sample size). FIDt = {f.fidt:.1f} against the reference "
            f"{f.reference_fidt:.1f} ({100 * (f.fidt / f.reference_fidt - 1):+.0f} %).",
            "",
            markdown_table(
                diag, ["student M(i,i)", "reference M_ref(i,i)"], fmt="{:.1f}", bold_best=False, first_header="style"
            ),  # fmt: skip
            "",
        ]
    return lines
