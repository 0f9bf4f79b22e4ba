"""The merge engine: walks a model module by module, asks a method for the merged tensors, streams them out.

Memory: at any time the engine holds the tensors of a few modules: one read ahead on a background thread,
one being merged, and up to two tensors being written behind on another thread. Peak memory therefore grows with
the number of models times the largest layer, not with the size of the models.

Checks before anything is written: enough models, output path not among the inputs, the same keys and
shapes in every model for each component that is merged (not copied). During the merge every float tensor
read is checked for NaN/Inf. Any failure names the file and key and leaves nothing at the output path.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from featurefusion.errors import CheckpointError, RecipeError
from featurefusion.io.checkpoint import COMPONENTS, Checkpoint, open_checkpoint
from featurefusion.io.output import CheckpointWriter, components_written, plan_output
from featurefusion.merge.base import CopyBase, MergeMethod
from featurefusion.merge.streaming import plan_items, run_items
from featurefusion.progress import bar_disabled

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
    # Called once methods have planned (`plan(models, modules)`), before anything is written: the metadata
    # to write, e.g. with choices the plan made recorded in the recipe.
    finalize_metadata: Callable[[dict[str, str]], dict[str, str]] | None = None


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
    try:
        return _run_merge(job, side_files or [])
    except BaseException:
        for side in side_files or []:
            side.abort()
        raise


def _run_merge(job: MergeJob, side_files: list) -> MergeReport:
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
        for method in {id(m): m for m in methods.values()}.values():
            if hasattr(method, "prepare"):
                method.prepare(models)  # e.g. block weights check their count against the UNet's blocks
        dtype_name = job.dtype or _dtype_name(base)
        out_dtype = DTYPES[dtype_name]
        modules = group_modules(base, components_written(fmt))
        for method in {id(m): m for m in methods.values()}.values():
            if hasattr(method, "plan"):  # e.g. FeatureFusion's `auto` picks every layer's threshold
                method.plan(models, [m for m in modules if methods[m.component] is method])
        metadata = job.finalize_metadata(job.metadata) if job.finalize_metadata else job.metadata
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
        if sum(_size(m.path) for m in models) > LARGE_MERGE_BYTES:
            _return_freed_memory_to_the_system()
        # Weighted sums of whole tensors take the buffer-reusing fast path (see `streaming`).
        items = plan_items(modules, models, methods, out_dtype) if job.nan_policy == "error" else None
        with CheckpointWriter(plan, metadata) as writer:
            bar = tqdm(total=len(entries), unit="key", desc="merging", disable=bar_disabled(job.progress))
            try:
                if items is not None:
                    run_items(items, models, writer, progress=lambda: bar.update(1))
                else:
                    _merge_modules(models, methods, modules, writer, out_dtype, job.nan_policy, skipped, bar)
            finally:
                bar.close()
            for method in {id(m): m for m in methods.values()}.values():
                method.finish()
            for side in side_files:
                side.commit()
            writer.commit()
    if skipped:
        log.warning(
            "%d modules had NaN/Inf in a model and were copied from the base: %s",
            len(skipped),
            ", ".join(skipped[:5]),
        )
    return MergeReport(job.output, fmt, dtype_name, len(entries), time.perf_counter() - start, skipped)


def _merge_modules(models, methods, modules, writer, out_dtype, nan_policy, skipped, bar) -> None:
    """The generic path: module by module, read ahead on one thread and written behind on another."""
    behind = _WriteBehind(writer, out_dtype)
    try:
        for read in _prefetch(_read_modules(models, methods, modules)):
            merged = _merge_module(read, models, methods[read.module.component], nan_policy, skipped)
            for suffix, key in read.module.keys.items():
                behind.put(key, merged[suffix])
            bar.update(len(read.module.keys))
    except BaseException:
        behind.close(reraise=False)
        raise
    behind.close()


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


@dataclass
class ReadModule:
    module: Module
    tensors: dict[str, list[torch.Tensor]]  # suffix -> one tensor per model read, in its stored dtype
    non_finite: list[tuple[int, str]]  # (model index, key suffix) of inputs found holding NaN or Inf


def _read_modules(models, methods, modules) -> Iterator[ReadModule]:
    for module in modules:
        method = methods[module.component]
        readers = models if method.reads_all_models else models[:1]
        tensors = {}
        for suffix, key in module.keys.items():
            if models[0].ref(key).dtype.is_floating_point:
                tensors[suffix] = [model.read(key) for model in readers]
            else:
                tensors[suffix] = [models[0].read(key)]  # ids, counters: copied, never averaged
        # Methods that always pass NaN/Inf through get their output checked instead (see _merge_module).
        non_finite = [] if method.propagates_non_finite else _non_finite_inputs(tensors)
        yield ReadModule(module, tensors, non_finite)


def _non_finite_inputs(tensors: dict[str, list[torch.Tensor]]) -> list[tuple[int, str]]:
    return [
        (index, suffix)
        for suffix, values in tensors.items()
        for index, value in enumerate(values)
        if value.is_floating_point() and not _all_finite(value)
    ]


def _all_finite(tensor: torch.Tensor) -> bool:
    # A sum runs on all cores and allocates nothing; it is finite exactly when every element is, unless it
    # overflows, which the exact (slower) element-wise check then settles.
    return bool(torch.isfinite(tensor.sum(dtype=torch.float32))) or bool(torch.isfinite(tensor).all())


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


class _WriteBehind:
    """Casts and writes tensors on a background thread, so output I/O overlaps the merge maths."""

    def __init__(self, writer: CheckpointWriter, dtype: torch.dtype, depth: int = 2):
        self._writer, self._dtype = writer, dtype
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                key, tensor = item
                try:
                    self._writer.write(key, tensor.to(self._dtype) if tensor.is_floating_point() else tensor)
                except BaseException as err:
                    self._error = err

    def put(self, key: str, tensor: torch.Tensor) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((key, tensor))

    def close(self, reraise: bool = True) -> None:
        self._queue.put(None)
        self._thread.join()
        if reraise and self._error is not None:
            raise self._error


def _merge_module(read: ReadModule, models, method: MergeMethod, nan_policy: str, skipped: list[str]):
    module, tensors = read.module, read.tensors
    if read.non_finite:
        return _handle_non_finite(read, read.non_finite[0], models, nan_policy, skipped)
    floats = {s: v for s, v in tensors.items() if v[0].is_floating_point()}
    merged = method.merge_module(module.name, floats) if floats else {}
    if method.propagates_non_finite and not all(_all_finite(merged[s]) for s in floats):
        culprits = _non_finite_inputs(tensors)
        if not culprits:
            raise CheckpointError(
                f"the merge produced NaN or Inf from finite inputs ({method.name})", None, module.name
            )
        return _handle_non_finite(read, culprits[0], models, nan_policy, skipped)
    for suffix, values in tensors.items():
        if suffix not in floats:
            merged[suffix] = values[0]
    return merged


def _handle_non_finite(read: ReadModule, culprit: tuple[int, str], models, nan_policy: str, skipped: list[str]):
    index, suffix = culprit
    key = read.module.keys[suffix]
    if nan_policy == "error" or index == 0:
        where = "" if nan_policy == "error" else " in the base model"
        raise CheckpointError(f"tensor holds NaN or Inf{where}", models[index].source_file(key), key)
    log.warning("NaN/Inf in %s of %s: module copied from the base", key, models[index].path)
    skipped.append(read.module.name)
    return {s: v[0] for s, v in read.tensors.items()}


LARGE_MERGE_BYTES = 1 << 30


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _return_freed_memory_to_the_system() -> None:
    """glibc raises its mmap threshold after large frees, after which freed tensors stay in the heap and
    count as resident memory. A fixed threshold keeps big buffers in mmap, returned on free.

    The setting is process-wide and makes every allocation over 1 MiB a fresh mapping, which costs a lot
    of system time in code that allocates often (sampling a model), so it is only used for merges of large
    checkpoints, where it keeps peak memory at about half."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB


def _dtype_name(base: Checkpoint) -> str:
    for key in base.keys("unet"):
        dtype = base.ref(key).dtype
        if dtype.is_floating_point:
            return {v: k for k, v in DTYPES.items()}.get(dtype, "fp32")
    return "fp32"
