"""Reader for legacy PyTorch pickles (.ckpt / .bin / .pt), restricted to `torch.load(weights_only=True)`.

Pickles can run arbitrary code when loaded; `weights_only=True` limits unpickling to tensors and plain
containers. The file is memory-mapped (`mmap=True`) where the zip format allows it, so tensors are paged
in on access rather than all at once. Prefer .safetensors: it is safe and streams with bounded memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from featurefusion.errors import CheckpointError
from featurefusion.io.safetensors_stream import TensorInfo, check_regular_file


class PickleReader:
    """Same interface as `SafetensorsReader` (keys / info / read / metadata / close)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        check_regular_file(self.path)
        if self.path.stat().st_size == 0:
            raise CheckpointError("empty file (0 bytes): not a PyTorch checkpoint", self.path)
        try:
            try:
                obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                obj = torch.load(self.path, map_location="cpu", weights_only=True)  # pre-zip format
        except Exception as err:  # torch raises many types for corrupt or unsafe pickles
            raise CheckpointError(f"cannot load as a weights-only PyTorch checkpoint ({err})", self.path) from None
        # Lightning/ldm checkpoints nest the weights under "state_dict".
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError("checkpoint does not hold a dict of tensors", self.path)
        self._tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        self.metadata: dict[str, str] = {}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def info(self, key: str) -> TensorInfo:
        t = self._tensor(key)
        return TensorInfo(t.dtype, tuple(t.shape), 0, t.numel() * t.element_size())

    def read(self, key: str) -> torch.Tensor:
        return self._tensor(key).clone()

    def _tensor(self, key: str) -> torch.Tensor:
        try:
            return self._tensors[key]
        except KeyError:
            raise CheckpointError("key not in checkpoint", self.path, key) from None

    def close(self) -> None:
        self._tensors = {}

    def __enter__(self) -> PickleReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
