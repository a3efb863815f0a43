"""The training loop: `fit` runs optimizer steps, `train_step` runs one micro-step.

Every micro-step draws its randomness (posterior samples, mask variant, text-to-video zeroing, caption
dropout, noise, timesteps) from a fresh `torch.Generator` seeded from (seed, rank, global step,
micro-step). So a resumed run redraws exactly what the uninterrupted run drew, with no RNG stream to
save; the step and data position (`Trainer.state`, a `cogfun.train.state.TrainingState`) and the
weights/optimizer come from the checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from cogfun.common.progress import progress
from cogfun.train import distributed, optim
from cogfun.train.checkpoint import resolved_config, save_checkpoint
from cogfun.train.config import TrainConfig
from cogfun.train.data import BucketBatchSampler
from cogfun.train.divergence import DivergenceGuard, TrainingDiverged, finite, skip_update
from cogfun.train.loss import compute_loss, prepare_batch
from cogfun.train.metrics import LOSS_PLOT, MetricsLog, plot_loss
from cogfun.train.picks import step_seed
from cogfun.train.prefetch import EpochPasses
from cogfun.train.state import TrainingState
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from torch import Tensor, nn

log = logging.getLogger(__name__)


def tile_batch(raw: dict[str, Any], k: int) -> dict[str, Any]:
    """Repeat a store batch k times along the batch dim ([x1..xB, x1..xB, ...], like torch.tile).

    The copies are repeated before any draw, so each gets its own posterior sample, variant, flags,
    caption dropout, noise and timestep.
    """
    if k == 1:
        return raw
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, Tensor):
            out[key] = torch.cat([value] * k, dim=0)
        elif isinstance(value, list):
            out[key] = value * k
        else:
            out[key] = value
    return out


class CaptionEmbeddings:
    """Caption index (B,) -> text states (B, L, D) read from the store, with a small LRU cache.

    The empty caption (index 0, used by caption dropout) is the most frequent entry and stays cached.
    """

    def __init__(self, store: Any, device: torch.device, capacity: int = 256) -> None:
        self.store = store
        self.device = device
        self.capacity = capacity
        self._cache: OrderedDict[int, Tensor] = OrderedDict()

    def _one(self, index: int) -> Tensor:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        value = self.store.caption_embedding(index).to(self.device)  # (L, D) bf16
        self._cache[index] = value
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return value

    def __call__(self, caption: Tensor) -> Tensor:
        return torch.stack([self._one(int(i)) for i in caption.tolist()])  # (B, L, D)


@dataclass(frozen=True)
class ModelParts:
    """The trained transformer and what updates it."""

    model: nn.Module  # prepared: DDP / DeepSpeed engine / plain
    optimizer: Any  # accelerate's wrapper
    lr_scheduler: Any  # accelerate's AcceleratedScheduler
    noise_scheduler: DDPMScheduler
    ema: EMAModel | None
    params: list[nn.Parameter]  # the trained ones: clipped, stepped, averaged
    clip_schedule: str  # "adaptive" or "fixed" (resolved)


@dataclass(frozen=True)
class TrainData:
    """The store batches and what a step needs to turn one into a loss batch."""

    loader: EpochPasses  # ThreadLoader or EpochLoader over `sampler`
    sampler: BucketBatchSampler
    captions: Callable[[Tensor], Tensor]
    scaling: float
    latent_format: str
    tiles: dict[str, int]  # bucket -> batch tiling factor (1: not tiled); see resolve.tile_factors
    stores: list[dict[str, Any]]  # path, weight, fingerprint of each store, in --latents order

    def checkpoint_entries(self) -> dict[str, Any]:
        """What trainer_state.json records of the stores (several: `stores` too)."""
        first = self.stores[0]
        several = {"stores": self.stores} if len(self.stores) > 1 else {}
        return {"store": first["path"], "store_fingerprint": first["fingerprint"], **several}


@dataclass(frozen=True)
class Trainer:
    """Everything `fit` needs, built complete by `cogfun.train.setup.setup` (a resumed run's
    weights and `state` are already the checkpoint's)."""

    config: TrainConfig
    accelerator: Accelerator
    parts: ModelParts
    data: TrainData
    state: TrainingState
    max_steps: int
    resumed: bool = False  # started from a checkpoint, which holds `state.global_step` already
    validation: Any = None  # cogfun.train.validation.Validation when --validation-prompts is given

    @property
    def model(self) -> nn.Module:
        return self.parts.model

    @property
    def params(self) -> list[nn.Parameter]:
        return self.parts.params


def batch_stream(t: Trainer) -> Iterator[dict[str, Any]]:
    """Store batches from the state's position on, across epochs (`t.state` counts them).

    `fit` starts it at a step boundary, so the n-th batch it yields is micro-step n % accumulation.
    The loader read each batch's mask variants for that position (`cogfun.train.picks`); a batch
    that --skip-damaged emptied trains at no position, so the stream is followed again from the
    next batch's (the loader rereads what it read ahead for positions one later)."""
    accumulation, handed = t.accelerator.gradient_accumulation_steps, 0
    while True:
        for raw in t.data.loader.follow(t.state, micro=handed % accumulation):
            if raw["latents"].shape[0] == 0:  # --skip-damaged dropped every sample of the batch
                break
            handed += 1
            yield raw


def _to_device(raw: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in raw.items()
    }


def _uniform_timesteps(
    n: int, steps: int, rank: int, world: int, generator: torch.Generator
) -> Tensor:
    """--uniform-sampling: rank r draws from its own slice [r*steps/world, (r+1)*steps/world)."""
    lo, hi = rank * steps // world, (rank + 1) * steps // world
    return torch.randint(lo, max(hi, lo + 1), (n,), generator=generator)


def train_step(t: Trainer, raw: dict[str, Any], micro: int) -> tuple[Tensor, float | None, int]:
    """One micro-step: loss, backward, and on the accumulation boundary clip + optimizer step.

    Returns (detached loss, pre-clip grad norm on a sync step else None, samples in the batch).
    """
    cfg, acc = t.config, t.accelerator
    generator = torch.Generator().manual_seed(
        step_seed(cfg.seed, acc.process_index, t.state.global_step, micro)
    )
    raw = _to_device(raw, acc.device)
    raw = tile_batch(raw, t.data.tiles.get(raw["bucket"], 1))
    batch_size = int(raw["latents"].shape[0])
    grad_norm = None
    parts = t.parts
    with acc.accumulate(parts.model):
        batch = prepare_batch(
            raw,
            t.data.captions,
            cfg.mode,
            t.data.scaling,
            generator,
            latent_format=t.data.latent_format,
            caption_dropout_p=cfg.caption_dropout,
        )
        timesteps = None
        if cfg.uniform_sampling:
            timesteps = _uniform_timesteps(
                batch_size,
                cfg.train_sampling_steps,
                acc.process_index,
                acc.num_processes,
                generator,
            )
        out = compute_loss(
            parts.model,
            batch,
            parts.noise_scheduler,
            timesteps=timesteps,
            generator=generator,
            motion_sub_loss=cfg.motion_sub_loss,
            motion_sub_loss_ratio=cfg.motion_sub_loss_ratio,
            num_train_timesteps=cfg.train_sampling_steps,
        )
        acc.backward(out.loss)
        if acc.sync_gradients:
            grad_norm = distributed.clip_gradients(acc, parts.params, _clip_for(t))
        if not skip_update(acc, grad_norm):  # a non-finite norm would poison the weights
            parts.optimizer.step()
            parts.lr_scheduler.step()
        parts.optimizer.zero_grad(set_to_none=True)
        if acc.sync_gradients and distributed.is_deepspeed(acc):
            grad_norm = distributed.deepspeed_grad_norm(acc)
    return out.loss.detach(), grad_norm, batch_size


def _clip_for(t: Trainer) -> Callable[[float], float]:
    cfg = t.config
    return lambda norm: optim.clip_norm_for(
        t.parts.clip_schedule,
        norm,
        t.state.global_step,
        max_grad_norm=cfg.max_grad_norm,
        initial_ratio=cfg.initial_grad_norm_ratio,
        abnormal_start=cfg.abnormal_norm_clip_start,
    )


def optimizer_step(t: Trainer, stream: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """Gradient-accumulation micro-steps up to one optimizer step; returns its metrics row."""
    acc = t.accelerator
    start = time.perf_counter()
    lr = float(t.parts.lr_scheduler.get_last_lr()[0])  # the rate this step's update uses
    clip = None if distributed.is_deepspeed(acc) else _clip_for(t)
    wait, losses, samples, grad_norm = 0.0, [], 0, None
    for micro in range(acc.gradient_accumulation_steps):
        t0 = time.perf_counter()
        raw = next(stream)
        wait += time.perf_counter() - t0
        loss, norm, n = train_step(t, raw, micro)
        losses.append(loss)
        samples += n
        grad_norm = norm if norm is not None else grad_norm
    if not acc.sync_gradients:
        raise RuntimeError("gradient accumulation fell out of step with the optimizer steps")
    if clip is None:
        clip_norm = distributed.engine_gradient_clipping(acc)
    else:
        clip_norm = clip(grad_norm) if grad_norm is not None else None
    if t.parts.ema is not None and finite(grad_norm):  # no EMA step for an update not applied
        t.parts.ema.step(distributed.unwrap(acc, t.parts.model).parameters())
    t.state.finished_step()
    loss = distributed.mean_across_ranks(acc, torch.stack(losses).float().mean())
    rank_samples = distributed.gather_ints(acc, samples)
    elapsed = time.perf_counter() - start
    return {
        "step": t.state.global_step,
        "epoch": t.state.epoch,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,  # NaN/inf kept: divergence.DivergenceGuard marks the row
        "clip_norm": clip_norm,
        "data_wait_s": round(wait, 6),
        "step_time_s": round(elapsed, 6),
        "samples": sum(rank_samples),
        "samples_per_s": sum(rank_samples) / elapsed if elapsed > 0 else None,
        "world_size": acc.num_processes,
        "rank_samples": rank_samples,
    }


def _save(t: Trainer) -> Path:
    return save_checkpoint(
        t.accelerator,
        output_dir=t.config.output_dir,
        model=t.parts.model,
        ema=t.parts.ema,
        state=t.state,
        config=resolved_config(t.config),
        extra=t.data.checkpoint_entries(),
        total_limit=t.config.checkpoints_total_limit,
        save_dtype=t.config.save_dtype,
    )


def validation_hook(t: Trainer, step: int, epoch_before: int) -> dict[str, Any]:
    """Run a validation round when one is due after this step (every rank calls this)."""
    from cogfun.train.validation import run_validation

    finished = set(range(epoch_before, t.state.epoch))
    if t.state.epoch_ended:  # this step took an epoch's last batch: not counted as finished yet
        finished.add(t.state.epoch)
    if not t.validation.due(step, finished):
        return {}
    return run_validation(t.validation, t.accelerator, t.parts.model, t.parts.ema, step)


def fit(t: Trainer) -> None:
    """Optimizer steps until `max_steps`, a checkpoint every `checkpointing_steps` and at the end."""
    acc, cfg = t.accelerator, t.config
    out = cfg.output_dir
    metrics = MetricsLog(acc, out, t.state.global_step)
    guard = DivergenceGuard.for_run(acc, cfg.max_nonfinite_steps, metrics.last_row)
    saved_at = t.state.global_step if t.resumed else None
    stream = batch_stream(t)
    mode = cfg.progress if acc.is_main_process else "none"
    rank_samples = 0
    try:
        with progress(t.max_steps - t.state.global_step, "train", mode=mode, unit="steps") as bar:
            while t.state.global_step < t.max_steps:
                epoch_before = t.state.epoch
                row = optimizer_step(t, stream)
                if t.validation is not None:
                    row.update(validation_hook(t, row["step"], epoch_before))
                rank_samples += row["rank_samples"][acc.process_index]
                guard.observe(row)
                metrics.write(row)
                bar.advance(
                    1,
                    step=row["step"],
                    loss=f"{row['loss']:.4f}",
                    lr=f"{row['lr']:.3g}",
                    samples_s=f"{row['samples_per_s']:.2f}",
                    wait_s=f"{row['data_wait_s']:.3f}",
                )
                if row["step"] % cfg.checkpointing_steps == 0 and guard.may_save(acc, t.params):
                    _save(t)
                    saved_at = row["step"]
                if guard.tripped:
                    break
        if saved_at != t.state.global_step and guard.may_save(acc, t.params):
            _save(t)
            saved_at = t.state.global_step
    finally:
        metrics.close()
    log.info(
        "rank %d of %d: %d samples in this run, at step %d",
        acc.process_index,
        acc.num_processes,
        rank_samples,
        t.state.global_step,
    )
    if acc.is_main_process:
        plot = plot_loss(metrics.path, out / LOSS_PLOT)
        if plot is not None:
            log.info("wrote %s", plot)
    acc.end_training()
    if guard.tripped:
        step = t.state.global_step
        raise TrainingDiverged(guard.stop_message(step, out, saved_at == step))
