"""ZipIt! for diffusion U-Nets (Stoica et al. 2023, "ZipIt! Merging Models from Different Tasks without
Training"; summarised in the FeatureFusion paper §3.1): merge whole models by matching the features they compute.

Unlike the per-tensor methods, ZipIt! needs the models themselves and sample inputs. It

1. runs every model on the same sample inputs (noisy images, timesteps, prompt embeddings) and records, with
   forward hooks, the features of every feature space of the U-Net (`zipit_graph`): the mean and covariance of
   the N·n features of each space, over every pixel or token of every sample;
2. matches features greedily by correlation, within and across models (`zipit_matching`): n merged features
   per space, each the average of a group; attention heads stay whole;
3. builds each merged layer as W = sum_m M_m W_m U_m: the output rows through the merge matrix of the space the
   layer writes, the input columns through the unmerge matrix of the space it reads (eq. 8 of the summary); the
   merge of the previous layer is thus carried into the next. Biases and norm scales/shifts go through M.

Partial zipping (`depth`). The paper zips the first layers and keeps each model's later layers as separate
heads fed with unmerged features. A U-Net must end in one noise prediction and its up path reads the down
path through skip connections, so here the spaces first written in the first `depth` blocks (down blocks,
mid block, up blocks, in the order they run) are matched, and every later space is merged neuron by neuron
(same index with same index: a weight average). Layers beyond the depth that read a zipped space still get its
unmerge, so the boundary is consistent. depth 0 is a uniform soup; None (the default) zips the whole U-Net.

What is exact and what is approximated is listed in docs/zipit.md. In short: linear maps, convolutions,
residual sums (one merge per residual stream), skip concatenations (a block-diagonal unmerge), the time
embedding and cross-attention keys/values (read from the shared text embedding, never merged) are handled
exactly for permutations; averaging matched features through SiLU, GroupNorm/LayerNorm statistics, GEGLU's
product and attention's softmax is ZipIt!'s approximation; GroupNorm groups are not enforced by the matching
(merged channels are placed where model 1 had them, so model 1's groups are kept).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from featurefusion.errors import CheckpointError, DataError, RecipeError
from featurefusion.merge.registry import option
from featurefusion.merge.zipit_graph import UNetGraph, describe_unet, feature_matrix
from featurefusion.merge.zipit_matching import Zip, correlation, match_heads, match_space

log = logging.getLogger(__name__)

# The time embedding's only input is the timestep, so its features are also recorded on every integer timestep
# of the 1000-step training schedule SD 1.x (and the built-in world) use, not only on the sample inputs' few.
TIME_GRID = 1000


@dataclass(frozen=True)
class ZipItOptions:
    """The matching's options. budget and repeat default to the reference code's values."""

    budget: float = option(
        0.125,
        "ZipIt!: within-model budget (the paper's beta): share of a model's merges that may join two of its own "
        "features; 0 pairs every feature with one of another model",
        type=float,
    )
    repeat: float = option(
        0.3,
        "ZipIt!: how strongly a merged group competes for further merges (the paper's alpha); 0 merges pairs "
        "only, which needs exactly two models",
        type=float,
    )
    depth: int | None = option(
        None,
        "ZipIt!: partial zip, the number of U-Net blocks (down, mid, up, in running order) whose features are "
        "matched; later layers are averaged neuron by neuron; 0 is a uniform soup (default: all blocks)",
        type=int,
    )
    positions: int = option(
        4096, "ZipIt!: pixels/tokens per observation point and batch that enter the statistics", type=int
    )

    def __post_init__(self):
        if not 0.0 <= self.budget <= 1.0:
            raise RecipeError(f"ZipIt! option: budget must lie in [0, 1], got {self.budget}")
        if not 0.0 <= self.repeat <= 1.0:
            raise RecipeError(f"ZipIt! option: repeat must lie in [0, 1], got {self.repeat}")
        if self.depth is not None and (isinstance(self.depth, bool) or not isinstance(self.depth, int)):
            raise RecipeError(f"ZipIt! option: depth must be a whole number of blocks or None, got {self.depth!r}")
        if self.depth is not None and self.depth < 0:
            raise RecipeError(f"ZipIt! option: depth must be at least 0, got {self.depth}")
        if isinstance(self.positions, bool) or not isinstance(self.positions, int) or self.positions < 2:
            raise RecipeError(f"ZipIt! option: positions must be a whole number of at least 2, got {self.positions!r}")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ZipItInputs:
    """One batch of what a U-Net sees while denoising."""

    sample: torch.Tensor  # [B, in_channels, H, W]: noisy images (or latents)
    timesteps: torch.Tensor  # [B]
    encoder_hidden_states: torch.Tensor  # [B, tokens, cross_attention_dim]: prompt embeddings

    def check(self, config) -> None:
        b = self.sample.shape[0]
        if self.sample.ndim != 4 or self.sample.shape[1] != config.in_channels:
            raise DataError(
                f"ZipIt! sample inputs must be [B, {config.in_channels}, H, W], got {list(self.sample.shape)}"
            )
        if self.timesteps.shape != (b,):
            raise DataError(f"ZipIt! needs one timestep per sample ({b}), got shape {list(self.timesteps.shape)}")
        ehs = self.encoder_hidden_states
        if ehs.ndim != 3 or ehs.shape[0] != b or ehs.shape[2] != config.cross_attention_dim:
            raise DataError(
                f"ZipIt! prompt embeddings must be [{b}, tokens, {config.cross_attention_dim}], got {list(ehs.shape)}"
            )


def noisy_inputs(
    images: torch.Tensor, prompt_embeddings: torch.Tensor, scheduler, seed: int = 0, batch_size: int = 64
) -> list[ZipItInputs]:
    """Sample inputs as denoising training shows them: each clean image (or latent) noised with the scheduler's
    `add_noise` at a timestep drawn uniformly from its schedule, beside its prompt's embedding. Seeded."""
    if images.shape[0] != prompt_embeddings.shape[0]:
        raise DataError(f"{images.shape[0]} images but {prompt_embeddings.shape[0]} prompt embeddings")
    gen = torch.Generator().manual_seed(seed)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (images.shape[0],), generator=gen)
    noise = torch.randn(images.shape, generator=gen)
    noisy = scheduler.add_noise(images, noise, timesteps)
    return [
        ZipItInputs(noisy[i : i + batch_size], timesteps[i : i + batch_size], prompt_embeddings[i : i + batch_size])
        for i in range(0, images.shape[0], batch_size)
    ]


