"""Defaults read at run time, so that no default changes the model or the batch silently.

- `--mode` is what the model is (`cogfun.common.modes`): its transformer's input channels. A
  text-to-video model widened to inpaint by an explicit `--mode inpaint` is announced as a warning.
- Batch tiling follows the store: on when it was encoded with token-length buckets, where the
  original always tiles small batches x2/x4 (its train.py, `training_with_video_token_length`), with
  the limits scaled by the store's frame count and token size as the original's are.

The resolved values replace the None defaults in the run's config, so checkpoints record them and a
resume compares them.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from cogfun.common.buckets import auto_tile_factor
from cogfun.common.modes import MODES, mode_facts, model_mode
from cogfun.train.config import TrainConfig
from cogfun.train.preflight import TrainRefused

log = logging.getLogger(__name__)


def resolve_mode(cfg: TrainConfig, tconfig: dict[str, Any], model_dir: Path) -> TrainConfig:
    """`--mode` as given, else what the model is; widening a text-to-video model is announced."""
    have, latent = tconfig.get("in_channels"), tconfig.get("out_channels", 16)
    if cfg.mode is None:
        mode = model_mode(tconfig)
        if mode is None:
            from cogfun.common.model_kind import unsupported_reason

            reason = unsupported_reason(tconfig, latent) or f"in_channels {have}"
            raise TrainRefused(f"model folder {model_dir}: {reason}")
        log.info("--mode %s: the model's transformer takes %s input channels", mode, have)
        return dataclasses.replace(cfg, mode=mode)
    if mode_facts(cfg.mode).needs_masks and have == latent:
        widened = MODES["inpaint"].input_channels(latent)
        log.warning(
            "--mode inpaint widens the transformer of %s from %d to %d input channels (the mask "
            "and masked-video channels start at zero): its checkpoints are %d-channel inpaint "
            "models. Leave --mode out to train the %d-channel text-to-video model it is.",
            model_dir,
            have,
            widened,
            widened,
            have,
        )
    return cfg


def tile_factors(cfg: TrainConfig, store: Any) -> tuple[TrainConfig, dict[str, int]]:
    """Batch tiling: as given, else on when the store was encoded with token-length buckets (the
    original tiles then); x4/x2/x1 per bucket with the store's frame count and token size."""
    settings = store.settings
    tile = cfg.auto_tile_batch_size
    if tile is None:
        tile = bool(settings.get("training_with_video_token_length", False))
        cfg = dataclasses.replace(cfg, auto_tile_batch_size=tile)
    n = int(settings.get("video_sample_n_frames", 49))
    token = int(settings.get("token_sample_size", 512))
    return cfg, {
        name: auto_tile_factor(b.frames, b.height, b.width, n, token) if tile else 1
        for name, b in store.buckets.items()
    }
