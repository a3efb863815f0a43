"""Sampling a video with a Fun inpaint transformer, as the original inference pipeline does.

`generate` is the denoising loop of CogVideoX-Fun's `CogVideoX_Fun_Pipeline_Inpaint.__call__` (with
`strength` 1, `eta` 0, no dynamic CFG), checked against that pipeline's recorded runs in
tests/golden/sample_*.safetensors (tests/golden/README.md section 13):

- conditioning: text-to-video (no video, or a mask that generates everything) gets 17 zero channels
  and no VAE encode; otherwise the masked video (known pixels kept, the rest -1) is VAE-encoded to
  its posterior **mode** and scaled, and the mask channel is `resize_mask(1 - m) * scaling_factor`;
- guidance: the batch is [uncond, cond] with the same conditioning for both halves, and
  `guided = uncond + scale * (cond - uncond)`;
- the scheduler steps with the pipeline's arguments (the CogVideoX DPM scheduler gets the previous
  x0 and timestep, and `generator` for its noise draws);
- decode: the Fun VAE decode (`fun_decode`), then `(x / 2 + 0.5).clamp(0, 1)`.

Tensor layouts: latents (B, F_lat, 16, h, w); prompt embeddings (B, L, D); video (B, 3, F, H, W) in
[0, 1]; mask (B, 1, F, H, W), >= 0.5 = generate (the original's 0/255 masks and 0/1 masks both work);
the decoded video (B, 3, F, H, W) float32 in [0, 1].

Two choices differ from the original on purpose:
- latents stay float32 between steps (the original keeps them in the text encoder's dtype, bf16 in its
  predict scripts); the transformer still runs in its own dtype;
- V1.1/V1.5 models (`add_noise_in_inpaint_model`) add sigma 0.0563 noise to the known pixels. The
  original draws it from torch's global RNG; here it comes from `noise_aug_generator`, by default a
  CPU generator seeded with `generator.initial_seed() + NOISE_AUG_SEED_OFFSET`, so a seed reproduces
  the whole sample and `generator` itself is drawn exactly as the original draws it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from cogfun.common.fun_vae import encode_mode, fun_decode
from cogfun.common.geometry import latent_frames, pixel_frames  # noqa: F401 (latent_frames: re-export)
from cogfun.common.masks import resize_mask
from cogfun.common.transformer import _unwrap, transformer_forward
from torch import Tensor, nn

NOISE_AUG_SIGMA = 0.0563  # the pipeline's default `noise_aug_strength`
NOISE_AUG_SEED_OFFSET = 1_000_003

StepCallback = Callable[[int, Tensor, Tensor, Tensor], None]


def initial_latents(
    shape: tuple[int, int, int, int, int], generator: torch.Generator | None
) -> Tensor:
    """The pipeline's starting noise (B, F_lat, 16, h, w): one `randn` from `generator`, on its device."""
    device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


