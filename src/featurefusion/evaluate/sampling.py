"""Sample images from real Stable Diffusion checkpoints with diffusers, reproducibly and across processes.

A checkpoint is anything the merge engine reads. A diffusers pipeline folder (or a hub id) is loaded as it
is; an ldm single file or a diffusers UNet file lacks configs, tokenizer and scheduler, so it needs a
`template` pipeline (folder or hub id): the template is loaded, then the file's tensors replace the weights
of every component the file holds (strictly: each weight of such a component must be in the file).

Every image starts from its own noise, drawn by a generator seeded from (seed, prompt index, image index)
alone, so an image does not change with the batch size, with the number of processes, or with which
process made it. Several processes (`torchrun --nproc_per_node N -m featurefusion.cli sample ...`, or
`accelerate launch`) split the image list between them; each writes its own PNGs and the main process
writes `manifest.json` once all are done.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from featurefusion.errors import CheckpointError, FeatureFusionError
from featurefusion.io.atomic import save_png_atomic, write_json_atomic
from featurefusion.io.checkpoint import canonical_component_key, open_checkpoint
from featurefusion.progress import bar_disabled

log = logging.getLogger(__name__)

# Sampler names a user types -> diffusers scheduler class names (built with `from_config`, so the
# pipeline's own noise schedule (betas, prediction type) carries over).
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "dpm++-karras": "DPMSolverMultistepScheduler",
    "dpm++-sde": "DPMSolverSDEScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lms": "LMSDiscreteScheduler",  # needs scipy
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WEIGHT_COMPONENTS = ("unet", "text_encoder", "vae")
MANIFEST = "manifest.json"
GRID = "grid.png"


@dataclass(frozen=True)
class SamplerSettings:
    """How images are drawn. Everything here is recorded in the manifest."""

    scheduler: str | None = None  # None: the pipeline's own scheduler
    steps: int = 30
    guidance_scale: float = 7.5
    seed: int = 0
    batch_size: int = 4
    images_per_prompt: int = 1
    height: int | None = None  # None: the pipeline's default size
    width: int | None = None
    dtype: str = "fp32"
    device: str | None = None  # None: the accelerator accelerate picks (cuda:<local rank>), else cpu
    negative_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise FeatureFusionError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if self.dtype not in DTYPES:
            raise FeatureFusionError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.steps < 1 or self.batch_size < 1 or self.images_per_prompt < 1:
            raise FeatureFusionError("steps, batch size and images per prompt must be at least 1")

    def recorded(self) -> dict:
        """The settings as written to manifests (device and batch size do not change the images)."""
        return {k: v for k, v in asdict(self).items() if k not in ("device", "batch_size")}


@dataclass(frozen=True)
class ImageJob:
    """One image to draw: its prompt, its place in the prompt set, and the seed of its noise."""

    prompt_index: int
    image_index: int
    prompt: str
    seed: int

    @property
    def file_name(self) -> str:
        return f"{self.prompt_index:05d}_{self.image_index:03d}.png"


@dataclass
class SampleResult:
    out: Path
    manifest: Path
    grid: Path | None
    records: list[dict] = field(default_factory=list)  # one per image, in prompt order

    def image_paths(self) -> list[Path]:
        return [self.out / r["file"] for r in self.records]

    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.records]


# ---- prompts ---------------------------------------------------------------------------------------------
def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a file: a JSON or YAML list (or a mapping with a `prompts` list), else one per line."""
    path = Path(path)
    if not path.is_file():
        raise FeatureFusionError(f"prompt file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        prompts = _structured_prompts(text, path)
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise FeatureFusionError(f"no prompts in {path}")
    return prompts


def _structured_prompts(text: str, path: Path) -> list[str]:
    import yaml

    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise FeatureFusionError(f"cannot parse prompt file {path}: {err}") from None
    if isinstance(data, dict):
        data = data.get("prompts")
    if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
        raise FeatureFusionError(f"prompt file {path} must hold a list of strings (or a `prompts:` list)")
    return [p.strip() for p in data if p.strip()]


# ---- seeds and jobs --------------------------------------------------------------------------------------
def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """A 63-bit seed that depends only on these three numbers (numpy's SeedSequence mixes them well)."""
    state = np.random.SeedSequence([seed, prompt_index, image_index]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def image_jobs(prompts: Sequence[str], settings: SamplerSettings) -> list[ImageJob]:
    return [
        ImageJob(p, i, prompt, image_seed(settings.seed, p, i))
        for p, prompt in enumerate(prompts)
        for i in range(settings.images_per_prompt)
    ]


def batches(jobs: Sequence[ImageJob], size: int) -> Iterator[list[ImageJob]]:
    for start in range(0, len(jobs), size):
        yield list(jobs[start : start + size])


# ---- loading ---------------------------------------------------------------------------------------------
def is_pipeline_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / "model_index.json").is_file()


def load_pipeline(
    checkpoint: str | os.PathLike,
    template: str | os.PathLike | None = None,
    dtype: str = "fp32",
    device: str | torch.device | None = None,
):
    """A diffusers text-to-image pipeline holding `checkpoint`'s weights.

    `checkpoint`: a diffusers pipeline folder or hub id (loaded directly), or an ldm single file / diffusers
    UNet file / UNet folder, which needs `template` (a pipeline folder or hub id) for everything it lacks.
    """
    from diffusers import DiffusionPipeline

    torch_dtype = DTYPES[dtype]
    path = Path(checkpoint)
    if is_pipeline_folder(path) or (not path.exists() and _looks_like_hub_id(str(checkpoint))):
        pipe = _from_pretrained(DiffusionPipeline, str(checkpoint), torch_dtype)  # a template is not needed
    else:
        if not path.exists():
            raise CheckpointError("no such file or folder", path)
        if template is None:
            raise FeatureFusionError(
                f"{path} is a weights file without configs, tokenizer or scheduler: give a template pipeline "
                "(--template FOLDER_OR_HUB_ID) whose architecture matches it"
            )
        _check_template(template)
        pipe = _from_pretrained(DiffusionPipeline, str(template), torch_dtype)
        load_weights_into(pipe, path)
    if device is not None:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)  # one bar over all images instead, on the main process
    return pipe


