"""Sparse FeatureFusion: the same merged layer as the dense path, computed only where pairs can pass.

At a useful threshold almost every base neuron i correlates above it with nothing but its own copies in the
other models, so of the [n, N*n] matrix P only ~N entries per row survive. The dense path still pays for
the whole of P = U_base U^T and for C K. Here:

1. Candidates. Every pair that could reach |P| >= t is found by a screen that can only err on the side of
   keeping a pair (see `screen_margin` for the bound):
   - base rows against base rows: one Gram matrix G = U_b U_b^T in bfloat16 (~5x the float32 rate here);
   - every other block by the triangle inequality: with g_i the base's unit rows and e_mi = |u_mi - g_i|,
     |u_ai . u_bj| <= |g_i . g_j| + e_ai + e_bj (all rows have length <= 1). Fine-tunes of one base have
     small e, so this leaves the same-index pairs and little else without another product;
   - a block where that bound is too loose (a model far from the base) gets its own bfloat16 screen.
2. Exact statistics: the candidates' correlations in float32, one dot product per pair.
3. W = C K from the sparse coefficients, by index_add, and the normalisations from sums over the pairs.

The result equals the dense path's up to float32 round-off (the order of additions differs); a pair whose
dense float32 P is within round-off (~1e-6) of the threshold may land on the other side.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# bfloat16 keeps 8 significant bits: round-to-nearest moves a value by at most this fraction of it.
BF16_UNIT_ROUNDOFF = 2.0**-8
FP32_UNIT_ROUNDOFF = 2.0**-24
# A block whose triangle bound leaves more candidates than this share of its entries is screened directly.
DIRECT_SCREEN_SHARE = 0.02
# With more candidates than this share of all pairs, one float32 product is cheaper than per-pair dots.
DENSE_SHARE = 0.25
# Elements per gathered chunk ([pairs, d] float32 temporaries), ~64 MB.
CHUNK_ELEMENTS = 1 << 24


@dataclass
class Pairs:
    """Sparse correlations: P[rows[k], cols[k]] = values[k], rows sorted, then cols (as `nonzero` gives)."""

    rows: torch.Tensor  # int64
    cols: torch.Tensor  # int64
    values: torch.Tensor  # float32


def screen_margin(d: int) -> float:
    """How far a bfloat16-screened |P| can fall below the true one, plus the dense path's own float32 error.

    Unit rows a, b rounded to bfloat16 move by |da|, |db| <= u = 2^-8, so |a'.b' - a.b| <= 2u + u^2.
    The product is accumulated in float32 (checked by `_accumulates_in_float32`): at most gamma_d =
    d u32 / (1 - d u32) times sum |a'_k b'_k| <= (1 + u)^2. Rounding the result to bfloat16 adds u times
    its size, <= (1 + u)^2 (1 + gamma_d). And the dense path's float32 P is itself off by up to gamma_d,
    so a pair it keeps may truly lie that far below the threshold."""
    u = BF16_UNIT_ROUNDOFF
    gamma = d * FP32_UNIT_ROUNDOFF / (1 - d * FP32_UNIT_ROUNDOFF)
    size = (1 + u) ** 2
    return 2 * u + u * u + gamma * size + u * size * (1 + gamma) + gamma


@functools.cache
def _accumulates_in_float32() -> bool:
    """The margin assumes bfloat16 products summed in float32 (oneDNN and MKL do). Summing 4096 ones in
    bfloat16 would stall at 256; in float32 it reaches 4096 exactly."""
    ones = torch.ones(1, 4096, dtype=torch.bfloat16)
    return float((ones @ ones.T).item()) == 4096.0


def _screen(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a b^T| for unit rows, cheaply: bfloat16 where its error is bounded, else float32."""
    if _accumulates_in_float32():
        return (a.to(torch.bfloat16) @ b.to(torch.bfloat16).T).float().abs_()
    return (a @ b.T).abs_()


