"""Every file the tool writes appears whole at its path, or not at all, and nothing is left behind.

One mechanism for all outputs:

- `StagedFile(target)` is written in the target's folder (so the final rename never crosses file systems).
  On Linux it is an anonymous `O_TMPFILE` inode: it has no name until `stage()` links it, so a process that
  dies by any signal, SIGKILL included, leaves nothing. Where `O_TMPFILE` or `linkat` is unavailable it has
  a hidden name `.NAME.ffpart-PID-TOKEN`, and `sweep_stale` removes such names of processes that are gone.
- `StagedFolder(target)` is a hidden folder with that kind of name (folders cannot be anonymous).
- `publish([...])` makes a group of staged outputs (a model and its statistics) visible together: every
  item is staged (flushed, fsynced, named) before the first rename; if a rename fails, the renames already
  done are undone, so either every target changes or none does. An existing target is kept as a hard link
  (file) or renamed away (folder) until the group has been published.

A SIGKILL in the microseconds between two renames of a group can still publish the first item alone; the
statistics file is therefore tied to its model by content (see `merge.featurefusion`), never trusted by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import re
import secrets
import shutil
import signal
import time
from pathlib import Path

MARK = ".ffpart"
# Staging names of this module, and the ones older versions used for models and statistics
# (`.NAME.PID.partial`, `.data`, `.old`); not `.NAME.PID.tmp`, a pattern other tools use too.
_STALE = re.compile(r"^\..+(?:\.ffpart-(\d+)-[0-9a-f]+|\.(\d+)\.(?:partial|data|old))$")
_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400
_linkat_works: dict[int, bool] = {}  # st_dev -> whether O_TMPFILE + linkat work there
# (pid, folder) -> when it was last swept: a folder of thousands of images is not scanned once per image
_swept: dict[tuple[int, str], float] = {}
SWEEP_INTERVAL_S = 10.0


def staging_name(target: Path) -> Path:
    return target.with_name(f".{target.name}{MARK}-{os.getpid()}-{secrets.token_hex(4)}")


def fault_point(name: str) -> None:
    """Fault-injection hook for the tests: FEATUREFUSION_FAULT=NAME:SIGNAL makes this process send itself
    SIGNAL when it reaches the point NAME (`staged`, `merging`, `publish`, `published-one`)."""
    spec = os.environ.get("FEATUREFUSION_FAULT", "")
    point, _, sig = spec.partition(":")
    if point == name:
        os.kill(os.getpid(), getattr(signal, sig or "SIGTERM"))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def sweep_stale(folder: Path) -> list[Path]:
    """Remove staging files and folders left in `folder` by processes that no longer run (SIGKILL, power
    loss). A name whose process still runs is kept: it may be another merge writing into the same folder."""
    removed: list[Path] = []
    seen = (os.getpid(), os.path.abspath(folder))
    if time.monotonic() - _swept.get(seen, -math.inf) < SWEEP_INTERVAL_S:
        return removed
    _swept[seen] = time.monotonic()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _STALE.match(entry.name)
        if not match or _alive(int(match.group(1) or match.group(2))):
            continue
        path = Path(entry.path)
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


def _libc():
    return ctypes.CDLL(None, use_errno=True)


WRITEBACK_BYTES = 64 << 20


def _sync_file_range():
    """libc's sync_file_range (Linux), or None where there is none."""
    try:
        function = _libc().sync_file_range
    except AttributeError:
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


_SYNC_RANGE = _sync_file_range()
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4


class _Writeback:
    """Hands a large file's bytes to the disk as they are written instead of all at the final fsync, so
    writing to the disk overlaps the work that produces the bytes (a merge's reading and sums) and dirty
    pages do not pile up in memory: each full window is started at once, and the window before it waited
    for (the pattern the kernel's writeback documentation suggests for streaming writes)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.written = 0
        self.started = 0  # bytes handed to the disk so far

    def wrote(self, count: int) -> None:
        self.written += count
        if _SYNC_RANGE is None or self.written - self.started < WRITEBACK_BYTES:
            return
        begin, size = self.started, self.written - self.started
        _SYNC_RANGE(self.fd, begin, size, _WRITE)
        if begin:
            previous = max(0, begin - WRITEBACK_BYTES)
            _SYNC_RANGE(self.fd, previous, begin - previous, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
        self.started = self.written


def _link_anonymous(fd: int, name: Path) -> None:
    # os.link(follow_symlinks=True) calls link(2), which links the /proc symlink itself and fails with EXDEV;
    # linkat with AT_SYMLINK_FOLLOW links the open inode.
    source = f"/proc/self/fd/{fd}".encode()
    if _libc().linkat(_AT_FDCWD, source, _AT_FDCWD, os.fsencode(name), _AT_SYMLINK_FOLLOW) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(name))


def _anonymous_supported(folder: Path) -> bool:
    """Probe once per file system: O_TMPFILE and linking it by /proc both work."""
    dev = os.stat(folder).st_dev
    if dev not in _linkat_works:
        ok = False
        if hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd"):
            probe = folder / f".probe{MARK}-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                fd = os.open(folder, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
                try:
                    _link_anonymous(fd, probe)
                    probe.unlink()
                    ok = True
                finally:
                    os.close(fd)
            except (OSError, AttributeError):
                ok = False
        _linkat_works[dev] = ok
    return _linkat_works[dev]


@contextlib.contextmanager
def naming(path: Path):
    """OSErrors of writes and flushes carry no file name (ENOSPC from write(2)): give them the target's."""
    try:
        yield
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err