def _check_template(template: str | os.PathLike) -> None:
    """A local path that is not a pipeline folder would otherwise reach the hub as a malformed repo id."""
    text, path = str(template), Path(template)
    if path.exists() and not is_pipeline_folder(path):
        raise CheckpointError("the template is not a diffusers pipeline folder (no model_index.json)", path)
    if not path.exists() and not _looks_like_hub_id(text):
        raise CheckpointError("template not found: no such folder (nor a hub id of the form owner/name)", path)


def _looks_like_hub_id(text: str) -> bool:
    return text.count("/") == 1 and not text.startswith((".", "/")) and not text.endswith(".safetensors")


def _from_pretrained(cls, name: str, torch_dtype: torch.dtype):
    try:
        return cls.from_pretrained(name, dtype=torch_dtype)
    except (OSError, ValueError) as err:
        raise FeatureFusionError(f"cannot load the diffusers pipeline {name}: {err}") from None


def load_weights_into(pipe, checkpoint: str | os.PathLike) -> list[str]:
    """Copy every tensor of each component the checkpoint holds into `pipe`; returns those components.

    Strict per component: a component the file has must provide every weight the pipeline's module has (a
    missing key or a wrong shape is an error naming the file and key). Components the file lacks (a UNet
    file has only the UNet) keep the template's weights.
    """
    with open_checkpoint(checkpoint) as ckpt:
        loaded = []
        for component in WEIGHT_COMPONENTS:
            module = getattr(pipe, component, None)
            if module is None or not ckpt.keys(component):
                continue
            _copy_component(module, component, ckpt)
            loaded.append(component)
    if "unet" not in loaded:
        raise CheckpointError("the checkpoint has no UNet weights to sample with", checkpoint)
    log.debug("loaded %s from %s", ", ".join(loaded), checkpoint)
    return loaded


@torch.no_grad()
def _copy_component(module: torch.nn.Module, component: str, ckpt) -> None:
    # Check everything before writing anything, so a bad file never leaves a half-replaced model.
    targets = module.state_dict()
    canonical = {key: f"{component}.{canonical_component_key(component, key)}" for key in targets}
    for key, name in canonical.items():
        if name not in ckpt:
            raise CheckpointError(f"{component} weight missing (the template's {component} has it)", ckpt.path, name)
        shape = tuple(ckpt.ref(name).shape)
        if shape != tuple(targets[key].shape):
            raise CheckpointError(
                f"shape {list(shape)} does not fit the template's {list(targets[key].shape)}: is the template the "
                "same architecture?",
                ckpt.path,
                name,
            )
    for key, name in canonical.items():
        targets[key].copy_(ckpt.read(name))  # one tensor in memory at a time; copy_ casts to the pipeline dtype


def set_scheduler(pipe, name: str | None) -> None:
    if name is None:
        return
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[name])
    options = {"use_karras_sigmas": True} if name.endswith("-karras") else {}
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **options)


# ---- drawing ---------------------------------------------------------------------------------------------
def generate(pipe, jobs: Sequence[ImageJob], settings: SamplerSettings) -> list[Image.Image]:
    """Draw one batch: each image gets its own CPU generator, so its noise is independent of the batch."""
    generators = [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]
    options = {}
    if settings.height is not None:
        options["height"] = settings.height
    if settings.width is not None:
        options["width"] = settings.width
    if settings.negative_prompt is not None:
        options["negative_prompt"] = [settings.negative_prompt] * len(jobs)
    output = pipe(
        prompt=[job.prompt for job in jobs],
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        generator=generators,
        output_type="pil",
        **options,
    )
    return list(output.images)


