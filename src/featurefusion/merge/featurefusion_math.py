"""FeatureFusion for one layer, as plain tensor maths (paper §4.3–4.4; see DESIGN.md "FeatureFusion, precisely").

A layer of N models with weights W_m of shape [n, d] (conv kernels flattened to [n, c*k*k]) is stacked into
K = [W_1; ...; W_N] of shape [N*n, d], model 1 being the base. Feeding random inputs x ~ N(0, I_d) gives
features F = K x. For every base neuron i and every neuron j of K:

    P_ij = Pearson correlation of (F_i, F_j)      S_ij = regression slope      C_ij = |P_ij| * S_ij

and the merged layer is W = C K (biases: b = C [b_1; ...; b_N]), with C normalised.

Statistics. For x ~ N(0, I), Cov(k_i.x, k_j.x) = k_i.k_j and Var(k_i.x) = |k_i|^2, so the paper's sampled
statistics converge to the weights' cosines and norms. `exact` mode uses those (no noise, no seed); `sampled`
mode draws inputs as the paper does. Either way a layer is described by unit-length feature rows U (so
P = U_base U^T comes straight out of one matrix product) and each neuron's feature scale sigma.

Slopes are ratios of scales: cov_ij / var_j = P_ij sigma_i / sigma_j, and cov_ij / var_i = P_ij sigma_j / sigma_i.
So C = diag(r) Q diag(c) with Q = |P| * P, and W = C K needs no per-entry slope matrix:

    W = diag(r) Q (diag(c) K)         rescale: r = sigma, c = 1/sigma;   regress: r = 1/sigma, c = sigma

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
from dataclasses import asdict, dataclass, replace

import torch

from featurefusion.errors import RecipeError
from featurefusion.merge.featurefusion_sparse import Pairs, column_l1_by_block, merge_layer_sparse, thresholded_pairs
from featurefusion.merge.registry import option

SLOPES = ("rescale", "regress")
NORMALIZATIONS = ("convex", "paper", "column")
MODES = ("exact", "sampled")
ALGORITHMS = ("sparse", "dense")
SAMPLE_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
# Row sums of the `paper` normalisation with a smaller magnitude than this are treated as degenerate.
DEGENERATE_ROW_SUM = 1e-6
# `--threshold auto` (see `auto_threshold`): per layer, just above the strongest correlation between two
# different neurons, within [AUTO_FLOOR, AUTO_CEILING].
AUTO = "auto"
AUTO_FLOOR = 0.5
AUTO_CEILING = 0.9
AUTO_GAP = 0.01


def threshold_value(text: str) -> float | str:
    """A threshold as the command line gives it: `auto` or a number."""
    return AUTO if str(text).strip().lower() == AUTO else float(text)


# Sampled features take samples x (N * n) floats per layer: beyond this no machine has the memory.
MAX_SAMPLES = 1 << 20


@dataclass(frozen=True)
class FeatureFusionOptions:
    mode: str = option("exact", "exact: closed-form statistics; sampled: the paper's random inputs", choices=MODES)
    threshold: float | str = option(
        AUTO, "neuron pairs with |Pearson| below this get no weight; auto: per layer, just above the strongest "
        "correlation of two different neurons (within 0.5-0.9)", type=threshold_value,
    )  # fmt: skip
    slope: str = option(
        "rescale", "rescale: cov/var_j (k_j rescaled to k_i); regress: cov/var_i (authors' code)", choices=SLOPES
    )
    normalization: str = option(
        "convex", "convex: |P|-weighted blend; paper: divide by sum_j C_ij; column: authors' column L1",
        choices=NORMALIZATIONS,
    )  # fmt: skip
    samples: int = option(2048, "random inputs per layer in sampled mode", type=int)
    seed: int = option(0, "seed of the random draws (FeatureFusion sampled mode, DARE)", type=int)
    sample_dtype: str = option("float32", "dtype of the sampled features", choices=tuple(SAMPLE_DTYPES))
    # sparse: only the pairs that can pass the threshold (featurefusion_sparse); dense: all of P and C K. Same
    # result up to float32 round-off; dense stays for comparison and benchmarks.
    algorithm: str = option("sparse", "sparse: pairs that can pass the threshold only; dense: all of P", cli=False)
    # Base neurons processed at once; bounds the [rows, N*n] matrices in memory.
    chunk_rows: int = option(512, "base neurons processed at once", cli=False)
    # What `auto` chose for each layer: recorded in the recipe, so a replay uses the same values.
    thresholds: dict = option({}, "per-layer thresholds chosen by threshold auto (recorded)", cli=False)

    def __post_init__(self):
        checks = [
            (self.mode in MODES, f"mode must be one of {MODES}"),
            (self.slope in SLOPES, f"slope must be one of {SLOPES}"),
            (self.normalization in NORMALIZATIONS, f"normalization must be one of {NORMALIZATIONS}"),
            (self.threshold == AUTO or _is_fraction(self.threshold), "threshold must be auto or lie in [0, 1]"),
            (all(_is_fraction(t) for t in self.thresholds.values()), "recorded thresholds must lie in [0, 1]"),
            (2 <= self.samples <= MAX_SAMPLES, f"samples must lie in [2, {MAX_SAMPLES}]"),
            (self.sample_dtype in SAMPLE_DTYPES, f"sample_dtype must be one of {tuple(SAMPLE_DTYPES)}"),
            (self.chunk_rows >= 1, "chunk_rows must be positive"),
            (self.algorithm in ALGORITHMS, f"algorithm must be one of {ALGORITHMS}"),
        ]
        for ok, message in checks:
            if not ok:
                raise RecipeError(f"FeatureFusion option: {message}")

    def as_dict(self) -> dict:
        return asdict(self)

    def for_layer(self, threshold: float) -> FeatureFusionOptions:
        """These options with one layer's numeric threshold (what the per-layer maths reads)."""
        return replace(self, threshold=float(threshold), thresholds={})


