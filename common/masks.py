"""Inpaint masks of the original CogVideoX-Fun trainer (get_random_mask in
cogvideox/data/dataset_image_video.py, the masked video and resize_mask of scripts/train.py;
tests/golden/README.md sections 5 and 7).

Convention (the original's): in a pixel mask **1 = generate (unknown)**, 0 = known. ``resize_mask``
receives ``1 − mask`` (1 = known) and returns the latent-grid mask channel of the inpaint input.

``random_mask`` reproduces ``get_random_mask``'s type probabilities and geometry. The original draws
from three global generators (numpy, torch, python ``random``); here every draw comes from the one
numpy ``Generator`` passed in, so a sample's masks are reproducible from its own seed. The bounds
keep the original's semantics: torch/numpy ``randint`` exclude the upper bound, python
``random.randint`` includes it (types 6's counts and block sizes). Where the original would crash
on tiny frames (an empty ``randint`` range, a zero semi-axis) the lower bound is used instead.

Typical use in precompute::

    mask, kind = random_mask((F, 3, H, W), rng)      # (F, 1, H, W) uint8, drawn at the decoded length
    mask = mask[:F_final]                           # the original trims after drawing
    masked = masked_video(pixels, mask)             # (F, 3, H, W), masked pixels -> -1
    m_lat = mask_to_latent(mask)                    # (F_lat, 1, H/8, W/8), 1 = known, k/8 values
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from cogfun.common.geometry import VAE_SPATIAL, SampleGeometry, is_4k1
from torch import Tensor

VIDEO_MASK_PROBS: tuple[float, ...] = (0.05, 0.2, 0.2, 0.2, 0.05, 0.05, 0.05, 0.1, 0.05, 0.05)
IMAGE_MASK_PROBS: tuple[float, ...] = (0.2, 0.8)

LATENT_CHANNELS = 16  # only the shape of the latent matters to resize_mask

MaskFn = Callable[[int, int, int, np.random.Generator], np.ndarray]


def _randint(rng: np.random.Generator, lo: int, hi: int) -> int:
    """Integer in [lo, hi) like torch/numpy randint; ``lo`` when the range is empty."""
    return int(rng.integers(lo, hi)) if hi > lo else lo


def _randint_incl(rng: np.random.Generator, lo: int, hi: int) -> int:
    """Integer in [lo, hi] like python's random.randint; ``lo`` when the range is empty."""
    return int(rng.integers(lo, hi + 1)) if hi >= lo else lo


