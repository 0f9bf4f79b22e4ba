"""Recipes: what produced a merged model, stored in its metadata and replayable from a YAML file.

A recipe names the operation (merge, soup-add, soup-remove, unlearn), the method and its options, every
input with its SHA-256, how each component was treated, the output layout and dtype, and the package
version. The output path is deliberately not part of it: replaying a recipe to another path must give a
bit-identical file, metadata included.
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
    path: str
    sha256: str


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

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def metadata(self) -> dict[str, str]:
        return {METADATA_KEY: self.to_json()}

    @classmethod
    def from_dict(cls, data: dict, source: str = "recipe") -> Recipe:
        try:
            models = [ModelRef(str(m["path"]), str(m.get("sha256", ""))) for m in data["models"]]
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
            )
        except (KeyError, TypeError, ValueError) as err:
            raise RecipeError(f"{source}: malformed recipe ({err!r})") from None
        if recipe.operation not in OPERATIONS:
            raise RecipeError(f"{source}: unknown operation {recipe.operation!r}; expected one of {OPERATIONS}")
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
    return Recipe.from_dict(json.loads(metadata[METADATA_KEY]), str(path))


# ---- hashing ---------------------------------------------------------------------------------------------
def model_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint file; for a folder, of its weight files' names and hashes."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError("no such file or folder", path)
    if path.is_file():
        return _file_hash(path)
    weights = sorted(p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin", ".ckpt") and p.is_file())
    digest = hashlib.sha256()
    for file in weights:
        digest.update(f"{file.relative_to(path).as_posix()}:{_file_hash(file)}\n".encode())
    return digest.hexdigest()


def _file_hash(path: Path) -> str:
    """Hashing GBs takes seconds, so results are cached by (path, size, mtime)."""
    stat = path.stat()
    ident = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache = _load_cache()
    if ident in cache:
        return cache[ident]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * 1024 * 1024):
            digest.update(chunk)
    cache[ident] = digest.hexdigest()
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
    """Find a recipe's input: as written, else relative to the recipe's folder; check its hash."""
    candidates = [Path(ref.path)]
    if recipe_dir is not None and not Path(ref.path).is_absolute():
        candidates.append(recipe_dir / ref.path)
    path = next((c for c in candidates if c.exists()), None)
    if path is None:
        raise CheckpointError("recipe input not found", ref.path)
    if verify and ref.sha256 and model_hash(path) != ref.sha256:
        raise CheckpointError(f"recipe input has changed: its SHA-256 is not {ref.sha256[:12]}...", path)
    return path
