"""Building a run: accelerator, transformer, optimizer, data, and the resume from a checkpoint.

Only the transformer and the scheduler config are loaded from the model folder for training: the
store holds the VAE and T5 outputs (validation alone uses them: `cogfun.train.validation`).
Refusals come first (`preflight`), before anything heavy.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Protocol

import torch
from cogfun.common.model_kind import read_transformer_config
from cogfun.common.models import check_model_folder
from cogfun.common.store import open_store
from cogfun.train import distributed, lora_train, memory_checks, optim
from cogfun.train.checkpoint import (
    CheckpointError,
    find_resume,
    load_checkpoint,
    read_trainer_state,
    remove_stale,
    resolved_config,
)
from cogfun.train.config import TrainConfig
from cogfun.train.loop import CaptionEmbeddings, ModelParts, TrainData, Trainer
from cogfun.train.metrics import start_trackers
from cogfun.train.picks import VariantPicker
from cogfun.train.preflight import (
    TrainRefused,
    check_config,
    check_store,
    input_channels,
)
from cogfun.train.resolve import resolve_mode
from cogfun.train.state import TrainingState
from cogfun.train.stores import (
    check_mix,
    check_stores_agree,
    mix_record,
    parse_latents,
    run_tile_factors,
    store_cache,
)
from cogfun.train.validation import prepare_validation
from diffusers.utils.logging import disable_progress_bar

log = logging.getLogger(__name__)

# Options whose change between a checkpoint and its resumption does not change what is computed.
_RESUME_FREE = {
    "resume_from_checkpoint",
    "max_train_steps",
    "num_train_epochs",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "dataloader_num_workers",
    "dataloader_backend",
    "progress",
    "report_to",
    "logging_dir",
    "tracker_project_name",
    "output_dir",
    "cache_dir",
    "cache_max_gb",
    "skip_damaged",
    "save_dtype",
    # validation samples with explicit generators and leaves the weights and optimizer untouched
    "validation_prompts",
    "validation_paths",
    "validation_steps",
    "validation_epochs",
    "validation_num_frames",
    "validation_height",
    "validation_width",
    "validation_inference_steps",
}


def load_model(cfg: TrainConfig, in_channels: int | None) -> torch.nn.Module:
    """The transformer in fp32 (master weights), plus --transformer-path weights over it."""
    from cogfun.common.models import load_transformer

    model = load_transformer(cfg.model, dtype=torch.float32, in_channels=in_channels)
    if cfg.transformer_path is not None:
        load_extra_weights(model, cfg.transformer_path)
    if cfg.lora:
        lora_train.add_adapters(cfg, model)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    return model


def load_extra_weights(model: torch.nn.Module, path: Path) -> None:
    """Non-strict load of a safetensors state dict; keys the model lacks are refused."""
    from safetensors.torch import load_file

    if path.suffix != ".safetensors" or not path.is_file():
        raise TrainRefused(
            f"--transformer-path {path}: expected an existing .safetensors file (pickled "
            "checkpoints are not loaded)"
        )
    state = load_file(path)
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise TrainRefused(
            f"--transformer-path {path}: {len(unexpected)} key(s) the transformer does not have, "
            f"e.g. {', '.join(unexpected[:5])}"
        )
    wrong = [k for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        raise TrainRefused(
            f"--transformer-path {path}: shape mismatch for {', '.join(wrong[:5])} "
            f"(e.g. {tuple(state[wrong[0]].shape)} vs {tuple(expected[wrong[0]].shape)})"
        )
    missing = model.load_state_dict(state, strict=False).missing_keys
    log.info("loaded %d tensors from %s (%d keep their values)", len(state), path, len(missing))


def total_steps(cfg: TrainConfig, batches_per_epoch: int, accumulation: int) -> int:
    if cfg.max_train_steps is not None:
        return cfg.max_train_steps
    return max(1, math.ceil(cfg.num_train_epochs * batches_per_epoch / accumulation))


def warn_config_changes(saved: dict[str, Any], now: dict[str, Any], checkpoint: Path) -> None:
    """Warn (naming each) about options that changed what is computed since `checkpoint`."""
    if isinstance(saved.get("latents"), str):  # written when --latents took one store
        saved = {**saved, "latents": [saved["latents"]]}
    changed = {
        k: (saved.get(k), v) for k, v in now.items() if k not in _RESUME_FREE and saved.get(k) != v
    }
    if changed:
        text = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
        log.warning("resuming %s with changed options (%s): not an exact resume", checkpoint, text)


def _optimization(
    cfg: TrainConfig, model: torch.nn.Module, world: int, cpu_offload: bool = False
) -> tuple[list, Any, Any]:
    """(trainable params, optimizer, EMA or None) over the fp32 master weights."""
    lr = cfg.learning_rate
    if cfg.scale_lr:
        lr *= cfg.gradient_accumulation_steps * cfg.train_batch_size * world
    trainable = lora_train.TRAINABLE if cfg.lora else cfg.trainable_modules
    groups = optim.select_trainable(model, trainable, cfg.trainable_modules_low_learning_rate, lr)
    optimizer = optim.make_optimizer(
        groups,
        use_came=cfg.use_came,
        lr=lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
        use_8bit_adam=cfg.use_8bit_adam,
        cpu_offload=cpu_offload,
    )
    ema = None
    if cfg.use_ema and cfg.lora:
        ema = lora_train.make_ema(model)
    elif cfg.use_ema:
        from diffusers import CogVideoXTransformer3DModel
        from diffusers.training_utils import EMAModel

        # Built before `prepare`, so its shadow copy stays fp32 even when DeepSpeed casts the model.
        ema = EMAModel(
            model.parameters(), model_cls=CogVideoXTransformer3DModel, model_config=model.config
        )
    return [p for g in groups for p in g["params"]], optimizer, ema


def _clip_schedule(cfg: TrainConfig, deepspeed: bool) -> str:
    if cfg.use_deepspeed and not deepspeed:
        log.warning(
            "--use-deepspeed is given but accelerate did not set up DeepSpeed (launch with "
            "`accelerate launch --use_deepspeed --deepspeed_config_file ...`): training without it"
        )
    schedule = optim.clip_schedule(cfg.grad_clip_schedule, deepspeed)
    if deepspeed and schedule == "adaptive":
        log.warning("--grad-clip-schedule adaptive is not available under DeepSpeed: fixed")
        return "fixed"
    return schedule


class StoreSource(Protocol):
    """Where the store at --latents comes from when `cogfun train` is given precompute's options.

    Building a store is precompute's work, so training does not import it: the app layer, where
    the stages meet, hands one in (`cogfun.app.store_build.StoreOptions`). `check` refuses the
    options before anything is read; `ensure` reuses or builds the store once the mode is known."""

    def check(self, cfg: TrainConfig) -> None: ...

    def ensure(self, cfg: TrainConfig) -> None: ...


def setup(cfg: TrainConfig, store: StoreSource | None = None) -> Trainer:
    """Everything `fit` needs; refusals come before anything heavy is loaded. `store` is given
    when train was handed precompute's options: with --data the store is found or built first."""
    from cogfun.common.models import load_scheduler
    from cogfun.train.data import make_dataloader

    check_config(cfg)
    lora_train.check_config(cfg)
    memory_checks.check(cfg, distributed.launch_plan())
    if store is not None:
        store.check(cfg)
    specs = parse_latents(cfg.latents)
    disable_progress_bar()  # diffusers' per-save "Writing model shards" bars
    model_dir = check_model_folder(cfg.model, ["transformer", "scheduler"])
    tconfig = read_transformer_config(
        model_dir, "training reads the transformer's layout (channels, patches) from it"
    )
    cfg = resolve_mode(cfg, tconfig, model_dir)
    if store is not None:
        store.ensure(cfg)
    cache = store_cache(cfg, specs)  # --cache-dir: reads of object-store stores kept locally
    stores = [open_store(spec.path, **cache) for spec in specs]
    for each in stores:
        check_store(each, tconfig, cfg.mode, model_dir)
    check_stores_agree(stores)
    store = stores[0]  # what the stores agree on (layout, scaling, empty caption) is read here
    cfg, tiles = run_tile_factors(cfg, stores)
    resume = find_resume(cfg.output_dir, cfg.resume_from_checkpoint)

    acc = distributed.make_accelerator(
        output_dir=cfg.output_dir,
        logging_dir=cfg.logging_dir,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        report_to=cfg.report_to,
    )
    log.info("accelerate: %s", distributed.describe(acc))
    if acc.is_main_process:
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale(cfg.output_dir)
    acc.wait_for_everyone()
    if cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    validation = prepare_validation(cfg, acc, model_dir, tconfig)  # T5, if any, is gone after this
    torch.manual_seed(cfg.seed)

    need = input_channels(store.layout.latent_channels, cfg.mode)
    model = load_model(cfg, need if need != tconfig.get("in_channels") else None)
    params, optimizer, ema = _optimization(
        cfg, model, acc.num_processes, distributed.offloads_optimizer(acc)
    )
    loader, sampler = make_dataloader(
        [(spec.path, spec.weight) for spec in specs],
        cfg.train_batch_size,
        cfg.dataloader_num_workers,
        cfg.seed,
        acc.process_index,
        acc.num_processes,
        skip_damaged=cfg.skip_damaged,
        backend=cfg.dataloader_backend,
        picker=VariantPicker.for_run(cfg, acc, store.layout, tiles),
        cache=cache,
    )
    max_steps = total_steps(cfg, len(sampler), acc.gradient_accumulation_steps)
    lr_scheduler = optim.make_lr_scheduler(
        cfg.lr_scheduler,
        optimizer,
        warmup_steps=cfg.lr_warmup_steps,
        total_steps=max_steps,
        num_processes=acc.num_processes,
    )
    deepspeed = distributed.is_deepspeed(acc)
    schedule = _clip_schedule(cfg, deepspeed)
    distributed.configure_deepspeed(acc, max_grad_norm=cfg.max_grad_norm, use_came=cfg.use_came)
    model, optimizer, lr_scheduler = distributed.prepare(acc, model, optimizer, lr_scheduler)
    if deepspeed:
        log.info("DeepSpeed gradient clipping: %s", distributed.engine_gradient_clipping(acc))
    if ema is not None:
        ema.to(acc.device)

    parts = ModelParts(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        noise_scheduler=load_scheduler(model_dir),
        ema=ema,
        params=params,
        clip_schedule=schedule,
    )
    data = TrainData(
        loader=loader,
        sampler=sampler,
        captions=CaptionEmbeddings(store, acc.device),
        scaling=store.scaling_factor,
        latent_format=store.layout.latent_format,
        tiles=tiles,
        stores=mix_record(specs, stores),
    )
    state = TrainingState(
        world_size=acc.num_processes, batches_per_epoch=len(sampler), order=sampler.order()
    )
    if resume is not None:
        check_mix(read_trainer_state(resume).get("stores"), data.stores, resume)
        _resume(acc, resume, parts, state, cfg, store.fingerprint)
    trainer = Trainer(
        config=cfg,
        accelerator=acc,
        parts=parts,
        data=data,
        state=state,
        max_steps=max_steps,
        resumed=resume is not None,
        validation=validation,
    )
    start_trackers(acc, cfg.tracker_project_name, resolved_config(cfg))
    named = [
        f"{s.path}:{spec.weight}" if spec.weight > 1 else str(s.path)
        for spec, s in zip(specs, stores, strict=True)
    ]
    _log_plan(trainer, " ".join(named))
    return trainer


