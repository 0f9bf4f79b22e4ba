"""The merge engine: walks a model module by module, asks a method for the merged tensors, streams them out.

Memory: at any time the engine holds the tensors of a few modules: one read ahead on a background thread,
one being merged, and up to two tensors being written behind on another thread. Peak memory therefore grows with
the number of models times the largest layer, not with the size of the models.

Checks before anything is written: enough models; no output (model or side file) is or overlaps any file
the command reads; the output target can be written without destroying anything (`check_output_target`);
the same keys, shapes and kinds (float or integer) in every model for each component that is merged (not
copied); enough free space. During the merge inputs are checked for NaN/Inf (see `merge.base`), and every
tensor is checked again after its cast to the output dtype, for every method. Any failure names the file
and key and leaves nothing new on disk: the model and its side files are published together at the end
(`io.atomic.publish`), or not at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from featurefusion.errors import CheckpointError, RecipeError
from featurefusion.io.atomic import fault_point, publish
from featurefusion.io.checkpoint import COMPONENTS, Checkpoint, open_checkpoint
from featurefusion.io.output import (
    CheckpointWriter,
    check_output_target,
    components_written,
    output_size,
    plan_output,
)
from featurefusion.merge.base import CopyBase, MergeMethod
from featurefusion.merge.streaming import plan_items, run_items
from featurefusion.progress import bar_disabled

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NAN_POLICIES = ("error", "skip")
OVERFLOW_POLICIES = ("error", "clamp")
# float8 inputs are read as float32: no merge maths is defined on 8-bit floats.
UPCAST = (torch.float8_e4m3fn, torch.float8_e5m2)


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
    inputs: list[Path] = field(default_factory=list)  # other files the command read (merged model, recipe, ...)
    overwrite: bool = False  # replace an existing, non-empty output folder that holds a model
    overflow: str = "error"  # a tensor that is not finite after its cast: "error", or "clamp" to the dtype's range
    expected_hashes: list[str] | None = None  # replay: SHA-256 of each model, verified while it is read
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
    """Run a merge. `side_files` are extra writers (with `path`, `finish(model_sha256)` giving staged files,
    `abort()`), published together with the output only if the merge succeeds."""
    try:
        return _run_merge(job, side_files or [])
    except BaseException:
        for side in side_files or []:
            side.abort()
        raise


def _run_merge(job: MergeJob, side_files: list) -> MergeReport:
    if job.nan_policy not in NAN_POLICIES:
        raise RecipeError(f"nan policy must be one of {NAN_POLICIES}")
    if job.overflow not in OVERFLOW_POLICIES:
        raise RecipeError(f"overflow policy must be one of {OVERFLOW_POLICIES}")
    if job.dtype is not None and job.dtype not in DTYPES:
        raise RecipeError(f"output dtype must be one of {', '.join(DTYPES)}, got {job.dtype!r}")
    read = [*job.models, *job.inputs, *([job.template] if job.template else [])]
    check_overlap([job.output, *(side.path for side in side_files)], read)
    needed = max((m.min_models for m in job.methods.values()), default=1)
    if len(job.models) < needed:
        raise RecipeError(f"this merge needs at least {needed} models, got {len(job.models)}")
    start = time.perf_counter()
    verify = job.expected_hashes is not None
    with contextlib.ExitStack() as stack:
        models = [stack.enter_context(open_checkpoint(p, hash_content=verify)) for p in job.models]
        base = models[0]
        methods = {c: job.methods.get(c, CopyBase()) for c in (*COMPONENTS, "extra")}
        fmt = job.output_format or base.layout
        check_output_target(fmt, job.output, job.overwrite)
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
            (key, out_dtype if _is_float(base.ref(key).dtype) else base.ref(key).dtype, base.ref(key).shape)
            for module in modules
            for key in module.keys.values()
        ]
        plan = plan_output(fmt, job.output, entries, base, job.template)
        check_free_space(job.output, output_size(plan, job.metadata))
        skipped: list[str] = []
        if sum(_size(m.path) for m in models) > LARGE_MERGE_BYTES:
            _return_freed_memory_to_the_system()
        # Weighted sums of whole tensors take the buffer-reusing fast path (see `streaming`).
        fast = job.nan_policy == "error" and job.overflow == "error"  # skipping or clamping: the generic path
        items = plan_items(modules, models, methods, out_dtype) if fast else None
        # Only side files record the model's SHA-256; without them the bytes are not hashed.
        with CheckpointWriter(plan, metadata, hash_content=bool(side_files)) as writer:
            fault_point("staged")
            bar = tqdm(total=len(entries), unit="key", desc="merging", disable=bar_disabled(job.progress))
            try:
                if items is not None:
                    run_items(items, models, writer, job.output, progress=lambda: bar.update(1))
                else:
                    _merge_modules(models, methods, modules, writer, out_dtype, job, skipped, bar)
            finally:
                bar.close()
            for method in {id(m): m for m in methods.values()}.values():
                method.finish()
            if verify:
                verify_inputs(models, job.expected_hashes)
            model = writer.finish()
            # Side files (statistics) record the model's SHA-256, which ties them to this very file; they are
            # published first, and if the model's rename then fails, publish takes them back.
            staged = [item for side in side_files for item in side.finish(writer.sha256())] + model
            fault_point("publish")
            publish(staged)
    if skipped:
        log.warning(
            "%d modules had NaN/Inf in a model and were copied from the base: %s",
            len(skipped),
            ", ".join(skipped[:5]),
        )
    return MergeReport(job.output, fmt, dtype_name, len(entries), time.perf_counter() - start, skipped)


def check_overlap(outputs: list[Path], inputs: list[Path]) -> None:
    """No output may be, contain or sit inside anything the command reads (a hard link counts as the same
    file): writing it would destroy an input, or read a half-written one."""
    for output in outputs:
        out = Path(output).resolve()
        for path in inputs:
            src = Path(path).resolve()
            if out == src or _same_file(out, src):
                raise CheckpointError(f"output path is the same as an input ({path}); choose another output", output)
            if src.is_relative_to(out) or out.is_relative_to(src):
                raise CheckpointError(f"output path overlaps the input {path}", output)


def _merge_modules(models, methods, modules, writer, out_dtype, job: MergeJob, skipped, bar) -> None:
    """The generic path: module by module, read ahead on one thread and written behind on another."""
    behind = _WriteBehind(writer, out_dtype, job.overflow, job.output)
    try:
        for done, read in enumerate(_prefetch(_read_modules(models, methods, modules))):
            merged = _merge_module(read, models, methods[read.module.component], job.nan_policy, skipped)
            for suffix, key in read.module.keys.items():
                behind.put(key, merged[suffix])
            bar.update(len(read.module.keys))
            if done == len(modules) // 2:
                fault_point("merging")
    except BaseException:
        behind.close(reraise=False)
        raise
    behind.close()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def check_free_space(output: Path, needed: int) -> None:
    """Fail before writing when the output's folder cannot hold it (staging needs the full size there)."""
    folder = Path(output).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if needed > free:
        raise CheckpointError(
            f"not enough free space: the output needs {needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free",
            folder,
        )


