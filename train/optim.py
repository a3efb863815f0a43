"""Trainable parameters, optimizer, LR schedule and the original's adaptive gradient clipping.

As the original's scripts/train.py: parameters are picked by substring of their names
(`trainable_modules`, and `trainable_modules_low_learning_rate` at half the learning rate); AdamW
or CAME with the original's settings; diffusers LR schedules with warmup counted in optimizer
steps; the clip norm decays linearly from `max_grad_norm * initial_grad_norm_ratio` to
`max_grad_norm` and clips abnormal norms harder.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# CAME as the original's scripts/train.py builds it: weight decay is not passed (CAME's default 0).
CAME_BETAS = (0.9, 0.999, 0.9999)
CAME_EPS = (1e-30, 1e-16)


class TrainableModulesError(ValueError):
    """The trainable-module substrings select no parameter."""


def select_trainable(
    model: nn.Module, trainable: Sequence[str], low_lr: Sequence[str], lr: float
) -> list[dict[str, Any]]:
    """Freeze `model`, unfreeze parameters whose name contains a substring, return param groups.

    As the original: group 0 (lr) takes names matching `trainable` first, group 1 (lr/2) names
    matching only `low_lr`; "." matches every name. Empty groups are dropped.
    """
    model.requires_grad_(False)
    full: list[nn.Parameter] = []
    half: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if any(s in name for s in trainable):
            full.append(param)
        elif any(s in name for s in low_lr):
            half.append(param)
        else:
            continue
        param.requires_grad_(True)
    if not full and not half:
        raise TrainableModulesError(
            f"--trainable-modules {list(trainable)} and --trainable-modules-low-learning-rate "
            f"{list(low_lr)} match no parameter name of the transformer (they are substrings of "
            "names such as 'transformer_blocks.0.attn1.to_q.weight'; '.' matches all)"
        )
    groups = [
        {"params": params, "lr": group_lr}
        for params, group_lr in ((full, lr), (half, lr / 2))
        if params
    ]
    log.info(
        "trainable parameters: %d tensors (%d values) at lr %g, %d tensors at lr %g",
        len(full),
        sum(p.numel() for p in full),
        lr,
        len(half),
        lr / 2,
    )
    return groups


def make_optimizer(
    groups: list[dict[str, Any]],
    *,
    use_came: bool,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float,
    use_8bit_adam: bool = False,
    cpu_offload: bool = False,
) -> torch.optim.Optimizer:
    """AdamW(lr, betas, weight_decay, eps) or CAME(lr, betas 0.9/0.999/0.9999, eps 1e-30/1e-16).

    `use_8bit_adam`: bitsandbytes' AdamW8bit with the same settings, as the original builds it (its
    moments are block-wise quantized to 8 bits: about 2 bytes per parameter instead of 8).
    `cpu_offload` (DeepSpeed keeps the optimizer state on the CPU): DeepSpeed's CPU Adam in AdamW
    mode, the optimizer DeepSpeed's offload expects (a torch optimizer there is refused by DeepSpeed
    and would step billions of values through Python-level loops). Conflicting choices are refused
    earlier, by `cogfun.train.memory_checks`.
    """
    if use_came:
        from came_pytorch import CAME

        return CAME(groups, lr=lr, betas=CAME_BETAS, eps=CAME_EPS)
    if use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(
            groups, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, adamw_mode=True
        )
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)


def make_lr_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    num_processes: int,
) -> torch.optim.lr_scheduler.LRScheduler:
    """A diffusers schedule whose warmup and length are counted in optimizer steps.

    accelerate's AcceleratedScheduler steps the wrapped schedule once per process on every optimizer
    step, so both lengths are multiplied by the number of processes, as the original does (§9.2).
    """
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        name,
        optimizer=optimizer,
        num_warmup_steps=warmup_steps * num_processes,
        num_training_steps=total_steps * num_processes,
    )


def linear_decay(initial: float, final: float, total_steps: int, step: int) -> float:
    """`initial` at step 0 falling linearly to `final` at `total_steps`, then `final`."""
    if step >= total_steps:
        return final
    return initial + (final - initial) / total_steps * max(0, step)


def adaptive_clip_norm(
    grad_norm: float,
    step: int,
    *,
    max_grad_norm: float,
    initial_ratio: float,
    abnormal_start: int,
) -> float:
    """The original's clip value (scripts/train.py); `step` = optimizer steps done before this one.

    The base decays from `max_grad_norm * initial_ratio` to `max_grad_norm` over `abnormal_start`
    steps; after that a norm more than 5x the base clips to base / min(norm / base, 10).
    """
    base = linear_decay(max_grad_norm * initial_ratio, max_grad_norm, abnormal_start, step)
    ratio = grad_norm / base
    if ratio > 5 and step > abnormal_start:
        return base / min(ratio, 10.0)
    return base


def clip_schedule(schedule: str, deepspeed: bool) -> str:
    """`auto` is the original's choice: adaptive without DeepSpeed, fixed under it."""
    if schedule == "auto":
        return "fixed" if deepspeed else "adaptive"
    return schedule


def clip_norm_for(
    schedule: str,
    grad_norm: float,
    step: int,
    *,
    max_grad_norm: float,
    initial_ratio: float,
    abnormal_start: int,
) -> float:
    """The clip value for this step under a resolved schedule ("adaptive" or "fixed")."""
    if schedule == "fixed":
        return max_grad_norm
    return adaptive_clip_norm(
        grad_norm,
        step,
        max_grad_norm=max_grad_norm,
        initial_ratio=initial_ratio,
        abnormal_start=abnormal_start,
    )
