"""DMM incremental learning on the built-in world (the DMM paper's Tab. 2, scaled down).

    python benchmarks/dmm_incremental.py [--steps 100] [--batch-size 8] [--images 24] [--out runs/dmm-incremental]

Four teachers (the object specialists) are distilled into a student (#1); all seven specialists from scratch
(#2); then #1 fine-tuned with the three style specialists added, without (#3) and with (#4) the frozen #1
supervising the old styles. Every student is sampled on every task's test prompts with the task prompted in
its teacher's style (same prompts and noise for every row) and scored by the shipped scorer: prompt alignment
(%) per task, and FID in the scorer's feature space. Forgetting shows as #3 losing the object tasks.
Prints markdown tables and writes results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from featurefusion.distill.incremental import add_teachers
from featurefusion.distill.run import distill
from featurefusion.distill.toy_sampling import load_toy_student
from featurefusion.distill.trainer import DistillConfig
from featurefusion.evaluate.report import markdown_table
from featurefusion.evaluate.toy import EvalSettings, Evaluator
from featurefusion.toyworld.demo import SHIPPED
from featurefusion.toyworld.models import load_pipeline
from featurefusion.toyworld.scorer import load_scorer
from featurefusion.toyworld.train import SPECIALIST_TASKS

OLD = [t for t in SPECIALIST_TASKS if t.startswith("objects-")]
NEW = [t for t in SPECIALIST_TASKS if t.startswith("style-")]


def teacher_args(names: list[str]) -> list[str]:
    return [str(SHIPPED / "specialists" / f"{n}.safetensors") for n in names]


def score_student(folder: Path, evaluator: Evaluator) -> dict[str, dict[str, float]]:
    pipe = load_toy_student(folder)
    tasks = [t for t in evaluator.specs if t in pipe.student.names]
    sub = Evaluator(evaluator.scorer, tasks, evaluator.settings)
    pipe.styles = [t for t in tasks for _ in sub.specs[t]]
    result = sub(pipe)
    return {"alignment": result.alignment(), "fid": result.fid()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of each training")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--images", type=int, default=24, help="test images per task")
    parser.add_argument("--out", type=Path, default=Path("runs/dmm-incremental"))
    parser.add_argument("--data", default="toyworld:teachers", help="common data (see docs/distill.md)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    config = DistillConfig(steps=args.steps, batch_size=args.batch_size, lr=2e-4, style_lr=2e-3, warmup=10,
                           schedule="cosine")  # fmt: skip
    settings = EvalSettings(images_per_task=args.images, steps=12, reference_images=128, precision="bf16")
    evaluator = Evaluator(load_scorer(SHIPPED / "scorer.safetensors"), list(SPECIALIST_TASKS), settings)
    seconds, rows = {}, {}
    start = time.perf_counter()
    teachers = {}
    for name in SPECIALIST_TASKS:
        r = evaluator(load_pipeline(SHIPPED / "base", SHIPPED / "specialists" / f"{name}.safetensors"))
        teachers.setdefault("alignment", {})[name] = r.alignment()[name]
        teachers.setdefault("fid", {})[name] = r.fid()[name]
    rows["#0 teachers (each on its own task)"] = teachers

    def train(names):
        return lambda o: distill(SHIPPED / "base", teacher_args(names), o, config, args.data, overwrite=True)

    def add(regularization):
        return lambda o: add_teachers(args.out / "1", teacher_args(NEW), o, config, args.data,
                                      regularization=regularization, overwrite=True)  # fmt: skip

    runs = [
        ("#1 train 4", train(OLD)),
        ("#2 train 7", train(SPECIALIST_TASKS)),
        ("#3 fine-tune 4+3, no regularisation", add(False)),
        ("#4 fine-tune 4+3, regularised", add(True)),
    ]
    for i, (label, run) in enumerate(runs, start=1):
        t0 = time.perf_counter()
        run(args.out / str(i))
        seconds[label] = time.perf_counter() - t0
        rows[label] = score_student(args.out / str(i), evaluator)
        print(f"{label}: trained in {seconds[label]:.0f} s", flush=True)
    tasks = list(SPECIALIST_TASKS)
    alignment = {k: v["alignment"] for k, v in rows.items()}
    fid = {k: v["fid"] for k, v in rows.items()}
    text = [
        f"Command: python benchmarks/dmm_incremental.py --steps {args.steps} --batch-size {args.batch_size} "
        f"--images {args.images} --data {args.data}; {time.perf_counter() - start:.0f} s in all.",
        "",
        "Prompt alignment (%) of each style on its teacher's task (– : style not in the student):",
        "",
        markdown_table(alignment, tasks, bold_best=False, first_header="run"),
        "",
        "FID in the scorer's feature space on each task (lower is better):",
        "",
        markdown_table(fid, tasks, bold_best=False, first_header="run"),
        "",
        "Training seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()),
    ]
    print("\n".join(text))
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "seconds": seconds, "args": vars(args)},
                                                      indent=2, default=str))  # fmt: skip
    (args.out / "results.md").write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
