"""`cogfun merge-lora`: a LoRA file merged into a model's transformer, saved as a diffusers folder.

    cogfun merge-lora --model MODEL --lora output/checkpoint-500/checkpoint-500.safetensors \\
        --lora-weight 0.55 --out merged

writes `merged/transformer/` (config.json + safetensors), which `CogVideoXTransformer3DModel
.from_pretrained(merged, subfolder="transformer")` loads, so does `cogfun train --model` once the
other parts (vae/, text_encoder/, tokenizer/, scheduler/, model_index.json) sit next to it. The
file may be in the original's format or diffusers' (see `cogfun.train.lora`); the merge is the
original's `W += weight * (alpha / rank) * up @ down`, in fp32, stored in the model's own dtype
unless `--dtype` says otherwise.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def stored_dtype(transformer_dir: Path) -> torch.dtype:
    """The dtype the model's transformer weights are stored in (read from a safetensors header)."""
    for file in sorted(transformer_dir.glob("*.safetensors")):
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for key, entry in header.items():
            if key != "__metadata__" and entry["dtype"] in _SAFETENSORS_DTYPES:
                return _SAFETENSORS_DTYPES[entry["dtype"]]
    return torch.float32


def merge_to_folder(model: Path, lora: Path, weight: float, out: Path, dtype: str = "auto") -> Path:
    """Merge `lora` at `weight` into `model`'s transformer and write `out/transformer/`."""
    from cogfun.common.models import check_model_folder, load_transformer
    from cogfun.train.lora import LoraError
    from cogfun.train.lora_files import merge_lora
    from diffusers.utils.logging import disable_progress_bar

    root = check_model_folder(model, ["transformer"])
    target = out / "transformer"
    if target.resolve() == (root / "transformer").resolve():
        raise LoraError(f"--out {out}: that is the model's own transformer/; choose another folder")
    if target.exists():
        raise LoraError(f"--out {out}: {target} already exists; remove it or choose another --out")
    if dtype != "auto" and dtype not in DTYPES:
        raise LoraError(f"--dtype {dtype}: choose auto, {', '.join(DTYPES)}")
    save_dtype = stored_dtype(root / "transformer") if dtype == "auto" else DTYPES[dtype]

    transformer = load_transformer(root, dtype=torch.float32)
    merged = merge_lora(transformer, lora, weight)
    log.info("merged %d adapted layers of %s at weight %g", len(merged), lora, weight)
    if save_dtype != torch.float32:
        transformer.to(save_dtype)
    disable_progress_bar()  # diffusers' "Writing model shards" bar
    tmp = out / ".tmp-transformer"
    if tmp.exists():
        shutil.rmtree(tmp)
    out.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(target)
    return target
