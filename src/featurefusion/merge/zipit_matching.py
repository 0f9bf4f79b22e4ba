"""ZipIt!'s greedy matching: which features of N models become one merged feature (Stoica et al. 2023, §4).

Input: the correlations of the N·n features of one space (n per model, model-major order) over sample inputs.
ZipIt! repeatedly takes the most correlated pair of features (or of groups already formed) and merges them,
until n remain. Pairs may come from two models or from one ("zipping" redundant features of one model frees
room for features the other model needs). Two parameters shape it:

- `budget` (the paper's β, the within-model budget the issue calls α): each model may take part in at most
  `floor((N·n - n) // N · budget)` merges of two groups that start with one of its own features (a group's
  model is that of its lowest-index feature, as in the reference code). budget 0 makes the matching a
  permutation between models, 1 leaves it free. Unlike the reference code, which allows one same-model merge
  more than its budget, the budget is exact here.
- `repeat` (the paper's α): after a merge, the group's correlation with any other feature is the smaller of
  its two parts', times `repeat`; with `repeat` 0 a group is never merged again (pairs only, which limits a
  merge to two models: N·n features cannot shrink to n by pairs when N > 2).

A merged feature is the average of its group (the merge matrix M); every original feature reads its group's
merged feature (the unmerge matrix U, M's pseudo-inverse pattern). Both are kept as one index per feature
(`Zip`): the merged position of each feature. Positions are anchored on the first model: a group holding a
feature of model 1 takes that feature's position (its lowest), the other groups fill the free positions in
order. Merged channels therefore sit where model 1 had them, which keeps model 1's GroupNorm groups and, for a
model zipped with a permuted copy of itself, gives model 1 back exactly.

Attention spaces keep heads whole (`match_heads`): heads are matched as units first (similarity of two heads:
how well each channel of one finds a correlated channel in the other, averaged both ways, for queries/keys and
for values together), then channels are matched inside each group of heads, query/key and value separately.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from featurefusion.errors import RecipeError


@dataclass(frozen=True)
class Zip:
    """How the features of `models` models (model-major, n each) map to n merged features."""

    assign: torch.Tensor  # [models * n] long: the merged position of each feature
    models: int

    @property
    def size(self) -> int:
        return self.assign.numel() // self.models

    @classmethod
    def identity(cls, size: int, models: int) -> Zip:
        """Same index with same index: a plain average of the models, each reading its own channels back."""
        return cls(torch.arange(size).repeat(models), models)

    def of_model(self, model: int) -> torch.Tensor:
        return self.assign[model * self.size : (model + 1) * self.size]

    def merge_weights(self) -> torch.Tensor:
        """Each feature's weight in its merged feature: 1 / the group's size (the rows of M)."""
        counts = torch.bincount(self.assign, minlength=self.size)
        return 1.0 / counts[self.assign].float()

    def members(self) -> torch.Tensor:
        """[n, models]: how many features of each model every merged feature holds."""
        model = torch.arange(self.models).repeat_interleave(self.size)
        table = torch.zeros(self.size, self.models, dtype=torch.long)
        table.index_put_((self.assign, model), torch.ones_like(model), accumulate=True)
        return table


def correlation(covariance: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Pearson correlations from a covariance matrix (one new matrix: SD's widest spaces are 10240 wide); a feature
    that never varies correlates with nothing."""
    std = covariance.diagonal().clamp_min(0).sqrt()
    inverse = torch.where(std > eps, 1.0 / std.clamp_min(eps), torch.zeros_like(std))
    return covariance.mul(inverse.unsqueeze(1)).mul_(inverse.unsqueeze(0))


