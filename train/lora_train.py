"""`cogfun train --lora`: what a LoRA run changes in the full-training path, kept in one place.

The store, loss, sampler, clipping, EMA, checkpoints and exact resume are the full run's; only
these differ (the original keeps them in a separate script, `scripts/train_lora.py`):

- the transformer gets peft adapters (`--rank`, `--network-alpha`, `--lora-target-modules`) and
  only they train; the frozen base weights are held in the --mixed-precision dtype as the original
  holds them (`--lora-base-dtype fp32` keeps them fp32);
- the EMA (`--use-ema`) follows the adapters only;
- a checkpoint holds the adapters instead of a `transformer/` folder:

      checkpoint-N/checkpoint-N.safetensors         the original's format (--save-dtype)
      checkpoint-N/pytorch_lora_weights.safetensors diffusers' format (--save-dtype)
      checkpoint-N/lora_adapters.safetensors        fp32 adapters; a resume loads them (under
                                                    DeepSpeed the engine's pytorch_model/ instead)
      checkpoint-N/lora_ema/                        the EMA adapters in the same three files,
                                                    and ema_state.json (its counters)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from cogfun.train import lora
from cogfun.train.config import TrainConfig
from cogfun.train.preflight import TrainRefused
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

TRAINABLE = [".lora_A.", ".lora_B."]  # parameter-name substrings of the adapters
RESUME_FILE = "lora_adapters.safetensors"
EMA_FOLDER = "lora_ema"
EMA_STATE = "ema_state.json"
_EMA_KEYS = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup")
_EMA_KEYS += ("inv_gamma", "power")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def check_config(cfg: TrainConfig) -> None:
    """Refuse LoRA options that cannot work, before anything loads."""
    if not cfg.lora:
        return
    if list(cfg.trainable_modules) != ["."] or cfg.trainable_modules_low_learning_rate:
        raise TrainRefused(
            "--lora trains the adapters only: --trainable-modules and "
            "--trainable-modules-low-learning-rate select full-training parameters; leave them "
            "out (--lora-target-modules picks the layers that get adapters)"
        )
    if cfg.rank < 1:
        raise TrainRefused(f"--rank {cfg.rank}: the LoRA rank must be at least 1")
    if cfg.network_alpha <= 0:
        raise TrainRefused(f"--network-alpha {cfg.network_alpha}: must be positive")


def base_dtype(cfg: TrainConfig) -> torch.dtype:
    if cfg.lora_base_dtype == "fp32" or cfg.mixed_precision == "no":
        return torch.float32
    return _DTYPES[cfg.mixed_precision]


def add_adapters(cfg: TrainConfig, model: nn.Module) -> None:
    """Inject the adapters into the loaded (fp32) transformer; the base is frozen and recast."""
    try:
        lora.add_lora(
            model,
            rank=cfg.rank,
            alpha=cfg.network_alpha,
            targets=cfg.lora_target_modules,
            base_dtype=base_dtype(cfg),
        )
    except lora.LoraError as err:
        raise TrainRefused(str(err)) from err


def is_lora(model: nn.Module) -> bool:
    return bool(lora.lora_layers(model))


class AdapterEMA(EMAModel):
    """diffusers' EMAModel over the adapter weights only (the frozen base never changes).

    The loop hands it every parameter of the model; it keeps the trainable ones (the adapters, in
    `named_parameters` order, the order it was built in)."""

    def __init__(self, model: nn.Module) -> None:
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        super().__init__([p for p in model.parameters() if p.requires_grad])

    def step(self, parameters: Any) -> None:
        super().step([p for p in parameters if p.requires_grad])

    def values(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.shadow_params, strict=True))


def make_ema(model: nn.Module) -> AdapterEMA:
    return AdapterEMA(model)


def _write_adapter_files(
    folder: Path, core: nn.Module, values: dict[str, Tensor], step: int, dtype: torch.dtype
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lora.save_original(core, folder / f"checkpoint-{step}.safetensors", dtype, values)
    lora.save_diffusers(core, folder / lora.DIFFUSERS_WEIGHT_NAME, dtype, values)
    exact = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in values.items()}
    save_file(exact, str(folder / RESUME_FILE))


def save_checkpoint_files(
    folder: Path,
    core: nn.Module,
    weights: dict[str, Tensor],
    ema: Any | None,
    step: int,
    save_dtype: str,
) -> None:
    """The adapters (from `weights`, the model's gathered state dict) and their EMA into `folder`
    (main process only)."""
    dtype = _DTYPES[save_dtype]
    names = set(lora.adapter_state_dict(core))
    _write_adapter_files(
        folder, core, {k: v for k, v in weights.items() if k in names}, step, dtype
    )
    if ema is not None:
        _write_adapter_files(folder / EMA_FOLDER, core, ema.values(), step, dtype)
        state = ema.state_dict()
        counters = {k: state[k] for k in _EMA_KEYS if k in state}
        (folder / EMA_FOLDER / EMA_STATE).write_text(json.dumps(counters, indent=2) + "\n")


def _read_exact(folder: Path, checkpoint: Path) -> dict[str, Tensor]:
    from cogfun.train.checkpoint import CheckpointError

    file = folder / RESUME_FILE
    if not file.is_file():
        raise CheckpointError(
            f"{checkpoint}: no {file.relative_to(checkpoint)}: it was not written by a --lora run "
            "(resume a full-training checkpoint without --lora)"
        )
    return load_file(file)


def load_checkpoint_files(checkpoint: Path, core: nn.Module, ema: Any | None, deepspeed: bool):
    """Restore the adapters (unless DeepSpeed's engine restores them) and the EMA adapters."""
    from cogfun.train.checkpoint import CheckpointError

    try:
        if not deepspeed:
            lora.load_adapter_state_dict(core, _read_exact(checkpoint, checkpoint), str(checkpoint))
        if ema is None:
            return
        folder = checkpoint / EMA_FOLDER
        if not folder.is_dir():
            raise CheckpointError(
                f"{checkpoint}: --use-ema is on but the checkpoint has no {EMA_FOLDER}/ "
                "(it was trained without EMA)"
            )
        shadow = _read_exact(folder, checkpoint)
    except lora.LoraError as err:
        raise CheckpointError(str(err)) from err
    if sorted(shadow) != sorted(ema.names):
        raise CheckpointError(f"{folder}: the EMA adapters do not match this run's adapters")
    device = ema.shadow_params[0].device
    state = json.loads((folder / EMA_STATE).read_text())
    state["shadow_params"] = [shadow[n].to(device) for n in ema.names]
    ema.load_state_dict(state)
