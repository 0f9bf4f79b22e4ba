"""The built-in "toy world": procedurally generated images with text prompts.

Why this exists
---------------
FeatureFusion is evaluated on Stable Diffusion fine-tunes: *object specialists* (each fine-tuned on a group
of object kinds) and *style specialists* (each on one style) are merged, and every model is scored on every
task. Real SD weights and data cannot be used on the machines this project runs on (2 CPU cores, no
network), so the same experiment is run on a world small enough to train a tiny text-conditional diffusion
UNet in minutes, with an exact ground truth for scoring.

What an image shows
-------------------
Every image shows exactly one object, described by a :class:`Spec` ``(object, colour, style)`` and the
prompt ``"a <colour> <object>, <style>"``, e.g. ``"a red triangle, striped"``.

* 8 object kinds: circle, moon (crescent), square, diamond (a rhombus taller than wide, so it is never a
  rotated square), triangle, star, cross, heart. All are drawn from exact signed distance functions
  (SDFs), so the silhouettes stay recognisable at 16 px. A "ring" was left out on purpose: a ring looks like
  an *outlined* circle, which would make object and style ambiguous.
* 4 colours far apart in RGB: red, green, blue, yellow (:data:`PALETTE`).
* 4 styles, each changing the look in a different, easily learned way:

  - ``plain``: the flat filled shape on a light grey background;
  - ``striped``: the shape is filled with diagonal stripes (period 1/4 of the image) of its colour and a
    pale tint of it, a high-frequency texture inside a silhouette that stays visible;
  - ``outlined``: only a band (≈ 1.4 px at 16 px) along the shape's edge is painted, the inside shows the
    background;
  - ``dark``: the filled shape on a dark night-blue background (a global, low-frequency change).

Each sample gets a little random variation so the distribution is not a single point: position jitter,
size jitter, a small rotation (±10°, well below the 45° that turns a square into a diamond-like shape),
colour and background jitter, and the stripe phase. The named object, colour and style always stay
unambiguous.

Rendering is vectorised numpy: each pixel is covered by an S×S grid of sub-samples (``supersample``),
and each sub-sample gets an analytic anti-aliased coverage ``clip(0.5 - sdf / subpixel, 0, 1)``.
10,000 images of 16×16 take about 0.6 s on one core (32×32: about 3 s).

Images are float tensors in [-1, 1] with shape ``[B, 3, H, W]`` (the diffusion convention);
:func:`to_uint8`, :func:`to_pil` and :func:`image_grid` convert them for viewing.

Tasks
-----
A :class:`Task` is a distribution over specs. :func:`standard_tasks` gives

* ``broad``: every object, colour and style, used to train the base model. The base must be *weak* on the
  specialists' tasks, otherwise fine-tuning has nothing to add, so the broad mix is deliberately skewed
  (see :func:`broad_task`): mostly ``plain``, the three special styles rare, and one object of every
  object group rare.
* four object tasks (two object kinds each, any colour, ``plain`` style), each containing one object that
  is common in the broad data and one that is rare;
* three style tasks (one special style each, the four common objects, any colour).

Determinism and splits
----------------------
:func:`generate` is a pure function of ``(specs, seed, size, supersample)``: the same inputs give bitwise
identical images, and image ``i`` depends only on ``specs[i]``, ``seed`` and ``i`` (a prefix of a batch is
rendered identically). :func:`sample_specs` and :func:`make_batch` take ``split="train" | "test"``; the
split is part of the seed derivation (``numpy.random.SeedSequence`` entropy ``(salt, split, task, seed)``),
so the train and test streams are disjoint by construction: no ``(seed, split)`` pair of one split
reproduces the random stream of the other. The prompts themselves come from a small finite set (an object
task has 2 × 4 = 8 prompts) and are shared between splits; what is held out is the random draw of specs
and every rendering detail (position, size, rotation, colour jitter).

Vocabulary
----------
:data:`VOCABULARY` lists every token a prompt can contain. Tokenisation is: lower-case, the comma is its
own token, split on whitespace. So ``"a red triangle, striped"`` becomes
``["a", "red", "triangle", ",", "striped"]``; every prompt is exactly 5 tokens. The special tokens
``<pad>``, ``<unk>``, ``<bos>``, ``<eos>`` come first (ids 0-3).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

from featurefusion.errors import FeatureFusionError

__all__ = [
    "COLOURS",
    "OBJECTS",
    "PALETTE",
    "STYLES",
    "SPECIAL_STYLES",
    "OBJECT_GROUPS",
    "RARE_OBJECTS",
    "COMMON_OBJECTS",
    "VOCABULARY",
    "PromptError",
    "Spec",
    "Task",
    "Vocabulary",
    "RenderResult",
    "all_specs",
    "parse_prompt",
    "broad_task",
    "standard_tasks",
    "sample_specs",
    "split_seed",
    "render",
    "generate",
    "make_batch",
    "to_uint8",
    "to_pil",
    "image_grid",
]

# ----------------------------------------------------------------------------------------------------------
# Vocabulary of the world
# ----------------------------------------------------------------------------------------------------------

OBJECTS: tuple[str, ...] = ("circle", "moon", "square", "diamond", "triangle", "star", "cross", "heart")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
STYLES: tuple[str, ...] = ("plain", "striped", "outlined", "dark")
SPECIAL_STYLES: tuple[str, ...] = ("striped", "outlined", "dark")

#: Object groups of the object specialists; the first object of each group is common in the broad data,
#: the second is rare (see :func:`broad_task`).
OBJECT_GROUPS: dict[str, tuple[str, str]] = {
    "round": ("circle", "moon"),
    "angular": ("square", "diamond"),
    "pointy": ("triangle", "star"),
    "symbol": ("cross", "heart"),
}
RARE_OBJECTS: tuple[str, ...] = tuple(group[1] for group in OBJECT_GROUPS.values())
COMMON_OBJECTS: tuple[str, ...] = tuple(group[0] for group in OBJECT_GROUPS.values())

#: Nominal RGB in [0, 1] of each colour name (before per-sample jitter). Far apart in RGB and each far
#: from both backgrounds, so a colour stays identifiable after jitter and diffusion noise.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.88, 0.13, 0.12),
    "green": (0.10, 0.65, 0.20),
    "blue": (0.15, 0.30, 0.92),
    "yellow": (0.96, 0.80, 0.08),
}

_LIGHT_BG = (0.88, 0.88, 0.86)  # plain / striped / outlined background (jittered ±_BG_JITTER)
_DARK_BG = (0.07, 0.08, 0.17)  # "dark" style: night blue
_STRIPE_TINT = 0.5  # off-stripes inside a striped shape: this much object colour, the rest white
_BG_JITTER = 0.04
_COLOUR_JITTER = 0.05

# Geometry, in "world" units: the image spans [-1, 1] in x and y.
_POS_JITTER = 0.10  # centre offset, uniform in ±this (0.8 px at 16 px)
_SCALE_RANGE = (0.58, 0.72)  # object radius (≈ 4.6-5.8 px at 16 px); shapes fit in ±1.05 local
_ROT_JITTER = math.radians(10.0)
_OUTLINE_WIDTH = 0.17  # width of the outline band (≈ 1.4 px at 16 px)
_STRIPE_PERIOD = 0.5  # diagonal stripe period (4 px at 16 px), half of it painted

MIN_SIZE, MAX_SIZE = 16, 32
_N_PARAMS = 9  # uniforms per image: cx, cy, scale, angle, 3 × colour jitter, bg jitter, stripe phase


class PromptError(FeatureFusionError, ValueError):
    """A prompt or a spec uses a word outside the toy world's vocabulary, or has the wrong form."""


