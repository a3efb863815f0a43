"""The `cogfun` command line.

Commands are thin: they parse, build a config, call one `run(...)` and let errors surface. Heavy
imports (torch, diffusers, zarr) happen inside the commands so `cogfun --help` stays fast.
"""

from __future__ import annotations

from importlib.metadata import version as _dist_version
from pathlib import Path

import typer
from cogfun.app.sample_cli import register as _register_sampling
from cogfun.app.stage_command import add_stage_command
from cogfun.app.stage_flags import TRAIN_STORE_SKIP, foreign_flags
from cogfun.common.disk_full import disk_full_message
from cogfun.config.store_paths import STORAGE_OPTIONS_HELP
from cogfun.precompute.config import PrecomputeConfig
from cogfun.train.config import TrainConfig

app = typer.Typer(
    name="cogfun",
    help="Train CogVideoX-Fun video diffusion models in two stages: precompute latents once, then train.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"cogfun {_dist_version('cogfun')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_version_callback,
        is_eager=True,
        help="Print the version and exit.",
    ),
) -> None:
    """cogfun: precompute VAE/T5 latents into a Zarr store, then train the transformer on them."""


@app.command("tiny-model")
def tiny_model(
    out_dir: Path = typer.Argument(..., help="Folder to write the model into (diffusers layout)."),
    variant: str = typer.Option(
        "2b-inp",
        "--variant",
        help="2b-inp (33 input channels), 2b (16), 5b-inp (rotary), "
        "v15-5b-inp (CogVideoX-Fun V1.5: patch_size_t 2, rotary).",
    ),
    seed: int = typer.Option(
        0, "--seed", help="Seed for the random weights; same seed, same bytes."
    ),
) -> None:
    """Write a random-weight miniature CogVideoX-Fun model folder (runs in seconds on a CPU)."""
    from cogfun.testing.tiny import VARIANTS, write_tiny_model

    if variant not in VARIANTS:
        raise typer.BadParameter(
            f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}",
            param_hint="--variant",
        )
    path = write_tiny_model(out_dir, variant=variant, seed=seed)
    typer.echo(f"wrote tiny {variant} model to {path}")


@app.command("inspect")
def inspect_command(
    store: str = typer.Argument(
        ...,
        metavar="STORE",
        help="The store written by `cogfun precompute`: a folder (e.g. latents.zarr) or an "
        "object-store URL (s3://bucket/prefix/latents.zarr, gs://..., az://...).",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object on stdout and nothing else."
    ),
    verify: bool = typer.Option(
        False,
        "--verify",
        help="Read every sample against its checksum; exit 1 listing damaged samples.",
    ),
    storage_options: str | None = typer.Option(
        None,
        "--storage-options",
        "--storage_options",
        metavar="JSON",
        help=STORAGE_OPTIONS_HELP,
    ),
) -> None:
    """Show a latent store: buckets, samples, bytes, settings, fingerprint, digest and failures."""
    from cogfun.app.stage_command import checked_storage_options, usage_error
    from cogfun.config.store_paths import apply_storage_options, check_store_url, store_path
    from cogfun.precompute.inspect import inspect_store

    try:
        check_store_url(store, "STORE")
    except ValueError as err:
        usage_error(str(err))
    if storage_options is not None:
        apply_storage_options(checked_storage_options(storage_options))
    raise typer.Exit(inspect_store(store_path(store), as_json=as_json, verify=verify))


def _run_precompute(cfg: PrecomputeConfig) -> None:
    from cogfun.precompute.run import run

    raise typer.Exit(run(cfg))


add_stage_command(
    app,
    "precompute",
    PrecomputeConfig,
    _run_precompute,
    help="Decode, bucket, mask and VAE/T5-encode a dataset once into a Zarr latent store "
    "(resumable; `accelerate launch` splits the work by process).",
    foreign=foreign_flags("precompute"),
)


