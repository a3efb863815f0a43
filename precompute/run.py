"""`cogfun precompute`: plan, create or resume the store, encode, finalize.

    cogfun precompute --data DIR [--meta FILE] [--model DIR] [--out latents.zarr] [options]
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

import dataclasses
import json
import logging
import secrets
import time
from contextlib import ExitStack
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
from cogfun.common.disk_full import disk_full_message
from cogfun.common.masks import IMAGE_MASK_PROBS, VIDEO_MASK_PROBS
from cogfun.common.model_kind import check_servable, encoded_for, read_transformer_config
from cogfun.common.models import ModelFolderError, check_model_folder, model_identity
from cogfun.common.modes import mode_facts
from cogfun.common.progress import format_duration, progress, setup_logging
from cogfun.common.sample_store import encode_store_prompts, read_prompt_lines, store_prompts_todo
from cogfun.common.store import (
    StoreError,
    StoreLayout,
    StoreLock,
    StorePlan,
    StoreWriter,
    check_root,
    clear_failures,
    fingerprint,
    open_for_write,
    read_plan,
    shard_size,
)
from cogfun.precompute.config import PrecomputeConfig
from cogfun.precompute.encode import TextEncoder, VaeEncoder, resolve_dtype
from cogfun.precompute.headers import HeaderPassError, header_pass, probe_dir, prune
from cogfun.precompute.metadata import MetadataError, Row, read_metadata
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
    build_plan,
    file_sha256,
    masks_per_sample,
    save_probes,
    short_side_cap,
)
from cogfun.precompute.prepare import Job, prepared_chunks
from cogfun.precompute.ranks import Ranks, init_ranks
from cogfun.precompute.update import merge

log = logging.getLogger("cogfun.precompute")

# Bump when the encoding algorithm changes stored bytes for the same settings.
PIPELINE_VERSION = 1
EXIT_NOTHING_STORED = 1
EXIT_ABORT = 2
MODEL_PARTS = ("vae", "text_encoder", "tokenizer")


class SetupAborted(Exception):
    """Process 0 could not plan or open the store; the other processes stop too."""


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


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# Why precompute reads the transformer config (the message when it is missing).
TRANSFORMER_CONFIG_NEEDED = (
    "precompute reads it (the JSON only, no weights) to learn which frame counts the transformer "
    "can patch (patch_size_t), whether it trains on noised masked videos "
    "(add_noise_in_inpaint_model) and its input channels; copy the model's transformer/config.json "
    "there"
)


def build_settings(cfg: PrecomputeConfig, vae_dtype: str, text_dtype: str, tconfig: dict) -> dict:
    """Everything that shapes the stored bytes (see the module docstring); `tconfig` is the
    model's transformer config."""
    vae_config = _read_json(cfg.model / "vae" / "config.json")

    def identity(part: str) -> dict:
        ident = model_identity(cfg.model, part)
        return {"class": ident["class"], "sha256": ident["sha256"]}

    return {
        "pipeline_version": PIPELINE_VERSION,
        "mode": cfg.mode,
        "seed": cfg.seed,
        "image_sample_size": cfg.image_sample_size,
        "video_sample_size": cfg.video_sample_size,
        "token_sample_size": cfg.token_sample_size,
        "video_sample_stride": cfg.video_sample_stride,
        "video_sample_n_frames": cfg.video_sample_n_frames,
        "video_repeat": cfg.video_repeat,
        "variants_per_sample": cfg.variants_per_sample,
        "enable_bucket": cfg.enable_bucket,
        "random_hw_adapt": cfg.random_hw_adapt,
        "training_with_video_token_length": cfg.training_with_video_token_length,
        "random_frame_crop": cfg.random_frame_crop,
        "masks_per_sample": masks_per_sample(cfg),
        "mask_probs": {"video": list(VIDEO_MASK_PROBS), "image": list(IMAGE_MASK_PROBS)},
        "latent_format": cfg.latent_format,
        "tokenizer_max_length": cfg.tokenizer_max_length,
        "vae_dtype": vae_dtype,
        "text_encoder_dtype": text_dtype,
        "vae_mini_batch": cfg.vae_mini_batch,
        "vae_slicing": cfg.vae_slicing,
        "vae_tiling": cfg.vae_tiling,
        "text_batch": TEXT_BATCH,
        "vae": {
            **identity("vae"),
            "scaling_factor": vae_config.get("scaling_factor", 1.15258426),
            "latent_channels": vae_config.get("latent_channels", 16),
        },
        "text_encoder": identity("text_encoder"),
        "tokenizer": identity("tokenizer"),
        # The masked-video noise augmentation of V1.1/V1.5 models (add_noise_in_inpaint_model).
        "inpaint_noise": mode_facts(cfg.mode).needs_masks
        and bool(tconfig.get("add_noise_in_inpaint_model", False)),
        "transformer": encoded_for(tconfig),
    }


def _attrs(cfg: PrecomputeConfig, ranks: Ranks, threads: int) -> dict:
    config = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}
    return {
        "config": config,
        # The dataset the store was last planned from (not in the fingerprint: an edited one
        # updates the store, `cogfun.precompute.update`).
        "metadata_sha256": file_sha256(cfg.meta_path()),
        "cogfun_version": version("cogfun"),
        "torch_version": torch.__version__,
        "threads": threads,
        "processes": ranks.world,
        "device": ranks.device.type,
    }


def _layout(cfg: PrecomputeConfig, settings: dict) -> StoreLayout:
    text_config = _read_json(cfg.model / "text_encoder" / "config.json")
    return StoreLayout(
        latent_channels=int(settings["vae"]["latent_channels"]),
        latent_format=cfg.latent_format,
        masks_per_sample=masks_per_sample(cfg),
        text_len=cfg.tokenizer_max_length,
        text_dim=int(text_config["d_model"]),
    )


