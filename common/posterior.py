"""Sampling the VAE's posterior from its stored moments: the one implementation both stages use.

The VAE encodes a clip to a diagonal Gaussian whose parameters ("moments") are the mean then the
log-variance on the channel axis, which is axis -3 of every latent tensor cogfun handles
(``(F_lat, 2C, h, w)`` per sample, ``(B, F_lat, 2C, h, w)`` batched). A sample is
``mean + exp(0.5 * clamp(logvar, -30, 20)) * eps``, the clamp being diffusers'
``DiagonalGaussianDistribution``'s. Precompute draws one per sample with ``--latent-format sample``
(a generator seeded per sample); training draws one per step from stored moments (the step's
generator). Both draw ``eps`` with `standard_normal`, so the same generator state gives the same
latents bit for bit in either stage.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # diffusers' DiagonalGaussianDistribution clamp


def standard_normal(
    shape: torch.Size | tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """Standard normal float32 drawn on the generator's device (so a CPU generator's stream does
    not depend on where the tensors live), then moved to ``device``."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where, dtype=torch.float32).to(device)


def sample_posterior(moments: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw of the posterior stored as ``moments`` (..., 2C, h, w) -> (..., C, h, w) float32,
    unscaled (the VAE's scaling factor is applied by the caller). ``eps`` is one ``randn`` of the
    sample's shape from ``generator``."""
    mean, logvar = moments.float().chunk(2, dim=-3)
    std = torch.exp(0.5 * logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))
    return mean + std * standard_normal(mean.shape, generator, mean.device)
