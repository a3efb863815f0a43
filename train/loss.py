"""The Stage-2 training math: from a store batch to the CogVideoX-Fun loss (the original's
scripts/train.py training step; tests/golden/README.md section 3).

Two steps, each reproducible from one `torch.Generator` (the loop saves and restores its state):

1. `prepare_batch` turns what the store holds into model inputs. It draws, in this order: the
   posterior sample of the video latents, the mask variant, the posterior sample of that variant's
   masked-video latents, the text-to-video zeroing flags, and caption dropout.
2. `compute_loss` draws the noise and then the timesteps, builds the noisy latents and the
   velocity target with the DDPM schedule, runs the transformer and takes the mean squared error.

The DDPM schedule is diffusers' `DDPMScheduler` read from the model's scheduler config
(`common.schedulers.load_noise_scheduler`, re-exported here). The shipped config is a CogVideoXDDIM
one; DDPMScheduler ignores its `snr_shift_scale`, exactly as the original training does. Posterior
samples come from `common.posterior`, the function precompute's `--latent-format sample` uses. Draws
are float32 (the original draws noise in bf16).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from cogfun.common.modes import mode_facts
from cogfun.common.posterior import sample_posterior, standard_normal
from cogfun.common.schedulers import load_noise_scheduler  # noqa: F401 (re-export)
from cogfun.common.transformer import transformer_forward
from diffusers import DDPMScheduler
from torch import Tensor, nn


@dataclass
class LossOutput:
    loss: Tensor  # () float32
    model_pred: Tensor  # (B, F, 16, h, w)
    target: Tensor  # (B, F, 16, h, w) float32
    noisy_latents: Tensor  # (B, F, 16, h, w) float32
    timesteps: Tensor  # (B,) int64


def _rand(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform [0, 1) float32 of shape (n,), drawn on the generator's device."""
    where = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=where).to(device)


def pick_variants(all_masked: Tensor, generator: torch.Generator | None) -> Tensor:
    """One of the K stored mask variants per sample, uniformly: (B, K) -> LongTensor (B,)."""
    batch, k = all_masked.shape
    where = generator.device if generator is not None else all_masked.device
    picks = torch.randint(0, k, (batch,), generator=generator, device=where)
    return picks.to(all_masked.device)


def draw_t2v_flags(
    all_masked: Tensor, generator: torch.Generator | None, p_zero: float = 0.9
) -> Tensor:
    """Per-sample text-to-video zeroing (the original's t2v flag): (B,) bool -> (B,) float32 of 0/1.

    An all-masked sample loses its whole conditioning with probability `p_zero`; every other sample
    keeps flag 1. One uniform is drawn per sample, whether or not it is all-masked, so the number of
    draws never depends on the data.
    """
    u = _rand(all_masked.shape[0], generator, all_masked.device)
    return torch.where(all_masked.bool() & (u < p_zero), 0.0, 1.0)


def caption_dropout(
    caption_idx: Tensor,
    generator: torch.Generator | None,
    p: float = 0.1,
    empty_index: int = 0,
) -> Tensor:
    """Replace each caption by the empty caption with probability `p`: (B,) -> LongTensor (B,)."""
    u = _rand(caption_idx.shape[0], generator, caption_idx.device)
    return torch.where(u < p, torch.full_like(caption_idx, empty_index), caption_idx).long()


def build_inpaint_latents(
    mask_latent: Tensor,
    masked_latents: Tensor,
    t2v_flag: Tensor,
    scaling: float,
) -> Tensor:
    """The 17 conditioning channels: (B,F,1,h,w) + (B,F,16,h,w) unscaled + (B,) -> (B,F,17,h,w).

    Concatenate the mask (1 = known) and the masked-video latents, zero the samples whose flag is 0,
    then scale; the mask channel is scaled too, as in the original's scripts/train.py. The
    operation order is the original's, so float32 results match it exactly.
    """
    inpaint = torch.cat([mask_latent.float(), masked_latents.float()], dim=2)
    inpaint = inpaint * t2v_flag.float()[:, None, None, None, None]
    return inpaint * scaling