class StagedFile:
    """A file written where `target` will be, invisible until published. `file` is a binary file object;
    `write` is `file.write` with OSErrors naming the target."""

    is_dir = False

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)
        folder = self.target.parent
        folder.mkdir(parents=True, exist_ok=True)
        sweep_stale(folder)
        self.name: Path | None = None  # hidden name, once it has one
        if _anonymous_supported(folder):
            fd = os.open(folder, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o666)
        else:
            self.name = staging_name(self.target)
            fd = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        self.file = os.fdopen(fd, "wb", buffering=0)
        self._writeback = _Writeback(fd)

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        with naming(self.target):
            while view:  # an unbuffered write may take part of the bytes
                done = self.file.write(view)
                view = view[done:]
                self._writeback.wrote(done)

    def stage(self) -> Path:
        """Flush to disk and give the file its hidden name (if it has none yet); return that name."""
        if not self.file.closed:
            with naming(self.target):
                self.file.flush()
                os.fsync(self.file.fileno())
            if self.name is None:
                name = staging_name(self.target)
                _link_anonymous(self.file.fileno(), name)
                self.name = name
            self.file.close()
        assert self.name is not None
        return self.name

    def commit(self) -> None:
        publish([self])

    def abort(self) -> None:
        if not self.file.closed:
            self.file.close()
        if self.name is not None:
            self.name.unlink(missing_ok=True)


class StagedFolder:
    """A folder built under a hidden name beside `target`; `path` is where to write its files."""

    is_dir = True

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(self.target.parent)
        self.path = staging_name(self.target)
        self.path.mkdir()

    def stage(self) -> Path:
        return self.path

    def commit(self) -> None:
        publish([self])

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def publish(items: list) -> None:
    """Rename every staged item onto its target, all or none (see the module docstring)."""
    try:
        staged = [item.stage() for item in items]
    except BaseException:
        for item in items:
            item.abort()
        raise
    done: list[tuple[Path, Path | None, bool, bool]] = []  # (target, kept old version, is a folder, existed)
    try:
        for item, path in zip(items, staged, strict=True):
            target = item.target
            existed = target.exists() or target.is_symlink()
            old = _keep_old(target, item.is_dir) if existed else None
            done.append((target, old, item.is_dir, existed))
            os.replace(path, target)
            fault_point("published-one" if len(done) == 1 and len(items) > 1 else "published")
    except BaseException:
        for step in reversed(done):
            with contextlib.suppress(OSError):
                _restore(*step)
        for item in items:
            item.abort()
        raise
    for _, old, is_dir, _ in done:
        if old is not None and is_dir:
            shutil.rmtree(old, ignore_errors=True)
        elif old is not None:
            old.unlink(missing_ok=True)
    for folder in {item.target.parent for item in items}:
        _fsync_folder(folder)


def _keep_old(target: Path, is_dir: bool) -> Path | None:
    """Keep the current target under a hidden name until the group is published, so a failure can restore
    it. A folder cannot be replaced in one step, so it moves aside; a file stays in place, with a second
    hard link (None where the file system has no hard links: then it cannot be restored, only kept)."""
    old = staging_name(target)
    if is_dir:
        os.rename(target, old)
        return old
    try:
        os.link(target, old, follow_symlinks=False)
    except OSError:
        return None
    return old


def _restore(target: Path, old: Path | None, is_dir: bool, existed: bool) -> None:
    """Undo one step of `publish`: put the kept old version back, or remove what was published. What existed
    and could not be kept is left alone: never delete what the tool did not write."""
    if old is None:
        if not existed and target.exists():
            if is_dir:
                shutil.rmtree(target)
            else:
                target.unlink()
    elif is_dir:
        if target.exists():
            shutil.rmtree(target)
        os.rename(old, target)
    elif target.exists() and os.path.samefile(target, old):
        old.unlink()  # the rename never happened; rename(2) between two links of one file would do nothing
    else:
        os.replace(old, target)


def _fsync_folder(folder: Path) -> None:
    # The renames are durable only once the folder's entries are on disk.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    staged = StagedFile(path)
    try:
        staged.write(data)
    except BaseException:
        staged.abort()
        raise
    staged.commit()


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(Path(path), text.encode("utf-8"))


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def save_png_atomic(image, path: Path) -> None:
    """A PIL image as PNG."""
    staged = StagedFile(path)
    try:
        image.save(staged.file, format="PNG")
    except BaseException:
        staged.abort()
        raise
    staged.commit()
