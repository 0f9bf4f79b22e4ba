"""Streaming access to safetensors files: read one tensor at a time, write tensors as they are produced.

Why not `safetensors.safe_open`? It memory-maps the file, and every page a merge touches stays mapped
(and counted in the process's resident memory) until the file is closed, so merging three 2 GB files
shows ~6 GB of RSS. Here each tensor is read with a plain `readinto` into memory the caller owns, so
the peak is bounded by the tensors alive at once.

The writer knows every output key, dtype and shape in advance (a merge never changes shapes), so it can
write the header first and then stream the data section in order. It writes to a temporary file in the
output's folder and renames it into place only on `commit()`, so a failed merge leaves nothing behind.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, a
JSON header of N bytes mapping each name to {dtype, shape, data_offsets=[begin, end)} relative to the
start of the data section (plus an optional "__metadata__" str->str map), then the data section.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from featurefusion.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# A header larger than this is not a checkpoint header but a corrupt length field.
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # offset of the first byte relative to the data section
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsReader:
    """Lazy reader of one .safetensors file. Validates the header on open; reads tensors on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError("no such file", self.path)
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed by close()/__exit__
        try:
            self._infos, self.metadata, self._data_start = self._parse_header()
        except BaseException:
            self._file.close()
            raise

    def _parse_header(self) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise CheckpointError("not a safetensors file: shorter than its 8-byte header length", self.path)
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(
                f"corrupt or truncated safetensors file: header length {header_len} does not fit "
                f"a file of {size} bytes",
                self.path,
            )
        try:
            header = json.loads(self._file.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"corrupt safetensors header ({err})", self.path) from None
        if not isinstance(header, dict):
            raise CheckpointError("corrupt safetensors header: not a JSON object", self.path)
        metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        data_size = size - data_start
        infos: dict[str, TensorInfo] = {}
        for key, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"corrupt header entry {entry!r}", self.path, key) from None
            info = TensorInfo(dtype, shape, begin, end)
            if end - begin != info.numel * dtype.itemsize:
                raise CheckpointError(
                    f"header says {end - begin} bytes for a {entry['dtype']} tensor of shape {list(shape)}",
                    self.path,
                    key,
                )
            if end > data_size:
                raise CheckpointError(
                    f"truncated file: the tensor ends at byte {end} of the data section, "
                    f"which holds only {data_size} bytes",
                    self.path,
                    key,
                )
            infos[key] = info
        return infos, dict(metadata), data_start

    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, key: str) -> bool:
        return key in self._infos

    def info(self, key: str) -> TensorInfo:
        try:
            return self._infos[key]
        except KeyError:
            raise CheckpointError("key not in checkpoint", self.path, key) from None

    def read(self, key: str) -> torch.Tensor:
        """A fresh tensor (owned memory, not a view of the file) with the stored dtype and shape."""
        info = self.info(key)
        raw = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            self._file.seek(self._data_start + info.begin)
            got = self._file.readinto(raw.numpy())
            if got != info.nbytes:
                raise CheckpointError(f"truncated file: read {got} of {info.nbytes} bytes", self.path, key)
        return raw.view(info.dtype).reshape(info.shape)

    def read_range_into(self, key: str, start: int, out: torch.Tensor) -> None:
        """Elements [start, start + len) of a tensor's flat data into the uint8 buffer `out` (len =
        out.numel() / itemsize). Positional (pread), so a reader thread can share the file."""
        info = self.info(key)
        offset = self._data_start + info.begin + start * info.dtype.itemsize
        if offset + out.numel() > self._data_start + info.end:
            raise CheckpointError("read past the end of a tensor", self.path, key)
        got = os.preadv(self._file.fileno(), [out.numpy()], offset)
        if got != out.numel():
            raise CheckpointError(f"truncated file: read {got} of {out.numel()} bytes", self.path, key)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class PlannedTensor:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def build_header(planned: Iterable[PlannedTensor], metadata: Mapping[str, str] | None) -> bytes:
    """Header bytes (length prefix included) for tensors laid out in the given order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for t in planned:
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype {t.dtype} cannot be stored in safetensors (key {t.key!r})")
        nbytes = math.prod(t.shape) * t.dtype.itemsize
        header[t.key] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8-byte alignment
    return struct.pack("<Q", len(encoded)) + encoded


class StreamingSafetensorsWriter:
    """Writes a safetensors file tensor by tensor, in the planned order, atomically.

    Use as a context manager: leaving the block with an exception removes the temporary file; call
    `commit()` inside the block once every planned tensor has been written.
    """

    def __init__(
        self, path: str | os.PathLike, planned: list[PlannedTensor], metadata: Mapping[str, str] | None = None
    ):
        self.path = Path(path)
        self._planned = planned
        self._next = 0
        self._partial = 0  # bytes of the next planned tensor already written by `write_bytes`
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed by commit()/abort()
        self._file.write(build_header(planned, metadata))

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._planned):
            raise RuntimeError(f"writer for {self.path} got an unplanned tensor {key!r}")
        want = self._planned[self._next]
        if key != want.key or tensor.dtype != want.dtype or tuple(tensor.shape) != want.shape:
            raise RuntimeError(
                f"writer for {self.path} expected {want.key!r} {want.dtype} {list(want.shape)}, "
                f"got {key!r} {tensor.dtype} {list(tensor.shape)}"
            )
        flat = tensor.detach().contiguous().reshape(-1)
        if flat.numel():
            self._file.write(memoryview(flat.view(torch.uint8).numpy()))
        self._next += 1

    def write_bytes(self, key: str, data: torch.Tensor) -> None:
        """Part of the next planned tensor's bytes (uint8, in order); the tensor is done once all arrived."""
        if self._next >= len(self._planned) or self._planned[self._next].key != key:
            raise RuntimeError(f"writer for {self.path} got bytes of {key!r} out of the planned order")
        want = self._planned[self._next]
        size = math.prod(want.shape) * want.dtype.itemsize
        if self._partial + data.numel() > size:
            raise RuntimeError(f"writer for {self.path} got more bytes than {key!r} holds")
        if data.numel():
            self._file.write(memoryview(data.numpy()))
        self._partial += data.numel()
        if self._partial == size:
            self._next, self._partial = self._next + 1, 0

    def commit(self) -> None:
        if self._next != len(self._planned):
            missing = self._planned[self._next].key
            self.abort()
            raise RuntimeError(f"writer for {self.path} closed before tensor {missing!r} was written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None or not self._file.closed:
            self.abort()


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    with SafetensorsReader(path) as reader:
        return dict(reader.metadata)


class AppendingSafetensorsWriter:
    """A safetensors writer for tensors whose number and sizes are not known in advance.

    Data is appended to a scratch file as tensors arrive; `commit()` writes the header and copies the data
    behind it, then renames into place. Memory stays at one tensor; disk briefly holds the data twice.
    """

    def __init__(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self._planned: list[PlannedTensor] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._data_path = self.path.with_name(f".{self.path.name}.{os.getpid()}.data")
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        self._data = open(self._data_path, "wb")  # noqa: SIM115 - closed by commit()/abort()

    def write(self, key: str, tensor: torch.Tensor) -> None:
        flat = tensor.detach().contiguous().reshape(-1)
        self._planned.append(PlannedTensor(key, tensor.dtype, tuple(tensor.shape)))
        if flat.numel():
            self._data.write(memoryview(flat.view(torch.uint8).numpy()))

    def commit(self) -> None:
        self._data.close()
        with open(self._tmp, "wb") as out, open(self._data_path, "rb") as data:
            out.write(build_header(self._planned, self.metadata))
            shutil.copyfileobj(data, out, length=16 * 1024 * 1024)
            out.flush()
            os.fsync(out.fileno())
        self._data_path.unlink()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if not self._data.closed:
            self._data.close()
        self._data_path.unlink(missing_ok=True)
        self._tmp.unlink(missing_ok=True)
