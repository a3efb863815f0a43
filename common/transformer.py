"""The CogVideoX-Fun transformer on top of diffusers' `CogVideoXTransformer3DModel`.

Diffusers' class has the same layers and parameter names as the Fun transformer; two behaviours differ
and are installed here (REFERENCE.md §8.6, §9.1):

- **2b positional table.** For non-rotary configs the Fun forward takes the sin-cos table built once for
  the base grid (13 latent frames x 30 x 45 patches), resizes it trilinearly (`align_corners=False`,
  float32) to (13, h/2, w/2) and keeps the first `F_lat` frames. Diffusers instead regenerates a sin-cos
  table for the new grid, which differs by up to ~2 off the base grid. `load_transformer` swaps the
  patch embedding's class for `FunPatchEmbed`, whose only change is that table. Parameters and state dict
  are untouched, so `save_pretrained` still writes a plain diffusers folder.
- **Input channels.** A checkpoint with fewer patch-embed input channels than asked (a 16-channel T2V
  model starting a 33-channel inpaint run) keeps its weights on the overlapping channels and starts the
  extra ones at zero.

5b-style (rotary) configs use RoPE over a crop of the base 30x45 patch grid (`rotary_embedding`).

    transformer = load_transformer("models/CogVideoX-Fun-2b-InP", dtype=torch.float32)
    pred = transformer_forward(transformer, noisy_latents, prompt_embeds, timesteps, inpaint_latents)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import (
    CogVideoXPatchEmbed,
    get_3d_rotary_pos_embed,
    get_3d_sincos_pos_embed,
)
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# The original builds RoPE positions against a fixed 480x720-pixel base (8x VAE, then patches), not
# against the config's sample size.
_ROPE_BASE_PIXELS = (480, 720)
_VAE_SPATIAL = 8


def _cfg(config: Mapping[str, Any] | Any, key: str, default: Any = None) -> Any:
    """Read `key` from a config dict, a diffusers FrozenDict or any object with attributes."""
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _base_grid(config: Mapping[str, Any] | Any) -> tuple[int, int, int]:
    """(frames, rows, cols) of the base positional grid, in latent frames and patches."""
    patch = _cfg(config, "patch_size", 2)
    frames = (_cfg(config, "sample_frames", 49) - 1) // _cfg(
        config, "temporal_compression_ratio", 4
    )
    return (
        frames + 1,
        _cfg(config, "sample_height", 60) // patch,
        _cfg(config, "sample_width", 90) // patch,
    )


def _resize_table(base: Tensor, f_lat: int, rows: int, cols: int) -> Tensor:
    """Fun's resize of the base table (T, Hb, Wb, D) to (f_lat, rows, cols, D), in float32.

    All T base frames take part in the trilinear resize (so the temporal axis is the identity) and the
    first `f_lat` frames are kept afterwards, as the original slices the token sequence.
    """
    frames = base.shape[0]
    if f_lat > frames:
        raise ValueError(
            f"{f_lat} latent frames exceed the {frames} latent frames of the 2b positional table "
            f"(at most {(frames - 1) * 4 + 1} frames): use fewer frames for this model"
        )
    table = base.float().permute(3, 0, 1, 2).unsqueeze(0)  # (1, D, T, Hb, Wb)
    table = F.interpolate(table, size=(frames, rows, cols), mode="trilinear", align_corners=False)
    return table[0].permute(1, 2, 3, 0)[:f_lat]  # (f_lat, rows, cols, D)


def fun_pos_embedding(
    transformer_config: Mapping[str, Any] | Any, F_lat: int, h: int, w: int
) -> Tensor:
    """The positional table the Fun 2b forward adds to the video tokens, (F_lat*(h/2)*(w/2), D).

    `h`, `w` are latent sizes. Only the config's widths and base-grid fields are read, so a plain dict
    with the real 2b values works without building a model.
    """
    dim = _cfg(transformer_config, "num_attention_heads") * _cfg(
        transformer_config, "attention_head_dim"
    )
    frames, rows, cols = _base_grid(transformer_config)
    base = get_3d_sincos_pos_embed(
        dim,
        (cols, rows),
        frames,
        _cfg(transformer_config, "spatial_interpolation_scale", 1.875),
        _cfg(transformer_config, "temporal_interpolation_scale", 1.0),
        output_type="pt",
    )  # (T, Hb*Wb, D), float64 as the original's numpy table before its float32 cast
    base = base.float().reshape(frames, rows, cols, dim)
    patch = _cfg(transformer_config, "patch_size", 2)
    return _resize_table(base, F_lat, h // patch, w // patch).reshape(-1, dim)


class FunPatchEmbed(CogVideoXPatchEmbed):
    """`CogVideoXPatchEmbed` whose off-base-grid table is Fun's resized one, not a regenerated one.

    Diffusers' forward adds `self.pos_embedding` (the base table) on the base grid and otherwise asks
    `_get_positional_embeddings(height, width, frames)` for a new table; only that method changes.
    On the base grid the resize is the identity, so both paths agree there.
    """

    def _get_positional_embeddings(
        self,
        sample_height: int,
        sample_width: int,
        sample_frames: int,
        device: torch.device | None = None,
    ) -> Tensor:
        text_len = self.max_text_seq_length
        frames = (self.sample_frames - 1) // self.temporal_compression_ratio + 1
        rows, cols = self.sample_height // self.patch_size, self.sample_width // self.patch_size
        base = self.pos_embedding[0, text_len:].reshape(frames, rows, cols, self.embed_dim)
        f_lat = (sample_frames - 1) // self.temporal_compression_ratio + 1
        video = _resize_table(
            base, f_lat, sample_height // self.patch_size, sample_width // self.patch_size
        ).reshape(-1, self.embed_dim)  # (f_lat*rows'*cols', D)
        joint = video.new_zeros(1, text_len + video.shape[0], self.embed_dim)  # text slots stay 0
        joint[0, text_len:] = video
        return joint if device is None else joint.to(device)


def install_fun_positions(transformer: CogVideoXTransformer3DModel) -> None:
    """Give a non-rotary transformer the Fun 2b positional behaviour (in place; idempotent)."""
    embed = transformer.patch_embed
    if not getattr(embed, "use_positional_embeddings", False):
        return
    if embed.use_learned_positional_embeddings:
        raise ValueError("learned positional embeddings are not a CogVideoX-Fun configuration")
    # A class swap keeps every parameter, buffer and hook of the existing module in place.
    embed.__class__ = FunPatchEmbed


def _transformer_dir(path: str | Path) -> Path:
    """A transformer folder itself, or `transformer/` inside a model folder."""
    folder = Path(path)
    if (folder / "config.json").is_file():
        return folder
    if (folder / "transformer" / "config.json").is_file():
        return folder / "transformer"
    raise FileNotFoundError(
        f"{folder}: no transformer found (expected config.json plus weights in the folder itself "
        f"or in {folder / 'transformer'})"
    )


def _resize_in_channels(transformer: CogVideoXTransformer3DModel, in_channels: int) -> None:
    """Resize patch-embed input channels as `from_pretrained_2d` does (REFERENCE §9.1).

    Extra channels start at zero so the model's output is unchanged at step 0; fewer channels keep
    the first ones.
    """
    proj = transformer.patch_embed.proj
    if not isinstance(proj, nn.Conv2d):
        raise ValueError(
            "changing in_channels is only supported for CogVideoX 1.0 (Conv2d patch embed)"
        )
    old = proj.weight  # (D, C_old, p, p)
    new = nn.Conv2d(
        in_channels,
        proj.out_channels,
        kernel_size=proj.kernel_size,
        stride=proj.stride,
        bias=proj.bias is not None,
        device=old.device,
        dtype=old.dtype,
    )
    keep = min(in_channels, old.shape[1])
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :keep] = old[:, :keep]
        if proj.bias is not None:
            new.bias.copy_(proj.bias)
    transformer.patch_embed.proj = new
    transformer.register_to_config(in_channels=in_channels)


class _DropFunKeyWarning(logging.Filter):
    """diffusers warns on every load that it ignores the Fun-only config keys; they are expected
    (kept in the config, and `add_noise_in_inpaint_model` is read below), so drop just that line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "add_noise_in_inpaint_model" not in record.getMessage()


