"""Compare merges of a built-in-world model set: base, specialists, soup, FeatureFusion, task arithmetic.

    python benchmarks/compare_merges.py [CHECKPOINTS]

CHECKPOINTS is a folder as `featurefusion toyworld train --out` writes it (base/ and specialists/); default:
the shipped models. To see what training specialists on their shard alone does (the paper's setting):

    featurefusion toyworld train --out /tmp/pure --specialist-replay 0
    python benchmarks/compare_merges.py /tmp/pure

Every model is sampled on the same 48 test prompts per task with the same noise (DDIM 12 steps) and scored by
the shipped scorer; the table gives prompt alignment (%).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from featurefusion.evaluate.toy import EvalSettings, Evaluator
from featurefusion.merge import operations
from featurefusion.merge.operations import OutputOptions
from featurefusion.toyworld.demo import SHIPPED
from featurefusion.toyworld.models import load_pipeline
from featurefusion.toyworld.scorer import load_scorer
from featurefusion.toyworld.train import SPECIALIST_TASKS

SETTINGS = EvalSettings(images_per_task=48, steps=12, seed=5)
SCALES = (0.2, 0.3, 0.5)


def main(checkpoints: Path) -> None:
    torch.set_num_threads(1)
    tasks = list(SPECIALIST_TASKS)
    inputs = [checkpoints / "base", *(checkpoints / "specialists" / f"{n}.safetensors" for n in tasks)]
    scorer = load_scorer(SHIPPED / "scorer.safetensors")
    evaluator = Evaluator(scorer, tasks, SETTINGS)
    out = OutputOptions(format="diffusers-unet", dtype="fp32", progress=False)

    def row(name: str, values: list[float]) -> None:
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + f" | {sum(values) / len(values):.1f} |")

    def score(name: str, unet: Path | None) -> None:
        result = evaluator(load_pipeline(checkpoints / "base", unet), with_fid=False).alignment()
        row(name, [result[t] for t in tasks])

    print(f"models: {checkpoints}\n")
    print("| model | " + " | ".join(tasks) + " | mean |")
    print("|---|" + "---:|" * (len(tasks) + 1))
    score("base", None)
    own = []
    for name, path in zip(tasks, inputs[1:], strict=True):
        single = Evaluator(scorer, [name], SETTINGS)
        own.append(single(load_pipeline(checkpoints / "base", path), with_fid=False).alignment()[name])
    row("each specialist on its own task", own)
    with tempfile.TemporaryDirectory() as work:
        merged = Path(work) / "merged.safetensors"
        operations.merge(inputs, merged, "soup", out=out)
        score("soup (uniform)", merged)
        operations.merge(inputs, merged, out=out, save_statistics=False)
        score("FeatureFusion (defaults)", merged)
        for scale in SCALES:
            operations.merge(inputs, merged, "task-arithmetic", scale=scale, out=out)
            score(f"task arithmetic {scale:g}", merged)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else SHIPPED)
