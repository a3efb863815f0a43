"""Several stores in one run: `cogfun train --latents A.zarr B.zarr:3`.

Each store is checked against the model as a single store is (`preflight.check_store`); on top,
the stores must agree on everything a training step takes from the run rather than from the batch:
the latent channels and format, the mask variants per sample, the caption embeddings' length and
width, the VAE scaling factor, the VAE and text encoder they were encoded with (when recorded), and
the empty caption's embedding (caption dropout swaps every caption for the first store's). A batch
never mixes stores (`cogfun.train.data`), so the buckets and frame counts may differ.

A weight `:N` (a whole number >= 1, default 1) puts each sample of the store N times in every epoch,
each copy shuffled on its own: what the original's `video_repeat` does to the video rows of its
dataset (CogVideoX-Fun, `ImageVideoDataset`), applied here to a whole store.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import torch
from cogfun.train.config import TrainConfig
from cogfun.train.preflight import TrainRefused
from cogfun.train.resolve import tile_factors

_WEIGHTED = re.compile(r"(?P<path>.+):(?P<weight>[^:/\\]+)")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclasses.dataclass(frozen=True)
class StoreSpec:
    """One `--latents` entry: the store and how many times each sample is seen per epoch."""

    path: Path
    weight: int = 1


def parse_latents(latents: list[Path]) -> list[StoreSpec]:
    """`[A.zarr, B.zarr:3]` -> specs; a bad weight or a store named twice is refused."""
    if not latents:
        raise TrainRefused("--latents: give at least one store")
    specs = []
    for item in latents:
        text, weight = str(item), 1
        match = _WEIGHTED.fullmatch(text)
        if match and _NUMBER.fullmatch(match["weight"]):
            if not match["weight"].isdigit() or int(match["weight"]) < 1:
                raise TrainRefused(
                    f"--latents {text}: the weight after ':' is how many times each sample of the "
                    f"store is seen per epoch, a whole number >= 1 (got {match['weight']!r})"
                )
            text, weight = match["path"], int(match["weight"])
        specs.append(StoreSpec(Path(text), weight))
    seen: dict[Path, Path] = {}
    for spec in specs:
        key = spec.path.resolve()
        if key in seen:
            raise TrainRefused(
                f"--latents names the store {spec.path} twice (as {seen[key]} too): give it once, "
                "with a weight (`:N`) to see its samples more often"
            )
        seen[key] = spec.path
    return specs


def check_stores_agree(stores: list[Any]) -> None:
    """Refuse stores whose batches could not go through the same run, naming both and each
    difference."""
    for i, first in enumerate(stores):
        for other in stores[i + 1 :]:  # every pair: an identity only some stores record
            diffs = _differences(first, other)
            if diffs:
                raise TrainRefused(
                    f"--latents: the stores {first.path} and {other.path} cannot train together: "
                    + "; ".join(diffs)
                )


def _differences(a: Any, b: Any) -> list[str]:
    diffs = [
        f"{name.replace('_', ' ')} {getattr(a.layout, name)!r} vs {getattr(b.layout, name)!r}"
        for name in ("latent_channels", "latent_format", "masks_per_sample", "text_len", "text_dim")
        if getattr(a.layout, name) != getattr(b.layout, name)
    ]
    if not math.isclose(a.scaling_factor, b.scaling_factor):
        diffs.append(f"VAE scaling factor {a.scaling_factor} vs {b.scaling_factor}")
    for part in ("vae", "text_encoder"):
        ours, theirs = (_sha(s.settings.get(part)) for s in (a, b))
        if ours and theirs and ours != theirs:
            diffs.append(f"{part} sha256 {ours[:12]}... vs {theirs[:12]}...")
    if not diffs and not torch.equal(a.caption_embedding(0), b.caption_embedding(0)):
        diffs.append("the empty caption's embedding differs (another text encoder or tokenizer?)")
    return diffs


def _sha(recorded: Any) -> str | None:
    return recorded.get("sha256") if isinstance(recorded, dict) else None


def run_tile_factors(cfg: TrainConfig, stores: list[Any]) -> tuple[TrainConfig, dict[str, int]]:
    """`resolve.tile_factors` over every store: one default for the run, one factor per bucket."""
    resolved = [tile_factors(cfg, store) for store in stores]
    modes = {c.auto_tile_batch_size for c, _ in resolved}
    if len(modes) > 1:
        on = [
            str(s.path)
            for s, (c, _) in zip(stores, resolved, strict=True)
            if c.auto_tile_batch_size
        ]
        raise TrainRefused(
            f"--latents: batch tiling defaults to on for {', '.join(on)} (encoded with token-length "
            "buckets) and off for the other store(s): give --auto-tile-batch-size or "
            "--no-auto-tile-batch-size"
        )
    tiles: dict[str, int] = {}
    owner: dict[str, Path] = {}
    for store, (_, factors) in zip(stores, resolved, strict=True):
        for name, k in factors.items():
            if tiles.setdefault(name, k) != k:
                raise TrainRefused(
                    f"--latents: bucket {name} is tiled x{tiles[name]} in {owner[name]} but x{k} in "
                    f"{store.path} (other --video-sample-n-frames / --token-sample-size): train "
                    "them with --no-auto-tile-batch-size"
                )
            owner.setdefault(name, store.path)
    return resolved[0][0], tiles
