"""The encode pipeline: prepared chunks -> VAE -> store, with T5 for the captions.

    decode workers (prepare.py)  ->  VAE, one chunk at a time  ->  writer thread  ->  store
      pixels, masks, mask latents      latents, masked latents       write_sample (done flag last)

Decoding runs ahead in worker processes and writing runs behind in a thread (zarr's compression and
file writes release the GIL), so the VAE waits on neither. The unit of work is the planned chunk: a
chunk with any sample not done is encoded whole, exactly as planned, because the VAE's
floating-point result depends on the batch it ran in; its done samples are not rewritten, so a
`kill -9` during a rerun can never damage what was stored. All-masked variants share their
bucket's one masked-video encode (`encode_shared`, one sample alone, so it never depends on a batch).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields

import torch
from cogfun.common.masks import add_inpaint_noise, masked_video
from cogfun.common.progress import Progress
from cogfun.common.store import StorePlan, StoreWriter
from cogfun.precompute.encode import (
    TextEncoder,
    VaeEncoder,
    encode_in_batches,
    stored_latents,
)
from cogfun.precompute.plan import SampleSpec
from cogfun.precompute.prepare import Job
from torch import Tensor

log = logging.getLogger("cogfun.precompute")

TEXT_BATCH = 8  # captions per T5 call; batches are fixed by caption index (deterministic bytes)


@dataclass
class Stats:
    """What one process did; every field is summed over the processes at the end."""

    stored: int = 0  # samples written by this run
    failed: int = 0  # samples that could not be decoded
    skipped: int = 0  # samples already done before this run (not rewritten)
    chunks: int = 0  # chunks encoded
    captions: int = 0  # caption embeddings written
    shared: int = 0  # all-masked latents written
    decode_ms: int = 0  # in the decode workers (summed over workers)
    wait_ms: int = 0  # the encoder waiting for decoded chunks
    vae_ms: int = 0
    t5_ms: int = 0
    write_ms: int = 0  # in the writer thread
    sealed: int = 0  # shard files written whole (each holds many staged samples)

    def to_list(self) -> list[int]:
        return [getattr(self, f.name) for f in fields(self)]

    @classmethod
    def from_list(cls, values: list[int]) -> Stats:
        return cls(*values)

    def as_dict(self) -> dict:
        return asdict(self)

    def time_split(self) -> str:
        """`decode 1.2 s (workers), wait 0.1 s, VAE 3.4 s, T5 0.2 s, write 0.5 s (thread)`."""
        s = {k: getattr(self, f"{k}_ms") / 1000 for k in ("decode", "wait", "vae", "t5", "write")}
        return (
            f"decode {s['decode']:.1f} s, waiting for decode {s['wait']:.1f} s, "
            f"VAE {s['vae']:.1f} s, T5 {s['t5']:.1f} s, write {s['write']:.1f} s"
        )


class _Timer:
    def __init__(self, stats: Stats, name: str):
        self.stats, self.name = stats, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        ms = int(round((time.perf_counter() - self.start) * 1000))
        setattr(self.stats, self.name, getattr(self.stats, self.name) + ms)


class AsyncWriter:
    """Runs store writes in one background thread, in submission order; errors surface on the
    next submit or on close. With `enabled=False` writes run inline (for timing stages alone)."""

    def __init__(self, stats: Stats, enabled: bool = True, depth: int = 8):
        self.stats = stats
        self.enabled = enabled
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._loop, name="store-writer", daemon=True)
        if enabled:
            self._thread.start()

    def _run(self, fn: Callable, args: tuple) -> None:
        with _Timer(self.stats, "write_ms"):
            fn(*args)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.error is None:
                try:
                    self._run(*item)
                except BaseException as e:  # re-raised in the main thread
                    self.error = e

    def submit(self, fn: Callable, *args: object) -> None:
        if self.error is not None:
            raise self.error
        if self.enabled:
            self._queue.put((fn, args))
        else:
            self._run(fn, args)

    def close(self) -> None:
        if self.enabled and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self.error is not None:
            raise self.error


# ---- captions ----


def caption_batches(n_captions: int, batch: int = TEXT_BATCH) -> list[list[int]]:
    return [list(range(s, min(s + batch, n_captions))) for s in range(0, n_captions, batch)]


def encode_captions(
    writer: StoreWriter, plan: StorePlan, text: TextEncoder, batches: list[list[int]], stats: Stats
) -> None:
    """T5-encode every batch with a caption not yet stored; the whole batch is recomputed so an
    embedding never depends on the run that wrote it."""
    for batch in batches:
        todo = [i for i in batch if not writer.caption_done(i)]
        if not todo:
            continue
        with _Timer(stats, "t5_ms"):
            embeds = text.encode([plan.captions[i] for i in batch])  # (B, L, D)
        for j, i in enumerate(batch):
            if i in todo:
                writer.write_caption(i, embeds[j])
                stats.captions += 1


# ---- the shared all-masked encode ----


def shared_seed(seed: int, bucket: str) -> int:
    digest = hashlib.sha256(f"{seed}/{bucket}/all-masked".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def encode_shared(
    writer: StoreWriter,
    plan: StorePlan,
    buckets: Iterable[str],
    vae: VaeEncoder,
    latent_format: str,
    seed: int,
    stats: Stats,
) -> None:
    """Encode each bucket's all-masked video (every pixel -1) once, alone, where not yet stored."""
    shapes = {b.name: b for b in plan.buckets}
    for name in buckets:
        if writer.has_all_masked(name):
            continue
        b = shapes[name]
        black = torch.full((1, b.frames, 3, b.height, b.width), -1.0)  # (1, F, 3, H, W)
        with _Timer(stats, "vae_ms"):
            moments = vae.moments(black)[0]  # (F_lat, 2C, h, w)
        writer.write_all_masked(
            name, stored_latents(moments, latent_format, shared_seed(seed, name))
        )
        stats.shared += 1


