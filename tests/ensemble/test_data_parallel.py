"""Two CPU processes (gloo) train the same aggregators as one process on the same batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from dp_worker import DP_CONFIG
from ensemble_helpers import load_toy_members

from featurefusion.ensemble.data import ToyWorldData
from featurefusion.ensemble.io import load_aggregators, read_config
from featurefusion.ensemble.train import train_aggregators

HERE = Path(__file__).parent


def test_two_gloo_processes_match_one_process(tmp_path):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(HERE / "dp_worker.py"), str(tmp_path / "two")]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_config(tmp_path / "two")["training"]["processes"] == 2

    train_aggregators(load_toy_members(), ToyWorldData(), tmp_path / "one", DP_CONFIG, progress=False)
    one, two = load_aggregators(tmp_path / "one"), load_aggregators(tmp_path / "two")
    moved = 0
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
        moved += int(name.endswith("to_logits.weight") and a.abs().max() > 0)
    assert moved == len(one.blocks)  # training really changed every aggregator
