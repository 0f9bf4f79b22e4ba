"""What a model costs at inference: parameters held, seconds per image, peak memory.

- Parameters held: every distinct tensor of the pipeline's modules, counted once (an ensemble's members
  share the base's text encoder and VAE, so those count once; the N U-Nets and the aggregators all count).
- Seconds per image: wall time of one sampling call divided by its images.
- Peak memory: the bytes of those parameters plus the activations' peak during that call. On CUDA the
  activations are `max_memory_allocated` above the memory in use before the call; on CPU, where torch keeps
  no such counter, a second call runs under the torch profiler with memory tracking, and the peak is the
  maximum of the running sum of every allocation and free in time order (the process's resident size would
  not show it: the allocator reuses memory it already holds).
"""

from __future__ import annotations

import os
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
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
        activations = activation_peak(run)
    return Cost(count, weight_bytes, seconds / images, weight_bytes + max(0, activations))


def activation_peak(run: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    # Kineto, the profiler's C++ side, prints a line to stdout as it starts and as it stops unless its log
    # level is above its highest (read when the profiler first starts; a user's own setting wins).
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage  # frees are events of their own, with negative usage
        peak = max(peak, live)
    return peak
