"""Stage options declared once, as dataclass fields, turned into Typer commands.

Each stage has one config dataclass (`cogfun.precompute.config.PrecomputeConfig`,
`cogfun.train.config.TrainConfig`). Every field is declared with `cogfun.common.fields.option`
and carries its help text in `metadata`; this module (the app layer, which may read both stages)
builds the command-line options from those fields so the CLI, `--config FILE` and the tests share
one set of defaults. Every option is accepted in both spellings (`--train-batch-size` and the
original's `--train_batch_size`); booleans get `--no-…` forms. Path fields reach the command as
text, so a store's URL (`STORE_FIELDS`: `--out`, `--latents`) keeps its `//`.
`cogfun.app.stage_command` turns the fields into commands, makes the paths, and answers flags a
stage does not take.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import typer


def flag_names(name: str) -> list[str]:
    """`train_batch_size` -> ['--train-batch-size', '--train_batch_size'] (dashed form first)."""
    dashed = "--" + name.replace("_", "-")
    under = "--" + name
    return [dashed] if dashed == under else [dashed, under]


def _bool_decls(name: str) -> list[str]:
    dashed = name.replace("_", "-")
    decls = [f"--{dashed}/--no-{dashed}"]
    if dashed != name:
        decls.append(f"--{name}/--no_{name}")
    return decls


def _base_type(tp: Any) -> Any:
    """`int | None` -> int; `list[str]` stays."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


# Fields naming a store: a local path or an object-store URL (`cogfun.config.store_paths`). Every
# other path option takes a local path only.
STORE_FIELDS = ("out", "latents")


def _cli_type(tp: Any) -> Any:
    """Path options reach the command as text, so a URL keeps its `//`; the command makes them
    Paths (`stage_command`), store URLs excepted."""
    if "Path" not in str(tp):
        return tp
    return list[str] if typing.get_origin(tp) is list else str


def is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def typer_param(
    f: dataclasses.Field, hints: dict[str, Any], *, required: bool = True
) -> inspect.Parameter:
    """One command-line option for a config field. A required field is optional to click: it may
    come from the --config file, so the command checks it once both are merged."""
    tp = _base_type(hints[f.name])
    metavar = ("PATH|URL" if f.name in STORE_FIELDS else "PATH") if "Path" in str(tp) else None
    metavar = "JSON" if f.name == "storage_options" else metavar
    tp = _cli_type(tp)
    meta = f.metadata
    help_text = meta.get("help", "")
    if meta.get("choices"):
        help_text += f" One of: {', '.join(meta['choices'])}."
    if required and is_required(f):
        help_text += " Required (here or in --config)."
    default: Any = None  # "not given": the config file's value, else the dataclass default applies
    if tp is bool:
        decls = _bool_decls(f.name)
        for alias in meta.get("aliases", ()):
            decls += _bool_decls(alias)
        opt = typer.Option(default, *decls, help=help_text, show_default=False)
        annotation: Any = bool | None
    else:
        decls = flag_names(f.name)
        for alias in meta.get("aliases", ()):
            decls += flag_names(alias)
        opt = typer.Option(default, *decls, help=help_text, show_default=False, metavar=metavar)
        annotation = tp | None
    return inspect.Parameter(
        f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=annotation
    )


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML, TOML or JSON config file into a flat dict of option values."""
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    elif path.suffix == ".toml":
        data = tomllib.loads(text)
    elif path.suffix == ".json":
        data = json.loads(text)
    else:
        raise typer.BadParameter(
            f"{path}: use a .yaml, .yml, .toml or .json file", param_hint="--config"
        )
    if not isinstance(data, dict):
        raise typer.BadParameter(
            f"{path}: expected a mapping of option names to values", param_hint="--config"
        )
    return data


def normalize_key(key: str) -> str:
    return key.strip().lstrip("-").replace("-", "_")


@dataclasses.dataclass(frozen=True)
class ForeignFlag:
    """A flag this stage does not take: `kind` is 'other-stage', 'ignored' or 'unsupported'."""

    name: str
    kind: str
    takes_value: bool
    reason: str


def options_markdown(title: str, config_cls: type) -> str:
    """The README's table of one stage's options, generated from the dataclass (so it stays true)."""
    rows = [f"### {title} options", "", "| option | default | what it does |", "|---|---|---|"]
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "required"
        dashed = f.name.replace("_", "-")
        is_bool = isinstance(default, bool) or _base_type(f.type) in (bool, "bool", "bool | None")
        name = f"`--{dashed}` / `--no-{dashed}`" if is_bool else f"`--{dashed}`"
        aliases = f.metadata.get("aliases", ())
        if aliases:
            name += " (" + ", ".join(f"`--{a}`" for a in aliases) + ")"
        text = f.metadata.get("help", "").replace("|", "\\|")
        if f.metadata.get("choices"):
            text += " One of: " + ", ".join(f.metadata["choices"]) + "."
        if f.metadata.get("shown"):
            default = f.metadata["shown"]
        elif isinstance(default, bool):
            default = "on" if default else "off"
        elif default is None or default == []:
            default = "—"
        rows.append(f"| {name} | {default} | {text} |")
    return "\n".join(rows) + "\n"


def readme_options_block() -> str:
    """Both stages' tables, as the README holds them between its `options` markers."""
    from cogfun.precompute.config import PrecomputeConfig
    from cogfun.train.config import TrainConfig

    return (
        options_markdown("`cogfun precompute`", PrecomputeConfig)
        + "\n"
        + options_markdown("`cogfun train`", TrainConfig)
        + "\n`cogfun train` also takes every `cogfun precompute` option above but `--out`: given "
        "`--data` (`--train_data_dir`) it first reuses the store at `--latents` when that store is "
        "complete and was written with the same settings, refuses it when it was written with "
        "others (naming each difference), and otherwise builds or resumes it with precompute on "
        "every launched process. Without `--data`, precompute options are refused.\n"
    )