def greedy_groups(
    similarity: torch.Tensor, labels: torch.Tensor, target: int, budget: float, repeat: float
) -> list[list[int]]:
    """ZipIt!'s greedy merging of `similarity.shape[0]` features (model `labels[i]` each) down to `target` groups.

    The most similar pair is found from each row's cached best entry, so a merge costs O(features) instead of
    a search of the whole matrix; the result is the same as the reference loop's (up to exact ties). numpy,
    because the loop makes many small updates. If only pairs the budget forbids are left (possible inside a
    group of heads of one model), the budget is lifted for the rest of this matching.
    """
    count = similarity.shape[0]
    to_remove = count - target
    if to_remove < 0:
        raise ValueError(f"cannot merge {count} features into {target}")
    if repeat <= 0 and to_remove > count // 2:
        raise RecipeError(f"ZipIt! with repeat 0 merges pairs only: {count} features cannot become {target}")
    none = -np.inf
    sims = similarity.detach().float().cpu().numpy().copy()
    np.fill_diagonal(sims, none)
    origin = labels.long().cpu().numpy().copy()  # a group's model: that of its lowest-index feature
    group = np.arange(count)  # each feature's group, named by the group's lowest feature
    per_model = int((to_remove // len(np.unique(origin))) * budget + 1e-4)
    allowed = np.full(int(origin.max()) + 1, per_model)
    forbidden = allowed <= 0  # models whose budget is spent: no more merges of two of their groups

    def masked(rows: np.ndarray) -> np.ndarray:
        values = sims[rows]
        if not forbidden.any():
            return values
        blocked = forbidden[origin[rows]][:, None] & (origin[rows][:, None] == origin[None, :])
        return np.where(blocked, none, values)

    everything = np.arange(count)

    def refresh_all() -> tuple[np.ndarray, np.ndarray]:
        values = masked(everything)
        return values.max(axis=1), values.argmax(axis=1)

    best, best_at = refresh_all()
    for _ in range(to_remove):
        i = int(best.argmax())
        if best[i] == none:
            if not forbidden.any():
                raise RuntimeError("ZipIt! matching ran out of pairs")
            forbidden[:] = False
            best, best_at = refresh_all()
            i = int(best.argmax())
        j = int(best_at[i])
        keep, drop = min(i, j), max(i, j)
        group[group == drop] = keep
        merged = np.minimum(sims[keep], sims[drop]) * repeat if repeat > 0 else np.full(count, none, np.float32)
        merged[keep] = merged[drop] = none
        sims[drop, :] = none
        sims[:, drop] = none
        sims[keep, :] = merged
        sims[:, keep] = merged
        model = origin[keep]
        if origin[drop] == model:
            allowed[model] -= 1
            if allowed[model] <= 0 and not forbidden[model]:
                forbidden[model] = True
                best, best_at = refresh_all()
                continue
        # Refresh the cached row maxima: rows that pointed at the two merged groups, and rows the new group beats.
        best[drop] = none
        stale = (best_at == keep) | (best_at == drop)
        stale[keep] = True
        stale[drop] = False
        rows = np.flatnonzero(stale)
        if rows.size:
            values = masked(rows)
            best[rows], best_at[rows] = values.max(axis=1), values.argmax(axis=1)
        if forbidden[model]:
            merged = np.where(origin == model, none, merged)
        better = merged > best
        best[better] = merged[better]
        best_at[better] = keep

    groups: dict[int, list[int]] = {}
    for feature, g in enumerate(group.tolist()):
        groups.setdefault(g, []).append(feature)
    return list(groups.values())


def anchored_positions(groups: list[list[int]], target: int) -> torch.Tensor:
    """Merged position of every feature: a group holding one of features 0..target-1 (the anchor model's) takes
    the lowest such index; the others fill the free positions in the order of their lowest feature."""
    count = sum(len(g) for g in groups)
    assign = np.empty(count, dtype=np.int64)
    taken = np.zeros(target, dtype=bool)
    rest = []
    for g in sorted(groups, key=min):
        anchor = min(g)  # the lowest feature: an anchor-model feature if the group has one
        if anchor < target:
            assign[g] = anchor
            taken[anchor] = True
        else:
            rest.append(g)
    free = np.flatnonzero(~taken)
    if len(free) != len(rest):
        raise RuntimeError(f"{len(rest)} groups for {len(free)} free positions")
    for position, g in zip(free.tolist(), rest, strict=True):
        assign[g] = position
    return torch.from_numpy(assign)


def match_space(corr: torch.Tensor, models: int, budget: float, repeat: float) -> Zip:
    """The ZipIt! matching of one space from the correlations of its N·n features."""
    n = corr.shape[0] // models
    labels = torch.arange(models).repeat_interleave(n)
    groups = greedy_groups(corr, labels, n, budget, repeat)
    return Zip(anchored_positions(groups, n), models)


def head_similarity(corr: torch.Tensor, units: int) -> torch.Tensor:
    """[units, units]: for heads u and v, the mean over u's channels of their best correlation with a channel of
    v, averaged with the same from v to u. 1 for a head and a channel-permuted copy of it."""
    d = corr.shape[0] // units
    blocks = corr.reshape(units, d, units, d)
    forward = blocks.amax(dim=3).mean(dim=1)  # [u, v]
    backward = blocks.amax(dim=1).mean(dim=2)  # [u, v]: v's channels' best match in u
    return (forward + backward) / 2


def match_heads(
    corr_qk: torch.Tensor, corr_v: torch.Tensor, models: int, heads: int, budget: float, repeat: float
) -> tuple[Zip, Zip]:
    """Zips of an attention's query/key space and value space that keep every head's channels together and
    move a head's query/key channels and value channels to the same merged head."""
    n = corr_qk.shape[0] // models
    d = n // heads
    units = models * heads
    unit_model = torch.arange(models).repeat_interleave(heads)
    similarity = (head_similarity(corr_qk, units) + head_similarity(corr_v, units)) / 2
    head_groups = greedy_groups(similarity, unit_model, heads, budget, repeat)
    head_position = anchored_positions(head_groups, heads)
    assign_qk = torch.empty(models * n, dtype=torch.long)
    assign_v = torch.empty(models * n, dtype=torch.long)
    for units_in_group in head_groups:
        units_in_group = sorted(units_in_group)  # the anchor (lowest) head first: its channel order is kept
        slot = int(head_position[units_in_group[0]])
        channels = torch.cat([torch.arange(u * d, (u + 1) * d) for u in units_in_group])
        labels = unit_model[units_in_group].repeat_interleave(d)
        for corr, assign in ((corr_qk, assign_qk), (corr_v, assign_v)):
            sub = corr[channels][:, channels]
            if len(units_in_group) == 1:
                groups = [[c] for c in range(d)]
            else:
                groups = greedy_groups(sub, labels, d, budget, repeat)
            assign[channels] = slot * d + anchored_positions(groups, d)
    return Zip(assign_qk, models), Zip(assign_v, models)
