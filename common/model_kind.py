"""What a CogVideoX-Fun transformer is, read from its config.json alone; what a store was made for.

Both stages decide from JSON before any weights load. Precompute refuses a model it cannot serve
(`check_servable`) and records in the store's settings the transformer layout it chose frame
counts for (`encoded_for`, under the settings key `transformer`); training compares that record with its own
transformer (`cogfun.train.preflight.check_store`).

The Fun model families, by their transformer config (latent channels C = 16 for every Fun VAE):

| family | in_channels | patch_size_t | add_noise_in_inpaint_model |
|---|---|---|---|
| 2b / 5b text to video | C | null | - |
| 2b-InP / 5b-InP (V1.0) | 2C + 1 | null | false |
| V1.1 InP | 2C + 1 | null | true |
| V1.5 InP | 2C + 1 | 2 | true |
| Control / Pose | 2C (noisy + control latents) | null or 2 | - |
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cogfun.common.models import ModelFolderError
from cogfun.common.modes import MODES, parse_transformer_config, transformer_config_path

SETTINGS_KEY = "transformer"  # the store settings entry `encoded_for` fills


class UnsupportedModel(ModelFolderError):
    """A model folder whose transformer cogfun cannot train; the message says which and why."""


def read_transformer_config(model_dir: Path, why: str) -> dict[str, Any]:
    """`model_dir/transformer/config.json` as a dict; ModelFolderError naming the file and `why` it
    is needed when it is missing or unreadable."""
    path = transformer_config_path(model_dir)
    if not path.is_file():
        raise ModelFolderError(f"{path} is missing: {why}")
    try:
        return parse_transformer_config(path)
    except (OSError, ValueError) as err:
        raise ModelFolderError(f"{path}: cannot read the transformer config ({err})") from err


def names_control(tconfig: dict[str, Any]) -> bool:
    """Whether the config says "control" in a key, its class name or the path it was saved from."""
    names = [*tconfig, str(tconfig.get("_class_name", "")), str(tconfig.get("_name_or_path", ""))]
    return any("control" in name.lower() for name in names)


def unsupported_reason(tconfig: dict[str, Any], latent_channels: int) -> str | None:
    """Why cogfun cannot train this transformer on latents of `latent_channels` channels, or None.

    C input channels is text to video, 2C + 1 inpaint (noisy latents, the mask, the masked video);
    2C, or a config that names control, is a Fun control model (noisy + control latents).
    """
    have, c = tconfig.get("in_channels"), latent_channels
    if have == 2 * c or names_control(tconfig):
        return (
            f"the transformer is a CogVideoX-Fun control model (in_channels {have} = {c} noisy + "
            f"{c} control latents): control training is not supported"
        )
    if have not in [m.input_channels(c) for m in MODES.values()]:
        inpaint = MODES["inpaint"].input_channels(c)
        return (
            f"the transformer takes {have} input channels, neither {c} (text to video) nor "
            f"{inpaint} (inpaint: {c} noisy + 1 mask + {c} masked-video latents) for a VAE with "
            f"{c} latent channels: this model is not supported"
        )
    return None


def check_servable(tconfig: dict[str, Any], latent_channels: int, model_dir: Path) -> None:
    """Precompute's refusal of a model whose transformer it cannot make a store for."""
    problems = []
    if (reason := unsupported_reason(tconfig, latent_channels)) is not None:
        problems.append(reason)
    out = tconfig.get("out_channels")
    if out is not None and out != latent_channels:
        problems.append(
            f"the transformer predicts {out} channels but the VAE has {latent_channels} latent "
            "channels (a VAE from another model?)"
        )
    if tconfig.get("patch_size_t") is not None and not (
        isinstance(tconfig["patch_size_t"], int) and tconfig["patch_size_t"] >= 1
    ):
        problems.append(f"patch_size_t {tconfig['patch_size_t']!r} is not a positive integer")
    if problems:
        raise UnsupportedModel(f"model folder {model_dir}: " + "; ".join(problems))


def encoded_for(tconfig: dict[str, Any]) -> dict[str, Any]:
    """The transformer layout a store's frame counts and buckets were chosen for (diffusers'
    defaults: patch 2, no temporal patch)."""
    return {
        "patch_size": tconfig.get("patch_size", 2),
        "patch_size_t": tconfig.get("patch_size_t"),
    }


def recorded_for(settings: dict[str, Any]) -> dict[str, Any] | None:
    """`encoded_for` as a store recorded it, or None for stores written before it was recorded
    (those were all made with the frame rule of transformers without `patch_size_t`)."""
    record = settings.get(SETTINGS_KEY)
    return record if isinstance(record, dict) else None
