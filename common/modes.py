"""The training modes (`--mode`) and what a model folder trains as, read from its transformer
config (JSON only, no weights).

`MODES` is the one registry of what a mode means: whether precompute draws masks and encodes the
masked videos (and training feeds them), and so how many input channels the transformer takes.
A CogVideoX-Fun transformer whose input is its latent channels plus a mask and the masked video's
latents (33 for the 16-channel VAE) is an inpaint model; one whose input is the latents alone (16)
is a text-to-video model. `--mode` defaults to that, so no default changes the model's shape.

    mode_facts("inpaint").input_channels(16)  # 33
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Mode:
    """One `--mode`: its name and whether it conditions on masks."""

    name: str
    # Precompute draws K masks per sample and encodes each masked video; training picks one and
    # feeds the mask and the masked video's latents beside the noisy latents.
    needs_masks: bool

    def input_channels(self, latent_channels: int) -> int:
        """Transformer input channels: the noisy latents, plus mask (1) and masked-video latents
        (C) when the mode needs masks."""
        return 2 * latent_channels + 1 if self.needs_masks else latent_channels


# name -> facts, in the order the options list them (inpaint first: the default of a folder
# without a transformer config).
MODES: dict[str, Mode] = {
    "inpaint": Mode("inpaint", needs_masks=True),
    "normal": Mode("normal", needs_masks=False),
}


def mode_facts(name: str) -> Mode:
    """The registry's entry for `name`; ValueError naming the modes for anything else."""
    try:
        return MODES[name]
    except (KeyError, TypeError):
        raise ValueError(f"mode {name!r} is not one of {tuple(MODES)}") from None


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
    return next((m.name for m in MODES.values() if m.input_channels(latent) == have), None)


def default_precompute_mode(model: Path) -> str:
    """The model's mode; inpaint when the folder has no (readable) transformer config or the
    transformer is neither kind (precompute's own checks refuse what it cannot serve)."""
    tconfig = read_transformer_config(model)
    return (model_mode(tconfig) if tconfig else None) or "inpaint"
