"""Which channels of a diffusers `UNet2DConditionModel` must be merged together: the U-Net as ZipIt! sees it.

ZipIt! merges *feature spaces*, not tensors. A space is a set of channels that several layers write to or read
from and that must therefore be merged the same way everywhere: a layer that writes a space gets the space's
merge matrix on its output rows, a layer that reads it gets the space's unmerge matrix on its input columns.
This module walks a U-Net and lists

- its spaces (`Space`): the residual stream of each resolution (every block that adds into a stream writes the
  same space, so one merge serves them all), the inside of each ResNet block, the inner stream of each
  transformer, each attention's query/key and value channels (split into heads), each feed-forward's hidden
  channels, the time embedding's two layers, and the fixed spaces shared by all models (noisy input, timestep
  sinusoids, text embeddings, predicted noise) which are never matched;
- for every parameter of the state dict, the spaces of its output rows and input columns (`ParamRule`); a
  dimension made of a concatenation (the skip connections of the up blocks, GEGLU's value and gate halves) lists
  several spaces in order;
- where each space's features are observed while the model runs on sample inputs (`Observation`);
- for partial zipping, the U-Net block that first writes each space (down blocks, mid block, up blocks in the
  order they run).

Only the SD 1.x family of parts is described (ResNet blocks with additive time embedding, Transformer2DModel
with LayerNorm blocks, GEGLU or GELU feed-forwards, conv down/up samplers, no class or added embeddings); any
other part is reported instead of being merged wrongly, and every parameter of the model must be covered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from featurefusion.errors import CheckpointError

# Spaces every model shares as they are: inputs fed to all models and the output they must agree on.
SHARED_INPUT = "input:sample"
SHARED_TIME = "input:time-sinusoid"
SHARED_TEXT = "input:text"
SHARED_OUTPUT = "output:noise"

DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn",)


@dataclass(frozen=True)
class Space:
    name: str
    size: int
    kind: str  # stream | resnet | transformer | qk | v | ff | time | shared
    block: int  # index in UNetGraph.blocks of the block that first writes it; -1 for shared spaces
    heads: int = 1  # qk and v spaces: attention heads (channels never leave their head)
    partner: str | None = None  # a qk space names the v space of the same attention (one head matching for both)

    @property
    def shared(self) -> bool:
        return self.kind == "shared"


@dataclass(frozen=True)
class ParamRule:
    """Output rows (dim 0) and input columns (dim 1, None for 1-D tensors) of one parameter, as spaces."""

    rows: tuple[str, ...]
    cols: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Observation:
    """A tensor in `space`: the input or output of `module` (channels on dim 1 of 4-D tensors, else last)."""

    module: str
    where: str  # "input" | "output"
    space: str


@dataclass
class UNetGraph:
    blocks: list[str]
    spaces: dict[str, Space] = field(default_factory=dict)
    rules: dict[str, ParamRule] = field(default_factory=dict)
    observations: list[Observation] = field(default_factory=list)
    group_norms: dict[str, int] = field(default_factory=dict)  # GroupNorm module -> groups (docs and tests)

    def matched_spaces(self, depth: int | None) -> list[Space]:
        """Spaces ZipIt! matches by feature correlation: not shared, and first written in the first `depth`
        blocks (all blocks when depth is None)."""
        limit = len(self.blocks) if depth is None else depth
        return [s for s in self.spaces.values() if not s.shared and s.block < limit]

    def signature(self) -> list[tuple]:
        """What two U-Nets must agree on to be zipped: every space's name, size and heads."""
        return [(s.name, s.size, s.heads) for s in self.spaces.values()]


def describe_unet(unet: nn.Module) -> UNetGraph:
    """The spaces, parameter rules and observation points of an SD 1.x-shaped `UNet2DConditionModel`."""
    return _Builder(unet).build()


