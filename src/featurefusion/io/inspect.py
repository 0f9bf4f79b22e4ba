"""`featurefusion inspect`: what a checkpoint is, in a few lines."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from featurefusion.io.checkpoint import Checkpoint, open_checkpoint
from featurefusion.io.recipe import METADATA_KEY, recipe_of

# Width of the text features the UNet attends to: the surest sign of the model family.
FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


def guess_family(checkpoint: Checkpoint) -> str:
    for key in checkpoint.keys("unet"):
        if key.endswith("attn2.to_k.weight"):
            width = checkpoint.ref(key).shape[1]
            family = FAMILIES.get(width, f"custom (cross-attention width {width})")
            if any(k.startswith("unet.add_embedding.") for k in checkpoint.keys("unet")) and width != 2048:
                family += ", with added conditioning"
            return family
    return "unknown (no cross-attention found)"


def describe(path: str | Path) -> dict:
    with open_checkpoint(path) as ckpt:
        components = {}
        for component in ckpt.components:
            refs = [ckpt.ref(k) for k in ckpt.keys(component)]
            dtypes = Counter(str(r.dtype).removeprefix("torch.") for r in refs)
            components[component] = {
                "tensors": len(refs),
                "parameters": sum(math.prod(r.shape) for r in refs),
                "dtypes": dict(dtypes.most_common()),
            }
        info = {
            "path": str(ckpt.path),
            "layout": ckpt.layout,
            "family": guess_family(ckpt),
            "unet_layout": vars(ckpt.unet_layout) if ckpt.unet_layout else None,
            "components": components,
            "metadata_keys": sorted(ckpt.metadata),
        }
        if METADATA_KEY in ckpt.metadata:
            recipe = recipe_of(ckpt.metadata, ckpt.path)
            info["recipe"] = {
                "operation": recipe.operation,
                "method": recipe.method,
                "models": [m.path for m in recipe.models],
            }
        return info


def format_description(info: dict) -> str:
    lines = [
        f"{info['path']}",
        f"  layout:  {info['layout']}",
        f"  family:  {info['family']}",
    ]
    for name, c in info["components"].items():
        dtypes = ", ".join(f"{d} x{n}" for d, n in c["dtypes"].items())
        lines.append(f"  {name:<13} {c['tensors']:>5} tensors  {c['parameters'] / 1e6:>9.2f} M parameters  ({dtypes})")
    if "recipe" in info:
        r = info["recipe"]
        lines.append(f"  recipe:  {r['operation']} with {r['method']} of {', '.join(r['models'])}")
    return "\n".join(lines)
