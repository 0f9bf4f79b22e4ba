"""Merge methods by name: the one place the CLI, recipes, replay, `featurefusion methods`, docs and the demo read.

A method is a `MergeMethodPlugin` subclass in its own module under `featurefusion/merge/methods/`, registered
with `@register`. Every module of that package is imported on first use, so adding a method touches one file
(plus its test). A plugin knows:

- its options: a frozen dataclass whose fields are declared with `option(...)` (default, help text, CLI type);
  the CLI makes one flag per option name, shared by the methods that take it (`--scale`, `--seed`, ...);
- what a merge records in its recipe (`recipe_options`): resolved values (normalised weights, ...), so that
  replay needs nothing but the recipe;
- how to build the per-component merge functions the engine runs (`build`), *from the recipe*. Building a
  fresh merge and replaying an old one go through the same code, which makes replay bit-identical.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from featurefusion.errors import RecipeError
from featurefusion.io.recipe import ModelRef, Recipe
from featurefusion.merge.base import CopyBase, MergeMethod

COMPONENT_RULES = ("base", "average")


def option(default: Any, help: str, *, cli: bool = True, **argparse_kwargs) -> Any:
    """A method option: a dataclass field with its help text and how the CLI parses it (`type`, `nargs`,
    `choices`, `metavar`). `cli=False` keeps an option out of the command line (internal tuning)."""
    meta = {"help": help, "cli": cli, "argparse": argparse_kwargs}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def cli_fields(options_type: type) -> list[Field]:
    return [f for f in fields(options_type) if f.metadata.get("cli", False)]


def default_of(f: Field) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


@dataclass
class BuildContext:
    """What a method may need besides its recipe."""

    output: Path | None = None  # where the merge is written (FeatureFusion keeps statistics beside it)
    recipe_dir: Path | None = None  # folder that relative paths in the recipe are resolved against
    save_statistics: bool = True


@dataclass
class Built:
    """The engine's side of a merge: which function merges each component, extra files committed with the
    output, and what to close afterwards."""

    methods: dict[str, MergeMethod]
    side_files: list = field(default_factory=list)
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    inputs: list[Path] = field(default_factory=list)  # files read besides the models (no output may be one)
    # Recipe options settled while the engine plans (FeatureFusion's per-layer `auto` thresholds), added to
    # the recorded recipe before anything is written.
    planned_options: Callable[[], dict] | None = None

    def close(self) -> None:
        for close in self.cleanup:
            close()


class MergeMethodPlugin:
    """Base class of a registered merge method. Subclasses set the class attributes and `build`."""

    name: ClassVar[str]
    title: ClassVar[str]  # how reports name it ("TIES", "Task arithmetic")
    Options: ClassVar[type]  # a frozen dataclass of `option(...)` fields; validates in __post_init__
    summary: ClassVar[str]  # one line: what it does
    source: ClassVar[str]  # where it comes from
    cost: ClassVar[str]  # time and memory, in a sentence
    min_models: ClassVar[int] = 2
    order: ClassVar[int] = 100  # position in listings (CLI choices, docs, `featurefusion methods`)
    operations: ClassVar[tuple[str, ...]] = ("merge",)  # recipe operations whose outputs it builds
    # Option values the demo and `featurefusion search` try on validation prompts (option -> candidates).
    search_space: ClassVar[dict[str, tuple]] = {}

    @property
    def description(self) -> str:
        """The class docstring: a paragraph for docs/methods.md."""
        return " ".join((type(self).__doc__ or "").split())

    # ---- options --------------------------------------------------------------------------------------
    def make_options(self, options: Any = None, **values) -> Any:
        """Options from a dataclass instance, a dict, keyword values, or nothing (the defaults)."""
        if isinstance(options, dict):
            values, options = {**options, **values}, None
        if options is not None and not isinstance(options, self.Options):
            raise RecipeError(f"{self.name} takes {self.Options.__name__}, not {type(options).__name__}")
        known = {f.name for f in fields(self.Options)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise RecipeError(
                f"{self.name} has no option {unknown[0]!r}; its options are: {', '.join(sorted(known)) or 'none'}"
            )
        # Options validate themselves in __post_init__ (some have no valid default, e.g. block weights).
        check_finite(self.name, values)  # before __post_init__, so every method says the same
        chosen = self.Options(**values) if options is None else replace(options, **values)
        check_finite(self.name, {f.name: getattr(chosen, f.name) for f in fields(chosen)})
        return chosen

    def recipe_options(self, options: Any, models: list[ModelRef]) -> dict:
        """What the recipe records for a merge of `models` with `options`. Default: every option."""
        return asdict(options)

    def options_of(self, recipe: Recipe) -> Any:
        """The options a recipe was made with (recorded extras such as members are ignored)."""
        known = {f.name for f in fields(self.Options)}
        values = {k: v for k, v in recipe.options.items() if k in known}
        try:
            return self.Options(**values)
        except TypeError as err:
            raise RecipeError(f"recipe options do not fit {self.name}: {err}") from None

    def search_context(self):
        """A context that a search over this method's options runs in (ZipIt! records features once)."""
        return contextlib.nullcontext()

    # ---- building -------------------------------------------------------------------------------------
    def build(self, recipe: Recipe, context: BuildContext) -> Built:
        raise NotImplementedError

    def check_operation(self, recipe: Recipe, allowed: Iterable[str] = ("merge",)) -> None:
        if recipe.operation not in allowed:
            raise RecipeError(f"a {self.name} merge cannot come from the operation {recipe.operation!r}")