@dataclass
class ZipItPlan:
    """The U-Net's description and every space's zip: what `apply_plan` turns into weights."""

    graph: UNetGraph
    zips: dict[str, Zip]
    matched: list[str]  # spaces matched by correlation (the others are merged by index)

    def summary(self) -> dict[str, float]:
        """Over the matched spaces' merged features: the share that joins features of several models, the share
        that joins two or more of one model's, and, of the first, the share whose members all have the same index
        in their models (fine-tunes of one base are already aligned, so ZipIt! then mostly averages by index)."""
        total = cross = within = aligned = 0
        for name in self.matched:
            z = self.zips[name]
            members = z.members()
            several = (members > 0).sum(dim=1) > 1
            total += z.size
            cross += int(several.sum())
            within += int((members > 1).any(dim=1).sum())
            index = torch.arange(z.size).repeat(z.models)
            lowest = torch.full((z.size,), z.size).scatter_reduce(0, z.assign, index, "amin")
            highest = torch.full((z.size,), -1).scatter_reduce(0, z.assign, index, "amax")
            aligned += int((several & (lowest == highest)).sum())
        return {
            "merged_features": total,
            "cross_model": cross / max(total, 1),
            "within_model": within / max(total, 1),
            "same_index": aligned / max(cross, 1),
        }


def zipit_unets(
    unets: list[nn.Module], inputs: ZipItInputs | Iterable[ZipItInputs], options: ZipItOptions | None = None
) -> dict[str, torch.Tensor]:
    """The ZipIt! merge of `unets` (same config; the first one anchors channel positions) as a state dict in the
    first U-Net's dtype. `inputs`: one batch or several; every model sees the same ones."""
    plan = zip_plan(unets, inputs, options or ZipItOptions())
    return apply_plan(plan, [u.state_dict() for u in unets], dtype=next(unets[0].parameters()).dtype)


