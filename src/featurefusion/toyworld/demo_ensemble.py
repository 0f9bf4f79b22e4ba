"""The demo's ensemble rows: AFA, the output average, keyword routing, and every model's inference cost.

Ensembles keep every member alive at inference; the rows show what that buys over a merge (prompt alignment,
FID, in the same matrix as every merge) and what it costs (parameters held, seconds per image, peak memory).

- **AFA**: the shipped aggregators (`checkpoints/afa/`) over the base and the 7 specialists they were
  trained with (hash-checked), whatever `DemoConfig.specialists` says.
- **Output average**: the mean noise prediction of the base and the demo's specialists.
- **Keyword routing**: each prompt goes to the specialists whose task words it contains (object names of an
  object task, a style's name), averaged when several match; the base serves the rest.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from featurefusion.evaluate.report import markdown_table

AFA_LABEL, AVERAGE_LABEL, ROUTING_LABEL = "AFA (trained aggregators)", "Output average", "Keyword routing"
COST_IMAGES = 4  # images of the profiled sampling call that measures peak memory


def shipped_afa(checkpoints: Path) -> Path:
    return checkpoints / "afa"


def ensemble_steps(config) -> list:
    steps = []
    if (shipped_afa(config.checkpoints) / "afa.json").is_file():
        steps.append(("AFA", _afa))
    steps += [("output average", _average(False)), ("keyword routing", _average(True)), ("costs", _costs)]
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
    ensembles = [label for label in (AFA_LABEL, AVERAGE_LABEL, ROUTING_LABEL) if label in alignment]
    single = {"base", *(f"specialist {n}" for n in tasks)}
    merges = {name: row for name, row in alignment.items() if name not in single and name not in ensembles}
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