def _warn_on_thread_change(writer: StoreWriter, out: Path, threads: int) -> None:
    """A store resumed at another per-process torch thread count: every sample stays valid, but
    the ones written now may differ bitwise from what the recorded count gives (and the digest
    from an uninterrupted run's)."""
    before = (writer.root.attrs.get("attrs") or {}).get("threads")
    if isinstance(before, int) and before != threads:
        log.warning(
            "%s was started with %d torch threads per process and this run uses %d: samples "
            "written now may differ bitwise from those of an uninterrupted run (pass --threads %d "
            "to match)",
            out,
            before,
            threads,
            before,
        )


def _open_store(
    cfg: PrecomputeConfig,
    ranks: Ranks,
    rows: list[Row],
    settings: dict,
    attrs: dict,
    layout: StoreLayout,
    cleanup: ExitStack,
) -> tuple[Plan, StoreWriter]:
    """Process 0 locks the store; every process probes its share of the headers and builds the
    same plan from all shares (`cogfun.precompute.headers`); process 0 creates (or resumes) the
    store and the others open it after. The lock is held until `cleanup` closes: one live
    precompute per store."""
    run_id = 0
    if ranks.is_main:
        try:
            cleanup.callback(StoreLock(cfg.out).release)
        except BaseException:
            ranks.broadcast([0, 0])
            raise
        run_id = secrets.randbits(62)
    locked, run_id = ranks.broadcast([1, run_id])
    if not locked:
        raise SetupAborted("process 0 could not lock the store (see its messages)")
    start = time.perf_counter()
    failure: BaseException | None = None
    try:
        probes, counts, stamps = header_pass(rows, ranks, cfg.out, run_id)
        plan = build_plan(rows, probes, cfg, settings["transformer"]["patch_size_t"], stamps)
    except BaseException as e:  # every process must reach the vote below, or the others hang
        failure = e
    if ranks.sum([int(failure is not None)])[0]:
        if isinstance(failure, HeaderPassError):
            raise SetupAborted(str(failure)) from failure
        if failure is not None:
            raise failure
        raise SetupAborted("another process could not probe or plan (see its messages)")
    if not ranks.is_main:
        if not ranks.broadcast([0])[0]:
            raise SetupAborted("process 0 could not create or open the store (see its messages)")
        plan = merge(stored_plan(cfg.out), plan, cfg.vae_mini_batch)  # the store process 0 grew
        writer = open_for_write(
            cfg.out, settings=settings, attrs=attrs, plan=plan.store, layout=layout, create=False
        )
        return plan, writer
    try:
        plan = merge(stored_plan(cfg.out, settings), plan, cfg.vae_mini_batch)
        log.info(
            "planned %d samples in %d buckets (%d chunks), %d captions; %d inputs failed; "
            "header pass and plan %.1f s (this process: %d headers probed, %d from the cache)",
            len(plan.samples),
            len(plan.store.buckets),
            len(plan.chunks),
            len(plan.store.captions),
            len(plan.failures),
            time.perf_counter() - start,
            counts.probed,
            counts.cached,
        )
        writer = open_for_write(
            cfg.out,
            settings=settings,
            attrs=attrs,
            plan=plan.store,
            layout=layout,
            create=True,
            shard_samples=shard_size(cfg.shard_samples, cfg.vae_mini_batch),
        )
        save_probes(cfg.out, probes)
        prune(probe_dir(cfg.out), ranks.world)
        _warn_on_thread_change(writer, cfg.out, attrs["threads"])
        _log_update(writer, cfg.out)
        clear_failures(cfg.out)  # this run records afresh what it cannot store
        for f in plan.failures:
            log.warning("skipped %s: %s", f.key, f.reason)
            writer.record_failure(f.key, f.file, f.reason, f.row)
    except BaseException:
        ranks.broadcast([0])
        raise
    ranks.broadcast([1])
    return plan, writer


def stored_plan(out: Path, settings: dict | None = None) -> StorePlan | None:
    """The rows an existing store holds (what an incremental plan is merged into), or None for
    a new store. With `settings`, None too when the store was written with other settings (then
    `open_for_write` refuses it, naming each difference) or by an older cogfun."""
    if not (out / "zarr.json").is_file():
        return None
    try:
        root = check_root(out)
    except StoreError:
        return None  # open_for_write says what is wrong with it
    if root["schema_version"] < 2 or (
        settings is not None and root["fingerprint"] != fingerprint(settings)
    ):
        return None
    return read_plan(out)


def _log_update(writer: StoreWriter, out: Path) -> None:
    update = writer.update
    if update is not None:  # this run grew the store to an edited dataset
        log.info(
            "updated %s to the dataset: %d samples added, %d reused, %d retired, %d restored",
            out,
            *(int(update.get(k, 0)) for k in ("added", "reused", "retired", "restored")),
        )


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
    latent_channels = _read_json(cfg.model / "vae" / "config.json").get("latent_channels", 16)
    check_servable(tconfig, latent_channels, cfg.model)
    vae_dtype = resolve_dtype(cfg.vae_dtype, ranks.device)
    text_dtype = resolve_dtype(cfg.text_encoder_dtype, ranks.device)
    settings = build_settings(cfg, vae_dtype, text_dtype, tconfig)
    layout = _layout(cfg, settings)
    attrs = _attrs(cfg, ranks, threads)
    plan, writer = _open_store(cfg, ranks, rows, settings, attrs, layout, cleanup)
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
    with ExitStack() as cleanup:
        ctx = _setup(cfg, cleanup)
        stats, encode_s = _encode(ctx, write_async)
        code, total, held = _finish(ctx, stats, started)
    return Outcome(code, total, encode_s, held)
