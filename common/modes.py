"""What a model folder trains as, read from its transformer config (JSON only, no weights).

A CogVideoX-Fun transformer whose input is its latent channels plus a mask and the masked video's
latents (33 for the 16-channel VAE) is an inpaint model; one whose input is the latents alone (16)
is a text-to-video model. `--mode` defaults to that, so no default changes the model's shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def transformer_config_path(model: Path) -> Path:
    return Path(model) / "transformer" / "config.json"


def parse_transformer_config(path: Path) -> dict[str, Any]:
    """The JSON object in a transformer `config.json`; OSError / ValueError when it cannot be read
    or is not an object (callers say what that means for them)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError("the transformer config is not a JSON object")
    return data


def read_transformer_config(model: Path) -> dict[str, Any] | None:
    """`model/transformer/config.json`, or None when there is none or it cannot be read (a
    precompute-only folder; precompute's own check then names the problem)."""
    path = transformer_config_path(model)
    if not path.is_file():
        return None
    try:
        return parse_transformer_config(path)
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None


def model_mode(tconfig: dict[str, Any]) -> str | None:
    """'inpaint' for a (2C+1)-channel input, 'normal' for C, None for anything else (control)."""
    latent = tconfig.get("out_channels", 16)
    have = tconfig.get("in_channels")
    if have == 2 * latent + 1:
        return "inpaint"
    if have == latent:
        return "normal"
    return None


def default_precompute_mode(model: Path) -> str:
    """The model's mode; inpaint when the folder has no (readable) transformer config or the
    transformer is neither kind (precompute's own checks refuse what it cannot serve)."""
    tconfig = read_transformer_config(model)
    return (model_mode(tconfig) if tconfig else None) or "inpaint"