def _log_plan(t: Trainer, stores: str) -> None:
    cfg, acc = t.config, t.accelerator
    if t.state.global_step >= t.max_steps:
        log.info("already at step %d of %d: nothing to train", t.state.global_step, t.max_steps)
        return
    tiled = sorted({k for k in t.data.tiles.values() if k > 1})
    log.info(
        "training %s (--mode %s) on %s (%d samples, %d batches per process per epoch): steps "
        "%d..%d, %d process(es) x batch %d x accumulation %d; batch tiling %s",
        cfg.model,
        cfg.mode,
        stores,
        t.data.sampler.num_samples,
        len(t.data.sampler),
        t.state.global_step + 1,
        t.max_steps,
        acc.num_processes,
        cfg.train_batch_size,
        acc.gradient_accumulation_steps,
        (
            f"on (x{'/x'.join(map(str, tiled))} for small buckets)"
            if tiled
            else "on (no bucket is small enough)"
        )
        if cfg.auto_tile_batch_size
        else "off",
    )


def _resume(
    acc: Any,
    checkpoint: Path,
    parts: ModelParts,
    state: TrainingState,
    cfg: TrainConfig,
    fingerprint: str,
) -> None:
    """Weights, optimizer, scheduler (and EMA) and `state` from `checkpoint`."""
    log.info("resuming from %s", checkpoint)
    saved = read_trainer_state(checkpoint)
    if saved.get("world_size") != acc.num_processes:
        raise CheckpointError(
            f"{checkpoint} was written by {saved.get('world_size')} process(es); this run has "
            f"{acc.num_processes}: resume with the same number of processes"
        )
    load_checkpoint(acc, checkpoint, parts.model, parts.ema)
    try:
        state.load_state_dict(saved)
    except ValueError as err:
        raise CheckpointError(f"{checkpoint}: {err}") from err
    if saved.get("store_fingerprint") != fingerprint:
        log.warning("%s was trained on a store with another fingerprint", checkpoint)
    warn_config_changes(saved.get("config", {}), resolved_config(cfg), checkpoint)
