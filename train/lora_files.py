"""Reading LoRA files of either format, merging them into a transformer, loading them as adapters.

    adapters = read_lora("checkpoint-100.safetensors", transformer)  # checked against its Linears
    merge_lora(transformer, "pytorch_lora_weights.safetensors", weight=0.55)
    load_lora(transformer, "checkpoint-100.safetensors")  # peft adapters holding the file's values

The formats are described in `cogfun.train.lora`. The merge is the original's `merge_lora` rule,
W += weight * (alpha / rank) * up @ down, with rank = up.shape[1] and a scale of 1 when a module has
no alpha; diffusers' files take their alpha from the adapter metadata diffusers writes, and alpha =
rank (scale 1) without it, as diffusers reads them.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from cogfun.train.lora import (
    ADAPTER,
    DIFFUSERS_PREFIX,
    ORIGINAL_PREFIX,
    TEXT_ENCODER_PREFIX,
    Adapter,
    LoraError,
    add_lora,
    is_lora_layer,
    linear_names,
    lora_layers,
)
from safetensors import safe_open
from torch import Tensor, nn

log = logging.getLogger(__name__)


def _read_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if path.suffix != ".safetensors" or not path.is_file():
        raise LoraError(
            f"{path}: expected an existing .safetensors LoRA file (pickles are not read)"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise LoraError(f"{path}: not a readable safetensors file ({err})") from err


def _module_for(stem: str, by_underscore: dict[str, str], path: Path) -> str:
    body = stem.removeprefix(ORIGINAL_PREFIX).lstrip("_")
    if body not in by_underscore:
        raise LoraError(
            f"{path}: {stem} names no Linear layer of this transformer (a LoRA trained on another "
            "model?)"
        )
    return by_underscore[body]


def _original_adapters(
    state: dict[str, Tensor], model: nn.Module, path: Path
) -> dict[str, Adapter]:
    by_underscore: dict[str, str] = {}
    for name in linear_names(model):
        key = name.replace(".", "_")
        if key in by_underscore:  # two paths that read the same with dots as underscores
            raise LoraError(f"{name} and {by_underscore[key]} share the original's key {key}")
        by_underscore[key] = name
    groups: dict[str, dict[str, Tensor]] = {}
    skipped = 0
    for key, value in state.items():
        stem, _, part = key.partition(".")
        if stem.startswith(TEXT_ENCODER_PREFIX):
            skipped += 1
            continue
        if not stem.startswith(ORIGINAL_PREFIX):
            raise LoraError(f"{path}: key {key} is neither lora_unet_* nor lora_te_*")
        groups.setdefault(stem, {})[part] = value
    if skipped:
        log.warning(
            "%s: %d text-encoder (lora_te_*) tensors are not used: cogfun applies the "
            "transformer's adapters only",
            path,
            skipped,
        )
    out = {}
    for stem, parts in groups.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise LoraError(f"{path}: {stem} lacks lora_down.weight or lora_up.weight")
        up, down = parts["lora_up.weight"], parts["lora_down.weight"]
        rank = up.shape[1]
        scale = float(parts["alpha"].float().item()) / rank if "alpha" in parts else 1.0
        out[_module_for(stem, by_underscore, path)] = Adapter(down=down, up=up, scale=scale)
    return out


def _diffusers_scale(metadata: dict[str, str], path: Path) -> tuple[float | None, bool]:
    """(lora_alpha, use_rslora) from diffusers' adapter metadata, or (None, False) without it."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, False
    config = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in json.loads(raw).items()}
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_dora"):
        raise LoraError(
            f"{path}: per-module rank/alpha patterns and DoRA are not supported; save the adapter "
            "with one rank and alpha"
        )
    alpha = config.get("lora_alpha")
    return (None if alpha is None else float(alpha)), bool(config.get("use_rslora", False))