def _is_fraction(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def auto_threshold(pairs: Pairs, n: int) -> float:
    """The layer's threshold for `auto`, from its pairs with |P| >= AUTO_FLOOR (all of them, exactly).

    Fine-tunes of one base keep each neuron close to the base's neuron of the same index: those pairs are the
    ones FeatureFusion should blend. Two *different* neurons correlating strongly is either chance (small
    layers: the largest chance correlation of unit vectors in d dimensions grows like sqrt(2 ln(pairs) / d))
    or structure, and blending them is what breaks a model at low thresholds. So the threshold goes just
    above the strongest correlation of two different neurons (different index, any model), clamped to
    [AUTO_FLOOR, AUTO_CEILING]: no pair of different neurons below the ceiling is ever blended, and every
    same-index pair above that level is."""
    different = pairs.cols % n != pairs.rows % n
    strongest = float(pairs.values[different].abs().max()) if bool(different.any()) else 0.0
    return min(AUTO_CEILING, max(AUTO_FLOOR, strongest + AUTO_GAP))


@dataclass
class LayerStatistics:
    """What the coefficients of a layer are made from.

    One of `unit` (unit-length feature rows, P computed on demand; dense path), `features` (the rows before
    normalising, which in exact mode are the weights themselves, so nothing is copied; sparse path) or
    `correlation` (P of the base rows with every neuron, as stored for unlearning) is set."""

    sigma: torch.Tensor  # [N*n] feature scale of every neuron (only ratios matter)
    unit: torch.Tensor | None = None  # [N*n, d'] unit-length feature rows
    features: torch.Tensor | None = None  # [N*n, d'] feature rows, of norm sigma
    correlation: torch.Tensor | None = None  # [n, N*n] Pearson P of base neurons with every neuron
    column_l1: torch.Tensor | None = None  # [N, N*n] per model block: sum over its rows of |C| / c_j (column mode)
    # Pairs already found with |P| >= pairs_floor (rows of the first pairs_row_blocks models), e.g. while
    # choosing an automatic threshold: a higher threshold only filters them.
    pairs: Pairs | None = None
    pairs_floor: float = 1.0
    pairs_row_blocks: int = 0
    threshold: float | None = None  # the layer's threshold, once resolved (`auto` or recorded)

    def correlation_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """P of the given base neurons with every neuron; a neuron's correlation with itself is exactly 1."""
        if self.correlation is not None:
            p = self.correlation[rows]
        elif self.unit is not None:
            p = self.unit[rows] @ self.unit.T
        else:
            inverse = inverse_scale(self.sigma)
            p = (self.features[rows] @ self.features.T).mul_(inverse[rows].unsqueeze(1)).mul_(inverse)
        p[torch.arange(len(rows)), rows] = 1.0
        return p


def layer_seed(seed: int, layer: str) -> int:
    # Each layer gets its own stream so results do not depend on the order layers are processed in.
    return (seed * 1_000_003 + zlib.crc32(layer.encode())) % (2**63)


def layer_statistics(stack: torch.Tensor, n: int, options: FeatureFusionOptions, layer: str) -> LayerStatistics:
    """`stack` is K, [N*n, d] in float32. Exact: the weight rows themselves; sampled: F = K x, centred."""
    return resolve_layer(stack, n, options, layer)[0]


def resolve_layer(
    stack: torch.Tensor,
    n: int,
    options: FeatureFusionOptions,
    layer: str,
    threshold: float | None = None,
    pairs: tuple[Pairs, float, int] | None = None,
) -> tuple[LayerStatistics, float]:
    """The layer's statistics and its threshold: `threshold` if given (recorded), else the options' number,
    or for `auto` the value `auto_threshold` picks from these statistics. `pairs` (pairs, floor, row
    blocks) are ones found before from the same statistics, e.g. while planning `auto`."""
    stats = feature_statistics(stack, options, layer)
    if pairs is not None:
        stats.pairs, stats.pairs_floor, stats.pairs_row_blocks = pairs
    blocks = stack.shape[0] // n if options.normalization == "column" else 1
    if threshold is None and options.threshold == AUTO:
        found = thresholded_pairs(stats, n, AUTO_FLOOR, row_blocks=blocks)
        stats.pairs, stats.pairs_floor, stats.pairs_row_blocks = found, AUTO_FLOOR, blocks
        base_rows = found.rows < n
        threshold = auto_threshold(Pairs(found.rows[base_rows], found.cols[base_rows], found.values[base_rows]), n)
    elif threshold is None:
        threshold = options.threshold
    if options.normalization == "column":
        if options.algorithm == "sparse":
            r, _ = slope_factors(stats.sigma, options.slope)
            stats.column_l1 = column_l1_by_block(stats, n, threshold, r)
        else:
            stats.column_l1 = _column_l1_by_block(stats, n, options.for_layer(threshold))
    stats.threshold = float(threshold)
    return stats, float(threshold)


def feature_statistics(stack: torch.Tensor, options: FeatureFusionOptions, layer: str) -> LayerStatistics:
    """Scales and feature rows (unit rows for the dense path; the rows as they are for the sparse one)."""
    if options.mode == "exact":
        features = stack
    else:
        dtype = SAMPLE_DTYPES[options.sample_dtype]
        gen = torch.Generator().manual_seed(layer_seed(options.seed, layer))
        x = torch.randn(stack.shape[1], options.samples, generator=gen, dtype=torch.float32).to(dtype)
        features = (stack.to(dtype) @ x).float()  # one column per sample
        del x
        features -= features.mean(dim=1, keepdim=True)
    sigma = features.norm(dim=1)
    if options.algorithm == "sparse":
        return LayerStatistics(sigma=sigma, features=features)
    unit = features / torch.where(sigma > 0, sigma, 1.0).unsqueeze(1)  # zero neurons stay zero
    return LayerStatistics(sigma=sigma, unit=unit)


def inverse_scale(sigma: torch.Tensor) -> torch.Tensor:
    """1/sigma, and 0 for a zero neuron (it has no direction: it correlates with nothing)."""
    return torch.where(sigma > 0, 1.0 / torch.where(sigma > 0, sigma, 1.0), 0.0)


def slope_factors(sigma: torch.Tensor, slope: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, c) with S_ij = P_ij r_i c_j. A neuron with zero scale gets zero factors: it adds nothing."""
    safe = torch.where(sigma > 0, sigma, 1.0)
    inverse = torch.where(sigma > 0, 1.0 / safe, 0.0)
    return (sigma, inverse) if slope == "rescale" else (inverse, sigma)


def _thresholded(p: torch.Tensor, threshold: float) -> torch.Tensor:
    """|P| with entries below the threshold set to zero."""
    a = p.abs()
    return a.mul_(a >= threshold)


def _column_l1_by_block(stats: LayerStatistics, n: int, options: FeatureFusionOptions) -> torch.Tensor:
    """For the full [N*n, N*n] matrix, sum over the rows of each model of |C_i'j| / c_j = r_i' |P_i'j|^2."""
    total = stats.sigma.shape[0]
    r, _ = slope_factors(stats.sigma, options.slope)
    blocks = torch.zeros(total // n, total)
    for start in range(0, total, options.chunk_rows):
        rows = torch.arange(start, min(start + options.chunk_rows, total))
        a = _thresholded(stats.correlation_rows(rows), options.threshold)
        blocks.index_add_(0, rows // n, a.square_().mul_(r[rows].unsqueeze(1)))
    return blocks


@dataclass
class MergedLayer:
    weight: torch.Tensor  # [n, d]
    bias: torch.Tensor | None
    degenerate_rows: int  # rows left as the base's because their `paper` normaliser vanished
    kept: int  # entries of C with |P| >= threshold


def merge_layer(
    stack: torch.Tensor,
    biases: torch.Tensor | None,
    n: int,
    stats: LayerStatistics,
    options: FeatureFusionOptions,
    record=None,
) -> MergedLayer:
    """W = C K and b = C [b_1; ...; b_N], in chunks of base rows to bound memory.

    `record(rows, cols, values)` (optional) receives the entries of P that pass the threshold, row-major,
    e.g. to store them. With threshold `auto`, the layer's resolved threshold comes from `stats`."""
    if options.threshold == AUTO or options.thresholds:
        if stats.threshold is None:
            raise RecipeError("FeatureFusion: the layer's automatic threshold was not resolved")
        options = options.for_layer(stats.threshold)
    r, c = slope_factors(stats.sigma, options.slope)
    if options.normalization == "column":
        # C_ij / sum_i' |C_i'j| = r_i Q_ij / (sum_i' r_i' |P_i'j|^2): the column factor c_j cancels.
        colsum = stats.column_l1.sum(dim=0)
        c = torch.where((colsum > 0) & (c != 0), 1.0 / torch.where(colsum > 0, colsum, 1.0), 0.0)
    if options.algorithm == "sparse":
        return MergedLayer(*merge_layer_sparse(stack, biases, n, stats, options, r, c, record))
    scaled = stack * c.unsqueeze(1)
    scaled_bias = None if biases is None else biases * c
    weight = torch.empty(n, stack.shape[1])
    bias = None if biases is None else torch.empty(n)
    degenerate = kept = 0
    for start in range(0, n, options.chunk_rows):
        rows = torch.arange(start, min(start + options.chunk_rows, n))
        p = stats.correlation_rows(rows)
        a = _thresholded(p, options.threshold)
        if record is not None:
            local = a.nonzero()
            record(rows[local[:, 0]], local[:, 1], p[local[:, 0], local[:, 1]])
        kept += int(torch.count_nonzero(a))
        q = a * p  # |P| * P: the sign of the correlation is carried by the slope
        if options.normalization == "convex":
            scale = r[rows] / a.sum(dim=1)
        elif options.normalization == "paper":
            z = r[rows] * (q @ c)
            bad = z.abs() < DEGENERATE_ROW_SUM
            degenerate += int(bad.sum())
            scale = torch.where(bad, 0.0, r[rows] / torch.where(bad, 1.0, z))
        else:
            scale = r[rows]
        weight[rows] = (q @ scaled).mul_(scale.unsqueeze(1))
        if bias is not None:
            bias[rows] = (q @ scaled_bias) * scale
        if options.normalization == "paper" and bad.any():
            weight[rows[bad]] = stack[rows[bad]]  # keep the base neuron
            if bias is not None:
                bias[rows[bad]] = biases[rows[bad]]
    return MergedLayer(weight, bias, degenerate, kept)


def drop_model(stats: LayerStatistics, n: int, model: int) -> LayerStatistics:
    """Statistics as if model `model` (0-based, not the base) had never been in the merge (paper §5.2.3)."""
    assert stats.correlation is not None, "unlearning works on stored correlations"
    total = stats.sigma.shape[0]
    keep = torch.cat([torch.arange(0, model * n), torch.arange((model + 1) * n, total)])
    column_l1 = None
    if stats.column_l1 is not None:
        blocks = torch.cat([stats.column_l1[:model], stats.column_l1[model + 1 :]])
        column_l1 = blocks[:, keep]
    return LayerStatistics(
        sigma=stats.sigma[keep], correlation=stats.correlation[:, keep], column_l1=column_l1, threshold=stats.threshold
    )


def coefficient_matrix(stats: LayerStatistics, n: int, options: FeatureFusionOptions) -> torch.Tensor:
    """The normalised C ([n, N*n]) itself, for inspection and tests; merging never builds it."""
    total = stats.sigma.shape[0]
    return merge_layer(torch.eye(total), None, n, stats, options).weight