@contextlib.contextmanager
def _quiet_fun_config_keys():
    config_logger = logging.getLogger("diffusers.configuration_utils")
    drop = _DropFunKeyWarning()
    config_logger.addFilter(drop)
    try:
        yield
    finally:
        config_logger.removeFilter(drop)


def load_transformer(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    in_channels: int | None = None,
) -> CogVideoXTransformer3DModel:
    """Load a (Fun) CogVideoX transformer from local files, ready to train.

    `path` is a transformer folder or a model folder with `transformer/`. Fun-only config keys are
    kept in the config (so `save_pretrained` writes them back); `add_noise_in_inpaint_model` is also
    exposed as an attribute of the returned model, since it changes what precompute must store.
    """
    folder = _transformer_dir(path)
    with _quiet_fun_config_keys():
        transformer = CogVideoXTransformer3DModel.from_pretrained(
            folder, torch_dtype=dtype, local_files_only=True
        )
    transformer.add_noise_in_inpaint_model = bool(
        transformer.config.get("add_noise_in_inpaint_model", False)
    )
    if transformer.config.get("patch_size_t") is not None:
        raise ValueError(
            f"{folder}: patch_size_t is set (CogVideoX 1.5); cogfun trains CogVideoX-Fun 2b/5b only"
        )
    current = transformer.patch_embed.proj.weight.shape[1]
    if in_channels is not None and in_channels != current:
        logger.info("%s: patch embed input channels %d -> %d", folder, current, in_channels)
        _resize_in_channels(transformer, in_channels)
    install_fun_positions(transformer)
    return transformer


