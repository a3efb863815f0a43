"""The body of `cogfun sample`: prompts, inputs, models, `generate`, mp4.

Memory order follows the parts' lifetimes: T5 runs first and is released (or is never loaded when an
embeddings file is given), then the transformer and the VAE are loaded for the denoising and decode.

LoRA: `--lora FILE` (the original's format or diffusers', see `cogfun.train.lora`) is merged into the
loaded transformer at `--lora-weight` (default 0.55, the original predict scripts' `lora_weight`),
exactly as `cogfun merge-lora` merges it, so both give the same video. A `--checkpoint` folder of a
`--lora` run (no transformer/, its adapters in `checkpoint-N.safetensors`) is merged over the model's
transformer at weight 1.0 unless `--lora-weight` says otherwise: 1.0 is the adapters as trained, what
validation sampled during training.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from cogfun.common import sample_inputs as si
from torch import Tensor


@dataclass(frozen=True)
class SampleRequest:
    model: Path
    out: Path
    prompt: str | None
    negative_prompt: str
    prompt_embeds: Path | None
    prompt_index: int
    checkpoint: Path | None
    lora: Path | None
    lora_weight: float | None  # None: 0.55 for --lora, 1.0 for a LoRA --checkpoint
    image: Path | None
    end_image: Path | None
    video: Path | None
    mask_video: Path | None
    rect: str | None
    num_frames: int
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    scheduler: str
    fps: int


def _embeddings(
    req: SampleRequest, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """(prompt, negative) embeddings, (1, L, D) each: from the file, or T5 run now and released."""
    if req.prompt_embeds is not None:
        loaded = si.load_prompt_embeds(req.prompt_embeds)
        if not 0 <= req.prompt_index < len(loaded.prompts):
            raise ValueError(
                f"--prompt-index {req.prompt_index}: {req.prompt_embeds} holds "
                f"{len(loaded.prompts)} prompt(s)"
            )
        i = req.prompt_index
        return loaded.embeds[i : i + 1], loaded.negative_embeds
    from cogfun.app.sample_cli import _encode_texts

    embeds = _encode_texts(req.model, [req.prompt or "", req.negative_prompt], device, dtype)
    return embeds[:1], embeds[1:]


def _inputs(req: SampleRequest, size: si.SampleSize) -> tuple[Tensor | None, Tensor | None]:
    if req.image is not None:
        return si.image_to_video(req.image, req.end_image, size)
    if req.video is not None:
        pixels = si.read_input_video(req.video, size)
        if req.rect is not None:
            return pixels, si.rect_mask(si.parse_rect(req.rect, size), size)
        return pixels, si.read_mask(req.mask_video, size)
    return None, None  # text to video: everything generated, zero conditioning


LORA_WEIGHT = 0.55  # the original predict scripts' lora_weight
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class TransformerSource:
    folder: Path  # config.json + weights
    lora: Path | None  # merged over it
    lora_weight: float


def _checkpoint_lora(ckpt: Path) -> Path | None:
    """The adapters file of a `--lora` run's checkpoint-N folder: the original's format first (it
    carries alpha), diffusers' otherwise; None when the folder holds neither."""
    for file in (ckpt / f"{ckpt.name}.safetensors", *sorted(ckpt.glob("checkpoint-*.safetensors"))):
        if file.is_file():
            return file
    file = ckpt / DIFFUSERS_LORA_FILE
    return file if file.is_file() else None


def transformer_source(req: SampleRequest) -> TransformerSource:
    """Where the transformer comes from and which LoRA (if any) is merged into it."""
    source = _source(req)
    if source.lora is None and req.lora_weight is not None:
        raise ValueError(
            f"--lora-weight {req.lora_weight:g}: there is no LoRA to merge (give --lora, or a "
            "--lora run's checkpoint-N as --checkpoint)"
        )
    return source


