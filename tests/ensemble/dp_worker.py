"""Run by the data-parallel test under `torchrun --nproc_per_node 2`: a few AFA training steps on the toy world."""

import sys

from ensemble_helpers import load_toy_members

from featurefusion.ensemble.data import ToyWorldData
from featurefusion.ensemble.train import AFATrainConfig, train_aggregators

DP_CONFIG = AFATrainConfig(steps=3, batch_size=8, lr=1e-3, hidden_cap=16)

if __name__ == "__main__":
    train_aggregators(load_toy_members(), ToyWorldData(), sys.argv[1], DP_CONFIG, progress=False)