def candidate_pairs(unit: torch.Tensor, n: int, row_blocks: int, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of every pair among the first `row_blocks` blocks of rows and all columns that may have
    |P| >= threshold, in row-major order. Never misses one (see the module docstring)."""
    total, d = unit.shape
    blocks = total // n
    margin = screen_margin(d)
    # Slack for the float32 round-off of the distances themselves.
    cut = threshold - margin - 1e-5
    if cut <= 0:
        rows = torch.arange(row_blocks * n).repeat_interleave(total)
        return rows, torch.arange(total).repeat(row_blocks * n)
    base = unit[:n]
    distance = torch.stack([(unit[m * n : (m + 1) * n] - base).norm(dim=1) for m in range(blocks)])  # [N, n]
    gram = _screen(base, base)  # [n, n]
    found = []
    for a in range(row_blocks):
        for b in range(blocks):
            bound = gram + distance[a].unsqueeze(1) + distance[b].unsqueeze(0)
            mask = bound >= cut
            if a or b:  # the base block is screened directly already
                if int(mask.sum()) > DIRECT_SCREEN_SHARE * n * n + n:
                    mask = _screen(unit[a * n : (a + 1) * n], unit[b * n : (b + 1) * n]) >= threshold - margin
            else:
                mask = gram >= threshold - margin
            if a == b:
                mask.fill_diagonal_(True)  # P_ii = 1 by definition, even for a zero neuron
            local = mask.nonzero()
            found.append((local[:, 0] + a * n, local[:, 1] + b * n))
    rows = torch.cat([r for r, _ in found])
    cols = torch.cat([c for _, c in found])
    order = torch.argsort(rows * total + cols)
    return rows[order], cols[order]


def exact_correlations(unit: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """u_rows . u_cols in float32 for each pair; a neuron's correlation with itself is exactly 1, as in the
    dense path."""
    out = torch.empty(len(rows))
    step = max(1, CHUNK_ELEMENTS // max(1, unit.shape[1]))
    for start in range(0, len(rows), step):
        r, c = rows[start : start + step], cols[start : start + step]
        out[start : start + step] = (unit[r] * unit[c]).sum(dim=1)
    out[rows == cols] = 1.0
    return out


def thresholded_pairs(stats, n: int, threshold: float, row_blocks: int = 1) -> Pairs:
    """The pairs with |P| >= threshold of the first `row_blocks` blocks of rows with every neuron."""
    if stats.unit is None:  # stored correlations (unlearning): base rows only, already sparse
        assert row_blocks == 1, "stored statistics hold the base rows only"
        p = stats.correlation_rows(torch.arange(n))
        local = (p.abs() >= threshold).nonzero()
        return Pairs(local[:, 0], local[:, 1], p[local[:, 0], local[:, 1]])
    rows, cols = candidate_pairs(stats.unit, n, row_blocks, threshold)
    total = stats.unit.shape[0]
    if len(rows) > DENSE_SHARE * row_blocks * n * total:  # a low threshold: most pairs pass anyway
        p = stats.correlation_rows(torch.arange(row_blocks * n))
        local = (p.abs() >= threshold).nonzero()
        return Pairs(local[:, 0], local[:, 1], p[local[:, 0], local[:, 1]])
    values = exact_correlations(stats.unit, rows, cols)
    keep = values.abs() >= threshold
    return Pairs(rows[keep], cols[keep], values[keep])


def column_l1_by_block(stats, n: int, threshold: float, r: torch.Tensor) -> torch.Tensor:
    """Sparse `_column_l1_by_block`: per model block of rows, sum over its rows of r_i' |P_i'j|^2."""
    total = stats.sigma.shape[0]
    blocks = total // n
    pairs = thresholded_pairs(stats, n, threshold, row_blocks=blocks)
    flat = torch.zeros(blocks * total)
    flat.index_add_(0, (pairs.rows // n) * total + pairs.cols, pairs.values.square() * r[pairs.rows])
    return flat.view(blocks, total)


def sparse_product(rows: torch.Tensor, cols: torch.Tensor, coef: torch.Tensor, k: torch.Tensor, n: int) -> torch.Tensor:
    """sum_j coef_ij k_j for each of n output rows, from the pairs (index_add sums in a fixed order)."""
    flat = k.reshape(k.shape[0], -1)
    out = torch.zeros(n, flat.shape[1])
    step = max(1, CHUNK_ELEMENTS // max(1, flat.shape[1]))
    for start in range(0, len(rows), step):
        sl = slice(start, start + step)
        out.index_add_(0, rows[sl], flat[cols[sl]] * coef[sl].unsqueeze(1))
    return out.reshape(n, *k.shape[1:])


def merge_layer_sparse(stack, biases, n, stats, options, r, c, record=None):
    """`merge_layer` from the pairs that pass the threshold. Returns (weight, bias, degenerate, kept)."""
    from featurefusion.merge.featurefusion_math import DEGENERATE_ROW_SUM

    pairs = thresholded_pairs(stats, n, options.threshold)
    if record is not None:
        record(pairs.rows, pairs.cols, pairs.values)
    rows, cols, p = pairs.rows, pairs.cols, pairs.values
    a = p.abs()
    coef = a * p * c[cols]  # |P| P c_j: the sign of the correlation is carried by the slope
    r_base = r[:n]
    bad = None
    if options.normalization == "convex":
        scale = r_base / torch.zeros(n).index_add_(0, rows, a)
    elif options.normalization == "paper":
        z = r_base * torch.zeros(n).index_add_(0, rows, coef)
        bad = z.abs() < DEGENERATE_ROW_SUM
        scale = torch.where(bad, 0.0, r_base / torch.where(bad, 1.0, z))
    else:
        scale = r_base
    weight = sparse_product(rows, cols, coef, stack, n).mul_(scale.unsqueeze(1))
    bias = None
    if biases is not None:
        bias = sparse_product(rows, cols, coef, biases.unsqueeze(1), n).squeeze(1).mul_(scale)
    degenerate = 0
    if bad is not None and bad.any():
        degenerate = int(bad.sum())
        weight[bad] = stack[:n][bad]  # keep the base neuron
        if bias is not None:
            bias[bad] = biases[:n][bad]
    return weight, bias, degenerate, len(rows)
