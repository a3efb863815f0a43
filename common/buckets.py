"""Bucket, size and frame-count math of the original CogVideoX-Fun trainer (scripts/train.py's
collate_fn and random_frame_crop, cogvideox/data/bucket_sampler.py; tests/golden/README.md
section 6).

Everything here is a pure function of numbers (plus a numpy ``Generator`` for the draws), checked
entry by entry against ``tests/golden/buckets.json``, which the original code produced.

Vocabulary: a *frame* is a pixel frame; sizes are ``(H, W)`` in pixels; a *bucket* is the ``(H, W)``
a sample is resized-to-cover and center-cropped to. The original decides sizes per batch in its
``collate_fn``; cogfun draws the same distributions once per sample at precompute time.

Choices that follow the original's *code* rather than its README (the README's numbers differ):
- the frame budget per size is ``min(n·tok²/s², n) // 4 · 4 + 1`` (no ``−1``), so 1024 px gets 13 frames;
- table sizes are scaled in float64 in the original's operation order, then truncated to a multiple
  of 16 (``int(v/16)*16``): at s=384 a 720×1280 video gets 288×496, not 288×504.

Models with ``patch_size_t`` (CogVideoX-Fun V1.5: 2) patch latent frames in pairs.
``BucketOptions`` carries it and every frame count passes through ``patch_frames``, as the original's
collate_fn and ``--random_frame_crop`` do (tests/golden/README.md section 11, golden
``frames_v15.json``): an odd latent count loses one latent frame, so 49 frames become 45 and clips
of 2-4 frames become 1. With ``patch_size_t`` None every function here is exactly what it was
without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from cogfun.common.geometry import VAE_TEMPORAL, SampleGeometry, frames_4k1, latent_frames
from torch import Tensor

# h/w key -> (h, w) at base 512, in the original's order (the order decides ties, see nearest_ratio_key).
ASPECT_RATIO_512: dict[str, tuple[int, int]] = {
    "0.25": (256, 1024), "0.26": (256, 992), "0.27": (256, 960), "0.28": (256, 928),
    "0.32": (288, 896), "0.33": (288, 864), "0.35": (288, 832), "0.4": (320, 800),
    "0.42": (320, 768), "0.48": (352, 736), "0.5": (352, 704), "0.52": (352, 672),
    "0.57": (384, 672), "0.6": (384, 640), "0.68": (416, 608), "0.72": (416, 576),
    "0.78": (448, 576), "0.82": (448, 544), "0.88": (480, 544), "0.94": (480, 512),
    "1.0": (512, 512), "1.07": (512, 480), "1.13": (544, 480), "1.21": (544, 448),
    "1.29": (576, 448), "1.38": (576, 416), "1.46": (608, 416), "1.67": (640, 384),
    "1.75": (672, 384), "2.0": (704, 352), "2.09": (736, 352), "2.4": (768, 320),
    "2.5": (800, 320), "2.89": (832, 288), "3.0": (864, 288), "3.11": (896, 288),
    "3.62": (928, 256), "3.75": (960, 256), "3.88": (992, 256), "4.0": (1024, 256),
}  # fmt: skip

SNAP = 16  # bucket sides are multiples of 16 (VAE /8, patch 2)


@dataclass(frozen=True)
class BucketOptions:
    """The options that shape a sample's (H, W, F); defaults are the recommended command's."""

    image_sample_size: int = 1024
    video_sample_size: int = 256
    token_sample_size: int = 512
    video_sample_n_frames: int = 49
    enable_bucket: bool = True
    random_hw_adapt: bool = True
    training_with_video_token_length: bool = True
    random_frame_crop: bool = True
    patch_size_t: int | None = None  # the transformer's temporal patch (V1.5: 2; None for 2b/5b)


# ---------------------------------------------------------------------------------------------
# Aspect ratio keys and table scaling
# ---------------------------------------------------------------------------------------------


def nearest_ratio_key(h: float, w: float) -> str:
    """The ASPECT_RATIO_512 key nearest to h/w: float64 ``|float(key) − h/w|``, first minimum wins.

    375×1000 is an exact tie between "0.35" and "0.4" and gives "0.35" (table order); 545×1000 gives
    "0.57" because float64 rounding makes it closer than "0.52".
    """
    ratio = h / w
    return min(ASPECT_RATIO_512, key=lambda key: abs(float(key) - ratio))


def snap16(x: float) -> int:
    """Truncate to a multiple of 16, as the original does (``int(x / 16) * 16``)."""
    return int(x / SNAP) * SNAP


def bucket_hw(key: str, base: float, ratio: float = 1) -> tuple[int, int]:
    """Table entry ``key`` scaled as ``x / 512 * base / ratio`` (float64, this order), snapped to 16."""
    h, w = ASPECT_RATIO_512[key]
    return snap16(h / 512 * base / ratio), snap16(w / 512 * base / ratio)


def downsample_choices(sample_size: int, extra: list[float]) -> tuple[list[float], list[float]]:
    """The original's ``get_random_downsample_ratio`` choices: values, then probabilities.

    The first value (1) gets 0.75 and the rest share 0.25; ``extra`` is appended only when
    ``sample_size >= 512``.
    """
    if sample_size >= 1536:
        values = [1, 1.25, 1.5, 2, 2.5, 3, *extra]
    elif sample_size >= 1024:
        values = [1, 1.25, 1.5, 2, *extra]
    elif sample_size >= 768:
        values = [1, 1.25, 1.5, *extra]
    elif sample_size >= 512:
        values = [1, *extra]
    else:
        values = [1]
    if len(values) == 1:
        return values, [1.0]
    rest = (1.0 - 0.75) / (len(values) - 1)
    return values, [0.75] + [rest] * (len(values) - 1)


def image_downsample_choices(image_size: int, video_size: int) -> tuple[list[float], list[float]]:
    """Image resolution ratios ρ under random_hw_adapt: 1024/256 gives [1, 1.25, 1.5, 2, 4.0]."""
    return downsample_choices(image_size, [image_size / video_size])


def image_bucket_hw(h: float, w: float, image_size: int, ratio: float = 1) -> tuple[int, int]:
    """Bucket of an h×w image at ``image_size`` downsampled by ``ratio`` (the original's
    collate_fn)."""
    return bucket_hw(nearest_ratio_key(h, w), image_size, ratio)


# ---------------------------------------------------------------------------------------------
# Video sizes and frame counts
# ---------------------------------------------------------------------------------------------


def short_side_cap_hw(h: int, w: int, short_side: int) -> tuple[int, int]:
    """Size after the dataset's decode-time cap (``resize_frame``): a short side above
    ``short_side`` is brought down to it, the long side becomes ``int(short_side · long / short)``.

    Idempotent, so applying it to an already capped size changes nothing.
    """
    if h < w:
        if short_side > h:
            return h, w
        return short_side, int(short_side * w / h)
    if short_side > w:
        return h, w
    return int(short_side * h / w), short_side


def size_ladder(video_size: int, image_size: int) -> list[int]:
    """Video edge sizes under token-length mode: video_size..image_size step 128 (+ image_size)."""
    if image_size <= video_size:
        return [image_size]
    sizes = list(range(video_size, image_size + 1, 128))
    if sizes[-1] != image_size:
        sizes.append(image_size)
    return sizes


def frames_for_size(s: int, n_frames: int, token_size: int) -> int:
    """Frame budget at edge ``s``: ``min(n·tok²/s², n) // 4 · 4 + 1`` (the code's formula: 1024 → 13)."""
    budget = n_frames * token_size * token_size
    return int(min(budget / s / s, n_frames) // VAE_TEMPORAL * VAE_TEMPORAL + 1)


def eligible_sizes(ladder: list[int], min_mean_hw: float) -> list[int]:
    """Ladder sizes below 1.25 × mean(H, W) (videos are not upscaled much); all sizes if none."""
    sizes = [s for s in ladder if s < min_mean_hw * 1.25]
    return sizes or list(ladder)


def video_bucket_hw(h: float, w: float, s: int, video_size: int = 256) -> tuple[int, int]:
    """Bucket of an h×w video drawn at edge ``s``: the table scaled ``x/512·v/(v/s)``, snapped to 16.

    The original expresses s as a downsample ratio ``v/s`` of ``video_size`` v; keeping that
    operation order reproduces its float truncations exactly.
    """
    return bucket_hw(nearest_ratio_key(h, w), video_size, video_size / s)


def patch_frames(n: int, patch_size_t: int | None) -> int:
    """Frames a clip of ``n`` keeps for a transformer with temporal patch ``patch_size_t``.

    ``frames_4k1(n)``, then, when the latent count ``(F − 1)/4 + 1`` is not a multiple of
    ``patch_size_t``, the remainder's latent frames (4 pixel frames each) are dropped; a result
    of 0 or less becomes 1. With 2: 49 -> 45, 9 -> 5, 2..4 -> 1 and 1 stays 1 (the forward pads a
    one-frame input). The original's collate_fn and random_frame_crop both do this.
    """
    frames = frames_4k1(n)
    if patch_size_t is None:
        return frames
    frames -= latent_frames(frames) % patch_size_t * VAE_TEMPORAL
    return frames if frames > 0 else 1


def patchable_latent_frames(latent_frames: int, patch_size_t: int | None) -> bool:
    """Whether a stored latent frame count fits the transformer: any count without
    ``patch_size_t``; with it, one frame (padded inside the forward) or a multiple of it."""
    return patch_size_t is None or latent_frames == 1 or latent_frames % patch_size_t == 0


def random_frame_crop_choices(
    n_frames: int, patch_size_t: int | None = None
) -> tuple[list[int], list[float]]:
    """random_frame_crop values ``range(5, n+4, 4)``: 0.9 on the last, 0.1 shared by the others.

    With ``patch_size_t`` each candidate is passed through ``patch_frames`` after the draw's
    probabilities are fixed, so candidates collapse in pairs (9 -> 5, 17 -> 13, ...) exactly as the
    original clips the drawn value; the draw itself (and its RNG use) is unchanged.
    """
    values = list(range(VAE_TEMPORAL + 1, n_frames + VAE_TEMPORAL, VAE_TEMPORAL))
    values = [patch_frames(v, patch_size_t) for v in values]
    if len(values) <= 1:
        return values, [1.0] * len(values)
    rest = (1.0 - 0.9) / (len(values) - 1)
    return values, [rest] * (len(values) - 1) + [0.9]


def auto_tile_factor(frames: int, h: int, w: int, n_frames: int = 49, token_size: int = 512) -> int:
    """CogVideoX-Fun's batch tiling under token-length mode (scripts/train.py): ×4, ×2 or ×1."""
    pixels = frames * h * w
    if n_frames * token_size * token_size // 16 >= pixels:
        return 4
    if n_frames * token_size * token_size // 4 >= pixels:
        return 2
    return 1


def video_variant_for_size(
    h: int, w: int, n_decoded_frames: int, s: int, opts: BucketOptions
) -> tuple[int, int, int]:
    """(H, W, F) of a video in token-length mode at edge ``s``, before random_frame_crop.

    F is the size's frame budget, cut to the frames available, then down to 4k+1 (and to what
    ``opts.patch_size_t`` can patch, see ``patch_frames``).
    """
    budget = frames_for_size(s, opts.video_sample_n_frames, opts.token_sample_size)
    H, W = video_bucket_hw(h, w, s, opts.video_sample_size)
    return H, W, patch_frames(min(budget, n_decoded_frames), opts.patch_size_t)


def _draw_frame_crop(frames: int, opts: BucketOptions, rng: np.random.Generator) -> int:
    """Apply random_frame_crop: keep the leading min(F, T) frames, T drawn from its choices."""
    if not opts.random_frame_crop:
        return frames
    values, probs = random_frame_crop_choices(opts.video_sample_n_frames, opts.patch_size_t)
    crop = int(rng.choice(values, p=probs)) if values else 1
    return min(frames, crop)


def choose_video_variant(
    h: int, w: int, n_decoded_frames: int, opts: BucketOptions, rng: np.random.Generator
) -> tuple[int, int, int]:
    """Draw (H, W, F) for one video as the original's collate_fn + random_frame_crop draw per batch.

    ``h, w`` is the decoded frame size; the decode-time short-side cap (to max(image, video) size)
    is applied here too (it is idempotent), so the aspect key and the size ladder see what the
    original's collate_fn saw. The frames kept are always the *leading* F frames of the clip.
    """
    h, w = short_side_cap_hw(h, w, max(opts.image_sample_size, opts.video_sample_size))
    n_max = opts.video_sample_n_frames
    if not opts.enable_bucket:
        # The dataset's fixed transform: short side to video_sample_size, square center crop.
        H = W = opts.video_sample_size
        # The original has no collate here, so no patch_size_t clip: its V1.5 forward would fail
        # on the odd latent count; cogfun clips as its collate does everywhere else.
        frames = patch_frames(min(n_decoded_frames, n_max), opts.patch_size_t)
    elif opts.random_hw_adapt and opts.training_with_video_token_length:
        ladder = size_ladder(opts.video_sample_size, opts.image_sample_size)
        s = int(rng.choice(eligible_sizes(ladder, (h + w) / 2)))
        H, W, frames = video_variant_for_size(h, w, n_decoded_frames, s, opts)
    else:
        ratio = 1.0
        if opts.random_hw_adapt:
            values, probs = downsample_choices(opts.video_sample_size, [])
            ratio = float(rng.choice(values, p=probs))
        H, W = bucket_hw(nearest_ratio_key(h, w), opts.video_sample_size, ratio)
        # The original's budget here is n + 4, i.e. only the frames available limit it.
        frames = patch_frames(min(n_max + VAE_TEMPORAL, n_decoded_frames), opts.patch_size_t)
    return H, W, _draw_frame_crop(frames, opts, rng)


def choose_image_variant(
    h: int, w: int, opts: BucketOptions, rng: np.random.Generator
) -> tuple[int, int]:
    """Draw (H, W) for one image: ρ from image_downsample_choices under random_hw_adapt, else 1."""
    if not opts.enable_bucket:
        return opts.image_sample_size, opts.image_sample_size
    ratio = 1.0
    if opts.random_hw_adapt:
        values, probs = image_downsample_choices(opts.image_sample_size, opts.video_sample_size)
        ratio = float(rng.choice(values, p=probs))
    return image_bucket_hw(h, w, opts.image_sample_size, ratio)


# ---------------------------------------------------------------------------------------------
# Pixels: resize to cover, center crop, normalize
# ---------------------------------------------------------------------------------------------


def cover_resize_hw(h: int, w: int, th: int, tw: int) -> tuple[int, int]:
    """Size that covers th×tw keeping the aspect ratio, truncated as the original's collate_fn."""
    if th / h > tw / w:
        # max(): float rounding must never leave the resized side a pixel short of the crop.
        return th, max(int(w * th / h), tw)
    return max(int(h * tw / w), th), tw


def center_crop_offsets(h: int, w: int, th: int, tw: int) -> tuple[int, int]:
    """(top, left) of torchvision's CenterCrop: ``int(round((h − th) / 2.0))`` (round half to even)."""
    return int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))


