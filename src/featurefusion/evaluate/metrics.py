"""Metrics for images sampled from real Stable Diffusion models, behind one small interface.

A `Metric` has a `name`, `higher_is_better`, a `variant` (the scoring model, recorded with results) and
`score(prompts, images, references=None) -> MetricScore`: a value for the set and, for per-image metrics,
one score per image.

- `clip`: CLIP score (torchmetrics' `CLIPScore`; 100 * max(cos(image, text), 0) per image), default
  `openai/clip-vit-large-patch14`, or any CLIP model folder saved with `save_pretrained`.
- `imagereward`: ImageReward (the `image-reward` package, an optional install).
- `fid`: Fréchet Inception Distance (torchmetrics) against a task's reference images; the 2048-feature
  Inception needs `torch-fidelity` (optional), any `nn.Module` mapping uint8 images to features works too.
- `tifa`: registered but not available (needs a VQA model and question generation).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from featurefusion.errors import FeatureFusionError

log = logging.getLogger(__name__)

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_IMAGE_REWARD = "ImageReward-v1.0"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IMAGE_REWARD_MISSING = (
    "ImageReward needs the `image-reward` package: pip install image-reward==1.5 (it pulls torchvision and "
    "timm; install the torchvision build that matches your torch)"
)
FID_INCEPTION_MISSING = (
    "FID with the Inception network needs torch-fidelity: pip install torch-fidelity==0.4.0 (it pulls "
    "torchvision and scipy; install the torchvision build that matches your torch)"
)


class MetricUnavailable(FeatureFusionError):
    """A metric whose backend is not installed (or not implemented); the message says what to install."""


@dataclass
class MetricScore:
    value: float  # the set's score: the mean of per-image scores, or a set-level value (FID)
    per_image: list[float] | None = None


class Metric(ABC):
    name: str
    higher_is_better: bool = True
    per_image: bool = True

    @property
    def variant(self) -> str:
        """Which scoring model: results are only comparable within one variant."""
        return self.name

    @abstractmethod
    def score(
        self, prompts: Sequence[str], images: Sequence[Image.Image], references: Sequence[Image.Image] | None = None
    ) -> MetricScore: ...

    def describe(self) -> dict:
        return {"name": self.name, "variant": self.variant, "higher_is_better": self.higher_is_better}


def objective(metric: Metric, value: float) -> float:
    """A value to maximise (greedy soups maximise): lower-is-better metrics such as FID are negated."""
    return value if metric.higher_is_better else -value


def _check_pairs(prompts: Sequence[str], images: Sequence[Image.Image]) -> None:
    if len(prompts) != len(images):
        raise FeatureFusionError(f"{len(prompts)} prompts for {len(images)} images: give one prompt per image")
    if not images:
        raise FeatureFusionError("no images to score")


def to_uint8(image: Image.Image) -> torch.Tensor:
    """A PIL image as a [3, H, W] uint8 tensor (the input torchmetrics' image metrics expect)."""
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def _default_device(device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---- CLIP score ------------------------------------------------------------------------------------------
class _ProjectedFeatures(torch.nn.Module):
    """A CLIPModel whose feature methods return the projected embeddings as tensors.

    torchmetrics 1.9.0 expects `get_image_features` / `get_text_features` to return tensors; transformers 5
    returns output objects (the projection in `pooler_output`). This adapter restores the tensor contract.
    """

    def __init__(self, clip: torch.nn.Module):
        super().__init__()
        self.clip = clip
        self.config = clip.config

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _embedding(self.clip.get_image_features(pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return _embedding(self.clip.get_text_features(input_ids, attention_mask))


def _embedding(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


def load_clip(model_name_or_path: str | os.PathLike) -> tuple[torch.nn.Module, object]:
    """A CLIP model and processor from a hub id or a local `save_pretrained` folder.

    torchmetrics' own loader accepts only a fixed list of hub ids (a local folder raises ValueError), so
    the model is loaded here with transformers and handed to `CLIPScore` as a callable.
    """
    from transformers import CLIPModel, CLIPProcessor

    name = str(model_name_or_path)
    try:
        model = CLIPModel.from_pretrained(name).eval()
        processor = CLIPProcessor.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise FeatureFusionError(f"cannot load the CLIP model {name}: {err}") from None
    return _ProjectedFeatures(model), processor


class ClipScore(Metric):
    name = "clip"
    higher_is_better = True

    def __init__(self, model_name_or_path: str | os.PathLike = DEFAULT_CLIP, device: str | torch.device | None = None):
        self.model_name_or_path = str(model_name_or_path)
        self.device = _default_device(device)
        self._metric = None

    @property
    def variant(self) -> str:
        return self.model_name_or_path

    def _torchmetric(self):
        if self._metric is None:
            from torchmetrics.multimodal import CLIPScore

            self._metric = CLIPScore(model_name_or_path=lambda: load_clip(self.model_name_or_path)).to(self.device)
        return self._metric

    @torch.no_grad()
    def score(self, prompts, images, references=None) -> MetricScore:
        _check_pairs(prompts, images)
        metric = self._torchmetric()
        scores = []
        for prompt, image in zip(prompts, images, strict=True):
            # One image per update: CLIPScore's compute is the batch mean, and the score is per image.
            metric.reset()
            metric.update(to_uint8(image).unsqueeze(0).to(self.device), [prompt])
            scores.append(float(metric.compute()))
        return MetricScore(_mean(scores), scores)


# ---- ImageReward -----------------------------------------------------------------------------------------
ImageRewardLoader = Callable[[str, torch.device], object]


def load_image_reward(name_or_path: str, device: torch.device):
    """The `image-reward` package's model (downloads the named checkpoint on first use)."""
    try:
        import ImageReward as reward_models  # noqa: N813 (the package's own name)
    except ImportError:
        raise MetricUnavailable(IMAGE_REWARD_MISSING) from None
    return reward_models.load(name_or_path, device=str(device))


class ImageRewardScore(Metric):
    """ImageReward: a reward model of human preference, `model.score(prompt, images)` per prompt.

    `loader(name_or_path, device)` builds the model; the default imports the `image-reward` package. Any
    object with that `score` method works (tests pass a tiny one).
    """

    name = "imagereward"
    higher_is_better = True

    def __init__(
        self,
        model_name_or_path: str | os.PathLike = DEFAULT_IMAGE_REWARD,
        device: str | torch.device | None = None,
        loader: ImageRewardLoader | None = None,
    ):
        if loader is None and importlib.util.find_spec("ImageReward") is None:
            raise MetricUnavailable(IMAGE_REWARD_MISSING)  # fail before any sampling is spent
        self.model_name_or_path = str(model_name_or_path)
        self.device = _default_device(device)
        self.loader = loader or load_image_reward
        self._model = None

    @property
    def variant(self) -> str:
        return self.model_name_or_path

    @torch.no_grad()
    def score(self, prompts, images, references=None) -> MetricScore:
        _check_pairs(prompts, images)
        if self._model is None:
            self._model = self.loader(self.model_name_or_path, self.device)
        scores: list[float] = [float("nan")] * len(images)
        for prompt, indices in _group_by_prompt(prompts).items():
            rewards = _as_floats(self._model.score(prompt, [images[i] for i in indices]))
            if len(rewards) != len(indices):
                raise FeatureFusionError(f"ImageReward returned {len(rewards)} scores for {len(indices)} images")
            for i, reward in zip(indices, rewards, strict=True):
                scores[i] = reward
        return MetricScore(_mean(scores), scores)


def _group_by_prompt(prompts: Sequence[str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    return groups


def _as_floats(value) -> list[float]:
    # ImageReward returns a float for one image and a list for several.
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().reshape(-1).tolist()
    if isinstance(value, int | float):
        return [float(value)]
    return [float(v) for v in value]


# ---- FID -------------------------------------------------------------------------------------------------
class Fid(Metric):
    """Fréchet distance between features of the generated set and of the task's reference images.

    `feature`: 64/192/768/2048 selects torch-fidelity's Inception-v3 layer (the standard FID is 2048), or an
    `nn.Module` mapping uint8 images [N, 3, H, W] to features [N, D]. Reference features are computed once
    per reference set and kept, since every model of a benchmark is compared with the same references.
    """

    name = "fid"
    higher_is_better = False
    per_image = False

    def __init__(
        self, feature: int | torch.nn.Module = 2048, device: str | torch.device | None = None, chunk: int = 64
    ):
        if isinstance(feature, int) and importlib.util.find_spec("torch_fidelity") is None:
            raise MetricUnavailable(FID_INCEPTION_MISSING)  # fail before any sampling is spent
        self.feature = feature
        self.device = _default_device(device)
        self.chunk = chunk
        self._by_references: dict[tuple, object] = {}  # reference set -> metric holding its features

    @property
    def variant(self) -> str:
        if isinstance(self.feature, int):
            return f"inception-v3-{self.feature}"
        return f"custom:{type(self.feature).__name__}"

    def _torchmetric(self):
        from torchmetrics.image.fid import FrechetInceptionDistance

        try:
            metric = FrechetInceptionDistance(feature=self.feature, reset_real_features=False, normalize=False)
        except ModuleNotFoundError:
            raise MetricUnavailable(FID_INCEPTION_MISSING) from None
        return metric.to(self.device)

    @torch.no_grad()
    def score(self, prompts, images, references=None) -> MetricScore:
        """`references`: the task's reference images, or the folder holding them."""
        if references is None:
            raise FeatureFusionError("FID needs the task's reference images (a folder of real images)")
        if len(images) < 2:
            raise FeatureFusionError("FID needs at least two generated images")
        size = images[0].size
        key = _reference_key(references, size)
        metric = self._by_references.get(key)
        if metric is None:
            if isinstance(references, str | os.PathLike):
                references = load_reference_images(references)
            if len(references) < 2:
                raise FeatureFusionError("FID needs at least two reference images")
            metric = self._torchmetric()
            # References are brought to the generated size so both sets go through the same resizing.
            self._feed(metric, [r.convert("RGB").resize(size, Image.Resampling.BICUBIC) for r in references], True)
            self._by_references[key] = metric
        metric.reset()  # drops the generated features only (reset_real_features=False)
        self._feed(metric, images, False)
        return MetricScore(float(metric.compute()))

    def _feed(self, metric, images: Sequence[Image.Image], real: bool) -> None:
        for start in range(0, len(images), self.chunk):
            batch = torch.stack([to_uint8(img) for img in images[start : start + self.chunk]]).to(self.device)
            metric.update(batch, real=real)


def _reference_key(references, size: tuple[int, int]) -> tuple:
    if isinstance(references, str | os.PathLike):
        return ("folder", str(Path(references).resolve()), size)
    digest = hashlib.sha256()
    for image in references:
        digest.update(f"{image.size}{image.mode}".encode())
        digest.update(image.tobytes())
    return ("images", digest.hexdigest(), size)


def load_reference_images(folder: str | os.PathLike) -> list[Image.Image]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FeatureFusionError(f"reference image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FeatureFusionError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the reference folder {folder}")
    images = []
    for file in files:
        with Image.open(file) as image:
            images.append(image.convert("RGB"))
    return images


# ---- not available ---------------------------------------------------------------------------------------
def _tifa(**_options) -> Metric:
    raise MetricUnavailable(
        "TIFA is not available in featurefusion: it needs a visual question answering model and LLM-generated "
        "questions per prompt (see the `tifascore` package, https://github.com/Yushi-Hu/tifa); no backend is "
        "included, use clip or imagereward"
    )


# ---- registry --------------------------------------------------------------------------------------------
MetricFactory = Callable[..., Metric]
METRICS: dict[str, MetricFactory] = {
    "clip": ClipScore,
    "imagereward": ImageRewardScore,
    "fid": Fid,
    "tifa": _tifa,
}
ALIASES = {"clipscore": "clip", "clip-score": "clip", "image-reward": "imagereward", "image_reward": "imagereward"}


def register_metric(name: str, factory: MetricFactory) -> None:
    METRICS[name] = factory


def build_metric(name: str, **options) -> Metric:
    """A metric by name; `options` go to its constructor (e.g. `model_name_or_path`, `device`, `feature`)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in METRICS:
        raise FeatureFusionError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
    return METRICS[key](**options)


def parse_metric_names(text: str | Sequence[str]) -> list[str]:
    names = text.split(",") if isinstance(text, str) else list(text)
    return [ALIASES.get(n.strip().lower(), n.strip().lower()) for n in names if n.strip()]


def fid_columns(metric, image_sets: list[torch.Tensor], reference: torch.Tensor) -> list[float]:
    """FID of each image set against one reference set (its statistics computed once)."""
    metric.reset_real_features = False
    metric.reset()
    metric.update(reference.float(), real=True)
    out = []
    for images in image_sets:
        metric.reset()  # keeps the reference statistics
        metric.update(images.float(), real=False)
        out.append(float(metric.compute().item()))
    return out