class _Builder:
    def __init__(self, unet: nn.Module):
        self.unet = unet
        self.config = unet.config
        blocks = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
        blocks.append("mid_block")
        blocks += [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
        self.graph = UNetGraph(blocks=blocks)

    # ---- bookkeeping -------------------------------------------------------------------------------------
    def space(self, name: str, size: int, kind: str, block: int, heads: int = 1, partner: str | None = None) -> str:
        self.graph.spaces[name] = Space(name, size, kind, block, heads, partner)
        return name

    def rule(self, module: str, rows: tuple[str, ...], cols: tuple[str, ...] | None = None) -> None:
        """Weight (and bias, if any) of a linear or conv layer; for norm layers, cols is None."""
        layer = self.unet.get_submodule(module)
        self.graph.rules[f"{module}.weight"] = ParamRule(rows, cols)
        if getattr(layer, "bias", None) is not None:
            self.graph.rules[f"{module}.bias"] = ParamRule(rows)

    def norm(self, module: str, spaces: tuple[str, ...]) -> None:
        layer = self.unet.get_submodule(module)
        if isinstance(layer, nn.GroupNorm):
            self.graph.group_norms[module] = layer.num_groups
        elif not isinstance(layer, nn.LayerNorm):
            raise _unsupported(module, f"a {type(layer).__name__} norm")
        if layer.weight is not None:
            self.rule(module, spaces)

    def observe(self, module: str, where: str, space: str) -> None:
        self.graph.observations.append(Observation(module, where, space))

    # ---- the walk ------------------------------------------------------------------------------------------
    def build(self) -> UNetGraph:
        self.check_config()
        unet, c = self.unet, self.config
        self.space(SHARED_INPUT, c.in_channels, "shared", -1)
        self.space(SHARED_TIME, unet.time_embedding.linear_1.in_features, "shared", -1)
        self.space(SHARED_TEXT, c.cross_attention_dim, "shared", -1)
        self.space(SHARED_OUTPUT, c.out_channels, "shared", -1)

        # Time embedding: sinusoids -> linear_1 -> SiLU -> linear_2; every ResNet block reads SiLU(linear_2).
        t1 = self.space("time_embedding.linear_1", unet.time_embedding.linear_1.out_features, "time", 0)
        self.temb = self.space("time_embedding.linear_2", unet.time_embedding.linear_2.out_features, "time", 0)
        self.rule("time_embedding.linear_1", (t1,), (SHARED_TIME,))
        self.rule("time_embedding.linear_2", (self.temb,), (t1,))
        self.observe("time_embedding.linear_2", "input", t1)
        self.observe("time_embedding", "output", self.temb)

        stream = self.space("conv_in", unet.conv_in.out_channels, "stream", 0)
        self.rule("conv_in", (stream,), (SHARED_INPUT,))
        self.observe("conv_in", "output", stream)
        skips = [stream]  # the down path's outputs, in the order the up blocks pop them from the end

        block = 0
        for i, down in enumerate(unet.down_blocks):
            name = f"down_blocks.{i}"
            attentions = getattr(down, "attentions", None) or [None] * len(down.resnets)
            for j, (resnet, attention) in enumerate(zip(down.resnets, attentions, strict=True)):
                stream = self.resnet(f"{name}.resnets.{j}", resnet, (stream,), block)
                if attention is not None:
                    stream = self.transformer(f"{name}.attentions.{j}", attention, stream, block)
                skips.append(stream)
            if down.downsamplers is not None:
                stream = self.sampler(f"{name}.downsamplers.0", stream, block)
                skips.append(stream)
            block += 1

        mid = unet.mid_block
        stream = self.resnet("mid_block.resnets.0", mid.resnets[0], (stream,), block)
        for j, (attention, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:], strict=True)):
            stream = self.transformer(f"mid_block.attentions.{j}", attention, stream, block)
            stream = self.resnet(f"mid_block.resnets.{j + 1}", resnet, (stream,), block)
        block += 1

        for i, up in enumerate(unet.up_blocks):
            name = f"up_blocks.{i}"
            attentions = getattr(up, "attentions", None) or [None] * len(up.resnets)
            for j, (resnet, attention) in enumerate(zip(up.resnets, attentions, strict=True)):
                # The skip is concatenated after the stream: the input dimension is [stream; skip].
                stream = self.resnet(f"{name}.resnets.{j}", resnet, (stream, skips.pop()), block)
                if attention is not None:
                    stream = self.transformer(f"{name}.attentions.{j}", attention, stream, block)
            if up.upsamplers is not None:
                stream = self.sampler(f"{name}.upsamplers.0", stream, block)
            block += 1
        if skips:
            raise _unsupported("up_blocks", f"{len(skips)} skip connections left unread")

        self.norm("conv_norm_out", (stream,))
        self.rule("conv_out", (SHARED_OUTPUT,), (stream,))
        self.check_coverage()
        return self.graph

    def resnet(self, name: str, resnet: nn.Module, inputs: tuple[str, ...], block: int) -> str:
        if type(resnet).__name__ != "ResnetBlock2D":
            raise _unsupported(name, type(resnet).__name__)
        if resnet.time_embedding_norm != "default" or resnet.upsample is not None or resnet.downsample is not None:
            raise _unsupported(name, "a ResNet block with scale-shift time embedding or resampling")
        inner = self.space(name, resnet.conv1.out_channels, "resnet", block)
        self.norm(f"{name}.norm1", inputs)
        self.rule(f"{name}.conv1", (inner,), inputs)
        if resnet.time_emb_proj is not None:  # added to conv1's output: it writes the same space
            self.rule(f"{name}.time_emb_proj", (inner,), (self.temb,))
        self.norm(f"{name}.norm2", (inner,))
        # The features conv2 reads: after norm2 and SiLU, as ZipIt! matches activations.
        self.observe(f"{name}.conv2", "input", inner)
        if resnet.conv_shortcut is not None:
            out = self.space(f"{name}.out", resnet.conv2.out_channels, "stream", block)
            self.rule(f"{name}.conv_shortcut", (out,), inputs)
        else:
            if len(inputs) != 1:
                raise _unsupported(name, "a concatenated input without a shortcut conv")
            out = inputs[0]  # identity shortcut: conv2 adds into the residual stream it read
        self.rule(f"{name}.conv2", (out,), (inner,))
        self.observe(name, "output", out)
        return out

    def transformer(self, name: str, model: nn.Module, stream: str, block: int) -> str:
        if type(model).__name__ != "Transformer2DModel" or not model.is_input_continuous:
            raise _unsupported(name, type(model).__name__)
        inner = self.space(name, model.inner_dim, "transformer", block)
        self.norm(f"{name}.norm", (stream,))
        self.rule(f"{name}.proj_in", (inner,), (stream,))
        self.observe(f"{name}.proj_in", "output", inner)
        for k, layer in enumerate(model.transformer_blocks):
            prefix = f"{name}.transformer_blocks.{k}"
            if layer.norm_type != "layer_norm" or layer.only_cross_attention or layer.pos_embed is not None:
                raise _unsupported(prefix, f"a transformer block with norm_type {layer.norm_type!r}")
            self.norm(f"{prefix}.norm1", (inner,))
            self.attention(f"{prefix}.attn1", layer.attn1, inner, inner, block)
            if layer.attn2 is not None:
                self.observe(f"{prefix}.norm2", "input", inner)  # the stream after self-attention
                self.norm(f"{prefix}.norm2", (inner,))
                self.attention(f"{prefix}.attn2", layer.attn2, inner, SHARED_TEXT, block)
                self.observe(f"{prefix}.norm3", "input", inner)  # after cross-attention
            self.norm(f"{prefix}.norm3", (inner,))
            self.feed_forward(f"{prefix}.ff", layer.ff, inner, block)
            self.observe(prefix, "output", inner)
        self.rule(f"{name}.proj_out", (stream,), (inner,))
        self.observe(name, "output", stream)
        return stream  # the transformer's output is added to its input: same residual stream

    def attention(self, name: str, attn: nn.Module, query_in: str, context_in: str, block: int) -> None:
        if any(getattr(attn, a, None) is not None for a in ("norm_q", "norm_k", "group_norm", "spatial_norm")):
            raise _unsupported(name, "an attention with q/k/group/spatial norms")
        if attn.residual_connection or getattr(attn, "norm_cross", None) is not None:
            raise _unsupported(name, "an attention with a residual connection or cross norm")
        inner = attn.to_q.out_features
        v = self.space(f"{name}.v", attn.to_v.out_features, "v", block, heads=attn.heads)
        qk = self.space(f"{name}.qk", inner, "qk", block, heads=attn.heads, partner=v)
        self.rule(f"{name}.to_q", (qk,), (query_in,))
        self.rule(f"{name}.to_k", (qk,), (context_in,))  # cross-attention: keys from the (shared) text
        self.rule(f"{name}.to_v", (v,), (context_in,))
        self.rule(f"{name}.to_out.0", (query_in,), (v,))
        self.observe(f"{name}.to_q", "output", qk)
        self.observe(f"{name}.to_out.0", "input", v)  # per-head attention outputs: what to_out reads

    def feed_forward(self, name: str, ff: nn.Module, stream: str, block: int) -> None:
        first, last = ff.net[0], ff.net[-1]
        kind = type(first).__name__
        if kind == "GEGLU":  # proj writes [value; gate], multiplied channel by channel: one space twice
            hidden = self.space(name, first.proj.out_features // 2, "ff", block)
            self.rule(f"{name}.net.0.proj", (hidden, hidden), (stream,))
        elif kind == "GELU":
            hidden = self.space(name, first.proj.out_features, "ff", block)
            self.rule(f"{name}.net.0.proj", (hidden,), (stream,))
        else:
            raise _unsupported(name, f"a {kind} feed-forward")
        last_name = f"{name}.net.{len(ff.net) - 1}"
        if not isinstance(last, nn.Linear):
            raise _unsupported(last_name, type(last).__name__)
        self.rule(last_name, (stream,), (hidden,))
        self.observe(last_name, "input", hidden)

    def sampler(self, name: str, stream: str, block: int) -> str:
        sampler = self.unet.get_submodule(name)
        if getattr(sampler, "conv", None) is None or getattr(sampler, "norm", None) is not None:
            raise _unsupported(name, f"a {type(sampler).__name__} without a conv, or with a norm")
        if getattr(sampler, "use_conv_transpose", False):
            raise _unsupported(name, "a transposed-conv upsampler")
        out = self.space(name, sampler.conv.out_channels, "stream", block)
        self.rule(f"{name}.conv", (out,), (stream,))
        self.observe(name, "output", out)
        return out

    # ---- checks ----------------------------------------------------------------------------------------------
    def check_config(self) -> None:
        c, unet = self.config, self.unet
        problems = {
            "class_embed_type": c.class_embed_type,
            "addition_embed_type": c.addition_embed_type,
            "encoder_hid_dim": c.encoder_hid_dim,
            "time_cond_proj_dim": c.time_cond_proj_dim,
            "num_class_embeds": c.num_class_embeds,
            "time_embedding_act_fn": c.time_embedding_act_fn,
            "timestep_post_act": c.timestep_post_act,
        }
        for option, value in problems.items():
            if value is not None:
                raise _unsupported("config", f"{option}={value!r} (only SD 1.x-style U-Nets are described)")
        blocks = [(b, DOWN_BLOCKS) for b in unet.down_blocks] + [(b, UP_BLOCKS) for b in unet.up_blocks]
        blocks.append((unet.mid_block, MID_BLOCKS))
        for module, allowed in blocks:
            if type(module).__name__ not in allowed:
                raise _unsupported("config", f"a {type(module).__name__} block (supported: {', '.join(allowed)})")

    def check_coverage(self) -> None:
        """Every parameter has a rule and every rule fits its tensor, so nothing is merged by accident."""
        state = self.unet.state_dict()
        sizes = {name: s.size for name, s in self.graph.spaces.items()}
        for key, value in state.items():
            rule = self.graph.rules.get(key)
            if rule is None:
                raise CheckpointError("ZipIt! does not know which channels this parameter mixes", key=key)
            rows = sum(sizes[s] for s in rule.rows)
            cols = None if rule.cols is None else sum(sizes[s] for s in rule.cols)
            if value.shape[0] != rows or (cols is not None and (value.ndim < 2 or value.shape[1] != cols)):
                raise CheckpointError(
                    f"shape {tuple(value.shape)} does not fit the U-Net description ({rows} x {cols})", key=key
                )
        for key in self.graph.rules:
            if key not in state:
                raise CheckpointError("the U-Net description names a parameter the model lacks", key=key)


def _unsupported(module: str, what: str) -> CheckpointError:
    return CheckpointError(f"ZipIt! cannot merge {what}", key=module)


def feature_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """Observations [samples, channels] from an activation: [B, C, H, W] (channels first) or [..., C]."""
    if tensor.ndim == 4:
        return tensor.permute(0, 2, 3, 1).reshape(-1, tensor.shape[1])
    return tensor.reshape(-1, tensor.shape[-1])
