"""The samplers `cogfun sample` offers, by the names of the original's predict scripts.

CogVideoX-Fun's `predict_t2v.py` / `predict_i2v.py` pick a diffusers scheduler class by name and build
it from the model's own `scheduler/scheduler_config.json` (`Class.from_pretrained(model,
subfolder="scheduler")`), so every sampler gets the shipped betas, zero-SNR rescale and
v-prediction; what each class does with `snr_shift_scale` differs (tests/golden/README.md section 13:
DDIMScheduler ignores it, the CogVideoX schedulers apply it). "DDIM_Origin" is the scripts' default.
"CogVideoX_DPM" is not in the scripts' list but the inpaint pipeline has a branch for it.

    scheduler = build_scheduler("DDIM_Origin", "models/CogVideoX-Fun-V1.1-2b-InP")

Training's schedule is one fixed class, `load_noise_scheduler` (DDPMScheduler), from the same file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import diffusers

# name -> diffusers class name, in the predict scripts' order; the first entry is the default.
SCHEDULERS: dict[str, str] = {
    "DDIM_Origin": "DDIMScheduler",
    "DDIM_Cog": "CogVideoXDDIMScheduler",
    "DPM++": "DPMSolverMultistepScheduler",
    "Euler": "EulerDiscreteScheduler",
    "Euler A": "EulerAncestralDiscreteScheduler",
    "PNDM": "PNDMScheduler",
    "CogVideoX_DPM": "CogVideoXDPMScheduler",
}
DEFAULT_SCHEDULER = "DDIM_Origin"


def scheduler_folder(model: str | Path) -> Path:
    """The folder holding a model's `scheduler_config.json`: `model/scheduler`, or `model` itself
    when it is a scheduler folder. FileNotFoundError when neither has one."""
    root = Path(model)
    for folder in (root / "scheduler", root):
        if (folder / "scheduler_config.json").is_file():
            return folder
    raise FileNotFoundError(
        f"{root}: no scheduler_config.json (looked in the folder and in its scheduler/)"
    )


def scheduler_config(model: str | Path) -> dict[str, Any]:
    """The model's `scheduler/scheduler_config.json` as a dict (a scheduler folder itself works too)."""
    return json.loads((scheduler_folder(model) / "scheduler_config.json").read_text())


def load_noise_scheduler(model: str | Path) -> diffusers.DDPMScheduler:
    """The training noise schedule: the model's scheduler config read as a `DDPMScheduler`, as the
    original's scripts/train.py reads it (a model folder, or a scheduler folder itself).

    The shipped JSON is a CogVideoXDDIMScheduler config; DDPMScheduler keeps its betas, zero-SNR
    rescale and v-prediction, and ignores `snr_shift_scale` (so Fun trains on the unshifted
    schedule; tests/golden/README.md section 2)."""
    return diffusers.DDPMScheduler.from_pretrained(scheduler_folder(model), local_files_only=True)


def build_scheduler(name: str, config: Mapping[str, Any] | str | Path) -> Any:
    """A fresh scheduler of the named kind, built from `config` (a dict, or a model folder).

    Keys a class does not know (such as `snr_shift_scale` for DDIMScheduler) are dropped, as
    `from_pretrained` drops them in the original scripts.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    if not isinstance(config, Mapping):
        config = scheduler_config(config)
    cls = getattr(diffusers, SCHEDULERS[name])
    known = set(cls._get_init_keys(cls)) if hasattr(cls, "_get_init_keys") else None
    clean = {k: v for k, v in config.items() if known is None or k in known or k.startswith("_")}
    return cls.from_config(clean)
