"""Recipes: what produced a merged model, stored in its metadata and replayable from a YAML file.

A recipe names the operation (merge, soup-add, soup-remove, unlearn), the method and its options, every
input with its SHA-256, how each component was treated, the output layout and dtype, and the package
version. The output path is deliberately not part of it: replaying a recipe to another path must give a
bit-identical file, metadata included.

Input paths are recorded relative to the merged file's folder (so a folder of models and merges can move
as a whole), with the absolute path as a fallback. Replay verifies each input by the SHA-256 of its
content, hashed while the merge reads it (`engine.verify_inputs`); the hash cache below only speeds up
*recording* hashes, and is keyed by inode and change time too, which no tool can set back.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from featurefusion import __version__
from featurefusion.errors import CheckpointError, RecipeError

METADATA_KEY = "featurefusion.recipe"
RECIPE_VERSION = 1
OPERATIONS = ("merge", "soup-add", "soup-remove", "unlearn")
HASH_CACHE = Path(os.environ.get("FEATUREFUSION_CACHE", Path.home() / ".cache" / "featurefusion")) / "sha256.json"


@dataclass
class ModelRef:
    path: str  # relative to the merged file's folder (as given, in recipes of older versions)
    sha256: str
    absolute: str = ""  # where it was when the merge ran: the fallback when `path` does not resolve

    @classmethod
    def of(cls, model: str | os.PathLike, output: str | os.PathLike | None) -> ModelRef:
        """A reference to `model` as seen from the merged file `output`, with its SHA-256."""
        model = Path(model)
        absolute = model.resolve()
        path = os.path.relpath(absolute, Path(output).resolve().parent) if output is not None else str(model)
        return cls(path, model_hash(model), str(absolute))

    def to_dict(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, **({"absolute": self.absolute} if self.absolute else {})}


@dataclass
class Recipe:
    operation: str
    method: str
    models: list[ModelRef]
    options: dict = field(default_factory=dict)
    components: dict[str, str] = field(default_factory=dict)  # component -> "merge" | "base" | "average"
    format: str | None = None
    dtype: str | None = None
    nan_policy: str = "error"
    featurefusion_version: str = __version__
    recipe_version: int = RECIPE_VERSION
    overflow: str = "error"  # what a cast that overflows does: "error" or "clamp"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["models"] = [m.to_dict() for m in self.models]
        if self.overflow == "error":
            del data["overflow"]  # recipes written before the option existed replay bit-identically
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def metadata(self) -> dict[str, str]:
        return {METADATA_KEY: self.to_json()}

    @classmethod
    def from_dict(cls, data: dict, source: str = "recipe") -> Recipe:
        try:
            models = [
                ModelRef(str(m["path"]), str(m.get("sha256") or ""), str(m.get("absolute") or ""))
                for m in data["models"]
            ]
            if not isinstance(data.get("options") or {}, dict) or not isinstance(data.get("components") or {}, dict):
                raise TypeError("options and components must be mappings")
            recipe = cls(
                operation=data["operation"],
                method=data["method"],
                models=models,
                options=dict(data.get("options") or {}),
                components=dict(data.get("components") or {}),
                format=data.get("format"),
                dtype=data.get("dtype"),
                nan_policy=data.get("nan_policy", "error"),
                featurefusion_version=data.get("featurefusion_version", __version__),
                recipe_version=int(data.get("recipe_version", RECIPE_VERSION)),
                overflow=data.get("overflow", "error"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            missing = f"the key {err.args[0]!r} is missing" if isinstance(err, KeyError) else repr(err)
            raise RecipeError(f"{source}: malformed recipe ({missing})") from None
        if recipe.operation not in OPERATIONS:
            raise RecipeError(f"{source}: unknown operation {recipe.operation!r}; expected one of {OPERATIONS}")
        for name, value, allowed in (
            ("format", recipe.format, (None, "ldm", "diffusers-unet", "diffusers")),
            ("dtype", recipe.dtype, (None, "fp32", "fp16", "bf16")),
            ("nan_policy", recipe.nan_policy, ("error", "skip")),
            ("overflow", recipe.overflow, ("error", "clamp")),
        ):
            if value not in allowed:
                choices = ", ".join(str(a) for a in allowed if a is not None)
                raise RecipeError(f"{source}: recipe {name} {value!r} is not one of {choices}")
        if not isinstance(recipe.method, str) or not recipe.models:
            raise RecipeError(f"{source}: a recipe names a method and at least one model")
        if recipe.recipe_version > RECIPE_VERSION:
            raise RecipeError(f"{source}: recipe version {recipe.recipe_version} is newer than this package")
        return recipe

    @classmethod
    def from_yaml_file(cls, path: str | os.PathLike) -> Recipe:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise RecipeError(f"cannot read recipe {path}: {err}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a YAML mapping")
        return cls.from_dict(data, str(path))


def recipe_of(metadata: dict[str, str], path: Path) -> Recipe:
    if METADATA_KEY not in metadata:
        raise CheckpointError("this model carries no featurefusion recipe (was it made by featurefusion?)", path)
    try:
        data = json.loads(metadata[METADATA_KEY])
    except ValueError as err:
        raise CheckpointError(f"corrupt recipe in the metadata ({err})", path, METADATA_KEY) from None
    if not isinstance(data, dict):
        raise CheckpointError("corrupt recipe in the metadata: not a JSON object", path, METADATA_KEY)
    return Recipe.from_dict(data, str(path))


# ---- hashing ---------------------------------------------------------------------------------------------
def model_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint file; for a folder, of its weight files' names and hashes."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError("no such file or folder", path)
    return folder_sha256(path, _file_hash) if path.is_dir() else _file_hash(path)


def folder_sha256(path: Path, file_hash) -> str:
    """The hash of a model folder: its weight files' relative names and `file_hash`es, in name order."""
    weights = sorted(p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin", ".ckpt") and p.is_file())
    digest = hashlib.sha256()
    for file in weights:
        digest.update(f"{file.relative_to(path).as_posix()}:{file_hash(file)}\n".encode())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's content, read now (no cache)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(16 * 1024 * 1024):
                digest.update(chunk)
    except OSError as err:
        raise CheckpointError(f"cannot read: {err.strerror}", path) from None
    return digest.hexdigest()


def _file_hash(path: Path) -> str:
    """Hashing GBs takes seconds, so results are cached by identity: path, inode, size, mtime and ctime.
    A file rewritten in place with its mtime set back still gets a new ctime, so it is hashed again."""
    stat = path.stat()
    ident = f"{path.resolve()}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"
    cache = _load_cache()
    if ident in cache:
        return cache[ident]
    cache[ident] = file_sha256(path)
    _save_cache(cache)
    return cache[ident]


def _load_cache() -> dict[str, str]:
    try:
        return json.loads(HASH_CACHE.read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(cache: dict[str, str]) -> None:
    try:
        HASH_CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = HASH_CACHE.with_name(f".{HASH_CACHE.name}.{os.getpid()}")
        tmp.write_text(json.dumps(dict(list(cache.items())[-2000:])))
        os.replace(tmp, HASH_CACHE)
    except OSError:
        pass  # a cache that cannot be written only costs time


def resolve_model(ref: ModelRef, recipe_dir: Path | None, verify: bool = True) -> Path:
    """Find a recipe's input: relative to the recipe's folder (the merged file's), else at its recorded
    absolute path, else as written (recipes of older versions); with `verify`, check its hash now."""
    candidates = []
    if recipe_dir is not None and not Path(ref.path).is_absolute():
        candidates.append(recipe_dir / ref.path)
    if ref.absolute:
        candidates.append(Path(ref.absolute))
    candidates.append(Path(ref.path))
    path = next((c for c in candidates if c.exists()), None)
    if path is None:
        raise CheckpointError(f"recipe input not found (looked at {', '.join(map(str, candidates))})", ref.path)
    if verify and ref.sha256 and model_hash(path) != ref.sha256:
        raise CheckpointError(f"recipe input has changed: its SHA-256 is not {ref.sha256[:12]}...", path)
    return path
