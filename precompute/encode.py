"""The encoders of precompute: the VAE (posterior moments) and T5, loaded once per process.

The VAE runs on `b c f h w` batches of `vae_mini_batch` samples and returns the diagonal Gaussian's
parameters (mean and logvar, 2C channels) rearranged to `b f c h w`; `--latent-format sample` keeps
one posterior sample instead, drawn with a generator seeded per sample, so the result does not
depend on which samples shared the batch's random stream. Latents are stored unscaled: training
multiplies by the VAE's scaling factor, which the store records.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from cogfun.common.models import encode_prompts, load_text_encoder, load_tokenizer, load_vae
from cogfun.common.posterior import sample_posterior
from torch import Tensor

log = logging.getLogger("cogfun.precompute")

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_dtype(name: str, device: torch.device) -> str:
    """`auto` is bf16 on a GPU (as the original), fp32 on a CPU (bf16 convolutions are slow there)."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


@dataclass
class VaeEncoder:
    vae: Any
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def load(
        cls, model: Path, device: torch.device, dtype: str, slicing: bool, tiling: bool
    ) -> VaeEncoder:
        vae = load_vae(model, DTYPES[dtype]).to(device)
        if slicing:
            vae.enable_slicing()
        if tiling:
            vae.enable_tiling()
        return cls(vae, device, DTYPES[dtype])

    def moments(self, videos: Tensor) -> Tensor:
        """(B, F, 3, H, W) in [-1, 1] -> posterior parameters (B, F_lat, 2C, h, w), CPU."""
        x = videos.to(self.device, self.dtype).permute(0, 2, 1, 3, 4).contiguous()  # (B,3,F,H,W)
        with torch.no_grad():
            params = self.vae.encode(x).latent_dist.parameters  # (B, 2C, F_lat, h, w)
        return params.permute(0, 2, 1, 3, 4).cpu()  # (B, F_lat, 2C, h, w)


def stored_latents(moments: Tensor, latent_format: str, seed: int) -> Tensor:
    """What the store keeps of one sample's moments (F_lat, 2C, h, w): them, or one posterior
    sample (F_lat, C, h, w) float32 unscaled, its eps from a CPU generator seeded by `seed`."""
    if latent_format == "moments":
        return moments
    return sample_posterior(moments, torch.Generator().manual_seed(seed))


def encode_in_batches(encoder: VaeEncoder, videos: list[Tensor], batch: int) -> list[Tensor]:
    """Moments of each (F, 3, H, W) video, `batch` videos per VAE call, in order."""
    out: list[Tensor] = []
    for start in range(0, len(videos), batch):
        out.extend(encoder.moments(torch.stack(videos[start : start + batch])).unbind(0))
    return out


@dataclass
class TextEncoder:
    tokenizer: Any
    model: Any
    max_length: int

    @classmethod
    def load(cls, model: Path, device: torch.device, dtype: str, max_length: int) -> TextEncoder:
        tokenizer = load_tokenizer(model)
        encoder = load_text_encoder(model, DTYPES[dtype]).to(device)
        return cls(tokenizer, encoder, max_length)

    def encode(self, texts: list[str]) -> Tensor:
        """(B, L, D) on the CPU: padded to max_length, no attention mask (as the original)."""
        return encode_prompts(self.tokenizer, self.model, texts, self.max_length).cpu()