def _source(req: SampleRequest) -> TransformerSource:
    lora_weight = LORA_WEIGHT if req.lora_weight is None else req.lora_weight
    if req.lora is not None and not req.lora.is_file():  # before T5 and the transformer load
        raise FileNotFoundError(f"--lora {req.lora}: file not found")
    if req.checkpoint is None:
        return TransformerSource(req.model / "transformer", req.lora, lora_weight)
    ckpt = req.checkpoint
    for folder in (ckpt, ckpt / "transformer"):
        if (folder / "config.json").is_file():
            return TransformerSource(folder, req.lora, lora_weight)
    adapters = _checkpoint_lora(ckpt) if ckpt.is_dir() else None
    if adapters is None:
        raise FileNotFoundError(
            f"--checkpoint {ckpt}: expected a checkpoint-N folder with transformer/ (full "
            f"training), checkpoint-N.safetensors or {DIFFUSERS_LORA_FILE} (--lora training), or "
            "a transformer folder (config.json + weights)"
        )
    if req.lora is not None:
        raise ValueError(
            f"--checkpoint {ckpt} holds LoRA adapters ({adapters.name}) and --lora {req.lora} is "
            "another: give one (merge one into a model with `cogfun merge-lora` first)"
        )
    weight = 1.0 if req.lora_weight is None else req.lora_weight
    return TransformerSource(req.model / "transformer", adapters, weight)


def _load_transformer(source: TransformerSource, device, dtype, say: Callable[[str], None]):
    from cogfun.common.models import load_transformer
    from cogfun.train.lora import LoraError
    from cogfun.train.lora_files import merge_lora

    transformer = load_transformer(source.folder, dtype=dtype)
    if source.lora is not None:
        try:
            merged = merge_lora(transformer, source.lora, source.lora_weight)
        except LoraError as err:
            raise ValueError(str(err)) from err
        say(f"merged {source.lora} at weight {source.lora_weight:g} ({len(merged)} layers)")
    return transformer.to(device).eval()


def run_sample(
    req: SampleRequest,
    device: torch.device,
    dtype: torch.dtype,
    say: Callable[[str], None],
) -> Path:
    """Generate one video as `req` asks and write it; returns the mp4 path."""
    from cogfun.common.geometry import latent_shape_of
    from cogfun.common.models import check_model_folder, load_vae
    from cogfun.common.sampling import generate, initial_latents
    from cogfun.common.schedulers import build_scheduler, scheduler_config

    parts = ["vae", "scheduler"]
    if req.prompt_embeds is None:
        parts += ["tokenizer", "text_encoder"]
    source = transformer_source(req)
    if source.folder == req.model / "transformer":
        parts.append("transformer")
    root = check_model_folder(req.model, parts)
    t_config = json.loads((source.folder / "config.json").read_text())
    size = si.snap_size(req.num_frames, req.height, req.width, t_config, say)
    video, mask = _inputs(req, size)

    embeds, negative = _embeddings(req, device, dtype)
    transformer = _load_transformer(source, device, dtype, say)
    text_dim = transformer.config.text_embed_dim
    if embeds.shape[-1] != text_dim:
        raise ValueError(
            f"the prompt embeddings have width {embeds.shape[-1]} but the transformer takes "
            f"{text_dim}: they come from another model's T5"
        )
    vae = load_vae(root, dtype=dtype).to(device)
    scheduler = build_scheduler(req.scheduler, scheduler_config(root))
    generator = torch.Generator(device).manual_seed(req.seed)
    f_lat, h, w = latent_shape_of(size.frames, size.height, size.width)
    shape = (1, f_lat, vae.config.latent_channels, h, w)
    say(
        f"{size.frames} frames at {size.height}x{size.width}, {req.num_inference_steps} "
        f"{req.scheduler} steps, guidance {req.guidance_scale}, seed {req.seed}, {device} {dtype}"
    )
    result = generate(
        transformer,
        vae,
        scheduler,
        prompt_embeds=embeds.to(device, dtype),
        negative_prompt_embeds=negative.to(device, dtype),
        latents=initial_latents(shape, generator),
        video=video,
        mask=mask,
        num_inference_steps=req.num_inference_steps,
        guidance_scale=req.guidance_scale,
        generator=generator,
    )
    return si.write_mp4(result["video"][0], req.out, req.fps)
