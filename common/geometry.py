"""A sample's geometry: its pixel clip (F, H, W) and the latent grid (F_lat, h, w) the VAE makes of it.

The CogVideoX VAE compresses time by 4 (the first frame alone, then 4 frames per latent frame, so
clips have 4k+1 frames) and space by 8: ``F_lat = (F - 1) // 4 + 1``, ``h = H // 8``, ``w = W // 8``.
This module is that rule's one home: the bucket math (`common.buckets`), the inpaint masks
(`common.masks`), the plan (`precompute.plan`) and the store's plan check
(`common.store.schema.latent_shape_of`) all ask it, so they cannot disagree.

    g = SampleGeometry(49, 480, 720)  # -> latent (13, 60, 90), bucket "f13_h60_w90"

A plan holds one `SampleGeometry` per distinct (F, H, W) (`SampleGeometry.of`), shared by every
sample of that size, so carrying it costs a pointer per sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

VAE_TEMPORAL = 4  # pixel frames per latent frame after the first: clips have 4k+1 frames
VAE_SPATIAL = 8  # pixels per latent cell along each side


def latent_frames(frames: int) -> int:
    """Latent frames of a clip of ``frames`` (4k+1) pixel frames: ``(F - 1) // 4 + 1``."""
    return (frames - 1) // VAE_TEMPORAL + 1


def pixel_frames(latent_frames: int) -> int:
    """Pixel frames a clip of ``latent_frames`` latent frames decodes to: ``(F_lat - 1) * 4 + 1``."""
    return (latent_frames - 1) * VAE_TEMPORAL + 1


def latent_shape_of(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(F_lat, h, w) of a pixel clip: ``F_lat = (F - 1) // 4 + 1``, ``h = H // 8``, ``w = W // 8``.

    No check: the store compares recorded shapes with this (a mismatch is its own error)."""
    return latent_frames(frames), height // VAE_SPATIAL, width // VAE_SPATIAL


def frames_4k1(n: int) -> int:
    """Largest 4k+1 not above ``n`` (at least 1): the frame count a clip of ``n`` frames keeps."""
    return max((int(n) - 1) // VAE_TEMPORAL * VAE_TEMPORAL + 1, 1)


def is_4k1(frames: int) -> bool:
    """Whether ``frames`` is a frame count the VAE encodes whole (1, 5, 9, ...)."""
    return frames >= 1 and (frames - 1) % VAE_TEMPORAL == 0


@dataclass(frozen=True, slots=True)
class SampleGeometry:
    """Pixel size (F, H, W) and latent size (F_lat, h, w) of one sample, made once from pixels.

    ``SampleGeometry(F, H, W)`` is the only constructor: the latent fields are computed by
    `latent_shape_of`, and F must be 4k+1 (ValueError otherwise). H and W need not be multiples
    of 8 (a non-bucketed size such as 100 px floors to 12 latent cells, as the VAE does);
    ``on_latent_grid`` says whether they are.
    """

    frames: int
    height: int
    width: int
    latent_frames: int = field(init=False)
    latent_h: int = field(init=False)
    latent_w: int = field(init=False)

    def __post_init__(self) -> None:
        if not is_4k1(self.frames):
            raise ValueError(
                f"{self.frames} frames is not 4k+1: the VAE encodes 1, 5, 9, ... frames"
            )
        f_lat, h, w = latent_shape_of(self.frames, self.height, self.width)
        object.__setattr__(self, "latent_frames", f_lat)
        object.__setattr__(self, "latent_h", h)
        object.__setattr__(self, "latent_w", w)

    @staticmethod
    @lru_cache(maxsize=4096)
    def of(frames: int, height: int, width: int) -> SampleGeometry:
        """The shared instance for (F, H, W): a plan of a million samples holds a few dozen."""
        return SampleGeometry(frames, height, width)

    @property
    def pixels(self) -> tuple[int, int, int]:
        """(F, H, W)."""
        return self.frames, self.height, self.width

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(F_lat, h, w)."""
        return self.latent_frames, self.latent_h, self.latent_w

    @property
    def bucket(self) -> str:
        """The store's bucket name of this size, ``f{F_lat}_h{h}_w{w}``."""
        return f"f{self.latent_frames}_h{self.latent_h}_w{self.latent_w}"

    @property
    def on_latent_grid(self) -> bool:
        """Whether H and W are multiples of 8, so each latent cell covers whole pixels."""
        return self.height % VAE_SPATIAL == 0 and self.width % VAE_SPATIAL == 0
