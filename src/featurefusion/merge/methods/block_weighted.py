"""Block-weighted merging ("merge block weighted", MBW): each specialist enters every UNet block with a weight
of its own, in the format community tools (supermerger, sd-webui-mbw) use.

A weight string lists BASE, then the ldm input blocks IN00.., the middle block M00, and the output blocks
OUT00..: 26 values for SD 1.x/2.x (IN00-IN11, M00, OUT00-OUT11), 20 for SDXL (IN00-IN08, M00, OUT00-OUT08),
in general 2 + 2·levels·(layers per block + 1). As in those tools, the time embedding belongs to IN00 and the
final norm and conv to the last OUT block; BASE weighs the text encoder (and the VAE) when they are merged
(`--text-encoder average`). For specialist m in block b, theta = theta_0 + sum_m w_mb (theta_m - theta_0):
with one specialist that is the tools' (1 - w) A + w B.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from featurefusion.errors import CheckpointError, RecipeError
from featurefusion.io import sd_keys
from featurefusion.io.recipe import ModelRef, Recipe
from featurefusion.merge.base import ModuleTensors
from featurefusion.merge.registry import BuildContext, Built, MergeMethodPlugin, option, per_component, register
from featurefusion.merge.soup import weighted_sum

_INPUT = re.compile(r"\.input_blocks\.(\d+)\.")
_OUTPUT = re.compile(r"\.output_blocks\.(\d+)\.")


def block_names(layout: sd_keys.UNetLayout) -> list[str]:
    """BASE, IN00.., M00, OUT00.. for a UNet of this layout."""
    count = layout.num_down_blocks * layout.slots_per_level
    return ["BASE", *(f"IN{i:02d}" for i in range(count)), "M00", *(f"OUT{i:02d}" for i in range(count))]


def block_of(canonical_key: str, layout: sd_keys.UNetLayout) -> str:
    """The block a canonical key (`unet.down_blocks.0...`) belongs to."""
    component, _, key = canonical_key.partition(".")
    if component != "unet":
        return "BASE"
    try:
        ldm = sd_keys.diffusers_to_ldm("unet", key, layout)
    except KeyError:
        raise CheckpointError("cannot tell which UNet block this key belongs to", None, canonical_key) from None
    if m := _INPUT.search(ldm):
        return f"IN{int(m[1]):02d}"
    if ".middle_block." in ldm:
        return "M00"
    if m := _OUTPUT.search(ldm):
        return f"OUT{int(m[1]):02d}"
    if ".out." in ldm:
        return block_names(layout)[-1]
    return "IN00"  # time embedding (and SDXL's label embedding) come before the first input block


def parse_weights(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise RecipeError(f"block weights must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise RecipeError("empty block-weight string")
    return values


@dataclass(frozen=True)
class BlockWeightOptions:
    block_weights: list[str] | None = option(
        None,
        "block-weighted: per-block weights of each specialist, 'BASE,IN00,...,M00,OUT00,...' (26 values for "
        "SD 1.x, 20 for SDXL); one string per specialist, or one for all; a single number weighs every block",
        nargs="+",
        metavar="WEIGHTS",
    )

    def __post_init__(self):
        if not self.block_weights:
            raise RecipeError("block-weighted needs --block-weights: one 'BASE,IN00,...' string per specialist")
        for text in self.block_weights:
            parse_weights(text)


class BlockWeightedSum:
    """The engine's side: a weighted sum whose weights depend on the block of the module."""

    name = "block-weighted"
    min_models = 2
    reads_all_models = True
    propagates_non_finite = True

    def __init__(self, weights: list[list[float]]):
        self.rows = weights  # one row of block weights per specialist
        self.layout: sd_keys.UNetLayout | None = None
        self.index: dict[str, int] = {}

    def prepare(self, models) -> None:
        base = models[0]
        if base.unet_layout is None:
            raise CheckpointError("block weights need a Stable Diffusion-style UNet", base.path)
        self.layout = base.unet_layout
        names = block_names(self.layout)
        self.index = {name: i for i, name in enumerate(names)}
        if len(self.rows) != len(models) - 1:
            raise RecipeError(f"{len(self.rows)} block-weight strings for {len(models) - 1} specialists")
        for m, row in enumerate(self.rows):
            if len(row) == 1:
                self.rows[m] = row * len(names)
            elif len(row) != len(names):
                raise RecipeError(
                    f"block weights of specialist {m + 1} ({models[m + 1].path}): {len(row)} values given, but "
                    f"this UNet has {len(names)} blocks: {names[0]}, {names[1]}..{names[len(names) // 2 - 1]}, "
                    f"M00, {names[len(names) // 2 + 1]}..{names[-1]}"
                )

    def merge_module(self, module: str, tensors: ModuleTensors) -> dict[str, torch.Tensor]:
        weights = self.linear_weights(module, next(iter(tensors)))
        return {s: weighted_sum(values, weights) for s, values in tensors.items()}

    def linear_weights(self, module: str, suffix: str) -> list[float]:
        block = self.index[block_of(f"{module}.{suffix}", self.layout)]
        specialists = [row[block] for row in self.rows]
        return [1.0 - sum(specialists), *specialists]

    def finish(self) -> None:
        pass


@register
class BlockWeighted(MergeMethodPlugin):
    """Weights per UNet block instead of one per model: early input blocks (composition), the middle block
    and the output blocks (detail, texture, style) can each take a different share of every specialist. The
    values use the community's block-weight format, so presets carry over; `featurefusion search
    --block-search` chooses them on validation prompts (autoMBW). Weights of 0 everywhere give the
    base, 1 everywhere (one specialist) give that specialist."""

    name = "block-weighted"
    title = "Block-weighted"
    order = 80
    Options = BlockWeightOptions
    summary = "a weight per UNet block for each specialist (the 26-value MBW format)"
    source = "community block merging (sd-webui-mbw, supermerger); autoMBW for the search"
    cost = "one pass, like a soup"

    def recipe_options(self, options: BlockWeightOptions, models: list[ModelRef]) -> dict:
        strings = list(options.block_weights)
        if len(strings) == 1:
            strings *= len(models) - 1
        if len(strings) != len(models) - 1:
            raise RecipeError(f"{len(strings)} block-weight strings given for {len(models) - 1} specialists")
        return {"block_weights": strings}

    def build(self, recipe: Recipe, context: BuildContext) -> Built:
        self.check_operation(recipe)
        rows = [parse_weights(text) for text in self.options_of(recipe).block_weights]
        return Built(per_component(recipe.components, BlockWeightedSum(rows)))
