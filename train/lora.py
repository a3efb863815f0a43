"""LoRA on the CogVideoX-Fun transformer (peft), and the two files people use it through.

    names = add_lora(transformer, rank=128, alpha=64)       # only the adapters train
    save_original(transformer, "checkpoint-100.safetensors")  # the original's merge_lora reads it
    save_diffusers(transformer, "pytorch_lora_weights.safetensors")  # pipe.load_lora_weights
    # reading, merging and loading either file: cogfun.train.lora_files

What it reproduces from the original (CogVideoX-Fun `cogvideox/utils/lora_utils.py`, run by its
`scripts/train_lora.py` with `--rank 128 --network_alpha 64`):

- **Targets.** Every `Linear` inside the transformer (attention q/k/v/out, feed-forward, the adaLN
  `norm*.linear`, time embedding, text projection, `proj_out`); the patch-embedding Conv2d (2x2
  kernel) is left alone, as the original leaves non-1x1 convolutions alone.
- **Scale.** A module's output gains `(alpha / rank) * up(down(x))`; `down` (lora_A) starts
  Kaiming-uniform and `up` (lora_B) at zero, so step 0 is the base model.
- **Original file.** One safetensors file, three tensors per module:
  `lora_unet__<module path, dots as underscores>.lora_down.weight` (rank, in),
  `.lora_up.weight` (out, rank) and `.alpha` (a scalar). The double underscore is the original's:
  its key is `lora_unet` + "." + (the transformer's own, empty, module name) + "." + the path, with
  every dot replaced. Its `merge_lora` applies `W += weight * (alpha / rank) * up @ down`, with rank
  read as `up.shape[1]` and a scale of 1 when `alpha` is absent.
- **Diffusers file.** peft naming under the `transformer.` prefix
  (`transformer.<module path>.lora_A.weight`, `.lora_B.weight`), the layout
  `CogVideoXPipeline.load_lora_weights` reads. `alpha / rank` is folded into lora_B, so the file
  means the same to every diffusers version: without adapter metadata diffusers takes alpha = rank
  (scale 1).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

DEFAULT_RANK = 128
DEFAULT_ALPHA = 64
ADAPTER = "default"
ORIGINAL_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"
DIFFUSERS_PREFIX = "transformer."
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA file name
_ADAPTER_PARTS = {"base_layer", "lora_A", "lora_B", "lora_dropout"}


class LoraError(ValueError):
    """A LoRA option or file that does not fit the transformer it is used with."""


@dataclass(frozen=True)
class Adapter:
    """One module's low-rank update: `W += weight * scale * up @ down`."""

    down: Tensor  # (rank, in_features)
    up: Tensor  # (out_features, rank)
    scale: float  # alpha / rank

    def delta(self, weight: float = 1.0) -> Tensor:
        """The update in fp32, in the original merge's order: weight * scale * (up @ down)."""
        return weight * self.scale * (self.up.float() @ self.down.float())


def is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def linear_names(transformer: nn.Module) -> list[str]:
    """Module paths of every Linear of the transformer (a peft layer counts as its Linear)."""
    names = []
    for name, module in transformer.named_modules():
        if _ADAPTER_PARTS.intersection(name.split(".")):
            continue  # a peft layer's own base_layer / lora_A / lora_B
        if is_lora_layer(module) or isinstance(module, nn.Linear):
            names.append(name)
    return names


def _short(path: str) -> str:
    """The last part of a module path that names it: `to_q`, `to_out.0`, `net.2`."""
    parts = path.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def resolve_targets(transformer: nn.Module, targets: Iterable[str] | None) -> list[str]:
    """The module paths that get adapters: every Linear when `targets` is empty or None.

    An entry names a module by its full path or a dotted suffix of it (peft's rule: `to_q` is
    every `...to_q`; `attn1.to_out.0` every attention output). Each entry must name at least one
    Linear, and nothing but Linears.
    """
    linears = linear_names(transformer)
    wanted = [t.strip() for t in targets or [] if t.strip()]
    if not wanted:
        return linears
    modules = dict(transformer.named_modules())
    chosen: set[str] = set()
    for entry in wanted:
        hits = [n for n in modules if n and (n == entry or n.endswith("." + entry))]
        if not hits:
            raise LoraError(
                f"--lora-target-modules {entry!r}: no module of the transformer has that name "
                f"(its Linear layers end in {', '.join(sorted({_short(n) for n in linears}))})"
            )
        not_linear = [n for n in hits if n not in linears]
        if not_linear:
            kind = type(modules[not_linear[0]]).__name__
            raise LoraError(
                f"--lora-target-modules {entry!r}: {not_linear[0]} is a {kind}; LoRA adapters go "
                "on Linear layers only"
            )
        chosen.update(hits)
    return [n for n in linears if n in chosen]


