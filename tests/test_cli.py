import json

from featurefusion.cli import main


def test_inspect_text_and_json(tiny, capsys):
    assert main(["inspect", str(tiny.base)]) == 0
    text = capsys.readouterr().out
    assert "layout:  ldm" in text and "unet" in text and "text_encoder" in text
    assert main(["inspect", str(tiny.pipeline), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "diffusers" and info["components"]["unet"]["tensors"] > 100


def test_merge_remove_and_replay_from_the_command_line(tiny, tmp_path, capsys):
    merged, removed, replayed = (tmp_path / f"{n}.safetensors" for n in ("m", "r", "again"))
    argv = ["merge", *map(str, tiny.models), "-o", str(merged), "--threshold", "0.5", "--dtype", "fp16"]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "m.ffstats").is_file()

    assert main(["recipe", str(merged)]) == 0
    recipe_yaml = capsys.readouterr().out
    assert "threshold: 0.5" in recipe_yaml and "featurefusion" in recipe_yaml
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(recipe_yaml)
    assert main(["merge", "--recipe", str(recipe_file), "-o", str(replayed)]) == 0
    assert replayed.read_bytes() == merged.read_bytes()

    assert main(["remove", str(merged), str(tiny.specialists[0]), "-o", str(removed)]) == 0
    assert removed.is_file()


def test_soup_add_and_convert(tiny, tmp_path):
    soup, added, unet_file = tmp_path / "s.safetensors", tmp_path / "a.safetensors", tmp_path / "u.safetensors"
    assert main(["soup", str(tiny.base), str(tiny.specialists[0]), "-o", str(soup)]) == 0
    assert main(["add", str(soup), str(tiny.specialists[1]), "-o", str(added)]) == 0
    assert main(["convert", str(added), "--format", "diffusers-unet", "-o", str(unet_file)]) == 0
    assert main(["inspect", str(unet_file)]) == 0


def test_errors_are_one_line_with_exit_code_2(tiny, tmp_path, capsys):
    missing = tmp_path / "missing.safetensors"
    assert main(["merge", str(tiny.base), str(missing), "-o", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("featurefusion: error:") and str(missing) in err and len(err.strip().splitlines()) == 1
    assert main(["merge", str(tiny.base), "-o", str(tmp_path / "o.safetensors")]) == 2
    assert "at least two models" in capsys.readouterr().err