@dataclass(frozen=True)
class Spec:
    """What one image shows: an object kind, its colour and the image style."""

    object: str
    colour: str
    style: str = "plain"

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.object, OBJECTS, "object"),
            (self.colour, COLOURS, "colour"),
            (self.style, STYLES, "style"),
        ):
            if value not in allowed:
                raise PromptError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")

    @property
    def prompt(self) -> str:
        """The text prompt, e.g. ``"a red triangle, striped"``."""
        return f"a {self.colour} {self.object}, {self.style}"

    @classmethod
    def from_prompt(cls, prompt: str) -> Spec:
        return parse_prompt(prompt)


def all_specs() -> list[Spec]:
    """Every spec of the world (8 objects × 4 colours × 4 styles = 128), in vocabulary order."""
    return [Spec(o, c, s) for o in OBJECTS for c in COLOURS for s in STYLES]


def _tokens(prompt: str) -> list[str]:
    return prompt.lower().replace(",", " , ").split()


def parse_prompt(prompt: str) -> Spec:
    """Parse ``"a <colour> <object>, <style>"`` back into a :class:`Spec`.

    Case and extra whitespace are ignored. Raises :class:`PromptError` naming the prompt otherwise.
    """
    tokens = _tokens(prompt)
    if len(tokens) != 5 or tokens[0] != "a" or tokens[3] != ",":
        raise PromptError(f"prompt {prompt!r} is not of the form 'a <colour> <object>, <style>'")
    try:
        return Spec(object=tokens[2], colour=tokens[1], style=tokens[4])
    except PromptError as exc:
        raise PromptError(f"prompt {prompt!r}: {exc}") from None


