"""Merge speed and memory on Stable Diffusion 1.x-shaped checkpoints.

    python benchmarks/merge_speed.py [--models 3] [--dir /tmp/ff-bench] [--skip-featurefusion]

Builds SD 1.x single-file checkpoints (random fp16 weights, the real ldm key layout and shapes: UNet, CLIP
text encoder, VAE; ~2.1 GB each), then times in separate processes, each reporting its own peak RSS:
- featurefusion soup (uniform, fp32 maths, fp16 out),
- sd-mecha's n_average on the same files, when sd-mecha is installed (`pip install sd-mecha`),
- featurefusion FeatureFusion, exact mode, next to the time its matrix products need at this machine's
  measured GEMM rate.
Specialists are the base plus small noise, so neurons correlate as in real fine-tunes.
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


def gemm_rate() -> float:
    """fp32 FLOP/s of torch matmul at the sizes FeatureFusion multiplies (best of a few runs)."""
    a, b = torch.randn(1280, 11520), torch.randn(11520, 3840)
    a @ b
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 1280 * 11520 * 3840 / best


def featurefusion_flops(shapes: dict[str, tuple[int, ...]], models: int) -> float:
    """Matrix-product FLOPs of an exact FeatureFusion merge of the UNet: the Gram block W_1 K^T and C K."""
    total = 0.0
    for key, shape in shapes.items():
        if key.startswith("model.diffusion_model.") and key.endswith(".weight") and len(shape) in (2, 4):
            parts = 2 if ".ff.net.0.proj." in key else 1
            n, d = shape[0] // parts, math.prod(shape[1:])
            total += parts * 2 * (2 * n * models * n * d)  # Gram block and C K, each n x Nn x d
    return total


def child(kind: str, paths: list[str], out: str) -> None:
    """Run one merge in this process and print wall time and peak RSS as JSON."""
    import resource

    start = time.perf_counter()
    if kind == "sd-mecha":
        import sd_mecha

        recipe = sd_mecha.n_average(*[sd_mecha.model(p) for p in paths])
        sd_mecha.merge(recipe, output=out, merge_dtype=torch.float32, output_dtype=torch.float16)
    else:
        from featurefusion.merge import operations
        from featurefusion.merge.operations import OutputOptions

        method = "soup" if kind == "soup" else "featurefusion"
        operations.merge([Path(p) for p in paths], Path(out), method, out=OutputOptions(progress=False))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss": peak}))


def measure(kind: str, paths: list[Path], out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--out", str(out), *map(str, paths)]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "FEATUREFUSION_PROGRESS": "0"})
    if result.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ff-bench"))
    parser.add_argument("--skip-featurefusion", action="store_true")
    parser.add_argument("--child")
    parser.add_argument("--out")
    parser.add_argument("paths", nargs="*")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.paths, args.out)
        return

    print(f"command: python benchmarks/merge_speed.py --models {args.models} --dir {args.dir}")
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

    rows = []
    soup = measure("soup", paths, args.dir / "out_soup.safetensors")
    rows.append(("featurefusion soup", soup))
    try:
        import sd_mecha  # noqa: F401

        mecha = measure("sd-mecha", paths, args.dir / "out_mecha.safetensors")
        rows.append(("sd-mecha n_average", mecha))
    except ImportError:
        mecha = None
    if not args.skip_featurefusion:
        ff = measure("featurefusion", paths, args.dir / "out_ff.safetensors")
        rows.append(("featurefusion FeatureFusion (exact)", ff))

    print(f"\n{'merge':<38}{'wall s':>9}{'peak RSS GiB':>14}")
    for name, r in rows:
        print(f"{name:<38}{r['seconds']:>9.1f}{r['peak_rss'] / 2**30:>14.2f}")
    if mecha:
        print(f"\nsoup / sd-mecha wall time: {soup['seconds'] / mecha['seconds']:.2f}x (target <= 0.30x)")
    else:
        print("\nsd-mecha not installed: no comparison (pip install sd-mecha)")
    print(f"soup peak RSS: {soup['peak_rss'] / 2**30:.2f} GiB (target <= 1 GiB)")
    if not args.skip_featurefusion:
        rate = gemm_rate()
        flops = featurefusion_flops(sd15_shapes(), args.models)
        bound = flops / rate
        print(
            f"FeatureFusion: {flops / 1e12:.2f} TFLOP of matrix products at {rate / 1e9:.0f} GFLOP/s = {bound:.1f} s; "
            f"measured {ff['seconds']:.1f} s = {ff['seconds'] / bound:.2f}x (target <= 2x), "
            f"peak RSS {ff['peak_rss'] / 2**30:.2f} GiB (target <= 2 GiB)"
        )


if __name__ == "__main__":
    main()
