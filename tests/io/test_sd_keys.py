"""Per-key ldm <-> diffusers mapping, checked against diffusers' own whole-dict single-file converters."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel

from featurefusion.io.sd_keys import (
    COMPONENTS,
    LDM_PREFIXES,
    UNetLayout,
    diffusers_to_ldm,
    infer_unet_layout,
    ldm_to_diffusers,
    vae_attention_needs_reshape,
)

CA, D = "CrossAttnDownBlock2D", "DownBlock2D"
CU, U = "CrossAttnUpBlock2D", "UpBlock2D"

UNET_CASES = {
    # SD1.x-like: attention everywhere but the deepest level.
    "sd-2lvl-lpb2": dict(block_out_channels=(32, 64), layers_per_block=2, down=(CA, D), up=(U, CU)),
    "sd-2lvl-lpb1": dict(block_out_channels=(32, 64), layers_per_block=1, down=(CA, D), up=(U, CU)),
    "sd-3lvl-lpb2": dict(block_out_channels=(32, 32, 64), layers_per_block=2, down=(CA, CA, D), up=(U, CU, CU)),
    "sd-3lvl-lpb3": dict(block_out_channels=(32, 32, 64), layers_per_block=3, down=(CA, CA, D), up=(U, CU, CU)),
    # SDXL-like: the first level has no attention, so upsamplers sit at slot 2 (after the attention).
    "sdxl-2lvl": dict(block_out_channels=(32, 64), layers_per_block=2, down=(D, CA), up=(CU, U)),
    "sdxl-3lvl-text-time": dict(
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        down=(D, CA, CA),
        up=(CU, CU, U),
        extra=dict(
            transformer_layers_per_block=(1, 1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
        ),
    ),
    "one-level": dict(block_out_channels=(32,), layers_per_block=2, down=(CA,), up=(CU,)),
}


def _tiny_unet(case: dict) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=case["block_out_channels"],
        layers_per_block=case["layers_per_block"],
        down_block_types=case["down"],
        up_block_types=case["up"],
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
        sample_size=8,
        **case.get("extra", {}),
    )


def _layout(case: dict) -> UNetLayout:
    return UNetLayout(
        layers_per_block=case["layers_per_block"],
        num_down_blocks=len(case["block_out_channels"]),
        down_block_attention=tuple(t == CA for t in case["down"]),
    )


def _assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].shape == tensor.shape, key
        assert torch.equal(got[key], tensor), key


@pytest.mark.parametrize("name", list(UNET_CASES))
def test_unet_matches_diffusers_converter(name: str) -> None:
    case = UNET_CASES[name]
    unet = _tiny_unet(case)
    layout = _layout(case)
    state = unet.state_dict()

    ldm = {diffusers_to_ldm("unet", key, layout): tensor for key, tensor in state.items()}
    assert len(ldm) == len(state), "two diffusers keys mapped to the same ldm key"
    assert all(key.startswith(LDM_PREFIXES["unet"]) for key in ldm)

    _assert_same_tensors(convert_ldm_unet_checkpoint(ldm, unet.config), state)
    _assert_upsamplers_follow_attention(ldm, len(case["block_out_channels"]))
    for key in state:
        assert ldm_to_diffusers(diffusers_to_ldm("unet", key, layout), layout) == ("unet", key)
    assert infer_unet_layout(ldm) == layout


def _assert_upsamplers_follow_attention(ldm: dict[str, torch.Tensor], num_levels: int) -> None:
    # diffusers' converter accepts an upsampler at either slot, so check ldm's own rule: it follows
    # the resnet and, where the output block has one, the attention.
    prefix = LDM_PREFIXES["unet"] + "output_blocks."
    upsampler_keys = [k for k in ldm if k.startswith(prefix) and k.removeprefix(prefix).split(".")[2] == "conv"]
    assert len(upsampler_keys) == 2 * (num_levels - 1)  # weight and bias of every level but the last
    for key in upsampler_keys:
        index, slot = key.removeprefix(prefix).split(".")[:2]
        has_attention = any(k.startswith(f"{prefix}{index}.1.") and ".1.conv." not in k for k in ldm)
        assert slot == ("2" if has_attention else "1"), key


def test_sd1_default_layout_on_known_keys() -> None:
    layout = UNetLayout(layers_per_block=2, num_down_blocks=4)
    known = {
        "model.diffusion_model.time_embed.0.weight": ("unet", "time_embedding.linear_1.weight"),
        "model.diffusion_model.input_blocks.0.0.bias": ("unet", "conv_in.bias"),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (
            "unet",
            "down_blocks.0.attentions.0.proj_in.weight",
        ),
        "model.diffusion_model.input_blocks.3.0.op.weight": (
            "unet",
            "down_blocks.0.downsamplers.0.conv.weight",
        ),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (
            "unet",
            "down_blocks.1.resnets.0.conv_shortcut.weight",
        ),
        "model.diffusion_model.input_blocks.11.0.out_layers.3.weight": (
            "unet",
            "down_blocks.3.resnets.1.conv2.weight",
        ),
        "model.diffusion_model.middle_block.1.proj_out.bias": (
            "unet",
            "mid_block.attentions.0.proj_out.bias",
        ),
        "model.diffusion_model.middle_block.2.emb_layers.1.weight": (
            "unet",
            "mid_block.resnets.1.time_emb_proj.weight",
        ),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (
            "unet",
            "up_blocks.0.upsamplers.0.conv.weight",
        ),
        "model.diffusion_model.output_blocks.5.2.conv.bias": ("unet", "up_blocks.1.upsamplers.0.conv.bias"),
        "model.diffusion_model.output_blocks.8.2.conv.weight": (
            "unet",
            "up_blocks.2.upsamplers.0.conv.weight",
        ),
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight": (
            "unet",
            "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight",
        ),
        "model.diffusion_model.out.2.weight": ("unet", "conv_out.weight"),
        "first_stage_model.encoder.mid.attn_1.q.weight": (
            "vae",
            "encoder.mid_block.attentions.0.to_q.weight",
        ),
        "first_stage_model.decoder.up.3.block.0.conv1.weight": (
            "vae",
            "decoder.up_blocks.0.resnets.0.conv1.weight",
        ),
        "first_stage_model.decoder.up.1.upsample.conv.weight": (
            "vae",
            "decoder.up_blocks.2.upsamplers.0.conv.weight",
        ),
        "first_stage_model.quant_conv.weight": ("vae", "quant_conv.weight"),
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (
            "text_encoder",
            "text_model.encoder.layers.0.mlp.fc1.weight",
        ),
    }
    for ldm_key, expected in known.items():
        assert ldm_to_diffusers(ldm_key, layout) == expected, ldm_key
        assert diffusers_to_ldm(*expected, layout) == ldm_key
    for other in (
        "alphas_cumprod",
        "betas",
        "model_ema.decay",
        "model_ema.diffusion_modelinput_blocks00weight",
    ):
        assert ldm_to_diffusers(other, layout) is None
    # SDXL's extra conditioning MLP.
    sdxl = UNetLayout(layers_per_block=2, num_down_blocks=3, down_block_attention=(False, True, True))
    assert ldm_to_diffusers("model.diffusion_model.label_emb.0.2.bias", sdxl) == (
        "unet",
        "add_embedding.linear_2.bias",
    )
    assert diffusers_to_ldm("unet", "up_blocks.0.upsamplers.0.conv.weight", sdxl) == (
        "model.diffusion_model.output_blocks.2.2.conv.weight"
    )
    # Class-conditional models share the ldm names; the inverse accepts them.
    assert diffusers_to_ldm("unet", "class_embedding.linear_1.weight", sdxl) == (
        "model.diffusion_model.label_emb.0.0.weight"
    )


def test_unet_keys_that_do_not_fit_raise() -> None:
    sd1 = UNetLayout(layers_per_block=2, num_down_blocks=4)
    for bad in (
        "down_blocks.4.resnets.0.conv1.weight",  # no such level
        "down_blocks.0.resnets.2.conv1.weight",  # down levels hold layers_per_block resnets
        "down_blocks.3.downsamplers.0.conv.weight",  # the deepest level does not downsample
        "down_blocks.3.attentions.0.proj_in.weight",  # SD1.x's deepest level has no attention
        "up_blocks.3.upsamplers.0.conv.weight",
        "up_blocks.0.resnets.3.conv1.weight",
        "down_blocks.0.resnets.0.bogus.weight",
        "something_else.weight",
    ):
        with pytest.raises(KeyError, match="cannot place"):
            diffusers_to_ldm("unet", bad, sd1)
    with pytest.raises(KeyError, match="unknown component"):
        diffusers_to_ldm("controlnet", "conv_in.weight", sd1)
    for bad in (
        "model.diffusion_model.input_blocks.12.0.in_layers.0.weight",
        "model.diffusion_model.input_blocks.12.0.op.weight",  # would be a downsampler of the deepest level
        "model.diffusion_model.output_blocks.2.2.conv.weight",  # up block 0 of SD1.x has no attention
        "model.diffusion_model.middle_block.3.in_layers.0.weight",
        "first_stage_model.decoder.up.0.upsample.conv.weight",
        "first_stage_model.encoder.down.3.downsample.conv.weight",
        "cond_stage_model.transformer.text_projection.weight",
    ):
        with pytest.raises(KeyError, match="cannot map"):
            ldm_to_diffusers(bad, sd1)


def test_infer_unet_layout_errors_and_vae_levels() -> None:
    with pytest.raises(ValueError, match="no ldm UNet"):
        infer_unet_layout(["first_stage_model.encoder.conv_in.weight"])
    with pytest.raises(ValueError, match="equal levels"):
        # downsamplers after 2 layers, then after 3
        infer_unet_layout(
            [f"input_blocks.{i}.0.in_layers.0.weight" for i in (1, 2, 4, 5, 6, 8)]
            + [
                "input_blocks.3.0.op.weight",
                "input_blocks.7.0.op.weight",
            ]
        )
    keys = [f"model.diffusion_model.input_blocks.{i}.0.in_layers.0.weight" for i in (1, 2, 4, 5)]
    keys += [
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.1.1.norm.weight",
    ]
    keys += [f"first_stage_model.decoder.up.{i}.block.0.conv1.weight" for i in range(3)]
    assert infer_unet_layout(keys) == UNetLayout(2, 2, down_block_attention=(True, False), vae_num_blocks=3)


VAE_CASES = {
    "2lvl-lpb1": dict(block_out_channels=(32, 64), layers_per_block=1),
    "3lvl-lpb2": dict(block_out_channels=(32, 32, 64), layers_per_block=2),
}


@pytest.mark.parametrize("name", list(VAE_CASES))
def test_vae_matches_diffusers_converter(name: str) -> None:
    case = VAE_CASES[name]
    levels = len(case["block_out_channels"])
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=case["block_out_channels"],
        layers_per_block=case["layers_per_block"],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        norm_num_groups=8,
        latent_channels=4,
    )
    layout = UNetLayout(layers_per_block=2, num_down_blocks=4, vae_num_blocks=levels)
    state = vae.state_dict()

    ldm = {}
    reshaped = 0
    for key, tensor in state.items():
        if vae_attention_needs_reshape("vae", key):
            assert tensor.ndim == 2
            tensor = tensor[:, :, None, None]
            reshaped += 1
        ldm[diffusers_to_ldm("vae", key, layout)] = tensor
    assert reshaped == 8  # q, k, v, out in the encoder and the decoder mid-block
    assert len(ldm) == len(state)

    _assert_same_tensors(convert_ldm_vae_checkpoint(ldm, vae.config), state)
    for key in state:
        assert ldm_to_diffusers(diffusers_to_ldm("vae", key, layout), layout) == ("vae", key)
    assert infer_unet_layout(["input_blocks.1.0.in_layers.0.weight", *ldm]).vae_num_blocks == levels


def test_vae_attention_needs_reshape_is_narrow() -> None:
    assert vae_attention_needs_reshape("vae", "decoder.mid_block.attentions.0.to_out.0.weight")
    assert not vae_attention_needs_reshape("vae", "decoder.mid_block.attentions.0.to_out.0.bias")
    assert not vae_attention_needs_reshape("vae", "decoder.mid_block.attentions.0.group_norm.weight")
    assert not vae_attention_needs_reshape("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight")


def test_text_encoder_round_trip() -> None:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        vocab_size=100,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    model_state = CLIPTextModel(config).state_dict()
    # transformers 5 drops the "text_model." level from CLIPTextModel; diffusers folders on disk
    # (saved with transformers 4) and single files keep it.
    state = {
        (key if key.startswith("text_model.") else f"text_model.{key}"): tensor for key, tensor in model_state.items()
    }
    state["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    layout = UNetLayout(layers_per_block=2, num_down_blocks=4)

    ldm = {diffusers_to_ldm("text_encoder", key, layout): tensor for key, tensor in state.items()}
    assert all(key.startswith("cond_stage_model.transformer.text_model.") for key in ldm)
    _assert_same_tensors(convert_ldm_clip_checkpoint(ldm), state)
    for key in state:
        ldm_key = diffusers_to_ldm("text_encoder", key, layout)
        assert ldm_to_diffusers(ldm_key, layout) == ("text_encoder", key)
        old_style = ldm_key.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")
        assert ldm_to_diffusers(old_style, layout) == ("text_encoder", key)
    for key in model_state:  # keys as transformers 5 names them are placed too
        assert diffusers_to_ldm("text_encoder", key, layout) == LDM_PREFIXES["text_encoder"] + (
            key if key.startswith("text_model.") else f"text_model.{key}"
        )


def test_full_checkpoint_split() -> None:
    layout = UNetLayout(layers_per_block=2, num_down_blocks=4)
    keys = {
        "model.diffusion_model.out.0.weight": "unet",
        "first_stage_model.post_quant_conv.bias": "vae",
        "cond_stage_model.transformer.embeddings.position_ids": "text_encoder",
    }
    for key, component in keys.items():
        mapped = ldm_to_diffusers(key, layout)
        assert mapped is not None and mapped[0] == component
        assert mapped[0] in COMPONENTS
    assert ldm_to_diffusers("cond_stage_model.transformer.embeddings.position_ids", layout) == (
        "text_encoder",
        "text_model.embeddings.position_ids",
    )
