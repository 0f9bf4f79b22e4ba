"""Per-key name mapping between Stable Diffusion single-file checkpoints and diffusers components.

Two layouts hold the same tensors under different names:

* The single-file ("ldm") layout of the original CompVis code, used by A1111/ComfyUI ``.ckpt`` and
  ``.safetensors`` files. One flat dict holds every component, told apart by a prefix
  (:data:`LDM_PREFIXES`). The UNet is a flat sequence of numbered blocks: ``input_blocks.{i}``,
  ``middle_block.{i}`` and ``output_blocks.{i}``, each a list of sub-modules ``.0`` (resnet), ``.1``
  (attention, where the level has one) and so on; a downsampler occupies a numbered slot of its own
  (``input_blocks.{i}.0.op``), an upsampler rides at the end of the last block of a level
  (``output_blocks.{i}.{1|2}.conv``).
  The VAE uses ``encoder.down.{i}.block.{j}`` / ``decoder.up.{i}.block.{j}`` with ``decoder.up``
  numbered from the lowest resolution upwards, and its mid-block attention weights are 1x1 convolutions.

* The diffusers layout: one state dict per component (``unet``, ``text_encoder``, ``vae``), nested by
  level: ``down_blocks.{b}.resnets.{j}``, ``down_blocks.{b}.attentions.{j}``,
  ``down_blocks.{b}.downsamplers.0``, ``mid_block``, ``up_blocks.{b}...`` (up blocks numbered from the
  lowest resolution, so the VAE decoder's order is reversed relative to ldm). VAE mid-block attention
  weights are linear ``[c, c]`` matrices.

The merge engine streams one tensor at a time, so everything here maps a single key string; nothing
loads or converts a whole state dict. The numbered-block arithmetic needs the UNet's shape
(:class:`UNetLayout`), which :func:`infer_unet_layout` reads back from the ldm keys.

Tensors keep their values under the mapping; the one exception is the VAE mid-block attention, whose
q/k/v/out weights must be reshaped between ``[c, c, 1, 1]`` and ``[c, c]``
(:func:`vae_attention_needs_reshape`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

COMPONENTS = ("unet", "text_encoder", "vae")
LDM_PREFIXES = {
    "unet": "model.diffusion_model.",
    "text_encoder": "cond_stage_model.transformer.",
    "vae": "first_stage_model.",
}
_SD_VAE_NUM_BLOCKS = 4  # ch_mult (1, 2, 4, 4) in SD1.x, SD2.x and SDXL


@dataclass(frozen=True)
class UNetLayout:
    """The shape facts the UNet (and VAE) index arithmetic needs. Defaults fit SD1.x / SD2.x."""

    layers_per_block: int  # diffusers UNet config value (SD1.x: 2)
    num_down_blocks: int  # len(block_out_channels) (SD1.x: 4, SDXL: 3)
    # Which down levels have attention, shallowest first. The up blocks mirror it. None means every
    # level but the deepest one (SD1.x/SD2.x); SDXL is (False, True, True).
    down_block_attention: tuple[bool, ...] | None = None
    # Resolution levels of the VAE (len(block_out_channels)); needed because ldm numbers the decoder
    # levels in the opposite order to diffusers. 4 for SD1.x, SD2.x and SDXL.
    vae_num_blocks: int = _SD_VAE_NUM_BLOCKS

    def __post_init__(self) -> None:
        if self.layers_per_block < 1 or self.num_down_blocks < 1 or self.vae_num_blocks < 1:
            raise ValueError(f"UNetLayout fields must be positive: {self}")
        if self.down_block_attention is not None and len(self.down_block_attention) != self.num_down_blocks:
            raise ValueError(
                f"down_block_attention has {len(self.down_block_attention)} entries, "
                f"expected num_down_blocks={self.num_down_blocks}"
            )

    def down_has_attention(self, block: int) -> bool:
        if self.down_block_attention is None:
            return block < self.num_down_blocks - 1
        return self.down_block_attention[block]

    def up_has_attention(self, block: int) -> bool:
        return self.down_has_attention(self.num_down_blocks - 1 - block)

    @property
    def slots_per_level(self) -> int:
        # Each ldm level holds its resnets plus one more slot: the downsampler on the way down,
        # the extra resnet (that takes the skip from the downsampler) on the way up.
        return self.layers_per_block + 1


# --- small helpers -----------------------------------------------------------------------------------


def _invert(table: Mapping[str, str]) -> dict[str, str]:
    return {v: k for k, v in table.items()}


def _rename_module(rest: str, table: Mapping[str, str]) -> str | None:
    """Rename the module path of ``module.param`` through ``table``; None if the module is not in it."""
    module, dot, param = rest.rpartition(".")
    if not dot or module not in table:
        return None
    return f"{table[module]}.{param}"


def _strip(rest: str, head: str) -> str | None:
    return rest[len(head) :] if rest.startswith(head) and len(rest) > len(head) else None


# --- UNet --------------------------------------------------------------------------------------------

# ldm module path -> diffusers module path, for modules outside the numbered blocks.
_UNET_FIXED = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    # SDXL's pooled-text + size conditioning; class-conditional models use the same ldm names for
    # class_embedding (accepted below in the inverse direction only, since ldm cannot tell them apart).
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    # nn.Embedding of class-conditional models (the x4 upscaler).
    "label_emb": "class_embedding",
}
_UNET_FIXED_INV = _invert(_UNET_FIXED) | {
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
}

# ldm ResBlock keeps its layers in nn.Sequential, so the numbers skip the parameter-free activations.
_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_UNET_RESNET_INV = _invert(_UNET_RESNET)

_LDM_INPUT = re.compile(r"input_blocks\.(\d+)\.(\d+)\.(.+)")
_LDM_MIDDLE = re.compile(r"middle_block\.(\d+)\.(.+)")
_LDM_OUTPUT = re.compile(r"output_blocks\.(\d+)\.(\d+)\.(.+)")
_DIFF_DOWN = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)")
_DIFF_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_DIFF_UP = re.compile(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)")

# ldm middle_block is [ResBlock, SpatialTransformer, ResBlock].
_MIDDLE_SLOTS = {0: "resnets.0", 1: "attentions.0", 2: "resnets.1"}
_MIDDLE_SLOTS_INV = _invert(_MIDDLE_SLOTS)


def _unet_upsampler_slot(layout: UNetLayout, block: int) -> int:
    # The upsampler follows the resnet and, where the level has one, the attention.
    return 2 if layout.up_has_attention(block) else 1


def _unet_ldm_input(i: int, sub: int, rest: str, layout: UNetLayout) -> str | None:
    if i == 0:
        return None  # input_blocks.0.0 is conv_in, handled by the fixed table
    block, layer = divmod(i - 1, layout.slots_per_level)
    if block >= layout.num_down_blocks:
        return None
    if layer == layout.layers_per_block:  # the slot after a level's resnets holds its downsampler
        param = _strip(rest, "op.")
        if sub != 0 or param is None or block >= layout.num_down_blocks - 1:
            return None
        return f"down_blocks.{block}.downsamplers.0.conv.{param}"
    if sub == 0:
        renamed = _rename_module(rest, _UNET_RESNET)
        return None if renamed is None else f"down_blocks.{block}.resnets.{layer}.{renamed}"
    if sub == 1 and layout.down_has_attention(block):
        return f"down_blocks.{block}.attentions.{layer}.{rest}"
    return None


def _unet_ldm_middle(sub: int, rest: str) -> str | None:
    slot = _MIDDLE_SLOTS.get(sub)
    if slot is None:
        return None
    if slot.startswith("attentions"):
        return f"mid_block.{slot}.{rest}"
    renamed = _rename_module(rest, _UNET_RESNET)
    return None if renamed is None else f"mid_block.{slot}.{renamed}"


def _unet_ldm_output(i: int, sub: int, rest: str, layout: UNetLayout) -> str | None:
    block, layer = divmod(i, layout.slots_per_level)
    if block >= layout.num_down_blocks:
        return None
    if sub == 0:
        renamed = _rename_module(rest, _UNET_RESNET)
        return None if renamed is None else f"up_blocks.{block}.resnets.{layer}.{renamed}"
    param = _strip(rest, "conv.")  # a SpatialTransformer has no child called "conv"; an Upsample does
    if param is not None:
        is_last_layer = layer == layout.layers_per_block
        has_upsampler = block < layout.num_down_blocks - 1
        if is_last_layer and has_upsampler and sub == _unet_upsampler_slot(layout, block):
            return f"up_blocks.{block}.upsamplers.0.conv.{param}"
        return None
    if sub == 1 and layout.up_has_attention(block):
        return f"up_blocks.{block}.attentions.{layer}.{rest}"
    return None


def _unet_to_diffusers(key: str, layout: UNetLayout) -> str | None:
    if (fixed := _rename_module(key, _UNET_FIXED)) is not None:
        return fixed
    if m := _LDM_INPUT.fullmatch(key):
        return _unet_ldm_input(int(m[1]), int(m[2]), m[3], layout)
    if m := _LDM_MIDDLE.fullmatch(key):
        return _unet_ldm_middle(int(m[1]), m[2])
    if m := _LDM_OUTPUT.fullmatch(key):
        return _unet_ldm_output(int(m[1]), int(m[2]), m[3], layout)
    return None


def _unet_diff_down(block: int, kind: str, idx: int, rest: str, layout: UNetLayout) -> str | None:
    if block >= layout.num_down_blocks:
        return None
    first_slot = 1 + block * layout.slots_per_level  # input_blocks.0 is conv_in
    if kind == "downsamplers":
        param = _strip(rest, "conv.")
        if idx != 0 or param is None or block >= layout.num_down_blocks - 1:
            return None
        return f"input_blocks.{first_slot + layout.layers_per_block}.0.op.{param}"
    if idx >= layout.layers_per_block:
        return None
    if kind == "resnets":
        renamed = _rename_module(rest, _UNET_RESNET_INV)
        return None if renamed is None else f"input_blocks.{first_slot + idx}.0.{renamed}"
    if layout.down_has_attention(block):
        return f"input_blocks.{first_slot + idx}.1.{rest}"
    return None


def _unet_diff_mid(kind: str, idx: int, rest: str) -> str | None:
    sub = _MIDDLE_SLOTS_INV.get(f"{kind}.{idx}")
    if sub is None:
        return None
    if kind == "attentions":
        return f"middle_block.{sub}.{rest}"
    renamed = _rename_module(rest, _UNET_RESNET_INV)
    return None if renamed is None else f"middle_block.{sub}.{renamed}"


def _unet_diff_up(block: int, kind: str, idx: int, rest: str, layout: UNetLayout) -> str | None:
    if block >= layout.num_down_blocks:
        return None
    first_slot = block * layout.slots_per_level
    if kind == "upsamplers":
        param = _strip(rest, "conv.")
        if idx != 0 or param is None or block >= layout.num_down_blocks - 1:
            return None
        last_slot = first_slot + layout.layers_per_block
        return f"output_blocks.{last_slot}.{_unet_upsampler_slot(layout, block)}.conv.{param}"
    if idx > layout.layers_per_block:
        return None
    if kind == "resnets":
        renamed = _rename_module(rest, _UNET_RESNET_INV)
        return None if renamed is None else f"output_blocks.{first_slot + idx}.0.{renamed}"
    if layout.up_has_attention(block):
        return f"output_blocks.{first_slot + idx}.1.{rest}"
    return None


def _unet_to_ldm(key: str, layout: UNetLayout) -> str | None:
    if (fixed := _rename_module(key, _UNET_FIXED_INV)) is not None:
        return fixed
    if m := _DIFF_DOWN.fullmatch(key):
        return _unet_diff_down(int(m[1]), m[2], int(m[3]), m[4], layout)
    if m := _DIFF_MID.fullmatch(key):
        return _unet_diff_mid(m[1], int(m[2]), m[3])
    if m := _DIFF_UP.fullmatch(key):
        return _unet_diff_up(int(m[1]), m[2], int(m[3]), m[4], layout)
    return None


# --- VAE ---------------------------------------------------------------------------------------------

_VAE_FIXED = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.norm_out": "encoder.conv_norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.norm_out": "decoder.conv_norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
_VAE_FIXED_INV = _invert(_VAE_FIXED)
_VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
_VAE_RESNET_INV = _invert(_VAE_RESNET)
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_ATTN_INV = _invert(_VAE_ATTN)

_LDM_VAE_MID_RES = re.compile(r"(encoder|decoder)\.mid\.block_(\d+)\.(.+)")
_LDM_VAE_MID_ATTN = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(.+)")
_LDM_VAE_DOWN = re.compile(r"encoder\.down\.(\d+)\.(block\.\d+|downsample)\.(.+)")
_LDM_VAE_UP = re.compile(r"decoder\.up\.(\d+)\.(block\.\d+|upsample)\.(.+)")
_DIFF_VAE_MID_RES = re.compile(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)")
_DIFF_VAE_MID_ATTN = re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)")
_DIFF_VAE_DOWN = re.compile(r"encoder\.down_blocks\.(\d+)\.(resnets\.\d+|downsamplers\.0)\.(.+)")
_DIFF_VAE_UP = re.compile(r"decoder\.up_blocks\.(\d+)\.(resnets\.\d+|upsamplers\.0)\.(.+)")
_VAE_ATTN_RESHAPE = re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight")


def _vae_level(
    rest: str,
    resnet_prefix: str,
    resnet_out: str,
    sampler_in: str,
    sampler_out: str,
    resnets: Mapping[str, str],
) -> str | None:
    """Map the inside of one VAE level: ``{resnet_prefix}.{j}.*`` resnets or the ``{sampler_in}`` conv."""
    if (sampler_param := _strip(rest, f"{sampler_in}.conv.")) is not None:
        return f"{sampler_out}.conv.{sampler_param}"
    if m := re.fullmatch(rf"{re.escape(resnet_prefix)}\.(\d+)\.(.+)", rest):
        renamed = _rename_module(m[2], resnets)
        return None if renamed is None else f"{resnet_out}.{m[1]}.{renamed}"
    return None


def _vae_to_diffusers(key: str, layout: UNetLayout) -> str | None:
    n = layout.vae_num_blocks
    if (fixed := _rename_module(key, _VAE_FIXED)) is not None:
        return fixed
    if m := _LDM_VAE_MID_RES.fullmatch(key):
        renamed = _rename_module(m[3], _VAE_RESNET)
        if renamed is None or m[2] not in ("1", "2"):
            return None
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{renamed}"
    if m := _LDM_VAE_MID_ATTN.fullmatch(key):
        renamed = _rename_module(m[2], _VAE_ATTN)
        return None if renamed is None else f"{m[1]}.mid_block.attentions.0.{renamed}"
    if m := _LDM_VAE_DOWN.fullmatch(key):
        i, rest = int(m[1]), f"{m[2]}.{m[3]}"
        if i >= n or (m[2] == "downsample" and i == n - 1):  # the deepest level does not downsample
            return None
        inner = _vae_level(rest, "block", "resnets", "downsample", "downsamplers.0", _VAE_RESNET)
        return None if inner is None else f"encoder.down_blocks.{i}.{inner}"
    if m := _LDM_VAE_UP.fullmatch(key):
        i, rest = int(m[1]), f"{m[2]}.{m[3]}"
        if i >= n or (m[2] == "upsample" and i == 0):  # ldm up.0 is the full-resolution level
            return None
        inner = _vae_level(rest, "block", "resnets", "upsample", "upsamplers.0", _VAE_RESNET)
        return None if inner is None else f"decoder.up_blocks.{n - 1 - i}.{inner}"
    return None


def _vae_to_ldm(key: str, layout: UNetLayout) -> str | None:
    n = layout.vae_num_blocks
    if (fixed := _rename_module(key, _VAE_FIXED_INV)) is not None:
        return fixed
    if m := _DIFF_VAE_MID_RES.fullmatch(key):
        renamed = _rename_module(m[3], _VAE_RESNET_INV)
        if renamed is None or m[2] not in ("0", "1"):
            return None
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{renamed}"
    if m := _DIFF_VAE_MID_ATTN.fullmatch(key):
        renamed = _rename_module(m[2], _VAE_ATTN_INV)
        return None if renamed is None else f"{m[1]}.mid.attn_1.{renamed}"
    if m := _DIFF_VAE_DOWN.fullmatch(key):
        b, rest = int(m[1]), f"{m[2]}.{m[3]}"
        if b >= n or (m[2] == "downsamplers.0" and b == n - 1):
            return None
        inner = _vae_level(rest, "resnets", "block", "downsamplers.0", "downsample", _VAE_RESNET_INV)
        return None if inner is None else f"encoder.down.{b}.{inner}"
    if m := _DIFF_VAE_UP.fullmatch(key):
        b, rest = int(m[1]), f"{m[2]}.{m[3]}"
        if b >= n or (m[2] == "upsamplers.0" and b == n - 1):
            return None
        inner = _vae_level(rest, "resnets", "block", "upsamplers.0", "upsample", _VAE_RESNET_INV)
        return None if inner is None else f"decoder.up.{n - 1 - b}.{inner}"
    return None


# --- text encoder ------------------------------------------------------------------------------------

_TEXT_MODEL = "text_model."
# Top-level children of CLIPTextTransformer: older single files store them without "text_model.",
# and transformers 5 saves CLIPTextModel without it too.
_TEXT_CHILDREN = ("embeddings.", "encoder.", "final_layer_norm.")


def _text_to_diffusers(key: str, layout: UNetLayout) -> str | None:
    inner = _strip(key, _TEXT_MODEL) or key
    return _TEXT_MODEL + inner if inner.startswith(_TEXT_CHILDREN) else None


def _text_to_ldm(key: str, layout: UNetLayout) -> str | None:
    return _text_to_diffusers(key, layout)  # the ldm form (after the prefix) is the canonical one


# --- public API --------------------------------------------------------------------------------------

_Mapper = Callable[[str, UNetLayout], str | None]
_TO_DIFFUSERS: dict[str, _Mapper] = {
    "unet": _unet_to_diffusers,
    "text_encoder": _text_to_diffusers,
    "vae": _vae_to_diffusers,
}
_TO_LDM: dict[str, _Mapper] = {"unet": _unet_to_ldm, "text_encoder": _text_to_ldm, "vae": _vae_to_ldm}


def ldm_to_diffusers(key: str, layout: UNetLayout) -> tuple[str, str] | None:
    """Map one single-file key to (component, diffusers_key); None for keys outside the three components
    (e.g. 'model_ema.*', 'alphas_cumprod', 'betas', ...).

    A key under a component's prefix that does not fit the layout raises KeyError rather than being
    dropped: silently skipping a weight would produce a broken merged model.
    """
    for component in COMPONENTS:
        prefix = LDM_PREFIXES[component]
        if key.startswith(prefix):
            mapped = _TO_DIFFUSERS[component](key[len(prefix) :], layout)
            if mapped is None:
                raise KeyError(f"cannot map single-file {component} key {key!r} to diffusers with {layout}")
            return component, mapped
    return None


def diffusers_to_ldm(component: str, key: str, layout: UNetLayout) -> str:
    """Inverse: full single-file key for a diffusers component key.

    Raises KeyError with a clear message for a key it cannot place.
    """
    if component not in _TO_LDM:
        raise KeyError(f"unknown component {component!r}; expected one of {COMPONENTS}")
    mapped = _TO_LDM[component](key, layout)
    if mapped is None:
        raise KeyError(f"cannot place diffusers {component} key {key!r} in a single-file checkpoint with {layout}")
    return LDM_PREFIXES[component] + mapped


def vae_attention_needs_reshape(component: str, diffusers_key: str) -> bool:
    """True for VAE mid-block attention q/k/v/out weights.

    ldm stores them as 1x1 convs ``[c, c, 1, 1]``, diffusers as linear ``[c, c]``.
    """
    return component == "vae" and _VAE_ATTN_RESHAPE.fullmatch(diffusers_key) is not None


_BLOCK_INDEX = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.")
_VAE_LEVEL_INDEX = re.compile(re.escape(LDM_PREFIXES["vae"]) + r"(?:encoder\.down|decoder\.up)\.(\d+)\.")
_OTHER_PREFIXES = tuple(p for c, p in LDM_PREFIXES.items() if c != "unet")


def infer_unet_layout(ldm_unet_keys: Iterable[str]) -> UNetLayout:
    """Read layers_per_block and the number of down blocks from the ldm UNet keys alone.

    The input_blocks / output_blocks indices and which of them hold an ``op`` downsampler fix both.

    Keys may carry the ``model.diffusion_model.`` prefix or not; keys of the other components are
    skipped, except that ``first_stage_model.`` VAE keys, when present, set ``vae_num_blocks``.
    Which levels have attention is read from the ``input_blocks.{i}.1`` sub-modules.
    Raises ValueError when the indices do not form a UNet the mapping can describe.
    """
    inputs: set[int] = set()
    downsamplers: set[int] = set()
    outputs: set[int] = set()
    attention_inputs: set[int] = set()
    vae_levels: set[int] = set()
    unet_prefix = LDM_PREFIXES["unet"]
    for key in ldm_unet_keys:
        if key.startswith(_OTHER_PREFIXES):
            if m := _VAE_LEVEL_INDEX.match(key):
                vae_levels.add(int(m[1]))
            continue
        local = key.removeprefix(unet_prefix)
        if not (m := _BLOCK_INDEX.match(local)):
            continue
        index, sub = int(m[2]), int(m[3])
        if m[1] == "output_blocks":
            outputs.add(index)
            continue
        inputs.add(index)
        if local.startswith(f"input_blocks.{index}.0.op."):
            downsamplers.add(index)
        elif sub == 1:
            attention_inputs.add(index)

    inputs.discard(0)  # conv_in
    if not inputs:
        raise ValueError("no ldm UNet input_blocks keys found; cannot infer the UNet layout")
    num_down_blocks = len(downsamplers) + 1
    # The first downsampler sits right after the first level's resnets; without one there is one level.
    layers_per_block = min(downsamplers) - 1 if downsamplers else max(inputs)
    slots = layers_per_block + 1
    expected_inputs = set(range(1, num_down_blocks * slots))
    expected_downsamplers = {k * slots for k in range(1, num_down_blocks)}
    expected_outputs = set(range(num_down_blocks * slots))
    if layers_per_block < 1 or inputs != expected_inputs or downsamplers != expected_downsamplers:
        raise ValueError(
            f"ldm UNet input_blocks {sorted(inputs)} with downsamplers at {sorted(downsamplers)} "
            "do not form equal levels; cannot infer the UNet layout"
        )
    if outputs and outputs != expected_outputs:
        raise ValueError(
            f"ldm UNet output_blocks {sorted(outputs)} do not match {num_down_blocks} levels of "
            f"{layers_per_block} layers; cannot infer the UNet layout"
        )
    attention = tuple(
        any(1 + level * slots + j in attention_inputs for j in range(layers_per_block))
        for level in range(num_down_blocks)
    )
    vae_num_blocks = max(vae_levels) + 1 if vae_levels else _SD_VAE_NUM_BLOCKS
    return UNetLayout(
        layers_per_block=layers_per_block,
        num_down_blocks=num_down_blocks,
        down_block_attention=attention,
        vae_num_blocks=vae_num_blocks,
    )