def sample(
    checkpoint: str | os.PathLike,
    prompts: Sequence[str] | str | os.PathLike,
    out: str | os.PathLike,
    settings: SamplerSettings | None = None,
    *,
    template: str | os.PathLike | None = None,
    pipe=None,
    progress: bool | None = None,
    grid: bool = True,
) -> SampleResult:
    """Draw `images_per_prompt` images for each prompt into `out`, split across the running processes.

    `prompts` is a list or a prompt file. `pipe` reuses an already loaded pipeline for `checkpoint` (the
    benchmark matrix samples several tasks with one model). Returns the manifest's records on every process.
    """
    from accelerate import PartialState

    settings = settings or SamplerSettings()
    prompt_list = list(prompts) if isinstance(prompts, list | tuple) else read_prompts(prompts)
    out = Path(out)
    state = PartialState(cpu=wants_cpu(settings.device))
    device = device_for(state, settings.device)
    if pipe is None:
        pipe = load_pipeline(checkpoint, template, settings.dtype, device)
    else:
        pipe = pipe.to(device)
    set_scheduler(pipe, settings.scheduler)
    jobs = image_jobs(prompt_list, settings)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    with state.split_between_processes(jobs) as mine:
        _draw_and_save(pipe, mine, settings, out, state.is_main_process, progress, state.num_processes)
    state.wait_for_everyone()
    records = [_record(job) for job in jobs]
    manifest_path, grid_path = out / MANIFEST, (out / GRID if grid else None)
    if state.is_main_process:
        manifest = {
            "checkpoint": describe_checkpoint(checkpoint),
            "template": None if template is None else describe_checkpoint(template),
            "settings": settings.recorded(),
            "processes": state.num_processes,
            "images": records,
        }
        write_json_atomic(manifest_path, manifest)
        if grid_path is not None:
            prompt_grid(out, records, grid_path)
    state.wait_for_everyone()
    return SampleResult(out, manifest_path, grid_path, records)


def wants_cpu(device: str | None) -> bool:
    if device is not None:
        return str(device).startswith("cpu")
    return not torch.cuda.is_available()


def device_for(state, requested: str | None) -> torch.device:
    # With several processes each must use its own accelerator, which accelerate has chosen.
    if requested is not None and state.num_processes == 1:
        return torch.device(requested)
    return state.device


def _draw_and_save(pipe, jobs, settings, out: Path, main: bool, progress: bool | None, processes: int) -> None:
    from tqdm.auto import tqdm

    disable = bar_disabled(progress) if main else True
    desc = "sampling" if processes == 1 else f"sampling (main process's share, 1 of {processes})"
    with tqdm(total=len(jobs), desc=desc, unit="img", disable=disable) as bar:
        for batch in batches(jobs, settings.batch_size):
            for job, image in zip(batch, generate(pipe, batch, settings), strict=True):
                save_png_atomic(image, out / job.file_name)
            bar.update(len(batch))


def _record(job: ImageJob) -> dict:
    return {
        "file": job.file_name,
        "prompt": job.prompt,
        "prompt_index": job.prompt_index,
        "image_index": job.image_index,
        "seed": job.seed,
    }


def describe_checkpoint(checkpoint: str | os.PathLike) -> dict:
    """Path and SHA-256 of a local checkpoint; a hub id is recorded as it is."""
    from featurefusion.io.recipe import model_hash

    path = Path(checkpoint)
    if path.exists():
        return {"path": str(path), "sha256": model_hash(path)}
    return {"hub_id": str(checkpoint)}


# ---- files -----------------------------------------------------------------------------------------------


def read_manifest(out: str | os.PathLike) -> dict:
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise FeatureFusionError(f"no {MANIFEST} in {out}: was the sampling finished?")
    return json.loads(path.read_text(encoding="utf-8"))


def load_images(out: str | os.PathLike, records: Sequence[dict]) -> list[Image.Image]:
    images = []
    for record in records:
        with Image.open(Path(out) / record["file"]) as image:
            images.append(image.convert("RGB"))
    return images


def prompt_grid(out: Path, records: Sequence[dict], path: Path, max_prompts: int = 16) -> Path:
    """One row per prompt (the first `max_prompts`), its images side by side, the prompt written above."""
    from featurefusion.evaluate.report import captioned_grid

    rows: dict[str, list[Image.Image]] = {}
    for record in records:
        if record["prompt_index"] >= max_prompts:
            continue
        key = f"{record['prompt_index']}: {record['prompt']}"
        rows.setdefault(key, []).extend(load_images(out, [record]))
    return captioned_grid(rows, path)