def add_lora(
    transformer: nn.Module,
    rank: int = DEFAULT_RANK,
    alpha: float = DEFAULT_ALPHA,
    targets: Iterable[str] | None = None,
    base_dtype: torch.dtype | None = None,
) -> list[str]:
    """Inject peft LoRA adapters (fp32) into `transformer` in place; returns the targeted paths.

    Afterwards only the adapter weights require gradients. `base_dtype` (e.g. bf16) recasts the
    frozen base weights to save memory; the adapters stay fp32.
    """
    from peft import LoraConfig

    if rank < 1:
        raise LoraError(f"--rank {rank}: the LoRA rank must be at least 1")
    if alpha <= 0:
        raise LoraError(f"--network-alpha {alpha}: must be positive (the scale is alpha / rank)")
    names = resolve_targets(transformer, targets)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        init_lora_weights=True,  # Kaiming-uniform down, zero up: as the original
        target_modules="^(?:" + "|".join(re.escape(n) for n in names) + ")$",
    )
    transformer.requires_grad_(False)
    transformer.add_adapter(config, adapter_name=ADAPTER)
    for name, param in transformer.named_parameters():
        is_adapter = ".lora_A." in name or ".lora_B." in name
        param.requires_grad_(is_adapter)
        if is_adapter:
            param.data = param.data.float()
        elif base_dtype is not None and param.is_floating_point():
            param.data = param.data.to(base_dtype)
    return names


def lora_layers(transformer: nn.Module) -> dict[str, nn.Module]:
    """Module path -> peft LoRA layer holding the adapter."""
    return {
        name: module
        for name, module in transformer.named_modules()
        if is_lora_layer(module) and ADAPTER in getattr(module, "lora_A", {})
    }


def adapters(
    transformer: nn.Module, values: Mapping[str, Tensor] | None = None
) -> dict[str, Adapter]:
    """The adapters of a peft-injected transformer, as (down, up, alpha / rank).

    `values` (parameter name -> tensor, e.g. a gathered state dict or EMA weights) replaces the
    live adapter weights; the ranks and alphas are the layers'.
    """
    out = {}
    for name, layer in lora_layers(transformer).items():
        down, up = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        if values is not None:
            down = values[f"{name}.lora_A.{ADAPTER}.weight"]
            up = values[f"{name}.lora_B.{ADAPTER}.weight"]
        out[name] = Adapter(down=down.detach(), up=up.detach(), scale=float(layer.scaling[ADAPTER]))
    if not out:
        raise LoraError("the transformer has no LoRA adapters (add_lora was not called)")
    return out


def _alpha_rank(layer: nn.Module) -> tuple[float, int]:
    return float(layer.lora_alpha[ADAPTER]), int(layer.r[ADAPTER])


def original_key(module_path: str) -> str:
    """The original's key stem for a module path: `lora_unet__transformer_blocks_0_attn1_to_q`."""
    return f"{ORIGINAL_PREFIX}..{module_path}".replace(".", "_")


def original_state_dict(
    transformer: nn.Module, dtype: torch.dtype, values: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Adapters in the original's layout (all tensors, alpha included, in `dtype`, as it saves)."""
    state: dict[str, Tensor] = {}
    layers = lora_layers(transformer)
    for name, adapter in adapters(transformer, values).items():
        stem = original_key(name)
        alpha, _ = _alpha_rank(layers[name])
        state[f"{stem}.lora_down.weight"] = adapter.down.to("cpu", dtype)
        state[f"{stem}.lora_up.weight"] = adapter.up.to("cpu", dtype)
        state[f"{stem}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return {k: v.contiguous() for k, v in state.items()}


def diffusers_state_dict(
    transformer: nn.Module, dtype: torch.dtype, values: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Adapters in diffusers' peft layout with alpha / rank folded into lora_B (see module doc)."""
    state: dict[str, Tensor] = {}
    for name, adapter in adapters(transformer, values).items():
        state[f"{DIFFUSERS_PREFIX}{name}.lora_A.weight"] = adapter.down.to("cpu", dtype)
        up = adapter.up.float() * adapter.scale
        state[f"{DIFFUSERS_PREFIX}{name}.lora_B.weight"] = up.to("cpu", dtype)
    return {k: v.contiguous() for k, v in state.items()}


def save_original(
    transformer: nn.Module,
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    values: Mapping[str, Tensor] | None = None,
) -> Path:
    path = Path(path)
    state = original_state_dict(transformer, dtype, values)
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def save_diffusers(
    transformer: nn.Module,
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    values: Mapping[str, Tensor] | None = None,
) -> Path:
    path = Path(path)
    state = diffusers_state_dict(transformer, dtype, values)
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def adapter_state_dict(transformer: nn.Module) -> dict[str, Tensor]:
    """A copy of the exact (fp32) adapter weights under their parameter names."""
    return {
        name: param.detach().to("cpu", copy=True).contiguous()
        for name, param in transformer.named_parameters()
        if ".lora_A." in name or ".lora_B." in name
    }


@torch.no_grad()
def load_adapter_state_dict(transformer: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Put `adapter_state_dict` values back (same names and shapes, or a clear refusal)."""
    params = dict(transformer.named_parameters())
    expected = {n for n in params if ".lora_A." in n or ".lora_B." in n}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise LoraError(
            f"{source}: the adapters do not match this run's (missing {missing[:3]}, extra "
            f"{extra[:3]}): was it trained with other --rank / --lora-target-modules?"
        )
    for name, value in state.items():
        if value.shape != params[name].shape:
            raise LoraError(
                f"{source}: {name} is {tuple(value.shape)}, this run's is "
                f"{tuple(params[name].shape)} (another --rank?)"
            )
        params[name].copy_(value)
