"""`cogfun precompute`: plan, create or resume the store, encode, finalize.

    cogfun precompute --data DIR [--meta FILE] [--model DIR] [--out latents.zarr] [options]
    cogfun precompute --data DIR --out s3://bucket/prefix/latents.zarr [--storage-options JSON]
    accelerate launch --multi_gpu --num_processes 2 $(which cogfun) precompute --data DIR ...
    (on CPU add ACCELERATE_USE_CPU=true; accelerate sets OMP_NUM_THREADS=1, so pass --threads)

Every process reads the metadata and probes its share of the media headers (cached beside the
store, see `cogfun.precompute.headers`); all then build the same plan from every share. Process 0
creates the store, or checks that an existing one has the same fingerprint and grows it to the
plan (`cogfun.precompute.update`: samples are keyed by content, so an edited metadata file adds
new rows, retires gone ones and reuses the rest), while the others wait, then open it. Each shard
of the store is owned by one process (global shard g by process g % N), which encodes its chunks,
stages their samples and seals the shard. After a second barrier process 0 writes the done index
and marks the store complete. Rerunning the same command resumes: done samples are skipped,
half-done chunks are redone whole, so the store ends bitwise equal to an uninterrupted run at the
same per-process thread count.

Before any work the model's transformer/config.json is read (the JSON only, no weights): a model
cogfun cannot train (Fun control models, unknown channel counts) is refused, and its `patch_size_t`
fixes the frame counts the plan may hold (V1.5: even latent counts or 1).

What the fingerprint covers (refused on resume when any differs): every option that shapes the
stored bytes (sizes, frames, stride, repeat, variants, buckets, masks, mode, seed, latent format,
VAE/T5 dtypes, vae_mini_batch, slicing, tiling, T5 batch), the VAE, text encoder and tokenizer
identities (hash of their files), the transformer layout the frame counts were chosen for
(`transformer`: patch_size, patch_size_t) and its masked-video noise (`inpaint_noise`) and the
mask tables. Not covered: the dataset (its rows are matched by content key instead; the metadata
file's hash is recorded in the attrs), the paths of the data, metadata, model and store (moving
them does not change a byte), decode workers, progress, `--shard-samples`, the thread count
(recorded in the store's attrs instead), and `--validation-prompts` (written beside the arrays, see
`cogfun.common.sample_store`: they change no training sample).
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from cogfun.common.disk_full import disk_full_message
from cogfun.common.model_kind import check_servable, read_transformer_config
from cogfun.common.models import ModelFolderError, check_model_folder
from cogfun.common.modes import mode_facts
from cogfun.common.progress import format_duration, progress, setup_logging
from cogfun.common.sample_store import encode_store_prompts, read_prompt_lines, store_prompts_todo
from cogfun.common.store import (
    StoreError,
    StoreLayout,
    StoreWriter,
)
from cogfun.config.store_paths import apply_storage_options, check_store_url
from cogfun.precompute.config import PrecomputeConfig
from cogfun.precompute.encode import TextEncoder, VaeEncoder, resolve_dtype
from cogfun.precompute.metadata import MetadataError, read_metadata
from cogfun.precompute.pipeline import (
    TEXT_BATCH,
    Stats,
    caption_batches,
    encode_captions,
    encode_chunks,
    encode_shared,
)
from cogfun.precompute.plan import (
    Plan,
    short_side_cap,
)
from cogfun.precompute.prepare import Job, prepared_chunks
from cogfun.precompute.ranks import Ranks, init_ranks
from cogfun.precompute.store_setup import (
    TRANSFORMER_CONFIG_NEEDED,
    SetupAborted,
    build_settings,
    open_store_for_run,
    read_json,
    store_attrs,
    store_layout,
)

log = logging.getLogger("cogfun.precompute")

EXIT_NOTHING_STORED = 1
EXIT_ABORT = 2
MODEL_PARTS = ("vae", "text_encoder", "tokenizer")


class OptionError(ValueError):
    """An option value precompute cannot work with; the message names the flag."""


# option -> smallest value it accepts
_MINIMUM = {
    "image_sample_size": 16,
    "video_sample_size": 16,
    "token_sample_size": 16,
    "video_sample_stride": 1,
    "video_sample_n_frames": 1,
    "video_repeat": 0,
    "vae_mini_batch": 1,
    "shard_samples": 1,
    "tokenizer_max_length": 1,
    "variants_per_sample": 1,
    "masks_per_sample": 0,
    "decode_workers": 0,
    "threads": 0,
}


def check_options(cfg: PrecomputeConfig) -> None:
    try:
        check_store_url(cfg.out, "--out")
    except ValueError as err:
        raise OptionError(str(err)) from err
    for name, low in _MINIMUM.items():
        if getattr(cfg, name) < low:
            flag = "--" + name.replace("_", "-")
            raise OptionError(f"{flag} must be >= {low}, got {getattr(cfg, name)}")
    if mode_facts(cfg.mode).needs_masks and cfg.masks_per_sample < 1:
        raise OptionError("--masks-per-sample must be >= 1 in inpaint mode (or use --mode normal)")
    if cfg.validation_prompts is not None:
        try:
            read_prompt_lines(cfg.validation_prompts)
        except ValueError as err:
            raise OptionError(str(err)) from err


def run(config: PrecomputeConfig) -> int:
    """Run precompute; returns the exit code (0 when the store holds at least one sample)."""
    setup_logging()
    try:
        return run_precompute(config).code
    except (MetadataError, ModelFolderError, StoreError, SetupAborted, OptionError) as e:
        log.error("precompute aborted: %s", e)
        return EXIT_ABORT
    except OSError as e:
        message = disk_full_message(e, "Every sample finished so far is kept", "where it stopped")
        if message is None:
            raise
        log.error("precompute aborted: %s", message)
        return EXIT_ABORT


def _jobs(plan: Plan, writer: StoreWriter, ranks: Ranks) -> tuple[list[Job], int]:
    """This process's chunks (those of the shards it owns) that still have a sample to write,
    and the samples already done."""
    done: dict[str, object] = {}
    jobs, skipped = [], 0
    for chunk in plan.chunks:
        if not writer.owns(writer.shard_of(chunk.bucket, chunk.samples[0].slot), *ranks.place):
            continue
        if chunk.bucket not in done:
            done[chunk.bucket] = writer.done_slots(chunk.bucket)
        pending = tuple(not bool(done[chunk.bucket][s.slot]) for s in chunk.samples)
        skipped += len(pending) - sum(pending)
        if any(pending):
            jobs.append(Job(chunk, pending))
    return jobs, skipped


def _seal_points(jobs: list[Job], writer: StoreWriter) -> dict[int, tuple[str, int]]:
    """Job index -> (bucket, local shard) to seal once that job is written: the last job of each
    shard in this process's order, so staged samples wait on disk for one shard at most."""
    points: dict[int, tuple[str, int]] = {}
    for i, job in enumerate(jobs):
        shard = job.chunk.samples[0].slot // writer.shard_rows
        nxt = jobs[i + 1].chunk if i + 1 < len(jobs) else None
        if (
            nxt is None
            or nxt.bucket != job.chunk.bucket
            or (nxt.samples[0].slot // writer.shard_rows != shard)
        ):
            points[i] = (job.chunk.bucket, shard)
    return points


@dataclass
class _Context:
    cfg: PrecomputeConfig
    ranks: Ranks
    threads: int
    vae_dtype: str
    text_dtype: str
    layout: StoreLayout
    plan: Plan
    writer: StoreWriter
    settings: dict


@dataclass
class Outcome:
    """What `run_precompute` did: the exit code, this process's counters and times (summed over
    the processes on process 0) and the wall time of the encode phase (models loaded onward)."""

    code: int
    stats: Stats
    encode_s: float
    held: int


def _setup(cfg: PrecomputeConfig, cleanup: ExitStack) -> _Context:
    check_options(cfg)
    ranks = init_ranks()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # explicit either way: bitwise results depend on it
    rows = read_metadata(cfg.meta_path(), cfg.data, cfg.video_repeat)
    check_model_folder(cfg.model, MODEL_PARTS)
    tconfig = read_transformer_config(cfg.model, TRANSFORMER_CONFIG_NEEDED)
    latent_channels = read_json(cfg.model / "vae" / "config.json").get("latent_channels", 16)
    check_servable(tconfig, latent_channels, cfg.model)
    vae_dtype = resolve_dtype(cfg.vae_dtype, ranks.device)
    text_dtype = resolve_dtype(cfg.text_encoder_dtype, ranks.device)
    settings = build_settings(cfg, vae_dtype, text_dtype, tconfig)
    layout = store_layout(cfg, settings)
    attrs = store_attrs(cfg, ranks, threads)
    plan, writer = open_store_for_run(cfg, ranks, rows, settings, attrs, layout, cleanup)
    return _Context(cfg, ranks, threads, vae_dtype, text_dtype, layout, plan, writer, settings)


def _encode(ctx: _Context, write_async: bool) -> tuple[Stats, float]:
    """Captions, shared all-masked latents, then this process's chunks. Returns the counters and
    the wall time from the first model load to the last write."""
    cfg, ranks, plan, writer = ctx.cfg, ctx.ranks, ctx.plan, ctx.writer
    stats = Stats()
    jobs, stats.skipped = _jobs(plan, writer, ranks)
    with_masks = ctx.layout.masks_per_sample > 0
    on_gpu = ranks.device.type == "cuda"
    # Workers fork here, before the models load, and start decoding at once.
    source = prepared_chunks(jobs, short_side_cap(cfg), with_masks, cfg.decode_workers, on_gpu)
    start = time.perf_counter()
    batches = [
        b
        for b in caption_batches(len(plan.store.captions))
        if writer.owns(writer.caption_shard_of(b[0]), *ranks.place)
    ]
    captions_todo = any(not writer.caption_done(i) for b in batches for i in b)
    sha = ctx.settings["text_encoder"]["sha256"]
    prompts = (
        store_prompts_todo(cfg.validation_prompts, cfg.out, sha, cfg.tokenizer_max_length)
        if ranks.is_main and cfg.validation_prompts is not None
        else []
    )
    if captions_todo or prompts:
        text = TextEncoder.load(cfg.model, ranks.device, ctx.text_dtype, cfg.tokenizer_max_length)
        if captions_todo:
            encode_captions(writer, plan.store, text, batches, stats)
        if prompts:
            encode_store_prompts(cfg.out, prompts, text.encode, TEXT_BATCH, sha)
        del text  # T5 and the VAE need not share the device's memory
    shared = [b.name for b in plan.store.buckets][ranks.rank :: ranks.world] if with_masks else []
    need_shared = any(not writer.has_all_masked(b) for b in shared)
    vae = None
    if jobs or need_shared:
        vae = VaeEncoder.load(
            cfg.model, ranks.device, ctx.vae_dtype, cfg.vae_slicing, cfg.vae_tiling
        )
    if need_shared:
        encode_shared(writer, plan.store, shared, vae, cfg.latent_format, cfg.seed, stats)
    ranks.barrier()  # every bucket's shared all-masked latent exists before samples refer to it

    description = "precompute" if ranks.world == 1 else f"precompute [{ranks.rank}/{ranks.world}]"
    mode = cfg.progress if ranks.is_main or cfg.progress == "none" else "log"
    with progress(sum(sum(j.pending) for j in jobs), description, mode, unit="samples") as bar:
        if jobs:
            encode_chunks(
                jobs,
                source,
                vae,
                writer,
                vae_mini_batch=cfg.vae_mini_batch,
                latent_format=cfg.latent_format,
                with_masks=with_masks,
                stats=stats,
                bar=bar,
                write_async=write_async,
                inpaint_noise=ctx.settings["inpaint_noise"],
                seal_points=_seal_points(jobs, writer),
            )
    stats.sealed += writer.seal_owned(*ranks.place)  # captions, and shards a resume found staged
    elapsed = time.perf_counter() - start
    log.info(
        "process %d of %d: stored %d samples in %d chunks, %d failed, %d already done; "
        "%d captions, %d shared latents; %d shard files sealed; threads %d; %s",
        ranks.rank,
        ranks.world,
        stats.stored,
        stats.chunks,
        stats.failed,
        stats.skipped,
        stats.captions,
        stats.shared,
        stats.sealed,
        ctx.threads,
        stats.time_split(),
    )
    return stats, elapsed


def _finish(ctx: _Context, stats: Stats, started: float) -> tuple[int, Stats, int]:
    """Process 0 finalizes once every process is done; everyone returns the same exit code."""
    ranks, plan = ctx.ranks, ctx.plan
    ranks.barrier()
    total = Stats.from_list(ranks.sum(stats.to_list()))
    held = 0
    if ranks.is_main:
        ctx.writer.finalize()
        held = sum(int(v) for v in ctx.writer.root.attrs["counts"].values())  # served ones
    held = ranks.broadcast([held])[0]
    if ranks.is_main:
        log.info(
            "precompute done: stored %d, failed %d, skipped as done %d; the store holds %d of %d "
            "planned samples (%d inputs failed at planning); %s",
            total.stored,
            total.failed + len(plan.failures),
            total.skipped,
            held,
            len(plan.samples),
            len(plan.failures),
            format_duration(time.perf_counter() - started),
        )
    if held == 0:
        log.error("the store %s holds no sample: nothing could be encoded", ctx.cfg.out)
        return EXIT_NOTHING_STORED, total, held
    return 0, total, held


def run_precompute(cfg: PrecomputeConfig, *, write_async: bool = True) -> Outcome:
    """The whole stage (errors propagate). `write_async=False` writes inline, which the benchmark
    uses to time each stage alone."""
    started = time.perf_counter()
    apply_storage_options(cfg.storage_options)  # every launched process parses its own
    with ExitStack() as cleanup:
        ctx = _setup(cfg, cleanup)
        stats, encode_s = _encode(ctx, write_async)
        code, total, held = _finish(ctx, stats, started)
    return Outcome(code, total, encode_s, held)
