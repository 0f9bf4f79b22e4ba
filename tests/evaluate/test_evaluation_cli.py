import json

from featurefusion.cli import main

SAMPLER = ["--scheduler", "ddim", "--steps", "2", "--guidance-scale", "2", "--device", "cpu", "--no-progress"]


def test_sample_command_writes_images_manifest_and_grid(tiny, tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["a red circle", "a blue square"]))
    out = tmp_path / "samples"
    argv = ["sample", str(tiny.base), "--template", str(tiny.pipeline), "--prompts", str(prompts), "--out", str(out)]
    assert main([*argv, *SAMPLER, "--images-per-prompt", "3", "--seed", "7"]) == 0
    printed = capsys.readouterr().out
    assert f"manifest: {out / 'manifest.json'}" in printed and "wrote 6 images" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["seed"] == 7 and len(manifest["images"]) == 6
    assert (out / "grid.png").is_file() and (out / "00001_002.png").is_file()


def test_evaluate_command_writes_the_matrix(tiny, tmp_path, tiny_clip, capsys):
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("- {name: shapes, prompts: [a red circle, a blue square]}\n")
    out = tmp_path / "eval"
    models = [f"base={tiny.pipeline}", str(tiny.specialists[1])]
    argv = ["evaluate", "--models", *models, "--tasks", str(tasks), "--metrics", "clip", "--clip-model", str(tiny_clip)]
    assert main([*argv, "--out", str(out), "--template", str(tiny.pipeline), *SAMPLER]) == 0
    printed = capsys.readouterr().out
    assert f"matrix: {out / 'matrix.json'}" in printed and "heatmap (clip)" in printed
    values = json.loads((out / "matrix.json").read_text())["values"]["clip"]
    assert set(values) == {"base", "specialist2"}


def test_cli_errors_are_one_line(tiny, tmp_path, capsys):
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("- {name: t, prompts: [a red circle]}\n")
    argv = ["evaluate", "--models", str(tiny.pipeline), "--tasks", str(tasks), "--out", str(tmp_path / "o")]
    assert main([*argv, "--metrics", "clip,tifa", *SAMPLER]) == 2
    err = capsys.readouterr().err
    assert err.startswith("featurefusion: error: TIFA is not available") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing was sampled

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    assert main(["sample", str(tiny.base), "--prompts", str(prompts), "--out", str(tmp_path / "s"), *SAMPLER]) == 2
    assert "--template" in capsys.readouterr().err
