"""The engine's fast path for merges that are weighted sums of whole tensors (soups, their add/remove
updates, block weights, copies of the base): they run at about the speed of reading the inputs once and
writing the output once.

What costs time in the generic path is not the arithmetic but memory: every tensor read is a fresh
allocation, and large fresh allocations are fresh mappings whose every page faults on first touch (system
time, ~1 µs per 4 KiB); the float32 result and its cast to the output dtype are two more. Here tensors are
cut into chunks of at most CHUNK elements and every buffer is allocated once and reused:

    reader thread:  pread each model's chunk into a free input set  (3 sets rotate)
    main thread:    acc = sum_i w_i x_i in float32, on one thread (the same kernels as `weighted_sum`, so
                    the bytes equal the generic path's); one min/max pass over acc checks it for NaN/Inf
                    and for values the output dtype cannot hold; cast into a free output buffer (2 rotate)
    writer thread:  append the bytes to the output file (handed to the disk as they come, `io.atomic`)

A chunk that only copies (non-float tensors; a float copy in its own dtype) goes from the input buffer to
the writer untouched. Peak memory: the buffers (~150 MB) on top of the interpreter.

Used when every component's method says it is a weighted sum (`linear_weights`), every input is a
safetensors file and NaN/Inf is an error (a skipped module would need the generic path's per-module undo).
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass

import torch

from featurefusion.errors import CheckpointError
from featurefusion.io.atomic import fault_point
from featurefusion.io.safetensors_stream import SafetensorsReader

CHUNK = 2 << 20  # elements per chunk
INPUT_SETS = 3
OUTPUT_BUFFERS = 2


@dataclass
class Item:
    key: str  # canonical key
    sources: list  # (TensorRef, weight) per model read
    out_dtype: torch.dtype
    numel: int
    copy: bool  # bytes pass through unchanged


def plan_items(modules, models, methods, out_dtype) -> list[Item] | None:
    """The work in output order, or None when some method or input does not allow the fast path."""
    items = []
    for module in modules:
        method = methods[module.component]
        weights_of = getattr(method, "linear_weights", None)
        if weights_of is None:
            return None
        weights = weights_of(module.name, next(iter(module.keys)))
        readers = models if method.reads_all_models else models[:1]
        if len(weights) != len(readers):
            return None
        for key in module.keys.values():
            base = models[0].ref(key)
            if base.dtype.is_floating_point:
                refs = [m.ref(key) for m in readers]
                dtype = out_dtype
                copy = len(refs) == 1 and weights[0] == 1.0 and base.dtype == out_dtype
                sources = list(zip(refs, weights, strict=True))
            else:
                refs, dtype, copy, sources = [base], base.dtype, True, [(base, 1.0)]
            if not all(isinstance(r.reader, SafetensorsReader) for r in refs):
                return None
            if any(r.dtype.itemsize == 1 and r.dtype.is_floating_point for r in refs):
                return None  # float8 has no kernels to add into float32; the generic path upcasts it
            numel = 1
            for s in base.shape:
                numel *= s
            items.append(Item(key, sources, dtype, numel, copy))
    return items


class _Stop(Exception):
    pass


def _get(q: queue.Queue, stop: threading.Event):
    while True:
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            if stop.is_set():
                raise _Stop from None


def run_items(items: list[Item], models, writer, output, progress=None) -> None:
    """Merge and write every item through the three-stage pipeline; raises the first error of any stage."""
    width = max((len(i.sources) for i in items), default=1)
    itemsize = max((r.dtype.itemsize for i in items for r, _ in i.sources), default=1)
    out_size = max((i.out_dtype.itemsize for i in items), default=1)
    free_in: queue.Queue = queue.Queue()
    for _ in range(INPUT_SETS):
        free_in.put([torch.empty(CHUNK * itemsize, dtype=torch.uint8) for _ in range(width)])
    free_out: queue.Queue = queue.Queue()
    for _ in range(OUTPUT_BUFFERS):
        free_out.put(torch.empty(CHUNK * out_size, dtype=torch.uint8))
    acc_buffer = torch.empty(CHUNK, dtype=torch.float32)
    widened = torch.empty(CHUNK, dtype=torch.float32)
    ready: queue.Queue = queue.Queue()
    to_write: queue.Queue = queue.Queue()
    stop = threading.Event()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for item in items:
                for start in range(0, max(item.numel, 1), CHUNK):
                    count = min(CHUNK, item.numel - start)
                    buffers = _get(free_in, stop)
                    for (ref, _), buffer in zip(item.sources, buffers, strict=False):
                        ref.reader.read_range_into(ref.file_key, start, buffer[: count * ref.dtype.itemsize])
                    ready.put((item, start + count >= item.numel, count, buffers))
        except _Stop:
            return
        except BaseException as err:
            errors.append(err)
            stop.set()
        ready.put(None)

    def write() -> None:
        try:
            while (entry := _get(to_write, stop)) is not None:
                item, data, release, last = entry
                writer.write_bytes(item.key, data)
                release()
                if last and progress is not None:
                    progress()
        except _Stop:
            return
        except BaseException as err:
            errors.append(err)
            stop.set()

    threads = [threading.Thread(target=read, daemon=True), threading.Thread(target=write, daemon=True)]
    for thread in threads:
        thread.start()
    # The sums run on one thread: a chunk is a few ms of work, and an intra-op pool waits on its slowest
    # thread at every op, which on a busy machine (or beside the reader and writer) costs 10-20x the work.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for done, entry in enumerate(iter(lambda: _get(ready, stop), None)):
            item, last, count, buffers = entry
            if done == len(items) // 2:
                fault_point("merging")
            if item.copy:
                ref = item.sources[0][0]
                data = buffers[0][: count * ref.dtype.itemsize]
                if ref.dtype.is_floating_point and not _finite(data.view(ref.dtype)):
                    _check_finite([data.view(ref.dtype)], item, models, None)
                to_write.put((item, data, lambda b=buffers: free_in.put(b), last))
                continue
            acc = acc_buffer[:count]
            views = [
                buf[: count * ref.dtype.itemsize].view(ref.dtype)
                for (ref, _), buf in zip(item.sources, buffers, strict=False)
            ]
            weights = [w for _, w in item.sources]
            acc.copy_(views[0]).mul_(weights[0])
            for w, view in zip(weights[1:], views[1:], strict=True):
                if view.dtype != torch.float32:
                    # Widening first and adding two float32 tensors takes the vectorised kernel (the
                    # mixed-dtype add is ~1.5x slower); the sums are the same to the bit.
                    view = widened[:count].copy_(view)
                acc.add_(view, alpha=w)
            # One pass over the sum settles both checks: finite (else find the input at fault), and inside the
            # output dtype's range (else check the cast bytes, as rounding may still land on the largest value).
            largest = _largest_magnitude(acc)
            if not math.isfinite(largest):
                _check_finite(views, item, models, acc)
            out = _get(free_out, stop)
            data = out[: count * item.out_dtype.itemsize]
            data.view(item.out_dtype).copy_(acc)
            if largest > torch.finfo(item.out_dtype).max:
                _check_cast(data.view(item.out_dtype), item, output)
            free_in.put(buffers)
            to_write.put((item, data, lambda o=out: free_out.put(o), last))
        to_write.put(None)
        threads[1].join()
    except _Stop:
        pass
    except BaseException:
        stop.set()
        raise
    finally:
        torch.set_num_threads(threads_before)
        stop.set()
        for thread in threads:
            thread.join(timeout=5)
    if errors:
        raise errors[0]


def _largest_magnitude(tensor: torch.Tensor) -> float:
    """max |x| in one pass, NaN if any element is NaN (aminmax propagates it), inf if any is infinite."""
    if tensor.numel() == 0:
        return 0.0
    low, high = torch.aminmax(tensor)
    return max(-float(low), float(high)) if not (low.isnan() or high.isnan()) else math.nan


def _finite(tensor: torch.Tensor) -> bool:
    return math.isfinite(_largest_magnitude(tensor))


def _check_finite(views, item: Item, models, acc) -> None:
    from featurefusion.merge.engine import _all_finite

    if _all_finite(acc if acc is not None else views[0]):
        return
    for index, view in enumerate(views):
        if not _all_finite(view):
            raise CheckpointError("tensor holds NaN or Inf", models[index].source_file(item.key), item.key)
    raise CheckpointError("the merge produced NaN or Inf from finite inputs (weighted sum)", None, item.key)


def _check_cast(out: torch.Tensor, item: Item, output) -> None:
    """A finite float32 sum can still overflow a narrower output dtype (fp16 ends at 65504)."""
    from featurefusion.merge.engine import _all_finite, overflow_error

    if out.dtype != torch.float32 and not _all_finite(out):
        raise overflow_error(out.dtype, output, item.key)
