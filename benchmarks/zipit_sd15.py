"""ZipIt! time and memory on Stable Diffusion 1.x-shaped U-Nets (the real SD 1.5 config, random weights).

    python benchmarks/zipit_sd15.py [--models 2] [--size 32] [--batch 2] [--budget 0.125] [--repeat 0.3] [--depth N]

Builds a base U-Net and specialists that are the base plus small seeded noise (as fine-tunes of one base are),
all in float32 and in memory (ZipIt! needs the whole models), random latents of `size` x `size`, timesteps and
77-token text embeddings, then times each phase: describing the U-Net, recording features (forward passes with
hooks and the joint covariances), greedy matching, and building the merged weights. Prints the process's peak
RSS after each phase, and how the matching paired features (for fine-tunes: same index with same index).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch
from merge_speed import SD15_UNET


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def main() -> None:
    from diffusers import UNet2DConditionModel

    from featurefusion.merge.zipit import (
        ZipItInputs,
        ZipItOptions,
        apply_plan,
        collect_statistics,
        describe_models,
        match_spaces,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=2)
    parser.add_argument("--size", type=int, default=32, help="latent height and width (SD 1.5 at 512 px: 64)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--noise", type=float, default=0.05, help="specialists: base + noise * std * N(0, 1)")
    parser.add_argument("--budget", type=float, default=0.125)
    parser.add_argument("--repeat", type=float, default=0.3)
    parser.add_argument("--depth", type=int, default=None)
    args = parser.parse_args()
    options = ZipItOptions(budget=args.budget, repeat=args.repeat, depth=args.depth)
    print("command: python", " ".join(sys.argv), f"(torch threads: {torch.get_num_threads()})")

    start = time.perf_counter()
    torch.manual_seed(0)
    base = UNet2DConditionModel(**SD15_UNET).eval()
    unets = [base]
    gen = torch.Generator().manual_seed(1)
    for _ in range(args.models - 1):
        specialist = UNet2DConditionModel(**SD15_UNET).eval()
        with torch.no_grad():
            for target, source in zip(specialist.state_dict().values(), base.state_dict().values(), strict=True):
                noise = torch.randn(source.shape, generator=gen)
                target.copy_(source + args.noise * source.std() * noise if source.numel() > 1 else source)
        unets.append(specialist)
    params = sum(p.numel() for p in base.parameters())
    print(
        f"built {args.models} U-Nets of {params / 1e6:.0f}M parameters: {time.perf_counter() - start:.1f} s, "
        f"peak RSS {peak_gib():.1f} GiB"
    )

    inputs = ZipItInputs(
        sample=torch.randn(args.batch, 4, args.size, args.size, generator=gen),
        timesteps=torch.randint(0, 1000, (args.batch,), generator=gen),
        encoder_hidden_states=torch.randn(args.batch, 77, 768, generator=gen),
    )
    phases = {}
    t = time.perf_counter()
    graph = describe_models(unets, options)
    phases["describe"] = time.perf_counter() - t
    matched = graph.matched_spaces(options.depth)
    widest = max(s.size for s in matched) if matched else 0
    print(
        f"{len(graph.spaces)} spaces, {len(matched)} matched (widest {widest} channels per model), "
        f"{len(graph.rules)} parameters, {len(graph.observations)} observation points"
    )

    t = time.perf_counter()
    stats = collect_statistics(unets, graph, inputs, {s.name for s in matched})
    phases["features"] = time.perf_counter() - t
    print(f"features: {phases['features']:.1f} s, peak RSS {peak_gib():.1f} GiB")
    t = time.perf_counter()
    plan = match_spaces(graph, stats, len(unets), options, release=True)
    phases["matching"] = time.perf_counter() - t
    print(f"matching: {phases['matching']:.1f} s, peak RSS {peak_gib():.1f} GiB")
    t = time.perf_counter()
    merged = apply_plan(plan, [u.state_dict() for u in unets])
    phases["weights"] = time.perf_counter() - t
    print(f"weights: {phases['weights']:.1f} s, peak RSS {peak_gib():.1f} GiB")

    base.load_state_dict(merged)  # the merged model is a U-Net of the same config
    with torch.no_grad():
        out = base(inputs.sample, inputs.timesteps, inputs.encoder_hidden_states).sample
    summary = plan.summary()
    print(
        f"total {sum(phases.values()):.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in phases.items())}); "
        f"peak RSS {peak_gib():.1f} GiB; merged output finite: {bool(torch.isfinite(out).all())}"
    )
    print(
        f"merged features: {summary['merged_features']}, joining several models {summary['cross_model']:.1%}, "
        f"joining features of one model {summary['within_model']:.1%}; of the cross-model ones, "
        f"same index in every model {summary['same_index']:.1%}"
    )


if __name__ == "__main__":
    main()
