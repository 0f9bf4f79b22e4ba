"""The CLI: distill, --add, sample --style, export; bad input leaves nothing behind."""

import json

import pytest
import torch
from distill_fixtures import *  # noqa: F403 (the fixtures backbone, teachers)
from safetensors.torch import load_file

from featurefusion.cli import main
from featurefusion.toyworld.demo import SHIPPED

BASE = SHIPPED / "base"

FAST = ["--steps", "2", "--batch-size", "2", "--no-progress"]


@pytest.fixture(scope="module")
def student(teachers, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "student"
    assert main(["distill", str(BASE), f"a={teachers[0]}", f"b={teachers[1]}", "-o", str(out), *FAST]) == 0
    return out


def test_distill_writes_a_student(student, capsys):
    meta = json.loads((student / "student.json").read_text())
    assert meta["styles"] == ["a", "b"] and meta["training"]["steps"] == 2
    assert (student / "model_index.json").is_file()


def test_add_teachers(student, teachers, tmp_path):
    out = tmp_path / "more"
    assert main(["distill", "--add", f"c={teachers[2]}", "--from", str(student), "-o", str(out), *FAST,
                 "--no-regularization"]) == 0  # fmt: skip
    meta = json.loads((out / "student.json").read_text())
    assert meta["styles"] == ["a", "b", "c"]
    # every teacher, old and new, is recorded as seen from the new student's folder
    assert [(out / t["from_folder"]).resolve() for t in meta["teachers"]] == [p.resolve() for p in teachers]


def test_sample_with_a_style_and_a_mix(student, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle , plain\na blue square , dark\n")
    for style in ("a", "a=0.5,b=0.5"):
        out = tmp_path / f"samples-{style}"
        assert main(["sample", str(student), "--style", style, "--prompts", str(prompts), "--out", str(out),
                     "--steps", "2", "--no-progress"]) == 0  # fmt: skip
        assert len(list(out.glob("0*.png"))) == 2 and (out / "manifest.json").is_file()


def test_export_folds_the_style(student, tmp_path):
    from featurefusion.distill.store import load_student
    from featurefusion.distill.student import fold_style

    out = tmp_path / "style-b.safetensors"
    assert main(["distill", "export", str(student), "--style", "b", "-o", str(out), "--no-progress"]) == 0
    state = load_file(out)
    loaded, _ = load_student(student)
    expected = fold_style(loaded, "b").time_embedding.linear_2.bias
    assert torch.allclose(state["time_embedding.linear_2.bias"].float(), expected, atol=1e-6)


def test_bad_inputs_are_one_line_errors_and_write_nothing(student, teachers, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from featurefusion.toyworld.train import save_unet_file

    other = tmp_path / "other-arch.safetensors"  # another UNet: fewer blocks, other widths
    arch = dict(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        norm_num_groups=16,
    )
    save_unet_file(UNet2DConditionModel(**arch), other, dtype=torch.float32)
    out = tmp_path / "never"
    assert main(["distill", str(BASE), str(teachers[0]), str(other), "-o", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "not the base's architecture" in err and "other-arch.safetensors" in err
    assert not out.exists() and not list(tmp_path.glob(".never*"))

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["distill", str(BASE), str(teachers[0]), "-o", str(out), "--data", str(empty), *FAST]) == 2
    assert "no images" in capsys.readouterr().err and not out.exists()

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle , plain\n")
    assert main(["sample", str(student), "--style", "zzz", "--prompts", str(prompts), "--out",
                 str(tmp_path / "s")]) == 2  # fmt: skip
    assert "unknown style 'zzz'" in capsys.readouterr().err and not (tmp_path / "s").exists()
    assert main(["distill", "export", str(student), "--style", "zzz", "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "unknown style" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()


def test_fidt_of_a_student_against_its_teachers(student, teachers, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle , plain\na blue square , dark\n")
    report = tmp_path / "fidt.json"
    args = ["distill", "fidt", str(student), "--prompts", str(prompts), "--images-per-prompt", "2",
            "--sample-steps", "2", "-o", str(report)]  # fmt: skip
    assert main(args) == 0
    result = json.loads(report.read_text())
    assert result["styles"] == ["a", "b"] and result["settings"]["images"] == 4
    assert len(result["matrix"]) == 2 and all(len(row) == 2 for row in result["matrix"])
    assert result["fidt"] == pytest.approx(result["matrix"][0][0] + result["matrix"][1][1])
    assert result["reference_fidt"] == pytest.approx(result["reference"][0][0] + result["reference"][1][1])
    assert "FIDt" in capsys.readouterr().out

    # a teacher changed since training: refused, by name, and nothing written
    changed = tmp_path / "changed.safetensors"
    changed.write_bytes(teachers[1].read_bytes())
    meta = json.loads((student / "student.json").read_text())
    moved = tmp_path / "moved"
    import shutil

    shutil.copytree(student, moved)
    meta["teachers"][1]["path"] = str(changed)
    meta["teachers"][1]["sha256"] = "0" * 64
    (moved / "student.json").write_text(json.dumps(meta))
    assert main([*args[:2], str(moved), *args[3:-1], str(tmp_path / "x.json")]) == 2
    assert "SHA-256 differs" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def test_teachers_are_found_from_the_student_folder(student, teachers, tmp_path):
    """A student shipped beside its teachers finds them there, wherever it was trained."""
    import shutil

    from featurefusion.distill.fidt import teacher_paths
    from featurefusion.distill.store import read_meta

    meta = read_meta(student)
    assert [(student / t["from_folder"]).resolve() for t in meta["teachers"]] == [p.resolve() for p in teachers[:2]]

    shipped = tmp_path / "ship"
    shutil.copytree(student, shipped / "student")
    (shipped / "teachers").mkdir()
    for record, path in zip(meta["teachers"], teachers[:2], strict=True):
        shutil.copy(path, shipped / "teachers" / path.name)
        record["path"] = str(tmp_path / "gone" / path.name)  # where it was trained: no longer there
        record["from_folder"] = f"../teachers/{path.name}"
    found = teacher_paths(shipped / "student", meta)
    assert [p for _, p in found] == [shipped / "student" / ".." / "teachers" / p.name for p in teachers[:2]]

    del meta["teachers"][0]["from_folder"]  # neither where it was trained nor beside the student
    with pytest.raises(Exception, match="not found at its recorded path"):
        teacher_paths(shipped / "student", meta)
