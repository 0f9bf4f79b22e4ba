"""Staging and publishing: a file is invisible until published, a group is published all or none."""

import os
from pathlib import Path

import pytest

from featurefusion.io import atomic
from featurefusion.io.atomic import StagedFile, StagedFolder, publish, sweep_stale


def test_a_staged_file_is_invisible_until_published(tmp_path):
    target = tmp_path / "out.bin"
    staged = StagedFile(target)
    staged.write(b"x" * 100_000)
    if atomic._anonymous_supported(tmp_path):
        assert list(tmp_path.iterdir()) == []  # O_TMPFILE: not even a hidden name
    assert not target.exists()
    staged.commit()
    assert target.read_bytes() == b"x" * 100_000 and list(tmp_path.iterdir()) == [target]


def test_an_aborted_file_leaves_nothing(tmp_path):
    staged = StagedFile(tmp_path / "out.bin")
    staged.write(b"partial")
    staged.abort()
    assert list(tmp_path.iterdir()) == []


def test_the_named_fallback_works_too(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_anonymous_supported", lambda folder: False)
    staged = StagedFile(tmp_path / "out.bin")
    staged.write(b"data")
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == [".out.bin.ffpart"]
    staged.commit()
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_a_failed_group_restores_every_target(tmp_path, monkeypatch):
    folder, file = tmp_path / "model", tmp_path / "stats.bin"
    folder.mkdir()
    (folder / "old.txt").write_text("old model")
    file.write_bytes(b"old stats")
    new_folder = StagedFolder(folder)
    (new_folder.path / "new.txt").write_text("new model")
    new_file = StagedFile(file)
    new_file.write(b"new stats")
    real = os.replace

    def fail_on_the_file(src, dst):
        if Path(dst) == file:
            raise OSError(28, "No space left on device", str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_the_file)
    with pytest.raises(OSError):
        publish([new_folder, new_file])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "stats.bin"]
    assert [p.name for p in folder.iterdir()] == ["old.txt"] and file.read_bytes() == b"old stats"


def test_sweeping_keeps_names_of_live_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_swept", {})
    dead = tmp_path / ".m.safetensors.ffpart-4194321-00ff00ff"
    live = tmp_path / f".m.safetensors.ffpart-{os.getppid()}-00ff00ff"
    other = tmp_path / ".hidden-but-not-ours"
    (tmp_path / ".x.ffstats.safetensors.4194321.data").write_bytes(b"")
    for path in (dead, live, other):
        path.write_bytes(b"")
    assert sorted(p.name for p in sweep_stale(tmp_path)) == sorted([dead.name, ".x.ffstats.safetensors.4194321.data"])
    assert live.exists() and other.exists()


def test_writeback_hands_every_window_to_the_disk_and_the_bytes_stay_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "WRITEBACK_BYTES", 4096)
    calls = []
    real = atomic._SYNC_RANGE
    if real is not None:
        monkeypatch.setattr(
            atomic,
            "_SYNC_RANGE",
            lambda fd, start, size, flags: calls.append((start, size)) or real(fd, start, size, flags),
        )
    data = os.urandom(50_000)
    staged = StagedFile(tmp_path / "out.bin")
    for begin in range(0, len(data), 3000):  # writes that do not line up with the windows
        staged.write(memoryview(data)[begin : begin + 3000])
    staged.commit()
    assert (tmp_path / "out.bin").read_bytes() == data
    if real is not None:
        started = [c for c in calls if c[0] + c[1] <= len(data)]
        assert started and started[0][0] == 0
        # the windows started, in order, cover every byte up to the last full window
        ends = sorted({start + size for start, size in calls})
        assert ends[-1] >= len(data) - 4096 - 3000


def test_a_writer_without_hashing_says_so_when_asked_for_the_hash(tmp_path):
    import torch

    from featurefusion.io.safetensors_stream import PlannedTensor, StreamingSafetensorsWriter

    writer = StreamingSafetensorsWriter(
        tmp_path / "m.safetensors", [PlannedTensor("a", torch.float32, (2,))], None, False
    )
    writer.write("a", torch.ones(2))
    with pytest.raises(RuntimeError, match="without hash_content"):
        writer.sha256()
    writer.abort()
