"""`featurefusion demo`: the FeatureFusion paper's experiment on the built-in world, end to end.

It merges the shipped base model and its specialists with every method the package has, samples every model
on every task with the same prompts and noise, scores them with the shipped scorer, and writes
`runs/demo/report.md` with the models x tasks matrix (the paper's Figure 4), image grids (Figures 2-3), the
unlearning table, the FeatureFusion ablation and the merge and sampling times.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from featurefusion.evaluate.report import heatmap, labelled_grid, line_plot, markdown_table
from featurefusion.evaluate.toy import EvalSettings, Evaluator, ModelResult
from featurefusion.io.checkpoint import open_checkpoint
from featurefusion.io.recipe import recipe_of
from featurefusion.merge import operations, registry
from featurefusion.merge.featurefusion import model_shares
from featurefusion.merge.featurefusion_math import AUTO, FeatureFusionOptions
from featurefusion.merge.greedy import GreedyResult, search_soup
from featurefusion.merge.operations import OutputOptions
from featurefusion.merge.search import (
    BlockSearchResult,
    Candidate,
    SearchResult,
    grid,
    search_block_weights,
    search_merges,
)
from featurefusion.progress import bar_disabled
from featurefusion.toyworld import demo_distill
from featurefusion.toyworld.demo_ensemble import ensemble_section, ensemble_steps
from featurefusion.toyworld.models import load_pipeline
from featurefusion.toyworld.scorer import load_scorer
from featurefusion.toyworld.train import SPECIALIST_TASKS

SHIPPED = Path(__file__).parent / "checkpoints"


# The demo's grids: about half of each method's registered search space (which `featurefusion search` uses),
# keeping the values that won on the validation prompts in a full-grid run (README) and a neighbour of each.
DEMO_SPACES: dict[str, dict[str, tuple]] = {
    "task-arithmetic": {"scale": (0.3, 0.5, 1.0)},
    "ties": {"density": (0.5,), "scale": (1.0, 1.5)},
    "dare": {"density": (0.2,), "scale": (0.5, 1.0)},
    "dare-ties": {"density": (0.5,), "scale": (0.5, 1.0)},
    "tsv": {"scale": (0.5, 1.0)},
    "iso-c": {"scale": (0.5, 1.0)},
    "iso-cts": {"scale": (0.5, 1.0)},
    "zipit": {"budget": (0.0,), "depth": (None,)},  # all budgets within one image of each other in the full grid
}


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("runs/demo")
    checkpoints: Path = SHIPPED
    specialists: tuple[str, ...] = SPECIALIST_TASKS
    # Sampled under bfloat16 autocast: about twice as fast here, and the scores of the base and a specialist
    # moved by at most one image per task against float32 (README).
    # DDIM 12 steps (15 before the ensembles and the student joined the demo) keeps the run within 10 minutes.
    evaluation: EvalSettings = EvalSettings(steps=12, precision="bf16")
    # Searches choose on held-out validation prompts (train split, other seed), never on the test prompts.
    validation: EvalSettings = EvalSettings(images_per_task=10, steps=12, split="train", seed=1, precision="bf16")
    # FeatureFusion's threshold sweep runs on the validation prompts; with `ablation` it runs on the test
    # prompts instead, next to the slope, normalisation and sampled-mode variants (`featurefusion demo --ablation`).
    thresholds: tuple[float, ...] = (0.0, 0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8, 0.9)
    ablation: bool = False
    unlearning: bool = True
    greedy: bool = True
    # Methods whose options are chosen on the validation prompts from their registered search space (or from
    # `method_spaces`), each then scored on the test prompts like every other row.
    searched_methods: tuple[str, ...] = (
        "task-arithmetic", "ties", "dare", "dare-ties", "tsv", "iso-c", "iso-cts", "zipit",
    )  # fmt: skip
    method_spaces: dict[str, dict[str, tuple]] = field(default_factory=lambda: dict(DEMO_SPACES))
    # Options every candidate of a method gets (ZipIt!'s sample inputs: noisy images of the broad training data).
    fixed_options: dict[str, dict] = field(
        default_factory=lambda: {"zipit": {"sample_data": "toyworld", "sample_count": 128}}
    )
    # Block weights by coordinate ascent (autoMBW) from the best task-arithmetic scale: these multiples of it
    # (`featurefusion search --block-search` also tries 0, dropping a block's changes).
    block_search: tuple[float, ...] = (2.0,)
    progress: bool | None = None


def quick_config(out: Path = Path("runs/demo-quick")) -> DemoConfig:
    """A reduced run: few images, a short threshold sweep, no greedy search. For trying things and the tests."""
    return DemoConfig(
        out=out,
        evaluation=EvalSettings(images_per_task=8, steps=6, reference_images=64, precision="bf16"),
        validation=EvalSettings(
            images_per_task=4, steps=6, split="train", seed=1, reference_images=64, precision="bf16"
        ),  # fmt: skip
        thresholds=(0.5, 0.9),
        greedy=False,
        method_spaces={
            "task-arithmetic": {"scale": (0.3,)},
            "ties": {"density": (0.2,), "scale": (1.0,)},
            "dare": {"density": (0.2,), "scale": (1.0,)},
            "dare-ties": {"density": (0.2,), "scale": (1.0,)},
            "tsv": {"scale": (1.0,)},
            "iso-c": {"scale": (1.0,)},
            "iso-cts": {"scale": (1.0,)},
            "zipit": {"budget": (0.125,)},
        },
        fixed_options={"zipit": {"sample_data": "toyworld", "sample_count": 32}},
        block_search=(2.0,),
    )


@dataclass
class DemoState:
    config: DemoConfig
    evaluator: Evaluator
    results: dict[str, ModelResult] = field(default_factory=dict)
    merge_seconds: dict[str, float] = field(default_factory=dict)
    ablation: dict[str, ModelResult] = field(default_factory=dict)
    unlearned: dict[str, ModelResult] = field(default_factory=dict)
    greedy: dict[str, GreedyResult] = field(default_factory=dict)
    searches: dict[str, SearchResult] = field(default_factory=dict)  # method -> its validation search
    search_cache: dict = field(default_factory=dict)  # candidate merge -> validation mean, shared by searches
    block_search: BlockSearchResult | None = None
    threshold_sweep: dict[float, float] = field(default_factory=dict)  # threshold -> validation mean
    # `--threshold auto` on the same prompts: its validation mean and the per-layer thresholds it chose.
    auto_threshold: dict = field(default_factory=dict)
    shares: list[dict[str, float]] = field(default_factory=list)  # FeatureFusion's weight per model
    validation_scores: dict[tuple[int, ...], float] = field(default_factory=dict)  # shared by both searches

    @property
    def base_dir(self) -> Path:
        return self.config.checkpoints / "base"

    def specialist_file(self, name: str) -> Path:
        return self.config.checkpoints / "specialists" / f"{name}.safetensors"

    @property
    def inputs(self) -> list[Path]:
        return [self.base_dir, *(self.specialist_file(n) for n in self.config.specialists)]

    def score(self, unet_file: Path | None, with_fid: bool = True, evaluator: Evaluator | None = None) -> ModelResult:
        pipe = load_pipeline(self.base_dir, unet_file)
        return (evaluator or self.evaluator)(pipe, with_fid)

    def validation_evaluator(self) -> Evaluator:
        return Evaluator(self.evaluator.scorer, list(self.config.specialists), self.config.validation)


def run_demo(config: DemoConfig = DemoConfig()) -> Path:
    start = time.perf_counter()
    for path in [config.checkpoints / "base", config.checkpoints / "scorer.safetensors"]:
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run `featurefusion toyworld train` to build the models")
    models_dir = config.out / "models"
    shutil.rmtree(models_dir, ignore_errors=True)
    models_dir.mkdir(parents=True)
    scorer = load_scorer(config.checkpoints / "scorer.safetensors")
    state = DemoState(config, Evaluator(scorer, list(config.specialists), config.evaluation))
    plan = _plan(config)
    bar = tqdm(total=len(plan), desc="demo", unit="model", disable=bar_disabled(config.progress))
    for label, step in plan:
        bar.set_postfix_str(label)
        step(state, models_dir)
        bar.update()
    bar.close()
    report = write_report(state, time.perf_counter() - start)
    return report


# ---- the steps -------------------------------------------------------------------------------------------
def _plan(config: DemoConfig):
    steps = [("base", _score_base)]
    steps += [(name, _score_specialist(name)) for name in config.specialists]
    steps += [("FeatureFusion", _featurefusion), ("soup", _uniform_soup)]
    steps += [(name, _searched_method(name)) for name in config.searched_methods]
    if config.block_search and "task-arithmetic" in config.searched_methods:
        steps += [("block weights", _block_weights)]
    steps += demo_distill.plan(config)
    if config.greedy:
        steps += [("greedy soup", _greedy("Greedy soup", False)),
                  ("reverse-greedy soup", _greedy("Reverse-greedy soup", True))]  # fmt: skip
    steps += ensemble_steps(config)
    if config.unlearning:
        steps += [(f"unlearn {name}", _unlearn(i + 1, name)) for i, name in enumerate(config.specialists)]
    if config.ablation:
        steps += [(label, _ablation(label, options)) for label, options in ablation_variants(config)]
    else:
        steps += [("threshold sweep", _threshold_sweep)]
    return steps


def _out() -> OutputOptions:
    # UNet-only float32 files: the text encoder is the base's, and fp32 keeps unlearning comparisons exact.
    return OutputOptions(format="diffusers-unet", dtype="fp32", progress=False)


def _score_base(state: DemoState, _models: Path) -> None:
    state.results["base"] = state.score(None)


def _score_specialist(name: str):
    def step(state: DemoState, _models: Path) -> None:
        state.results[f"specialist {name}"] = state.score(state.specialist_file(name))

    return step


def _featurefusion(state: DemoState, models: Path) -> None:
    path = models / "featurefusion.safetensors"
    report = operations.merge(state.inputs, path, options=FeatureFusionOptions(), out=_out())
    state.merge_seconds["FeatureFusion"] = report.seconds
    state.shares = model_shares(operations.statistics_path(path))
    state.results["FeatureFusion"] = state.score(path)


def _uniform_soup(state: DemoState, models: Path) -> None:
    path = models / "soup.safetensors"
    report = operations.merge(state.inputs, path, "soup", out=_out())
    state.merge_seconds["Soup (uniform)"] = report.seconds
    state.results["Soup (uniform)"] = state.score(path)


def _validation_score(state: DemoState):
    validation = state.validation_evaluator()

    def score(path: Path) -> float:
        return state.score(path, with_fid=False, evaluator=validation).mean_alignment()

    return score


def _searched_method(name: str):
    """A method with the options that score best on the validation prompts, then scored on the test prompts."""

    def step(state: DemoState, models: Path) -> None:
        start = time.perf_counter()
        path = models / f"{name}.safetensors"
        fixed = state.config.fixed_options.get(name, {})
        candidates = [Candidate.of(name, {**fixed, **c.option_dict})
                      for c in grid([name], state.config.method_spaces or None)]  # fmt: skip
        with registry.get(name).search_context():
            result = search_merges(state.inputs, candidates, _validation_score(state), path, out=_out(),
                                   candidate_out=_out(), cache=state.search_cache)  # fmt: skip
        state.searches[name] = result
        label = result.best.title_without(fixed)
        state.merge_seconds[label] = time.perf_counter() - start
        state.results[label] = state.score(path)

    return step


def _block_weights(state: DemoState, models: Path) -> None:
    start = time.perf_counter()
    path = models / "block-weighted.safetensors"
    scale = state.searches["task-arithmetic"].best.option_dict["scale"]
    state.block_search = search_block_weights(
        state.inputs, _validation_score(state), path, start=scale, values=state.config.block_search, out=_out(),
        candidate_out=_out(), cache=state.search_cache,
    )  # fmt: skip
    label = "Block-weighted (searched)"
    state.merge_seconds[label] = time.perf_counter() - start
    state.results[label] = state.score(path)


def _threshold_sweep(state: DemoState, models: Path) -> None:
    """FeatureFusion at each threshold, on the validation prompts (the full ablation uses the test prompts)."""
    score = _validation_score(state)
    path = models / "threshold.safetensors"
    for threshold in sorted(state.config.thresholds):
        options = replace(FeatureFusionOptions(), threshold=threshold)
        operations.merge(state.inputs, path, options=options, out=_out(), save_statistics=False)
        state.threshold_sweep[threshold] = score(path)
    options = replace(FeatureFusionOptions(), threshold=AUTO)
    operations.merge(state.inputs, path, options=options, out=_out(), save_statistics=False)
    with open_checkpoint(path) as merged:
        chosen = list(recipe_of(merged.metadata, path).options["thresholds"].values())
    state.auto_threshold = {"score": score(path), "thresholds": chosen}
    path.unlink()


def _greedy(label: str, reverse: bool):
    def step(state: DemoState, models: Path) -> None:
        validation = state.validation_evaluator()

        def score(path: Path) -> float:
            unet = None if path == state.base_dir else path
            return state.score(unet, with_fid=False, evaluator=validation).mean_alignment()

        start = time.perf_counter()
        path = models / f"{label.lower().replace(' ', '-')}.safetensors"
        state.greedy[label] = search_soup(
            state.inputs, score, path, reverse=reverse, out=_out(), cache=state.validation_scores
        )
        state.merge_seconds[label] = time.perf_counter() - start
        state.results[label] = state.score(path)

    return step


def _unlearn(index: int, name: str):
    def step(state: DemoState, models: Path) -> None:
        path = models / f"featurefusion-without-{name}.safetensors"
        report = operations.remove(models / "featurefusion.safetensors", str(index), path, _out())
        state.merge_seconds[f"unlearn {name}"] = report.seconds
        state.unlearned[name] = state.score(path)

    return step


def ablation_variants(config: DemoConfig) -> list[tuple[str, FeatureFusionOptions]]:
    default = FeatureFusionOptions()
    variants = [
        (f"threshold {t:g}", replace(default, threshold=t)) for t in config.thresholds if t != default.threshold
    ]
    if config.ablation:
        variants += [
            ("slope regress (authors' code)", replace(default, slope="regress")),
            ("normalization paper (eq. 16)", replace(default, normalization="paper")),
            ("normalization column (authors' code)", replace(default, normalization="column")),
            ("sampled, 256 samples", replace(default, mode="sampled", samples=256)),
            ("sampled, 2048 samples", replace(default, mode="sampled", samples=2048)),
        ]
    return variants


def _ablation(label: str, options: FeatureFusionOptions):
    def step(state: DemoState, models: Path) -> None:
        path = models / "ablation.safetensors"
        report = operations.merge(state.inputs, path, options=options, out=_out(), save_statistics=False)
        state.merge_seconds[f"ablation: {label}"] = report.seconds
        state.ablation[label] = state.score(path)

    return step


# ---- the report ------------------------------------------------------------------------------------------
def _with_mean(matrix: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {name: {**row, "mean": sum(row.values()) / len(row)} for name, row in matrix.items()}


_PRECISION = {"bf16": "sampled under bfloat16 autocast", "fp32": "sampled in float32"}


def write_report(state: DemoState, seconds: float) -> Path:
    config, out = state.config, state.config.out
    tasks = list(config.specialists)
    alignment = _with_mean({name: r.alignment() for name, r in state.results.items()})
    fid = _with_mean({name: r.fid() for name, r in state.results.items()})
    heatmap(alignment, out / "alignment.png", "Prompt alignment (%): every model on every task", label="%")
    heatmap(fid, out / "fid.png", "FID in the scorer's feature space (lower is better)", fmt="{:.1f}",
            cmap="viridis_r")  # fmt: skip
    grids = []
    featured = ["base", *[f"specialist {n}" for n in config.specialists], "FeatureFusion", "Soup (uniform)"]
    featured += [name for name in state.results if name not in featured]
    images = {
        name: {t: state.results[name].tasks[t].samples for t in tasks} for name in featured if name in state.results
    }
    grids.append(
        labelled_grid(images, out / "grid.png", "Samples of every model on every task (same prompts and noise)")
    )

    ev = config.evaluation
    lines = [
        "# featurefusion demo: merging the built-in world's specialists",
        "",
        "Made by `featurefusion demo`. A base model (trained broadly, weak on rare objects and special styles) and "
        f"{len(tasks)} UNet-only specialists fine-tuned from it are merged with every method in the package. "
        f"Every model is sampled on the test prompts of every task ({ev.images_per_task} images per task, DDIM "
        f"{ev.steps} steps, guidance {ev.guidance_scale:g}, {_PRECISION[ev.precision]}, "
        "the same prompts and initial noise for every model) "
        "and scored by the shipped scorer.",
        "",
        "- **Prompt alignment**: % of images whose object, colour and style the scorer reads as the prompt's "
        "(all three right). Higher is better.",
        f"- **FID**: Fréchet distance to {ev.reference_images} real images of the task, in the scorer's "
        "feature space. Lower is better.",
        "",
        f"Total time: {seconds:.0f} s.",
        "",
        "## Every model on every task (prompt alignment, %)",
        "",
        markdown_table(alignment, [*tasks, "mean"]),
        "",
        "![alignment heatmap](alignment.png)",
        "",
        "## FID (lower is better)",
        "",
        markdown_table(fid, [*tasks, "mean"], higher_is_better=False),
        "",
        "![fid heatmap](fid.png)",
        "",
        "## Samples",
        "",
        "![samples](grid.png)",
        "",
    ]
    lines += demo_distill.report_section(state, alignment)
    if state.unlearned:
        lines += _unlearning_section(state, alignment)
    if state.ablation:
        lines += _ablation_section(state, alignment)
    if state.threshold_sweep:
        lines += _threshold_section(state, alignment)
    if state.shares:
        lines += _shares_section(state)
    if state.searches:
        lines += _searches_section(state)
    if state.greedy:
        lines += _greedy_section(state)
    lines += ensemble_section(state, alignment)
    lines += _timing_section(state)
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _unlearning_section(state: DemoState, alignment) -> list[str]:
    tasks = list(state.config.specialists)
    rows = {"FeatureFusion (all)": alignment["FeatureFusion"]}
    own_drop = {}
    for name, result in state.unlearned.items():
        row = result.alignment()
        rows[f"without {name}"] = {**row, "mean": sum(row.values()) / len(row)}
        own_drop[f"without {name}"] = alignment["FeatureFusion"][name] - row[name]
    return [
        "## Unlearning: FeatureFusion with one specialist removed (paper §5.2.3)",
        "",
        "Each row removes one specialist from the FeatureFusion merge using the statistics stored beside it "
        "(the removed model's file is not read). The removed specialist's own task should fall towards the "
        "base's score while the other tasks keep theirs.",
        "",
        markdown_table(
            rows,
            [*tasks, "mean"],
            bold_best=False,
            extra={"own task lost": lambda name: f"{own_drop[name]:+.1f}" if name in own_drop else "–"},
        ),  # fmt: skip
        "",
        "Base on each task: " + ", ".join(f"{t} {alignment['base'][t]:.1f}" for t in tasks) + ".",
        "",
    ]


def _ablation_section(state: DemoState, alignment) -> list[str]:
    tasks = list(state.config.specialists)
    default = FeatureFusionOptions()
    rows = {f"default: exact, threshold {default.threshold}, rescale, convex": alignment["FeatureFusion"]}
    for label, result in state.ablation.items():
        row = result.alignment()
        rows[label] = {**row, "mean": sum(row.values()) / len(row)}
    fids = {label: sum(r.fid().values()) / len(tasks) for label, r in state.ablation.items()}
    fids[next(iter(rows))] = sum(state.results["FeatureFusion"].fid().values()) / len(tasks)
    sweep = {float(label.split()[1]): row["mean"] for label, row in rows.items() if label.startswith("threshold ")}
    picture = []
    if len(sweep) > 2:
        references = {"uniform soup": alignment["Soup (uniform)"]["mean"], "base": alignment["base"]["mean"]}
        line_plot({"FeatureFusion": sweep}, state.config.out / "threshold.png", "FeatureFusion: threshold sweep",
                  "correlation threshold", "mean prompt alignment (%)", references)  # fmt: skip
        picture = ["![threshold sweep](threshold.png)", ""]
    return [
        "## FeatureFusion ablation",
        "",
        "Each row changes one option of the default. Threshold 0 is the paper read literally (every neuron "
        "of a layer mixed in).",
        "",
        markdown_table(
            rows, [*tasks, "mean"], first_header="variant", extra={"mean FID": lambda name: f"{fids[name]:.1f}"}
        ),  # fmt: skip
        "",
        f"Uniform soup for comparison: mean {alignment['Soup (uniform)']['mean']:.1f}; base: "
        f"{alignment['base']['mean']:.1f}.",
        "",
        *picture,
    ]


def _shares_section(state: DemoState) -> list[str]:
    names = ["base", *state.config.specialists]
    rows = {
        name: {"share of the weight": 100 * s["share"], "on the same neuron": 100 * s["same_neuron"]}
        for name, s in zip(names, state.shares, strict=True)
    }
    same = sum(s["same_neuron"] for s in state.shares)
    return [
        "## How FeatureFusion weighs the models",
        "",
        "For every merged neuron, the part of its coefficients sum_j |C_ij| that falls on each model's neurons, "
        "averaged over all neurons of all layers (from the statistics stored for unlearning). A uniform soup "
        f"gives every model {100 / len(names):.1f} %.",
        "",
        markdown_table(rows, ["share of the weight", "on the same neuron"], fmt="{:.1f}", bold_best=False),
        "",
        f"{100 * same:.1f} % of the weight stays on the neuron of the same index. Specialists fine-tuned from "
        "one base keep every neuron close to the base's, so above the threshold each base neuron correlates "
        "with its own copies only, all with |P| ≈ 1 and slope ≈ 1. The merge is then close to a uniform "
        "soup, and each specialist's change is diluted to about 1/N.",
        "",
    ]


def _threshold_section(state: DemoState, alignment) -> list[str]:
    sweep = state.threshold_sweep
    references = {"uniform soup (test)": alignment["Soup (uniform)"]["mean"], "base (test)": alignment["base"]["mean"]}
    markers = {}
    if state.auto_threshold:
        chosen = sorted(state.auto_threshold["thresholds"])
        median = chosen[len(chosen) // 2]
        markers["auto (median, range of layers)"] = (median, state.auto_threshold["score"], chosen[0], chosen[-1])
    line_plot({"FeatureFusion (validation)": sweep}, state.config.out / "threshold.png",
              "FeatureFusion: threshold sweep", "correlation threshold", "mean prompt alignment (%)",
              references, markers)  # fmt: skip
    values = ", ".join(f"{t:g} → {v:.1f}" for t, v in sweep.items())
    auto = ""
    if state.auto_threshold:
        chosen = sorted(state.auto_threshold["thresholds"])
        auto = (
            f" `auto` (the default) scores {state.auto_threshold['score']:.1f}, choosing per layer thresholds "
            f"from {chosen[0]:.2f} to {chosen[-1]:.2f} (median {chosen[len(chosen) // 2]:.2f}; the marker on the "
            "plot sits at the median, its bar spans the range)."
        )
    return [
        "## FeatureFusion: threshold sweep",
        "",
        f"Mean prompt alignment on the validation prompts ({state.config.validation.images_per_task} per task) "
        f"for each correlation threshold: {values}.{auto} Threshold 0 is the paper read literally (every neuron "
        "of a layer mixed in). `featurefusion demo --ablation` runs the sweep on the test prompts, with the "
        "slope, normalisation and sampled-mode variants.",
        "",
        "![threshold sweep](threshold.png)",
        "",
    ]


def _searches_section(state: DemoState) -> list[str]:
    v = state.config.validation
    lines = [
        "## How each method's options were chosen",
        "",
        f"Every candidate was merged and scored on the validation prompts ({v.images_per_task} per task, train "
        "split, another seed); the best (bold) was then scored on the test prompts above. Mean prompt alignment:",
        "",
        "| method | candidates (validation mean, %) |",
        "|---|---|",
    ]
    for result in state.searches.values():
        fixed = state.config.fixed_options.get(result.best.method, {})
        cells = [
            f"**{c.title_without(fixed)}: {score:.1f}**"
            if c == result.best
            else f"{c.title_without(fixed)}: {score:.1f}"
            for c, score in result.scores.items()
        ]
        lines.append(f"| {registry.get(result.best.method).title} | {'; '.join(cells)} |")
    lines.append("")
    if "zipit" in state.searches:
        lines += [
            "**ZipIt!** runs every model on the same noisy images of the broad training data, matches features by "
            "correlation within and across models and rebuilds each layer through the merge and unmerge matrices "
            "(Stoica et al. 2023; docs/zipit.md). The specialists are fine-tunes of one base, so their neurons are "
            "already aligned: ZipIt! pairs nearly every neuron with its same-index copies and lands close to the "
            "uniform soup.",
            "",
        ]
    if state.block_search is not None:
        b = state.block_search
        kept = [f"{block} → {value:g} ({score:.1f})" for block, value, score, k in b.steps if k]
        weights = ", ".join(f"{n} {w:g}" for n, w in zip(b.blocks, b.weights, strict=True) if n != "BASE")
        lines += [
            f"**Block weights** (autoMBW-style coordinate ascent from the best task-arithmetic scale, one weight per "
            f"block shared by all specialists; {len(b.scores)} candidates): changes kept: "
            f"{'; '.join(kept) or 'none'}. Chosen: {weights}.",
            "",
        ]
    return lines


def _greedy_section(state: DemoState) -> list[str]:
    names = ["base", *state.config.specialists]
    lines = ["## Greedy soups (Diffusion Soup §4.2)", "",
             f"Chosen on validation prompts ({state.config.validation.images_per_task} per task, train split), "
             "scored on the test prompts above.", ""]  # fmt: skip
    for label, result in state.greedy.items():
        chosen = ", ".join(names[i] for i in result.chosen)
        lines.append(f"- **{label}**: {chosen} (validation mean {result.score:.1f}, {result.evaluations} soups scored)")
        for action, members, score in result.steps:
            verb, *index = action.split()
            step = " ".join([verb, *(names[int(i)] for i in index)])
            lines.append(f"  - {step}: {{{', '.join(names[m] for m in members)}}} → {score:.1f}")
    return [*lines, ""]


def _timing_section(state: DemoState) -> list[str]:
    rows = {name: {"seconds": s} for name, s in state.merge_seconds.items()}
    sampled = {name: {"seconds": r.seconds} for name, r in state.results.items()}
    per_image = [r.seconds / (len(r.tasks) * state.config.evaluation.images_per_task) for r in state.results.values()]
    mean_ms = 1000 * sum(per_image) / len(per_image) if per_image else math.nan
    return [
        "## Times",
        "",
        "Merge (or search) time per model:",
        "",
        markdown_table(rows, ["seconds"], fmt="{:.2f}", bold_best=False, first_header="merge"),
        "",
        f"Sampling and scoring: {mean_ms:.1f} ms per image on average; per model:",
        "",
        markdown_table(sampled, ["seconds"], fmt="{:.1f}", bold_best=False),
        "",
    ]
