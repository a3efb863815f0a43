"""Everything that knows accelerate and DeepSpeed internals, and nothing else does.

accelerate is the one entry to distribution; DeepSpeed comes through `accelerate launch
--use_deepspeed --deepspeed_config_file config/zero_stage{2,3}_config.json` (or
zero_stage3_offload_config.json), FSDP2 through `--config_file config/fsdp2.yaml`. Whether they run,
the world size and the precision are read from the accelerator (never from a second flag);
`launch_plan` reads what the launch asked for before the accelerator exists, for the refusals of
`cogfun.train.memory_checks`. The training loop calls the small helpers below; collective calls
(`save_state`, `model_state_dict`, the reductions) run on every rank.

Traps handled here (found running accelerate and DeepSpeed on CPU; tests/test_train_launch.py):
- two CPU processes need the gloo backend asked for explicitly, and only when launched;
- accelerate fills DeepSpeed's `gradient_clipping: "auto"` with 1.0, not with `--max-grad-norm`;
- DeepSpeed reads its checkpoint files with `torch.load(weights_only=False)`: loading goes through
  `safe_loading()`, which forces `weights_only=True` with an explicit allow-list.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration
from torch import Tensor, nn

log = logging.getLogger(__name__)


def make_accelerator(
    *,
    output_dir: Path,
    logging_dir: str,
    gradient_accumulation_steps: int,
    mixed_precision: str,
    report_to: str,
) -> Accelerator:
    """The run's Accelerator; DeepSpeed and the process group come from `accelerate launch`."""
    handlers = []
    # Launched CPU processes default to a backend under which every rank believes it is rank 0 of 1
    # ("ProcessGroupGloo::allgather ... expected length 2, got 1"); in a plain process the kwarg fails.
    if "LOCAL_RANK" in os.environ and not torch.cuda.is_available():
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    if not torch.distributed.is_initialized():
        # accelerate keeps its state in process-wide singletons; a second run in the same process
        # (tests, the demo) with other settings would otherwise be refused.
        AcceleratorState._reset_state(reset_partial_state=True)
    project = ProjectConfiguration(
        project_dir=str(output_dir), logging_dir=str(output_dir / logging_dir)
    )
    return Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=None if report_to == "none" else report_to,
        project_config=project,
        kwargs_handlers=handlers,
    )


@dataclass(frozen=True)
class LaunchPlan:
    """What `accelerate launch` asked for, read from the environment it sets for each process, so
    that combinations that cannot work are refused before any weight is loaded."""

    deepspeed: bool = False
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    fsdp_version: int | None = None  # set when launched with FSDP
    fsdp_state_dict: str = "FULL_STATE_DICT"
    source: str = "no accelerate launch"  # the config file or flags it came from, for messages

    def name(self) -> str:
        if self.deepspeed:
            parts = [("optimizer", self.offload_optimizer), ("parameters", self.offload_param)]
            offload = " and ".join(part for part, on in parts if on)
            return f"DeepSpeed ZeRO-{self.zero_stage}" + (
                f" with CPU offload of {offload}" if offload else ""
            )
        if self.fsdp_version is not None:
            return f"FSDP{self.fsdp_version}"
        return "no sharding"


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _offloaded(zero: dict[str, Any], key: str) -> bool:
    return str((zero.get(key) or {}).get("device", "none")).lower() != "none"


