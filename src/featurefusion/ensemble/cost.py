"""What a model costs at inference: parameters held, seconds per image, peak memory.

- Parameters held: every distinct tensor of the pipeline's modules, counted once (an ensemble's members
  share the base's text encoder and VAE, so those count once; the N U-Nets and the aggregators all count).
- Seconds per image: wall time of one sampling call divided by its images.
- Peak memory: the bytes of those parameters plus the activations' peak during that call. On CUDA the
  activations are `max_memory_allocated` above the memory in use before the call; on CPU they are the
  growth of the process's resident memory, read every 2 ms by a thread (an estimate: the allocator may reuse
  memory already resident, so it can read low, never high).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")


@dataclass(frozen=True)
class Cost:
    parameters: int
    weight_bytes: int
    seconds_per_image: float
    peak_bytes: int  # weights + activation peak

    def row(self) -> dict[str, float]:
        return {
            "parameters (M)": self.parameters / 1e6,
            "s / image": self.seconds_per_image,
            "peak memory (MiB)": self.peak_bytes / 2**20,
        }


def held_tensors(pipe) -> list[torch.Tensor]:
    seen, tensors = set(), []
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if not isinstance(module, torch.nn.Module):
            continue
        for tensor in [*module.parameters(), *module.buffers()]:
            key = (tensor.device, tensor.data_ptr())
            if key not in seen:
                seen.add(key)
                tensors.append(tensor)
    return tensors


def parameters_held(pipe) -> tuple[int, int]:
    """(parameter count, bytes of parameters and buffers), each distinct tensor once."""
    tensors = held_tensors(pipe)
    count = sum(t.numel() for t in tensors if isinstance(t, torch.nn.Parameter))
    return count, sum(t.numel() * t.element_size() for t in tensors)


def measure(pipe, run: Callable[[], object], images: int, device: torch.device | None = None) -> Cost:
    """Cost of `run()` (one sampling call drawing `images` images with `pipe`)."""
    count, weight_bytes = parameters_held(pipe)
    device = device or next(iter(held_tensors(pipe))).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        run()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        activations = torch.cuda.max_memory_allocated(device) - before
    else:
        with _RSSPeak() as peak:
            start = time.perf_counter()
            run()
            seconds = time.perf_counter() - start
        activations = peak.growth
    return Cost(count, weight_bytes, seconds / images, weight_bytes + max(0, activations))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


try:
    import os

    _PAGE = os.sysconf("SC_PAGE_SIZE")
except (AttributeError, ValueError, OSError):  # not Linux: no /proc either
    _PAGE = 4096


class _RSSPeak:
    def __enter__(self):
        self.growth, self._stop = 0, threading.Event()
        try:
            self._base = _rss()
        except OSError:
            self._thread = None
            return self
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.growth = max(self.growth, _rss() - self._base)
            self._stop.wait(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.growth = max(self.growth, _rss() - self._base)
