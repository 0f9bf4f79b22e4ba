"""The scorer of the built-in world: the toy analogue of the paper's metrics.

The FeatureFusion paper scores every model on every task with ImageReward / CLIP score (does the image
show what the prompt asks for?) and FID (how close is the distribution of generated images to the
domain's real images?). Neither can be downloaded here, and neither would understand 16×16 toy images, so
the built-in world has its own judge, trained on the generator's exact ground truth
(:mod:`featurefusion.toyworld.world`).

The model
---------
:class:`Scorer` is a small CNN (four 3×3 convolutions in two stages, each stage ending in a 2×2 max-pool,
then a fully connected *feature* layer) with three classification heads, one per attribute of a
:class:`~featurefusion.toyworld.world.Spec`: ``object`` (8 classes), ``colour`` (4) and ``style`` (4).
Input: images ``[B, 3, H, W]`` in [-1, 1] (the diffusion convention, ``H = W = image_size``, 16 by
default). The feature layer's output (:meth:`Scorer.features`, ``feature_dim`` = 64 values after a ReLU,
the input of the heads) is the feature space of the Fréchet distance, as Inception-v3's pool layer is for
FID. With the defaults the model has about 0.13 M parameters (≈ 0.5 MB in fp32) and scores 512 images in
about 0.05-0.1 s on one CPU core.

Training (:func:`train_scorer`) uses freshly generated images of the ``train`` split, every batch half
from the skewed ``broad`` task (the distribution the base model sees) and half uniformly over
:func:`~featurefusion.toyworld.world.all_specs` (:data:`UNIFORM_TASK`), so the rare objects and the rare
styles - exactly what the specialists are about - are learnt as well as the common ones, and every one of
the 128 object × colour × style combinations is seen many times. No image is ever repeated, so there is
nothing to overfit. Random shifts, brightness / contrast changes and pixel noise make the judge tolerate
the imperfections of generated images (see :func:`train_scorer` for the evidence that they are needed).
The shipped weights (:data:`SHIPPED_SCORER`) were trained with the defaults and one CPU thread,
``python -m featurefusion.toyworld.scorer`` (about 100 s); on 16×16 held-out images
uniform over all specs they get every attribute of ≥ 99.9 % of images right.

Metrics
-------
* :func:`prompt_alignment`: per-attribute accuracy of the scorer's predictions against the prompts' specs,
  and ``joint``, the fraction of images with all three attributes right: the main "prompt alignment"
  number (the analogue of ImageReward / CLIP score).
* :func:`frechet_distance`: FID in the scorer's feature space, computed with torchmetrics'
  :class:`~torchmetrics.image.fid.FrechetInceptionDistance` (see there for why).
* :func:`check_scorer`: a sanity report of a scorer (accuracy on held-out real images, on noise, FIDs).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from featurefusion.errors import FeatureFusionError
from featurefusion.progress import bar_disabled
from featurefusion.toyworld.world import (
    COLOURS,
    OBJECTS,
    STYLES,
    Spec,
    Task,
    broad_task,
    make_batch,
    standard_tasks,
)

__all__ = [
    "ATTRIBUTES",
    "CLASSES",
    "UNIFORM_TASK",
    "SHIPPED_SCORER",
    "Scorer",
    "ScorerError",
    "AlignmentScore",
    "ScorerCheck",
    "train_scorer",
    "save_scorer",
    "load_scorer",
    "load_shipped_scorer",
    "spec_labels",
    "prompt_alignment",
    "frechet_distance",
    "frechet_distances",
    "reference_images",
    "noise_images",
    "check_scorer",
]

ATTRIBUTES: tuple[str, ...] = ("object", "colour", "style")
#: The class names of each head, in index order (the order of the world's vocabulary).
CLASSES: dict[str, tuple[str, ...]] = {"object": OBJECTS, "colour": COLOURS, "style": STYLES}

#: Every object, colour and style with equal probability: every spec of ``all_specs()`` is equally likely.
UNIFORM_TASK = Task(
    name="scorer-uniform",
    kind="broad",
    objects=OBJECTS,
    colours=COLOURS,
    styles=STYLES,
    description="uniform over all 128 specs: the scorer's training half and its held-out check",
)

SHIPPED_SCORER = Path(__file__).parent / "checkpoints" / "scorer.safetensors"

_FORMAT = "featurefusion-toyworld-scorer"
_FORMAT_VERSION = 1


class ScorerError(FeatureFusionError, ValueError):
    """A scorer file cannot be read, or images / specs do not fit the scorer."""


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------


class Scorer(nn.Module):
    """Small CNN with three classification heads. Input: images ``[B, 3, H, W]`` in [-1, 1].

    ``width`` channels in the first stage (two 3×3 convs at full resolution), ``2 * width`` in the second
    (two 3×3 convs at half resolution), each stage followed by a 2×2 max-pool; then a linear layer to
    ``feature_dim`` features (ReLU) and one linear head per attribute. ``image_size`` (multiple of 4) is
    the side of the images the scorer was trained on; other sizes are rejected.
    """

    def __init__(self, width: int = 32, feature_dim: int = 64, image_size: int = 16):
        super().__init__()
        for name, value in (("width", width), ("feature_dim", feature_dim), ("image_size", image_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        self.width = width
        self.feature_dim = feature_dim
        self.image_size = image_size
        self.trunk = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * (image_size // 4) ** 2, feature_dim),
            nn.ReLU(inplace=True),
        )
        self.heads = nn.ModuleDict({a: nn.Linear(feature_dim, len(CLASSES[a])) for a in ATTRIBUTES})

    @property
    def config(self) -> dict[str, int]:
        """The constructor arguments (stored in a saved scorer's metadata)."""
        return {"width": self.width, "feature_dim": self.feature_dim, "image_size": self.image_size}

    @property
    def num_features(self) -> int:
        """Size of :meth:`features` (the attribute torchmetrics' FID reads from a custom extractor)."""
        return self.feature_dim

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        expected = (3, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ScorerError(
                f"the scorer takes images of shape [B, {', '.join(map(str, expected))}] in [-1, 1], "
                f"got {tuple(images.shape)}"
            )
        return images.to(device=self.heads["object"].weight.device, dtype=torch.float32)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, feature_dim]``: the penultimate layer, the feature space of :func:`frechet_distance`."""
        return self.trunk(self._check(images))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Attribute -> logits ``[B, num classes]``."""
        h = self.features(images)
        return {a: head(h) for a, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> dict[str, torch.Tensor]:
        """Attribute -> predicted class index ``[B]`` (int64, CPU), in eval mode without gradients."""
        images = self._check(images)
        was_training = self.training
        self.eval()
        try:
            out: dict[str, list[torch.Tensor]] = {a: [] for a in ATTRIBUTES}
            for start in range(0, images.shape[0], max(1, batch_size)):
                logits = self(images[start : start + max(1, batch_size)])
                for a in ATTRIBUTES:
                    out[a].append(logits[a].argmax(dim=1).cpu())
        finally:
            self.train(was_training)
        return {a: torch.cat(v) if v else torch.zeros(0, dtype=torch.int64) for a, v in out.items()}

    @torch.no_grad()
    def batched_features(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """:meth:`features` in eval mode, without gradients, ``batch_size`` images at a time."""
        images = self._check(images)
        was_training = self.training
        self.eval()
        try:
            chunks = [self.features(images[s : s + batch_size]) for s in range(0, images.shape[0], batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(chunks) if chunks else torch.zeros(0, self.feature_dim)


def spec_labels(specs: Sequence[Spec]) -> dict[str, torch.Tensor]:
    """Attribute -> class index ``[B]`` (int64) of each spec: the targets of the heads."""
    specs = list(specs)
    for s in specs:
        if not isinstance(s, Spec):
            raise TypeError(f"specs must be Spec instances, got {type(s).__name__}")
    return {a: torch.tensor([CLASSES[a].index(getattr(s, a)) for s in specs], dtype=torch.int64) for a in ATTRIBUTES}


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def _augment(
    images: torch.Tensor, gen: torch.Generator, noise_max: float, shift_max: int, light_max: float
) -> torch.Tensor:
    """Random translation, brightness / contrast and pixel noise, per image.

    * translation by a whole number of pixels in ``[-shift_max, shift_max]`` along each axis, the border
      replicated (the image edges are background), so the object is judged wherever it sits;
    * on half the images, a global brightness offset uniform in ``[-light_max, light_max]`` and a contrast
      gain uniform in ``[1 - light_max, 1 + light_max]`` (the same for all channels, so hues stay);
    * Gaussian pixel noise of a random strength in ``[0, noise_max]`` on half the images.
    """
    b, _, h, w = images.shape
    if shift_max > 0:
        padded = F.pad(images, (shift_max,) * 4, mode="replicate")
        off = torch.randint(0, 2 * shift_max + 1, (2, b), generator=gen)
        rows = (torch.arange(h)[None, :] + off[0][:, None])[:, None, :, None]
        cols = (torch.arange(w)[None, :] + off[1][:, None])[:, None, None, :]
        images = padded[torch.arange(b)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
    if light_max > 0:
        on = (torch.rand(b, 1, 1, 1, generator=gen) < 0.5).float()
        gain = 1 + on * (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * light_max
        offset = on * (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * light_max
        images = (images * gain + offset).clamp(-1, 1)
    if noise_max > 0:
        sigma = torch.rand(b, 1, 1, 1, generator=gen) * noise_max
        sigma = sigma * (torch.rand(b, 1, 1, 1, generator=gen) < 0.5)
        images = (images + sigma * torch.randn(images.shape, generator=gen)).clamp_(-1, 1)
    return images


def train_scorer(
    steps: int = 1500,
    batch_size: int = 128,
    seed: int = 0,
    image_size: int = 16,
    progress: bool | None = None,
    *,
    lr: float = 3e-3,
    shift_augment: int = 2,
    light_augment: float = 0.2,
    noise_augment: float = 0.15,
    num_threads: int | None = None,
) -> Scorer:
    """Train a :class:`Scorer` (default architecture) on freshly generated images; returns it in eval mode.

    Every step draws a new batch of the ``train`` split: ``batch_size // 2`` images from the ``broad``
    task and the rest uniformly over all 128 specs (:data:`UNIFORM_TASK`), so rare objects and styles are
    covered as well as common ones (the defaults show every spec about 750 times). The loss is the sum of
    the three heads' cross-entropies; AdamW (``lr``, weight decay 1e-4) with a one-cycle schedule.

    Augmentations (each 0 = off), added because a scorer trained on the clean renderings alone proved
    brittle in ways that would misjudge generated images: a 2-pixel shift dropped its object accuracy to
    ≈ 60 % (position-sensitive features), and a brightness offset of ±0.2 made it call most striped shapes
    plain (it told the styles apart by absolute grey levels rather than by texture). So: a random
    translation of up to ``shift_augment`` pixels, on half the images a brightness offset and contrast
    change of up to ``light_augment`` (same for all channels: hues are kept), and on half the images
    Gaussian pixel noise of standard deviation up to ``noise_augment`` (all in [-1, 1] units).

    Deterministic in ``seed`` for a given thread count (initial weights, data stream and augmentations are
    all seeded; the global RNG is left alone). ``num_threads``: torch CPU threads during training
    (restored afterwards; ``None`` keeps the current setting). On a machine shared with other work use 1:
    with 2 threads on 2 busy cores a step gets several times slower. About 100 s with the defaults on one
    CPU core. ``progress``: tqdm bar (``None`` = automatic, off when ``FEATUREFUSION_PROGRESS=0``).
    """
    if steps < 1 or batch_size < 2:
        raise ValueError(f"need steps >= 1 and batch_size >= 2, got steps={steps}, batch_size={batch_size}")
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train(steps, batch_size, seed, image_size, progress, lr, shift_augment, light_augment, noise_augment)
    finally:
        torch.set_num_threads(previous_threads)


def _train(
    steps: int,
    batch_size: int,
    seed: int,
    image_size: int,
    progress: bool | None,
    lr: float,
    shift_augment: int,
    light_augment: float,
    noise_augment: float,
) -> Scorer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        scorer = Scorer(image_size=image_size)
    scorer.train()
    opt = torch.optim.AdamW(scorer.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    broad = broad_task()
    n_broad = batch_size // 2
    n_uniform = batch_size - n_broad
    chunk = 16  # steps per generated chunk: rendering a few thousand images at once is cheaper
    bar = tqdm(total=steps, desc="training scorer", unit="step", disable=bar_disabled(progress))
    try:
        for first in range(0, steps, chunk):
            n_steps = min(chunk, steps - first)
            data_seed = seed * 1_000_000 + first // chunk
            specs_b, imgs_b = make_batch(broad, n_broad * n_steps, data_seed, "train", size=image_size)
            specs_u, imgs_u = make_batch(UNIFORM_TASK, n_uniform * n_steps, data_seed, "train", size=image_size)
            labels_b, labels_u = spec_labels(specs_b), spec_labels(specs_u)
            for k in range(n_steps):
                sb = slice(k * n_broad, (k + 1) * n_broad)
                su = slice(k * n_uniform, (k + 1) * n_uniform)
                images = torch.cat([imgs_b[sb], imgs_u[su]])
                images = _augment(images, gen, noise_augment, shift_augment, light_augment)
                logits = scorer(images)
                loss = sum(
                    F.cross_entropy(logits[a], torch.cat([labels_b[a][sb], labels_u[a][su]])) for a in ATTRIBUTES
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                if (first + k) % 50 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
    finally:
        bar.close()
    return scorer.eval()


# ----------------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------------


def save_scorer(scorer: Scorer, path: str | Path) -> Path:
    """Write the weights as safetensors (fp32) with the constructor config in the metadata; atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in scorer.state_dict().items()}
    metadata = {
        "format": _FORMAT,
        "format_version": str(_FORMAT_VERSION),
        "config": json.dumps(scorer.config, sort_keys=True),
        "attributes": json.dumps({a: list(CLASSES[a]) for a in ATTRIBUTES}),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder: the rename is atomic
    try:
        save_file(tensors, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates the file private (0600); make it an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_scorer(path: str | Path, device: str | torch.device = "cpu") -> Scorer:
    """Rebuild a scorer written by :func:`save_scorer` (eval mode)."""
    path = Path(path)
    if not path.is_file():
        raise ScorerError(f"scorer file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise ScorerError(f"cannot read scorer file {path}: {exc}") from exc
    if metadata.get("format") != _FORMAT:
        raise ScorerError(f"{path} is not a toy-world scorer (metadata format {metadata.get('format')!r})")
    attributes = json.loads(metadata.get("attributes", "{}"))
    if attributes != {a: list(CLASSES[a]) for a in ATTRIBUTES}:
        raise ScorerError(f"{path}: the scorer's classes {attributes} do not match this version of the world")
    scorer = Scorer(**json.loads(metadata["config"]))
    try:
        scorer.load_state_dict(state)
    except RuntimeError as exc:
        raise ScorerError(f"{path}: weights do not fit the stored config: {exc}") from exc
    return scorer.to(device).eval()


def load_shipped_scorer(device: str | torch.device = "cpu") -> Scorer:
    """The scorer shipped with the package (:data:`SHIPPED_SCORER`, trained by ``train_scorer()``)."""
    if not SHIPPED_SCORER.is_file():
        raise ScorerError(
            f"the shipped scorer {SHIPPED_SCORER} is missing; rebuild it with "
            "featurefusion.toyworld.scorer.save_scorer(train_scorer(), SHIPPED_SCORER)"
        )
    return load_scorer(SHIPPED_SCORER, device)


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------


@dataclass
class AlignmentScore:
    """Prompt alignment of a set of images: per-attribute accuracy and ``joint`` (all three right)."""

    object: float
    colour: float
    style: float
    joint: float  # fraction of images with all three attributes right: the main "prompt alignment" number
    count: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def prompt_alignment(scorer: Scorer, images: torch.Tensor, specs: Sequence[Spec]) -> AlignmentScore:
    """How often the scorer sees in each image what its spec (prompt) asks for.

    ``images[i]`` should show ``specs[i]``. Per attribute: the fraction of images whose predicted class is
    the spec's; ``joint``: the fraction with all three right. The toy analogue of ImageReward / CLIP score.
    """
    specs = list(specs)
    if len(specs) != images.shape[0]:
        raise ScorerError(f"got {images.shape[0]} images but {len(specs)} specs")
    if not specs:
        raise ScorerError("prompt_alignment needs at least one image")
    labels = spec_labels(specs)
    pred = scorer.predict(images)
    right = {a: pred[a] == labels[a] for a in ATTRIBUTES}
    joint = right["object"] & right["colour"] & right["style"]
    return AlignmentScore(
        object=right["object"].double().mean().item(),
        colour=right["colour"].double().mean().item(),
        style=right["style"].double().mean().item(),
        joint=joint.double().mean().item(),
        count=len(specs),
    )


class _FeatureExtractor(nn.Module):
    """Wraps a scorer for torchmetrics' FID: eval-mode, no-grad features, batched.

    The scorer is held outside the module tree on purpose, so the metric's own ``.to()``, ``.double()``
    or ``set_dtype`` can never convert or move the scorer's weights.
    """

    def __init__(self, scorer: Scorer):
        super().__init__()
        self._scorer = [scorer]
        self.num_features = scorer.feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._scorer[0].batched_features(images)


def frechet_distance(scorer: Scorer, images: torch.Tensor, reference_images: torch.Tensor) -> float:
    """FID between ``images`` and ``reference_images`` in the scorer's feature space (lower = closer).

    Computed with torchmetrics' ``FrechetInceptionDistance``, which in torchmetrics 1.9 accepts a custom
    ``feature`` module: it reads the feature size from the module's ``num_features`` attribute (otherwise
    it would push a dummy 299×299 image through it), passes the images to it unchanged (the resize and
    uint8 conversion only apply to its built-in Inception, so ``normalize=True`` just means "float
    input"), accumulates feature sums and covariances in float64 and takes the trace of the matrix square
    root from the eigenvalues of ``Σ₁Σ₂``. So the well-tested reference implementation is used rather
    than a local copy, and it needs neither ``torch-fidelity`` nor scipy with a custom extractor. The
    scorer is wrapped (:class:`_FeatureExtractor`) so the metric never moves or converts its weights.

    The scale is that of the scorer's 64 features, not comparable with Inception FIDs: compare models on
    the same task with the same scorer and reference set. Like any FID it is biased upward at small sample
    sizes (two real samples of 1000 images of one task score ≈ 20-100, noise scores > 10,000): compare
    numbers computed with equal counts.
    """
    return frechet_distances(scorer, [images], reference_images)[0]


def frechet_distances(
    scorer: Scorer, image_sets: Sequence[torch.Tensor], reference_images: torch.Tensor
) -> list[float]:
    """:func:`frechet_distance` of several image sets against one reference set (its features computed once)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    for name, x in (("reference_images", reference_images), *(("images", x) for x in image_sets)):
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[0] < 2:
            raise ScorerError(f"{name} must be a [B, 3, H, W] tensor with B >= 2, got {getattr(x, 'shape', x)!r}")
    from featurefusion.evaluate.metrics import fid_columns

    metric = FrechetInceptionDistance(feature=_FeatureExtractor(scorer), normalize=True, reset_real_features=False)
    return fid_columns(metric, list(image_sets), reference_images)


def _resolve_task(task: Task | str) -> Task:
    if isinstance(task, Task):
        return task
    tasks = {**standard_tasks(), UNIFORM_TASK.name: UNIFORM_TASK}
    try:
        return tasks[task]
    except KeyError:
        raise ScorerError(f"unknown task {task!r}; expected one of {', '.join(tasks)}") from None


def reference_images(task: Task | str, n: int, seed: int = 0, image_size: int = 16) -> torch.Tensor:
    """``n`` real images of ``task``'s ``test`` split (the FID reference set); a task or its name."""
    return make_batch(_resolve_task(task), n, seed, "test", size=image_size)[1]


def noise_images(n: int, seed: int = 0, image_size: int = 16) -> torch.Tensor:
    """``n`` images of standard Gaussian noise clipped to [-1, 1] (seeded with a ``torch.Generator``)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, image_size, image_size, generator=gen).clamp_(-1, 1)


@dataclass
class ScorerCheck:
    """What :func:`check_scorer` measured. Accuracies have keys ``object``, ``colour``, ``style``, ``joint``."""

    real_accuracy: dict[str, float]  # held-out real images, per attribute + "joint"
    noise_accuracy: dict[str, float]  # pure Gaussian noise images clipped to [-1,1], against random specs
    chance: dict[str, float]  # 1/num classes per attribute (joint: 1/128)
    fid_real_vs_real: float  # two disjoint real samples of the same task
    fid_noise_vs_real: float

    def summary(self) -> str:
        acc = "  ".join(
            f"{k} real {self.real_accuracy[k]:.3f} noise {self.noise_accuracy[k]:.3f} chance {self.chance[k]:.3f}"
            for k in self.real_accuracy
        )
        return f"{acc}\nFID real-vs-real {self.fid_real_vs_real:.3f}  noise-vs-real {self.fid_noise_vs_real:.3f}"


def _accuracy(score: AlignmentScore) -> dict[str, float]:
    return {"object": score.object, "colour": score.colour, "style": score.style, "joint": score.joint}


def check_scorer(scorer: Scorer, n: int = 2000, seed: int = 123) -> ScorerCheck:
    """Sanity report of a scorer, on images it never saw.

    * ``real_accuracy``: :func:`prompt_alignment` on ``n`` real images of the ``test`` split drawn uniformly
      over all 128 specs (:data:`UNIFORM_TASK`).
    * ``noise_accuracy``: on ``n`` noise images (:func:`noise_images`), against ``n`` *random* specs (uniform
      over all specs, seeded). A classifier must name *some* class for a noise image, and a confident one
      may name the same class for all of them; scoring that against fixed specs would measure only which
      class it happens to favour. Against random specs the expected accuracy is exactly chance whatever the
      scorer does, so this number is ~``chance`` by construction: it checks that noise images cannot earn
      alignment credit, and the gap real - noise is the scorer's dynamic range.
    * ``chance``: 1 / number of classes per attribute (``joint``: 1/128).
    * ``fid_real_vs_real``: FID between two disjoint ``n``-image real samples of :data:`UNIFORM_TASK`
      (``seed`` and ``seed + 1``), the floor set by sampling noise; ``fid_noise_vs_real``: noise images vs
      the first real sample.
    """
    size = scorer.image_size
    specs, real = make_batch(UNIFORM_TASK, n, seed, "test", size=size)
    real_accuracy = _accuracy(prompt_alignment(scorer, real, specs))

    noise = noise_images(n, seed, size)
    gen = torch.Generator().manual_seed(seed + 1)
    idx = {a: torch.randint(len(CLASSES[a]), (n,), generator=gen).tolist() for a in ATTRIBUTES}
    random_specs = [
        Spec(OBJECTS[o], COLOURS[c], STYLES[s])
        for o, c, s in zip(idx["object"], idx["colour"], idx["style"], strict=True)
    ]
    noise_accuracy = _accuracy(prompt_alignment(scorer, noise, random_specs))

    chance = {a: 1.0 / len(CLASSES[a]) for a in ATTRIBUTES}
    chance["joint"] = 1.0 / math.prod(len(CLASSES[a]) for a in ATTRIBUTES)

    other = reference_images(UNIFORM_TASK, n, seed + 1, size)
    fid_real, fid_noise = frechet_distances(scorer, [other, noise], real)
    return ScorerCheck(
        real_accuracy=real_accuracy,
        noise_accuracy=noise_accuracy,
        chance=chance,
        fid_real_vs_real=fid_real,
        fid_noise_vs_real=fid_noise,
    )


def _main(argv: Sequence[str] | None = None) -> None:
    """``python -m featurefusion.toyworld.scorer``: retrain the shipped scorer and print its check."""
    import argparse
    import time

    parser = argparse.ArgumentParser(description=_main.__doc__)
    parser.add_argument("--out", type=Path, default=SHIPPED_SCORER)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    scorer = train_scorer(steps=args.steps, seed=args.seed, num_threads=args.threads)
    print(f"trained in {time.perf_counter() - start:.1f} s")
    print(f"saved {save_scorer(scorer, args.out)}")
    print(check_scorer(scorer).summary())


if __name__ == "__main__":
    _main()
