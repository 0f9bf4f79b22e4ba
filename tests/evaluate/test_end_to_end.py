"""The Stable Diffusion workflow end to end on the tiny pipeline, through the command line: shard a captioned
folder, fine-tune two specialists, merge them, score every model on every task, and greedy-soup them."""

from __future__ import annotations

import json
import math
from pathlib import Path

from featurefusion.cli import main
from featurefusion.io.checkpoint import open_checkpoint
from featurefusion.io.recipe import recipe_of

from conftest import write_captioned_folder

SAMPLER = ["--scheduler", "ddim", "--steps", "2", "--guidance-scale", "2", "--device", "cpu", "--no-progress"]
CAPTIONS = [
    "a red circle",
    "a blue circle",
    "a striped circle",
    "a photo of a circle",
    "a red square",
    "a blue square",
    "a striped square",
    "a photo of a square",
]


def test_shard_finetune_merge_evaluate_and_greedy_soup(tiny, tiny_clip, tmp_path, capsys):
    source = write_captioned_folder(tmp_path / "captioned", CAPTIONS, size=(20, 20))
    categories = tmp_path / "categories.yaml"
    categories.write_text("circles: [circle]\nsquares: [square]\n")
    shards = tmp_path / "shards"
    assert main(["shard", "--folder", str(source), "-o", str(shards), "--categories", str(categories),
                 "-k", "4", "--test-fraction", "0.25", "--no-progress"]) == 0  # fmt: skip

    specialists = {}
    for name in ("circles", "squares"):
        out = tmp_path / f"unet-{name}"
        assert main(["finetune", "--model", str(tiny.pipeline), "--data", str(shards / name / "train"), "-o",
                     str(out), "--resolution", "16", "--max-steps", "2", "--checkpoint-every", "0", "--lr", "1e-3",
                     "--warmup-steps", "0", "--no-progress"]) == 0  # fmt: skip
        specialists[name] = out
    models = [tiny.pipeline, specialists["circles"], specialists["squares"]]

    merged = tmp_path / "merged.safetensors"
    assert main(["merge", *map(str, models), "-o", str(merged), "--format", "diffusers-unet", "--no-progress"]) == 0

    # Tasks: the test split of each shard, as prompt lists.
    tasks = {}
    for name in ("circles", "squares"):
        rows = (shards / name / "test" / "metadata.jsonl").read_text().splitlines()
        tasks[name] = {"prompts": [json.loads(row)["text"] for row in rows]}
    tasks_file = tmp_path / "tasks.json"
    tasks_file.write_text(json.dumps(tasks))
    matrix_dir = tmp_path / "matrix"
    named = [f"base={tiny.pipeline}", *(f"{n}={p}" for n, p in specialists.items()), f"featurefusion={merged}"]
    clip = ["--clip-model", str(tiny_clip)]
    argv = ["evaluate", "--models", *named, "--tasks", str(tasks_file), "--metrics", "clip", *clip]
    assert main([*argv, "--template", str(tiny.pipeline), "--out", str(matrix_dir), *SAMPLER]) == 0
    matrix = json.loads((matrix_dir / "matrix.json").read_text())
    text = json.dumps(matrix)
    for model in ("base", "circles", "squares", "featurefusion"):
        assert f'"{model}"' in text
    assert (matrix_dir / "matrix.md").is_file() and list(matrix_dir.glob("heatmap-*.png"))

    held_out = tmp_path / "held-out.txt"
    held_out.write_text("a red circle\na blue square\n")
    greedy = tmp_path / "greedy.safetensors"
    capsys.readouterr()
    argv = ["soup", *map(str, models), "-o", str(greedy), "--format", "diffusers-unet", "--greedy"]
    assert main([*argv, "--prompts", str(held_out), "--metric", "clip", *clip, *SAMPLER]) == 0
    printed = capsys.readouterr().out
    assert "chosen:" in printed and "start" in printed
    scores = [float(line.split()[-1]) for line in printed.splitlines() if "clip" in line.split()[-2:-1]]
    assert scores and all(math.isfinite(s) for s in scores)
    with open_checkpoint(greedy) as ckpt:
        recipe = recipe_of(ckpt.metadata, greedy)
    members = {m["path"] for m in recipe.options.get("members", [])} or {r.path for r in recipe.models}
    # recipe paths are relative to the merged file
    assert {(greedy.parent / p).resolve() for p in members} <= {Path(m).resolve() for m in models}
    assert not list(tmp_path.glob(".*candidate*"))

    # `featurefusion search`: a small grid scored by CLIP on the tasks' prompts; the winner is written.
    best = tmp_path / "best.safetensors"
    capsys.readouterr()
    argv = ["search", *map(str, models), "-o", str(best), "--format", "diffusers-unet", "--tasks", str(tasks_file),
            "--methods", "task-arithmetic,ties", "--metric", "clip", *clip, *SAMPLER]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    table = (tmp_path / "best.safetensors.search.md").read_text()
    assert "task-arithmetic scale=0.2" in table and "ties density=0.5 scale=1.5" in table and "(chosen)" in table
    with open_checkpoint(best) as ckpt:
        recipe = recipe_of(ckpt.metadata, best)
    assert f"chosen: {recipe.method}" in printed
    assert not list(tmp_path.glob(".*candidate*"))
