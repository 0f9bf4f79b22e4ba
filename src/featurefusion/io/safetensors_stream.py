"""Streaming access to safetensors files: read one tensor at a time, write tensors as they are produced.

Why not `safetensors.safe_open`? It memory-maps the file, and every page a merge touches stays mapped
(and counted in the process's resident memory) until the file is closed, so merging three 2 GB files
shows ~6 GB of RSS. Here each tensor is read with a plain `readinto` into memory the caller owns, so
the peak is bounded by the tensors alive at once.

The writer knows every output key, dtype and shape in advance (a merge never changes shapes), so it can
write the header first and then stream the data section in order. It writes a staged file (`io.atomic`)
that appears at the output path only when published, so a failed or killed merge leaves nothing behind.

The reader validates the header as the safetensors library does (offsets in range, tensors tiling the data
section exactly, unique keys, bounded nesting), so no header byte or other tensor's byte is read as weights.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, a
JSON header of N bytes mapping each name to {dtype, shape, data_offsets=[begin, end)} relative to the
start of the data section (plus an optional "__metadata__" str->str map), then the data section.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import struct
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from featurefusion.errors import CheckpointError
from featurefusion.io.atomic import StagedFile, naming, publish

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
# The header is a flat object of objects; deeper JSON is an attack on the parser, refused before parsing.
MAX_HEADER_DEPTH = 8
HASH_CHUNK = 16 * 1024 * 1024
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


def check_regular_file(path: Path) -> None:
    """A clear reason when `path` cannot be a checkpoint file: missing, a folder, a FIFO, a device."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError("no such file", path) from None
    except OSError as err:
        raise CheckpointError(f"cannot read: {err.strerror}", path) from None
    if stat.S_ISDIR(mode):
        raise CheckpointError("is a folder, not a checkpoint file", path)
    if not stat.S_ISREG(mode):
        kind = (
            "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket"
        )
        raise CheckpointError(f"is {kind}, not a regular file; checkpoints are read from files", path)


def parse_header_json(raw: bytes, path: Path) -> dict:
    """The header object, with the checks the safetensors library makes: a JSON object, no key twice,
    bounded nesting."""
    # Nesting is measured on the bytes (strings blanked out), so a hostile header never reaches the parser.
    depth = 0
    for bracket in _BRACKETS.findall(_STRINGS.sub(b'""', raw)):
        depth += 1 if bracket in b"[{" else -1
        if depth > MAX_HEADER_DEPTH:
            raise CheckpointError(f"corrupt safetensors header: JSON nested deeper than {MAX_HEADER_DEPTH}", path)

    def unique(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise CheckpointError("corrupt safetensors header: a key appears twice", path, key)
            seen[key] = value
        return seen

    try:
        header = json.loads(raw, object_pairs_hook=unique)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"corrupt safetensors header ({err})", path) from None
    if not isinstance(header, dict):
        raise CheckpointError("corrupt safetensors header: not a JSON object", path)
    return header


def _tensor_info(key: str, entry, data_size: int, path: Path) -> TensorInfo:
    try:
        dtype = DTYPES[entry["dtype"]]
        shape = tuple(entry["shape"])
        offsets = tuple(entry["data_offsets"])
        if not all(type(v) is int for v in (*shape, *offsets)) or len(offsets) != 2 or min((*shape, 0)) < 0:
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"corrupt header entry {entry!r}", path, key) from None
    begin, end = offsets
    info = TensorInfo(dtype, shape, begin, end)
    if begin < 0 or end < begin:
        raise CheckpointError(f"corrupt header: data_offsets [{begin}, {end}] are not a byte range", path, key)
    if end - begin != info.numel * dtype.itemsize:
        raise CheckpointError(
            f"header says {end - begin} bytes for a {entry['dtype']} tensor of shape {list(shape)}", path, key
        )
    if end > data_size:
        raise CheckpointError(
            f"truncated file: the tensor ends at byte {end} of the data section, which holds only {data_size} bytes",
            path,
            key,
        )
    return info


