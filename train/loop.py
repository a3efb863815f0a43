"""The training loop: `fit` runs optimizer steps, `train_step` runs one micro-step.

Every micro-step draws its randomness (posterior samples, mask variant, text-to-video zeroing, caption
dropout, noise, timesteps) from a fresh `torch.Generator` seeded from (seed, rank, global step,
micro-step). So a resumed run redraws exactly what the uninterrupted run drew, with no RNG stream to
save; the data position (epoch, batches done) and the weights/optimizer come from the checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from cogfun.common.progress import progress
from cogfun.train import distributed, optim
from cogfun.train.checkpoint import TrainerState, save_checkpoint
from cogfun.train.config import TrainConfig
from cogfun.train.data import BucketBatchSampler
from cogfun.train.loss import compute_loss, prepare_batch
from cogfun.train.metrics import LOSS_PLOT, MetricsLog, plot_loss
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from torch import Tensor, nn
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)

# REFERENCE §4.1: batches of at most these many pixels (F*H*W) are repeated x4 / x2.
TILE_X4_PIXELS = 49 * 512 * 512 // 16
TILE_X2_PIXELS = 49 * 512 * 512 // 4


def step_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """The seed of one micro-step's generator: independent across ranks, steps and micro-steps."""
    digest = hashlib.sha256(f"cogfun-train:{seed}:{rank}:{step}:{micro}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: manual_seed's safe range


def tile_factor(frames: int, height: int, width: int) -> int:
    """VideoX-Fun's --auto_tile_batch_size: x4 for small pixel volumes, x2 for medium, else x1."""
    pixels = frames * height * width
    if pixels <= TILE_X4_PIXELS:
        return 4
    if pixels <= TILE_X2_PIXELS:
        return 2
    return 1


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


@dataclass
class Trainer:
    """Everything `fit` needs, built by `cogfun.train.setup.setup`."""

    config: TrainConfig
    accelerator: Accelerator
    model: nn.Module  # prepared: DDP / DeepSpeed engine / plain
    optimizer: Any  # accelerate's wrapper
    lr_scheduler: Any  # accelerate's AcceleratedScheduler
    noise_scheduler: DDPMScheduler
    ema: EMAModel | None
    loader: DataLoader
    sampler: BucketBatchSampler
    captions: Callable[[Tensor], Tensor]
    scaling: float
    latent_format: str
    bucket_pixels: dict[str, tuple[int, int, int]]  # bucket -> (frames, height, width)
    params: list[nn.Parameter]
    clip_schedule: str  # "adaptive" or "fixed" (resolved)
    max_steps: int
    output_dir: Path
    state: TrainerState = field(default_factory=TrainerState)
    extra_state: Callable[[], dict[str, Any]] = dict
    config_dict: dict[str, Any] = field(default_factory=dict)
    resumed: bool = False


def batch_stream(t: Trainer) -> Iterator[dict[str, Any]]:
    """Store batches from the saved position on, across epochs, counting what is consumed."""
    t.sampler.set_position(t.state.epoch, t.state.batches_done)
    while True:
        for raw in t.loader:
            t.state.batches_done += 1
            if raw["latents"].shape[0] == 0:  # --skip-damaged dropped every sample of the batch
                continue
            yield raw
        t.state.epoch += 1
        t.state.batches_done = 0
        t.sampler.set_epoch(t.state.epoch)


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
    if cfg.auto_tile_batch_size:
        raw = tile_batch(raw, tile_factor(*t.bucket_pixels[raw["bucket"]]))
    batch_size = int(raw["latents"].shape[0])
    grad_norm = None
    with acc.accumulate(t.model):
        batch = prepare_batch(
            raw,
            t.captions,
            cfg.mode,
            t.scaling,
            generator,
            latent_format=t.latent_format,
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
            t.model,
            batch,
            t.noise_scheduler,
            timesteps=timesteps,
            generator=generator,
            motion_sub_loss=cfg.motion_sub_loss,
            motion_sub_loss_ratio=cfg.motion_sub_loss_ratio,
            num_train_timesteps=cfg.train_sampling_steps,
        )
        acc.backward(out.loss)
        if acc.sync_gradients:
            grad_norm = distributed.clip_gradients(acc, t.params, _clip_for(t))
        t.optimizer.step()
        t.lr_scheduler.step()
        t.optimizer.zero_grad(set_to_none=True)
        if acc.sync_gradients and distributed.is_deepspeed(acc):
            grad_norm = distributed.deepspeed_grad_norm(acc)
    return out.loss.detach(), grad_norm, batch_size


def _clip_for(t: Trainer) -> Callable[[float], float]:
    cfg = t.config
    return lambda norm: optim.clip_norm_for(
        t.clip_schedule,
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
    lr = float(t.lr_scheduler.get_last_lr()[0])  # the rate this step's update uses
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
    if t.ema is not None:
        t.ema.step(distributed.unwrap(acc, t.model).parameters())
    t.state.global_step += 1
    loss = distributed.mean_across_ranks(acc, torch.stack(losses).float().mean())
    rank_samples = distributed.gather_ints(acc, samples)
    elapsed = time.perf_counter() - start
    return {
        "step": t.state.global_step,
        "epoch": t.state.epoch,
        "loss": loss,
        "lr": lr,
        "grad_norm": None if grad_norm is None or math.isnan(grad_norm) else grad_norm,
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
        output_dir=t.output_dir,
        model=t.model,
        ema=t.ema,
        state=t.state,
        config=t.config_dict,
        extra=t.extra_state(),
        total_limit=t.config.checkpoints_total_limit,
    )


def fit(t: Trainer) -> None:
    """Optimizer steps until `max_steps`, a checkpoint every `checkpointing_steps` and at the end."""
    acc, cfg = t.accelerator, t.config
    metrics = MetricsLog(acc, t.output_dir, t.state.global_step)
    saved_at = t.state.global_step if t.resumed else None
    stream = batch_stream(t)
    mode = cfg.progress if acc.is_main_process else "none"
    rank_samples = 0
    try:
        with progress(t.max_steps - t.state.global_step, "train", mode=mode, unit="steps") as bar:
            while t.state.global_step < t.max_steps:
                row = optimizer_step(t, stream)
                rank_samples += row["rank_samples"][acc.process_index]
                metrics.write(row)
                bar.advance(
                    1,
                    step=row["step"],
                    loss=f"{row['loss']:.4f}",
                    lr=f"{row['lr']:.3g}",
                    samples_s=f"{row['samples_per_s']:.2f}",
                    wait_s=f"{row['data_wait_s']:.3f}",
                )
                if row["step"] % cfg.checkpointing_steps == 0:
                    _save(t)
                    saved_at = row["step"]
        if saved_at != t.state.global_step:
            _save(t)
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
        plot = plot_loss(metrics.path, t.output_dir / LOSS_PLOT)
        if plot is not None:
            log.info("wrote %s", plot)
    acc.end_training()
