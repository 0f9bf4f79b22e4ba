"""What a merge method is: a function over the tensors of one module, one list entry per model.

The engine owns all I/O. For each module (a group of keys sharing a prefix, e.g. `...conv1.weight` and
`...conv1.bias`) it reads the float tensors of every model in their stored dtype (often fp16), calls
`merge_module`, and writes the result in the output dtype. A method does its maths in float32 and never sees
file names or non-float tensors (those are copied from the base, never averaged).

A method may also define `prepare(models)`, called with the opened checkpoints before anything is written
(to read the UNet's layout, check options against it, and fail early).

NaN/Inf checks: when any non-finite input necessarily makes the output non-finite (`propagates_non_finite`,
true of weighted sums and copies), the engine checks the one output instead of every input, and looks for
the culprit only when the output is bad. Other methods get every input checked before they run.

A method whose every float tensor of a module is sum_i w_i x_i may say so with `linear_weights(module,
suffix)`: the w_i, one per model it reads (`suffix` is the module's first key suffix). The engine then
streams it in reused buffers (`merge.streaming`).
"""

from __future__ import annotations

from typing import Protocol

import torch

ModuleTensors = dict[str, list[torch.Tensor]]  # key suffix ("weight", "bias", ...) -> one tensor per model


class MergeMethod(Protocol):
    name: str
    min_models: int
    reads_all_models: bool  # False: only model 0 is read (a copy), so other models need not hold the keys
    propagates_non_finite: bool  # True: a NaN/Inf in any input always shows in the output

    def merge_module(self, module: str, tensors: ModuleTensors) -> dict[str, torch.Tensor]: ...

    def finish(self) -> None: ...


class CopyBase:
    """Take the first model's tensors unchanged (text encoder and VAE by default)."""

    name = "copy-base"
    min_models = 1
    reads_all_models = False
    propagates_non_finite = True

    def merge_module(self, module: str, tensors: ModuleTensors) -> dict[str, torch.Tensor]:
        return {suffix: values[0] for suffix, values in tensors.items()}

    def linear_weights(self, module: str, suffix: str) -> list[float]:
        return [1.0]  # a copy is a weighted sum of one model: the engine's fast path can stream it

    def finish(self) -> None:
        pass
