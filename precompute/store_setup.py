"""Precompute's store set-up: the settings that fingerprint the store, its attributes and layout,
and opening it on every process (`open_store_for_run`): probes, the plan, the incremental merge
(`cogfun.precompute.update`), creating or growing the store on process 0 while the others wait.

Part of `cogfun precompute` (see `cogfun.precompute.run`, which calls this).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import time
from contextlib import ExitStack
from importlib.metadata import version
from pathlib import Path

import torch
from cogfun.common.masks import IMAGE_MASK_PROBS, VIDEO_MASK_PROBS
from cogfun.common.model_kind import encoded_for
from cogfun.common.models import model_identity
from cogfun.common.modes import mode_facts
from cogfun.common.store import (
    Location,
    StoreError,
    StoreLayout,
    StoreLock,
    StorePlan,
    StoreWriter,
    check_root,
    clear_failures,
    fingerprint,
    location,
    open_for_write,
    read_plan,
    shard_size,
)
from cogfun.common.store.lock import LeaseWatch, token_from_ints, token_to_ints
from cogfun.config.store_paths import NOT_RECORDED
from cogfun.precompute.config import PrecomputeConfig
from cogfun.precompute.headers import HeaderPassError, header_pass, probe_dir, prune
from cogfun.precompute.metadata import Row
from cogfun.precompute.pipeline import TEXT_BATCH
from cogfun.precompute.plan import Plan, build_plan, file_sha256, masks_per_sample, save_probes
from cogfun.precompute.ranks import Ranks
from cogfun.precompute.update import merge

log = logging.getLogger("cogfun.precompute")

# Bump when the encoding algorithm changes stored bytes for the same settings.
PIPELINE_VERSION = 1


class SetupAborted(Exception):
    """Process 0 could not plan or open the store; the other processes stop too."""


def read_json(path: Path) -> dict:
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
    vae_config = read_json(cfg.model / "vae" / "config.json")

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


def store_attrs(cfg: PrecomputeConfig, ranks: Ranks, threads: int) -> dict:
    """The store's `attrs`: the resolved config (less `--storage-options`, which may hold
    secrets), the dataset's hash, versions and where it ran."""
    config = {
        k: str(v) if isinstance(v, Path) else v
        for k, v in dataclasses.asdict(cfg).items()
        if k not in NOT_RECORDED
    }
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


def store_layout(cfg: PrecomputeConfig, settings: dict) -> StoreLayout:
    text_config = read_json(cfg.model / "text_encoder" / "config.json")
    return StoreLayout(
        latent_channels=int(settings["vae"]["latent_channels"]),
        latent_format=cfg.latent_format,
        masks_per_sample=masks_per_sample(cfg),
        text_len=cfg.tokenizer_max_length,
        text_dim=int(text_config["d_model"]),
    )


def _warn_on_thread_change(writer: StoreWriter, out: str | Path, threads: int) -> None:
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


def open_store_for_run(
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
    lock = None
    token = [0] * 4  # the lease's token on an object store, for the other processes' checks
    if ranks.is_main:
        try:
            lock = StoreLock(cfg.out)
            cleanup.callback(lock.release)
        except BaseException:
            ranks.broadcast([0, 0, *token])
            raise
        run_id = secrets.randbits(62)
        if lock.token is not None:
            token = token_to_ints(lock.token)
    locked, run_id, *token = ranks.broadcast([1, run_id, *token])
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
        if any(token):  # a lease: a takeover stops this process's seals too
            writer.guard = LeaseWatch(cfg.out, token_from_ints(token)).check
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
        writer.guard = lock.check  # a lease lost on an object store stops seals and finalize
        save_probes(cfg.out, probes)
        prune(probe_dir(location(cfg.out)), ranks.world)
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


def stored_plan(out: str | Path | Location, settings: dict | None = None) -> StorePlan | None:
    """The rows an existing store holds (what an incremental plan is merged into), or None for
    a new store. With `settings`, None too when the store was written with other settings (then
    `open_for_write` refuses it, naming each difference) or by an older cogfun."""
    if not (location(out) / "zarr.json").is_file():
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


def _log_update(writer: StoreWriter, out: str | Path) -> None:
    update = writer.update
    if update is not None:  # this run grew the store to an edited dataset
        log.info(
            "updated %s to the dataset: %d samples added, %d reused, %d retired, %d restored",
            out,
            *(int(update.get(k, 0)) for k in ("added", "reused", "retired", "restored")),
        )
