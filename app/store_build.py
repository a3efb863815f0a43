"""`cogfun train --data ...`: find or build the store a run trains on, as `cogfun precompute` would.

The original trains from the dataset in one command; cogfun encodes it once into a store. Given
`--data`/`--train_data_dir`, `cogfun train` takes `cogfun precompute`'s options (all but `--out`: the
store is `--latents`) and, before training:

- reuses the store at `--latents` when it is complete, was written with the same settings (the
  fingerprint precompute records: every option that shapes the stored bytes, the VAE / text encoder /
  tokenizer files, the transformer layout) and last planned from a metadata file with the same
  bytes, without reading it again;
- refuses a complete store written with other settings, naming each difference;
- otherwise runs precompute with those settings on every launched process (it shares the work by
  rank under `accelerate launch`, resumes an interrupted store, updates one to an edited metadata
  file by encoding only new rows, and refuses one with other settings). A media file changed in
  place under an unchanged metadata file is picked up by running `cogfun precompute` itself.

It is where the two stages meet, so it lives in the app layer: training takes a `StoreOptions`
(`cogfun.train.setup.StoreSource`) and never imports precompute.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cogfun.app.options import flag_names
from cogfun.common.store.schema import (
    FingerprintMismatch,
    fingerprint,
    settings_diff,
)
from cogfun.precompute.config import PrecomputeConfig
from cogfun.train.config import TrainConfig
from cogfun.train.preflight import TrainRefused
from cogfun.train.stores import parse_latents

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreOptions:
    """The `cogfun precompute` options given to `cogfun train` (empty: train the store at
    --latents as it is), as the `StoreSource` `cogfun.train.setup.setup` calls."""

    values: dict[str, Any]

    def check(self, cfg: TrainConfig) -> None:
        check_store_options(self.values, cfg.latents)

    def ensure(self, cfg: TrainConfig) -> None:
        build = store_config(cfg, self.values)
        if build is not None:
            ensure_store(build)


def check_store_options(values: dict[str, Any], latents: Path | str | list[Path | str]) -> None:
    """Store options without --data would be silently unused: refuse them, naming each; --data
    builds one store, so it takes one --latents."""
    stores = [latents] if isinstance(latents, Path | str) else latents
    named = " ".join(map(str, stores))
    if values and values.get("data") is None:
        flags = ", ".join(flag_names(k)[0] for k in sorted(values))
        raise TrainRefused(
            f"{flags} set how a store is built, which needs --data (--train_data_dir): without it "
            f"`cogfun train` trains on the store(s) at --latents {named} as they are"
        )
    if values and len(stores) > 1:
        raise TrainRefused(
            f"--data builds one store, at --latents; {len(stores)} were given ({named}): build "
            "each with `cogfun precompute`, then train on them together without --data"
        )


def store_config(cfg: TrainConfig, values: dict[str, Any]) -> PrecomputeConfig | None:
    """The precompute settings of the store to build, from the store options given to train and
    the run's own model, store path, resolved mode, seed and progress (None when no store option
    was given: train uses the store at --latents as it is)."""
    check_store_options(values, cfg.latents)
    if not values:
        return None
    out = parse_latents(cfg.latents)[0].path  # a weight (`:N`) is the run's, not the store's
    shared = dict(model=cfg.model, out=out, seed=cfg.seed, progress=cfg.progress)
    return PrecomputeConfig(**values, **shared, mode=cfg.mode)


def ensure_store(build: PrecomputeConfig) -> None:
    """Reuse the matching complete store at `build.out`, or build (resume) it with precompute."""
    expected = _expected_settings(build)
    state = _store_state(build.out, expected, build.meta_path())
    if state == "reuse":
        log.info(
            "reusing the store %s: it is complete and was written with these settings "
            "(fingerprint %s); nothing to encode",
            build.out,
            fingerprint(expected)[:16],
        )
        return
    log.info(
        "%s the store %s from %s with precompute (resumable: rerun the same command after an "
        "interruption)",
        {"resume": "resuming", "update": "updating"}.get(state, "building"),
        build.out,
        build.meta_path(),
    )
    _run_precompute(build)


def _expected_settings(build: PrecomputeConfig) -> dict[str, Any]:
    """The settings precompute would record for `build` on this machine's device."""
    import torch
    from cogfun.common.model_kind import read_transformer_config
    from cogfun.common.models import check_model_folder
    from cogfun.common.store.schema import (
        normalise_json,
    )
    from cogfun.precompute import run as precompute
    from cogfun.precompute import store_setup
    from cogfun.precompute.encode import resolve_dtype
    from cogfun.precompute.ranks import use_cuda

    check_model_folder(build.model, precompute.MODEL_PARTS)
    if not build.meta_path().is_file():
        raise TrainRefused(f"--data {build.data}: no metadata file {build.meta_path()}")
    device = torch.device("cuda" if use_cuda() else "cpu")
    tconfig = read_transformer_config(build.model, store_setup.TRANSFORMER_CONFIG_NEEDED)
    settings = store_setup.build_settings(
        build,
        resolve_dtype(build.vae_dtype, device),
        resolve_dtype(build.text_encoder_dtype, device),
        tconfig,
    )
    return normalise_json(settings, "settings")


def _store_state(path: Path | str, expected: dict[str, Any], metadata: Path) -> str:
    """'new' (no store), 'resume' (unfinished, same settings), 'update' (complete, same settings,
    another metadata file: precompute adds and retires rows) or 'reuse' (complete, same settings
    and metadata); a store with other settings is refused naming each difference."""
    from cogfun.common.store import location
    from cogfun.common.store.io import check_root
    from cogfun.precompute.plan import file_sha256

    if not (location(path) / "zarr.json").is_file():  # a local folder or an object store
        return "new"
    root = check_root(path)
    if root.get("fingerprint") != fingerprint(expected):
        diff = settings_diff(root.get("settings") or {}, expected)
        raise _mismatch(
            FingerprintMismatch(
                path, diff or {"fingerprint": (root.get("fingerprint"), fingerprint(expected))}
            )
        )
    if root.get("status") != "complete":
        return "resume"
    # The dataset is not in the fingerprint: an edited metadata file updates the store.
    recorded = (root.get("attrs") or {}).get("metadata_sha256")
    return "reuse" if recorded == file_sha256(metadata) else "update"


def _mismatch(err: FingerprintMismatch) -> TrainRefused:
    lines = [f"  {key}: {old!r} -> {new!r}" for key, (old, new) in sorted(err.diff.items())]
    return TrainRefused(
        f"the store {err.path} (--latents) was written with other settings than this command "
        "asks for; refusing to mix them:\n"
        + "\n".join(lines)
        + "\ntrain with another --latents (a new store is built there) or delete this one."
    )


def _run_precompute(build: PrecomputeConfig) -> None:
    from cogfun.precompute.metadata import MetadataError
    from cogfun.precompute.run import OptionError, SetupAborted, run_precompute

    try:
        outcome = run_precompute(build)
    except FingerprintMismatch as err:
        raise _mismatch(err) from err
    except (MetadataError, SetupAborted, OptionError) as err:
        raise TrainRefused(f"building the store {build.out}: {err}") from err
    if outcome.code != 0:
        raise TrainRefused(
            f"building the store {build.out}: no sample could be encoded (see the messages above)"
        )
    # Precompute's accelerate state describes its own processes (on CPU without a distributed type,
    # so accelerate's gather would return one rank's value): the training Accelerator must build its
    # own over the process group precompute started.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
