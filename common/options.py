"""Stage options declared once, as dataclass fields, turned into Typer commands.

Each stage has one config dataclass (`cogfun.precompute.config.PrecomputeConfig`,
`cogfun.train.config.TrainConfig`). Every field carries its help text in `metadata`; this module
builds the command-line options from those fields so the CLI, `--config FILE` and the tests share one
set of defaults. Every option is accepted in both spellings (`--train-batch-size` and the original's
`--train_batch_size`); booleans get `--no-…` forms. Flags that belong to the other stage, flags the
original parses but that do nothing here, and flags not built yet get their own clear messages.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import tomllib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import typer
from typer.core import TyperCommand

log = logging.getLogger("cogfun")


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    aliases: tuple[str, ...] = (),
    choices: tuple[str, ...] | None = None,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A config field: default, one line of help, original-spelling aliases, allowed values."""
    meta = {"help": help, "aliases": aliases, "choices": choices}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


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


def _typer_param(f: dataclasses.Field, hints: dict[str, Any]) -> inspect.Parameter:
    tp = _base_type(hints[f.name])
    meta = f.metadata
    help_text = meta.get("help", "")
    if meta.get("choices"):
        help_text += f" One of: {', '.join(meta['choices'])}."
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    default: Any = ... if required else None  # None = "not given": the dataclass default applies
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
        opt = typer.Option(default, *decls, help=help_text, show_default=False)
        annotation = tp if required else tp | None
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


def build_config(
    config_cls: type,
    given: dict[str, Any],
    config_file: Path | None,
    foreign: dict[str, ForeignFlag] | None = None,
) -> Any:
    """Dataclass defaults < config file < command line. Unknown config-file keys are refused."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    aliases = {a: f.name for f in fields.values() for a in f.metadata.get("aliases", ())}
    values: dict[str, Any] = {}
    if config_file is not None:
        for raw_key, value in load_config_file(config_file).items():
            key = aliases.get(normalize_key(raw_key), normalize_key(raw_key))
            if key in fields:
                values[key] = value
            elif foreign and key in foreign:
                check_foreign(foreign[key], f"{config_file}: {raw_key}")
            else:
                raise typer.BadParameter(
                    f"{config_file}: unknown option {raw_key!r}", param_hint="--config"
                )
    values.update({k: v for k, v in given.items() if v is not None})
    for key, value in values.items():
        choices = fields[key].metadata.get("choices")
        if choices and value not in choices:
            raise typer.BadParameter(
                f"{value!r} is not one of {', '.join(choices)}", param_hint=flag_names(key)[0]
            )
    return config_cls(**values)


def check_foreign(flag: ForeignFlag, where: str) -> None:
    if flag.kind == "ignored":
        log.warning("%s is accepted but does nothing: %s", where, flag.reason)
        return
    raise typer.BadParameter(flag.reason, param_hint=where)


def add_stage_command(
    app: typer.Typer,
    name: str,
    config_cls: type,
    run: Callable[[Any], Any],
    *,
    help: str,
    foreign: dict[str, ForeignFlag],
) -> None:
    """Register `cogfun <name>` with one option per field of `config_cls` plus `--config FILE`."""
    hints = typing.get_type_hints(config_cls)
    params = [_typer_param(f, hints) for f in dataclasses.fields(config_cls)]
    params.append(
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Path | None,
            default=typer.Option(
                None,
                "--config",
                help="YAML/TOML/JSON file of options; command-line flags override it.",
                exists=True,
                dir_okay=False,
            ),
        )
    )

    def command(ctx: typer.Context, **kwargs: Any) -> None:
        for key in ctx.meta.get("cogfun_foreign", {}):
            check_foreign(foreign[key], flag_names(key)[0])
        config_file = kwargs.pop("config")
        run(build_config(config_cls, kwargs, config_file, foreign))

    ctx_param = inspect.Parameter(
        "ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context
    )
    command.__signature__ = inspect.Signature([ctx_param, *params])  # type: ignore[attr-defined]
    command.__doc__ = help
    app.command(name, help=help, cls=_foreign_aware_command(foreign))(command)


def _foreign_aware_command(foreign: dict[str, ForeignFlag]) -> type[TyperCommand]:
    """A command class that takes the foreign flags out of argv before click parses it, so they get
    a message naming the right stage (or why they do nothing) instead of 'No such option'."""

    class ForeignAwareCommand(TyperCommand):
        def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
            rest, found = split_foreign_args(args, foreign)
            ctx.meta["cogfun_foreign"] = found
            return super().parse_args(ctx, rest)

    return ForeignAwareCommand


def split_foreign_args(
    args: list[str], foreign: dict[str, ForeignFlag]
) -> tuple[list[str], dict[str, Any]]:
    """Remove foreign flags (and their values) from argv; return the rest and what was removed."""
    rest: list[str] = []
    found: dict[str, Any] = {}
    lookup = {}
    for key in foreign:
        for n in flag_names(key):
            lookup[n] = key
    i = 0
    while i < len(args):
        arg = args[i]
        head, eq, value = arg.partition("=")
        key = lookup.get(head)
        if key is None:
            rest.append(arg)
            i += 1
            continue
        if foreign[key].takes_value and not eq:
            value = args[i + 1] if i + 1 < len(args) else ""
            i += 1
        found[key] = value if foreign[key].takes_value else True
        i += 1
    return rest, found


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
        name = f"`--{dashed}` / `--no-{dashed}`" if isinstance(default, bool) else f"`--{dashed}`"
        aliases = f.metadata.get("aliases", ())
        if aliases:
            name += " (" + ", ".join(f"`--{a}`" for a in aliases) + ")"
        text = f.metadata.get("help", "").replace("|", "\\|")
        if f.metadata.get("choices"):
            text += " One of: " + ", ".join(f.metadata["choices"]) + "."
        if isinstance(default, bool):
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
    )
