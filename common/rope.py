"""Rotary position tables (RoPE) for the rotary CogVideoX-Fun models, on the original's grids.

The original (CogVideoX-Fun `scripts/train.py` `_prepare_rotary_positional_embeddings`, and the
pipelines' copy of it) places the positions itself; tests/golden/README.md sections 10 and 11 describe
it and `tests/golden/loss_case_5b_*` / `loss_case_v15_*` hold its tables:

- **"linspace" grid (Fun 2b/5b, `patch_size_t` null).** The (rows, cols) patch grid is fitted inside
  the 30x45 base grid (480x720 pixels) with its aspect kept and centred (`rope_crop`). Row i sits at
  `top + i*(bottom - top)/rows`, column j likewise, frame k at k: numpy float32
  `linspace(start, stop, n, endpoint=False)`, computed in float64 and rounded once to float32.
  diffusers >= 0.32's `get_3d_rotary_pos_embed` instead spaces positions over
  `linspace(start, stop*(n-1)/n, n)`, which is the same only when the crop starts at 0.
- **"slice" grid (V1.5, `patch_size_t` set).** Positions 0..n-1 on every axis, no crop, and
  ceil(F_lat / patch_size_t) temporal positions. `sample_height/patch_size` x
  `sample_width/patch_size` only bounds the grid.

Per axis the angles are diffusers' `get_1d_rotary_pos_embed(dim, pos, use_real=True)` (theta 10000,
each frequency repeated twice, interleaved), with t:h:w = head_dim/4 : 3*head_dim/8 : 3*head_dim/8,
concatenated [t | h | w], tokens frame-major, then row, then column.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from cogfun.common.geometry import VAE_SPATIAL
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from torch import Tensor

# The original fits the grid against a fixed 480x720-pixel base (8x VAE, then patches), not against
# the config's sample size.
ROPE_BASE_PIXELS = (480, 720)


def cfg_value(config: Mapping[str, Any] | Any, key: str, default: Any = None) -> Any:
    """Read `key` from a config dict, a diffusers FrozenDict or any object with attributes."""
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def rope_crop(grid: tuple[int, int], base_rows: int, base_cols: int) -> tuple[tuple[int, int], ...]:
    """Corners ((top, left), (bottom, right)) of the region of the base grid the grid spans.

    The grid is scaled to fit the base grid with its aspect kept and centred, with Python's `round`
    (half to even), as the original's `get_resize_crop_region_for_grid`.
    """
    rows, cols = grid
    if rows / cols > base_rows / base_cols:
        fit_rows, fit_cols = base_rows, int(round(base_rows / rows * cols))
    else:
        fit_rows, fit_cols = int(round(base_cols / cols * rows)), base_cols
    top = int(round((base_rows - fit_rows) / 2.0))
    left = int(round((base_cols - fit_cols) / 2.0))
    return (top, left), (top + fit_rows, left + fit_cols)


def _linspace(start: float, stop: float, n: int) -> Tensor:
    # numpy's float32 linspace works in float64 and rounds once; torch.linspace in float32 rounds
    # differently, so numpy itself gives the original's exact positions.
    return torch.from_numpy(np.linspace(start, stop, n, endpoint=False, dtype=np.float32))


def rope_grid(
    transformer_config: Mapping[str, Any] | Any, F_lat: int, h: int, w: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The original's (frame, row, column) positions, float32, for F_lat latent frames of h x w.

    Raises ValueError when a "slice" grid is bigger than the model's sample size allows.
    """
    patch = cfg_value(transformer_config, "patch_size", 2)
    patch_t = cfg_value(transformer_config, "patch_size_t")
    rows, cols = h // patch, w // patch
    if patch_t is None:
        base_rows, base_cols = (side // (VAE_SPATIAL * patch) for side in ROPE_BASE_PIXELS)
        (top, left), (bottom, right) = rope_crop((rows, cols), base_rows, base_cols)
        return (
            _linspace(0, F_lat, F_lat),
            _linspace(top, bottom, rows),
            _linspace(left, right, cols),
        )
    max_rows = cfg_value(transformer_config, "sample_height") // patch
    max_cols = cfg_value(transformer_config, "sample_width") // patch
    if rows > max_rows or cols > max_cols:
        side = VAE_SPATIAL * patch
        raise ValueError(
            f"a {h}x{w} latent ({rows}x{cols} patches) is larger than this model's rotary grid of "
            f"{max_rows}x{max_cols} patches (sample_height x sample_width / patch_size in the "
            f"transformer's config.json): use videos of at most {max_rows * side}x"
            f"{max_cols * side} pixels"
        )
    frames = -(-F_lat // patch_t)  # ceil: a padded image still takes one temporal position
    return (
        torch.arange(frames, dtype=torch.float32),
        torch.arange(rows, dtype=torch.float32),
        torch.arange(cols, dtype=torch.float32),
    )


@functools.lru_cache(maxsize=64)
def _tables(
    head_dim: int, t: tuple[float, ...], r: tuple[float, ...], c: tuple[float, ...]
) -> tuple[Tensor, Tensor]:
    dims = (head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3)
    axes = []
    for dim, pos in zip(dims, (t, r, c), strict=True):
        cos, sin = get_1d_rotary_pos_embed(
            dim, torch.tensor(pos, dtype=torch.float32), use_real=True
        )
        axes.append((cos, sin))  # each (n_axis, dim)
    shape = (len(t), len(r), len(c))

    def joined(part: int) -> Tensor:
        ft, fh, fw = (axis[part] for axis in axes)
        grid = torch.cat(
            [
                ft[:, None, None].expand(-1, shape[1], shape[2], -1),
                fh[None, :, None].expand(shape[0], -1, shape[2], -1),
                fw[None, None, :].expand(shape[0], shape[1], -1, -1),
            ],
            dim=-1,
        )  # (T, rows, cols, head_dim)
        return grid.reshape(-1, grid.shape[-1])

    return joined(0), joined(1)


def rotary_embedding(
    transformer_config: Mapping[str, Any] | Any,
    F_lat: int,
    h: int,
    w: int,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor] | None:
    """RoPE (cos, sin), each (T*(h/p)*(w/p), head_dim), for rotary configs; None otherwise.

    `F_lat`, `h`, `w` are latent sizes; T is F_lat, or ceil(F_lat/patch_size_t) for V1.5 models.
    Tables are built on the CPU in float32 (as the original) and cached, then moved to `device`;
    treat them as read-only.
    """
    if not cfg_value(transformer_config, "use_rotary_positional_embeddings", False):
        return None
    t, r, c = rope_grid(transformer_config, F_lat, h, w)
    head_dim = cfg_value(transformer_config, "attention_head_dim")
    cos, sin = _tables(head_dim, tuple(t.tolist()), tuple(r.tolist()), tuple(c.tolist()))
    if device is None:
        return cos, sin
    return cos.to(device), sin.to(device)
