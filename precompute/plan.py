"""The plan: every stored sample's draws, bucket, slot and VAE chunk, fixed before any encoding.

A cheap header pass (`probe_rows`) reads each file's size and frame count (images with `width`
and `height` in the metadata are not opened, as the original's sampler). `build_plan` is then a
pure function of (metadata rows, probes, options): for each row copy (`video_repeat`) and each of
its variants (`variants_per_sample`, videos only) it seeds a numpy Generator from
(seed, the row copy's content key, variant) — never a global RNG, never the row's position — and
draws, in this order:

1. the clip's frame indices (the original's frame sampling in
   cogvideox/data/dataset_image_video.py, from the header's frame count),
2. the resolution/frame variant (`choose_video_variant` / `choose_image_variant`, the original's
   collate_fn in scripts/train.py),

and, from a second child of the same seed, the K mask seeds (so `--mode normal` and inpaint stores
with one seed pick the same clips and buckets). The frame counts drawn are those the model can
patch: `patch_size_t` comes from the model's transformer/config.json (`common.model_kind`), so a
V1.5 store only holds latent frame counts that are even or 1 (`buckets.patch_frames`).

Each sample goes to bucket `f{F_lat}_h{h}_w{w}` and gets the next slot there; slots of a bucket
are cut into `vae_mini_batch` chunks, the unit of encoding and of resume (the VAE's floating-point
result depends on its batch). Same inputs and seed give the same plan, byte for byte. A content key
(`content_key`: file path, size, mtime, caption, type, repeat) names every sample, so a plan of an
edited dataset is matched to the store it updates by key (`precompute.update.merge`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cogfun.common.buckets import (
    BucketOptions,
    center_crop_offsets,
    choose_image_variant,
    choose_video_variant,
    cover_resize_hw,
    short_side_cap_hw,
)
from cogfun.common.decode import DecodeError, MediaInfo, clip_indices, probe
from cogfun.common.geometry import SampleGeometry
from cogfun.common.modes import mode_facts
from cogfun.common.store import BucketPlan, Location, RowPlan, StorePlan, location
from cogfun.precompute.config import PrecomputeConfig
from cogfun.precompute.metadata import Row
from cogfun.precompute.seeds import many_sample_seeds

log = logging.getLogger("cogfun.precompute")

PROBES_FILE = "probes.json"  # header-pass results kept beside the store for resume and other ranks


@dataclass(frozen=True)
class Failure:
    """An input that will not be stored: `key` names the row copy or sample, `reason` says why."""

    key: str
    file: str
    reason: str
    row: int | None


@dataclass(frozen=True, slots=True)  # a million of them in a large plan: no per-object dict
class SampleSpec:
    """Everything needed to decode and encode one planned sample."""

    key: str  # "<content key>.v0": the row copy's `content_key`, then the variant
    bucket: str
    slot: int
    row: int
    file: str  # file_path as written in the metadata
    path: str  # resolved path
    kind: str  # "video" | "image"
    indices: tuple[int, ...]  # source frames to decode (the clip's leading F)
    clip_frames: int  # frames of the drawn clip: masks are drawn at this length, then cut to F
    geometry: SampleGeometry  # (F, H, W) and its latent grid; one shared object per size
    seed: int  # the variant seed the draws came from
    mask_seeds: tuple[int, ...]
    caption: int


@dataclass(frozen=True, slots=True)
class Chunk:
    """Samples of one bucket, in slot order, that go through the VAE together."""

    index: int
    bucket: str
    samples: tuple[SampleSpec, ...]


@dataclass
class Plan:
    store: StorePlan
    samples: list[SampleSpec]
    chunks: list[Chunk]
    failures: list[Failure] = field(default_factory=list)

    def chunks_for(self, rank: int, world: int) -> list[Chunk]:
        """The chunks one process encodes: chunk i goes to rank i % world."""
        return [c for c in self.chunks if c.index % world == rank]


def bucket_options(cfg: PrecomputeConfig, patch_size_t: int | None = None) -> BucketOptions:
    return BucketOptions(
        image_sample_size=cfg.image_sample_size,
        video_sample_size=cfg.video_sample_size,
        token_sample_size=cfg.token_sample_size,
        video_sample_n_frames=cfg.video_sample_n_frames,
        enable_bucket=cfg.enable_bucket,
        random_hw_adapt=cfg.random_hw_adapt,
        training_with_video_token_length=cfg.training_with_video_token_length,
        random_frame_crop=cfg.random_frame_crop,
        patch_size_t=patch_size_t,
    )


def masks_per_sample(cfg: PrecomputeConfig) -> int:
    """K mask variants stored per sample: 0 in normal mode (nothing masked is stored)."""
    return cfg.masks_per_sample if mode_facts(cfg.mode).needs_masks else 0


def short_side_cap(cfg: PrecomputeConfig) -> int:
    """Decoded video frames keep a short side of at most max(image, video) size, as the
    original's cogvideox/data/dataset_image_video.py resizes them."""
    return max(cfg.image_sample_size, cfg.video_sample_size)


