"""The AFA ensemble U-Net: N frozen diffusers `UNet2DConditionModel`s run block by block (AFA, Algorithm 1).

At every block each member runs its own layer on the same input, the block's aggregator mixes the N outputs
into one feature, and that feature is the input of every member's next block. Skip connections carry the
aggregated features too, so the up blocks of all members read the same skips.

"Block" is the unit of the original (ldm) U-Net layout that the paper counts (12 down, 1 middle, 12 up for
SD 1.5): `conv_in`; each resnet (+ its attention) of a down block; each downsampler; the middle block;
each resnet (+ attention, + the upsampler after the block's last layer) of an up block. One more aggregator
mixes the members' final noise predictions (after each member's own `conv_norm_out`/`conv_out`).

`AFAUNet` takes the arguments a `UNet2DConditionModel` takes and returns the same output type, so diffusers
pipelines and schedulers, classifier-free guidance and the toy pipeline use it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from featurefusion.ensemble.aggregator import AggregatorConfig, AggregatorSet
from featurefusion.errors import FeatureFusionError

# Config entries that may differ between members without changing the computation graph.
_IGNORED_CONFIG = {"_name_or_path", "_diffusers_version", "_class_name", "_use_default_values"}


class EnsembleError(FeatureFusionError):
    """Members that cannot be ensembled, or aggregators that do not fit them."""


def check_members(members: Sequence[UNet2DConditionModel], names: Sequence[str] | None = None) -> None:
    if not members:
        raise EnsembleError("an ensemble needs at least one model")
    names = list(names or (f"model {i}" for i in range(len(members))))
    first = {k: v for k, v in members[0].config.items() if k not in _IGNORED_CONFIG}
    for name, unet in zip(names[1:], members[1:], strict=True):
        other = {k: v for k, v in unet.config.items() if k not in _IGNORED_CONFIG}
        diff = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        if diff:
            raise EnsembleError(f"{name}: U-Net config differs from {names[0]}'s in {', '.join(diff)}")


def block_channels(unet: UNet2DConditionModel) -> tuple[int, ...]:
    """Channels of every aggregated feature, in the order `AFAUNet.forward` aggregates them."""
    channels = [unet.conv_in.out_channels]
    for block in unet.down_blocks:
        channels += [r.out_channels for r in block.resnets]
        channels += [d.out_channels for d in block.downsamplers or []]
    channels.append(unet.mid_block.resnets[-1].out_channels)
    for block in unet.up_blocks:
        channels += [r.out_channels for r in block.resnets]
    channels.append(unet.conv_out.out_channels)
    return tuple(channels)


def default_aggregator_config(unet: UNet2DConditionModel, n_models: int, **overrides) -> AggregatorConfig:
    return AggregatorConfig(
        n_models=n_models,
        channels=block_channels(unet),
        cross_attention_dim=unet.config.cross_attention_dim,
        **overrides,
    )


class MemberEnsemble(nn.Module):
    """Frozen member U-Nets behind the UNet2DConditionModel attributes diffusers pipelines read, so an ensemble
    can stand in a pipeline's `unet` slot."""

    def __init__(self, members: Sequence[UNet2DConditionModel]):
        super().__init__()
        check_members(members)
        self.members = nn.ModuleList(members)
        for unet in self.members:
            unet.requires_grad_(False).eval()

    @property
    def config(self):
        return self.members[0].config

    @property
    def dtype(self) -> torch.dtype:
        return self.members[0].dtype

    @property
    def device(self) -> torch.device:
        return self.members[0].device