def _preprocess(video: Tensor, mask: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """The pipeline's image and mask processors: video [0, 1] -> [-1, 1]; mask binarized, 1 = generate.

    Frames are resized (nearest, as `VaeImageProcessor` resizes tensors) only if their size differs.
    """
    b, c, f, h, w = video.shape

    def frames(x: Tensor) -> Tensor:  # (B, C, F, H, W) -> (B*F, C, height, width)
        flat = x.permute(0, 2, 1, 3, 4).reshape(b * f, x.shape[1], h, w).float()
        return flat if (h, w) == (height, width) else F.interpolate(flat, size=(height, width))

    pixels = frames(video) * 2.0 - 1.0
    binary = (frames(mask) >= 0.5).float()

    def back(x: Tensor) -> Tensor:
        return x.reshape(b, f, x.shape[1], height, width).permute(0, 2, 1, 3, 4)

    return back(pixels), back(binary)


def noise_augment(masked: Tensor, generator: torch.Generator) -> Tensor:
    """`add_noise_to_reference_video` with the fixed ratio: noise only where the pixel is not -1."""
    noise = torch.randn(masked.shape, generator=generator, device=generator.device)
    noise = noise.to(masked.device, masked.dtype) * NOISE_AUG_SIGMA
    return masked + torch.where(masked == -1, torch.zeros_like(noise), noise)


def inpaint_conditioning(
    vae: nn.Module,
    latents_shape: torch.Size | tuple[int, ...],
    video: Tensor | None,
    mask: Tensor | None,
    *,
    add_noise: bool = False,
    noise_generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The (B, F_lat, 17, h, w) inpaint latents for one (unduplicated) batch.

    No video, or a mask that generates every pixel, gives zeros without touching the VAE (as the
    pipeline does for its all-255 masks).
    """
    b, f_lat, _, h, w = latents_shape
    if mask is None and video is not None:
        mask = torch.ones_like(video[:, :1])
    if video is None or bool((mask >= 0.5).all()):
        return torch.zeros(b, f_lat, 17, h, w, device=device)
    scale = vae.config.scaling_factor
    pixels, generate = _preprocess(video, mask, h * 8, w * 8)
    masked = pixels * (generate < 0.5) + torch.ones_like(pixels) * (generate > 0.5) * -1
    if add_noise:
        if noise_generator is None:
            raise ValueError("a noise generator is needed for add_noise_in_inpaint_model models")
        masked = noise_augment(masked, noise_generator)
    vae_device = next(vae.parameters()).device
    masked_latents = encode_mode(vae, masked.to(vae_device)).float() * scale  # (B, 16, F_lat, h, w)
    if masked_latents.shape[2] != f_lat:
        raise ValueError(
            f"the video encodes to {masked_latents.shape[2]} latent frames but the latents have "
            f"{f_lat}: give a video of {pixel_frames(f_lat)} frames"
        )
    mask_latent = resize_mask(1 - generate.to(vae_device), masked_latents.shape) * scale
    inpaint = torch.cat([mask_latent, masked_latents], dim=1)  # (B, 17, F_lat, h, w)
    return inpaint.permute(0, 2, 1, 3, 4).to(device)


def _step_kwargs(scheduler: Any, generator: torch.Generator | None) -> dict[str, Any]:
    """`prepare_extra_step_kwargs`: eta 0 and the generator, for the schedulers that take them."""
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def _default_noise_generator(generator: torch.Generator | None) -> torch.Generator:
    seed = (generator.initial_seed() if generator is not None else 0) + NOISE_AUG_SEED_OFFSET
    return torch.Generator("cpu").manual_seed(seed % (2**63))


@torch.no_grad()
def generate(
    transformer: nn.Module,
    vae: nn.Module | None,
    scheduler: Any,
    *,
    prompt_embeds: Tensor,
    negative_prompt_embeds: Tensor | None,
    latents: Tensor,
    video: Tensor | None,
    mask: Tensor | None,
    num_inference_steps: int,
    guidance_scale: float,
    generator: torch.Generator | None,
    noise_aug_generator: torch.Generator | None = None,
    on_step: StepCallback | None = None,
    decode: bool = True,
) -> dict[str, Tensor]:
    """Denoise `latents` (B, F_lat, 16, h, w) into a video; see the module docstring for layouts.

    Returns `latents` (final, before decode), `inpaint_latents` (the conditioning of one batch) and,
    when `decode`, `video` (B, 3, F, H, W) in [0, 1]. `on_step(i, t, latents_after_step,
    transformer_output)` is called after every scheduler step (the output has the [uncond, cond] rows
    when guidance is on). `vae` may be None only with `decode=False` and no video to encode.
    """
    core = _unwrap(transformer)
    device = next(core.parameters()).device
    latents = latents.to(device=device, dtype=torch.float32)
    b, f_lat, _, _, _ = latents.shape
    p_t = core.config.get("patch_size_t")
    if p_t is not None and f_lat > 1 and f_lat % p_t:
        raise ValueError(
            f"{f_lat} latent frames: this model (patch_size_t {p_t}) needs a multiple of {p_t} "
            "latent frames or a single one"
        )
    if video is not None and video.shape[2] != pixel_frames(f_lat):
        raise ValueError(
            f"the video has {video.shape[2]} frames but the latents have {f_lat} latent frames "
            f"(needs {pixel_frames(f_lat)} frames)"
        )
    guided = guidance_scale > 1.0
    if guided and negative_prompt_embeds is None:
        raise ValueError("guidance_scale > 1 needs negative_prompt_embeds (the empty prompt's)")
    embeds = prompt_embeds.to(device)
    if guided:
        embeds = torch.cat([negative_prompt_embeds.to(device), embeds])  # [uncond, cond]

    add_noise = bool(core.config.get("add_noise_in_inpaint_model", False))
    needs_vae = video is not None and mask is not None and not bool((mask >= 0.5).all())
    if (needs_vae or decode) and vae is None:
        raise ValueError("a VAE is needed to encode the input video and to decode the result")
    inpaint = None
    if core.config.in_channels != latents.shape[2]:
        inpaint = inpaint_conditioning(
            vae,
            latents.shape,
            video,
            mask,
            add_noise=add_noise,
            noise_generator=noise_aug_generator or _default_noise_generator(generator),
            device=device,
        )
    inpaint_input = None if inpaint is None else (torch.cat([inpaint] * 2) if guided else inpaint)

    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    latents = latents * scheduler.init_noise_sigma
    step_kwargs = _step_kwargs(scheduler, generator)
    cog_dpm = type(scheduler).__name__ == "CogVideoXDPMScheduler"
    old_x0 = None
    for i, t in enumerate(timesteps):
        model_input = torch.cat([latents] * 2) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        output = transformer_forward(
            transformer, model_input, embeds, t.expand(model_input.shape[0]), inpaint_input
        ).float()
        pred = output
        if guided:
            uncond, cond = output.chunk(2)
            pred = uncond + guidance_scale * (cond - uncond)
        if cog_dpm:
            prev_t = timesteps[i - 1] if i > 0 else None
            latents, old_x0 = scheduler.step(
                pred, old_x0, t, prev_t, latents, **step_kwargs, return_dict=False
            )
        else:
            latents = scheduler.step(pred, t, latents, **step_kwargs, return_dict=False)[0]
        latents = latents.float()
        if on_step is not None:
            on_step(i, t, latents, output)

    result = {
        "latents": latents,
        "inpaint_latents": inpaint if inpaint is not None else torch.empty(0),
    }
    if decode:
        vae_device = next(vae.parameters()).device
        z = latents.permute(0, 2, 1, 3, 4).to(vae_device) / vae.config.scaling_factor
        result["video"] = (fun_decode(vae, z).float() / 2 + 0.5).clamp(0, 1)
    return result