def _diffusers_adapters(
    state: dict[str, Tensor], metadata: dict[str, str], path: Path
) -> dict[str, Adapter]:
    alpha, rslora = _diffusers_scale(metadata, path)
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        match = re.fullmatch(r"(?:transformer\.)?(.+)\.(lora_A|lora_B)\.weight", key)
        if match is None or key.startswith(("text_encoder.", "text_encoder_2.")):
            raise LoraError(f"{path}: key {key} is not a transformer lora_A/lora_B weight")
        groups.setdefault(match.group(1), {})[match.group(2)] = value
    out = {}
    for name, parts in groups.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise LoraError(f"{path}: {name} lacks its lora_A or lora_B weight")
        rank = parts["lora_B"].shape[1]
        scale = 1.0 if alpha is None else alpha / (rank**0.5 if rslora else rank)
        out[name] = Adapter(down=parts["lora_A"], up=parts["lora_B"], scale=scale)
    return out


def file_format(path: str | Path) -> str:
    """'original' or 'diffusers', from the keys of a LoRA file."""
    state, _ = _read_tensors(Path(path))
    return _format_of(state, Path(path))


def _format_of(state: dict[str, Tensor], path: Path) -> str:
    if not state:
        raise LoraError(f"{path}: the file holds no tensors")
    if any(k.startswith((ORIGINAL_PREFIX, TEXT_ENCODER_PREFIX)) for k in state):
        return "original"
    if any(".lora_A." in k or ".lora_B." in k for k in state):
        return "diffusers"
    raise LoraError(
        f"{path}: not a LoRA file cogfun reads: expected the original's lora_unet_* keys or "
        f"diffusers' transformer.*.lora_A/lora_B keys (first key: {next(iter(state))})"
    )


def read_lora(path: str | Path, transformer: nn.Module) -> dict[str, Adapter]:
    """The adapters in a LoRA file of either format, checked against `transformer`'s Linears."""
    path = Path(path)
    state, metadata = _read_tensors(path)
    if _format_of(state, path) == "original":
        found = _original_adapters(state, transformer, path)
    else:
        found = _diffusers_adapters(state, metadata, path)
    modules = dict(transformer.named_modules())
    for name, adapter in found.items():
        layer = modules.get(name)
        base = layer.get_base_layer() if layer is not None and is_lora_layer(layer) else layer
        if not isinstance(base, nn.Linear):
            raise LoraError(f"{path}: {name} is not a Linear layer of this transformer")
        want = (base.out_features, base.in_features)
        got = (adapter.up.shape[0], adapter.down.shape[1])
        if got != want or adapter.up.shape[1] != adapter.down.shape[0]:
            raise LoraError(
                f"{path}: {name} adapter is {tuple(adapter.up.shape)} @ "
                f"{tuple(adapter.down.shape)} but the layer is {want[0]}x{want[1]} (a LoRA for "
                "another model size?)"
            )
    return found


@torch.no_grad()
def merge_lora(transformer: nn.Module, lora: str | Path, weight: float = 1.0) -> list[str]:
    """Add `weight * (alpha / rank) * up @ down` to each adapted Linear's weight, in place.

    Works on a plain transformer (as the original's predict scripts merge) and on one holding peft
    adapters (the base weight is changed; the adapters stay). Computed in fp32, stored back in the
    weight's dtype. Returns the merged module paths.
    """
    found = read_lora(lora, transformer)
    modules = dict(transformer.named_modules())
    for name, adapter in found.items():
        layer = modules[name]
        base = layer.get_base_layer() if is_lora_layer(layer) else layer
        w = base.weight
        w.copy_((w.float() + adapter.delta(weight).to(w.device)).to(w.dtype))
    return sorted(found)


@torch.no_grad()
def load_lora(transformer: nn.Module, lora: str | Path) -> list[str]:
    """Give a plain transformer the adapters of a LoRA file (either format), to train or sample on.

    The rank comes from the file; alpha is set so peft's scale equals the file's.
    """
    found = read_lora(lora, transformer)
    ranks = {a.up.shape[1] for a in found.values()}
    scales = {round(a.scale, 12) for a in found.values()}
    if len(ranks) != 1 or len(scales) != 1:
        raise LoraError(f"{lora}: modules with different ranks or scales are not supported")
    rank = ranks.pop()
    add_lora(transformer, rank=rank, alpha=scales.pop() * rank, targets=sorted(found))
    for name, layer in lora_layers(transformer).items():
        layer.lora_A[ADAPTER].weight.copy_(found[name].down)
        layer.lora_B[ADAPTER].weight.copy_(found[name].up)
    return sorted(found)