def launch_plan() -> LaunchPlan:
    """The sharding `accelerate launch` set up for this process (its environment variables, and the
    DeepSpeed JSON file they name, which accelerate lets override its flags)."""
    env = os.environ.get
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        path = env("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        if path.lower() == "none":
            zero = {
                "stage": env("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"),
                "offload_optimizer": {
                    "device": env("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE")
                },
                "offload_param": {"device": env("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")},
            }
            path = "the accelerate launch --use_deepspeed flags"
        else:
            zero = json.loads(Path(path).read_text()).get("zero_optimization", {})
        return LaunchPlan(
            deepspeed=True,
            zero_stage=int(zero.get("stage", 0)),
            offload_optimizer=_offloaded(zero, "offload_optimizer"),
            offload_param=_offloaded(zero, "offload_param"),
            source=path,
        )
    if _flag("ACCELERATE_USE_FSDP"):
        return LaunchPlan(
            fsdp_version=int(env("FSDP_VERSION", "1")),
            # accelerate's default when the launch names none
            fsdp_state_dict=env("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT"),
            source="the accelerate launch FSDP settings",
        )
    return LaunchPlan()


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def is_fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def saves_model_itself(accelerator: Accelerator) -> bool:
    """DeepSpeed and FSDP write (and restore) the sharded model in `save_state`/`load_state`."""
    return is_deepspeed(accelerator) or is_fsdp(accelerator)


def offloads_optimizer(accelerator: Accelerator) -> bool:
    """DeepSpeed keeps the optimizer state (and runs its step) on the CPU."""
    if not is_deepspeed(accelerator):
        return False
    zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    return _offloaded(zero, "offload_optimizer")


def describe(accelerator: Accelerator) -> str:
    """One line for the log: what accelerate set up."""
    if is_deepspeed(accelerator):
        stage = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        kind = f"DeepSpeed ZeRO-{stage.get('stage', '?')}"
        if offloads_optimizer(accelerator):
            kind += " (optimizer offloaded to CPU)"
    elif is_fsdp(accelerator):
        kind = f"FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    else:
        kind = str(accelerator.distributed_type).split(".")[-1]
    return (
        f"{kind}, {accelerator.num_processes} process(es), device {accelerator.device}, "
        f"mixed precision {accelerator.mixed_precision}, "
        f"gradient accumulation {accelerator.gradient_accumulation_steps}, "
        f"{torch.get_num_threads()} torch thread(s) per process"
    )


def configure_deepspeed(accelerator: Accelerator, *, max_grad_norm: float, use_came: bool) -> None:
    """Set DeepSpeed's clipping to `max_grad_norm` before `prepare` (no-op without DeepSpeed).

    `accelerator.clip_grad_norm_` does nothing under DeepSpeed, so the config's `gradient_clipping` is
    the only clipping there is, and accelerate would fill "auto" with 1.0 (20x the usual 0.05).
    """
    if not is_deepspeed(accelerator):
        return
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    given = ds_config.get("gradient_clipping", "auto")
    if given not in ("auto", None) and float(given) != max_grad_norm:
        log.warning(
            "DeepSpeed config gradient_clipping=%s differs from --max-grad-norm %s; "
            "using --max-grad-norm",
            given,
            max_grad_norm,
        )
    ds_config["gradient_clipping"] = max_grad_norm
    if use_came:
        stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        log.warning(
            "CAME under DeepSpeed ZeRO-%s: ZeRO hands CAME flattened 1-D partitions, so CAME falls "
            "back to its non-factored mode (its memory saving is lost and its updates differ from "
            "CAME under DDP); use --no-use-came for AdamW or run without DeepSpeed",
            stage,
        )


def prepare(
    accelerator: Accelerator, model: nn.Module, optimizer: Any, lr_scheduler: Any
) -> tuple[nn.Module, Any, Any]:
    """Wrap model, optimizer and LR scheduler; the dataloader stays ours (the sampler shards by rank).

    Without DeepSpeed or FSDP the checkpoint's `transformer/` folder holds the weights, so
    accelerate's `save_state`/`load_state` are told to skip them (no second copy of a multi-GB model).
    """
    if not saves_model_itself(accelerator):
        accelerator.register_save_state_pre_hook(lambda models, weights, _dir: weights.clear())
        accelerator.register_load_state_pre_hook(lambda models, _dir: models.clear())
    return accelerator.prepare(model, optimizer, lr_scheduler)


def unwrap(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    return accelerator.unwrap_model(model)


def engine_gradient_clipping(accelerator: Accelerator) -> float | None:
    """The clip norm the DeepSpeed engine really applies (None without DeepSpeed)."""
    if not is_deepspeed(accelerator):
        return None
    return float(accelerator.deepspeed_engine_wrapped.engine.gradient_clipping())


def clip_gradients(
    accelerator: Accelerator, params: list[Tensor], clip_for: Callable[[float], float]
) -> float:
    """Clip on a sync step; returns the total L2 norm of the gradients before clipping.

    Without DeepSpeed: unscale (fp16), measure the norm, ask `clip_for(norm)` for the clip value (the
    adaptive schedule needs the norm first) and clip. Under DeepSpeed the engine clips inside its step
    (config `gradient_clipping`); its norm is read after the step with `deepspeed_grad_norm`.
    """
    if is_deepspeed(accelerator):
        return float("nan")
    accelerator.unscale_gradients()
    if is_fsdp(accelerator):
        return _clip_fsdp(accelerator, clip_for)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = float(torch.nn.utils.get_total_norm(grads, norm_type=2.0))
    torch.nn.utils.clip_grads_with_norm_(params, clip_for(norm), torch.tensor(norm))
    return norm


def _clip_fsdp(accelerator: Accelerator, clip_for: Callable[[float], float]) -> float:
    """FSDP2 replaced the parameters by sharded DTensors in `prepare` (the optimizer was switched
    to them), so the trainable ones are read from the prepared model; the norm of sharded
    gradients is a partial DTensor, made whole across ranks by `full_tensor`."""
    params = [p for m in accelerator._models for p in m.parameters() if p.requires_grad]
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
    accelerator.clip_grad_norm_(params, clip_for(norm))
    return norm


def deepspeed_grad_norm(accelerator: Accelerator) -> float | None:
    """The engine's pre-clip global gradient norm of the last step (None without DeepSpeed)."""
    if not is_deepspeed(accelerator):
        return None
    norm = accelerator.deepspeed_engine_wrapped.get_global_grad_norm()
    return None if norm is None else float(norm)


def mean_across_ranks(accelerator: Accelerator, value: Tensor | float) -> float:
    """Mean of a per-rank scalar over all ranks (every rank must call it)."""
    t = torch.as_tensor(value, dtype=torch.float32, device=accelerator.device).reshape(1)
    return float(accelerator.gather(t).mean())


def gather_ints(accelerator: Accelerator, value: int) -> list[int]:
    """A per-rank integer from every rank, in rank order (every rank must call it)."""
    t = torch.tensor([value], dtype=torch.int64, device=accelerator.device)
    return [int(v) for v in accelerator.gather(t).tolist()]


def model_state_dict(accelerator: Accelerator, model: nn.Module) -> dict[str, Tensor]:
    """The full state dict of the (possibly wrapped) model, for `save_pretrained`.

    Every rank must call it: under ZeRO-3 and FSDP2 it gathers the shards (under ZeRO-2 and DDP it
    is local). Gathered state lands on the main process only; the other ranks get an empty dict.
    """
    state = accelerator.get_state_dict(model)
    return {} if state is None else state


def save_state(accelerator: Accelerator, directory: Path) -> None:
    """Optimizer, LR scheduler (and under DeepSpeed the engine's model + ZeRO shards): collective."""
    accelerator.save_state(str(directory), safe_serialization=True)


class UnsafeCheckpoint(Exception):
    """A checkpoint file holds pickled objects outside the allow-list; it was not unpickled."""


def load_state(accelerator: Accelerator, directory: Path) -> None:
    """Counterpart of `save_state`; every file goes through `weights_only=True` (no unpickling)."""
    try:
        with safe_loading():
            accelerator.load_state(str(directory))
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpoint(
            f"{directory}: a state file holds pickled objects that are not plain tensors or the "
            f"allowed DeepSpeed classes; refusing to unpickle it ({str(err).splitlines()[0]})"
        ) from err


def _deepspeed_safe_globals() -> list[Any]:
    """The classes DeepSpeed's ZeRO checkpoint files hold besides tensors and plain containers."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def safe_loading() -> Iterator[None]:
    """Force `weights_only=True` on every `torch.load` inside (DeepSpeed asks for False).

    A planted pickle then raises instead of running; the allow-list names the few DeepSpeed classes
    its checkpoints hold.
    """
    original = torch.load

    def weights_only_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = weights_only_load
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        torch.load = original
