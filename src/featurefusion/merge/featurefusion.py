"""The FeatureFusion merge method: applies `featurefusion_math` to every linear and conv layer of a model.

What is merged how:
- Linear weights (2-D) and conv kernels (4-D, 1x1 included, flattened to [out, in*k*k]): FeatureFusion;
  their biases use the same coefficients as their weights.
- GEGLU projections (`ff.net.0.proj`): the two halves of the output (value and gate) are merged as two
  separate layers, since a value neuron and a gate neuron play different roles and must not be blended.
- Everything else that is float (GroupNorm/LayerNorm scales and shifts, ...): averaged uniformly, as the
  authors do; the paper does not cover them.

Unlearning (paper §5.2.3). While merging, what the coefficient matrix C is made of (the correlations P of
base neurons with every neuron that passed the threshold, and every neuron's feature scale) is streamed to
a sidecar file. Removing model j then needs neither model j's file nor a new pass of statistics: drop j's columns,
renormalise, and multiply with the remaining models' weights. The result is exactly the merge of the
remaining models.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from featurefusion.errors import CheckpointError, RecipeError
from featurefusion.io.safetensors_stream import AppendingSafetensorsWriter, SafetensorsReader
from featurefusion.merge.base import ModuleTensors
from featurefusion.merge.featurefusion_math import (
    AUTO,
    FeatureFusionOptions,
    LayerStatistics,
    drop_model,
    merge_layer,
    resolve_layer,
)

log = logging.getLogger(__name__)

SPLIT_IN_HALVES = ("ff.net.0.proj",)  # GEGLU: value and gate halves
COEFFICIENTS_FORMAT = "featurefusion-statistics/2"


class StatisticsSidecar:
    """Per-layer FeatureFusion statistics in a safetensors file, sparse where the threshold allows."""

    def __init__(self, writer: AppendingSafetensorsWriter | None = None, reader: SafetensorsReader | None = None):
        self._writer = writer
        self._reader = reader

    @classmethod
    def create(cls, path: Path, options: FeatureFusionOptions, model_hashes: list[str]) -> StatisticsSidecar:
        meta = {
            "format": COEFFICIENTS_FORMAT,
            "options": json.dumps(options.as_dict(), sort_keys=True),
            "models": json.dumps(model_hashes),
        }
        return cls(writer=AppendingSafetensorsWriter(path, meta))

    @classmethod
    def open(cls, path: Path) -> StatisticsSidecar:
        reader = SafetensorsReader(path)
        if reader.metadata.get("format") != COEFFICIENTS_FORMAT:
            reader.close()
            raise CheckpointError("not a FeatureFusion statistics file", path)
        return cls(reader=reader)

    @property
    def path(self) -> Path:
        return self._writer.path if self._writer else self._reader.path

    @property
    def options(self) -> dict:
        return json.loads(self._reader.metadata["options"])

    @property
    def model_hashes(self) -> list[str]:
        return json.loads(self._reader.metadata["models"])

    def recorder(self, layer: str, n: int, total: int):
        """A `record` callback for `merge_layer` that keeps P where it passed the threshold (the rest gets no
        weight whatever the normalisation, so it need not be kept), and a `finish(stats)` to write it out."""
        indices, values = [], []

        def record(rows: torch.Tensor, cols: torch.Tensor, p: torch.Tensor) -> None:
            indices.append(torch.stack([rows, cols]).to(torch.int32))
            values.append(p)

        def finish(stats: LayerStatistics) -> None:
            self._writer.write(f"{layer}::sigma", stats.sigma)
            self._writer.write(f"{layer}::threshold", torch.tensor([stats.threshold], dtype=torch.float64))
            self._writer.write(f"{layer}::p_index", torch.cat(indices, dim=1).contiguous())
            self._writer.write(f"{layer}::p_value", torch.cat(values).contiguous())
            self._writer.write(f"{layer}::shape", torch.tensor([n, total], dtype=torch.int64))
            if stats.column_l1 is not None:
                self._writer.write(f"{layer}::column_l1", stats.column_l1)

        return record, finish

    def load(self, layer: str) -> LayerStatistics:
        r = self._reader
        try:
            shape = tuple(r.read(f"{layer}::shape").tolist())
            index = r.read(f"{layer}::p_index").long()
            correlation = torch.zeros(shape)
            correlation[index[0], index[1]] = r.read(f"{layer}::p_value")
            sigma = r.read(f"{layer}::sigma")
        except CheckpointError as err:
            raise CheckpointError("statistics missing for a layer of the merge", r.path, layer) from err
        except (IndexError, RuntimeError, ValueError, TypeError) as err:
            # indices out of range, shapes that do not fit: a damaged file, never a crash
            raise CheckpointError(f"corrupt statistics ({err})", r.path, layer) from None
        column_l1 = r.read(f"{layer}::column_l1") if f"{layer}::column_l1" in r else None
        threshold = self.threshold(layer)
        return LayerStatistics(sigma=sigma, correlation=correlation, column_l1=column_l1, threshold=threshold)

    def threshold(self, layer: str) -> float:
        """The threshold the layer was merged with (files written before `auto` hold only the options')."""
        key = f"{layer}::threshold"
        if key in self._reader:
            return float(self._reader.read(key)[0])
        return float(self.options["threshold"])

    def layers(self) -> list[str]:
        return [key.removesuffix("::shape") for key in self._reader.keys() if key.endswith("::shape")]

    def finish(self, model_sha256: str | None = None) -> list:
        """The staged statistics file, published together with the model (`io.atomic.publish`). It records
        the SHA-256 of the model it belongs to (single-file outputs), so `remove` can tell it from the
        statistics of any other merge written to the same path."""
        if not self._writer:
            return []
        if model_sha256:
            self._writer.metadata["merged_sha256"] = model_sha256
        return self._writer.finish()

    @property
    def merged_sha256(self) -> str | None:
        return self._reader.metadata.get("merged_sha256")

    def abort(self) -> None:
        if self._writer:
            self._writer.abort()

    def close(self) -> None:
        if self._reader:
            self._reader.close()


class FeatureFusion:
    """Merge with FeatureFusion; optionally record statistics, or replay recorded ones without one model."""

    name = "featurefusion"
    min_models = 2
    reads_all_models = True
    propagates_non_finite = False  # a NaN neuron can drop out of C, so inputs are checked

    def __init__(
        self,
        options: FeatureFusionOptions,
        record: StatisticsSidecar | None = None,
        replay: StatisticsSidecar | None = None,
        dropped_model: int | None = None,
    ):
        if (replay is None) != (dropped_model is None):
            raise RecipeError("replaying statistics needs the index of the dropped model, and vice versa")
        if dropped_model is not None and dropped_model < 1:
            raise RecipeError("the base model (first model) cannot be removed from a FeatureFusion merge")
        self.options = options
        self.record = record
        self.replay = replay
        self.dropped_model = dropped_model
        self.degenerate_rows = 0
        self.layers = 0
        self._buffer = torch.empty(0)
        self.thresholds: dict[str, float] = {}  # each layer's threshold, as used
        self.planned: dict[str, float] = {}  # thresholds `auto` chose before the merge (see `plan`)
        self._pairs: dict[str, tuple] = {}  # and the pairs it found on the way, reused by the merge

    def _recorded_threshold(self, layer: str) -> float | None:
        if self.options.threshold != AUTO:
            return float(self.options.threshold)
        if layer in self.options.thresholds:  # a replay: the values the original merge chose
            return float(self.options.thresholds[layer])
        return self.planned.get(layer)

    def plan(self, models, modules) -> None:
        """With `auto`, choose every layer's threshold before anything is written, so the recipe at the head
        of the output can record them. Reads the layers once more; the merge then reads them again."""
        if self.options.threshold != AUTO or self.options.thresholds or self.replay is not None:
            return
        for module in modules:
            key = module.keys.get("weight")
            if key is None or len(models[0].ref(key).shape) not in (2, 4):
                continue
            weights = [m.read(key) for m in models]
            for name, stack, n in self._layers(module.name, weights):
                stats, threshold = resolve_layer(stack, n, self.options, name)
                # A row holding NaN or Inf has a non-finite norm: the merge itself reports (or skips) the module.
                if not bool(torch.isfinite(stats.sigma).all()):
                    break
                self.planned[name] = threshold
                if stats.pairs is not None and stats.features is not None:
                    self._pairs[name] = (stats.pairs, stats.pairs_floor, stats.pairs_row_blocks)

    def planned_options(self) -> dict:
        """What a merge records for `auto`: every layer's threshold."""
        return {"thresholds": dict(self.planned)} if self.planned else {}

    def _layers(self, module: str, weights: list[torch.Tensor]):
        """(name, K, n) of each layer of a module: one, or the two halves of a GEGLU projection."""
        parts = 2 if module.endswith(SPLIT_IN_HALVES) else 1
        n_total = weights[0].shape[0]
        if n_total % parts:
            raise RecipeError(f"{module}: cannot split {n_total} output neurons into {parts} halves")
        n = n_total // parts
        for part in range(parts):
            rows = slice(part * n, (part + 1) * n)
            yield (module if parts == 1 else f"{module}#{part}"), self._stack(weights, rows, n), n

    def _stack(self, weights: list[torch.Tensor], rows: slice, n: int) -> torch.Tensor:
        """K = [W_1; ...; W_N] in float32, in a buffer reused across layers: a fresh multi-GB allocation per
        layer would be a fresh mapping, every page of which faults on first touch. Nothing keeps a view of
        it past the layer (merged weights are new tensors)."""
        d = weights[0][rows].reshape(n, -1).shape[1]
        size = len(weights) * n * d
        if self._buffer.numel() < size:
            self._buffer = torch.empty(size)
        stack = self._buffer[:size].view(len(weights) * n, d)
        for m, w in enumerate(weights):
            stack[m * n : (m + 1) * n].copy_(w[rows].reshape(n, -1))
        return stack

    def merge_module(self, module: str, tensors: ModuleTensors) -> dict[str, torch.Tensor]:
        weights = tensors.get("weight")
        if weights is None or weights[0].ndim not in (2, 4):
            return {suffix: _mean(values) for suffix, values in tensors.items()}
        out = {suffix: _mean(v) for suffix, v in tensors.items() if suffix not in ("weight", "bias")}
        biases = tensors.get("bias")
        parts = 2 if module.endswith(SPLIT_IN_HALVES) else 1
        n_total = weights[0].shape[0]
        if n_total % parts:
            raise RecipeError(f"{module}: cannot split {n_total} output neurons into {parts} halves")
        n = n_total // parts
        merged_w, merged_b = [], []
        for part in range(parts):
            rows = slice(part * n, (part + 1) * n)
            stack = self._stack(weights, rows, n)
            bias_stack = None if biases is None else torch.cat([b[rows] for b in biases]).float()
            name = module if parts == 1 else f"{module}#{part}"
            if self.replay is not None:
                stats = drop_model(self.replay.load(name), n, self.dropped_model)
            else:
                threshold, pairs = self._recorded_threshold(name), self._pairs.pop(name, None)
                stats, _ = resolve_layer(stack, n, self.options, name, threshold, pairs)
            self.thresholds[name] = stats.threshold
            record, finish = self.record.recorder(name, n, stack.shape[0]) if self.record else (None, None)
            layer = merge_layer(stack, bias_stack, n, stats, self.options.for_layer(stats.threshold), record)
            if finish:
                finish(stats)
            self.degenerate_rows += layer.degenerate_rows
            merged_w.append(layer.weight)
            merged_b.append(layer.bias)
        self.layers += 1
        out["weight"] = torch.cat(merged_w).reshape(weights[0].shape)
        if biases is not None:
            out["bias"] = torch.cat(merged_b)
        return out

    def finish(self) -> None:
        if self.degenerate_rows:
            log.warning(
                "%d neurons kept their base weights because their 'paper' normaliser sum_j C_ij was ~0",
                self.degenerate_rows,
            )


def model_shares(statistics: Path) -> list[dict[str, float]]:
    """How a recorded FeatureFusion merge weighs its models, averaged over every neuron of every layer.

    For model m: `share`, the part of a merged neuron's coefficient mass sum_j |C_ij| that comes from model m's
    neurons, and `same_neuron`, the part that comes from model m's neuron of the same index i. Fine-tunes of
    one base keep each neuron close to the base's, so with a high threshold nearly all the mass sits on the
    same index and every model gets about 1/N: FeatureFusion then behaves like a uniform soup.
    """
    from featurefusion.merge.featurefusion_math import coefficient_matrix

    sidecar = StatisticsSidecar.open(statistics)
    try:
        options = FeatureFusionOptions(**sidecar.options)
        models = len(sidecar.model_hashes)
        share, same, neurons = torch.zeros(models), torch.zeros(models), 0
        for layer in sidecar.layers():
            stats = sidecar.load(layer)
            n = stats.correlation.shape[0]
            c = coefficient_matrix(stats, n, options).abs()
            mass = c.sum(dim=1, keepdim=True).clamp_min(1e-12)
            blocks = (c / mass).reshape(n, models, n)
            share += blocks.sum(dim=2).sum(dim=0)
            same += blocks.diagonal(dim1=0, dim2=2).sum(dim=1)
            neurons += n
    finally:
        sidecar.close()
    return [{"share": float(s / neurons), "same_neuron": float(d / neurons)} for s, d in zip(share, same, strict=True)]


def _mean(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(values).float().mean(dim=0)
