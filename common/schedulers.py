"""The samplers `cogfun sample` offers, by the names of the original's predict scripts.

CogVideoX-Fun's `predict_t2v.py` / `predict_i2v.py` pick a diffusers scheduler class by name and build
it from the model's own `scheduler/scheduler_config.json` (`Class.from_pretrained(model,
subfolder="scheduler")`), so every sampler gets the shipped betas, zero-SNR rescale and
v-prediction; what each class does with `snr_shift_scale` differs (tests/golden/README.md section 13:
DDIMScheduler ignores it, the CogVideoX schedulers apply it). "DDIM_Origin" is the scripts' default.
"CogVideoX_DPM" is not in the scripts' list but the inpaint pipeline has a branch for it.

    scheduler = build_scheduler("DDIM_Origin", "models/CogVideoX-Fun-V1.1-2b-InP")
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


def scheduler_config(model: str | Path) -> dict[str, Any]:
    """The model's `scheduler/scheduler_config.json` as a dict (a scheduler folder itself works too)."""
    root = Path(model)
    for candidate in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise FileNotFoundError(
        f"{root}: no scheduler config (expected {root / 'scheduler' / 'scheduler_config.json'})"
    )


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