@dataclass(frozen=True)
class Vocabulary:
    """The word list of the prompts, for the text encoder's tokenizer.

    ``tokens`` starts with the special tokens (``<pad>`` = 0, ``<unk>`` = 1, ``<bos>`` = 2, ``<eos>`` = 3),
    then ``"a"``, ``","``, the objects, colours and styles. Tokenisation lower-cases, makes the comma its
    own token and splits on whitespace; every prompt of the world is 5 words.
    """

    tokens: tuple[str, ...]
    pad: str = "<pad>"
    unk: str = "<unk>"
    bos: str = "<bos>"
    eos: str = "<eos>"

    @property
    def words(self) -> tuple[str, ...]:
        """The non-special tokens (every word that can appear in a prompt)."""
        return tuple(t for t in self.tokens if t not in (self.pad, self.unk, self.bos, self.eos))

    def __len__(self) -> int:
        return len(self.tokens)

    def index(self, token: str) -> int:
        try:
            return self.tokens.index(token)
        except ValueError:
            return self.tokens.index(self.unk)

    def tokenize(self, prompt: str) -> list[str]:
        """``"a red triangle, striped"`` -> ``["a", "red", "triangle", ",", "striped"]``."""
        return _tokens(prompt)

    def encode(self, prompt: str, max_length: int = 7) -> list[int]:
        """Token ids ``<bos> words... <eos>`` padded with ``<pad>`` (or truncated) to ``max_length``."""
        ids = [self.index(self.bos), *(self.index(t) for t in _tokens(prompt)), self.index(self.eos)]
        ids = ids[:max_length]
        return ids + [self.index(self.pad)] * (max_length - len(ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Inverse of :meth:`encode` for prompts of the world (special tokens dropped)."""
        words = [self.tokens[i] for i in ids if self.tokens[i] in self.words]
        return " ".join(words).replace(" ,", ",")


VOCABULARY = Vocabulary(tokens=("<pad>", "<unk>", "<bos>", "<eos>", "a", ",", *OBJECTS, *COLOURS, *STYLES))


# ----------------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------------

TaskKind = Literal["object", "style", "broad"]
Split = Literal["train", "test"]
_SPLITS: dict[str, int] = {"train": 0, "test": 1}


@dataclass(frozen=True)
class Task:
    """A distribution over specs: the allowed objects, colours and styles, each drawn independently.

    ``*_weights`` are relative sampling weights aligned with the allowed values (``None`` = uniform).
    """

    name: str
    kind: TaskKind
    objects: tuple[str, ...]
    colours: tuple[str, ...] = COLOURS
    styles: tuple[str, ...] = ("plain",)
    object_weights: tuple[float, ...] | None = None
    colour_weights: tuple[float, ...] | None = None
    style_weights: tuple[float, ...] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("object", "style", "broad"):
            raise ValueError(f"task {self.name!r}: kind must be 'object', 'style' or 'broad', not {self.kind!r}")
        for values, weights, allowed, what in (
            (self.objects, self.object_weights, OBJECTS, "objects"),
            (self.colours, self.colour_weights, COLOURS, "colours"),
            (self.styles, self.style_weights, STYLES, "styles"),
        ):
            if not values:
                raise ValueError(f"task {self.name!r}: no {what}")
            bad = [v for v in values if v not in allowed]
            if bad or len(set(values)) != len(values):
                raise ValueError(f"task {self.name!r}: invalid or repeated {what} {list(values)}")
            if weights is not None and (
                len(weights) != len(values) or any(w < 0 for w in weights) or sum(weights) <= 0
            ):
                raise ValueError(f"task {self.name!r}: {what} weights {weights} do not fit {values}")

    def contains(self, spec: Spec) -> bool:
        """Whether ``spec`` can be drawn from this task (has positive probability)."""
        return all(
            value in values and (weights is None or weights[values.index(value)] > 0)
            for value, values, weights in (
                (spec.object, self.objects, self.object_weights),
                (spec.colour, self.colours, self.colour_weights),
                (spec.style, self.styles, self.style_weights),
            )
        )

    def specs(self) -> list[Spec]:
        """Every spec with positive probability under the task."""

        def allowed(values: tuple[str, ...], weights: tuple[float, ...] | None) -> list[str]:
            return [v for i, v in enumerate(values) if weights is None or weights[i] > 0]

        return [
            Spec(o, c, s)
            for o in allowed(self.objects, self.object_weights)
            for c in allowed(self.colours, self.colour_weights)
            for s in allowed(self.styles, self.style_weights)
        ]

    def probabilities(self) -> dict[str, dict[str, float]]:
        """Marginal sampling probabilities, ``{"objects": {...}, "colours": {...}, "styles": {...}}``."""
        return {
            "objects": dict(zip(self.objects, _normalise(self.object_weights, len(self.objects)), strict=True)),
            "colours": dict(zip(self.colours, _normalise(self.colour_weights, len(self.colours)), strict=True)),
            "styles": dict(zip(self.styles, _normalise(self.style_weights, len(self.styles)), strict=True)),
        }


def _normalise(weights: Sequence[float] | None, n: int) -> list[float]:
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    return (w / w.sum()).tolist()


def broad_task(
    plain_weight: float = 0.97,
    rare_object_weight: float = 0.002,
    rare_objects: Sequence[str] = RARE_OBJECTS,
) -> Task:
    """The skewed "everything" distribution the base model is trained on.

    The FeatureFusion experiment needs a base that is *weak* on the specialists' tasks, so that
    fine-tuning a specialist adds something measurable and merging has something to preserve. The broad
    data therefore shows every object, colour and style (so every prompt word is seen), but:

    * ``plain_weight``: probability of the ``plain`` style; the remaining mass is split evenly over the
      three special styles (default 0.97 -> 1 % each). The style specialists are trained on exactly those
      rare styles.
    * ``rare_object_weight``: relative weight of each object in ``rare_objects`` versus 1.0 for the others
      (default 0.002 -> a rare object is 0.05 % of the data, about 130 images in the base's whole run; a
      common one 25.0 %). :data:`RARE_OBJECTS` holds one object of every object group, so every object
      specialist's task contains an object the base has barely seen. The word is still in the data, so the
      jointly trained text encoder gives it a meaning; a weight of 0.06 (1.4 %, ~3,600 images) proved enough
      for the base to draw rare objects as well as the specialists, which left them nothing to add.

    Colours stay uniform. ``plain_weight=1/4, rare_object_weight=1`` gives the uniform distribution.
    """
    if not 0.0 <= plain_weight <= 1.0:
        raise ValueError(f"plain_weight must be in [0, 1], got {plain_weight}")
    if rare_object_weight < 0:
        raise ValueError(f"rare_object_weight must be >= 0, got {rare_object_weight}")
    unknown = [o for o in rare_objects if o not in OBJECTS]
    if unknown:
        raise ValueError(f"unknown rare objects {unknown}")
    special = (1.0 - plain_weight) / len(SPECIAL_STYLES)
    return Task(
        name="broad",
        kind="broad",
        objects=OBJECTS,
        colours=COLOURS,
        styles=STYLES,
        object_weights=tuple(rare_object_weight if o in rare_objects else 1.0 for o in OBJECTS),
        style_weights=tuple(plain_weight if s == "plain" else special for s in STYLES),
        description="base-model data: every object, colour and style; mostly plain, some objects rare",
    )


def standard_tasks() -> dict[str, Task]:
    """The standard task set, by name: ``broad``, 4 object tasks and 3 style tasks.

    * ``objects-round`` (circle, moon), ``objects-angular`` (square, diamond), ``objects-pointy``
      (triangle, star), ``objects-symbol`` (cross, heart): any colour, ``plain`` style.
    * ``style-striped``, ``style-outlined``, ``style-dark``: the four common objects (:data:`COMMON_OBJECTS`),
      any colour, that one style. Rare objects are left out so that a style task measures the style alone:
      the base cannot draw them, and a style specialist trained on them would learn objects on the side.
    """
    tasks: dict[str, Task] = {"broad": broad_task()}
    for group, objects in OBJECT_GROUPS.items():
        tasks[f"objects-{group}"] = Task(
            name=f"objects-{group}",
            kind="object",
            objects=objects,
            colours=COLOURS,
            styles=("plain",),
            description=f"object specialist: {' and '.join(objects)}, any colour, plain",
        )
    for style in SPECIAL_STYLES:
        tasks[f"style-{style}"] = Task(
            name=f"style-{style}",
            kind="style",
            objects=COMMON_OBJECTS,
            colours=COLOURS,
            styles=(style,),
            description=f"style specialist: {', '.join(COMMON_OBJECTS)}, any colour, {style}",
        )
    return tasks


_SPEC_SALT = 0x5EC5  # seed-derivation salts: spec sampling and rendering never share a stream
_RENDER_SALT = 0x1A6E


def _task_key(task: Task) -> int:
    return zlib.crc32(task.name.encode("utf-8"))


def _split_index(split: str) -> int:
    try:
        return _SPLITS[split]
    except KeyError:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}") from None


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def sample_specs(task: Task, n: int, seed: int, split: Split = "train") -> list[Spec]:
    """Draw ``n`` specs from ``task``; deterministic in ``(task.name, n, seed, split)``.

    The split is part of the random stream's derivation, so ``split="test"`` never replays a train stream
    (for any seeds). Spec ``i`` depends only on ``i``, not on ``n`` (a prefix is stable).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    seq = np.random.SeedSequence([_SPEC_SALT, _split_index(split), _task_key(task), _check_seed(seed)])
    u = np.random.default_rng(seq).random((n, 3))
    picks = []
    for column, (values, weights) in enumerate(
        (
            (task.objects, task.object_weights),
            (task.colours, task.colour_weights),
            (task.styles, task.style_weights),
        )
    ):
        cdf = np.cumsum(_normalise(weights, len(values)))
        cdf[-1] = 1.0 + 1e-9
        idx = np.searchsorted(cdf, u[:, column], side="right")
        picks.append([values[i] for i in idx])
    return [Spec(object=o, colour=c, style=s) for o, c, s in zip(*picks, strict=True)]


def split_seed(seed: int, split: Split, task: Task | str = "") -> int:
    """The rendering seed :func:`make_batch` uses for ``(seed, split, task)``: disjoint streams per split."""
    name = task.name if isinstance(task, Task) else task
    seq = np.random.SeedSequence([_RENDER_SALT, _split_index(split), zlib.crc32(name.encode()), _check_seed(seed)])
    state = seq.generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


# ----------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------

# Signed distance functions in the shape's local frame (unit radius, y up); negative inside. Most follow
# Inigo Quilez's exact 2D SDFs (https://iquilezles.org/articles/distfunctions2d/).

_SQRT3 = math.sqrt(3.0)


def _sd_circle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.hypot(x, y) - 0.92


def _sd_square(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    b = 0.80
    dx, dy = np.abs(x) - b, np.abs(y) - b
    return np.hypot(np.maximum(dx, 0), np.maximum(dy, 0)) + np.minimum(np.maximum(dx, dy), 0)


def _sd_diamond(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    bx, by = 0.80, 1.04  # a rhombus taller than wide
    x, y = np.abs(x), np.abs(y)
    h = np.clip(((bx - 2 * x) * bx - (by - 2 * y) * by) / (bx * bx + by * by), -1.0, 1.0)
    d = np.hypot(x - 0.5 * bx * (1 - h), y - 0.5 * by * (1 + h))
    return d * np.sign(x * by + y * bx - bx * by)


def _sd_triangle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    r = 0.90  # half the side; apex up
    x = np.abs(x) - r
    y = y + r / (2 * _SQRT3) + r / _SQRT3  # first term centres the bounding box, second is iq's
    fold = x + _SQRT3 * y > 0
    x, y = np.where(fold, (x - _SQRT3 * y) / 2, x), np.where(fold, (-_SQRT3 * x - y) / 2, y)
    x = x - np.clip(x, -2 * r, 0)
    return -np.hypot(x, y) * np.sign(y)


def _sd_star(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    r, rf = 1.04, 0.50  # outer radius, inner/outer ratio (a fat star survives 16 px)
    k1x, k1y = 0.809016994375, -0.587785252292
    k2x, k2y = -k1x, k1y
    y = y + 0.10  # centre the bounding box
    x = np.abs(x)
    t = 2 * np.maximum(k1x * x + k1y * y, 0)
    x, y = x - t * k1x, y - t * k1y
    t = 2 * np.maximum(k2x * x + k2y * y, 0)
    x, y = x - t * k2x, y - t * k2y
    x = np.abs(x)
    y = y - r
    bax, bay = -rf * k1y, rf * k1x - 1.0
    h = np.clip((x * bax + y * bay) / (bax * bax + bay * bay), 0.0, r)
    return np.hypot(x - bax * h, y - bay * h) * np.sign(y * bax - x * bay)


def _sd_cross(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    bx, by = 0.95, 0.36  # arm half-length, arm half-width
    x, y = np.abs(x), np.abs(y)
    x, y = np.maximum(x, y), np.minimum(x, y)
    qx, qy = x - bx, y - by
    k = np.maximum(qx, qy)
    wx = np.where(k > 0, qx, by - x)
    wy = np.where(k > 0, qy, -k)
    return np.sign(k) * np.hypot(np.maximum(wx, 0), np.maximum(wy, 0))


def _sd_heart(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    s = 0.605  # iq's heart spans x in ±0.6, y in [0, 1.1]; map it onto about ±1 local
    x, y = np.abs(x) * s, y * s + 0.565
    top = np.hypot(x - 0.25, y - 0.75) - math.sqrt(2.0) / 4
    m = 0.5 * np.maximum(x + y, 0)
    low = np.sqrt(np.minimum(x * x + (y - 1) ** 2, (x - m) ** 2 + (y - m) ** 2)) * np.sign(x - y)
    return np.where(y + x > 1, top, low) / s


def _sd_moon(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d, ra, rb = 0.62, 1.0, 0.80  # crescent opening to the right
    x, y = x - 0.22, np.abs(y)
    a = (ra * ra - rb * rb + d * d) / (2 * d)
    b = math.sqrt(max(ra * ra - a * a, 0.0))
    tip = d * (x * b - y * a) > d * d * np.maximum(b - y, 0)
    body = np.maximum(np.hypot(x, y) - ra, -(np.hypot(x - d, y) - rb))
    return np.where(tip, np.hypot(x - a, y - b), body)


_SDFS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": _sd_circle,
    "moon": _sd_moon,
    "square": _sd_square,
    "diamond": _sd_diamond,
    "triangle": _sd_triangle,
    "star": _sd_star,
    "cross": _sd_cross,
    "heart": _sd_heart,
}
assert set(_SDFS) == set(OBJECTS)


@dataclass(frozen=True)
class RenderResult:
    """Images and their ground truth, all numpy, channels last.

    * ``images``: float32 ``[B, H, W, 3]`` in [0, 1];
    * ``silhouette``: float32 ``[B, H, W]`` coverage of the *filled* object shape (whatever the style);
    * ``paint``: float32 ``[B, H, W]`` coverage of the pixels painted in the object's colour (the stripes of
      a striped shape, the band of an outlined one, the whole silhouette otherwise);
    * ``colours`` / ``backgrounds``: float32 ``[B, 3]`` the jittered object and background RGB;
    * ``params``: float32 ``[B, 4]`` centre x, centre y (world units, y up), radius, rotation (radians).
    """

    images: np.ndarray
    silhouette: np.ndarray
    paint: np.ndarray
    colours: np.ndarray
    backgrounds: np.ndarray
    params: np.ndarray


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"image size must be an integer in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")
    return int(size)


def _grid(size: int, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    n = size * supersample
    c = ((np.arange(n, dtype=np.float32) + 0.5) / n) * 2 - 1
    return c[None, :].repeat(n, 0), -c[:, None].repeat(n, 1)  # x right, y up


def _check_supersample(supersample: int) -> int:
    if isinstance(supersample, bool) or not isinstance(supersample, (int, np.integer)) or not 1 <= supersample <= 8:
        raise ValueError(f"supersample must be an integer in [1, 8], got {supersample!r}")
    return int(supersample)


def _check_specs(specs: Iterable[Spec]) -> list[Spec]:
    specs = list(specs)
    for s in specs:
        if not isinstance(s, Spec):
            raise TypeError(f"specs must be Spec instances, got {type(s).__name__}")
    return specs


def _draw(seed: int, n: int) -> np.ndarray:
    """Per-image uniforms ``[n, _N_PARAMS]``; row ``i`` does not depend on ``n`` (row-major fill)."""
    rng = np.random.default_rng(np.random.SeedSequence([_RENDER_SALT, _check_seed(seed)]))
    return rng.random((n, _N_PARAMS)).astype(np.float32)


def render(specs: Sequence[Spec], seed: int, size: int = 16, supersample: int = 2) -> RenderResult:
    """Render ``specs`` with the random variation drawn from ``seed``; see :class:`RenderResult`.

    ``generate(specs, seed)`` is ``render(specs, seed).images`` as a ``[B, 3, H, W]`` tensor in [-1, 1].
    """
    specs = _check_specs(specs)
    return _render(specs, _draw(seed, len(specs)), _check_size(size), _check_supersample(supersample))


def _render(specs: list[Spec], u: np.ndarray, size: int, supersample: int) -> RenderResult:
    b = len(specs)
    cx = (u[:, 0] * 2 - 1) * _POS_JITTER
    cy = (u[:, 1] * 2 - 1) * _POS_JITTER
    radius = _SCALE_RANGE[0] + u[:, 2] * (_SCALE_RANGE[1] - _SCALE_RANGE[0])
    angle = (u[:, 3] * 2 - 1) * _ROT_JITTER
    nominal = np.array([PALETTE[s.colour] for s in specs], dtype=np.float32).reshape(b, 3)
    colours = np.clip(nominal + (u[:, 4:7] * 2 - 1) * _COLOUR_JITTER, 0, 1)
    dark = np.array([s.style == "dark" for s in specs], dtype=bool)
    bg = np.where(dark[:, None], np.float32(_DARK_BG), np.float32(_LIGHT_BG)).astype(np.float32).reshape(b, 3)
    backgrounds = np.clip(bg + ((u[:, 7:8] * 2 - 1) * _BG_JITTER), 0, 1)
    phase = u[:, 8] * _STRIPE_PERIOD

    n = size * supersample
    gx, gy = _grid(size, supersample)
    sub = np.float32(2.0 / n)  # sub-sample pitch in world units
    sil = np.empty((b, n, n), dtype=np.float32)
    paint = np.empty((b, n, n), dtype=np.float32)
    for obj in OBJECTS:
        idx = np.array([i for i, s in enumerate(specs) if s.object == obj], dtype=np.int64)
        if idx.size == 0:
            continue
        c, s_ = np.cos(angle[idx])[:, None, None], np.sin(angle[idx])[:, None, None]
        dx, dy = gx[None] - cx[idx, None, None], gy[None] - cy[idx, None, None]
        r = radius[idx, None, None]
        lx, ly = (c * dx + s_ * dy) / r, (-s_ * dx + c * dy) / r
        d = _SDFS[obj](lx, ly).astype(np.float32) * r  # world units
        cov = np.clip(0.5 - d / sub, 0, 1)
        sil[idx] = cov
        styles = [specs[i].style for i in idx]
        pt = cov.copy()
        outlined = np.array([st == "outlined" for st in styles])
        if outlined.any():
            band = np.abs(d[outlined] + _OUTLINE_WIDTH / 2) - _OUTLINE_WIDTH / 2
            pt[outlined] = np.clip(0.5 - band / sub, 0, 1)
        striped = np.array([st == "striped" for st in styles])
        if striped.any():
            t = (gx + gy)[None] / math.sqrt(2.0) + phase[idx[striped], None, None]
            v = np.abs(np.mod(t, _STRIPE_PERIOD) - _STRIPE_PERIOD / 2) - _STRIPE_PERIOD / 4
            pt[striped] = cov[striped] * np.clip(0.5 - v / sub, 0, 1)
        paint[idx] = pt

    if supersample > 1:
        sil = sil.reshape(b, size, supersample, size, supersample).mean(axis=(2, 4))
        paint = paint.reshape(b, size, supersample, size, supersample).mean(axis=(2, 4))
    striped_all = np.array([s.style == "striped" for s in specs], dtype=bool)
    # Base layer: the background, plus the pale tint of the off-stripes inside striped shapes (so the
    # silhouette stays visible against the light background).
    tint = _STRIPE_TINT * colours + (1 - _STRIPE_TINT)
    under = np.where(
        striped_all[:, None, None, None],
        backgrounds[:, None, None, :] * (1 - sil[..., None]) + tint[:, None, None, :] * sil[..., None],
        backgrounds[:, None, None, :],
    )
    images = under * (1 - paint[..., None]) + colours[:, None, None, :] * paint[..., None]
    params = np.stack([cx, cy, radius, angle], axis=1)
    return RenderResult(
        images=np.clip(images, 0, 1).astype(np.float32),
        silhouette=sil,
        paint=paint,
        colours=colours.astype(np.float32),
        backgrounds=backgrounds.astype(np.float32),
        params=params.astype(np.float32),
    )


def generate(specs: Sequence[Spec], seed: int, size: int = 16, supersample: int = 2, chunk: int = 2048) -> torch.Tensor:
    """Images for ``specs`` as a float32 tensor ``[B, 3, size, size]`` in [-1, 1].

    Deterministic: the same ``(specs, seed, size, supersample)`` give bitwise identical output, and image
    ``i`` depends only on ``specs[i]``, ``seed`` and ``i`` (``chunk`` only bounds memory).
    """
    specs = _check_specs(specs)
    size = _check_size(size)
    _check_supersample(supersample)
    u = _draw(seed, len(specs))
    out = np.empty((len(specs), size, size, 3), dtype=np.float32)
    for start in range(0, len(specs), max(1, chunk)):
        stop = start + max(1, chunk)
        out[start:stop] = _render(specs[start:stop], u[start:stop], size, supersample).images
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().mul_(2).sub_(1)


def make_batch(
    task: Task, n: int, seed: int, split: Split = "train", size: int = 16, supersample: int = 2
) -> tuple[list[Spec], torch.Tensor]:
    """``n`` specs drawn from ``task`` and their images, for the given split (disjoint random streams)."""
    specs = sample_specs(task, n, seed, split)
    return specs, generate(specs, split_seed(seed, split, task), size, supersample)


# ----------------------------------------------------------------------------------------------------------
# Conversion and viewing
# ----------------------------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[B, 3, H, W]`` or ``[3, H, W]`` in [-1, 1] -> uint8 ``[B, H, W, 3]`` or ``[H, W, 3]``."""
    x = images.detach().cpu().float().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if x.ndim not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"expected [B, 3, H, W] or [3, H, W] images, got shape {tuple(x.shape)}")
    x = np.moveaxis(x, -3, -1)
    return np.round((np.clip(x, -1, 1) + 1) * 127.5).astype(np.uint8)


def to_pil(image: torch.Tensor | np.ndarray, upscale: int = 1) -> Image.Image:
    """One ``[3, H, W]`` image in [-1, 1] as a PIL image, optionally enlarged with nearest neighbour."""
    arr = to_uint8(image)
    if arr.ndim != 3:
        raise ValueError("to_pil takes one [3, H, W] image; use image_grid for a batch")
    img = Image.fromarray(arr, mode="RGB")
    return img.resize((img.width * upscale, img.height * upscale), Image.Resampling.NEAREST) if upscale > 1 else img


def image_grid(images: torch.Tensor | np.ndarray, nrow: int = 8, upscale: int = 4, pad: int = 1) -> Image.Image:
    """A batch ``[B, 3, H, W]`` in [-1, 1] as one PIL grid, ``nrow`` images per row, nearest upscaling."""
    arr = to_uint8(images)
    if arr.ndim == 3:
        arr = arr[None]
    b, h, w, _ = arr.shape
    ncol = max(1, min(nrow, b))
    rows = max(1, math.ceil(b / ncol))
    canvas = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y : y + h, x : x + w] = arr[i]
    img = Image.fromarray(canvas, mode="RGB")
    return img.resize((img.width * upscale, img.height * upscale), Image.Resampling.NEAREST)