def verify_inputs(models: list[Checkpoint], expected: list[str]) -> None:
    """Replay: each model's SHA-256, hashed from the bytes the merge read, must be the recipe's."""
    for model, digest in zip(models, expected, strict=True):
        if digest and model.content_hash() != digest:
            raise CheckpointError(
                f"recipe input has changed: its content's SHA-256 is not the recorded {digest[:12]}...", model.path
            )


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
                kinds = base.ref(key).dtype, other.ref(key).dtype
                if _is_float(kinds[0]) != _is_float(kinds[1]):
                    raise CheckpointError(
                        f"dtype {_dtype_label(kinds[1])} where the base {base.path} stores {_dtype_label(kinds[0])}: "
                        "integer and float tensors are never averaged together",
                        other.source_file(key),
                        key,
                    )


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def _dtype_label(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
                tensors[suffix] = [_upcast(model.read(key)) for model in readers]
            else:
                tensors[suffix] = [models[0].read(key)]  # ids, counters: copied, never averaged
        # Methods that always pass NaN/Inf through get their output checked instead (see _merge_module).
        non_finite = [] if method.propagates_non_finite else _non_finite_inputs(tensors)
        yield ReadModule(module, tensors, non_finite)


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.dtype in UPCAST else tensor


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


def overflow_error(dtype: torch.dtype, output: Path, key: str, finite_before: bool = True) -> CheckpointError:
    beyond = f" (values beyond ±{torch.finfo(dtype).max:.6g})" if finite_before else ""
    return CheckpointError(
        f"the merged tensor holds Inf after the cast to {_dtype_label(dtype)}{beyond}; "
        "use a wider --dtype, or --overflow clamp to saturate",
        output,
        key,
    )


class _WriteBehind:
    """Casts and writes tensors on a background thread, so output I/O overlaps the merge maths.

    Every cast result is checked for NaN/Inf: a finite fp32 value beyond fp16's range (65504) becomes Inf,
    and a method can produce non-finite values from finite inputs. `overflow="clamp"` saturates overflowing
    values to the dtype's largest finite value instead of failing; NaN always fails."""

    def __init__(self, writer: CheckpointWriter, dtype: torch.dtype, overflow: str, output: Path, depth: int = 2):
        self._writer, self._dtype, self._overflow, self._output = writer, dtype, overflow, output
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                key, tensor = item
                try:
                    self._writer.write(key, self._cast(key, tensor))
                except BaseException as err:
                    self._error = err

    def _cast(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point():
            return tensor
        out = tensor.to(self._dtype)
        if _all_finite(out):
            return out
        if torch.isnan(out).any():
            raise CheckpointError("the merged tensor holds NaN; nothing was written", self._output, key)
        if self._overflow == "clamp" and torch.isfinite(tensor).all():
            limit = torch.finfo(self._dtype).max
            return tensor.clamp(-limit, limit).to(self._dtype)
        raise overflow_error(self._dtype, self._output, key, finite_before=bool(torch.isfinite(tensor).all()))

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
