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

A checkpoint records the stores and weights it was trained on (`mix_record`); resuming over several
stores needs the same ones in the same order (`check_mix`).

A store may be an object-store URL (`s3://bucket/prefix/latents.zarr:3`); it stays a string
(`cogfun.config.store_paths`). `--cache-dir` keeps what is read of such stores on local disk
(`store_cache`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
from cogfun.config.store_paths import check_store_url, is_store_url, store_path
from cogfun.train.checkpoint import CheckpointError
from cogfun.train.config import TrainConfig
from cogfun.train.preflight import TrainRefused
from cogfun.train.resolve import tile_factors

log = logging.getLogger(__name__)
_WEIGHTED = re.compile(r"(?P<path>.+):(?P<weight>[^:/\\]+)")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclasses.dataclass(frozen=True)
class StoreSpec:
    """One `--latents` entry: the store (a Path, or an object-store URL) and how many times each
    sample is seen per epoch."""

    path: Path | str
    weight: int = 1


def parse_latents(latents: list[Path | str]) -> list[StoreSpec]:
    """`[A.zarr, B.zarr:3, s3://b/C.zarr:2]` -> specs; a bad weight, a URL no store can be at, or
    a store named twice is refused."""
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
        try:
            check_store_url(text, "--latents")
        except ValueError as err:
            raise TrainRefused(str(err)) from err
        specs.append(StoreSpec(store_path(text), weight))
    seen: dict[Path | str, Path | str] = {}
    for spec in specs:
        key = spec.path if is_store_url(spec.path) else Path(spec.path).resolve()
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


def store_cache(cfg: TrainConfig, specs: list[StoreSpec]) -> dict[str, Any]:
    """`open_store`'s cache arguments for the run's stores: none without --cache-dir; a note
    when no store is on an object store (local stores are read in place)."""
    if cfg.cache_max_gb is not None and cfg.cache_max_gb <= 0:
        raise TrainRefused(f"--cache-max-gb must be > 0 (got {cfg.cache_max_gb})")
    if cfg.cache_dir is None:
        if cfg.cache_max_gb is not None:
            log.warning("--cache-max-gb does nothing without --cache-dir")
        return {}
    if not any(is_store_url(spec.path) for spec in specs):
        log.info("--cache-dir %s is not used: every store is local (read in place)", cfg.cache_dir)
        return {}
    limit = None if cfg.cache_max_gb is None else int(cfg.cache_max_gb * 1e9)
    return {"cache_dir": Path(cfg.cache_dir), "cache_max_bytes": limit}


def mix_record(specs: list[Any], stores: list[Any]) -> list[dict[str, Any]]:
    """The stores a checkpoint records (trainer state `stores`): path, weight, fingerprint."""
    return [
        {"path": str(s.path), "weight": spec.weight, "fingerprint": s.fingerprint}
        for spec, s in zip(specs, stores, strict=True)
    ]


def check_mix(saved: list[dict] | None, now: list[dict[str, Any]], checkpoint: Path) -> None:
    """Resuming over several stores: the same number of stores with the same weights, in the same
    order, or the data order would not be the saved one (a store with another fingerprint is
    warned about, as one store is)."""
    saved = saved or []
    if len(saved) <= 1 and len(now) == 1:
        return  # one store: checked as it always was
    if [m.get("weight") for m in saved] != [m["weight"] for m in now]:
        was = " ".join(f"{m.get('path')}:{m.get('weight')}" for m in saved) or "one store"
        raise CheckpointError(
            f"{checkpoint} was trained on --latents {was}; this run gives "
            + " ".join(f"{m['path']}:{m['weight']}" for m in now)
            + ": resume with the same stores and weights in the same order (or "
            "--resume-from-checkpoint none)"
        )
    for old, new in zip(saved, now, strict=True):
        if old.get("fingerprint") != new["fingerprint"]:
            log.warning(
                "%s was trained on a store %s with another fingerprint than %s",
                checkpoint,
                old.get("path"),
                new["path"],
            )