def _rect(h: int, w: int, rng: np.random.Generator) -> tuple[slice, slice]:
    """Random rectangle: uniform center, sides in [w/4, 3w/4) then halved, clipped at the borders."""
    cx, cy = _randint(rng, 0, w), _randint(rng, 0, h)
    bx = _randint(rng, w // 4, w // 4 * 3)
    by = _randint(rng, h // 4, h // 4 * 3)
    rows = slice(max(cy - by // 2, 0), min(cy + by // 2, h))
    cols = slice(max(cx - bx // 2, 0), min(cx + bx // 2, w))
    return rows, cols


def _zeros(f: int, h: int, w: int) -> np.ndarray:
    return np.zeros((f, 1, h, w), dtype=np.uint8)  # (F, 1, H, W)


def _type0_rect(f: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    mask = _zeros(f, h, w)
    rows, cols = _rect(h, w, rng)
    mask[:, :, rows, cols] = 1
    return mask


def _type1_all(f: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    return np.ones((f, 1, h, w), dtype=np.uint8)  # text-to-video


def _type2_first_known(f: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    mask = _zeros(f, h, w)
    mask[_randint(rng, 1, 5) :] = 1  # image-to-video: the first 1..4 frames are known
    return mask


def _type3_first_last_known(f: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    mask = _zeros(f, h, w)
    k = _randint(rng, 1, 5)
    mask[k:-k] = 1  # interpolation; empty (nothing masked) when f <= 2k, as in the original
    return mask


def _type4_rect_span(f: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    mask = _zeros(f, h, w)
    rows, cols = _rect(h, w, rng)
    start = _randint(rng, 0, f // 2)
    stop = _randint(rng, f // 2, f)
    mask[start:stop, :, rows, cols] = 1
    return mask


def _type5_noise(f: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 2, size=(f, 1, h, w), dtype=np.uint8)  # per-pixel Bernoulli(0.5)


def _type6_blocks(f: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    mask = _zeros(f, h, w)
    count = _randint_incl(rng, 1, max(f // 2, 1))
    for i in rng.choice(f, size=count, replace=False):  # distinct frames, one block each
        bh = _randint_incl(rng, 1, max(h // 4, 1))
        bw = _randint_incl(rng, 1, max(w // 4, 1))
        top = _randint_incl(rng, 0, h - bh)
        left = _randint_incl(rng, 0, w - bw)
        mask[i, 0, top : top + bh, left : left + bw] = 1
    return mask


def _type7_ellipse(f: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    cx, cy = _randint(rng, 0, w), _randint(rng, 0, h)
    a = max(_randint(rng, min(w, h) // 8, min(w, h) // 4), 1)  # semi-axis along x
    b = max(_randint(rng, min(w, h) // 8, min(w, h) // 4), 1)  # semi-axis along y
    # float64 true division as the original's python expression, so boundary pixels agree.
    dy = (np.arange(h, dtype=np.float64) - cy) ** 2 / float(b * b)  # (H,)
    dx = (np.arange(w, dtype=np.float64) - cx) ** 2 / float(a * a)  # (W,)
    inside = (dy[:, None] + dx[None, :]) < 1  # (H, W)
    return np.broadcast_to(inside.astype(np.uint8), (f, 1, h, w)).copy()


def _type8_circle(f: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    cx, cy = _randint(rng, 0, w), _randint(rng, 0, h)
    radius = _randint(rng, min(h, w) // 8, min(h, w) // 4)
    dy = (np.arange(h) - cy) ** 2  # (H,)
    dx = (np.arange(w) - cx) ** 2  # (W,)
    inside = (dy[:, None] + dx[None, :]) < radius * radius  # (H, W)
    return np.broadcast_to(inside.astype(np.uint8), (f, 1, h, w)).copy()


def _type9_frames(f: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    masked = rng.random(f) > 0.5  # (F,) each frame fully masked with probability 0.5
    return np.broadcast_to(masked.astype(np.uint8)[:, None, None, None], (f, 1, h, w)).copy()


MASK_TYPES: dict[int, MaskFn] = {
    0: _type0_rect,
    1: _type1_all,
    2: _type2_first_known,
    3: _type3_first_last_known,
    4: _type4_rect_span,
    5: _type5_noise,
    6: _type6_blocks,
    7: _type7_ellipse,
    8: _type8_circle,
    9: _type9_frames,
}


def random_mask(shape: tuple[int, ...], rng: np.random.Generator) -> tuple[Tensor, int]:
    """Draw one mask for a (F, C, H, W) sample: (uint8 (F, 1, H, W), type id); 1 = generate.

    Videos (F > 1) draw a type with VIDEO_MASK_PROBS, images with IMAGE_MASK_PROBS (types 0, 1).
    """
    f, _, h, w = (int(v) for v in shape)
    probs = VIDEO_MASK_PROBS if f != 1 else IMAGE_MASK_PROBS
    kind = int(rng.choice(len(probs), p=probs))
    return torch.from_numpy(MASK_TYPES[kind](f, h, w, rng)), kind


def masked_video(pixels: Tensor, mask: Tensor) -> Tensor:
    """pixels (F, 3, H, W) in [-1, 1], mask (F, 1, H, W) -> masked pixels set to -1 (black)."""
    m = mask.to(pixels.dtype)
    return pixels * (1 - m) + torch.ones_like(pixels) * -1 * m


def add_inpaint_noise(masked: Tensor, generator: torch.Generator) -> Tensor:
    """The V1.1 models' noise augmentation of the masked video (`add_noise_in_inpaint_model`):
    sigma = exp(N(-3, 0.5)) for the sample, Gaussian noise of that std added to every pixel that is
    not exactly -1 (masked pixels stay -1). masked (F, 3, H, W) float in [-1, 1]."""
    sigma = torch.exp(torch.normal(-3.0, 0.5, size=(1,), generator=generator))
    noise = torch.randn(masked.shape, generator=generator) * sigma
    return masked + torch.where(masked == -1, torch.zeros_like(noise), noise).to(masked.dtype)


def resize_mask(mask_known: Tensor, latent_shape: tuple[int, ...] | torch.Size) -> Tensor:
    """(B, 1, F, H, W) known-mask (1 = known) -> (B, 1, F_lat, h, w) on the latent grid.

    The original's ``resize_mask`` (process_first_frame_only): trilinear, align_corners=False,
    frame 0 alone to latent frame 0 and frames 1: to latent frames 1:. This point-samples
    (a latent cell blends pixels 8j+3 and 8j+4), it does not average; values are multiples of 1/8.
    """
    _, _, f_lat, h, w = (int(v) for v in latent_shape)
    first = F.interpolate(
        mask_known[:, :, 0:1], size=(1, h, w), mode="trilinear", align_corners=False
    )  # (B, 1, 1, h, w)
    if f_lat == 1:
        return first
    rest = F.interpolate(
        mask_known[:, :, 1:], size=(f_lat - 1, h, w), mode="trilinear", align_corners=False
    )  # (B, 1, F_lat - 1, h, w)
    return torch.cat([first, rest], dim=2)


def mask_to_latent(mask: Tensor) -> Tensor:
    """Pixel mask (F, 1, H, W) uint8, 1 = generate -> (F_lat, 1, H/8, W/8) float32, 1 = known.

    The inpaint mask channel *before* the t2v flag and the VAE scaling factor (the original's
    scripts/train.py).
    """
    frames, _, height, width = (int(v) for v in mask.shape)
    geometry = SampleGeometry.of(frames, height, width) if is_4k1(frames) else None
    if geometry is None or not geometry.on_latent_grid:
        raise ValueError(
            f"mask_to_latent: mask of shape {tuple(mask.shape)} needs 4k+1 frames and sides "
            f"divisible by {VAE_SPATIAL}"
        )
    known = (1 - mask.float()).permute(1, 0, 2, 3)[None]  # (1, 1, F, H, W)
    shape = (1, LATENT_CHANNELS, *geometry.latent_shape)
    return resize_mask(known, shape)[0].permute(1, 0, 2, 3).contiguous()  # (F_lat, 1, h, w)