# ---- chunks ----


def _masked_input(spec: SampleSpec, p: dict, k: int, inpaint_noise: bool) -> Tensor:
    """Variant k's masked video (F, 3, H, W); with `inpaint_noise` (models whose transformer config
    sets add_noise_in_inpaint_model) the noise augmentation is drawn from the variant's seed, so it
    is frozen in the store like the mask itself."""
    video = masked_video(p["pixels"], p["masks"][k])
    if not inpaint_noise:
        return video
    return add_inpaint_noise(video, torch.Generator().manual_seed(spec.mask_seeds[k]))


def _masked_moments(
    vae: VaeEncoder,
    ok: list[tuple[SampleSpec, dict]],
    batch: int,
    stats: Stats,
    inpaint_noise: bool = False,
) -> list[dict[int, Tensor]]:
    """Moments of every masked video that is not all-masked, `batch` per VAE call, in
    (sample, variant) order; returned per sample as {variant: moments}."""
    jobs = [
        (i, k)
        for i, (_, p) in enumerate(ok)
        for k in range(len(p["all_masked"]))
        if not bool(p["all_masked"][k])
    ]
    videos = [_masked_input(*ok[i], k, inpaint_noise) for i, k in jobs]
    with _Timer(stats, "vae_ms"):
        moments = encode_in_batches(vae, videos, batch)
    out: list[dict[int, Tensor]] = [{} for _ in ok]
    for (i, k), m in zip(jobs, moments, strict=True):
        out[i][k] = m
    return out


