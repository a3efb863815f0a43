"""Checkpoints: `output_dir/checkpoint-N/`, written atomically, found again by `--resume-from-checkpoint`.

A checkpoint holds

    transformer/          diffusers layout in --save-dtype (bf16 by default, as the original ships its
                          models; CogVideoXTransformer3DModel.from_pretrained loads it)
    master_weights.safetensors   the fp32 master weights, when transformer/ is not fp32 (no DeepSpeed)
    transformer_ema/      the EMA weights (fp32), when --use-ema
    optimizer.bin, scheduler.bin, random_states_<rank>.pkl    accelerate's save_state (no model copy);
    pytorch_model/        under DeepSpeed: the engine's model and ZeRO optimizer shards
    train_config.json     the resolved config (usable as `cogfun train --config`)
    trainer_state.json    `TrainingState.state_dict()` (global step, epoch, batches done in the epoch,
                          world size, the data order), the stores, version, config (written last)

It is written as `output_dir/.tmp-checkpoint-N` and renamed once complete, so a crash mid-save never
leaves a directory named `checkpoint-<int>`; stale temporaries are removed at the next start. Every rank
takes part (DeepSpeed's save is collective); only the main process writes the shared files and renames.
Nothing of cogfun's own state is pickled: it is JSON, and accelerate/DeepSpeed files load with
`weights_only=True` (see `distributed.safe_loading`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from cogfun.config.store_paths import NOT_RECORDED
from cogfun.train import distributed, lora_train
from cogfun.train.state import TrainingState
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-checkpoint-"
OLD_PREFIX = ".old-checkpoint-"
TRAINER_STATE = "trainer_state.json"
CONFIG_FILE = "train_config.json"
MASTER_WEIGHTS = "master_weights.safetensors"
SAVE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class CheckpointError(Exception):
    """A checkpoint asked for is missing, incomplete or does not fit this run."""


def resolved_config(config: Any) -> dict[str, Any]:
    """The run's config as JSON-ready values (paths as strings), as checkpoints and trackers
    record it: less `--storage-options`, which may hold secrets."""
    out = {}
    for key, value in dataclasses.asdict(config).items():
        if key in NOT_RECORDED:
            continue
        if isinstance(value, list):
            value = [str(v) if isinstance(v, Path) else v for v in value]
        out[key] = str(value) if isinstance(value, Path) else value
    return out


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_resume(output_dir: Path, resume_from: str | None) -> Path | None:
    """The checkpoint to resume from: `latest` (None when there is none), a path, or `none`."""
    if resume_from is None or resume_from.lower() == "none":
        return None
    if resume_from == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume_from)
    if not path.exists() and (output_dir / resume_from).exists():
        path = output_dir / resume_from
    if not (path / TRAINER_STATE).is_file():
        raise CheckpointError(
            f"--resume-from-checkpoint {resume_from}: {path} is not a complete cogfun checkpoint "
            f"(no {TRAINER_STATE}); use latest, none, or a checkpoint-N folder"
        )
    return path


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / TRAINER_STATE).read_text())


def remove_stale(output_dir: Path) -> None:
    """Delete temporaries a crash left behind (main process only)."""
    if not output_dir.is_dir():
        return
    for path in output_dir.iterdir():
        if path.name.startswith(OLD_PREFIX):
            final = output_dir / ("checkpoint-" + path.name.removeprefix(OLD_PREFIX))
            if not final.exists():
                # A kill between `_publish`'s two renames: the set-aside copy is the only complete
                # checkpoint of that step, so put it back rather than delete it.
                log.info("restoring %s from %s (a re-save was interrupted)", final, path)
                path.rename(final)
                continue
        if path.name.startswith((TMP_PREFIX, OLD_PREFIX)):
            log.info("removing incomplete checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)


def prune(output_dir: Path, limit: int | None) -> None:
    """Keep the newest `limit` complete checkpoints (main process only)."""
    if limit is None:
        return
    found = complete_checkpoints(output_dir)
    for _, path in found[: max(0, len(found) - limit)]:
        log.info("checkpoints_total_limit=%d: removing %s", limit, path)
        shutil.rmtree(path)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _publish(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`, replacing an older `final` without ever leaving none or half of one."""
    old = final.with_name(OLD_PREFIX + final.name.removeprefix("checkpoint-"))
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def save_checkpoint(
    accelerator: Accelerator,
    *,
    output_dir: Path,
    model: nn.Module,
    ema: Any | None,
    state: TrainingState,
    config: dict[str, Any],
    extra: dict[str, Any],
    total_limit: int | None,
    save_dtype: str = "bf16",
) -> Path:
    """Write `checkpoint-<global_step>` (every rank must call it); returns its path.

    `transformer/` holds the weights in `save_dtype`, for inference. Resuming needs the fp32
    masters: without DeepSpeed they go to `master_weights.safetensors` when `transformer/` is not
    fp32; under DeepSpeed the engine's own checkpoint (`pytorch_model/`) holds them, and an fp32
    `transformer/` is assembled from its fp32 partitions."""
    step = state.global_step
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"{TMP_PREFIX}{step}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    distributed.save_state(accelerator, tmp)
    weights = distributed.model_state_dict(accelerator, model)
    deepspeed = distributed.is_deepspeed(accelerator)
    dtype = SAVE_DTYPES[save_dtype]
    if deepspeed and dtype == torch.float32:
        weights = _deepspeed_fp32_weights(accelerator, model, weights)  # collective
    if accelerator.is_main_process:
        core = distributed.unwrap(accelerator, model)
        if lora_train.is_lora(core):  # --lora: the adapters (and their EMA), no transformer/
            lora_train.save_checkpoint_files(tmp, core, weights, ema, step, save_dtype)
        else:
            save_transformer(core, weights, tmp / "transformer", dtype)
            if not deepspeed and any(v.dtype != dtype for v in weights.values()):
                masters = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
                save_file(masters, tmp / MASTER_WEIGHTS)
            if ema is not None:
                ema.save_pretrained(str(tmp / "transformer_ema"))
        _write_json(tmp / CONFIG_FILE, config)
        trainer_state = {
            **state.state_dict(),
            **extra,
            "cogfun_version": dist_version("cogfun"),
            "config": config,
        }
        _write_json(tmp / TRAINER_STATE, trainer_state)  # last: the folder is complete now
        _publish(tmp, final)
        prune(output_dir, total_limit)
        log.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


