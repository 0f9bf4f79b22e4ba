import json

import numpy as np
import pytest
from PIL import Image

from featurefusion.errors import FeatureFusionError
from featurefusion.evaluate.matrix import ModelSpec, evaluate_matrix, parse_models, read_tasks, score_model
from featurefusion.evaluate.metrics import ClipScore, Fid, ImageRewardScore
from featurefusion.evaluate.sampling import SamplerSettings

FAST = SamplerSettings(scheduler="ddim", steps=2, guidance_scale=2.0, batch_size=4, images_per_prompt=2, device="cpu")


@pytest.fixture
def tasks_file(tmp_path):
    (tmp_path / "shapes.txt").write_text("a red circle\na blue square\n")
    refs = tmp_path / "refs"
    refs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(refs / f"{i}.png")
    path = tmp_path / "tasks.yaml"
    path.write_text(
        "tasks:\n"
        "  - {name: shapes, prompts: shapes.txt, references: refs}\n"
        "  - name: colours\n"
        "    prompts: [a red square, a blue circle]\n"
    )
    return path


def test_matrix_of_two_models_on_two_tasks_is_written(tiny, tmp_path, tasks_file, tiny_clip, feature_net, reward_model):
    tasks = read_tasks(tasks_file)
    assert [t.name for t in tasks] == ["shapes", "colours"] and tasks[0].references == tmp_path / "refs"
    metrics = [
        ClipScore(tiny_clip, device="cpu"),
        ImageRewardScore("tiny-reward", device="cpu", loader=lambda name, device: reward_model()),
        Fid(feature=feature_net, device="cpu"),
    ]
    models = [ModelSpec("base", str(tiny.pipeline)), ModelSpec("specialist", str(tiny.specialists[0]))]
    out = tmp_path / "report"
    result = evaluate_matrix(models, tasks, metrics, out, FAST, template=tiny.pipeline)

    data = json.loads(result.json.read_text())
    assert [m["name"] for m in data["metrics"]] == ["clip", "imagereward", "fid"]
    assert data["metrics"][0]["variant"] == str(tiny_clip)
    for metric in ("clip", "imagereward"):
        for model in ("base", "specialist"):
            assert set(data["values"][metric][model]) == {"shapes", "colours"}
            assert len(data["per_image"][metric][model]["shapes"]) == 4
    assert data["values"]["fid"]["base"]["colours"] is None  # no reference images for that task
    assert data["values"]["fid"]["base"]["shapes"] > 0
    reward = data["values"]["imagereward"]
    assert reward["base"]["shapes"] != reward["specialist"]["shapes"]  # the two models really differ
    assert data["models"]["specialist"]["sha256"] and data["settings"]["steps"] == 2

    markdown = result.markdown.read_text()
    for heading in ("## clip", "## imagereward", "## fid", "| model | shapes | colours | mean |"):
        assert heading in markdown
    assert "| base |" in markdown and "| specialist |" in markdown
    assert set(result.heatmaps) == {"clip", "imagereward", "fid"}
    for path in [*result.heatmaps.values(), result.grid]:
        assert Image.open(path).size[0] > 100
    assert (out / "images" / "specialist" / "colours" / "manifest.json").is_file()

    # The single-number form a greedy soup uses gives the same value on the same prompts and seeds.
    clip = metrics[0]
    value = score_model(tiny.pipeline, list(tasks[0].prompts), clip, FAST)
    assert value == pytest.approx(data["values"]["clip"]["base"]["shapes"])
    fid = score_model(tiny.base, list(tasks[0].prompts), metrics[2], FAST, template=tiny.pipeline,
                      references=tmp_path / "refs", oriented=True)  # fmt: skip
    assert fid == pytest.approx(-data["values"]["fid"]["base"]["shapes"])


def test_task_files_and_model_names(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n")
    (tmp_path / "tasks.json").write_text(json.dumps({"objects": "p.txt", "styles": {"prompts": ["a striped circle"]}}))
    tasks = read_tasks(tmp_path / "tasks.json")
    assert [(t.name, t.prompts) for t in tasks] == [("objects", ("a red circle",)), ("styles", ("a striped circle",))]
    (tmp_path / "dup.yaml").write_text("- {name: a, prompts: [x]}\n- {name: a, prompts: [y]}\n")
    with pytest.raises(FeatureFusionError, match="repeat"):
        read_tasks(tmp_path / "dup.yaml")
    (tmp_path / "bad.yaml").write_text("- {name: a}\n")
    with pytest.raises(FeatureFusionError, match="needs a name and prompts"):
        read_tasks(tmp_path / "bad.yaml")

    models = parse_models(["x/merged.safetensors", "y/merged.safetensors", "base=runs/sd15", "runs/pipe"])
    assert [m.name for m in models] == ["merged", "merged-2", "base", "pipe"]
    assert models[2].checkpoint == "runs/sd15"
