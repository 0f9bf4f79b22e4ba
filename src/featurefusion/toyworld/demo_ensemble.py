"""The demo's ensemble rows: AFA, the output average, keyword routing, and every model's inference cost.

Ensembles keep every member alive at inference; the rows show what that buys over a merge (prompt alignment,
FID, in the same matrix as every merge) and what it costs (parameters held, seconds per image, peak memory).

- **AFA**: the shipped aggregators (`checkpoints/afa/`) over the base and the 7 specialists they were
  trained with (hash-checked), whatever `DemoConfig.specialists` says.
- **Output average**: the mean noise prediction of the base and the demo's specialists.
- **Keyword routing**: each prompt goes to the specialists whose task words it contains (object names of an
  object task, a style's name), averaged when several match; the base serves the rest.

With `--ablation`, the counterpart of FeatureFusion's unlearning: each specialist left out of AFA (not run,
weight 0, without retraining) and out of the output average, scored on its own task.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from featurefusion.evaluate.report import markdown_table

AFA_LABEL, AVERAGE_LABEL, ROUTING_LABEL = "AFA (trained aggregators)", "Output average", "Keyword routing"
ENSEMBLE_LABELS = (AFA_LABEL, AVERAGE_LABEL, ROUTING_LABEL)
COST_IMAGES = 4  # images of the profiled sampling call that measures peak memory


def shipped_afa(checkpoints: Path) -> Path:
    return checkpoints / "afa"


def ensemble_steps(config) -> list:
    steps = []
    if (shipped_afa(config.checkpoints) / "afa.json").is_file():
        steps.append(("AFA", _afa))
    steps += [("output average", _average(False)), ("keyword routing", _average(True))]
    if config.ablation:
        steps.append(("ensembles without one member", _removal))
    steps.append(("costs", _costs))
    return steps


def _extras(state) -> dict:
    # The demo's state has no slot for ensembles; keep ours beside it rather than widening the demo's dataclass.
    if not hasattr(state, "ensembles"):
        state.ensembles = {"pipes": {}, "costs": {}, "members": {}}
    return state.ensembles


def task_keywords(task: str) -> list[str]:
    """The words that name a task: its objects (object tasks) or its style (style tasks)."""
    from featurefusion.toyworld.world import OBJECT_GROUPS

    kind, _, name = task.partition("-")
    return list(OBJECT_GROUPS[name]) if kind == "objects" else [name]


def _afa(state, _models: Path) -> None:
    from featurefusion.ensemble.io import load_afa

    start = time.perf_counter()
    pipe, members = load_afa(shipped_afa(state.config.checkpoints))
    state.merge_seconds[AFA_LABEL + " (load)"] = time.perf_counter() - start
    _extras(state)["pipes"][AFA_LABEL] = pipe
    _extras(state)["members"][AFA_LABEL] = [p.name.removesuffix(".safetensors") for p in members.paths]
    state.results[AFA_LABEL] = state.evaluator(pipe, True)


def _average(routed: bool):
    def step(state, _models: Path) -> None:
        from featurefusion.ensemble.io import load_members
        from featurefusion.ensemble.output import KeywordRouter, OutputEnsembleUNet

        start = time.perf_counter()
        members = load_members(state.base_dir, [state.specialist_file(n) for n in state.config.specialists])
        router = None
        if routed:
            keywords = {i + 1: task_keywords(name) for i, name in enumerate(state.config.specialists)}
            router = KeywordRouter(keywords, len(members.unets), fallback=0)
        members.pipe.unet = OutputEnsembleUNet(members.unets, router=router)
        label = ROUTING_LABEL if routed else AVERAGE_LABEL
        state.merge_seconds[label + " (load)"] = time.perf_counter() - start
        _extras(state)["pipes"][label] = members.pipe
        state.results[label] = state.evaluator(members.pipe, True)

    return step


def _removal(state, _models: Path) -> None:
    """Each specialist left out of AFA and of the output average, scored on its own task's test prompts (with
    all members too, on the same prompts and noise: a one-task evaluator draws other noise than the full one)."""
    from featurefusion.ensemble.output import OutputEnsembleUNet
    from featurefusion.evaluate.toy import Evaluator

    extras = _extras(state)
    removal = extras.setdefault("removal", {})
    afa_pipe, average_pipe = extras["pipes"].get(AFA_LABEL), extras["pipes"].get(AVERAGE_LABEL)
    afa_names = extras["members"].get(AFA_LABEL, [])
    for position, name in enumerate(state.config.specialists):
        evaluator = Evaluator(state.evaluator.scorer, [name], state.config.evaluation)
        row = {}
        if afa_pipe is not None and name in afa_names:
            row["AFA, all"] = evaluator(afa_pipe, False).alignment()[name]
            afa_pipe.unet.exclude([afa_names.index(name)])
            try:
                row["AFA, without"] = evaluator(afa_pipe, False).alignment()[name]
            finally:
                afa_pipe.unet.exclude()
        if average_pipe is not None:
            everyone = average_pipe.unet
            row["average, all"] = evaluator(average_pipe, False).alignment()[name]
            rest = [unet for i, unet in enumerate(everyone.members) if i != position + 1]  # member 0 is the base
            average_pipe.unet = OutputEnsembleUNet(rest)
            try:
                row["average, without"] = evaluator(average_pipe, False).alignment()[name]
            finally:
                average_pipe.unet = everyone
        removal[name] = row


def _removal_section(state, alignment) -> list[str]:
    removal = _extras(state).get("removal")
    if not removal:
        return []
    rows = {}
    for name, row in removal.items():
        out = dict(row)
        for kind in ("AFA", "average"):
            if f"{kind}, all" in row:
                out[f"{kind}: lost"] = row[f"{kind}, all"] - row[f"{kind}, without"]
        if name in state.unlearned and "FeatureFusion" in alignment:
            out["FeatureFusion unlearning: lost"] = (
                alignment["FeatureFusion"][name] - state.unlearned[name].alignment()[name]
            )
        rows[name] = out
    columns = list(dict.fromkeys(k for row in rows.values() for k in row))
    return [
        "### Removing a model from an ensemble (no unlearning needed)",
        "",
        "An ensemble removes a member by not running it: the output average averages the others; AFA gives it "
        "weight 0 in every aggregator (softmax over the others) and fills its input slot with the base's "
        "features, without retraining. Each row leaves one specialist out and scores its own task "
        f"({state.config.evaluation.images_per_task} test prompts, with all members and without it, on the same "
        "prompts and noise); FeatureFusion's loss by unlearning (the table above) is beside it. What a removal "
        "should do is lose the removed specialist's skill: a large loss is the wanted result.",
        "",
        markdown_table(rows, columns, fmt="{:.1f}", bold_best=False, first_header="left out"),
        "",
    ]


def _costs(state, _models: Path) -> None:
    """Each kind of model's inference cost. Seconds per image come from its evaluation run above (sampling and
    scoring every test image); peak memory from one profiled sampling call of COST_IMAGES images."""
    from featurefusion.ensemble.cost import Cost, activation_peak, parameters_held
    from featurefusion.toyworld.models import load_pipeline

    extras = _extras(state)
    settings = state.config.evaluation
    prompts = [spec.prompt for specs in state.evaluator.specs.values() for spec in specs][::7][:COST_IMAGES]
    prompts = (prompts * COST_IMAGES)[:COST_IMAGES]
    kinds = {"one model (base, a specialist or any merge)": (load_pipeline(state.base_dir), "base")}
    kinds |= {label: (pipe, label) for label, pipe in extras["pipes"].items()}
    for label, (pipe, evaluated) in kinds.items():

        def run(pipe=pipe):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.precision == "bf16"):
                pipe(prompts, steps=settings.steps, guidance_scale=settings.guidance_scale, seed=settings.seed)

        result = state.results[evaluated]
        images = len(result.tasks) * settings.images_per_task  # `samples` keeps only the grid's few
        count, weight_bytes = parameters_held(pipe)
        extras["costs"][label] = Cost(count, weight_bytes, result.seconds / images, weight_bytes + activation_peak(run))
    extras["pipes"].clear()  # eight U-Nets per ensemble: let them go before the report


def ensemble_section(state, alignment: dict[str, dict[str, float]]) -> list[str]:
    extras = getattr(state, "ensembles", None)
    if not extras or not extras["costs"]:
        return []
    tasks = list(state.config.specialists)
    ensembles = [label for label in ENSEMBLE_LABELS if label in alignment]
    single = {"base", *(f"specialist {n}" for n in tasks)}
    from featurefusion.toyworld.demo_distill import ROW as STUDENT_ROW

    # A merge is one model made from the others' weights: not the base, a specialist, the student or an ensemble.
    merges = {n: row for n, row in alignment.items() if n not in single | {STUDENT_ROW} | set(ENSEMBLE_LABELS)}
    specialist_means = {n: alignment[f"specialist {n}"]["mean"] for n in tasks if f"specialist {n}" in alignment}
    lines = [
        "## Ensembles: what routing buys over a merge, and what it costs",
        "",
        f"Rows {', '.join(ensembles)} above keep every member at inference. "
        "AFA mixes the members' block features with aggregators trained on the denoising loss (AFA §3.3: per "
        "block a ResNet layer with the time embedding, a Transformer layer attending to the prompt and a "
        "zero-initialised 1×1 conv to softmax weights over the models); the output average takes the mean of the "
        "members' noise predictions; keyword routing sends each prompt to the specialists whose task words it "
        "contains (the base serves the rest).",
        "",
    ]
    if AFA_LABEL in alignment:
        members = ", ".join(extras["members"].get(AFA_LABEL, []))
        lines += [f"AFA's members: {members}.", ""]
    summary = {}
    for label in ensembles:
        row = alignment[label]
        best_merge = max(merges.items(), key=lambda kv: kv[1]["mean"]) if merges else None
        best_specialist = max(specialist_means.items(), key=lambda kv: kv[1]) if specialist_means else None
        gaps = [row[t] - alignment[f"specialist {t}"][t] for t in tasks if f"specialist {t}" in alignment]
        summary[label] = {
            "mean": row["mean"],
            "best merge's mean": best_merge[1]["mean"] if best_merge else float("nan"),
            "best specialist's mean": best_specialist[1] if best_specialist else float("nan"),
            "worst gap to a task's specialist": min(gaps) if gaps else float("nan"),
        }
    if summary:
        lines += [
            "Mean prompt alignment against the best merge, the best single specialist (mean over all tasks), and "
            "the largest shortfall on one task against that task's own specialist (target: within 10 points):",
            "",
            markdown_table(summary, list(next(iter(summary.values()))), bold_best=False),
            "",
        ]
    lines += _removal_section(state, alignment)
    costs = extras["costs"]
    rows = {label: cost.row() for label, cost in costs.items()}
    lines += [
        "### Inference cost",
        "",
        "Seconds per image: the model's evaluation above (every test image sampled with DDIM "
        f"{state.config.evaluation.steps} steps and classifier-free guidance, {state.config.evaluation.precision}, "
        "and scored), divided by its images. Parameters held count every distinct tensor once (the ensembles "
        "share the base's text encoder); peak memory is the weights plus the activations' peak in one sampling "
        f"call of {COST_IMAGES} images (the torch profiler's allocation record). Every merge has the base's "
        "architecture, so the first row is the cost of the base, of each specialist and of every merge row above.",
        "",
        markdown_table(rows, list(next(iter(rows.values()))), fmt="{:.3g}", bold_best=False, first_header="model"),
        "",
    ]
    return lines
