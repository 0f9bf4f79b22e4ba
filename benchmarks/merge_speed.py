"""Merge speed and memory on Stable Diffusion 1.x-shaped checkpoints.

    python benchmarks/merge_speed.py [--models 3] [--dir /tmp/ff-bench] [--skip-featurefusion]

Builds SD 1.x single-file checkpoints (random fp16 weights, the real ldm key layout and shapes: UNet, CLIP
text encoder, VAE; ~2.1 GB each), then times in separate processes, each reporting its own peak RSS:
- the I/O floor: reading every input once into one reused buffer plus writing one output's bytes as merges
  write them (fsync'd);
- featurefusion soup (uniform, fp32 maths, fp16 out), on the engine's fast path and on the generic path;
- sd-mecha's n_average on the same files, when sd-mecha is installed (`pip install sd-mecha`);
- featurefusion FeatureFusion, exact mode, sparse (the default) and dense (`--skip-dense` to skip).
Specialists are the base plus small noise, so neurons correlate as in real fine-tunes. The machine's load
average is printed next to each run: timings on a busy machine are not comparable with a quiet one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)  # fmt: skip
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)  # fmt: skip
SD15_TEXT = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
)  # fmt: skip


def sd15_shapes() -> dict[str, tuple[int, ...]]:
    """ldm key -> shape of an SD 1.x single file, from diffusers/transformers models built on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from featurefusion.io import sd_keys
    from featurefusion.io.checkpoint import unet_layout_from_diffusers_keys

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    layout = unet_layout_from_diffusers_keys(unet.state_dict().keys(), vae.state_dict().keys())
    shapes = {}
    for component, model in (("unet", unet), ("text_encoder", text), ("vae", vae)):
        for key, value in model.state_dict().items():
            shape = tuple(value.shape)
            if sd_keys.vae_attention_needs_reshape(component, key):
                shape = (*shape, 1, 1)
            shapes[sd_keys.diffusers_to_ldm(component, key, layout)] = shape
    return shapes


