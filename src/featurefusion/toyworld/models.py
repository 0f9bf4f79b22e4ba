"""The tiny text-to-image diffusion model of the built-in world, made of the same parts as Stable Diffusion.

- Tokenizer: a word-level `tokenizers` model over the world's vocabulary, wrapped as a transformers
  `PreTrainedTokenizerFast` (prompts are 5 words; with <bos>/<eos> and padding, 8 tokens).
- Text encoder: a transformers `CLIPTextModel` built from a small config.
- Denoiser: a diffusers `UNet2DConditionModel` with conv, linear, GroupNorm, time-embedding and
  cross-attention layers, so merges exercise the same code paths as on SD. It works on 16x16 RGB pixels
  directly (no VAE: at this size a latent space would save nothing).
- Scheduler: diffusers DDPM for training, DDIM for sampling (same noise schedule).

A model is saved as a diffusers-style folder (model_index.json, unet/, text_encoder/, tokenizer/,
scheduler/) that the merge engine reads as a `diffusers` pipeline; specialists are UNet-only weight files,
as in the paper, where only the UNet is fine-tuned.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from featurefusion.toyworld.world import VOCABULARY

MAX_TOKENS = 8  # <bos> + 5 words + <eos>, padded to 8
TEXT_WIDTH = 64
IMAGE_SIZE = 16

UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    # Cross-attention at 4x4 and in the mid block only: at 16 px that is enough for the prompt to steer
    # object, colour and style, and sampling is ~25% faster than with attention at 8x8 too.
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT_WIDTH,
    attention_head_dim=8,
    norm_num_groups=16,
)
TEXT_CONFIG = dict(
    vocab_size=len(VOCABULARY),
    hidden_size=TEXT_WIDTH,
    intermediate_size=2 * TEXT_WIDTH,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=MAX_TOKENS,
    pad_token_id=VOCABULARY.index("<pad>"),
    bos_token_id=VOCABULARY.index("<bos>"),
    eos_token_id=VOCABULARY.index("<eos>"),
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")


def build_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {token: i for i, token in enumerate(VOCABULARY.tokens)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # "red," -> "red", ","
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MAX_TOKENS,
    )


def build_text_encoder(seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))


def build_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG)


class ToyPipeline(DiffusionPipeline):
    """Text-to-image sampling with classifier-free guidance, in the diffusers pipeline mould."""

    def __init__(self, unet, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
        return self.text_encoder(ids).last_hidden_state

    @torch.inference_mode()
    def __call__(
        self,
        prompts: list[str],
        steps: int = 20,
        guidance_scale: float = 3.0,
        seed: int = 0,
        batch_size: int = 256,
    ) -> torch.Tensor:
        """Images [B, 3, 16, 16] in [-1, 1]. Image i depends only on (prompt i, seed, i)."""
        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(steps)
        uncond = self.encode([""])
        out = []
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            cond = self.encode(batch)
            noise = _per_image_noise(seed, start, len(batch))
            x = noise * scheduler.init_noise_sigma
            context = torch.cat([uncond.expand(len(batch), -1, -1), cond])
            with _prompts_for(self.unet, batch):
                for t in scheduler.timesteps:
                    eps_uncond, eps_cond = self.unet(torch.cat([x, x]), t, context).sample.chunk(2)
                    eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
                    x = scheduler.step(eps, t, x).prev_sample
            out.append(x.clamp(-1, 1))
        return torch.cat(out)


def _prompts_for(unet, prompts: list[str]):
    # A denoiser that routes by prompt text (featurefusion.ensemble's keyword routing) is told the prompts.
    route = getattr(unet, "route", None)
    if route is None or getattr(unet, "router", None) is None:
        return contextlib.nullcontext()
    return route(prompts)


def _per_image_noise(seed: int, start: int, count: int) -> torch.Tensor:
    # One generator per image, so an image does not depend on the batch it was sampled in.
    return torch.stack(
        [
            torch.randn(
                3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed * 1_000_003 + start + i)
            )
            for i in range(count)
        ]
    )


def build_pipeline(seed: int = 0) -> ToyPipeline:
    return ToyPipeline(
        unet=build_unet(seed),
        text_encoder=build_text_encoder(seed + 1),
        tokenizer=build_tokenizer(),
        scheduler=DDPMScheduler(**SCHEDULER_CONFIG),
    )


def load_pipeline(folder: str | Path, unet_weights: str | Path | None = None) -> ToyPipeline:
    """A saved toy model; `unet_weights` swaps in a specialist's (or merged) UNet weights file."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar per tiny load drowns the demo's own progress
    folder = Path(folder)
    pipe = ToyPipeline(
        unet=UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32),
        tokenizer=PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer"),
        scheduler=DDPMScheduler.from_pretrained(folder / "scheduler"),
    )
    if unet_weights is not None:
        load_unet_weights(pipe.unet, unet_weights)
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return pipe


def load_unet_weights(unet: UNet2DConditionModel, path: str | Path) -> None:
    from featurefusion.io.checkpoint import open_checkpoint

    with open_checkpoint(path) as ckpt:
        state = {k.removeprefix("unet."): ckpt.read(k).float() for k in ckpt.keys("unet")}
    unet.load_state_dict(state, strict=True)