class AFAUNet(MemberEnsemble):
    """N frozen member U-Nets and the trainable aggregators between their blocks."""

    def __init__(self, members: Sequence[UNet2DConditionModel], aggregators: AggregatorSet | None = None, **config):
        super().__init__(members)
        if aggregators is None:
            aggregators = AggregatorSet(default_aggregator_config(members[0], len(members), **config))
        expected = block_channels(members[0])
        if aggregators.config.n_models != len(members) or tuple(aggregators.config.channels) != expected:
            raise EnsembleError(
                f"aggregators were built for {aggregators.config.n_models} models with block channels "
                f"{list(aggregators.config.channels)}; these {len(members)} models have {list(expected)}"
            )
        self.aggregators = aggregators
        self.excluded: frozenset[int] = frozenset()

    def exclude(self, members: Iterable[int] = ()) -> AFAUNet:
        """Leave members out without retraining (`exclude()` brings them all back): they are not run, their
        weight in every aggregator is 0 (softmax over the others), and the base's features fill their slot
        of the aggregators' input. The base (member 0) cannot be left out: it stands in for the others."""
        excluded = frozenset(int(i) for i in members)
        if 0 in excluded or not excluded <= set(range(1, len(self.members))):
            raise EnsembleError(
                f"members to leave out must be among 1..{len(self.members) - 1}, got {sorted(excluded)}"
            )
        self.excluded = excluded
        return self

    def train(self, mode: bool = True):
        # Members stay in eval mode: only the aggregators ever train.
        super().train(mode)
        for unet in self.members:
            unet.eval()
        return self

    # ---- the forward pass -----------------------------------------------------------------------------------
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict | None = None,
        added_cond_kwargs: dict | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
        **unsupported,
    ):
        if any(v is not None for v in unsupported.values()):
            raise EnsembleError(f"AFA ensembles do not support {', '.join(sorted(unsupported))} (ControlNet, adapters)")
        lead = self.members[0]
        sample = sample.contiguous()  # channels-last inputs crash the CPU backward pass (torch 2.13)
        up_factor = 2**lead.num_upsamplers
        forward_upsample_size = any(dim % up_factor for dim in sample.shape[-2:])
        if attention_mask is not None:
            attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if encoder_attention_mask is not None:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if lead.config.center_input_sample:
            sample = 2 * sample - 1.0
        conditioning = [
            None
            if i in self.excluded
            else _member_conditioning(
                u, sample, timestep, encoder_hidden_states, class_labels, timestep_cond, added_cond_kwargs
            )  # fmt: skip
            for i, u in enumerate(self.members)
        ]
        attn = dict(
            cross_attention_kwargs=cross_attention_kwargs,
            attention_mask=attention_mask,
            encoder_attention_mask=encoder_attention_mask,
        )
        temb = self.aggregators.embed_time(timestep, sample.shape[0], sample.dtype)
        blocks = iter(self.aggregators.blocks)

        def mix(layer: Callable[[int, UNet2DConditionModel, torch.Tensor, torch.Tensor], torch.Tensor]):
            features = [
                None if i in self.excluded else layer(i, u, *conditioning[i]) for i, u in enumerate(self.members)
            ]
            features = [features[0] if f is None else f for f in features]  # a left-out member's slot: the base's
            return next(blocks)(features, temb, encoder_hidden_states, self.excluded)

        x = mix(lambda i, u, emb, ctx: u.conv_in(sample))
        skips = [x]
        for b, block in enumerate(lead.down_blocks):
            for j in range(len(block.resnets)):
                x = mix(lambda i, u, emb, ctx, h=x, b=b, j=j: _down_layer(u.down_blocks[b], j, h, emb, ctx, attn))
                skips.append(x)
            for d in range(len(block.downsamplers or [])):
                x = mix(lambda i, u, emb, ctx, h=x, b=b, d=d: u.down_blocks[b].downsamplers[d](h))
                skips.append(x)
        x = mix(lambda i, u, emb, ctx, h=x: _mid(u.mid_block, h, emb, ctx, attn))
        for b, block in enumerate(lead.up_blocks):
            n = len(block.resnets)
            final = b == len(lead.up_blocks) - 1
            size = skips[-n - 1].shape[2:] if forward_upsample_size and not final else None
            for j in range(n):
                skip = skips.pop()
                up = size if j == n - 1 else None
                x = mix(lambda i, u, emb, ctx, h=x, s=skip, b=b, j=j, up=up:
                        _up_layer(u.up_blocks[b], j, h, s, emb, ctx, attn, up))  # fmt: skip
        x = mix(lambda i, u, emb, ctx, h=x: _head(u, h))
        if not return_dict:
            return (x,)
        return UNet2DConditionOutput(sample=x)


def _member_conditioning(unet, sample, timestep, encoder_hidden_states, class_labels, timestep_cond, added):
    """A member's time embedding and text context, computed as `UNet2DConditionModel.forward` does."""
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
    class_emb = unet.get_class_embed(sample=sample, class_labels=class_labels)
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
    if unet.config.addition_embed_type == "image_hint":
        raise EnsembleError("AFA ensembles do not support addition_embed_type 'image_hint'")
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added or {})
    if aug is not None:
        emb = emb + aug
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    context = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
    return emb, context


def _attend(block, j: int, h: torch.Tensor, ctx, attn: dict) -> torch.Tensor:
    attentions = getattr(block, "attentions", None)
    if attentions is None:
        return h
    return attentions[j](h, encoder_hidden_states=ctx, return_dict=False, **attn)[0]


def _down_layer(block, j: int, h, emb, ctx, attn: dict) -> torch.Tensor:
    return _attend(block, j, block.resnets[j](h, emb), ctx, attn)


def _mid(block, h, emb, ctx, attn: dict) -> torch.Tensor:
    if getattr(block, "has_cross_attention", False):
        return block(h, emb, encoder_hidden_states=ctx, **attn)
    return block(h, emb)


def _up_layer(block, j: int, h, skip, emb, ctx, attn: dict, upsample_size) -> torch.Tensor:
    h = _attend(block, j, block.resnets[j](torch.cat([h, skip], dim=1), emb), ctx, attn)
    if j == len(block.resnets) - 1:
        for upsampler in block.upsamplers or []:
            h = upsampler(h, upsample_size)
    return h


def _head(unet, h) -> torch.Tensor:
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)
