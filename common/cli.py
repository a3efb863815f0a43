"""The `cogfun` command line.

Commands are thin: they parse, build a config, call one `run(...)` and let errors surface. Heavy
imports (torch, diffusers, zarr) happen inside the commands so `cogfun --help` stays fast.
"""

from __future__ import annotations

from importlib.metadata import version as _dist_version
from pathlib import Path

import typer

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
