"""The CogVideoX-Fun VAE decode and the conditioning encode, on diffusers' `AutoencoderKLCogVideoX`.

The Fun VAE class (`cogvideox/models/autoencoder_magvit.py` in the CogVideoX-Fun repository) decodes
differently from diffusers by default (tests/golden/README.md section 12):

1. latent frame 0 is decoded **alone**: its time upsamplers only upsample space, so it gives one pixel
   frame;
2. the remaining latent frames are decoded in chunks of 2, carrying the causal-conv cache from chunk
   to chunk, and every chunk's time upsamplers double its frames (a last chunk of one latent frame
   gives 4 pixel frames, where diffusers would give 1).

Diffusers instead puts the odd remainder in the first chunk (frames 0-2 together for 3 latent frames),
which changes every output frame by 0.1-0.2 on a [0, 1] video. Both classes have the same weights and
the same encode, so only the decode is rebuilt here, from diffusers' own decoder blocks.

    video = fun_decode(vae, latents)           # (B, 16, F_lat, h, w) unscaled -> (B, 3, F, H, W)
    mean = encode_mode(vae, pixels)            # (B, 3, F, H, W) in [-1, 1] -> posterior mode
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from diffusers.models.upsampling import CogVideoXUpsample3D
from torch import Tensor, nn

# Latent frames per decoder call after frame 0 (the Fun class's `num_latent_frames_batch_size`).
_CHUNK = 2


class _FunTimeUpsample(CogVideoXUpsample3D):
    """A time-compressing upsampler that always doubles the frames of a chunk after frame 0.

    Diffusers' forward already matches the Fun class for one frame decoded alone (space only) and
    for two frames (space and time); only a one-frame chunk after frame 0 differs: the Fun class
    doubles it in time too. `fun_rest` says which kind of chunk is being decoded.
    """

    fun_rest: bool = False

    def forward(self, inputs: Tensor) -> Tensor:
        if not (self.compress_time and self.fun_rest and inputs.shape[2] == 1):
            return super().forward(inputs)
        up = F.interpolate(inputs, scale_factor=2.0)  # (B, C, 2, 2h, 2w): time and space
        b, c, t, h, w = up.shape
        out = self.conv(up.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        return out.reshape(b, t, *out.shape[1:]).permute(0, 2, 1, 3, 4)


@contextlib.contextmanager
def _fun_upsamplers(vae: nn.Module) -> Iterator[list[_FunTimeUpsample]]:
    """Swap the decoder's time upsamplers to `_FunTimeUpsample` for the duration of one decode.

    A class swap keeps every parameter in place; the original class comes back afterwards, so the
    VAE object behaves as plain diffusers for everyone else (precompute's encode, for one).
    """
    swapped = [
        (m, type(m))
        for m in vae.decoder.modules()
        if isinstance(m, CogVideoXUpsample3D) and m.compress_time
    ]
    try:
        for module, _ in swapped:
            module.__class__ = _FunTimeUpsample
        yield [m for m, _ in swapped]
    finally:
        for module, cls in swapped:
            module.__class__ = cls
            module.__dict__.pop("fun_rest", None)


@torch.no_grad()
def fun_decode(vae: nn.Module, latents: Tensor) -> Tensor:
    """Decode unscaled latents (B, C, F_lat, h, w) the Fun way into pixels (B, 3, F, H, W) in ~[-1, 1].

    F = 1 + 4 (F_lat - 1). The caller divides by `scaling_factor` first, as the pipeline does.
    """
    post_quant = getattr(vae, "post_quant_conv", None)
    latents = latents.to(vae.dtype)
    frames = latents.shape[2]
    starts = [0, *range(1, frames, _CHUNK)]  # frame 0 alone, then pairs
    out: list[Tensor] = []
    cache = None
    with _fun_upsamplers(vae) as upsamplers:
        for start in starts:
            end = 1 if start == 0 else min(start + _CHUNK, frames)
            for module in upsamplers:
                module.fun_rest = start > 0
            chunk = latents[:, :, start:end]
            if post_quant is not None:
                chunk = post_quant(chunk)
            chunk, cache = vae.decoder(chunk, conv_cache=cache)
            out.append(chunk)
    return torch.cat(out, dim=2)


@torch.no_grad()
def encode_mode(vae: nn.Module, pixels: Tensor) -> Tensor:
    """The posterior **mode** of (B, 3, F, H, W) pixels in [-1, 1], one sample at a time, unscaled.

    The inference pipeline conditions on the mode (training samples the posterior instead).
    """
    modes = [
        vae.encode(one.to(vae.dtype)).latent_dist.mode() for one in pixels.split(1)
    ]  # each (1, C, F_lat, h, w)
    return torch.cat(modes, dim=0)


def plain_decode(vae: nn.Module, latents: Tensor) -> Tensor:
    """Diffusers' own decode of unscaled latents (for comparison: it is not what the original does)."""
    with torch.no_grad():
        return vae.decode(latents.to(vae.dtype)).sample
