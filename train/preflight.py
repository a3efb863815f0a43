"""Checks before training: the options, the model folder and the store must fit together.

Everything here reads JSON and store metadata (and hashes the VAE / text-encoder files when both the
store and the model folder have them, as precompute fingerprinted them), so a run that cannot work
is refused, saying what differs and what to do, before the transformer or the accelerator is built.

The store records what it was encoded for: the transformer layout its frame counts were chosen for
(settings `transformer`: patch_size, patch_size_t), the masked-video noise (`inpaint_noise`), the
latent channels (layout) and the VAE (settings `vae`). A store written before the `transformer`
record existed counts as made for `patch_size_t` None, which is how every such store was made.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cogfun.common.buckets import patchable_latent_frames
from cogfun.common.model_kind import encoded_for, recorded_for, unsupported_reason
from cogfun.common.models import ModelFolderError
from cogfun.common.modes import mode_facts
from cogfun.config.store_paths import is_store_url
from cogfun.train.config import TrainConfig


class TrainRefused(Exception):
    """The run cannot start as asked; the message says why and what to do."""


def check_config(cfg: TrainConfig) -> None:
    problems = [
        f"--{name.replace('_', '-')} must be >= 1 (got {value})"
        for name, value in (
            ("train_batch_size", cfg.train_batch_size),
            ("gradient_accumulation_steps", cfg.gradient_accumulation_steps),
            ("checkpointing_steps", cfg.checkpointing_steps),
            ("num_train_epochs", cfg.num_train_epochs),
            ("max_train_steps", cfg.max_train_steps),
            ("checkpoints_total_limit", cfg.checkpoints_total_limit),
            ("train_sampling_steps", cfg.train_sampling_steps),
        )
        if value is not None and value < 1
    ]
    if cfg.max_nonfinite_steps < 0:
        problems.append(
            f"--max-nonfinite-steps must be >= 0 (0: never stop; got {cfg.max_nonfinite_steps})"
        )
    if is_store_url(cfg.output_dir):
        problems.append(
            f"--output-dir {cfg.output_dir}: training outputs (checkpoints, logs, metrics, "
            "validation samples) are written to a local folder (only the stores, --latents, may "
            "be on an object store)"
        )
    if problems:
        raise TrainRefused("; ".join(problems))


def input_channels(latent_channels: int, mode: str) -> int:
    """Transformer input channels: noisy latents, plus mask + masked-video latents for inpaint."""
    return mode_facts(mode).input_channels(latent_channels)


def check_store(store: Any, tconfig: dict[str, Any], mode: str, model_dir: Path) -> None:
    """Refuse a store this transformer cannot train on in `mode` (the message says what differs)."""
    layout, where = store.layout, f"store {store.path}"
    needs_masks = mode_facts(mode).needs_masks
    problems = []
    if needs_masks and layout.masks_per_sample == 0:
        problems.append(
            "it holds no inpaint masks (it was precomputed with --mode normal): train with "
            "--mode normal, or precompute with --mode inpaint"
        )
    channels = layout.latent_channels
    if tconfig.get("out_channels") != channels:
        problems.append(
            f"its latents have {channels} channels but the transformer predicts "
            f"{tconfig.get('out_channels')} (another VAE?)"
        )
    need, have = input_channels(channels, mode), tconfig.get("in_channels")
    unsupported = unsupported_reason(tconfig, channels)  # control models, unknown channel counts
    if unsupported is not None:
        problems.append(unsupported)
    # A text-to-video checkpoint (C input channels) may start an inpaint run: extra channels start at 0.
    elif have != need and not (needs_masks and have == channels):
        problems.append(
            f"--mode {mode} feeds {need} input channels but the transformer takes {have}"
            + ("" if needs_masks else " (an inpaint model: use --mode inpaint)")
        )
    if layout.text_dim != tconfig.get("text_embed_dim"):
        problems.append(
            f"its text embeddings are {layout.text_dim} wide but the transformer expects "
            f"{tconfig.get('text_embed_dim')} (another text encoder?)"
        )
    rotary = tconfig.get("use_rotary_positional_embeddings", False)
    if not rotary and layout.text_len != tconfig.get("max_text_seq_length"):
        problems.append(
            f"its captions are {layout.text_len} tokens but the transformer's positional table "
            f"expects {tconfig.get('max_text_seq_length')} (tokenizer_max_length)"
        )
    problems += _layout_problems(store, tconfig)
    if needs_masks and layout.masks_per_sample:
        problems += _noise_problems(store.settings, tconfig)
    vae_config = model_dir / "vae" / "config.json"
    if vae_config.is_file():
        vae = json.loads(vae_config.read_text())
        model_scaling = vae.get("scaling_factor")
        if model_scaling is not None and not math.isclose(store.scaling_factor, model_scaling):
            problems.append(
                f"it was encoded with VAE scaling factor {store.scaling_factor} but {vae_config} "
                f"has {model_scaling}"
            )
        if vae.get("latent_channels", channels) != channels:
            problems.append(
                f"it was encoded by a VAE with {channels} latent channels but {vae_config} has "
                f"{vae['latent_channels']}"
            )
    problems += _identity_problems(store, model_dir)
    if sum(len(b.slots) for b in store.buckets.values()) == 0:
        problems.append("it holds no samples (every input failed?): see `cogfun inspect`")
    if problems:
        raise TrainRefused(f"{where} does not fit {model_dir}: " + "; ".join(problems))


def _describe_patch_t(patch_size_t: Any) -> str:
    if patch_size_t is None:
        return "no patch_size_t (any latent frame count; CogVideoX-Fun 2b/5b)"
    return f"patch_size_t {patch_size_t} (latent frame counts 1 or a multiple of it; V1.5 has 2)"


def _layout_problems(store: Any, tconfig: dict[str, Any]) -> list[str]:
    """The transformer layout the store's frame counts were chosen for against this transformer;
    then the buckets themselves against what the transformer can patch."""
    model = encoded_for(tconfig)
    recorded = recorded_for(store.settings)
    store_t = recorded.get("patch_size_t") if recorded else None
    problems = []
    if store_t != model["patch_size_t"]:
        before = (
            ""
            if recorded
            else " (a store from before cogfun recorded this: all such stores were made so)"
        )
        problems.append(
            f"its frame counts were chosen for a transformer with {_describe_patch_t(store_t)}"
            f"{before} but the transformer has {_describe_patch_t(model['patch_size_t'])}: "
            "precompute a store with this model"
        )
    if recorded and recorded.get("patch_size") != model["patch_size"]:
        problems.append(
            f"it was encoded for patch_size {recorded.get('patch_size')} but the transformer has "
            f"patch_size {model['patch_size']}: precompute a store with this model"
        )
    if problems:
        return problems
    p, p_t = model["patch_size"], model["patch_size_t"]
    bad = [
        name
        for name, b in store.buckets.items()
        if not patchable_latent_frames(b.latent_shape[0], p_t)
        or (isinstance(p, int) and (b.latent_shape[2] % p or b.latent_shape[3] % p))
    ]
    if bad:
        problems.append(
            f"bucket(s) {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} have latent shapes "
            f"the transformer (patch_size {p}, patch_size_t {p_t}) cannot patch"
        )
    return problems


def _noise_problems(settings: dict[str, Any], tconfig: dict[str, Any]) -> list[str]:
    """The masked-video noise of V1.1/V1.5 models: stores are encoded with it or without it, and
    training must match (a store without the record was encoded without it)."""
    stored = settings.get("inpaint_noise") is True
    wanted = bool(tconfig.get("add_noise_in_inpaint_model", False))
    if stored == wanted:
        return []
    if wanted:
        return [
            "its masked videos were encoded without the masked-video noise, but the transformer "
            "has add_noise_in_inpaint_model true (a V1.1/V1.5 model trains on noised masked "
            "videos): precompute a store with this model"
        ]
    return [
        "its masked videos were encoded with the masked-video noise (for a model with "
        "add_noise_in_inpaint_model true) but the transformer has add_noise_in_inpaint_model "
        "false: precompute a store with this model"
    ]


def _identity_problems(store: Any, model_dir: Path) -> list[str]:
    """The VAE / text encoder the store was encoded with, against the model folder's, when both are
    known (training needs neither folder: without one there is nothing to compare)."""
    from cogfun.common.models import model_identity

    problems = []
    for part in ("vae", "text_encoder"):
        recorded = store.settings.get(part)
        if not (isinstance(recorded, dict) and recorded.get("sha256")):
            continue
        try:
            have = model_identity(model_dir, part)["sha256"]
        except ModelFolderError:
            continue  # absent or partial part folder: nothing to compare
        if have != recorded["sha256"]:
            problems.append(
                f"it was encoded with another {part} (sha256 {recorded['sha256'][:12]}...) than "
                f"{model_dir / part} (sha256 {have[:12]}...)"
            )
    return problems
