"""Memory options against the sharding `accelerate launch` set up: refused before weights load.

The memory switches (`--use-8bit-adam`, DeepSpeed's optimizer/parameter offload, ZeRO-3, FSDP2) and
the optimizer choice (`--use-came`, on by default as in the original's recommended command) do not
all combine. Each combination that cannot work gets one message naming the options, the reason and
what to use instead (README, "Distributed training and memory"). ZeRO-2 with CAME stays allowed
with a warning (`distributed.configure_deepspeed`): the original's recommended command runs it.
"""

from __future__ import annotations

import importlib.util

import torch
from cogfun.train.config import TrainConfig
from cogfun.train.distributed import LaunchPlan
from cogfun.train.preflight import TrainRefused

NO_CAME = "add --no-use-came to train with AdamW"


def _has_accelerator() -> bool:
    accel = getattr(torch, "accelerator", None)
    return bool(accel.is_available()) if accel is not None else torch.cuda.is_available()


def problems(cfg: TrainConfig, plan: LaunchPlan, *, accelerator: bool | None = None) -> list[str]:
    """Every reason this run cannot work as launched (empty when it can)."""
    accelerator = _has_accelerator() if accelerator is None else accelerator
    where = f"{plan.name()} ({plan.source})"
    sharded = plan.zero_stage == 3 or plan.fsdp_version is not None
    out = []
    if plan.fsdp_version is not None:
        out += _fsdp_problems(plan, accelerator)
    if cfg.use_8bit_adam:
        out += _8bit_problems(cfg, plan, where)
    if cfg.use_came and sharded:
        out.append(
            f"--use-came under {where}: every parameter is split across the processes (ZeRO-3 as "
            "flat 1-D partitions, FSDP2 as row shards), so CAME cannot keep its factored row and "
            f"column statistics of whole weight matrices; {NO_CAME}, or use ZeRO-2 "
            "(config/zero_stage2_config.json), where CAME runs with a warning"
        )
    elif cfg.use_came and plan.offload_optimizer:
        out.append(
            f"--use-came under {where}: with the optimizer offloaded DeepSpeed runs the step on "
            f"the CPU with its own Adam, and CAME has no such implementation; {NO_CAME}"
        )
    if cfg.lora and plan.fsdp_version is not None:
        out.append(
            f"--lora under {where}: the adapters are saved and restored as plain tensors of the "
            "model, which FSDP2 turns into sharded DTensors; LoRA trains a few percent of the "
            "weights: run it with DDP (--multi_gpu) or ZeRO-2"
        )
    if cfg.use_ema and sharded:
        out.append(
            f"--use-ema under {where}: the EMA copy is updated from whole parameters after every "
            "step, but each process holds only its shard of them; train without --use-ema, or "
            "with ZeRO-2 or DDP"
        )
    return out


def _fsdp_problems(plan: LaunchPlan, accelerator: bool) -> list[str]:
    out = []
    if plan.fsdp_version != 2:
        out.append(
            f"FSDP{plan.fsdp_version} ({plan.source}): cogfun trains with FSDP2 "
            "(fsdp_version: 2, as in config/fsdp2.yaml)"
        )
    if plan.fsdp_state_dict != "FULL_STATE_DICT":
        out.append(
            f"fsdp_state_dict_type {plan.fsdp_state_dict} ({plan.source}): sharded checkpoints "
            "keep their index as a pickle (torch.distributed.checkpoint metadata), which cogfun "
            "never loads; use FULL_STATE_DICT (config/fsdp2.yaml)"
        )
    if not accelerator:
        out.append(
            f"FSDP ({plan.source}) without a GPU: accelerate sets FSDP up only on GPUs and other "
            "accelerators; CPU processes would train unsharded (with ACCELERATE_USE_CPU, as DDP) "
            "or as unconnected single processes. On CPU use --multi_gpu with "
            "ACCELERATE_USE_CPU=true (DDP) or DeepSpeed (config/zero_stage3_config.json)"
        )
    return out


def _8bit_problems(cfg: TrainConfig, plan: LaunchPlan, where: str) -> list[str]:
    if cfg.use_came:
        return [
            "--use-8bit-adam and --use-came both pick the optimizer (CAME is on by default, as in "
            "the original's recommended command): add --no-use-came to train with 8-bit AdamW"
        ]
    if plan.deepspeed:
        return [
            f"--use-8bit-adam under {where}: ZeRO hands the optimizer flat partitions and saves, "
            "gathers and offloads the optimizer state itself, which it cannot do with "
            "bitsandbytes' quantized state; drop --use-8bit-adam (ZeRO already partitions the "
            "AdamW state; config/zero_stage3_offload_config.json moves it to the CPU) or train "
            "8-bit AdamW without DeepSpeed"
        ]
    if plan.fsdp_version is not None:
        return [
            f"--use-8bit-adam under {where}: FSDP2's parameters are sharded DTensors and "
            "bitsandbytes' 8-bit kernels work on plain tensors; drop --use-8bit-adam (FSDP2 "
            "already shards the AdamW state)"
        ]
    if importlib.util.find_spec("bitsandbytes") is None:
        return ["--use-8bit-adam needs bitsandbytes: pip install bitsandbytes"]
    return []


def check(cfg: TrainConfig, plan: LaunchPlan) -> None:
    """Refuse the run (one message per reason) before the transformer is loaded."""
    found = problems(cfg, plan)
    if found:
        raise TrainRefused("; ".join(found))
