"""FeatureFusion's threshold on a set of built-in-world specialists: every fixed threshold, `auto`, and the soup.

    python benchmarks/threshold_sweep.py --out runs/sweep-builtin.json [--checkpoints DIR]
        [--prompts validation|test] [--thresholds auto,0.5,0.55,0.6,0.65,0.7,0.8,0.9]
        [--task-vector-scale K]

Each merge is sampled and scored as the demo does (`--prompts validation`: the demo's validation prompts,
10 per task, train split, seed 1; `test`: its 48 test prompts per task). `--checkpoints` is a folder laid out
like the package's (`base/`, `scorer.safetensors`, `specialists/*.safetensors`), e.g. the shard-only
specialists `featurefusion toyworld train --specialist-replay 0 --out DIR` writes. `--task-vector-scale K`
merges base + K (specialist - base) instead of the specialists: fine-tunes that moved K times further.
Results are kept in `--out` (JSON) and a rerun skips what is there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from featurefusion.evaluate.toy import Evaluator
from featurefusion.io.checkpoint import open_checkpoint
from featurefusion.merge import operations
from featurefusion.merge.featurefusion_math import FeatureFusionOptions
from featurefusion.merge.operations import OutputOptions
from featurefusion.toyworld.demo import SHIPPED, DemoConfig, DemoState
from featurefusion.toyworld.scorer import load_scorer
from featurefusion.toyworld.train import SPECIALIST_TASKS


def scaled_specialists(checkpoints: Path, names: list[str], scale: float, folder: Path) -> Path:
    """A checkpoints folder whose specialists are base + scale (specialist - base); base and scorer linked."""
    from safetensors.torch import load_file, save_file

    (folder / "specialists").mkdir(parents=True, exist_ok=True)
    for name in ("base", "scorer.safetensors"):
        if not (folder / name).exists():
            (folder / name).symlink_to((checkpoints / name).resolve())
    base = load_file(checkpoints / "base" / "unet" / "diffusion_pytorch_model.safetensors")
    for name in names:
        target = folder / "specialists" / f"{name}.safetensors"
        if not target.exists():
            tuned = load_file(checkpoints / "specialists" / f"{name}.safetensors")
            moved = {
                k: (base[k].float() + scale * (v.float() - base[k].float())).contiguous() for k, v in tuned.items()
            }
            save_file(moved, target)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="results (JSON); merges are written beside it")
    parser.add_argument("--checkpoints", type=Path, default=SHIPPED)
    parser.add_argument("--specialists", help="comma-separated (default: every .safetensors in specialists/)")
    parser.add_argument("--prompts", choices=("validation", "test"), default="validation")
    parser.add_argument("--thresholds", default="auto,0.5,0.55,0.6,0.65,0.7,0.8,0.9")
    parser.add_argument("--task-vector-scale", type=float)
    args = parser.parse_args()

    checkpoints = args.checkpoints
    if args.specialists:
        names = args.specialists.split(",")
    else:  # the demo's order where the names are the built-in tasks: the evaluator's prompts follow the order
        found = {p.stem for p in (checkpoints / "specialists").glob("*.safetensors")}
        names = [n for n in SPECIALIST_TASKS if n in found] + sorted(found - set(SPECIALIST_TASKS))
    if args.task_vector_scale is not None:
        folder = args.out.with_name(f"{args.out.stem}-checkpoints")
        checkpoints = scaled_specialists(checkpoints, names, args.task_vector_scale, folder)
    config = DemoConfig(checkpoints=checkpoints, specialists=tuple(names), progress=False)
    scorer = load_scorer(checkpoints / "scorer.safetensors")
    settings = config.validation if args.prompts == "validation" else config.evaluation
    state = DemoState(config, Evaluator(scorer, list(names), settings))
    merged = args.out.with_name(f"{args.out.stem}-merge.safetensors")
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    print(f"{len(names)} specialists from {checkpoints}; {args.prompts} prompts ({settings.images_per_task} per task)")

    def record(label: str, method: str, **options) -> None:
        if label in results:
            print(label, results[label], "(kept)")
            return
        start = time.perf_counter()
        # As the demo merges: UNet-only float32 files, the text encoder being the base's.
        out = OutputOptions(format="diffusers-unet", dtype="fp32", progress=False, overwrite=True)
        operations.merge(state.inputs, merged, method, out=out, save_statistics=False, **options)
        entry = {"score": state.score(merged, with_fid=False).mean_alignment(), "seconds": time.perf_counter() - start}
        if label == "auto":
            with open_checkpoint(merged) as ckpt:
                chosen = list(json.loads(ckpt.metadata["featurefusion.recipe"])["options"]["thresholds"].values())
            entry |= {"median": statistics.median(chosen), "min": min(chosen), "max": max(chosen),
                      "layers": len(chosen)}  # fmt: skip
        results[label] = entry
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        print(label, entry, flush=True)

    for text in args.thresholds.split(","):
        threshold = text if text == "auto" else float(text)
        record(text, "featurefusion", options=replace(FeatureFusionOptions(), threshold=threshold))
    record("soup", "soup")
    merged.unlink(missing_ok=True)
    fixed = {k: v["score"] for k, v in results.items() if k not in ("auto", "soup")}
    if fixed and "auto" in results:
        best = max(fixed, key=fixed.get)
        gap = results["auto"]["score"] - fixed[best]
        print(f"auto {results['auto']['score']:.1f} against the best fixed threshold ({best}: {fixed[best]:.1f}): "
              f"{gap:+.1f} points; soup {results['soup']['score']:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