def save_transformer(
    core: nn.Module, weights: dict[str, Tensor], folder: Path, dtype: torch.dtype
) -> None:
    """What `save_pretrained` writes (config.json, safetensors shards of at most 10 GB with their
    index), with `weights` cast to `dtype`. diffusers' `save_pretrained` takes no state dict: it
    always writes the module's own tensors, which are the fp32 masters outside DeepSpeed."""
    from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME
    from huggingface_hub import split_torch_state_dict_into_shards

    folder.mkdir(parents=True)
    core.save_config(folder)
    split = split_torch_state_dict_into_shards(
        weights,
        max_shard_size="10GB",
        filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
    )
    for filename, names in split.filename_to_tensors.items():
        shard = {
            n: (weights[n].to(dtype) if weights[n].is_floating_point() else weights[n])
            .detach()
            .cpu()
            .contiguous()
            for n in names
        }
        save_file(shard, folder / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        _write_json(folder / SAFE_WEIGHTS_INDEX_NAME, index)


def _deepspeed_fp32_weights(
    accelerator: Accelerator, model: nn.Module, weights: dict[str, Tensor]
) -> dict[str, Tensor]:
    """The engine's fp32 master copy of each trained parameter (every rank must call it: ZeRO
    gathers the partitions); parameters DeepSpeed keeps no master of (frozen ones) stay as the
    engine holds them, upcast."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = dict(weights)
    for name, param in distributed.unwrap(accelerator, model).named_parameters():
        full = safe_get_full_fp32_param(param)
        if full is not None and name in out:
            out[name] = full.detach().to("cpu", torch.float32)
    return out


def load_transformer_weights(model: nn.Module, folder: Path) -> None:
    """Load a `save_pretrained` folder's safetensors (or one safetensors file) into `model`
    (strict: every key, same shapes)."""
    files = [folder] if folder.is_file() else sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    model.load_state_dict(state, strict=True)


def load_checkpoint(
    accelerator: Accelerator, checkpoint: Path, model: nn.Module, ema: Any | None
) -> dict[str, Any]:
    """Restore weights, optimizer, LR scheduler (and EMA) from `checkpoint`; returns trainer_state.

    Every rank must call it. Without DeepSpeed the weights come from the fp32 masters
    (`master_weights.safetensors`, or `transformer/` when it was saved in fp32): exact; under
    DeepSpeed the engine restores its module and fp32 master partitions.
    """
    state = read_trainer_state(checkpoint)
    core = distributed.unwrap(accelerator, model)
    if lora_train.is_lora(core):  # --lora: the adapters and their EMA
        lora_train.load_checkpoint_files(
            checkpoint, core, ema, distributed.is_deepspeed(accelerator)
        )
        ema = None
    elif not distributed.saves_model_itself(accelerator):  # DeepSpeed, FSDP: in load_state
        load_transformer_weights(core, _masters(checkpoint))
    distributed.load_state(accelerator, checkpoint)
    if ema is not None:
        folder = checkpoint / "transformer_ema"
        if not folder.is_dir():
            raise CheckpointError(
                f"{checkpoint}: --use-ema is on but the checkpoint has no transformer_ema/ "
                "(it was trained without EMA)"
            )
        load_ema(ema, folder, core)
    return state


def _masters(checkpoint: Path) -> Path:
    """Where a checkpoint keeps its fp32 weights; one without them cannot resume exactly."""
    if (checkpoint / MASTER_WEIGHTS).is_file():
        return checkpoint / MASTER_WEIGHTS
    folder = checkpoint / "transformer"
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
        if dtypes - {"F32", "I64", "BOOL"}:
            raise CheckpointError(
                f"{checkpoint}: transformer/ holds {'/'.join(sorted(dtypes))} weights and there is "
                f"no {MASTER_WEIGHTS}: the fp32 master weights to resume from exactly are missing"
            )
    return folder


# The counters `EMAModel.save_pretrained` writes into the folder's config.json.
_EMA_KEYS = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup")
_EMA_KEYS += ("inv_gamma", "power")


def load_ema(ema: Any, folder: Path, model: nn.Module) -> None:
    """Load what `EMAModel.save_pretrained` wrote: shadow weights by parameter name, and counters."""
    config = json.loads((folder / "config.json").read_text())
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(file))
    names = [name for name, _ in model.named_parameters()]
    missing = [n for n in names if n not in weights]
    if missing:
        raise CheckpointError(f"{folder}: EMA weights lack {', '.join(missing[:5])}")
    device = ema.shadow_params[0].device
    state = {k: config[k] for k in _EMA_KEYS if k in config}
    state["shadow_params"] = [weights[n].to(device) for n in names]
    ema.load_state_dict(state)
