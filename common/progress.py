"""Logging and progress display shared by the stages: everything goes to stderr, never stdout.

    setup_logging()
    with progress(total=120, description="precompute", unit="samples") as bar:
        for ...:
            bar.advance(1, failed=n_failed)

`mode="auto"` draws a rich progress bar when stderr is a terminal and writes plain log lines
(rate, ETA and the extra fields) otherwise, so CI logs and `2>file` stay readable; `"bar"` and
`"log"` force one of them and `"none"` shows nothing. Stdout stays free for machine-readable output
(`cogfun inspect --json`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

MODES = ("auto", "bar", "log", "none")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

log = logging.getLogger("cogfun")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (test runners swap it per test)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Send the `cogfun` logger to stderr with timestamps. Safe to call more than once.

    Records still propagate to the root logger (pytest's caplog and an embedding application
    see them); the root logger has no handler of its own in the command line."""
    root = logging.getLogger("cogfun")
    root.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
    _quiet_library_progress_bars()


def _quiet_library_progress_bars() -> None:
    """diffusers/transformers draw their own tqdm bars for every save and load ("Writing model
    shards", "Loading weights"); cogfun's progress is the one display, so turn theirs off."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def format_duration(seconds: float | None) -> str:
    """`3725.4` -> `1:02:05`; None (unknown) -> `?`."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _format_fields(fields: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in fields.items())


class Progress:
    """Counts work done; the display (bar, log lines or nothing) is chosen by `progress()`."""

    def __init__(self, total: int | None, description: str, unit: str, interval: float):
        self.total = total
        self.description = description
        self.unit = unit
        self.interval = interval
        self.completed = 0
        self.fields: dict[str, Any] = {}
        self.start = time.perf_counter()
        self._last_log = self.start

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        """Units per second since the start (0 before anything is done)."""
        elapsed = self.elapsed
        return self.completed / elapsed if elapsed > 0 and self.completed else 0.0

    @property
    def eta(self) -> float | None:
        if self.total is None or not self.rate:
            return None
        return max(self.total - self.completed, 0) / self.rate

    def advance(self, n: int = 1, **fields: Any) -> None:
        """Count `n` more units done and update the extra fields shown (e.g. `failed=2`)."""
        self.completed += n
        self.fields.update(fields)
        self._refresh()

    def update(self, **fields: Any) -> None:
        """Change the extra fields without counting work."""
        self.fields.update(fields)
        self._refresh()

    def line(self) -> str:
        """One plain-text status line: `precompute: 12/40 samples (30%), 1.52 samples/s, ETA ...`."""
        done = f"{self.completed}/{self.total}" if self.total is not None else f"{self.completed}"
        pct = f" ({100 * self.completed / self.total:.0f}%)" if self.total else ""
        extra = f", {_format_fields(self.fields)}" if self.fields else ""
        return (
            f"{self.description}: {done} {self.unit}{pct}, {self.rate:.2f} {self.unit}/s, "
            f"elapsed {format_duration(self.elapsed)}, ETA {format_duration(self.eta)}{extra}"
        )

    def _refresh(self) -> None:
        """Overridden by the displays."""

    def _close(self) -> None:
        """Overridden by the displays."""


class _LogProgress(Progress):
    """Plain log lines at most every `interval` seconds, plus one at the end."""

    def _refresh(self) -> None:
        now = time.perf_counter()
        if now - self._last_log >= self.interval:
            self._last_log = now
            log.info(self.line())

    def _close(self) -> None:
        log.info(self.line())


class _BarProgress(Progress):
    """A rich progress bar on stderr: count, rate, elapsed, ETA and the extra fields."""

    def __init__(self, total: int | None, description: str, unit: str, interval: float):
        super().__init__(total, description, unit, interval)
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        self._rich = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(f"{{task.fields[rate]}} {unit}/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[extra]}"),
            console=Console(stderr=True),
            transient=False,
        )
        self._rich.start()
        self._task = self._rich.add_task(description, total=total, rate="0.00", extra="")

    def _refresh(self) -> None:
        self._rich.update(
            self._task,
            completed=self.completed,
            rate=f"{self.rate:.2f}",
            extra=_format_fields(self.fields),
        )

    def _close(self) -> None:
        self._refresh()
        self._rich.stop()


def resolve_mode(mode: str) -> str:
    """`auto` -> `bar` on a terminal (stderr), `log` otherwise."""
    if mode not in MODES:
        raise ValueError(f"progress mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "auto":
        return "bar" if sys.stderr.isatty() else "log"
    return mode


@contextmanager
def progress(
    total: int | None,
    description: str,
    mode: str = "auto",
    unit: str = "it",
    interval: float = 10.0,
) -> Iterator[Progress]:
    """A progress display for `total` units; `interval` is the seconds between log lines."""
    kind = resolve_mode(mode)
    cls = {"bar": _BarProgress, "log": _LogProgress, "none": Progress}[kind]
    bar = cls(total, description, unit, interval)
    try:
        yield bar
    finally:
        bar._close()
