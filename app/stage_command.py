"""`cogfun <stage>` commands built from the config dataclasses.

Values come from the dataclass defaults, then the `--config FILE` (YAML/TOML/JSON, which may hold
every option, required ones included), then the command line. A stage may take a second class's
options (`cogfun train` takes the store-building options of `cogfun precompute`): they are handed to
the stage's function beside its config. Every flag the stage does not take (another stage's, one not
supported yet, one no stage knows) is gathered from the command line and the config file and
refused in one message; flags the original parses but that do nothing here are warned about.

Path options arrive as text: a store's (`--out`, `--latents`) may be an object-store URL, checked
and kept a string (`cogfun.config.store_paths`); every other becomes a Path and refuses a URL.
`--storage-options` must be a JSON object; the stage applies it when it starts.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
import typer
from cogfun.app.options import (
    STORE_FIELDS,
    ForeignFlag,
    flag_names,
    is_required,
    load_config_file,
    normalize_key,
    typer_param,
)
from cogfun.config.store_paths import (
    STORAGE_OPTIONS,
    check_store_url,
    is_store_url,
    options_text,
    parse_storage_options,
    store_path,
)
from typer.core import TyperCommand

log = logging.getLogger("cogfun")

UNKNOWN = "no such option"


def add_stage_command(
    app: typer.Typer,
    name: str,
    config_cls: type,
    run: Callable[..., Any],
    *,
    help: str,
    foreign: dict[str, ForeignFlag],
    extra_cls: type | None = None,
    extra_skip: tuple[str, ...] = (),
) -> None:
    """Register `cogfun <name>`: one option per field of `config_cls` (and of `extra_cls`, less
    the fields `config_cls` has and `extra_skip`) plus `--config FILE`. `run(config)` is called, or
    `run(config, extra_values)` with the `extra_cls` options that were given."""
    own = {f.name: f for f in dataclasses.fields(config_cls)}
    skip = set(own) | set(extra_skip)
    extra = (
        {f.name: f for f in dataclasses.fields(extra_cls) if f.name not in skip}
        if extra_cls
        else {}
    )
    fields = {**own, **extra}
    hints = typing.get_type_hints(config_cls)
    if extra_cls is not None:
        hints = {**typing.get_type_hints(extra_cls), **hints}
    params = [typer_param(f, hints, required=f.name in own) for f in fields.values()]
    params.append(
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Path | None,
            default=typer.Option(
                None,
                "--config",
                help="YAML/TOML/JSON file of options (required ones too); command-line flags "
                "override it.",
                exists=True,
                dir_okay=False,
            ),
        )
    )

    def command(ctx: typer.Context, **kwargs: Any) -> None:
        config_file = kwargs.pop("config")
        wrong = [(flag_names(k)[0], foreign[k]) for k in ctx.meta.get("cogfun_foreign", {})]
        wrong += [(flag, None) for flag in ctx.meta.get("cogfun_unknown", [])]
        values: dict[str, Any] = {}
        if config_file is not None:
            values, misplaced = _read_config_file(config_file, fields, foreign)
            wrong += misplaced
        report_misplaced(name, wrong)
        values.update({k: v for k, v in kwargs.items() if v is not None})
        values = _checked(fields, hints, values, config_file, required=own)
        cfg = config_cls(**{k: v for k, v in values.items() if k in own})
        if extra_cls is None:
            run(cfg)
        else:
            run(cfg, {k: v for k, v in values.items() if k in extra})

    ctx_param = inspect.Parameter(
        "ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context
    )
    command.__signature__ = inspect.Signature([ctx_param, *params])  # type: ignore[attr-defined]
    command.__doc__ = help
    variadic = {
        n
        for f in fields.values()
        if f.metadata.get("variadic")
        for key in (f.name, *f.metadata.get("aliases", ()))
        for n in flag_names(key)
    }
    app.command(name, help=help, cls=_misplaced_aware_command(foreign, variadic))(command)


def _read_config_file(
    path: Path, fields: dict[str, dataclasses.Field], foreign: dict[str, ForeignFlag]
) -> tuple[dict[str, Any], list[tuple[str, ForeignFlag | None]]]:
    """The file's values by field name, and its keys this stage does not take."""
    aliases = {a: f.name for f in fields.values() for a in f.metadata.get("aliases", ())}
    values: dict[str, Any] = {}
    wrong: list[tuple[str, ForeignFlag | None]] = []
    for raw_key, value in load_config_file(path).items():
        key = aliases.get(normalize_key(raw_key), normalize_key(raw_key))
        if key in fields:
            values[key] = value
        else:
            wrong.append((f"{path}: {raw_key}", foreign.get(key)))
    return values, wrong


def report_misplaced(stage: str, wrong: list[tuple[str, ForeignFlag | None]]) -> None:
    """Warn about each flag that does nothing; refuse all the others in one message."""
    refused = []
    for where, flag in wrong:
        if flag is not None and flag.kind == "ignored":
            log.warning("%s is accepted but does nothing: %s", where, flag.reason)
        else:
            refused.append(f"  {where}: {flag.reason if flag is not None else UNKNOWN}")
    if refused:
        usage_error(
            f"`cogfun {stage}` does not take {len(refused)} of the flags given:\n"
            + "\n".join(refused)
        )


def usage_error(message: str) -> NoReturn:
    """Print `Error: message` and exit 2, as click does for a usage error."""
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(2)