def _rope_crop(
    grid: tuple[int, int], base_rows: int, base_cols: int
) -> tuple[tuple[int, int], ...]:
    """Corners of the region, inside the base grid, that the (rows, cols) grid is stretched over.

    The grid is scaled to fit the base grid with its aspect kept and centred, so its positions are
    the same fractions of the base range whatever the resolution (diffusers calls this
    `get_resize_crop_region_for_grid`).
    """
    rows, cols = grid
    if rows / cols > base_rows / base_cols:
        fit_rows, fit_cols = base_rows, int(round(base_rows / rows * cols))
    else:
        fit_rows, fit_cols = int(round(base_cols / cols * rows)), base_cols
    top = int(round((base_rows - fit_rows) / 2.0))
    left = int(round((base_cols - fit_cols) / 2.0))
    return (top, left), (top + fit_rows, left + fit_cols)


def rotary_embedding(
    transformer_config: Mapping[str, Any] | Any,
    F_lat: int,
    h: int,
    w: int,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor] | None:
    """RoPE (cos, sin), each (F_lat*(h/2)*(w/2), head_dim), for rotary configs; None otherwise.

    Temporal positions are 0..F_lat-1; spatial positions span the crop of the base 30x45 patch grid
    from `_rope_crop` (REFERENCE §8.6).
    """
    if not _cfg(transformer_config, "use_rotary_positional_embeddings", False):
        return None
    patch = _cfg(transformer_config, "patch_size", 2)
    rows, cols = h // patch, w // patch
    base_rows, base_cols = (side // (_VAE_SPATIAL * patch) for side in _ROPE_BASE_PIXELS)
    cos, sin = get_3d_rotary_pos_embed(
        embed_dim=_cfg(transformer_config, "attention_head_dim"),
        crops_coords=_rope_crop((rows, cols), base_rows, base_cols),
        grid_size=(rows, cols),
        temporal_size=F_lat,
        use_real=True,
        device=device,
    )
    return cos, sin


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DeepSpeed / torch.compile wrappers (for its config and dtype)."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def transformer_forward(
    transformer: nn.Module,
    noisy_latents: Tensor,
    prompt_embeds: Tensor,
    timesteps: Tensor,
    inpaint_latents: Tensor | None = None,
) -> Tensor:
    """One Fun forward: (B, F, 16, h, w) noisy latents (+ (B, F, 17, h, w) inpaint) -> (B, F, 16, h, w).

    `transformer` may be wrapped (DDP, DeepSpeed); the wrapper is what gets called. Inputs are cast
    to the model's parameter dtype; under autocast the fp32 model receives fp32 inputs.
    """
    core = _unwrap(transformer)
    hidden = noisy_latents
    if inpaint_latents is not None:
        hidden = torch.cat([noisy_latents, inpaint_latents.to(noisy_latents.dtype)], dim=2)
    _, frames, channels, height, width = hidden.shape  # (B, F, C, h, w)
    expected = core.config.in_channels
    if channels != expected:
        raise ValueError(
            f"the transformer takes {expected} input channels but got {channels} "
            f"({noisy_latents.shape[2]} noisy + "
            f"{0 if inpaint_latents is None else inpaint_latents.shape[2]} inpaint): "
            "inpaint models (33) need inpaint_latents, normal models (16) must not get them"
        )
    rope = rotary_embedding(core.config, frames, height, width, device=hidden.device)
    return transformer(
        hidden_states=hidden.to(core.dtype),
        encoder_hidden_states=prompt_embeds.to(core.dtype),
        timestep=timesteps,
        image_rotary_emb=rope,
        return_dict=False,
    )[0]
