"""Open a diffusion checkpoint in any supported layout and see it under one set of key names.

Layouts read:
- `ldm`: one file holding UNet + text encoder + VAE in the original Stable Diffusion key layout, as
  A1111 / ComfyUI / community checkpoints ship (`model.diffusion_model.*`, `cond_stage_model.*`,
  `first_stage_model.*`), .safetensors or a weights-only pickle (.ckpt).
- `diffusers-unet`: a diffusers UNet weights file (`diffusion_pytorch_model.safetensors`), or a folder
  holding one next to its config.json.
- `diffusers`: a diffusers pipeline folder (`model_index.json`, `unet/`, `text_encoder/`, `vae/`, ...).

Whatever the layout, a `Checkpoint` exposes canonical keys: `<component>.<diffusers key>` with component
one of `unet`, `text_encoder`, `vae`, and tensors in diffusers' shapes. Keys of an ldm file outside the
three components (noise-schedule buffers and the like) appear as `extra.<key>`. Tensors are read lazily,
one key at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from featurefusion.errors import CheckpointError
from featurefusion.io import sd_keys
from featurefusion.io.pickle_reader import PickleReader
from featurefusion.io.safetensors_stream import SafetensorsReader

COMPONENTS = sd_keys.COMPONENTS
LAYOUTS = ("ldm", "diffusers-unet", "diffusers")
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")

# File names diffusers uses for each component of a pipeline folder, safetensors preferred.
PIPELINE_WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}

# Keys of ldm files that are not worth carrying into a merge: EMA copies of the UNet would silently
# replace the merged UNet in loaders that prefer EMA weights.
LDM_DROPPED_PREFIXES = ("model_ema.",)

Reader = SafetensorsReader | PickleReader
CLIP_TOP_LEVEL = ("embeddings.", "encoder.", "final_layer_norm.")


def open_tensor_file(path: Path, hash_content: bool = False) -> Reader:
    if path.suffix in PICKLE_SUFFIXES:
        return PickleReader(path)  # torch.load reads it whole; content_hash() then reads it again
    return SafetensorsReader(path, hash_content=hash_content)


@dataclass(frozen=True)
class TensorRef:
    """Where a canonical tensor lives and how to bring it to canonical shape."""

    reader: Reader
    file_key: str
    dtype: torch.dtype
    shape: tuple[int, ...]  # canonical shape
    to_canonical: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class Checkpoint:
    path: Path
    layout: str
    refs: dict[str, TensorRef]
    unet_layout: sd_keys.UNetLayout | None
    metadata: dict[str, str] = field(default_factory=dict)
    readers: list[Reader] = field(default_factory=list)

    # ---- queries -------------------------------------------------------------------------------------
    def keys(self, component: str | None = None) -> list[str]:
        if component is None:
            return list(self.refs)
        prefix = component + "."
        return [k for k in self.refs if k.startswith(prefix)]

    @property
    def components(self) -> list[str]:
        return [c for c in (*COMPONENTS, "extra") if any(k.startswith(c + ".") for k in self.refs)]

    def __contains__(self, key: str) -> bool:
        return key in self.refs

    def ref(self, key: str) -> TensorRef:
        try:
            return self.refs[key]
        except KeyError:
            raise CheckpointError("key missing from this model", self.path, key) from None

    def read(self, key: str) -> torch.Tensor:
        ref = self.ref(key)
        tensor = ref.reader.read(ref.file_key)
        return ref.to_canonical(tensor) if ref.to_canonical else tensor

    def source_file(self, key: str) -> Path:
        return self.ref(key).reader.path

    def content_hash(self) -> str:
        """SHA-256 as `recipe.model_hash` defines it, from the bytes read (open with `hash_content=True`)."""
        from featurefusion.io.recipe import file_sha256, folder_sha256

        def of(file: Path) -> str:
            reader = next((r for r in self.readers if r.path == file), None)
            if isinstance(reader, SafetensorsReader):
                return reader.content_hash()
            return file_sha256(file)

        return folder_sha256(self.path, of) if self.path.is_dir() else of(self.readers[0].path)

    # ---- lifetime ------------------------------------------------------------------------------------
    def close(self) -> None:
        for reader in self.readers:
            reader.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_checkpoint(path: str | os.PathLike, hash_content: bool = False) -> Checkpoint:
    """Detect the layout of `path` and open it lazily. Raises `CheckpointError` naming the file.

    `hash_content`: hash each file from the bytes the reads bring in (`Checkpoint.content_hash`)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError("no such file or folder", path)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return _open_pipeline_folder(path, hash_content)
        for name in PIPELINE_WEIGHT_FILES["unet"]:
            if (path / name).is_file() and (path / "config.json").is_file():
                return _open_unet_file(path / name, shown_path=path, hash_content=hash_content)
        raise CheckpointError(
            "folder is neither a diffusers pipeline (model_index.json) nor a diffusers UNet "
            "(config.json + diffusion_pytorch_model.safetensors)",
            path,
        )
    reader = open_tensor_file(path, hash_content)
    keys = reader.keys()
    if any(k.startswith(sd_keys.LDM_PREFIXES["unet"]) for k in keys):
        return _open_ldm(reader)
    if any(k.startswith(("down_blocks.", "conv_in.", "time_embedding.")) for k in keys):
        reader.close()
        return _open_unet_file(path, hash_content=hash_content)
    reader.close()
    sample = ", ".join(sorted(keys)[:5]) or "(no tensors)"
    raise CheckpointError(
        f"unrecognised checkpoint layout: no Stable Diffusion UNet keys found (first keys: {sample})", path
    )


