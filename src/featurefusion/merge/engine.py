"""The merge engine: walks a model module by module, asks a method for the merged tensors, streams them out.

Memory: at any time the engine holds the tensors of at most two modules (the one being merged and the one
being read ahead on a background thread), each as float32 for every model. Peak memory therefore grows with
the number of models times the largest layer, not with the size of the models.

Checks before anything is written: enough models, output path not among the inputs, the same keys and
shapes in every model for each component that is merged (not copied). During the merge every float tensor
read is checked for NaN/Inf. Any failure names the file and key and leaves nothing at the output path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from featurefusion.errors import CheckpointError, RecipeError
from featurefusion.io.checkpoint import COMPONENTS, Checkpoint, open_checkpoint
from featurefusion.io.output import CheckpointWriter, components_written, plan_output
from featurefusion.merge.base import CopyBase, MergeMethod

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NAN_POLICIES = ("error", "skip")


@dataclass
class MergeJob:
    models: list[Path]
    output: Path
    methods: dict[str, MergeMethod]  # component -> method; components not named are copied from the base
    output_format: str | None = None  # default: the base's layout
    dtype: str | None = None  # default: the dtype of the base's UNet
    metadata: dict[str, str] = field(default_factory=dict)
    nan_policy: str = "error"
    progress: bool | None = None  # None: show when writing to a terminal
    template: Path | None = None  # pipeline folder to copy configs from when writing --format diffusers


@dataclass
class MergeReport:
    output: Path
    format: str
    dtype: str
    keys: int
    seconds: float
    skipped_modules: list[str] = field(default_factory=list)


@dataclass
class Module:
    name: str  # e.g. "unet.down_blocks.0.resnets.0.conv1"
    component: str
    keys: dict[str, str]  # suffix -> canonical key


def run_merge(job: MergeJob, side_files: list | None = None) -> MergeReport:
    """Run a merge. `side_files` are extra writers (with commit/abort) committed only if the merge succeeds."""
    if job.nan_policy not in NAN_POLICIES:
        raise RecipeError(f"nan policy must be one of {NAN_POLICIES}")
    check_output_path(job.output, job.models)
    needed = max((m.min_models for m in job.methods.values()), default=1)
    if len(job.models) < needed:
        raise RecipeError(f"this merge needs at least {needed} models, got {len(job.models)}")
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        models = [stack.enter_context(open_checkpoint(p)) for p in job.models]
        base = models[0]
        methods = {c: job.methods.get(c, CopyBase()) for c in (*COMPONENTS, "extra")}
        fmt = job.output_format or base.layout
        validate_models(models, methods, components_written(fmt))
        dtype_name = job.dtype or _dtype_name(base)
        out_dtype = DTYPES[dtype_name]
        modules = group_modules(base, components_written(fmt))
        entries = [
            (
                key,
                out_dtype if base.ref(key).dtype.is_floating_point else base.ref(key).dtype,
                base.ref(key).shape,
            )
            for module in modules
            for key in module.keys.values()
        ]
        plan = plan_output(fmt, job.output, entries, base, job.template)
        skipped: list[str] = []
        try:
            with CheckpointWriter(plan, job.metadata) as writer:
                bar = tqdm(total=len(entries), unit="key", desc="merging", disable=_bar_disabled(job.progress))
                for module, tensors in _prefetch(_read_modules(models, methods, modules)):
                    merged = _merge_module(module, tensors, models, methods[module.component], job.nan_policy, skipped)
                    for suffix, key in module.keys.items():
                        writer.write(
                            key,
                            merged[suffix].to(out_dtype) if merged[suffix].is_floating_point() else merged[suffix],
                        )
                    bar.update(len(module.keys))
                bar.close()
                for method in {id(m): m for m in methods.values()}.values():
                    method.finish()
                for side in side_files or []:
                    side.commit()
                writer.commit()
        except BaseException:
            for side in side_files or []:
                side.abort()
            raise
    if skipped:
        log.warning(
            "%d modules had NaN/Inf in a model and were copied from the base: %s",
            len(skipped),
            ", ".join(skipped[:5]),
        )
    return MergeReport(job.output, fmt, dtype_name, len(entries), time.perf_counter() - start, skipped)


def check_output_path(output: Path, inputs: list[Path]) -> None:
    out = Path(output).resolve()
    for path in inputs:
        src = Path(path).resolve()
        if out == src:
            raise CheckpointError("output path is the same as an input; choose another output", output)
        if src.is_relative_to(out) or (Path(path).is_dir() and out.is_relative_to(src)):
            raise CheckpointError(f"output path overlaps the input {path}", output)


def validate_models(models: list[Checkpoint], methods: dict[str, MergeMethod], written: tuple[str, ...]) -> None:
    base = models[0]
    for component in written:
        if not methods[component].reads_all_models or not base.keys(component):
            continue
        base_keys = base.keys(component)
        for other in models[1:]:
            other_keys = set(other.keys(component))
            if not other_keys:
                raise CheckpointError(
                    f"this model has no {component} weights, but the {component} is to be merged "
                    f"({methods[component].name}); copy it from the base instead",
                    other.path,
                )
            missing = [k for k in base_keys if k not in other_keys]
            extra = sorted(other_keys - set(base_keys))
            if len(missing) + len(extra) > max(3, len(base_keys) // 10):
                raise CheckpointError(
                    f"architectures differ: {len(missing)} {component} keys of the base {base.path} are missing "
                    f"and {len(extra)} are extra",
                    other.path,
                    (missing or extra)[0],
                )
            if missing:
                raise CheckpointError(f"key missing (present in the base {base.path})", other.path, missing[0])
            if extra:
                raise CheckpointError(f"key not in the base {base.path} (architectures differ)", other.path, extra[0])
            for key in base_keys:
                a, b = base.ref(key).shape, other.ref(key).shape
                if a != b:
                    raise CheckpointError(f"shape {list(b)} differs from the base's {list(a)}", other.path, key)


def group_modules(base: Checkpoint, components: tuple[str, ...]) -> list[Module]:
    """Keys grouped by module (weight with its bias), in the base's order."""
    modules: dict[str, Module] = {}
    for component in components:
        for key in base.keys(component):
            name, _, suffix = key.rpartition(".")
            module = modules.setdefault(name, Module(name, component, {}))
            module.keys[suffix] = key
    return list(modules.values())


