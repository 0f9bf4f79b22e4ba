"""FeatureFusion on one SD 1.x-sized layer: where the time goes in exact and sampled mode, sparse and dense.

    python benchmarks/featurefusion_layer.py [--rows 1280] [--cols 11520] [--models 3] [--threshold 0.7]

The layer is random (rows of length 1) with fine-tunes at 5 % noise, as in `merge_speed.py`. Prints, per
mode, sample dtype and algorithm: the feature rows alone (sampled mode: the product K x; exact: the weights
as they are), the statistics (feature rows included), finding the pairs and building W, and how many pairs
passed the threshold (the two algorithms must keep the same number).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from featurefusion.merge.featurefusion_math import FeatureFusionOptions, feature_statistics, merge_layer, resolve_layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1280)
    parser.add_argument("--cols", type=int, default=11520)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=0.7)
    args = parser.parse_args()
    n, d = args.rows, args.cols
    print(f"layer {n} x {d}, {args.models} models, threshold {args.threshold}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    base = torch.randn(n, d) / d**0.5
    stack = torch.cat([base] + [base + 0.05 * torch.randn(n, d) / d**0.5 for _ in range(args.models - 1)])
    runs = [("exact", "float32", alg) for alg in ("sparse", "dense")]
    runs += [("sampled", dtype, alg) for dtype in ("float32", "bfloat16") for alg in ("sparse", "dense")]
    for mode, dtype, algorithm in runs:
        options = replace(FeatureFusionOptions(), mode=mode, algorithm=algorithm, threshold=args.threshold,
                          sample_dtype=dtype)  # fmt: skip
        start = time.perf_counter()
        feature_statistics(stack, options, "layer")
        features = time.perf_counter() - start
        start = time.perf_counter()
        stats, _ = resolve_layer(stack, n, options, "layer")
        statistics = time.perf_counter() - start
        start = time.perf_counter()
        merged = merge_layer(stack, None, n, stats, options)
        build = time.perf_counter() - start
        print(f"{mode:8s} {dtype:9s} {algorithm:6s} feature rows {features:5.2f} s  statistics (with them) "
              f"{statistics:5.2f} s  pairs and W {build:5.2f} s  pairs kept {merged.kept}")  # fmt: skip


if __name__ == "__main__":
    main()
