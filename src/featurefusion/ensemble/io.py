"""Loading ensemble members, and saving and loading trained AFA aggregators.

Members: the base is loaded as a whole pipeline (text encoder, tokenizer, VAE, scheduler, UNet); every other
member contributes only a UNet, built from the base's UNet config and filled by streaming its checkpoint's
UNet tensors one at a time (any layout the merge engine reads). The text encoder and VAE are the base's,
shared by all members, so N members hold N UNets and one of everything else.

An AFA folder holds `aggregators.safetensors` and `afa.json`: the aggregator shapes, the training settings
and the members by path and SHA-256. Loading refuses a member whose file no longer has that hash.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from featurefusion.ensemble.aggregator import AggregatorConfig, AggregatorSet
from featurefusion.ensemble.unet import AFAUNet, EnsembleError, check_members
from featurefusion.errors import CheckpointError
from featurefusion.io.atomic import write_json_atomic
from featurefusion.io.checkpoint import canonical_component_key, open_checkpoint
from featurefusion.io.recipe import model_hash

WEIGHTS = "aggregators.safetensors"
CONFIG = "afa.json"
FORMAT = "featurefusion-afa/1"


@dataclass
class Members:
    """The base pipeline (with the base UNet) and every member's UNet, base first."""

    pipe: object
    unets: list[UNet2DConditionModel]
    paths: list[Path]
    toy: bool  # the built-in world's pipeline (pixels, no VAE) rather than a diffusers one

    def refs(self, folder: str | os.PathLike | None = None) -> list[dict]:
        """Each member's path as given, its path from `folder` (the AFA folder, so that a folder shipped next to
        its members still finds them), and its SHA-256."""
        refs = [{"path": str(p), "sha256": model_hash(p)} for p in self.paths]
        if folder is not None:
            for ref, path in zip(refs, self.paths, strict=True):
                ref["from_folder"] = os.path.relpath(Path(path).resolve(), Path(folder).resolve())
        return refs


def is_toy_pipeline(path: Path) -> bool:
    index = Path(path) / "model_index.json"
    return index.is_file() and json.loads(index.read_text()).get("_class_name") == "ToyPipeline"


def load_base(base: str | os.PathLike, template: str | os.PathLike | None = None):
    path = Path(base)
    if is_toy_pipeline(path):
        from featurefusion.toyworld.models import load_pipeline as load_toy

        return load_toy(path), True
    from featurefusion.evaluate.sampling import load_pipeline

    return load_pipeline(base, template), False


def load_members(
    base: str | os.PathLike, models: list[str | os.PathLike], template: str | os.PathLike | None = None
) -> Members:
    pipe, toy = load_base(base, template)
    unets = [pipe.unet]
    for model in models:
        unet = UNet2DConditionModel.from_config(pipe.unet.config)
        if unet.dtype != pipe.unet.dtype:
            unet = unet.to(pipe.unet.dtype)
        stream_unet_weights(unet, model)
        unets.append(unet)
    paths = [Path(base), *(Path(m) for m in models)]
    check_members(unets, [str(p) for p in paths])
    for unet in unets:
        unet.requires_grad_(False).eval()
    return Members(pipe, unets, paths, toy)


@torch.no_grad()
def stream_unet_weights(unet: UNet2DConditionModel, checkpoint: str | os.PathLike) -> None:
    """Fill `unet` from a checkpoint's UNet tensors, one at a time; every key and shape checked first."""
    targets = unet.state_dict()
    with open_checkpoint(checkpoint) as ckpt:
        names = {key: f"unet.{canonical_component_key('unet', key)}" for key in targets}
        for key, name in names.items():
            if name not in ckpt:
                raise CheckpointError("UNet weight missing (the base's UNet has it)", ckpt.path, name)
            shape = tuple(ckpt.ref(name).shape)
            if shape != tuple(targets[key].shape):
                raise CheckpointError(f"shape {list(shape)} does not fit the base's {list(targets[key].shape)}",
                                      ckpt.path, name)  # fmt: skip
        for key, name in names.items():
            targets[key].copy_(ckpt.read(name))


# ---- AFA folders -------------------------------------------------------------------------------------------
def save_aggregators(folder: str | os.PathLike, aggregators: AggregatorSet, members: list[dict], training: dict,
                     dtype: torch.dtype = torch.float32) -> Path:  # fmt: skip
    """Write the aggregators and their config; each file lands atomically (temporary name, then rename)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in aggregators.state_dict().items()}
    tmp = folder / f".{WEIGHTS}.{os.getpid()}.tmp"
    save_file(state, tmp, metadata={"format": FORMAT})
    os.chmod(tmp, 0o644)  # readable like every other shipped file
    os.replace(tmp, folder / WEIGHTS)
    config = {"format": FORMAT, "aggregators": aggregators.config.to_dict(), "members": members, "training": training}
    write_json_atomic(folder / CONFIG, config)
    return folder


def read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise EnsembleError(f"{folder}: no {CONFIG} (is this an AFA folder written by `featurefusion ensemble train`?)")
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise EnsembleError(f"{path}: not valid JSON ({err})") from None
    if config.get("format") != FORMAT:
        raise EnsembleError(f"{path}: format {config.get('format')!r}, expected {FORMAT!r}")
    return config


def resolve_members(folder: str | os.PathLike, config: dict, verify: bool = True) -> list[Path]:
    """Member paths as recorded (or relative to the AFA folder), each checked against its SHA-256."""
    paths = []
    for ref in config["members"]:
        # Where the member lies seen from the AFA folder comes first (a folder shipped or moved together with
        # its members), then the path as it was given.
        candidates = [Path(folder) / ref["from_folder"]] if "from_folder" in ref else []
        candidates.append(Path(ref["path"]))
        path = next((c for c in candidates if c.exists()), candidates[-1])
        if not path.exists():
            raise EnsembleError(f"{folder}: member model {ref['path']} not found")
        if verify and model_hash(path) != ref["sha256"]:
            raise EnsembleError(
                f"{path}: SHA-256 differs from the one these aggregators were trained with "
                f"({ref['sha256'][:12]}...); they only fit the exact member models they were trained on"
            )
        paths.append(path)
    return paths


def load_aggregators(folder: str | os.PathLike, config: dict | None = None) -> AggregatorSet:
    from safetensors.torch import load_file

    config = config or read_config(folder)
    aggregators = AggregatorSet(AggregatorConfig.from_dict(config["aggregators"]))
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise EnsembleError(f"{folder}: {WEIGHTS} is missing")
    state = load_file(path)
    expected = aggregators.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise CheckpointError("aggregator weight missing", path, key)
        if state[key].shape != tensor.shape:
            raise CheckpointError(f"shape {list(state[key].shape)}, expected {list(tensor.shape)}", path, key)
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError("unexpected aggregator weight", path, extra[0])
    aggregators.load_state_dict({k: v.float() for k, v in state.items()})
    return aggregators.eval()


def load_afa(folder: str | os.PathLike, template: str | os.PathLike | None = None, verify: bool = True):
    """(pipeline with an `AFAUNet` as its UNet, members) from an AFA folder."""
    config = read_config(folder)
    paths = resolve_members(folder, config, verify)
    aggregators = load_aggregators(folder, config)
    members = load_members(paths[0], paths[1:], template)
    members.pipe.unet = AFAUNet(members.unets, aggregators).eval()
    return members.pipe, members