def _read_modules(models, methods, modules) -> Iterator[tuple[Module, dict[str, list[torch.Tensor]]]]:
    for module in modules:
        readers = models if methods[module.component].reads_all_models else models[:1]
        tensors = {}
        for suffix, key in module.keys.items():
            if models[0].ref(key).dtype.is_floating_point:
                tensors[suffix] = [m.read(key).float() for m in readers]
            else:
                tensors[suffix] = [models[0].read(key)]  # ids, counters: copied, never averaged
        yield module, tensors


def _prefetch(items: Iterator, depth: int = 1) -> Iterator:
    """Produce items on a background thread, `depth` ahead, so file reads overlap the merge maths."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as err:  # hand the error to the consumer
            q.put(err)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                q.get_nowait()
        thread.join(timeout=5)


def _merge_module(module: Module, tensors, models, method: MergeMethod, nan_policy: str, skipped: list[str]):
    floats = {s: v for s, v in tensors.items() if v[0].is_floating_point()}
    for suffix, values in floats.items():
        for model, value in zip(models, values, strict=False):
            if not torch.isfinite(value).all():
                if nan_policy == "error" or model is models[0]:
                    raise CheckpointError(
                        "tensor holds NaN or Inf" + ("" if nan_policy == "error" else " in the base model"),
                        model.source_file(module.keys[suffix]),
                        module.keys[suffix],
                    )
                log.warning("NaN/Inf in %s of %s: module copied from the base", module.keys[suffix], model.path)
                skipped.append(module.name)
                return {s: v[0] for s, v in tensors.items()}
    merged = method.merge_module(module.name, floats) if floats else {}
    for suffix, values in tensors.items():
        if suffix not in floats:
            merged[suffix] = values[0]
    return merged


def _dtype_name(base: Checkpoint) -> str:
    for key in base.keys("unet"):
        dtype = base.ref(key).dtype
        if dtype.is_floating_point:
            return {v: k for k, v in DTYPES.items()}.get(dtype, "fp32")
    return "fp32"


def _bar_disabled(progress: bool | None) -> bool | None:
    if progress is None:
        return None if os.environ.get("FEATUREFUSION_PROGRESS") != "0" else True
    return not progress
