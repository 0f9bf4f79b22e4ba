"""Output ensembles: the members' noise predictions averaged (uniformly or with weights), or routed by prompt.

Both are drop-in U-Nets like `AFAUNet`. Routing needs the prompt text, which a U-Net never sees: a
`KeywordRouter` turns each prompt into weights over the members, and `OutputEnsembleUNet.route(prompts)`
sets them for the prompts of the next pipeline call. The pipeline's batch of noisy samples is then a whole
multiple of the prompts (classifier-free guidance stacks the unconditional copy on top), and row i of every
copy gets prompt i's weights, so the unconditional and conditional predictions of one image come from the
same members. A member with zero weight for every row is not run at all.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from featurefusion.ensemble.unet import EnsembleError, MemberEnsemble


class KeywordRouter:
    """Which members serve a prompt: every member whose keywords occur in it (as whole words), averaged.

    `keywords` maps a member index to its words; a prompt with no keyword goes to `fallback` (a member
    index), or to all members uniformly when `fallback` is None.
    """

    def __init__(self, keywords: Mapping[int, Sequence[str]], n_models: int, fallback: int | None = 0):
        for index in [*keywords, *([] if fallback is None else [fallback])]:
            if not 0 <= index < n_models:
                raise EnsembleError(f"routing names model {index}, but the ensemble has {n_models} models")
        self.n_models, self.fallback = n_models, fallback
        self.patterns = {
            index: re.compile(r"\b(" + "|".join(re.escape(w.lower()) for w in words) + r")\b")
            for index, words in keywords.items()
            if words
        }

    def members_of(self, prompt: str) -> list[int]:
        text = prompt.lower()
        return [index for index, pattern in self.patterns.items() if pattern.search(text)]

    def weights(self, prompts: Sequence[str]) -> torch.Tensor:
        rows = torch.zeros(len(prompts), self.n_models)
        for row, prompt in enumerate(prompts):
            chosen = self.members_of(prompt)
            if chosen:
                rows[row, chosen] = 1.0 / len(chosen)
            elif self.fallback is None:
                rows[row] = 1.0 / self.n_models
            else:
                rows[row, self.fallback] = 1.0
        return rows


def parse_keyword_map(text: str, names: Sequence[str]) -> dict[int, list[str]]:
    """`MODEL=word,word;MODEL=word` (MODEL: a member's index or file stem) -> {index: words}."""
    result: dict[int, list[str]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        model, sep, words = part.partition("=")
        if not sep or not words.strip():
            raise EnsembleError(f"routing entry {part!r} is not MODEL=word[,word...]")
        model = model.strip()
        if model.isdigit():
            index = int(model)
        elif model in names:
            index = list(names).index(model)
        else:
            raise EnsembleError(f"routing names {model!r}, which is none of the models ({', '.join(names)})")
        result.setdefault(index, []).extend(w.strip() for w in words.split(",") if w.strip())
    return result


class OutputEnsembleUNet(MemberEnsemble):
    """Σ_i w_i · ε_i(x, t, c): fixed weights (uniform by default) or per-prompt weights from a router."""

    def __init__(self, members: Sequence[UNet2DConditionModel], weights: Sequence[float] | None = None,
                 router: KeywordRouter | None = None):  # fmt: skip
        super().__init__(members)
        weights = torch.full((len(members),), 1.0) if weights is None else torch.tensor(weights, dtype=torch.float32)
        if weights.shape != (len(members),) or (weights < 0).any() or weights.sum() <= 0:
            raise EnsembleError(f"need {len(members)} non-negative weights with a positive sum, got {weights.tolist()}")
        self.weights = weights / weights.sum()
        self.router = router
        self._rows: torch.Tensor | None = None

    @contextmanager
    def route(self, prompts: Sequence[str]):
        """Per-prompt weights for the pipeline calls inside the block (needs a router)."""
        if self.router is None:
            raise EnsembleError("this output ensemble has no keyword router")
        self._rows = self.router.weights(prompts)
        try:
            yield self._rows
        finally:
            self._rows = None

    def row_weights(self, batch: int) -> torch.Tensor:
        if self._rows is None:
            if self.router is not None:
                raise EnsembleError("a routed ensemble must be called inside `with unet.route(prompts):`")
            return self.weights.expand(batch, -1)
        if batch % len(self._rows):
            raise EnsembleError(f"batch of {batch} samples is not a multiple of the {len(self._rows)} routed prompts")
        return self._rows.repeat(batch // len(self._rows), 1)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *args,
                return_dict: bool = True, **kwargs):  # fmt: skip
        weights = self.row_weights(sample.shape[0]).to(sample.device)
        out = None
        for i, unet in enumerate(self.members):
            rows = weights[:, i].nonzero().flatten()
            if rows.numel() == 0:
                continue
            batch = sample.shape[0]
            part = _rows(sample, rows, batch), _rows(timestep, rows, batch), encoder_hidden_states[rows]
            extra = {k: _rows(v, rows, batch) for k, v in kwargs.items()}  # e.g. SDXL's added_cond_kwargs
            eps = unet(*part, *args, return_dict=False, **extra)[0]
            contribution = weights[rows, i].view(-1, 1, 1, 1).to(eps.dtype) * eps
            if out is None:
                out = torch.zeros(sample.shape[0], *eps.shape[1:], dtype=eps.dtype, device=eps.device)
            out = out.index_add(0, rows, contribution)
        if not return_dict:
            return (out,)
        return UNet2DConditionOutput(sample=out)


def _rows(value, rows: torch.Tensor, batch: int):
    """The routed rows of a per-sample tensor (or of every such tensor in a dict); anything else unchanged."""
    if isinstance(value, dict):
        return {k: _rows(v, rows, batch) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch and batch > 1:
        return value[rows]
    return value