def _check_layout(infos: dict[str, TensorInfo], data_size: int, path: Path) -> None:
    """Tensors tile the data section: in offset order each starts where the previous ends, the last ends at
    the end of the file. Otherwise header bytes or another tensor's bytes would be read as weights."""
    position = 0
    for key, info in sorted(infos.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin != position:
            what = "overlaps the previous tensor" if info.begin < position else f"leaves a gap at byte {position}"
            raise CheckpointError(f"corrupt header: the tensor's data {what}", path, key)
        position = info.end
    if position != data_size:
        raise CheckpointError(
            f"corrupt safetensors file: {data_size - position} bytes after the last tensor are not part of any tensor",
            path,
        )


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
    """Lazy reader of one .safetensors file. Validates the header on open; reads tensors on demand.

    With `hash_content`, the file's SHA-256 is computed from the bytes the reads bring in anyway: reads at
    or behind the hashed position cost nothing extra, a read ahead of it hashes the gap first, and
    `content_hash()` hashes whatever was never read. Replay uses this to verify inputs without a second pass.
    """

    def __init__(self, path: str | os.PathLike, hash_content: bool = False):
        self.path = Path(path)
        check_regular_file(self.path)
        self._hash = hashlib.sha256() if hash_content else None
        self._hashed = 0  # bytes of the file hashed so far, from its start
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed by close()/__exit__
        try:
            self._infos, self.metadata, self._data_start = self._parse_header()
            self._hashed = self._data_start
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
        raw = self._file.read(header_len)
        if self._hash is not None:
            self._hash.update(head + raw)
        header = parse_header_json(raw, self.path)
        metadata = header.pop("__metadata__", None)
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise CheckpointError("corrupt safetensors header: __metadata__ must map strings to strings", self.path)
        data_start = 8 + header_len
        data_size = size - data_start
        infos = {key: _tensor_info(key, entry, data_size, self.path) for key, entry in header.items()}
        _check_layout(infos, data_size, self.path)
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
            start = self._data_start + info.begin
            if self._hash is not None and start > self._hashed:
                self._hash_until(start)
            self._file.seek(start)
            got = self._file.readinto(raw.numpy())
            if got != info.nbytes:
                raise CheckpointError(f"truncated file: read {got} of {info.nbytes} bytes", self.path, key)
            if self._hash is not None and start <= self._hashed < start + info.nbytes:
                self._hash.update(memoryview(raw.numpy())[self._hashed - start :])
                self._hashed = start + info.nbytes
        return raw.view(info.dtype).reshape(info.shape)

    def _hash_until(self, end: int) -> None:
        while self._hashed < end:
            chunk = os.pread(self._file.fileno(), min(HASH_CHUNK, end - self._hashed), self._hashed)
            if not chunk:
                raise CheckpointError("file shrank while it was read", self.path)
            self._hash.update(chunk)
            self._hashed += len(chunk)

    def content_hash(self) -> str:
        """SHA-256 of the whole file (needs `hash_content=True`); hashes the bytes no read has covered."""
        if self._hash is None:
            raise RuntimeError("this reader was opened without hash_content")
        self._hash_until(os.fstat(self._file.fileno()).st_size)
        return self._hash.hexdigest()

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
        if self._hash is not None and offset <= self._hashed < offset + got:
            self._hash.update(memoryview(out.numpy())[self._hashed - offset :])
            self._hashed = offset + got

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
    """Writes a safetensors file tensor by tensor, in the planned order, atomically (see `io.atomic`).

    `finish()` checks every planned tensor was written and returns the staged file for `publish`, so a model
    and its side files appear together; `commit()` publishes it alone. Leaving a `with` block with an
    exception (or `abort()`) discards it.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        planned: list[PlannedTensor],
        metadata: Mapping[str, str] | None = None,
        hash_content: bool = True,
    ):
        self.path = Path(path)
        self._planned = planned
        self._next = 0
        self._partial = 0  # bytes of the next planned tensor already written by `write_bytes`
        self._staged = StagedFile(self.path)
        # The file's SHA-256, from the bytes as they are written: side files record it (no second pass).
        # Off when nothing will record it: hashing costs about half the time of writing the bytes.
        self._hash = hashlib.sha256() if hash_content else None
        try:
            self._write(build_header(planned, metadata))
        except BaseException:
            self._staged.abort()
            raise

    def _write(self, data) -> None:
        if self._hash is not None:
            self._hash.update(data)
        self._staged.write(data)

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
            self._write(memoryview(flat.view(torch.uint8).numpy()))
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
            self._write(memoryview(data.numpy()))
        self._partial += data.numel()
        if self._partial == size:
            self._next, self._partial = self._next + 1, 0

    def sha256(self) -> str:
        """SHA-256 of the whole file (once every tensor has been written)."""
        if self._hash is None:
            raise RuntimeError(f"writer for {self.path} was made without hash_content")
        return self._hash.hexdigest()

    def finish(self) -> list[StagedFile]:
        if self._next != len(self._planned):
            missing = self._planned[self._next].key
            self.abort()
            raise RuntimeError(f"writer for {self.path} closed before tensor {missing!r} was written")
        return [self._staged]

    def commit(self) -> None:
        publish(self.finish())

    def abort(self) -> None:
        self._staged.abort()

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()


def planned_size(planned: Iterable[PlannedTensor], metadata: Mapping[str, str] | None = None) -> int:
    """Bytes of the file `StreamingSafetensorsWriter` will write."""
    planned = list(planned)
    return len(build_header(planned, metadata)) + sum(math.prod(t.shape) * t.dtype.itemsize for t in planned)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    with SafetensorsReader(path) as reader:
        return dict(reader.metadata)


class AppendingSafetensorsWriter:
    """A safetensors writer for tensors whose number and sizes are not known in advance.

    Data is appended to an unnamed scratch file (it vanishes with the process, whatever kills it) as tensors
    arrive; `finish()` writes the header and copies the data behind it into a staged file. Memory stays at
    one tensor; disk briefly holds the data twice. `extra_metadata` may be set until `finish()`.
    """

    def __init__(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self._planned: list[PlannedTensor] = []
        self._data = None  # created at the first write: nothing touches the disk before the merge runs
        self._staged: StagedFile | None = None

    def _scratch(self):
        if self._data is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._data = tempfile.TemporaryFile(dir=self.path.parent)  # noqa: SIM115 - closed by finish()/abort()
            except OSError as err:
                raise OSError(err.errno, err.strerror, str(self.path)) from err
        return self._data

    def write(self, key: str, tensor: torch.Tensor) -> None:
        flat = tensor.detach().contiguous().reshape(-1)
        self._planned.append(PlannedTensor(key, tensor.dtype, tuple(tensor.shape)))
        if flat.numel():
            with naming(self.path):
                self._scratch().write(memoryview(flat.view(torch.uint8).numpy()))

    def finish(self) -> list[StagedFile]:
        try:
            self._staged = StagedFile(self.path)
            self._staged.write(build_header(self._planned, self.metadata))
            data = self._scratch()
            data.seek(0)
            while chunk := data.read(16 * 1024 * 1024):
                self._staged.write(chunk)
        except BaseException:
            self.abort()
            raise
        data.close()
        return [self._staged]

    def commit(self) -> None:
        publish(self.finish())

    def abort(self) -> None:
        if self._data is not None and not self._data.closed:
            self._data.close()
        if self._staged is not None:
            self._staged.abort()