# ---- the header pass ----

Probe = MediaInfo | str  # a header, or why the file cannot be used


def probe_key(row: Row) -> str:
    """Probes are keyed by the metadata's own path and kind, so moving the data root keeps them."""
    return f"{row.type}:{row.file_path}"


def probe_rows(
    rows: list[Row],
    known: dict[str, Probe] | None = None,
    prober: Callable[[Path, str], MediaInfo] | None = None,
) -> dict[str, Probe]:
    """Header of every usable row's file (each file once), reusing `known` results."""
    prober = prober or probe
    out: dict[str, Probe] = dict(known or {})
    for row in rows:
        key = probe_key(row)
        if row.error is not None or key in out:
            continue
        if row.type == "image" and row.width and row.height:
            out[key] = MediaInfo(row.height, row.width, 1)
            continue
        try:
            out[key] = prober(row.path, row.type)
        except DecodeError as e:
            out[key] = e.reason
        except OSError as e:  # permissions, a folder where a file should be, ...
            out[key] = f"cannot read: {e}"
    return out


def probes_to_json(probes: dict[str, Probe]) -> dict:
    return {
        k: ([v.height, v.width, v.frames] if isinstance(v, MediaInfo) else {"error": v})
        for k, v in sorted(probes.items())
    }


def probes_from_json(data: dict) -> dict[str, Probe]:
    out: dict[str, Probe] = {}
    for k, v in data.items():
        out[k] = str(v["error"]) if isinstance(v, dict) else MediaInfo(*(int(x) for x in v))
    return out


def save_probes(store: str | Path | Location, probes: dict[str, Probe]) -> None:
    """Written whole (`Location.write`) so a kill never leaves half a file."""
    target = location(store) / PROBES_FILE
    target.write_text(json.dumps(probes_to_json(probes), separators=(",", ":")))


def load_probes(store: str | Path | Location) -> dict[str, Probe] | None:
    target = location(store) / PROBES_FILE
    try:
        text = target.read_text()
        return None if text is None else probes_from_json(json.loads(text))
    except (OSError, ValueError, TypeError, KeyError) as e:
        log.warning("%s is unreadable (%s): probing the files again", target, e)
        return None


# ---- per-sample draws ----


def sample_seeds(seed: int, row: int, repeat: int, variant: int, k: int) -> tuple[int, list[int]]:
    """(variant seed, K mask seeds) from (seed, row, repeat, variant); each below 2**63."""
    draws, masks = np.random.SeedSequence([seed % 2**64, row, repeat, variant]).spawn(2)
    variant_seed = int(draws.generate_state(1, np.uint64)[0] >> np.uint64(1))
    mask_seeds = [int(x >> np.uint64(1)) for x in masks.generate_state(k, np.uint64)] if k else []
    return variant_seed, mask_seeds


@dataclass(frozen=True)
class _Draw:
    indices: list[int]
    clip_frames: int
    geometry: SampleGeometry
    source_hw: tuple[int, int]


