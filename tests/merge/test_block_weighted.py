"""Block-weighted merging: the community's block-weight format, block assignment, and the edge cases."""

import pytest
import torch

from featurefusion.errors import RecipeError
from featurefusion.io import sd_keys
from featurefusion.io.checkpoint import open_checkpoint
from featurefusion.merge import operations
from featurefusion.merge.methods.block_weighted import block_names, block_of

SD15 = sd_keys.UNetLayout(layers_per_block=2, num_down_blocks=4)
SDXL = sd_keys.UNetLayout(layers_per_block=2, num_down_blocks=3, down_block_attention=(False, True, True))


def unet(path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ckpt:
        return {k: ckpt.read(k).float() for k in ckpt.keys("unet")}


def test_the_block_format_has_26_values_for_sd1_and_20_for_sdxl():
    names = block_names(SD15)
    assert len(names) == 26 and names[:3] == ["BASE", "IN00", "IN01"] and names[12:15] == ["IN11", "M00", "OUT00"]
    assert names[-1] == "OUT11"
    assert len(block_names(SDXL)) == 20


@pytest.mark.parametrize(
    "key, block",
    [
        ("unet.conv_in.weight", "IN00"),
        ("unet.time_embedding.linear_1.weight", "IN00"),
        ("unet.down_blocks.0.resnets.0.conv1.weight", "IN01"),
        ("unet.down_blocks.0.attentions.1.proj_in.weight", "IN02"),
        ("unet.down_blocks.0.downsamplers.0.conv.weight", "IN03"),
        ("unet.down_blocks.3.resnets.1.conv2.weight", "IN11"),
        ("unet.mid_block.attentions.0.proj_out.weight", "M00"),
        ("unet.up_blocks.0.resnets.2.conv1.weight", "OUT02"),
        ("unet.up_blocks.3.attentions.2.proj_out.weight", "OUT11"),
        ("unet.conv_out.weight", "OUT11"),
        ("text_encoder.text_model.final_layer_norm.weight", "BASE"),
    ],
)
def test_keys_fall_in_the_blocks_community_tools_use(key, block):
    assert block_of(key, SD15) == block


def test_weights_of_zero_and_one_give_each_input_model(tiny, tmp_path):
    with open_checkpoint(tiny.base) as ckpt:
        count = len(block_names(ckpt.unet_layout))
    zeros, ones = ",".join(["0"] * count), ",".join(["1"] * count)
    for weights, expected in ((zeros, tiny.base), (ones, tiny.specialists[0])):
        out = tmp_path / "bw.safetensors"
        operations.merge([tiny.base, tiny.specialists[0]], out, "block-weighted", block_weights=[weights])
        merged, want = unet(out), unet(expected)
        for key in want:
            torch.testing.assert_close(merged[key], want[key], atol=1e-6, rtol=0)
        out.unlink()


def test_each_block_takes_its_own_weight(tiny, tmp_path):
    with open_checkpoint(tiny.base) as ckpt:
        layout = ckpt.unet_layout
    names = block_names(layout)
    weights = [0.5 if name == "M00" else 0.0 for name in names]
    out = tmp_path / "mid.safetensors"
    text = ",".join(map(str, weights))
    operations.merge([tiny.base, tiny.specialists[0]], out, "block-weighted", block_weights=[text])
    merged, base, spec = unet(out), unet(tiny.base), unet(tiny.specialists[0])
    for key in base:
        expected = 0.5 * (base[key] + spec[key]) if block_of(key, layout) == "M00" else base[key]
        torch.testing.assert_close(merged[key], expected, atol=1e-6, rtol=0, msg=key)
    assert any(block_of(k, layout) == "M00" for k in base)


def test_a_string_of_the_wrong_length_is_a_clear_error_and_writes_nothing(tiny, tmp_path):
    out = tmp_path / "bw.safetensors"
    with pytest.raises(RecipeError, match=r"3 values given, but this UNet has \d+ blocks: BASE, IN00"):
        operations.merge(tiny.models, out, "block-weighted", block_weights=["0.1,0.2,0.3"])
    with pytest.raises(RecipeError, match="comma-separated numbers"):
        operations.merge(tiny.models, out, "block-weighted", block_weights=["0.1,x"])
    with pytest.raises(RecipeError, match="3 block-weight strings given for 2 specialists"):
        operations.merge(tiny.models, out, "block-weighted", block_weights=["0.1", "0.2", "0.3"])
    with pytest.raises(RecipeError, match="needs --block-weights"):
        operations.merge(tiny.models, out, "block-weighted")
    assert list(tmp_path.iterdir()) == []
