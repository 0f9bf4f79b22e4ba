import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from featurefusion.errors import CheckpointError, FeatureFusionError
from featurefusion.evaluate.sampling import (
    SamplerSettings,
    image_seed,
    load_pipeline,
    load_weights_into,
    read_prompts,
    sample,
    set_scheduler,
)
from featurefusion.io.recipe import model_hash

PROMPTS = ["a red circle", "a blue square"]
FAST = SamplerSettings(scheduler="ddim", steps=2, guidance_scale=2.0, batch_size=2, images_per_prompt=2, device="cpu")


def pixels(result) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in result.image_paths()]


def same_images(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b), strict=True))


def test_every_layout_gives_the_same_images_for_the_same_weights(tiny, tmp_path):
    folder = sample(tiny.pipeline, PROMPTS, tmp_path / "folder", FAST)
    ldm = sample(tiny.base, PROMPTS, tmp_path / "ldm", FAST, template=tiny.pipeline)
    unet = sample(tiny.unet_file, PROMPTS, tmp_path / "unet", FAST, template=tiny.pipeline)
    assert len(folder.records) == 4
    assert same_images(folder, ldm) and same_images(folder, unet)
    # The file's weights are really used: a fine-tune (same template) draws other images from the same noise.
    specialist = sample(tiny.specialists[0], PROMPTS, tmp_path / "spec", FAST, template=tiny.pipeline)
    assert not same_images(folder, specialist)
    # Seeds differ per image: no two images of a run are alike.
    images = pixels(folder)
    assert all(not np.array_equal(images[i], images[j]) for i in range(4) for j in range(i))


def test_an_image_does_not_depend_on_the_batch_size(tiny, tmp_path):
    from dataclasses import replace

    one = sample(tiny.pipeline, PROMPTS, tmp_path / "b1", replace(FAST, batch_size=1))
    three = sample(tiny.pipeline, PROMPTS, tmp_path / "b3", replace(FAST, batch_size=3))
    assert same_images(one, three)
    # Another seed gives other images.
    other = sample(tiny.pipeline, PROMPTS, tmp_path / "s1", replace(FAST, seed=1))
    assert not same_images(one, other)


def test_manifest_records_prompts_seeds_checkpoint_and_settings(tiny, tmp_path):
    result = sample(tiny.base, PROMPTS, tmp_path / "out", FAST, template=tiny.pipeline)
    manifest = json.loads(result.manifest.read_text())
    assert manifest["checkpoint"] == {"path": str(tiny.base), "sha256": model_hash(tiny.base)}
    assert manifest["template"]["path"] == str(tiny.pipeline)
    assert manifest["settings"]["scheduler"] == "ddim" and manifest["settings"]["steps"] == 2
    first = manifest["images"][1]
    assert first == {
        "file": "00000_001.png",
        "prompt": "a red circle",
        "prompt_index": 0,
        "image_index": 1,
        "seed": image_seed(0, 0, 1),
    }
    assert {r["file"] for r in manifest["images"]} == {p.name for p in tmp_path.joinpath("out").glob("0*.png")}
    grid = Image.open(result.grid)
    assert grid.width >= 2 * 16 and grid.height >= 2 * 16


def test_missing_key_is_an_error_naming_file_and_key(tiny, tmp_path):
    state = load_file(tiny.unet_file)
    del state["conv_out.bias"]
    broken = tmp_path / "broken.safetensors"
    save_file(state, broken)
    with pytest.raises(CheckpointError) as err:
        load_pipeline(broken, template=tiny.pipeline)
    assert str(broken) in str(err.value) and "unet.conv_out.bias" in str(err.value)

    with pytest.raises(FeatureFusionError, match="template"):
        load_pipeline(tiny.base)  # a single file alone has no configs


def test_a_file_replaces_exactly_the_components_it_holds(tiny):
    pipe = load_pipeline(tiny.pipeline)
    assert load_weights_into(pipe, tiny.base) == ["unet", "text_encoder", "vae"]
    assert load_weights_into(pipe, tiny.unet_file) == ["unet"]
    spec = tiny.unet_states[1]
    load_weights_into(pipe, tiny.specialists[0])
    for key in ("conv_in.weight", "down_blocks.0.attentions.0.proj_in.weight"):
        assert pipe.unet.state_dict()[key].equal(spec[key])


def test_scheduler_choice_and_prompt_files(tiny, tmp_path):
    pipe = load_pipeline(tiny.pipeline)
    set_scheduler(pipe, "dpm++")
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    set_scheduler(pipe, "euler")
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    with pytest.raises(FeatureFusionError, match="unknown scheduler"):
        SamplerSettings(scheduler="nope")

    (tmp_path / "p.txt").write_text("a red circle\n\n# a comment\na blue square\n")
    (tmp_path / "p.json").write_text(json.dumps(PROMPTS))
    (tmp_path / "p.yaml").write_text("prompts:\n  - a red circle\n  - a blue square\n")
    for name in ("p.txt", "p.json", "p.yaml"):
        assert read_prompts(tmp_path / name) == PROMPTS
    (tmp_path / "bad.json").write_text('{"x": 1}')
    with pytest.raises(FeatureFusionError, match="list of strings"):
        read_prompts(tmp_path / "bad.json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_draw_the_same_bytes_as_one(tiny, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na striped circle\n")
    single = sample(tiny.pipeline, prompts, tmp_path / "one", FAST)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEATUREFUSION_PROGRESS": "0"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "featurefusion.cli", "sample", str(tiny.pipeline), "--prompts", str(prompts),
        "--out", str(tmp_path / "two"), "--scheduler", "ddim", "--steps", "2", "--guidance-scale", "2",
        "--images-per-prompt", "2", "--batch-size", "1", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["processes"] == 2
    assert manifest["images"] == single.records
    assert run.stdout.count("manifest:") == 1  # only the main process reports
    for record in single.records:
        assert (tmp_path / "two" / record["file"]).read_bytes() == (tmp_path / "one" / record["file"]).read_bytes()
