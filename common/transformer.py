"""The CogVideoX-Fun transformer on top of diffusers' `CogVideoXTransformer3DModel`.

Diffusers' class has the same layers and parameter names as the Fun transformer, including the
CogVideoX 1.5 (`patch_size_t`) Linear patch embed with its (c, t, y, x) input order. What differs is
installed here (tests/golden/README.md sections 4, 8, 10 and 11):

- **2b positional table.** For non-rotary configs the Fun forward takes the sin-cos table built once for
  the base grid (13 latent frames x 30 x 45 patches), resizes it trilinearly (`align_corners=False`,
  float32) to (13, h/2, w/2) and keeps the first `F_lat` frames. Diffusers instead regenerates a sin-cos
  table for the new grid, which differs by up to ~2 off the base grid. `load_transformer` swaps the
  patch embedding's class for `FunPatchEmbed`, whose only change is that table. Parameters and state dict
  are untouched, so `save_pretrained` still writes a plain diffusers folder.
- **Input channels.** A checkpoint with fewer patch-embed input channels than asked (a 16-channel T2V
  model starting a 33-channel inpaint run) keeps its weights on the overlapping channels and starts the
  extra ones at zero.
- **Rotary positions** (5b, V1.5) are the original's grids, not diffusers' (`cogfun.common.rope`).
- **One latent frame on a `patch_size_t` 2 model** (an image on V1.5) gets an all-zero second frame
  before the forward, and only frame 0 of the output is kept, as the original's forward does.

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
from cogfun.common.rope import cfg_value as _cfg
from cogfun.common.rope import rotary_embedding
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import CogVideoXPatchEmbed, get_3d_sincos_pos_embed
from torch import Tensor, nn

__all__ = [
    "FunPatchEmbed",
    "fun_pos_embedding",
    "install_fun_positions",
    "load_transformer",
    "rotary_embedding",
    "transformer_forward",
]

logger = logging.getLogger(__name__)


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
    """Resize patch-embed input channels as the original's `from_pretrained_2d` does.

    Extra channels start at zero so the model's output is unchanged at step 0; fewer channels keep
    the first ones. The V1.5 Linear patch embed reads each token's inputs in (c, t, y, x) order with
    c slowest, so its weight is resized per channel the same way.
    """
    embed = transformer.patch_embed
    proj = embed.proj
    old = proj.weight  # Conv2d: (D, C_old, p, p); Linear: (D, C_old * p_t * p * p)
    if isinstance(proj, nn.Conv2d):
        new = nn.Conv2d(
            in_channels,
            proj.out_channels,
            kernel_size=proj.kernel_size,
            stride=proj.stride,
            bias=proj.bias is not None,
            device=old.device,
            dtype=old.dtype,
        )
        per_channel = old[:, :, None]  # (D, C_old, 1, p, p)
    elif isinstance(proj, nn.Linear):
        per_token = embed.patch_size_t * embed.patch_size**2
        new = nn.Linear(
            in_channels * per_token,
            proj.out_features,
            bias=proj.bias is not None,
            device=old.device,
            dtype=old.dtype,
        )
        per_channel = old.reshape(old.shape[0], -1, per_token)  # (D, C_old, p_t * p * p)
    else:
        raise ValueError(f"cannot change in_channels of a {type(proj).__name__} patch embed")
    keep = min(in_channels, per_channel.shape[1])
    with torch.no_grad():
        weight = per_channel.new_zeros(per_channel.shape[0], in_channels, *per_channel.shape[2:])
        weight[:, :keep] = per_channel[:, :keep]
        new.weight.copy_(weight.reshape(new.weight.shape))
        if proj.bias is not None:
            new.bias.copy_(proj.bias)
    embed.proj = new
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
    patch_t = transformer.config.get("patch_size_t")
    if patch_t is not None and not transformer.config.get("use_rotary_positional_embeddings"):
        raise ValueError(
            f"{folder}: patch_size_t {patch_t} (CogVideoX 1.5 layout) without "
            "use_rotary_positional_embeddings is not a CogVideoX(-Fun) configuration"
        )
    current = transformer.patch_embed.proj.weight.shape[1]
    if in_channels is not None and in_channels != current:
        logger.info("%s: patch embed input channels %d -> %d", folder, current, in_channels)
        _resize_in_channels(transformer, in_channels)
    install_fun_positions(transformer)
    return transformer


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
    On a `patch_size_t` model, one latent frame is padded with zero frames (noisy and inpaint alike)
    and only frame 0 comes back; other frame counts must be multiples of `patch_size_t`.
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
    patch_t = core.config.patch_size_t
    padded = patch_t is not None and frames % patch_t != 0
    if padded:
        if frames != 1:
            raise ValueError(
                f"{frames} latent frames cannot be patched by this model (patch_size_t "
                f"{patch_t}): only a single frame (an image) is padded; videos need a multiple "
                f"of {patch_t} latent frames, as the original's training clips them"
            )
        # Padding the concatenated input pads noisy and inpaint latents alike, with zeros.
        pad = hidden.new_zeros(hidden.shape[0], patch_t - 1, *hidden.shape[2:])
        hidden = torch.cat([hidden, pad], dim=1)
    rope = rotary_embedding(core.config, frames, height, width, device=hidden.device)
    out = transformer(
        hidden_states=hidden.to(core.dtype),
        encoder_hidden_states=prompt_embeds.to(core.dtype),
        timestep=timesteps,
        image_rotary_emb=rope,
        return_dict=False,
    )[0]
    return out[:, :frames] if padded else out