def draw_sample(
    row: Row,
    info: MediaInfo,
    cfg: PrecomputeConfig,
    rng: np.random.Generator,
    patch_size_t: int | None = None,
    opts: BucketOptions | None = None,
) -> _Draw:
    """Clip and (H, W, F) of one sample (`opts`: `bucket_options(cfg, patch_size_t)`, made once
    per plan by the caller). Raises DecodeError when the video is too short."""
    opts = opts or bucket_options(cfg, patch_size_t)
    if row.type == "image":
        height, width = choose_image_variant(info.height, info.width, opts, rng)
        return _Draw([0], 1, SampleGeometry.of(1, height, width), (info.height, info.width))
    clip = clip_indices(
        info.frames, cfg.video_sample_stride, cfg.video_sample_n_frames, rng, path=row.path
    )
    height, width, frames = choose_video_variant(info.height, info.width, len(clip), opts, rng)
    geometry = SampleGeometry.of(frames, height, width)
    return _Draw(clip[:frames], len(clip), geometry, (info.height, info.width))


def provenance(spec: SampleSpec, row: Row, variant: int, draw: _Draw, cap: int) -> dict:
    """Where a sample came from: file, frames, the resize and crop box, and its seeds."""
    h, w = draw.source_hw
    if spec.kind == "video":
        h, w = short_side_cap_hw(h, w, cap)
    g = spec.geometry
    rh, rw = cover_resize_hw(h, w, g.height, g.width)
    top, left = center_crop_offsets(rh, rw, g.height, g.width)
    return {
        "key": spec.key,
        "file": spec.file,
        "repeat": row.repeat,
        "variant": variant,
        "type": spec.kind,
        "source_hw": [draw.source_hw[0], draw.source_hw[1]],
        "frames": spec.indices,  # the spec's tuples, shared: JSON writes them as lists
        "clip_frames": spec.clip_frames,
        "resize_hw": [rh, rw],
        "crop": [top, left, g.height, g.width],
        "seed": spec.seed,
        "mask_seeds": spec.mask_seeds,
    }


# ---- the plan ----


def content_key(
    row: Row, stamp: tuple[int, int] | None, occurrence: int = 0
) -> tuple[str, int, int]:
    """A row copy's content key: blake2b-128 of its file path as the metadata writes it, the
    file's size and mtime (ns), caption, type, repeat number and `occurrence` (how many rows
    with all of those came before it: a duplicated row is two samples, as in the original); as
    (hex, low 32 bits, next 32 bits). The same row of an edited metadata file has the same key
    (its samples are reused by an incremental update); a changed file or caption gives another
    (they are encoded anew)."""
    size, mtime_ns = stamp or (-1, -1)
    content = [row.file_path, size, mtime_ns, row.text or "", row.type, row.repeat, occurrence]
    digest = hashlib.blake2b(json.dumps(content).encode(), digest_size=16).digest()
    words = np.frombuffer(digest[:8], dtype="<u4")
    return digest.hex(), int(words[0]), int(words[1])


def content_keys(rows: list[Row], stamps: dict[str, tuple[int, int]]) -> list[tuple[str, int, int]]:
    """`content_key` of every row copy (a sample's key is its row's, then ".v<variant>"), with
    each duplicate row counted by its occurrence."""
    seen: dict[tuple, int] = {}
    keys = []
    for r in rows:
        same = (r.file_path, r.text, r.type, r.repeat)
        seen[same] = seen.get(same, -1) + 1
        keys.append(content_key(r, stamps.get(probe_key(r)), seen[same]))
    return keys