def zip_plan(unets: list[nn.Module], inputs: ZipItInputs | Iterable[ZipItInputs], options: ZipItOptions) -> ZipItPlan:
    """Describe the U-Nets, record their features on `inputs` and match every space."""
    graph = describe_models(unets, options)
    matched = {s.name for s in graph.matched_spaces(options.depth)}
    stats = collect_statistics(unets, graph, inputs, matched, options.positions)
    return match_spaces(graph, stats, len(unets), options, release=True)


def describe_models(unets: list[nn.Module], options: ZipItOptions) -> UNetGraph:
    """The U-Nets' common description, after checking that they and the options can be zipped."""
    if len(unets) < 2:
        raise RecipeError(f"ZipIt! needs at least two models, got {len(unets)}")
    if len(unets) > 2 and options.repeat <= 0:
        raise RecipeError(f"ZipIt! of {len(unets)} models needs repeat > 0 (with repeat 0 it only merges pairs)")
    graph = describe_unet(unets[0])
    for i, other in enumerate(unets[1:], start=2):
        if describe_unet(other).signature() != graph.signature():
            raise CheckpointError(f"ZipIt! needs U-Nets of one architecture; model {i} differs from model 1")
    if options.depth is not None and options.depth > len(graph.blocks):
        raise RecipeError(f"ZipIt! option: depth {options.depth} exceeds this U-Net's {len(graph.blocks)} blocks")
    return graph


def match_spaces(
    graph: UNetGraph, stats: dict[str, Moments], models: int, options: ZipItOptions, release: bool = False
) -> ZipItPlan:
    """Every space's zip: matched by correlation within the depth, the same index elsewhere. Statistics do not
    depend on budget, repeat or depth, so one recording serves a search over them; `release` drops each space's
    statistics once used (SD's widest co-moments are 400 MB each)."""
    matched = graph.matched_spaces(options.depth)
    take = stats.pop if release else stats.__getitem__
    zips = {name: Zip.identity(space.size, models) for name, space in graph.spaces.items()}
    for space in matched:
        if space.kind == "v":
            continue  # matched with its query/key space
        if space.heads > 1:
            corr_qk = take(space.name).correlation()
            corr_v = take(space.partner).correlation()
            zips[space.name], zips[space.partner] = match_heads(
                corr_qk, corr_v, models, space.heads, options.budget, options.repeat
            )
        else:
            corr = take(space.name).correlation()
            zips[space.name] = match_space(corr, models, options.budget, options.repeat)
    return ZipItPlan(graph, zips, [s.name for s in matched])


# ---- features --------------------------------------------------------------------------------------------
class Moments:
    """Running mean and co-moment of feature rows, merged batch by batch (Chan et al.'s update), so that the
    covariance does not suffer from subtracting two large sums."""

    def __init__(self):
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.comoment: torch.Tensor | None = None

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.float()
        n = rows.shape[0]
        mean = rows.mean(dim=0)
        centred = rows - mean
        if self.mean is None:
            self.count, self.mean, self.comoment = n, mean, centred.T @ centred
            return
        delta = mean - self.mean
        total = self.count + n
        # in place: the widest SD spaces' co-moments are 400 MB each
        self.comoment.addmm_(centred.T, centred).addr_(delta, delta, alpha=self.count * n / total)
        self.mean += delta * (n / total)
        self.count = total

    def correlation(self) -> torch.Tensor:
        return correlation(self.comoment)  # scale-free: the co-moment need not be divided by the count


