"""A Stable Diffusion-shaped student: VAE latents, a captioned folder, ldm teachers, ldm export, sampling."""

import json

import torch
from PIL import Image
from safetensors.torch import load_file

from featurefusion.cli import main


def _captioned_folder(folder, n=4):
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    with (folder / "metadata.jsonl").open("w") as handle:
        for i in range(n):
            pixels = torch.randint(0, 256, (20, 24, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i}.png")
            handle.write(json.dumps({"file_name": f"{i}.png", "text": f"a photo number {i}"}) + "\n")
    return folder


def test_stable_diffusion_student_end_to_end(tiny, tmp_path):
    data = _captioned_folder(tmp_path / "data")
    out = tmp_path / "student"
    args = ["distill", str(tiny.pipeline), f"one={tiny.specialists[0]}", f"two={tiny.specialists[1]}", "-o",
            str(out), "--data", str(data), "--steps", "2", "--batch-size", "2", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert (out / "vae").is_dir() and json.loads((out / "student.json").read_text())["styles"] == ["one", "two"]

    exported = tmp_path / "two.safetensors"
    assert main(["distill", "export", str(out), "--style", "two", "-o", str(exported), "--no-progress"]) == 0
    keys = load_file(exported).keys()
    assert any(k.startswith("model.diffusion_model.") for k in keys)  # an A1111-style single file
    assert any(k.startswith("first_stage_model.") for k in keys) and any(
        k.startswith("cond_stage_model.") for k in keys
    )

    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo\n")
    samples = tmp_path / "samples"
    assert main(["sample", str(out), "--style", "one=0.5,two=0.5", "--prompts", str(prompts), "--out", str(samples),
                 "--steps", "2", "--no-progress"]) == 0  # fmt: skip
    assert len(list(samples.glob("*.png"))) >= 1

    # FIDt of the Stable Diffusion student: images in [0, 1], here in a small feature space (Inception's
    # weights would be a download)
    from torchmetrics.image.fid import FrechetInceptionDistance

    from featurefusion.distill.fidt import FIDtSampling, student_fidt

    class ChannelStatistics(torch.nn.Module):
        num_features = 6

        def forward(self, images):
            assert images.min() >= 0 and images.max() <= 1
            flat = images.flatten(2)
            return torch.cat([flat.mean(2), flat.std(2)], dim=1).double()

    result = student_fidt(out, FIDtSampling(["a photo", "a cat", "a dog", "a car"], steps=2),
                          lambda: FrechetInceptionDistance(feature=ChannelStatistics(), normalize=True))  # fmt: skip
    assert result.names == ["one", "two"] and len(result.matrix) == 2 and len(result.reference) == 2


def test_an_sdxl_base_is_refused_with_the_reason(tiny, tmp_path):
    import shutil

    from diffusers import UNet2DConditionModel

    from featurefusion.distill.backbone import DistillError, load_backbone

    base = tmp_path / "sdxl-like"
    shutil.copytree(tiny.pipeline, base)
    config = dict(UNet2DConditionModel.load_config(base / "unet"))
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    cross = config["cross_attention_dim"]
    config.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=cross + 6 * 8)  # fmt: skip
    shutil.rmtree(base / "unet")
    UNet2DConditionModel(**config).save_pretrained(base / "unet")
    try:
        load_backbone(base)
    except DistillError as err:
        assert "added conditioning" in str(err) and str(base) in str(err)
    else:
        raise AssertionError("an SDXL-like base was accepted")
