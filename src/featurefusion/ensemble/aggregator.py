"""The Spatial-Aware Block-Wise (SABW) feature aggregator of AFA (Adaptive Feature Aggregation, §3.3).

For one U-Net block it reads the N member models' outputs of that block, and returns their per-position
convex combination: concat (N·c channels) -> ResNet layer with the time embedding added -> Transformer layer
with cross-attention to the prompt -> 1x1 conv to N channels, initialised to zero -> softmax over models.
The zero-initialised last conv makes every aggregator start as the uniform average of the members' features.

The layers are diffusers' own `ResnetBlock2D` and `Transformer2DModel`, so they behave (and cast, and
attend) like the U-Net's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn


@dataclass(frozen=True)
class AggregatorConfig:
    """Shape of every aggregator of one ensemble; saved with the weights so they load without guessing."""

    n_models: int
    channels: tuple[int, ...]  # feature channels of each aggregated block, in forward order
    cross_attention_dim: int
    hidden_cap: int = 320  # d (paper's hidden dimension) = min(block channels, hidden_cap)
    head_dim: int = 8
    time_channels: int = 64  # sinusoidal timestep features, then an MLP to time_embed_dim
    time_embed_dim: int = 128

    def to_dict(self) -> dict:
        return {**asdict(self), "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, data: dict) -> AggregatorConfig:
        return cls(**{**data, "channels": tuple(data["channels"])})


def _groups(channels: int, preferred: int = 32) -> int:
    # GroupNorm needs a group count dividing the channels; N·c is not always a multiple of 32 (N = 3, c = 4).
    return math.gcd(channels, preferred)


class BlockAggregator(nn.Module):
    """One block's SABW: N features [B, c, h, w] in, their spatially weighted sum out."""

    def __init__(self, n_models: int, channels: int, config: AggregatorConfig):
        super().__init__()
        self.n_models = n_models
        hidden = min(channels, config.hidden_cap)
        heads = max(1, hidden // config.head_dim)
        self.resnet = ResnetBlock2D(
            in_channels=n_models * channels,
            out_channels=hidden,
            temb_channels=config.time_embed_dim,
            groups=_groups(n_models * channels),
            groups_out=_groups(hidden),
        )
        self.transformer = Transformer2DModel(
            num_attention_heads=heads,
            attention_head_dim=hidden // heads,
            in_channels=hidden,
            norm_num_groups=_groups(hidden),
            cross_attention_dim=config.cross_attention_dim,
            use_linear_projection=True,
        )
        self.to_logits = nn.Conv2d(hidden, n_models, kernel_size=1)
        nn.init.zeros_(self.to_logits.weight)
        nn.init.zeros_(self.to_logits.bias)

    def weights(
        self,
        features: list[torch.Tensor],
        temb: torch.Tensor,
        context: torch.Tensor,
        excluded: frozenset[int] = frozenset(),
    ) -> torch.Tensor:
        """Softmax attention over models at every position: [B, N, h, w]; `excluded` models get weight 0."""
        hidden = self.resnet(torch.cat(features, dim=1), temb)
        hidden = self.transformer(hidden, encoder_hidden_states=context, return_dict=False)[0]
        logits = self.to_logits(hidden).float()
        if excluded:
            logits[:, sorted(excluded)] = float("-inf")
        return logits.softmax(dim=1)

    def forward(
        self,
        features: list[torch.Tensor],
        temb: torch.Tensor,
        context: torch.Tensor,
        excluded: frozenset[int] = frozenset(),
    ) -> torch.Tensor:
        if len(features) != self.n_models:
            raise ValueError(f"aggregator built for {self.n_models} models got {len(features)} features")
        weights = self.weights(features, temb, context, excluded).to(features[0].dtype)
        out = weights[:, :1] * features[0]
        for i in range(1, self.n_models):
            out = out + weights[:, i : i + 1] * features[i]
        return out


class AggregatorSet(nn.Module):
    """Every block's aggregator of one ensemble, with the timestep embedding they share (γ(t) in eq. 9)."""

    def __init__(self, config: AggregatorConfig):
        super().__init__()
        self.config = config
        self.time_proj = Timesteps(config.time_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(config.time_channels, config.time_embed_dim)
        self.blocks = nn.ModuleList(BlockAggregator(config.n_models, c, config) for c in config.channels)

    def embed_time(self, timestep: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
        timestep = torch.as_tensor(timestep, device=self.time_embedding.linear_1.weight.device)
        if timestep.ndim == 0:
            timestep = timestep[None]
        timestep = timestep.expand(batch)
        return self.time_embedding(self.time_proj(timestep).to(dtype))
