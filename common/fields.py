"""`option()`: one stage config field with its command-line help, declared once.

Each stage's config dataclass (`cogfun.precompute.config.PrecomputeConfig`,
`cogfun.train.config.TrainConfig`) declares its fields with `option`. The stages read only the
values; the app layer reads the metadata kept here (`cogfun.app.options` turns it into Typer
options and the README's tables, `cogfun.app.stage_flags` into the flags a stage refuses). The
helper lives in `common/` so that a stage's config never imports the command line.

Metadata keys: `help` (one line), `aliases` (the original's spellings), `choices` (allowed
values), `shown` (the README's default when the value is worked out at run time) and `variadic`
(a list option taking every value that follows its flag).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    aliases: tuple[str, ...] = (),
    choices: tuple[str, ...] | None = None,
    factory: Callable[[], Any] | None = None,
    shown: str | None = None,
    variadic: bool = False,
) -> Any:
    """A config field: default, one line of help, original-spelling aliases, allowed values.

    `shown` is what the README's table prints as the default when the value is worked out at run
    time (None meaning "the model's" or "the store's"). A `variadic` list option takes every value
    that follows its flag (`--latents A B`), besides the repeated flag (`--latents A --latents B`)."""
    meta = {"help": help, "aliases": aliases, "choices": choices, "shown": shown}
    if variadic:
        meta["variadic"] = True
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)