def resize_cover_crop(frames_uint8: Tensor | np.ndarray, H: int, W: int) -> Tensor:
    """uint8 frames (F, H0, W0, 3) -> float32 (F, 3, H, W) in [-1, 1], as the original's collate.

    /255, bilinear resize to cover (antialias on, align_corners off: torchvision's tensor Resize
    defaults), center crop, then ``(x − 0.5) / 0.5``.
    """
    x = torch.as_tensor(frames_uint8)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(
            f"resize_cover_crop: expected uint8 frames (F, H, W, 3), got {x.dtype} {tuple(x.shape)}"
        )
    x = x.permute(0, 3, 1, 2).float() / 255.0  # (F, 3, H0, W0)
    h0, w0 = x.shape[-2:]
    rh, rw = cover_resize_hw(h0, w0, H, W)
    if (rh, rw) != (h0, w0):  # torchvision returns the input unchanged at equal size
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)
    top, left = center_crop_offsets(rh, rw, H, W)
    x = x[:, :, top : top + H, left : left + W]  # (F, 3, H, W)
    return ((x - 0.5) / 0.5).contiguous()


def latent_shape(frames: int, h: int, w: int) -> tuple[int, int, int]:
    """(F_lat, h/8, w/8) of a 4k+1-frame clip (`SampleGeometry`'s rule; ValueError otherwise)."""
    return SampleGeometry(frames, h, w).latent_shape
