"""Sparse FeatureFusion: the same merged layer as the dense path, computed only where pairs can pass.

At a useful threshold almost every base neuron i correlates above it with nothing but its own copies in the
other models, so of the [n, N*n] matrix P only ~N entries per row survive. The dense path still pays for
the whole of P = U_base U^T and for C K. Here, with k the feature rows (the weights, in exact mode), sigma
their norms and u = k / sigma:

1. Same-index pairs (neuron i of one model with neuron i of another) exactly: one row-wise dot product per
   pair of models, in float32. They also give every neuron's distance to its base neuron,
   e_mi = |u_mi - g_i| (g the base's unit rows), from |a - b|^2 = |a|^2 + |b|^2 - 2 a.b.
2. Every other pair that could reach |P| >= t, by a screen that can only err on the side of keeping a pair:
   - one Gram matrix G = g g^T of the base rows in bfloat16 (~5x the float32 rate on CPUs with bf16
     units), off by at most `screen_margin(d)`;
   - for the rows of model a against the columns of model b, the triangle inequality: all rows have
     length <= 1, so |u_ai . u_bj| <= |g_i . g_j| + e_ai + e_bj. Fine-tunes of one base have small e, so
     this leaves little beyond the same-index pairs without another matrix product;
   - a block where that bound is too loose (a model far from the base) gets its own bfloat16 product.
   The candidates' correlations are then computed exactly in float32, one dot product each.
3. W = C K from the sparse coefficients: the same-index part as N scaled row-wise sums (no gathers), the
   rest by index_add; the normalisations are sums over the pairs.

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
# A block whose triangle bound leaves more candidates than this share of its entries gets its own product.
DIRECT_SCREEN_SHARE = 0.02
# Elements per gathered chunk ([pairs, d] float32 temporaries), ~64 MB.
CHUNK_ELEMENTS = 1 << 24


@dataclass
class Pairs:
    """Sparse correlations: P[rows[k], cols[k]] = values[k], sorted by row, then column (as `nonzero`)."""

    rows: torch.Tensor  # int64
    cols: torch.Tensor  # int64
    values: torch.Tensor  # float32


def float32_dot_error(d: int) -> float:
    """Bound on the float32 round-off of a dot product of two unit-length vectors of length d (gamma_d)."""
    return d * FP32_UNIT_ROUNDOFF / (1 - d * FP32_UNIT_ROUNDOFF)


def screen_slack(d: int) -> float:
    """Float32 round-off of the distances |u_mi - g_i| (from dot products) and of dividing by the norms."""
    return 4 * float32_dot_error(d) + 1e-6


def screen_margin(d: int) -> float:
    """How far a bfloat16-screened |P| can fall below the true one, plus the dense path's own float32 error.

    Rows a, b rounded to bfloat16 move by at most u = 2^-8 of their length, so for unit lengths
    |a'.b' - a.b| <= 2u + u^2. The product is accumulated in float32 (checked by `_accumulates_in_float32`):
    at most gamma_d times sum |a'_k b'_k| <= (1 + u)^2. Rounding the result to bfloat16 adds u times its size,
    <= (1 + u)^2 (1 + gamma_d). Dividing by the norms in float32 adds ~1e-7, covered by the slack the
    callers add. And the dense path's float32 P is itself off by up to gamma_d, so a pair it keeps may
    truly lie that far below the threshold."""
    u = BF16_UNIT_ROUNDOFF
    gamma = float32_dot_error(d)
    size = (1 + u) ** 2
    return 2 * u + u * u + gamma * size + u * size * (1 + gamma) + gamma


@functools.cache
def _accumulates_in_float32() -> bool:
    """The margin assumes bfloat16 products summed in float32 (oneDNN and MKL do). Summing 4096 ones in
    bfloat16 would stall at 256; in float32 it reaches 4096 exactly."""
    ones = torch.ones(1, 4096, dtype=torch.bfloat16)
    return float((ones @ ones.T).item()) == 4096.0


def _screen(a: torch.Tensor, b: torch.Tensor, inv_a: torch.Tensor, inv_b: torch.Tensor) -> torch.Tensor:
    """|P| of the rows of a against those of b, cheaply: bfloat16 where its error is bounded, else float32.
    Rounding to bfloat16 is relative per element, so rounding k instead of u = k / sigma obeys the same bound."""
    if _accumulates_in_float32():
        product = (a.to(torch.bfloat16) @ b.to(torch.bfloat16).T).float()
    else:
        product = a @ b.T
    return product.abs_().mul_(inv_a.unsqueeze(1)).mul_(inv_b.unsqueeze(0))


def _gram_screen(rows: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """`_screen(rows, rows, ...)`, using the symmetry: of the four blocks of the product, the lower-left one is
    the transpose of the upper-right one, so a quarter of the multiplications is saved."""
    low = rows.to(torch.bfloat16) if _accumulates_in_float32() else rows
    half = (rows.shape[0] + 1) // 2
    top, bottom = low[:half], low[half:]
    out = torch.empty(rows.shape[0], rows.shape[0])
    out[:half, :half] = top @ top.T
    out[:half, half:] = top @ bottom.T
    out[half:, half:] = bottom @ bottom.T
    out[half:, :half] = out[:half, half:].T
    return out.abs_().mul_(inverse.unsqueeze(1)).mul_(inverse.unsqueeze(0))


def _inverse(sigma: torch.Tensor) -> torch.Tensor:
    from featurefusion.merge.featurefusion_math import inverse_scale

    return inverse_scale(sigma)


def _rowwise_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,ij->i", a, b)  # a batched product: no [n, d] temporary


def same_index_correlations(features, inverse, n: int, row_blocks: int) -> torch.Tensor:
    """[row_blocks, N, n]: P of neuron i of model a with neuron i of model b, exactly in float32; a neuron
    with itself is exactly 1 (as in the dense path)."""
    blocks = features.shape[0] // n
    out = torch.empty(row_blocks, blocks, n)
    for a in range(row_blocks):
        for b in range(blocks):
            if a == b:
                out[a, b] = 1.0
            elif b < a and b < row_blocks:
                out[a, b] = out[b, a]
            else:
                fa, fb = features[a * n : (a + 1) * n], features[b * n : (b + 1) * n]
                out[a, b] = _rowwise_dot(fa, fb).mul_(inverse[a * n : (a + 1) * n]).mul_(inverse[b * n : (b + 1) * n])
    return out


def _other_candidates(features, inverse, same, n: int, row_blocks: int, threshold: float):
    """(rows, cols) of pairs of different index that may reach |P| >= threshold, per block of rows/columns."""
    total, d = features.shape
    blocks = total // n
    margin, slack = screen_margin(d), screen_slack(d)
    cut = threshold - margin - slack
    length = (inverse > 0).float()  # |u| is 1, or 0 for a zero neuron
    base_len = length[:n]
    distance = torch.stack(
        [
            (base_len + length[m * n : (m + 1) * n] - 2 * same[0, m]).clamp_min_(0).add_(slack).sqrt_()
            for m in range(blocks)
        ]
    )  # [N, n], an upper bound on |u_mi - g_i|
    gram = _gram_screen(features[:n], inverse[:n])
    gram.fill_diagonal_(0.0)  # same-index pairs are computed exactly elsewhere
    widest = distance.amax(dim=1)
    found = []
    for a in range(row_blocks):
        for b in range(blocks):
            level = cut - float(widest[a]) - float(widest[b])
            mask = gram >= level
            if int(torch.count_nonzero(mask)) <= DIRECT_SCREEN_SHARE * n * n:
                i, j = mask.nonzero().unbind(1)
                keep = gram[i, j] + distance[a, i] + distance[b, j] >= cut
                i, j = i[keep], j[keep]
            else:  # this block is far from the base: screen it with its own product
                ra, rb = slice(a * n, (a + 1) * n), slice(b * n, (b + 1) * n)
                block = _screen(features[ra], features[rb], inverse[ra], inverse[rb])
                block.fill_diagonal_(0.0)
                i, j = (block >= threshold - margin - slack).nonzero().unbind(1)
            found.append((i + a * n, j + b * n))
    return found


def exact_correlations(features, inverse, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """P of each pair (rows[k], cols[k]) in float32."""
    out = torch.empty(len(rows))
    step = max(1, CHUNK_ELEMENTS // max(1, features.shape[1]))
    for start in range(0, len(rows), step):
        r, c = rows[start : start + step], cols[start : start + step]
        out[start : start + step] = _rowwise_dot(features[r], features[c]).mul_(inverse[r]).mul_(inverse[c])
    return out


def thresholded_pairs(stats, n: int, threshold: float, row_blocks: int = 1) -> Pairs:
    """The pairs with |P| >= threshold among the first `row_blocks` blocks of rows and every neuron."""
    cached = stats.pairs
    if cached is not None and stats.pairs_floor <= threshold and stats.pairs_row_blocks >= row_blocks:
        keep = (cached.values.abs() >= threshold) & (cached.rows < row_blocks * n)
        return Pairs(cached.rows[keep], cached.cols[keep], cached.values[keep])
    d = 0 if stats.features is None else stats.features.shape[1]
    if stats.features is None or threshold - screen_margin(d) - screen_slack(d) <= 0:
        # Stored correlations (unlearning), or a threshold so low that every pair is a candidate.
        assert row_blocks == 1 or stats.correlation is None, "stored statistics hold the base rows only"
        p = stats.correlation_rows(torch.arange(row_blocks * n))
        local = (p.abs() >= threshold).nonzero()
        return Pairs(local[:, 0], local[:, 1], p[local[:, 0], local[:, 1]])
    features, total = stats.features, stats.features.shape[0]
    inverse = _inverse(stats.sigma)
    same = same_index_correlations(features, inverse, n, row_blocks)
    index = torch.arange(n)
    rows, cols, values = [], [], []
    for a in range(row_blocks):
        for b in range(total // n):
            rows.append(index + a * n)
            cols.append(index + b * n)
            values.append(same[a, b])
    for r, c in _other_candidates(features, inverse, same, n, row_blocks, threshold):
        rows.append(r)
        cols.append(c)
        values.append(exact_correlations(features, inverse, r, c))
    rows, cols, values = torch.cat(rows), torch.cat(cols), torch.cat(values)
    keep = values.abs() >= threshold
    rows, cols, values = rows[keep], cols[keep], values[keep]
    order = torch.argsort(rows * total + cols)
    return Pairs(rows[order], cols[order], values[order])


def column_l1_by_block(stats, n: int, threshold: float, r: torch.Tensor) -> torch.Tensor:
    """Sparse `_column_l1_by_block`: per model block of rows, sum over its rows of r_i' |P_i'j|^2."""
    total = stats.sigma.shape[0]
    blocks = total // n
    pairs = thresholded_pairs(stats, n, threshold, row_blocks=blocks)
    flat = torch.zeros(blocks * total)
    flat.index_add_(0, (pairs.rows // n) * total + pairs.cols, pairs.values.square() * r[pairs.rows])
    return flat.view(blocks, total)


def sparse_product(rows, cols, coef, k: torch.Tensor, n: int) -> torch.Tensor:
    """sum_j coef_ij k_j for each of the n base rows. Same-index pairs (j = i of some model) are added as
    scaled rows, in place; the few others by index_add of gathered rows. The order of additions is fixed."""
    flat = k.reshape(k.shape[0], -1)
    blocks = flat.shape[0] // n
    same = cols % n == rows
    by_model = torch.zeros(blocks, n)
    by_model[cols[same] // n, rows[same]] = coef[same]
    out = flat[:n] * by_model[0].unsqueeze(1)
    for m in range(1, blocks):
        out.addcmul_(flat[m * n : (m + 1) * n], by_model[m].unsqueeze(1))
    rows, cols, coef = rows[~same], cols[~same], coef[~same]
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
