"""Flags a stage does not take, and what to tell the user about each.

- other-stage: an option of the other command (`--train-batch-size` given to precompute; train takes
  precompute's store-building options, all but `--out`).
- ignored: the original parses it but it does nothing here (or did nothing there either); a warning.
- unsupported: the original acts on it but cogfun does not build it yet; refused, naming it.
"""

from __future__ import annotations

import dataclasses

from cogfun.app.options import ForeignFlag

_ENCODERS_ONCE = "the VAE and T5 run once, in `cogfun precompute`, not during training"
_UNUSED = "the original parses it but never uses it"

# name -> (takes a value, reason)
IGNORED: dict[str, tuple[bool, str]] = {
    "low_vram": (False, _ENCODERS_ONCE),
    "multi_stream": (False, _ENCODERS_ONCE),
    "enable_text_encoder_in_dataloader": (False, _ENCODERS_ONCE),
    "snr_loss": (False, _UNUSED),
    "noise_offset": (True, _UNUSED),
    "input_perturbation": (True, _UNUSED),
    "random_flip": (False, _UNUSED),
    "prediction_type": (True, _UNUSED + " (the scheduler config's prediction_type is used)"),
    "max_train_samples": (True, _UNUSED),
    "cache_dir": (True, "nothing is downloaded: models are read from local folders"),
    "non_ema_revision": (True, _UNUSED),
    "deepspeed_multinode_launcher": (True, "an `accelerate launch` option, not a cogfun one"),
}

UNSUPPORTED: dict[str, bool] = {
    "keep_all_node_same_token_length": False,
    "random_ratio_crop": False,
    "vae_path": True,
    "report_model_info": False,
    "push_to_hub": False,
    "hub_token": True,
    "hub_model_id": True,
}


def _fields(cls: type) -> dict[str, bool]:
    """Field name (and aliases) -> whether the flag takes a value."""
    out: dict[str, bool] = {}
    for f in dataclasses.fields(cls):
        takes_value = not str(f.type).startswith(("bool", "<class 'bool'>"))
        for name in (f.name, *f.metadata.get("aliases", ())):
            out[name] = takes_value
    return out


# `cogfun train` takes `cogfun precompute`'s options too (given --data it builds or reuses the store
# it trains on), all but --out: train names its store with --latents.
TRAIN_STORE_SKIP = ("out",)
_OUT_REASON = (
    "it is `cogfun precompute`'s store path; `cogfun train` reads (and, given --data, builds) the "
    "store named by --latents"
)


def foreign_flags(stage: str) -> dict[str, ForeignFlag]:
    """Every flag `cogfun <stage>` should answer with a message instead of 'No such option'."""
    from cogfun.precompute.config import PrecomputeConfig
    from cogfun.train.config import TrainConfig

    if stage == "precompute":
        own, other_cls, other = _fields(PrecomputeConfig), TrainConfig, "train"
    else:
        store = {k: v for k, v in _fields(PrecomputeConfig).items() if k not in TRAIN_STORE_SKIP}
        own, other_cls, other = {**_fields(TrainConfig), **store}, PrecomputeConfig, "precompute"
    flags: dict[str, ForeignFlag] = {}
    for name, takes_value in _fields(other_cls).items():
        if name not in own:
            reason = f"it is an option of `cogfun {other}`, not `cogfun {stage}`"
            if stage == "train" and name in TRAIN_STORE_SKIP:
                reason = _OUT_REASON
            flags[name] = ForeignFlag(name, "other-stage", takes_value, reason)
    for name, (takes_value, why) in IGNORED.items():
        if name not in own:  # train's --cache-dir is its store read cache, not the original's
            flags[name] = ForeignFlag(name, "ignored", takes_value, why)
    for name, takes_value in UNSUPPORTED.items():
        flags[name] = ForeignFlag(name, "unsupported", takes_value, "not supported yet")
    return flags