def build_plan(
    rows: list[Row],
    probes: dict[str, Probe],
    cfg: PrecomputeConfig,
    patch_size_t: int | None = None,
    stamps: dict[str, tuple[int, int]] | None = None,
) -> Plan:
    """The deterministic plan of `rows` for a transformer with temporal patch `patch_size_t`
    (see the module docstring). `stamps` (size, mtime_ns by probe key, from the header pass)
    enter each sample's content key; each sample's draws are seeded from its key, not from its
    position, so a row's samples are the same whatever rows come before it."""
    k = masks_per_sample(cfg)
    cap = short_side_cap(cfg)
    opts = bucket_options(cfg, patch_size_t)
    stamps = stamps or {}
    keys = content_keys(rows, stamps)
    # Every (row, variant)'s seeds in one vectorized pass (`seeds`), row p's variant v at p*V + v.
    per_row = max(1, cfg.variants_per_sample)
    low = np.fromiter((key[1] for key in keys), np.int64, len(rows))
    high = np.fromiter((key[2] for key in keys), np.int64, len(rows))
    variant_seeds, all_mask_seeds = many_sample_seeds(
        cfg.seed,
        np.repeat(low, per_row),
        np.repeat(high, per_row),
        np.tile(np.arange(per_row), len(rows)),
        k,
    )
    failures: list[Failure] = []
    captions: dict[str, int] = {"": 0}
    drafts: list[tuple[SampleSpec, dict]] = []
    per_bucket: dict[str, list[int]] = {}
    for position, row in enumerate(rows):
        if row.error is not None:
            failures.append(Failure(row.key, row.file_path, row.error, row.index))
            continue
        info = probes.get(probe_key(row))
        if not isinstance(info, MediaInfo):
            reason = info if isinstance(info, str) else "file was not probed"
            failures.append(Failure(row.key, row.file_path, f"{row.path}: {reason}", row.index))
            continue
        variants = cfg.variants_per_sample if row.type == "video" else 1
        path = str(row.path)  # one string for all the row's variants
        for variant in range(variants):
            key = f"{keys[position][0]}.v{variant}"
            at = position * per_row + variant
            seed, mask_seeds = int(variant_seeds[at]), all_mask_seeds[at].tolist()
            try:
                draw = draw_sample(row, info, cfg, np.random.default_rng(seed), opts=opts)
            except DecodeError as e:
                failures.append(Failure(f"{row.key}.v{variant}", row.file_path, str(e), row.index))
                continue
            bucket = draw.geometry.bucket
            slots = per_bucket.setdefault(bucket, [])
            caption = captions.setdefault(row.text or "", len(captions))
            spec = SampleSpec(
                key=key,
                bucket=bucket,
                slot=len(slots),
                row=row.index,
                file=row.file_path,
                path=path,
                kind=row.type,
                indices=tuple(draw.indices),
                clip_frames=draw.clip_frames,
                geometry=draw.geometry,
                seed=seed,
                mask_seeds=tuple(mask_seeds),
                caption=caption,
            )
            slots.append(len(drafts))
            drafts.append((spec, provenance(spec, row, variant, draw, cap)))
    return _assemble(drafts, per_bucket, list(captions), failures, cfg.vae_mini_batch)


def bucket_order(name: str) -> tuple[int, int, int]:
    f, h, w = (int(part[1:]) for part in name.split("_"))
    return f, h, w


def _assemble(
    drafts: list[tuple[SampleSpec, dict]],
    per_bucket: dict[str, list[int]],
    captions: list[str],
    failures: list[Failure],
    mini_batch: int,
) -> Plan:
    buckets: list[BucketPlan] = []
    chunks: list[Chunk] = []
    samples: list[SampleSpec] = []
    for name in sorted(per_bucket, key=bucket_order):
        members = [drafts[i] for i in per_bucket[name]]
        g = members[0][0].geometry  # the bucket's size is its first sample's
        rows = [RowPlan(spec.caption, prov, spec.key) for spec, prov in members]
        buckets.append(BucketPlan(name, *g.pixels, *g.latent_shape, rows))
        specs = [spec for spec, _ in members]
        samples.extend(specs)
        for start in range(0, len(specs), max(1, mini_batch)):
            batch = tuple(specs[start : start + max(1, mini_batch)])
            chunks.append(Chunk(len(chunks), name, batch))
    return Plan(StorePlan(buckets, captions), samples, chunks, failures)


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
