"""Decode side of the encode pipeline: planned chunk -> pixels, masks and mask latents.

This is everything before the VAE that costs CPU: reading frames (decord, PyAV fallback) or an
image, resize-to-cover + center crop to the bucket (`resize_cover_crop`), the K masks drawn from the
sample's mask seeds and their latent-grid channel (`mask_to_latent`). It runs in DataLoader worker
processes (`--decode-workers`, in plan order) so the VAE never waits on decoding; with 0 workers it
runs inline. Workers return plain tensors and strings only.

A sample that cannot be read, or yields fewer frames than planned, comes back with an `error` that
names the file; the rest of its chunk is still prepared. When every pending sample of a chunk failed,
the done ones are not decoded at all (there is nothing to re-encode).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from cogfun.common.buckets import resize_cover_crop
from cogfun.common.decode import DecodeError, read_image, read_video_frames
from cogfun.common.masks import mask_to_latent, random_mask
from cogfun.precompute.plan import Chunk, SampleSpec
from torch import Tensor


@dataclass(frozen=True)
class Job:
    """A chunk to encode and which of its samples still need writing (False = already done)."""

    chunk: Chunk
    pending: tuple[bool, ...]


def read_frames(spec: SampleSpec, short_side_cap: int) -> np.ndarray:
    """uint8 (F, H0, W0, 3) of a planned sample; DecodeError (naming the file) when short or bad."""
    if spec.kind == "image":
        frames = read_image(spec.path)
        # Pillow's arrays are read-only; torch warns when wrapping one.
        return frames if frames.flags.writeable else frames.copy()
    frames = read_video_frames(spec.path, list(spec.indices), short_side_cap)
    if frames.shape[0] != spec.geometry.frames:
        raise DecodeError(
            spec.path,
            f"decoded {frames.shape[0]} frames where the plan needs {spec.geometry.frames}",
        )
    return frames


def draw_masks(spec: SampleSpec) -> tuple[Tensor, Tensor, Tensor]:
    """K masks of a sample from its seeds: (K, F, 1, H, W) uint8 (1 = generate),
    their latent channel (K, F_lat, 1, h, w) float32 (1 = known), all-masked flags (K,) bool.

    Each mask is drawn at the clip's length and then cut to the leading F frames, as the original
    draws before trimming the batch (so a type-3 mask can lose its known tail)."""
    g = spec.geometry
    shape = (spec.clip_frames, 3, g.height, g.width)
    masks = torch.stack(
        [random_mask(shape, np.random.default_rng(s))[0][: g.frames] for s in spec.mask_seeds]
    )  # (K, F, 1, H, W)
    latents = torch.stack([mask_to_latent(m) for m in masks])  # (K, F_lat, 1, h, w)
    all_masked = masks.flatten(1).bool().all(dim=1)  # (K,)
    return masks, latents, all_masked


def prepare_sample(spec: SampleSpec, short_side_cap: int, with_masks: bool) -> dict:
    """One sample's encoder inputs, or {"error": reason}."""
    try:
        frames = read_frames(spec, short_side_cap)
    except DecodeError as e:
        return {"error": str(e)}
    except Exception as e:  # a broken file can make a decoder raise anything: record, go on
        return {"error": f"{spec.path}: cannot decode: {type(e).__name__}: {e}"}
    g = spec.geometry
    out: dict = {"error": None, "pixels": resize_cover_crop(frames, g.height, g.width)}
    if with_masks:
        out["masks"], out["mask_latents"], out["all_masked"] = draw_masks(spec)
    return out


def prepare_chunk(job: Job, short_side_cap: int, with_masks: bool) -> dict:
    """{"index", "samples": [per-sample dict | None (not decoded)], "decode_s"}."""
    start = time.perf_counter()
    samples: list[dict | None] = [None] * len(job.chunk.samples)
    pending = [i for i, p in enumerate(job.pending) if p]
    for i in pending:
        samples[i] = prepare_sample(job.chunk.samples[i], short_side_cap, with_masks)
    # Done samples are decoded only to rebuild the chunk's VAE batch for a pending one.
    if any(samples[i]["error"] is None for i in pending):
        for i, p in enumerate(job.pending):
            if not p:
                samples[i] = prepare_sample(job.chunk.samples[i], short_side_cap, with_masks)
    return {
        "index": job.chunk.index,
        "samples": samples,
        "decode_s": time.perf_counter() - start,
    }


class ChunkDataset(torch.utils.data.Dataset):
    """Jobs as a map-style dataset: item i is job i prepared (used with batch_size=None)."""

    def __init__(self, jobs: list[Job], short_side_cap: int, with_masks: bool):
        self.jobs = jobs
        self.short_side_cap = short_side_cap
        self.with_masks = with_masks

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> dict:
        return prepare_chunk(self.jobs[i], self.short_side_cap, self.with_masks)


def prepared_chunks(
    jobs: list[Job], short_side_cap: int, with_masks: bool, workers: int, pin_memory: bool = False
) -> Iterator[dict]:
    """Prepared jobs in order. With workers > 0 they start decoding as soon as this is iterated
    and keep up to 2 chunks per worker ready ahead of the consumer."""
    dataset = ChunkDataset(jobs, short_side_cap, with_masks)
    if workers <= 0 or not jobs:
        return (_one_thread(dataset, i) for i in range(len(dataset)))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=min(workers, len(jobs)),
        prefetch_factor=2,
        pin_memory=pin_memory,
    )
    return iter(loader)


def _one_thread(dataset: ChunkDataset, i: int) -> dict:
    """Job i prepared in this process with one torch thread, as a decode worker runs it (torch
    gives each DataLoader worker one thread). The float bilinear resize of `cap_short_side` rounds
    some pixels differently when torch splits it over threads, so without this `--decode-workers 0`
    stored other bytes than the default workers whenever --threads was above 1."""
    threads = torch.get_num_threads()
    if threads == 1:
        return dataset[i]
    torch.set_num_threads(1)
    try:
        return dataset[i]
    finally:
        torch.set_num_threads(threads)