def _sample_arrays(
    spec: SampleSpec, p: dict, moments: Tensor, masked: dict[int, Tensor] | None, latent_format: str
) -> dict:
    latents = stored_latents(moments, latent_format, spec.seed)  # (F_lat, 2C|C, h, w)
    if masked is None:
        return {"latents": latents}
    per_variant = [
        stored_latents(masked[k], latent_format, spec.mask_seeds[k])
        if k in masked
        else torch.zeros_like(latents)  # all-masked: the bucket's shared latent is used instead
        for k in range(len(spec.mask_seeds))
    ]
    return {
        "latents": latents,
        "masks": p["mask_latents"],  # (K, F_lat, 1, h, w)
        "masked_latents": torch.stack(per_variant),  # (K, F_lat, 2C|C, h, w)
        "all_masked": p["all_masked"],  # (K,)
    }


def _write(writer: StoreWriter, spec: SampleSpec, arrays: dict) -> None:
    writer.write_sample(spec.bucket, spec.slot, **arrays)
    writer.clear_failure(spec.key)  # a rerun may store what failed before (a fixed file)


def _seal(writer: StoreWriter, bucket: str, shard: int, stats: Stats) -> None:
    writer.seal(bucket, shard)
    stats.sealed += 1


def encode_chunk(
    job: Job,
    prepared: dict,
    vae: VaeEncoder,
    writer: StoreWriter,
    out: AsyncWriter,
    vae_mini_batch: int,
    latent_format: str,
    with_masks: bool,
    stats: Stats,
    inpaint_noise: bool = False,
) -> tuple[int, int]:
    """Encode one prepared chunk and queue its pending samples; returns (stored, failed)."""
    samples = list(zip(job.chunk.samples, prepared["samples"], job.pending, strict=True))
    failed = 0
    for spec, p, pending in samples:
        if pending and p is not None and p["error"] is not None:
            writer.record_failure(spec.key, spec.file, p["error"], spec.row)
            failed += 1
    ok = [(s, p) for s, p, _ in samples if p is not None and p["error"] is None]
    todo = [s.slot for s, p, pending in samples if pending and p is not None and p["error"] is None]
    if not todo:
        return 0, failed
    with _Timer(stats, "vae_ms"):
        moments = vae.moments(torch.stack([p["pixels"] for _, p in ok]))  # (B, F_lat, 2C, h, w)
    masked = (
        _masked_moments(vae, ok, vae_mini_batch, stats, inpaint_noise)
        if with_masks
        else [None] * len(ok)
    )
    for i, (spec, p) in enumerate(ok):
        if spec.slot in todo:
            out.submit(
                _write, writer, spec, _sample_arrays(spec, p, moments[i], masked[i], latent_format)
            )
    stats.chunks += 1
    return len(todo), failed


def encode_chunks(
    jobs: list[Job],
    source: Iterable[dict],
    vae: VaeEncoder,
    writer: StoreWriter,
    *,
    vae_mini_batch: int,
    latent_format: str,
    with_masks: bool,
    stats: Stats,
    bar: Progress,
    write_async: bool = True,
    inpaint_noise: bool = False,
    seal_points: dict[int, tuple[str, int]] | None = None,
) -> None:
    """Consume prepared chunks (in job order) until all jobs are encoded and written; after job i
    is written, seal the shard `seal_points[i]` names (its last job here)."""
    out = AsyncWriter(stats, enabled=write_async, depth=max(4, 2 * vae_mini_batch))
    try:
        it = iter(source)
        for i, job in enumerate(jobs):
            with _Timer(stats, "wait_ms"):
                prepared = next(it)
            if prepared["index"] != job.chunk.index:
                raise RuntimeError(
                    f"decode order broke: got chunk {prepared['index']}, expected {job.chunk.index}"
                )
            stats.decode_ms += int(round(prepared["decode_s"] * 1000))
            stored, failed = encode_chunk(
                job,
                prepared,
                vae,
                writer,
                out,
                vae_mini_batch,
                latent_format,
                with_masks,
                stats,
                inpaint_noise,
            )
            stats.stored += stored
            stats.failed += failed
            bar.advance(stored + failed, failed=stats.failed)
            if seal_points and i in seal_points:
                out.submit(_seal, writer, *seal_points[i], stats)
    finally:
        out.close()
