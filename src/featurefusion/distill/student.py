"""The DMM student: a plain diffusers UNet steered by a learned style prompt (DMM paper, A.1).

A codebook holds one learnable embedding per teacher, of the time embedding's width `d`. A style (one entry,
or a convex mix of entries for style mixing, §4.5) goes through an MLP of two d×d linears and is added to the
output of the UNet's `time_embedding`. The UNet itself is untouched, so it stays a stock
`UNet2DConditionModel`: the offset is added by a forward hook, and for one fixed style it is a constant vector
that folds into `time_embedding.linear_2.bias` (`fold_style`), giving an ordinary checkpoint.

The MLP's linears have no bias, so the zero embedding maps to a zero offset, and the second linear starts at
zero, so a fresh student reproduces its base exactly whatever the codebook holds.
"""

from __future__ import annotations

import contextlib
import math

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from featurefusion.errors import FeatureFusionError


class StyleError(FeatureFusionError, ValueError):
    """A style name or mix the student does not know."""


class StylePrompts(nn.Module):
    """Codebook of style embeddings and the MLP that maps a style to a time-embedding offset."""

    def __init__(self, names: list[str], dim: int, seed: int = 0):
        super().__init__()
        if len(set(names)) != len(names):
            raise StyleError(f"style names must be distinct, got {names}")
        self.names = list(names)
        gen = torch.Generator().manual_seed(seed)
        self.codebook = nn.Parameter(torch.randn(len(names), dim, generator=gen))
        self.mlp = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.SiLU(), nn.Linear(dim, dim, bias=False))
        with torch.no_grad():
            bound = 1 / math.sqrt(dim)
            self.mlp[0].weight.uniform_(-bound, bound, generator=gen)
            self.mlp[2].weight.zero_()

    @property
    def dim(self) -> int:
        return self.codebook.shape[1]

    def add(self, names: list[str], seed: int = 1) -> None:
        """New entries at the end (incremental learning, §3.5); the old entries keep their values."""
        clash = [n for n in names if n in self.names]
        if clash:
            raise StyleError(f"styles {clash} are already in the student's codebook")
        gen = torch.Generator().manual_seed(seed)
        new = torch.randn(len(names), self.dim, generator=gen).to(self.codebook)
        self.codebook = nn.Parameter(torch.cat([self.codebook.data, new]))
        self.names += list(names)

    def index(self, name: str) -> int:
        if name not in self.names:
            raise StyleError(f"unknown style {name!r}; the student knows: {', '.join(self.names)}")
        return self.names.index(name)

    def weights(self, style: str | int | dict[str, float]) -> torch.Tensor:
        """A [N] weight vector: one-hot for a name or index, the given convex weights for a mix."""
        w = torch.zeros(len(self.names))
        if isinstance(style, int):
            if not 0 <= style < len(self.names):
                raise StyleError(f"style index {style} out of range 0..{len(self.names) - 1}")
            w[style] = 1.0
        elif isinstance(style, str):
            w[self.index(style)] = 1.0
        else:
            for name, value in style.items():
                w[self.index(name)] += float(value)
            if (w < 0).any() or not math.isclose(float(w.sum()), 1.0, abs_tol=1e-4):
                raise StyleError(f"style weights must be non-negative and sum to 1, got {style}")
        return w

    def offset(self, weights: torch.Tensor) -> torch.Tensor:
        """Time-embedding offsets for style weights [N] or [B, N] -> [d] or [B, d]."""
        return self.mlp(weights.to(self.codebook) @ self.codebook)


def parse_style(text: str) -> str | dict[str, float]:
    """`NAME` or a mix `a=0.5,b=0.5` (weights are normalised to sum 1)."""
    if "=" not in text:
        return text.strip()
    mix: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            raise StyleError(f"cannot read the style mix {text!r}: expected NAME=WEIGHT,NAME=WEIGHT") from None
        if not sep or not name.strip() or weight < 0:
            raise StyleError(f"cannot read the style mix {text!r}: expected NAME=WEIGHT,... with weights >= 0")
        mix[name.strip()] = mix.get(name.strip(), 0.0) + weight
    total = sum(mix.values())
    if total <= 0:
        raise StyleError(f"the style mix {text!r} has zero total weight")
    return {k: v / total for k, v in mix.items()}


class StudentUNet(nn.Module):
    """A UNet plus style prompts. `forward(sample, t, context, style)`; `style` is style weights [N] or [B, N],
    style indices [B] (long), or None (no offset: the plain UNet)."""

    def __init__(self, unet: UNet2DConditionModel, prompts: StylePrompts):
        super().__init__()
        if prompts.dim != time_embedding_dim(unet):
            raise StyleError(f"style width {prompts.dim} != the UNet's time-embedding width {time_embedding_dim(unet)}")
        self.unet = unet
        self.prompts = prompts
        self._offset: torch.Tensor | None = None
        unet.time_embedding.register_forward_hook(self._add_offset)

    @classmethod
    def from_base(cls, unet: UNet2DConditionModel, names: list[str], seed: int = 0) -> StudentUNet:
        return cls(plain_copy(unet), StylePrompts(names, time_embedding_dim(unet), seed))

    @property
    def names(self) -> list[str]:
        return self.prompts.names

    def _add_offset(self, _module, _inputs, output):
        return output if self._offset is None else output + self._offset.to(output.dtype)

    def style_weights(self, style, batch: int) -> torch.Tensor | None:
        if style is None:
            return None
        if isinstance(style, (str, int, dict)):
            return self.prompts.weights(style)
        if style.dtype in (torch.int64, torch.int32):
            return torch.nn.functional.one_hot(style.long(), len(self.names)).float().to(self.prompts.codebook.device)
        return style

    @contextlib.contextmanager
    def styled(self, style, batch: int = 1):
        """Inside, every call of `self.unet` adds the style's offset (for pipelines that call the UNet)."""
        weights = self.style_weights(style, batch)
        self._offset = None if weights is None else self.prompts.offset(weights)
        try:
            yield self.unet
        finally:
            self._offset = None

    def forward(self, sample, timestep, context, style=None):
        with self.styled(style, sample.shape[0]):
            return self.unet(sample, timestep, context).sample


def plain_copy(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A copy without forward hooks (a deepcopy would carry the student's hook, and the student with it)."""
    new = UNet2DConditionModel.from_config(unet.config)
    new.load_state_dict(unet.state_dict())  # float32, whatever the source's dtype
    return new.eval()


def time_embedding_dim(unet: UNet2DConditionModel) -> int:
    return unet.time_embedding.linear_2.out_features


@torch.no_grad()
def fold_style(student: StudentUNet, style) -> UNet2DConditionModel:
    """A plain UNet whose output equals the student's with `style`: the offset folded into the time
    embedding's last bias (exact, as the offset is added right after that linear)."""
    te = student.unet.time_embedding
    if getattr(te, "post_act", None) is not None:
        raise StyleError("this UNet applies an activation inside its time embedding; a style cannot be folded")
    unet = plain_copy(student.unet)
    offset = student.prompts.offset(student.style_weights(style, 1)).to(unet.time_embedding.linear_2.weight)
    if unet.time_embedding.linear_2.bias is None:
        raise StyleError("the UNet's time embedding has no bias to fold a style into")
    unet.time_embedding.linear_2.bias.add_(offset)
    return unet
