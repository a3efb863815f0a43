"""The `cogfun` command line.

Commands are thin: they parse, build a config, call one `run(...)` and let errors surface. Heavy
imports (torch, diffusers, zarr) happen inside the commands so `cogfun --help` stays fast.
"""

from __future__ import annotations

import errno
from importlib.metadata import version as _dist_version
from pathlib import Path

import typer
from cogfun.common.options import add_stage_command
from cogfun.common.stage_flags import foreign_flags
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
        "2b-inp", "--variant", help="2b-inp (33 input channels), 2b (16), 5b-inp (rotary)."
    ),
    seed: int = typer.Option(
        0, "--seed", help="Seed for the random weights; same seed, same bytes."
    ),
) -> None:
    """Write a random-weight miniature CogVideoX-Fun model folder (runs in seconds on a CPU)."""
    from cogfun.common.tiny import VARIANTS, write_tiny_model

    if variant not in VARIANTS:
        raise typer.BadParameter(
            f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}",
            param_hint="--variant",
        )
    path = write_tiny_model(out_dir, variant=variant, seed=seed)
    typer.echo(f"wrote tiny {variant} model to {path}")


@app.command("inspect")
def inspect_command(
    store: Path = typer.Argument(
        ..., help="The store folder written by `cogfun precompute` (e.g. latents.zarr)."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object on stdout and nothing else."
    ),
    verify: bool = typer.Option(
        False,
        "--verify",
        help="Read every sample against its checksum; exit 1 listing damaged samples.",
    ),
) -> None:
    """Show a latent store: buckets, samples, bytes, settings, fingerprint, digest and failures."""
    from cogfun.precompute.inspect import inspect_store

    raise typer.Exit(inspect_store(store, as_json=as_json, verify=verify))


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


def _run_train(cfg: TrainConfig) -> None:
    from cogfun.train.run import REFUSALS, run

    try:
        run(cfg)
    except REFUSALS as err:
        typer.echo(f"cogfun train: {err}", err=True)
        raise typer.Exit(2) from err
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # Checkpoints are written under a temporary name and renamed when complete, so the newest
        # checkpoint-N on disk is whole; the resumed run repeats the lost steps exactly.
        typer.echo(
            f"cogfun train: the disk is full ({err}). Checkpoints already saved in "
            f"{cfg.output_dir} are complete: free some space and rerun the same command, it "
            "resumes from the latest one.",
            err=True,
        )
        raise typer.Exit(2) from err


add_stage_command(
    app,
    "train",
    TrainConfig,
    _run_train,
    help="Train the CogVideoX-Fun transformer on a precomputed latent store (single process, "
    "or under `accelerate launch` for DDP / DeepSpeed ZeRO-2).",
    foreign=foreign_flags("train"),
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
    from cogfun.common.demo import run_demo

    run_demo(workdir, steps=steps, echo=lambda msg: typer.echo(msg, err=True))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
