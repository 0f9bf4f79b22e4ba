"""FeatureFusion for one layer, as plain tensor maths (paper §4.3–4.4; see DESIGN.md "FeatureFusion, precisely").

A layer of N models with weights W_m of shape [n, d] (conv kernels flattened to [n, c*k*k]) is stacked into
K = [W_1; ...; W_N] of shape [N*n, d], model 1 being the base. Feeding random inputs x ~ N(0, I_d) gives
features F = K x. For every base neuron i and every neuron j of K:

    P_ij = Pearson correlation of (F_i, F_j)      S_ij = regression slope      C_ij = |P_ij| * S_ij

and the merged layer is W = C K (biases: b = C [b_1; ...; b_N]), with C normalised per row.

Statistics. For x ~ N(0, I), Cov(k_i.x, k_j.x) = k_i.k_j and Var(k_i.x) = |k_i|^2, so the paper's sampled
statistics converge to dot products of the weights. `exact` mode uses those (no noise, no seed);
`sampled` mode draws the inputs as the paper does. Both feed the same `coefficients` function.

Choices the paper leaves open (each an option, defaults in `FeatureFusionOptions`):
- slope: `rescale` = cov_ij / var_j, the factor that makes k_j look like k_i (if k_j = m k_i it is 1/m, so
  C_ij k_j = k_i); `regress` = cov_ij / var_i, the slope of the fit of k_j on k_i, as in the authors' code
  (it gives m, so C_ij k_j = m^2 k_i).
- threshold: pairs with |P_ij| below it get no weight. P_ii = 1, so a base neuron always keeps itself.
- normalization: `convex` = weights |P_ij| / sum_j |P_ij| times the slope (a convex blend of rescaled
  neurons); `paper` = C_ij / sum_j C_ij (eq. 16; the sum can be ~0 or negative once slopes are negative, in
  which case that neuron is left as the base's and counted); `column` = C_ij / sum_i' |C_i'j| over all N*n
  rows of the full correlation matrix, as in the authors' code.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass

import torch

from featurefusion.errors import RecipeError

SLOPES = ("rescale", "regress")
NORMALIZATIONS = ("convex", "paper", "column")
MODES = ("exact", "sampled")
SAMPLE_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
# Row sums of the `paper` normalisation with a smaller magnitude than this are treated as degenerate.
DEGENERATE_ROW_SUM = 1e-6


@dataclass(frozen=True)
class FeatureFusionOptions:
    mode: str = "exact"
    threshold: float = 0.7
    slope: str = "rescale"
    normalization: str = "convex"
    samples: int = 2048
    seed: int = 0
    sample_dtype: str = "float32"
    chunk_rows: int = 1024  # base neurons processed at once; bounds the [rows, N*n] matrices in memory

    def __post_init__(self):
        checks = [
            (self.mode in MODES, f"mode must be one of {MODES}"),
            (self.slope in SLOPES, f"slope must be one of {SLOPES}"),
            (self.normalization in NORMALIZATIONS, f"normalization must be one of {NORMALIZATIONS}"),
            (0.0 <= self.threshold <= 1.0, "threshold must lie in [0, 1]"),
            (self.samples >= 2, "samples must be at least 2"),
            (self.sample_dtype in SAMPLE_DTYPES, f"sample_dtype must be one of {tuple(SAMPLE_DTYPES)}"),
            (self.chunk_rows >= 1, "chunk_rows must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise RecipeError(f"FeatureFusion option: {message}")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class LayerStatistics:
    """Second moments of the layer's features: covariances of base neurons with every neuron, variances."""

    cov: torch.Tensor  # [n, N*n]
    var: torch.Tensor  # [N*n]
    column_l1: torch.Tensor | None = None  # [N, N*n]: per model block, sum over its rows of |C| (column mode)


def layer_seed(seed: int, layer: str) -> int:
    # Each layer gets its own stream so results do not depend on the order layers are processed in.
    return (seed * 1_000_003 + zlib.crc32(layer.encode())) % (2**63)


def layer_statistics(stack: torch.Tensor, n: int, options: FeatureFusionOptions, layer: str) -> LayerStatistics:
    """`stack` is K, [N*n, d] in float32. Returns exact or sampled second moments."""
    if options.mode == "exact":
        features = stack
        var = (stack * stack).sum(dim=1)
        scale = 1.0
    else:
        dtype = SAMPLE_DTYPES[options.sample_dtype]
        gen = torch.Generator().manual_seed(layer_seed(options.seed, layer))
        x = torch.randn(stack.shape[1], options.samples, generator=gen, dtype=torch.float32).to(dtype)
        features = (stack.to(dtype) @ x).float()  # F = K x, one column per sample
        del x
        features -= features.mean(dim=1, keepdim=True)
        scale = 1.0 / (options.samples - 1)
        var = (features * features).sum(dim=1) * scale
    cov = (features[:n] @ features.T) * scale
    stats = LayerStatistics(cov=cov, var=var)
    if options.normalization == "column":
        stats.column_l1 = _column_l1_by_block(features, var, n, scale, options)
    return stats