def write_models(folder: Path, count: int) -> list[Path]:
    from featurefusion.io.safetensors_stream import PlannedTensor, StreamingSafetensorsWriter

    shapes = sd15_shapes()
    position_ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    paths = [folder / f"sd15_{i}.safetensors" for i in range(count)]
    if all(p.exists() for p in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    planned = [PlannedTensor(k, torch.float16, s) for k, s in shapes.items()]
    planned.append(PlannedTensor(position_ids, torch.int64, (1, 77)))
    writers = [StreamingSafetensorsWriter(p, planned) for p in paths]
    gen = torch.Generator().manual_seed(0)
    for key, shape in shapes.items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        base = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        for i, writer in enumerate(writers):
            noisy = base if i == 0 else base + 0.05 * base.std() * torch.randn(shape, generator=gen)
            writer.write(key, noisy.half())
    for writer in writers:
        writer.write(position_ids, torch.arange(77).unsqueeze(0))
        writer.commit()
    return paths


def io_floor(paths: list[str], out: str, out_bytes: int) -> dict:
    """Read every input once into one reused buffer, and write `out_bytes` once the way merges write
    (`io.atomic.StagedFile`: handed to the disk as written, fsync'd at the end)."""
    from featurefusion.io.atomic import StagedFile

    buffer = bytearray(64 << 20)
    view = memoryview(buffer)
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    read = time.perf_counter() - start
    start = time.perf_counter()
    staged = StagedFile(out)
    left = out_bytes
    while left:
        part = view[: min(left, len(view))]
        staged.write(part)
        left -= len(part)
    staged.stage()  # fsync
    write = time.perf_counter() - start
    staged.abort()
    return {"seconds": read + write, "read": read, "write": write}


def child(kind: str, paths: list[str], out: str) -> None:
    """Run one merge (or the I/O floor) in this process and print wall time, CPU times and peak RSS as JSON."""
    import resource

    start = time.perf_counter()
    extra = {}
    if kind == "io-floor":
        extra = io_floor(paths, out, Path(paths[0]).stat().st_size)
    elif kind == "sd-mecha":
        import sd_mecha

        recipe = sd_mecha.n_average(*[sd_mecha.model(p) for p in paths])
        sd_mecha.merge(recipe, output=out, merge_dtype=torch.float32, output_dtype=torch.float16)
    else:
        from featurefusion.merge import engine, operations
        from featurefusion.merge.operations import OutputOptions

        options = {}
        if kind == "soup-generic":
            engine.plan_items = lambda *a: None  # the module-by-module path, for comparison
        if kind.startswith("featurefusion-"):
            options["algorithm"] = kind.removeprefix("featurefusion-")
        method = "soup" if kind.startswith("soup") else "featurefusion"
        operations.merge(
            [Path(p) for p in paths], Path(out), method, out=OutputOptions(progress=False), save_statistics=False,
            **options,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result = {"seconds": seconds, "user": usage.ru_utime, "system": usage.ru_stime, "peak_rss": usage.ru_maxrss * 1024}
    print(json.dumps({**result, **extra}))


def measure(kind: str, paths: list[Path], out: Path, repeat: int) -> dict:
    """Median wall time of `repeat` runs, each in a fresh process (so peak RSS is its own)."""
    runs = []
    for _ in range(repeat):
        cmd = [sys.executable, __file__, "--child", kind, "--out", str(out), *map(str, paths)]
        env = {**os.environ, "FEATUREFUSION_PROGRESS": "0"}
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"{kind} failed:\n{result.stderr[-3000:]}")
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    runs.sort(key=lambda r: r["seconds"])
    median = dict(runs[len(runs) // 2])
    median["all"] = [r["seconds"] for r in runs]
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ff-bench"))
    parser.add_argument("--repeat", type=int, default=3, help="runs of the I/O floor and the soups (median)")
    parser.add_argument("--skip-featurefusion", action="store_true")
    parser.add_argument("--skip-dense", action="store_true", help="skip FeatureFusion's dense path (slow)")
    parser.add_argument("--child")
    parser.add_argument("--out")
    parser.add_argument("paths", nargs="*")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.paths, args.out)
        return

    flags = " --skip-dense" * args.skip_dense + " --skip-featurefusion" * args.skip_featurefusion
    command = f"python benchmarks/merge_speed.py --models {args.models} --dir {args.dir} --repeat {args.repeat}"
    print(f"command: {command}{flags}")
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    start = time.perf_counter()
    paths = write_models(args.dir, args.models)
    size = sum(p.stat().st_size for p in paths) / 2**30
    print(
        f"inputs: {args.models} SD 1.x fp16 single files, {size:.2f} GiB in all ({time.perf_counter() - start:.0f} s)"
    )

    # Warm the page cache the same way for every contender, so the first one is not penalised.
    for p in paths:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass
    from featurefusion.io.recipe import model_hash

    for p in paths:
        model_hash(p)  # recipes hash their inputs; the hash cache makes that a one-time cost

    def load() -> str:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())

    rows = []
    plan = [("I/O floor: read inputs + write output once", "io-floor", args.repeat)]
    plan += [("featurefusion soup (fast path)", "soup", args.repeat)]
    plan += [("featurefusion soup (generic path)", "soup-generic", 1)]
    try:
        import sd_mecha  # noqa: F401

        plan.append(("sd-mecha n_average", "sd-mecha", args.repeat))
    except ImportError:
        print("sd-mecha not installed: no comparison (pip install sd-mecha)")
    if not args.skip_featurefusion:
        plan.append(("FeatureFusion exact, sparse (default)", "featurefusion-sparse", 1))
        if not args.skip_dense:
            plan.append(("FeatureFusion exact, dense", "featurefusion-dense", 1))
    for name, kind, repeat in plan:
        before = load()
        result = measure(kind, paths, args.dir / f"out_{kind}.safetensors", repeat)
        rows.append((name, kind, result, before))

    floor = rows[0][2]["seconds"]
    print(f"\n{'run':<44}{'wall s':>8}{'user s':>8}{'sys s':>8}{'peak RSS GiB':>14}{'x floor':>9}  load before")
    for name, kind, r, before in rows:
        rss = "" if kind == "io-floor" else f"{r['peak_rss'] / 2**30:.2f}"
        print(
            f"{name:<44}{r['seconds']:>8.1f}{r['user']:>8.1f}{r['system']:>8.1f}{rss:>14}{r['seconds'] / floor:>9.2f}"
            f"  {before}"
        )
    io = rows[0][2]
    print(f"I/O floor: read {io['read']:.1f} s + write {io['write']:.1f} s (median of {args.repeat}: {io['all']})")
    by_kind = {kind: r for _, kind, r, _ in rows}
    soup = by_kind["soup"]
    print(f"soup: {soup['seconds'] / floor:.2f}x the I/O floor (target <= 1.5x), runs {soup['all']}, "
          f"peak RSS {soup['peak_rss'] / 2**30:.2f} GiB (target <= 1 GiB)")  # fmt: skip
    if "sd-mecha" in by_kind:
        print(f"soup / sd-mecha n_average wall time: {soup['seconds'] / by_kind['sd-mecha']['seconds']:.2f}x")
    if "featurefusion-sparse" in by_kind:
        ff = by_kind["featurefusion-sparse"]
        rss = ff["peak_rss"] / 2**30
        print(f"FeatureFusion sparse: {ff['seconds']:.1f} s (target <= 30 s), peak RSS {rss:.2f} GiB (target <= 2 GiB)")
        if "featurefusion-dense" in by_kind:
            print(f"FeatureFusion dense / sparse: {by_kind['featurefusion-dense']['seconds'] / ff['seconds']:.1f}x")
    print(load().replace("load average", "load average after"))


if __name__ == "__main__":
    main()