def check_finite(method: str, values: dict[str, Any]) -> None:
    """No method has a use for NaN or Inf in a number option (a scale, a density, a weight): refused for
    every method here, rather than found later as a NaN model or blamed on the inputs."""
    for name, value in values.items():
        numbers = value if isinstance(value, list | tuple) else [value]
        for number in numbers:
            if isinstance(number, float) and not math.isfinite(number):
                raise RecipeError(f"{method} option {name} must be a finite number, got {value!r}")


def per_component(
    components: dict[str, str], unet: MergeMethod, others: MergeMethod | None = None
) -> dict[str, MergeMethod]:
    """The UNet gets `unet`. Text encoder and VAE are copied from the base under the rule 'base', and merged
    with `others` (default: the UNet's method) under the rule 'average'."""
    methods: dict[str, MergeMethod] = {"unet": unet}
    for component, rule in components.items():
        if component == "unet":
            continue
        if rule not in COMPONENT_RULES:
            raise RecipeError(f"component rule must be one of {COMPONENT_RULES}, got {rule!r} for {component}")
        methods[component] = CopyBase() if rule == "base" else (others or unet)
    return methods


# ---- the registry ---------------------------------------------------------------------------------------
_REGISTRY: dict[str, MergeMethodPlugin] = {}
_LOADED = False


def register(cls: type[MergeMethodPlugin]) -> type[MergeMethodPlugin]:
    """Class decorator: make a method available under `cls.name`."""
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]) is not cls:
        raise RuntimeError(f"two merge methods are named {cls.name!r}")
    _REGISTRY[cls.name] = cls()
    return cls


def _load_builtin_methods() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from featurefusion.merge import methods

    for module in pkgutil.iter_modules(methods.__path__):
        importlib.import_module(f"{methods.__name__}.{module.name}")


def get(name: str) -> MergeMethodPlugin:
    _load_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RecipeError(f"unknown merge method {name!r}; choose one of {', '.join(names())}") from None


def plugins() -> list[MergeMethodPlugin]:
    _load_builtin_methods()
    return sorted(_REGISTRY.values(), key=lambda p: (p.order, p.name))


def names() -> list[str]:
    return [p.name for p in plugins()]