def _column_l1_by_block(features, var, n, scale, options) -> torch.Tensor:
    """Sum over the rows of each model of |C_i'j| for the full [N*n, N*n] matrix, one block of rows at a time."""
    total = features.shape[0]
    blocks = torch.zeros(total // n, total)
    for start in range(0, total, options.chunk_rows):
        rows = torch.arange(start, min(start + options.chunk_rows, total))
        cov = (features[rows] @ features.T) * scale
        raw = _raw_coefficients(cov, var, rows, options)
        block_of_row = rows // n
        blocks.index_add_(0, block_of_row, raw.abs())
    return blocks


def _raw_coefficients(cov: torch.Tensor, var: torch.Tensor, rows: torch.Tensor, options: FeatureFusionOptions):
    """|P| * S with |P| < threshold zeroed, for the given rows of the full matrix (cov is [len(rows), N*n])."""
    abs_p, slope = _correlation_and_slope(cov, var, rows, options)
    abs_p[abs_p < options.threshold] = 0.0
    return abs_p * slope


def _correlation_and_slope(cov, var, rows, options):
    var_i = var[rows].unsqueeze(1)
    var_j = var.unsqueeze(0)
    denom = torch.sqrt(var_i * var_j)
    abs_p = torch.where(denom > 0, cov.abs() / denom.clamp_min(torch.finfo(torch.float32).tiny), 0.0).clamp_(max=1.0)
    ref = var_j if options.slope == "rescale" else var_i
    slope = torch.where(ref > 0, cov / ref.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    # A neuron is perfectly correlated with itself with slope 1, even when it is all zeros.
    local = torch.arange(len(rows))
    abs_p[local, rows] = 1.0
    slope[local, rows] = 1.0
    return abs_p, slope


def correlation_magnitude(stats: LayerStatistics) -> torch.Tensor:
    """|P| of every base neuron with every neuron, [n, N*n]."""
    rows = torch.arange(stats.cov.shape[0])
    neutral = FeatureFusionOptions()
    return _correlation_and_slope(stats.cov, stats.var, rows, neutral)[0]


@dataclass
class Coefficients:
    matrix: torch.Tensor  # [n, N*n], the C of W = C K
    degenerate_rows: int  # rows left as the base's because their `paper` normaliser vanished
    kept: int  # entries with |P| >= threshold


def coefficients(
    stats: LayerStatistics, options: FeatureFusionOptions, rows: torch.Tensor | None = None
) -> Coefficients:
    """Normalised coefficient rows for base neurons `rows` (default: all n)."""
    n = stats.cov.shape[0]
    rows = torch.arange(n) if rows is None else rows
    abs_p, slope = _correlation_and_slope(stats.cov[rows], stats.var, rows, options)
    abs_p[abs_p < options.threshold] = 0.0
    kept = int((abs_p > 0).sum())
    raw = abs_p * slope
    degenerate = 0
    if options.normalization == "convex":
        matrix = raw / abs_p.sum(dim=1, keepdim=True)
    elif options.normalization == "paper":
        z = raw.sum(dim=1, keepdim=True)
        bad = z.abs() < DEGENERATE_ROW_SUM
        degenerate = int(bad.sum())
        matrix = raw / torch.where(bad, 1.0, z)
        if degenerate:
            identity = torch.zeros_like(matrix)
            identity[torch.arange(len(rows)), rows] = 1.0
            matrix = torch.where(bad, identity, matrix)
    else:
        assert stats.column_l1 is not None, "column normalisation needs column_l1 statistics"
        matrix = raw / stats.column_l1.sum(dim=0).clamp_min(torch.finfo(torch.float32).tiny)
    return Coefficients(matrix, degenerate, kept)


def drop_model(stats: LayerStatistics, n: int, model: int) -> LayerStatistics:
    """Statistics as if model `model` (0-based, not the base) had never been in the merge (paper §5.2.3)."""
    total = stats.var.shape[0]
    keep = torch.cat([torch.arange(0, model * n), torch.arange((model + 1) * n, total)])
    column_l1 = None
    if stats.column_l1 is not None:
        blocks = torch.cat([stats.column_l1[:model], stats.column_l1[model + 1 :]])
        column_l1 = blocks[:, keep]
    return LayerStatistics(cov=stats.cov[:, keep], var=stats.var[keep], column_l1=column_l1)


def merge_layer(
    stack: torch.Tensor,
    biases: torch.Tensor | None,
    n: int,
    stats: LayerStatistics,
    options: FeatureFusionOptions,
) -> tuple[torch.Tensor, torch.Tensor | None, Coefficients]:
    """W = C K and b = C [b_1; ...; b_N], computed in row chunks to bound memory."""
    merged = torch.empty(n, stack.shape[1])
    merged_bias = None if biases is None else torch.empty(n)
    degenerate = kept = 0
    for start in range(0, n, options.chunk_rows):
        rows = torch.arange(start, min(start + options.chunk_rows, n))
        coef = coefficients(stats, options, rows)
        merged[rows] = coef.matrix @ stack
        if biases is not None:
            merged_bias[rows] = coef.matrix @ biases
        degenerate += coef.degenerate_rows
        kept += coef.kept
    return merged, merged_bias, Coefficients(torch.empty(0), degenerate, kept)
