"""Kill a merge at several points (SIGTERM and SIGKILL) and check that the output, its statistics and the
folder hold nothing new afterwards, and that the next run succeeds (and sweeps what a SIGKILL left).

The merge runs in a subprocess; `FEATUREFUSION_FAULT=POINT:SIGNAL` makes it signal itself at POINT
(`io.atomic.fault_point`): `staged` (outputs opened), `merging` (half the modules written), `publish`
(everything staged, nothing renamed), `published-one` (statistics renamed, model not yet).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import featurefusion
from featurefusion.cli import main
from featurefusion.merge.operations import statistics_path

CHECKPOINTS = Path(featurefusion.__file__).parent / "toyworld" / "checkpoints"
BASE = CHECKPOINTS / "base"
MODELS = [CHECKPOINTS / "specialists" / f"{n}.safetensors" for n in ("objects-round", "style-dark", "style-striped")]


# Each point once with each signal would cost a process start (~2 s of CPU) per case for little more.
FAULTS = ["merging:SIGTERM", "published-one:SIGTERM", "staged:SIGKILL", "publish:SIGKILL"]


def launch(args: list, fault: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "FEATUREFUSION_FAULT": fault, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(featurefusion.__file__).parents[1]), env.get("PYTHONPATH", "")])
    argv = [sys.executable, "-m", "featurefusion.cli", *map(str, args), "--no-progress"]
    return subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def state(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry of the folder (hidden ones too) with its size and modification time."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def visible(entries: dict) -> dict:
    return {name: s for name, s in entries.items() if not name.startswith(".")}


def merge_args(out: Path, threshold: str) -> list[str]:
    return ["merge", *map(str, MODELS), "-o", str(out), "--threshold", threshold, "--no-progress"]


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> dict:
    """Every fault at once (the processes start in parallel; most of their time is Python's start-up).
    Each runs in its own folder that holds an earlier merge and its statistics: what it must not touch."""
    runs = {}
    for fault in [*FAULTS, "published-one:SIGKILL", "folder:SIGKILL", "soup:SIGTERM"]:
        folder = tmp_path_factory.mktemp(fault.replace(":", "-"))
        out = folder / "m.safetensors"
        if fault.startswith("folder"):
            out = folder / "pipeline"
            process = launch(["merge", BASE, MODELS[0], "-o", out], "merging:SIGKILL", folder)
        elif fault.startswith("soup"):  # the engine's fast path for weighted sums (reader and writer threads)
            assert main(["soup", *map(str, MODELS), "-o", str(out), "--no-progress"]) == 0
            process = launch(["soup", *MODELS, "-o", out, "--weights", "1", "2", "3"], "merging:SIGTERM", folder)
        else:
            assert main(merge_args(out, "0.2")) == 0
            process = launch(merge_args(out, "0.5")[:-1], fault, folder)
        runs[fault] = (out, state(folder), process)
    results = {}
    for fault, (out, before, process) in runs.items():
        _, stderr = process.communicate(timeout=300)
        results[fault] = (out, before, process.returncode, stderr)
    return results


@pytest.mark.parametrize("fault", FAULTS)
def test_a_killed_merge_changes_nothing(killed, fault):
    merged, before, returncode, stderr = killed[fault]
    folder = merged.parent
    sig = getattr(signal, fault.split(":")[1])
    if sig == signal.SIGTERM:
        # SIGTERM unwinds like Ctrl-C: staging removed, a publish under way rolled back
        assert returncode == 128 + sig and "terminated; no output was written" in stderr
        assert state(folder) == before
    else:
        # unnamed (O_TMPFILE) staging vanished with the process; named staging (file systems without
        # O_TMPFILE) is hidden, and swept by the next run
        assert returncode == -sig
        assert visible(state(folder)) == visible(before)
    assert main(merge_args(merged, "0.5")) == 0
    assert sorted(state(folder)) == sorted(before)  # nothing stale is left once a run succeeds


def test_statistics_published_alone_are_refused(killed):
    """A SIGKILL between the two renames of a publish can leave new statistics beside the old model; they
    are tied to their merge's options, so `remove` refuses them instead of unmerging wrongly."""
    merged, before, returncode, _ = killed["published-one:SIGKILL"]
    assert returncode == -signal.SIGKILL
    assert state(merged.parent)[merged.name] == before[merged.name]  # the old model
    assert state(merged.parent)[statistics_path(merged).name] != before[statistics_path(merged).name]
    removed = merged.with_name("r.safetensors")
    assert main(["remove", str(merged), "2", "-o", str(removed)]) == 2
    assert not removed.exists()


def test_a_terminated_fast_path_soup_changes_nothing(killed):
    soup, before, returncode, stderr = killed["soup:SIGTERM"]
    assert returncode == 128 + signal.SIGTERM and "terminated; no output was written" in stderr
    assert state(soup.parent) == before


def test_a_killed_folder_merge_is_swept(killed):
    out, before, returncode, _ = killed["folder:SIGKILL"]
    assert returncode == -signal.SIGKILL
    assert not out.exists()  # a staging folder may remain, hidden, until the next run
    assert main(["merge", str(BASE), str(MODELS[0]), "-o", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["pipeline", statistics_path(out).name]
