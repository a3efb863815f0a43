"""`cogfun train`: check the store against the model, set up, then fit.

    cogfun train --latents latents.zarr --model MODEL --output-dir out
    cogfun train --latents s3://bucket/prefix/latents.zarr [--storage-options JSON] \\
        [--cache-dir DIR [--cache-max-gb G]] --model MODEL --output-dir out
    cogfun train --train_data_dir DATA --train_data_meta DATA/metadata.json --model MODEL ...
    accelerate launch --multi_gpu --num_processes 2 $(which cogfun) train ...
    accelerate launch --use_deepspeed --deepspeed_config_file config/zero_stage2_config.json \\
        --num_processes 2 $(which cogfun) train ...

(On CPU, DDP needs `ACCELERATE_USE_CPU=true` with `--multi_gpu`; never `--cpu` with DeepSpeed.)

Given the dataset (`--data`/`--train_data_dir` and precompute's options) the store at `--latents`
is first reused when it matches, or built by precompute (`cogfun.app.store_build`). The store is
then opened and checked, so a store that cannot train this model (no masks for an
inpaint run, other latent channels, VAE, scaling or text width, no samples, unfinished or damaged)
is refused before anything heavy loads. Only the transformer and the scheduler config are loaded
for training; with --validation-prompts, T5 encodes prompt texts once before the transformer loads
and the VAE is loaded for each validation round's decode (`cogfun.train.validation`).
"""

from __future__ import annotations

from cogfun.common.models import ModelFolderError
from cogfun.common.progress import setup_logging
from cogfun.common.store import StoreError
from cogfun.config.store_paths import apply_storage_options
from cogfun.train import distributed, optim
from cogfun.train.checkpoint import CheckpointError
from cogfun.train.config import TrainConfig
from cogfun.train.loop import fit
from cogfun.train.preflight import TrainRefused
from cogfun.train.setup import StoreSource, setup

# What the CLI reports as a message and a non-zero exit rather than a traceback.
REFUSALS = (
    TrainRefused,
    StoreError,
    ModelFolderError,
    CheckpointError,
    distributed.UnsafeCheckpoint,
    optim.TrainableModulesError,
)


def run(config: TrainConfig, store: StoreSource | None = None) -> None:
    """Train; `store` finds or builds the store at `config.latents` first (`cogfun train` given
    `cogfun precompute`'s options: `cogfun.app.store_build.StoreOptions`)."""
    setup_logging()
    apply_storage_options(config.storage_options)  # every launched process parses its own
    fit(setup(config, store))