def _run_train(cfg: TrainConfig, store_options: dict) -> None:
    from cogfun.app.store_build import StoreOptions
    from cogfun.train.divergence import EXIT_DIVERGED, TrainingDiverged
    from cogfun.train.run import REFUSALS, run

    try:
        run(cfg, StoreOptions(store_options))
    except REFUSALS as err:
        typer.echo(f"cogfun train: {err}", err=True)
        raise typer.Exit(2) from err
    except TrainingDiverged as err:  # its own code: rerunning the same command is not the fix
        typer.echo(f"cogfun train: {err}", err=True)
        raise typer.Exit(EXIT_DIVERGED) from err
    except OSError as err:
        # Checkpoints are written under a temporary name and renamed when complete, so the newest
        # checkpoint-N on disk is whole; the resumed run repeats the lost steps exactly.
        kept = f"Checkpoints already saved in {cfg.output_dir} are complete"
        message = disk_full_message(err, kept, "from the latest one")
        if message is None:
            raise
        typer.echo(f"cogfun train: {message}.", err=True)
        raise typer.Exit(2) from err


add_stage_command(
    app,
    "train",
    TrainConfig,
    _run_train,
    help="Train the CogVideoX-Fun transformer on a precomputed latent store (single process, "
    "or under `accelerate launch` for DDP, DeepSpeed ZeRO-2/3 or FSDP2). Given --data "
    "(--train_data_dir) "
    "and precompute's options, it first reuses the matching store at --latents or builds it.",
    foreign=foreign_flags("train"),
    extra_cls=PrecomputeConfig,
    extra_skip=TRAIN_STORE_SKIP,
)


@app.command("demo")
def demo(
    workdir: Path = typer.Option(
        Path("cogfun-demo"),
        "--workdir",
        help="Folder for the model, data, store and output (replaced).",
    ),
    steps: int = typer.Option(20, "--steps", help="Training steps."),
) -> None:
    """Tiny model + generated clips -> precompute -> train -> inspect, on CPU in about a minute."""
    from cogfun.app.demo import run_demo

    run_demo(workdir, steps=steps, echo=lambda msg: typer.echo(msg, err=True))


@app.command("doctor")
def doctor(
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object on stdout and nothing else."
    ),
    require_cuda: bool = typer.Option(
        False, "--require-cuda", help="Count a missing CUDA device as a problem (exit 1)."
    ),
) -> None:
    """Check this install: versions against cogfun's ranges, CUDA devices, bf16, DeepSpeed ops."""
    from cogfun.app.doctor import run_doctor

    raise typer.Exit(run_doctor(as_json=as_json, require_cuda=require_cuda))


_register_sampling(app)  # `cogfun sample` and `cogfun encode-prompts` (app/sample_cli.py)


@app.command("merge-lora")
def merge_lora_command(
    model: Path = typer.Option(..., "--model", help="Model folder whose transformer/ is merged."),
    lora: Path = typer.Option(
        ..., "--lora", help="LoRA file: the original's checkpoint-N.safetensors or diffusers'."
    ),
    lora_weight: float = typer.Option(
        1.0, "--lora-weight", help="Multiplier of the update (the original's predict uses 0.55)."
    ),
    out: Path = typer.Option(..., "--out", help="Folder to write the merged transformer/ into."),
    dtype: str = typer.Option(
        "auto", "--dtype", help="auto (the model's stored dtype), fp32, bf16 or fp16."
    ),
) -> None:
    """Merge a LoRA into a model's transformer: W += weight x (alpha / rank) x up @ down."""
    from cogfun.common.models import ModelFolderError
    from cogfun.train.lora import LoraError
    from cogfun.train.lora_merge import merge_to_folder

    try:
        target = merge_to_folder(model, lora, lora_weight, out, dtype=dtype)
    except (LoraError, ModelFolderError) as err:
        typer.echo(f"cogfun merge-lora: {err}", err=True)
        raise typer.Exit(2) from err
    typer.echo(f"wrote {target}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