def _open_ldm(reader: Reader) -> Checkpoint:
    keys = reader.keys()
    try:
        layout = sd_keys.infer_unet_layout(keys)  # the VAE keys tell its level count too
    except ValueError as err:
        raise CheckpointError(f"UNet blocks do not form a Stable Diffusion layout ({err})", reader.path) from None
    refs: dict[str, TensorRef] = {}
    for key in keys:
        if key.startswith(LDM_DROPPED_PREFIXES):
            continue
        info = reader.info(key)
        mapped = sd_keys.ldm_to_diffusers(key, layout)
        if mapped is None:
            refs[f"extra.{key}"] = TensorRef(reader, key, info.dtype, info.shape)
            continue
        component, dkey = mapped
        shape, fix = info.shape, None
        if sd_keys.vae_attention_needs_reshape(component, dkey) and len(shape) == 4:
            shape, fix = shape[:2], _squeeze_1x1
        refs[f"{component}.{dkey}"] = TensorRef(reader, key, info.dtype, shape, fix)
    return Checkpoint(reader.path, "ldm", refs, layout, dict(reader.metadata), [reader])


def _open_unet_file(path: Path, shown_path: Path | None = None, hash_content: bool = False) -> Checkpoint:
    reader = open_tensor_file(path, hash_content)
    refs = _component_refs("unet", reader)
    layout = unet_layout_from_diffusers_keys(reader.keys())
    return Checkpoint(shown_path or path, "diffusers-unet", refs, layout, dict(reader.metadata), [reader])


def _open_pipeline_folder(path: Path, hash_content: bool = False) -> Checkpoint:
    refs: dict[str, TensorRef] = {}
    readers: list[Reader] = []
    try:
        for component, names in PIPELINE_WEIGHT_FILES.items():
            file = next((path / component / n for n in names if (path / component / n).is_file()), None)
            if file is None:
                if (path / component).is_dir():
                    raise CheckpointError(
                        f"no weights file for {component} (looked for {', '.join(names)})", path / component
                    )
                continue
            reader = open_tensor_file(file, hash_content)
            readers.append(reader)
            refs.update(_component_refs(component, reader))
    except BaseException:
        for r in readers:
            r.close()
        raise
    if not any(k.startswith("unet.") for k in refs):
        for r in readers:
            r.close()
        raise CheckpointError("diffusers pipeline folder has no unet/ weights", path)
    unet_keys = [k[len("unet.") :] for k in refs if k.startswith("unet.")]
    vae_keys = [k[len("vae.") :] for k in refs if k.startswith("vae.")]
    layout = unet_layout_from_diffusers_keys(unet_keys, vae_keys)
    return Checkpoint(path, "diffusers", refs, layout, _metadata_of(readers), readers)


def _metadata_of(readers: list[Reader]) -> dict[str, str]:
    # The merge recipe is written into the UNet file; that is the one whose metadata describes the model.
    for reader in readers:
        if reader.path.parent.name == "unet":
            return dict(reader.metadata)
    return {}


def _component_refs(component: str, reader: Reader) -> dict[str, TensorRef]:
    refs = {}
    for key in reader.keys():
        info = reader.info(key)
        refs[f"{component}.{canonical_component_key(component, key)}"] = TensorRef(reader, key, info.dtype, info.shape)
    return refs


def canonical_component_key(component: str, key: str) -> str:
    """transformers >= 5 saves CLIP text models without the `text_model.` prefix that older files (and the
    ldm mapping) use; both load, so keys are compared in the prefixed form."""
    if component == "text_encoder" and not key.startswith("text_model.") and key.startswith(CLIP_TOP_LEVEL):
        return f"text_model.{key}"
    return key


def unet_layout_from_diffusers_keys(keys, vae_keys=()) -> sd_keys.UNetLayout:
    """The UNet's block structure (and the VAE's level count) from diffusers key names alone."""
    down_blocks: set[int] = set()
    with_attention: set[int] = set()
    resnets_in_first: set[int] = set()
    for key in keys:
        parts = key.split(".")
        if parts[0] == "down_blocks":
            block = int(parts[1])
            down_blocks.add(block)
            if parts[2] == "attentions":
                with_attention.add(block)
            if block == 0 and parts[2] == "resnets":
                resnets_in_first.add(int(parts[3]))
    if not down_blocks or not resnets_in_first:
        raise CheckpointError("UNet has no down_blocks.*.resnets keys: not a Stable Diffusion-style UNet")
    vae_levels = {int(k.split(".")[2]) for k in vae_keys if k.startswith("encoder.down_blocks.")}
    return sd_keys.UNetLayout(
        layers_per_block=len(resnets_in_first),
        num_down_blocks=len(down_blocks),
        down_block_attention=tuple(b in with_attention for b in range(len(down_blocks))),
        vae_num_blocks=len(vae_levels) or 4,
    )


def _squeeze_1x1(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[:2])