@torch.inference_mode()
def collect_statistics(
    unets: list[nn.Module],
    graph: UNetGraph,
    inputs: ZipItInputs | Iterable[ZipItInputs],
    spaces: set[str],
    positions: int = 4096,
) -> dict[str, Moments]:
    """Joint moments of every model's features, per space: row = one pixel or token of one sample, columns =
    the space's channels of model 1, then model 2, ... At most `positions` rows per observation point and batch
    are kept (a seeded subset, the same rows for every model): high-resolution layers have far more pixels than
    a correlation estimate needs, and the co-moment costs rows x (N n)^2."""
    # Indices into graph.observations, so a point's position subsets do not depend on which spaces are recorded.
    observations = {k: o for k, o in enumerate(graph.observations) if o.space in spaces}
    records: list[dict[int, list[torch.Tensor]]] = [{} for _ in unets]
    handles = []
    batch_number = [0]

    def recorder(model: int, index: int, where: str):
        def hook(module, args, output=None):
            tensor = args[0] if where == "input" else output
            if isinstance(tensor, tuple):  # Transformer2DModel with return_dict=False
                tensor = tensor[0]
            rows = feature_matrix(tensor.detach())
            if rows.shape[0] > positions:
                gen = torch.Generator().manual_seed(index * 1_000_003 + batch_number[0])
                rows = rows[torch.randperm(rows.shape[0], generator=gen)[:positions].to(rows.device)]
            records[model].setdefault(index, []).append(rows.float())

        return hook

    for m, unet in enumerate(unets):
        for k, obs in observations.items():
            module = unet.get_submodule(obs.module)
            if obs.where == "input":
                handles.append(module.register_forward_pre_hook(recorder(m, k, "input")))
            else:
                handles.append(module.register_forward_hook(recorder(m, k, "output")))
    stats = {name: Moments() for name in spaces}

    def fold() -> None:
        for k in sorted(records[0]):
            joint = torch.cat([torch.cat(records[m][k]) for m in range(len(unets))], dim=1)
            stats[observations[k].space].update(joint)
        for record in records:
            record.clear()

    try:
        batches = [inputs] if isinstance(inputs, ZipItInputs) else inputs
        seen = 0
        for batch in batches:
            batch.check(unets[0].config)
            for unet in unets:
                device, dtype = unet.device, unet.dtype
                unet(
                    batch.sample.to(device, dtype),
                    batch.timesteps.to(device),
                    batch.encoder_hidden_states.to(device, dtype),
                )
            fold()
            seen += batch.sample.shape[0]
            batch_number[0] += 1
        if seen == 0:
            raise DataError("ZipIt! needs at least one sample input")
        grid = torch.arange(TIME_GRID)
        for unet in unets:
            unet.time_embedding(unet.time_proj(grid.to(unet.device)).to(unet.dtype))
        fold()
    finally:
        for handle in handles:
            handle.remove()
    empty = [name for name, s in stats.items() if s.count == 0]
    if empty:
        raise RuntimeError(f"no features were recorded for {empty[:3]}")
    return stats


# ---- weights ---------------------------------------------------------------------------------------------
def apply_plan(
    plan: ZipItPlan, states: list[dict[str, torch.Tensor]], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """W = sum_m M_m W_m U_m for every parameter (biases and norm parameters: M b), in float32 maths."""
    out = {}
    for key, rule in plan.graph.rules.items():
        tensors = [state[key].float() for state in states]
        if rule.cols is not None:
            tensors = [_unmerge_columns(t, rule.cols, plan, m) for m, t in enumerate(tensors)]
        merged = _merge_rows(tensors, rule.rows, plan)
        out[key] = merged.to(dtype or states[0][key].dtype)
    return out


def _merge_rows(tensors: list[torch.Tensor], spaces: tuple[str, ...], plan: ZipItPlan) -> torch.Tensor:
    parts, offset = [], 0
    for name in spaces:
        z = plan.zips[name]
        n = z.size
        stacked = torch.cat([t[offset : offset + n] for t in tensors])
        weights = z.merge_weights().reshape(-1, *[1] * (stacked.ndim - 1))
        parts.append(torch.zeros(n, *stacked.shape[1:]).index_add_(0, z.assign, stacked * weights))
        offset += n
    return torch.cat(parts)


def _unmerge_columns(tensor: torch.Tensor, spaces: tuple[str, ...], plan: ZipItPlan, model: int) -> torch.Tensor:
    # Model m's layer expects its own features; each reads its group's merged feature, so the columns of
    # features merged into one position add up there.
    parts, offset = [], 0
    for name in spaces:
        z = plan.zips[name]
        n = z.size
        columns = tensor[:, offset : offset + n]
        part = torch.zeros(tensor.shape[0], n, *tensor.shape[2:])
        parts.append(part.index_add_(1, z.of_model(model), columns))
        offset += n
    return torch.cat(parts, dim=1)
