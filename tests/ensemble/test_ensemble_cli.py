"""The command line: `featurefusion ensemble train`, `sample --ensemble`, `sample --ensemble-average`."""

from __future__ import annotations

import json

from ensemble_helpers import BASE, SPECIALISTS

from featurefusion.cli import main


def test_train_then_sample_the_afa_ensemble_and_the_routed_average(tmp_path, capsys):
    afa = tmp_path / "afa"
    argv = ["ensemble", "train", str(BASE), *map(str, SPECIALISTS), "-o", str(afa), "--data", "toyworld",
            "--steps", "2", "--batch-size", "8", "--hidden-cap", "16", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "steps 0 -> 2" in capsys.readouterr().out
    config = json.loads((afa / "afa.json").read_text())
    assert [m["path"] for m in config["members"]] == [str(BASE), *map(str, SPECIALISTS)]
    assert all(len(m["sha256"]) == 64 for m in config["members"])
    assert main([*argv, "--resume", "--steps", "3"]) == 0

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle, plain\na blue square, dark\n")
    assert main(["sample", "--ensemble", str(afa), "--prompts", str(prompts), "--out", str(tmp_path / "s1"),
                 "--steps", "2", "--images-per-prompt", "2"]) == 0  # fmt: skip
    assert len(list((tmp_path / "s1").glob("0000*_00*.png"))) == 4
    assert main(["sample", "--ensemble-average", str(BASE), *map(str, SPECIALISTS), "--route",
                 "objects-round=circle,moon;style-dark=dark", "--prompts", str(prompts), "--out",
                 str(tmp_path / "s2"), "--steps", "2"]) == 0  # fmt: skip
    manifest = json.loads((tmp_path / "s2" / "manifest.json").read_text())
    assert manifest["checkpoint"]["route"] == "objects-round=circle,moon;style-dark=dark"
    assert len(manifest["images"]) == 2


def test_sample_errors_are_one_line(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle, plain\n")
    out = ["--prompts", str(prompts), "--out", str(tmp_path / "o")]
    assert main(["sample", *out]) == 2
    assert "give a CHECKPOINT" in capsys.readouterr().err
    assert main(["sample", "--ensemble", str(tmp_path), *out]) == 2
    assert "no afa.json" in capsys.readouterr().err
    assert main(["sample", "--ensemble-average", str(BASE), str(SPECIALISTS[0]), "--route", "nobody=x", *out]) == 2
    assert "none of the models" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_output_average_samples_a_stable_diffusion_pipeline(tiny, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo\na drawing\n")
    out = tmp_path / "sd"
    argv = ["sample", "--ensemble-average", str(tiny.pipeline), *map(str, tiny.specialists), "--route",
            "1=photo", "--prompts", str(prompts), "--out", str(out), "--steps", "2", "--height", "16",
            "--width", "16", "--no-progress", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert len(list(out.glob("*.png"))) == 3  # two images and the grid


def test_afa_on_a_stable_diffusion_pipeline_trains_on_a_captioned_folder_and_samples(tiny, tmp_path):
    from conftest import write_captioned_folder

    data = write_captioned_folder(tmp_path / "data", ["a photo", "a drawing", "a cat", "a dog"])
    afa = tmp_path / "afa"
    assert main(["ensemble", "train", str(tiny.pipeline), *map(str, tiny.specialists), "-o", str(afa), "--data",
                 str(data), "--resolution", "16", "--steps", "2", "--batch-size", "2", "--hidden-cap", "16",
                 "--no-progress"]) == 0  # fmt: skip
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo\n")
    argv = ["sample", "--ensemble", str(afa), "--prompts", str(prompts), "--out", str(tmp_path / "sd"), "--steps",
            "2", "--height", "16", "--width", "16", "--no-progress", "--device", "cpu",
            "--scheduler", "ddim"]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "sd" / "00000_000.png").is_file()