def _velocity(scheduler: DDPMScheduler, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    return scheduler.get_velocity(x0, noise, timesteps)


def _epsilon(scheduler: DDPMScheduler, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    return noise


# The original reads the target kind from the scheduler config's prediction_type (T L1588).
_TARGETS: dict[str, Callable[[DDPMScheduler, Tensor, Tensor, Tensor], Tensor]] = {
    "v_prediction": _velocity,
    "epsilon": _epsilon,
}


def motion_mse(model_pred: Tensor, target: Tensor) -> Tensor:
    """MSE between frame differences of prediction and target: (B, F, C, h, w) pair -> ()."""
    pred_diff = model_pred[:, 1:].float() - model_pred[:, :-1].float()
    target_diff = target[:, 1:].float() - target[:, :-1].float()
    return F.mse_loss(pred_diff, target_diff, reduction="mean")


def compute_loss(
    transformer: nn.Module,
    batch: dict[str, Tensor],
    scheduler: DDPMScheduler,
    *,
    noise: Tensor | None = None,
    timesteps: Tensor | None = None,
    generator: torch.Generator | None = None,
    motion_sub_loss: bool = False,
    motion_sub_loss_ratio: float = 0.25,
    num_train_timesteps: int | None = None,
) -> LossOutput:
    """One training step's loss (tests/golden/README.md section 3 pins it to the original's).

    `batch`: `latents` (B, F, 16, h, w) already scaled, `prompt_embeds` (B, L, D) and, for inpaint
    models, `inpaint_latents` (B, F, 17, h, w). Missing `noise` (float32 N(0, 1)) and `timesteps`
    (uniform integers in [0, num_train_timesteps)) are drawn from `generator`, noise first.
    The forward process and target are computed in float32; the loss is the mean over every element.
    """
    x0 = batch["latents"].float()  # (B, F, C, h, w)
    device = x0.device
    if noise is None:
        noise = standard_normal(x0.shape, generator, device)
    if timesteps is None:
        steps = num_train_timesteps or scheduler.config.num_train_timesteps
        where = generator.device if generator is not None else device
        timesteps = torch.randint(0, steps, (x0.shape[0],), generator=generator, device=where)
    noise = noise.float().to(device)
    timesteps = timesteps.long().to(device)

    kind = scheduler.config.prediction_type
    if kind not in _TARGETS:
        raise ValueError(
            f"scheduler prediction_type {kind!r} is not supported (use {sorted(_TARGETS)})"
        )
    noisy_latents = scheduler.add_noise(x0, noise, timesteps)
    target = _TARGETS[kind](scheduler, x0, noise, timesteps)

    inpaint = batch.get("inpaint_latents")
    model_pred = transformer_forward(
        transformer, noisy_latents, batch["prompt_embeds"], timesteps, inpaint
    )
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    # As in the original: only with more than two latent frames, so images never get it.
    if motion_sub_loss and model_pred.shape[1] > 2:
        loss = (
            loss * (1 - motion_sub_loss_ratio)
            + motion_mse(model_pred, target) * motion_sub_loss_ratio
        )
    return LossOutput(loss, model_pred, target, noisy_latents, timesteps)


def _latents_from_store(
    stored: Tensor, latent_format: str, generator: torch.Generator | None
) -> Tensor:
    """(B, ..., 2C or C, h, w) stored latents -> float32 unscaled sample."""
    if latent_format == "moments":
        return sample_posterior(stored, generator)
    if latent_format == "sample":
        return stored.float()
    raise ValueError(f"latent_format {latent_format!r} is not one of 'moments', 'sample'")


def _check_variants_read(read: Tensor | None, rows: Tensor, variant: Tensor) -> None:
    """The loader read only the variants it worked out this step would draw (`variants_read`
    (B, K) bool, `cogfun.train.picks`); one it left unread is zeros, never to be trained on."""
    if read is None:
        return
    missed = ~read[rows.to(read.device), variant.to(read.device)]  # (B,)
    if bool(missed.any()):
        where = [(int(i), int(variant[i])) for i in missed.nonzero().flatten()[:4].tolist()]
        raise RuntimeError(
            "the loader's pick of mask variants fell out of step with the trainer's draw: (row, "
            f"variant) {where} was not read (a bug in cogfun.train.picks or in what positions the "
            "loader was given)"
        )


def prepare_batch(
    raw: dict[str, Tensor],
    embeddings: Callable[[Tensor], Tensor],
    mode: str,
    scaling: float,
    generator: torch.Generator | None,
    *,
    latent_format: str = "moments",
    caption_dropout_p: float = 0.1,
    t2v_p_zero: float = 0.9,
    empty_index: int = 0,
) -> dict[str, Tensor]:
    """A store batch -> the `compute_loss` batch (plus the draws, for logging and tests).

    `raw`: `latents` (B, F, 2C|C, h, w), `caption` (B,) long and, for inpaint, `masks`
    (B, K, F, 1, h, w: the latent mask, 1 = known), `masked_latents` (B, K, F, 2C|C, h, w) and
    `all_masked` (B, K) bool. `embeddings` maps caption indices (B,) to (B, L, D) text states; when
    the loader already read the captions' states (`caption_embeds` (B, L, D)), it is asked only
    for the empty caption's, and the result is the same.
    `latent_format` says whether the store holds VAE moments or one sample. Normal mode ignores masks.
    With `variants_read` (B, K) bool the loader read only those variants (the rest are zeros): a
    drawn variant it did not read raises RuntimeError.
    """
    needs_masks = mode_facts(mode).needs_masks  # ValueError for an unknown mode
    latents = _latents_from_store(raw["latents"], latent_format, generator) * scaling
    out: dict[str, Tensor] = {"latents": latents}  # (B, F, C, h, w)
    if needs_masks:
        rows = torch.arange(latents.shape[0], device=raw["all_masked"].device)
        variant = pick_variants(raw["all_masked"], generator)  # (B,)
        _check_variants_read(raw.get("variants_read"), rows, variant)
        masked = _latents_from_store(raw["masked_latents"][rows, variant], latent_format, generator)
        flags = draw_t2v_flags(raw["all_masked"][rows, variant], generator, p_zero=t2v_p_zero)
        out["inpaint_latents"] = build_inpaint_latents(
            raw["masks"][rows, variant].float(),
            masked,
            flags.to(masked.device),
            scaling,
        )  # (B, F, 17, h, w)
        out["variant"] = variant
        out["t2v_flag"] = flags
    caption = caption_dropout(
        raw["caption"], generator, p=caption_dropout_p, empty_index=empty_index
    )
    out["caption"] = caption
    if "caption_embeds" in raw:  # read by the loader: only the empty caption is looked up here
        empty = embeddings(torch.full((1,), empty_index, dtype=caption.dtype))  # (1, L, D)
        kept = (caption != empty_index).view(-1, 1, 1).to(raw["caption_embeds"].device)
        out["prompt_embeds"] = torch.where(kept, raw["caption_embeds"], empty)  # (B, L, D)
    else:
        out["prompt_embeds"] = embeddings(caption)  # (B, L, D)
    return out
