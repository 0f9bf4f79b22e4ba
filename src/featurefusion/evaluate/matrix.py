"""Score every model on every task (the FeatureFusion paper's Figure 4) for real Stable Diffusion models.

A task is a name, its prompts (a prompt file) and, for FID, a folder of reference images. Each model is
loaded once, samples every task's prompts with the same seeds (so models are compared on the same noise),
is released, and its images are scored with each metric. The result is one models x tasks matrix per
metric, written as `matrix.json`, `matrix.md` (tables), `heatmap-<metric>.png` and an image grid.

`score_model` is the single-number form for searches over models (greedy soups): the mean of a metric
over held-out prompts for one checkpoint.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from featurefusion.errors import FeatureFusionError
from featurefusion.evaluate.metrics import Metric, MetricScore, build_metric, objective
from featurefusion.evaluate.report import heatmap, labelled_grid, markdown_table
from featurefusion.evaluate.sampling import (
    SamplerSettings,
    describe_checkpoint,
    device_for,
    load_images,
    load_pipeline,
    read_prompts,
    sample,
    wants_cpu,
    write_json_atomic,
)
from featurefusion.io.atomic import write_text_atomic

log = logging.getLogger(__name__)

FORMATS = {"clip": "{:.2f}", "imagereward": "{:.3f}", "fid": "{:.1f}"}
GRID_IMAGES = 4  # images per (model, task) cell of the overview grid


@dataclass(frozen=True)
class Task:
    name: str
    prompts: tuple[str, ...]
    references: Path | None = None  # folder of real images, for FID
    source: str | None = None  # the prompt file, recorded in results


@dataclass(frozen=True)
class ModelSpec:
    name: str
    checkpoint: str


@dataclass
class MatrixResult:
    out: Path
    json: Path
    markdown: Path
    heatmaps: dict[str, Path]
    grid: Path | None
    values: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # metric -> model -> task


# ---- inputs ----------------------------------------------------------------------------------------------
def read_tasks(path: str | os.PathLike) -> list[Task]:
    """Tasks from YAML/JSON: a list of {name, prompts, references?}, or a mapping name -> {prompts, ...}.

    `prompts` is a prompt file (relative paths are relative to the tasks file) or an inline list.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FeatureFusionError(f"tasks file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML also reads JSON
    except yaml.YAMLError as err:
        raise FeatureFusionError(f"cannot parse tasks file {path}: {err}") from None
    if isinstance(data, dict) and "tasks" in data:
        data = data["tasks"]
    if isinstance(data, dict):
        data = [
            {"name": name, **(spec if isinstance(spec, dict) else {"prompts": spec})} for name, spec in data.items()
        ]
    if not isinstance(data, list) or not data:
        raise FeatureFusionError(f"tasks file {path} must list tasks (name, prompts, optional references)")
    tasks = [_task(entry, path.parent, path) for entry in data]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise FeatureFusionError(f"task names repeat in {path}: {names}")
    return tasks


def _task(entry, base: Path, path: Path) -> Task:
    if not isinstance(entry, dict) or "name" not in entry or "prompts" not in entry:
        raise FeatureFusionError(f"each task in {path} needs a name and prompts, got {entry!r}")
    prompts, source = entry["prompts"], None
    if isinstance(prompts, str):
        source = str(base / prompts)
        prompts = read_prompts(base / prompts)
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise FeatureFusionError(f"task {entry['name']!r} in {path}: prompts must be a prompt file or a list")
    references = entry.get("references")
    return Task(str(entry["name"]), tuple(prompts), base / references if references else None, source)


def parse_models(specs: Sequence[str]) -> list[ModelSpec]:
    """`PATH` or `NAME=PATH`; a name defaults to the file (or folder) name without suffix."""
    models, seen = [], set()
    for spec in specs:
        name, sep, checkpoint = str(spec).partition("=")
        if not sep:
            checkpoint = name
            name = Path(checkpoint).stem if Path(checkpoint).suffix else Path(checkpoint).name
        unique, n = name, 2
        while unique in seen:
            unique, n = f"{name}-{n}", n + 1
        seen.add(unique)
        models.append(ModelSpec(unique, checkpoint))
    if not models:
        raise FeatureFusionError("no models to evaluate")
    return models


def build_metrics(names: Sequence[str], options: dict[str, dict] | None = None) -> list[Metric]:
    options = options or {}
    return [build_metric(name, **options.get(name, {})) for name in names]


# ---- scoring ---------------------------------------------------------------------------------------------
def score_images(metric: Metric, prompts: Sequence[str], images: Sequence[Image.Image], task: Task) -> MetricScore:
    if metric.name == "fid":
        if task.references is None:
            log.warning("task %s has no reference images: FID left empty", task.name)
            return MetricScore(float("nan"))
        return metric.score(prompts, images, references=task.references)
    return metric.score(prompts, images)


def score_model(
    checkpoint: str | os.PathLike,
    prompts: Sequence[str] | str | os.PathLike,
    metric: Metric | str,
    settings: SamplerSettings | None = None,
    *,
    template: str | os.PathLike | None = None,
    references: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    oriented: bool = False,
) -> float:
    """Sample `prompts` with `checkpoint` and return the metric over them (the mean of per-image scores, or FID).

    For greedy soups: call it on each candidate soup with the held-out prompts and the same settings (same
    seeds, so candidates are compared on the same noise). `oriented=True` returns a value to maximise (FID
    negated). Images go to `out`, or to a temporary folder removed afterwards. Every process gets the value.
    """
    from accelerate import PartialState

    settings = settings or SamplerSettings()
    metric = build_metric(metric) if isinstance(metric, str) else metric
    prompt_list = list(prompts) if isinstance(prompts, list | tuple) else read_prompts(prompts)
    task = Task("held-out", tuple(prompt_list), Path(references) if references else None)
    state = PartialState(cpu=wants_cpu(settings.device))
    folder, temporary = (Path(out), False) if out is not None else (_shared_temp_dir(state), True)
    try:
        result = sample(checkpoint, prompt_list, folder, settings, template=template, grid=False)
        value = float("nan")
        if state.is_main_process:
            images = load_images(folder, result.records)
            value = score_images(metric, result.prompts(), images, task).value
        value = _share(state, value)
    finally:
        state.wait_for_everyone()
        if temporary and state.is_main_process:
            shutil.rmtree(folder, ignore_errors=True)
    return objective(metric, value) if oriented else value


def _shared_temp_dir(state) -> Path:
    # Every process must write into the same folder: the main one makes it and tells the others.
    path = tempfile.mkdtemp(prefix="featurefusion-score-") if state.is_main_process else None
    return Path(_share(state, path))


def _share(state, value):
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


# ---- the matrix ------------------------------------------------------------------------------------------
def evaluate_matrix(
    models: Sequence[ModelSpec | str],
    tasks: Sequence[Task],
    metrics: Sequence[Metric],
    out: str | os.PathLike,
    settings: SamplerSettings | None = None,
    *,
    template: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> MatrixResult:
    """Sample every task with every model (one model in memory at a time), score, and write the report."""
    from accelerate import PartialState

    settings = settings or SamplerSettings()
    models = [m if isinstance(m, ModelSpec) else parse_models([m])[0] for m in models]
    if not tasks or not metrics:
        raise FeatureFusionError("give at least one task and one metric")
    out = Path(out)
    state = PartialState(cpu=wants_cpu(settings.device))
    values: dict[str, dict[str, dict[str, float]]] = {m.name: {} for m in metrics}
    per_image: dict[str, dict[str, dict[str, list[float] | None]]] = {m.name: {} for m in metrics}
    thumbnails: dict[str, dict[str, torch.Tensor]] = {}
    for model in models:
        log.info("sampling %s", model.name)
        pipe = load_pipeline(model.checkpoint, template, settings.dtype, device_for(state, settings.device))
        folders = {}
        for task in tasks:
            folder = out / "images" / model.name / task.name
            folders[task.name] = sample(
                model.checkpoint, list(task.prompts), folder, settings, template=template, pipe=pipe, progress=progress
            )
        del pipe  # release the model before loading the next one
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if state.is_main_process:
            thumbnails[model.name] = _score_model_tasks(model, tasks, metrics, folders, values, per_image)
        state.wait_for_everyone()
    if not state.is_main_process:
        return MatrixResult(out, out / "matrix.json", out / "matrix.md", {}, None, values)
    return _write_report(out, models, tasks, metrics, settings, template, values, per_image, thumbnails)


def _score_model_tasks(model, tasks, metrics, folders, values, per_image) -> dict[str, torch.Tensor]:
    thumbnails = {}
    for task in tasks:
        result = folders[task.name]
        images = load_images(result.out, result.records)
        for metric in metrics:
            score = score_images(metric, result.prompts(), images, task)
            values[metric.name].setdefault(model.name, {})[task.name] = score.value
            per_image[metric.name].setdefault(model.name, {})[task.name] = score.per_image
        thumbnails[task.name] = _as_signed_tensor(images[:GRID_IMAGES])
    return thumbnails


def _as_signed_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images as [k, 3, H, W] in [-1, 1], the form `labelled_grid` draws."""
    from featurefusion.evaluate.metrics import to_uint8

    return torch.stack([to_uint8(image) for image in images]).float() / 127.5 - 1.0


def _write_report(out, models, tasks, metrics, settings, template, values, per_image, thumbnails) -> MatrixResult:
    out.mkdir(parents=True, exist_ok=True)
    task_names = [t.name for t in tasks]
    heatmaps = {}
    for metric in metrics:
        direction = "higher is better" if metric.higher_is_better else "lower is better"
        heatmaps[metric.name] = heatmap(
            values[metric.name],
            out / f"heatmap-{metric.name}.png",
            title=f"{metric.name} ({metric.variant}), {direction}",
            columns=task_names,
            fmt=FORMATS.get(metric.name, "{:.3f}"),
            cmap="viridis" if metric.higher_is_better else "viridis_r",
            label=metric.name,
        )
    grid = None
    if thumbnails:
        height = next(iter(next(iter(thumbnails.values())).values())).shape[-1]
        grid = labelled_grid(thumbnails, out / "grid.png", title="samples", upscale=max(1, 64 // height))
    markdown = out / "matrix.md"
    write_text_atomic(markdown, matrix_markdown(metrics, values, task_names, settings))
    data = {
        "models": {m.name: describe_checkpoint(m.checkpoint) for m in models},
        "template": None if template is None else describe_checkpoint(template),
        "tasks": {
            t.name: {"prompts": len(t.prompts), "prompt_file": t.source, "references": _str_or_none(t.references)}
            for t in tasks
        },
        "metrics": [m.describe() for m in metrics],
        "settings": settings.recorded(),
        "values": _finite(values),
        "per_image": _finite(per_image),
    }
    path = out / "matrix.json"
    write_json_atomic(path, data)
    return MatrixResult(out, path, markdown, heatmaps, grid, values)


def matrix_markdown(metrics: Sequence[Metric], values, task_names: Sequence[str], settings: SamplerSettings) -> str:
    lines = ["# Models x tasks", "", f"Sampler: `{json.dumps(settings.recorded())}`", ""]
    for metric in metrics:
        table = values[metric.name]
        means = {model: _nanmean(row.values()) for model, row in table.items()}
        fmt = FORMATS.get(metric.name, "{:.3f}")
        direction = "higher is better" if metric.higher_is_better else "lower is better"
        lines += [
            f"## {metric.name}: {metric.variant} ({direction})",
            "",
            markdown_table(
                table,
                task_names,
                fmt=fmt,
                higher_is_better=metric.higher_is_better,
                extra={"mean": lambda model, fmt=fmt, means=means: _fmt(fmt, means[model])},
            ),
            "",
            f"![{metric.name}](heatmap-{metric.name}.png)",
            "",
        ]
    lines += ["## Samples", "", "![samples](grid.png)", ""]
    return "\n".join(lines)


def _nanmean(values) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _fmt(fmt: str, value: float) -> str:
    return "–" if math.isnan(value) else fmt.format(value)


def _finite(data):
    """NaN is not JSON: empty cells become null."""
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_finite(v) for v in data]
    if isinstance(data, float) and math.isnan(data):
        return None
    return data


def _str_or_none(path: Path | None) -> str | None:
    return None if path is None else str(path)