def _checked(
    fields: dict[str, dataclasses.Field],
    hints: dict[str, Any],
    values: dict[str, Any],
    config_file: Path | None,
    required: dict[str, dataclasses.Field],
) -> dict[str, Any]:
    """Allowed values and the `required` fields, once the file and the command line are merged;
    paths and lists from a config file get the field's type. (Required fields of a second class
    are the stage's to check: train needs a data folder only to build a store.)"""
    for key, value in values.items():
        choices = fields[key].metadata.get("choices")
        if choices and value not in choices:
            raise typer.BadParameter(
                f"{value!r} is not one of {', '.join(choices)}", param_hint=flag_names(key)[0]
            )
    missing = [k for k, f in required.items() if is_required(f) and k not in values]
    if missing:
        where = " or in the --config file" if config_file is not None else " (or in --config FILE)"
        names = ", ".join(f"'{flag_names(k)[0]}'" for k in missing)
        usage_error(f"Missing option {names}: give it on the command line{where}")
    out = {}
    for key, value in values.items():
        tp = str(hints.get(key, ""))
        if isinstance(value, str) and tp.startswith("list"):
            value = [value]
        if "Path" in tp and isinstance(value, list):
            value = [path_value(key, v) for v in value]
        elif "Path" in tp:
            value = path_value(key, value)
        elif key == STORAGE_OPTIONS:
            value = checked_storage_options(value)
        out[key] = value
    return out


def path_value(key: str, value: Any) -> Any:
    """A path option's text as the config takes it: a store's URL checked and kept a string
    (`cogfun.config.store_paths`), any other path a Path; a URL where only a local path will do
    is refused naming the option."""
    if not isinstance(value, str):
        return value
    flag = flag_names(key)[0]
    if key in STORE_FIELDS:
        try:
            check_store_url(value, flag)
        except ValueError as err:
            usage_error(str(err))
        return store_path(value)
    if is_store_url(value):
        if key == "output_dir":
            usage_error(
                f"{flag} {value}: training outputs (checkpoints, logs, metrics, validation "
                "samples) are written to a local folder: give a local --output-dir (only the "
                "stores, --latents, may be on an object store)"
            )
        usage_error(
            f"{flag} {value}: a local path is needed here (only a store, precompute's --out and "
            "train's --latents, may be an object-store URL)"
        )
    return Path(value)


def checked_storage_options(value: Any) -> str | None:
    """`--storage-options` as JSON text (a config file may give a mapping), refused naming the
    option unless it is a JSON object. Applied by the stage itself (`apply_storage_options`)."""
    from cogfun.common.store import StoreError

    text = options_text(value)
    try:
        parse_storage_options(text)
    except StoreError as err:
        usage_error(str(err))
    return text


def _misplaced_aware_command(
    foreign: dict[str, ForeignFlag], variadic: set[str] = frozenset()
) -> type[TyperCommand]:
    """A command class that takes foreign and unknown flags out of argv before click parses it, so
    they are all named in one message instead of click's 'No such option' for the first one; a
    `variadic` flag's values are spread over repeated flags, which click understands."""

    class MisplacedAwareCommand(TyperCommand):
        def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
            rest, found = split_foreign_args(args, foreign)
            rest = spread_variadic(rest, variadic)
            rest, unknown = split_unknown_args(rest, self.get_params(ctx))
            ctx.meta["cogfun_foreign"] = found
            ctx.meta["cogfun_unknown"] = unknown
            return super().parse_args(ctx, rest)

    return MisplacedAwareCommand


def split_foreign_args(
    args: list[str], foreign: dict[str, ForeignFlag]
) -> tuple[list[str], dict[str, Any]]:
    """Remove foreign flags (and their values) from argv; return the rest and what was removed."""
    lookup = {n: key for key in foreign for n in flag_names(key)}
    rest: list[str] = []
    found: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
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


def spread_variadic(args: list[str], flags: set[str]) -> list[str]:
    """`--latents A B --seed 1` -> `--latents A --latents B --seed 1`: every value that follows a
    variadic flag (up to the next `-` argument) gets the flag repeated before it."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            out += args[i:]
            break
        head, eq, _ = arg.partition("=")
        out.append(arg)
        i += 1
        if head not in flags:
            continue
        if not eq and i < len(args):
            out.append(args[i])  # the flag's own value
            i += 1
        while i < len(args) and not args[i].startswith("-"):
            out += [head, args[i]]
            i += 1
    return out


def split_unknown_args(
    args: list[str], params: list[click.Parameter]
) -> tuple[list[str], list[str]]:
    """Remove `--flags` the command does not know (with the value that follows one, when it does
    not look like a flag); return the rest and the unknown flag names."""
    known: dict[str, bool] = {}
    for p in params:
        if p.param_type_name == "option":
            for opt in (*p.opts, *p.secondary_opts):
                known[opt] = not p.is_flag
    rest: list[str] = []
    unknown: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        head, eq, _ = arg.partition("=")
        if not arg.startswith("--") or head in known:
            rest.append(arg)
            if head in known and known[head] and not eq and i + 1 < len(args):
                rest.append(args[i + 1])  # its value, even one that starts with '-'
                i += 1
        else:
            unknown.append(head)
            if not eq and i + 1 < len(args) and not args[i + 1].startswith("-"):
                i += 1  # the unknown flag's value
        i += 1
    return rest, unknown
